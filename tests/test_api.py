"""The flat public API: every exported name resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import lightning_local


def test_every_exported_name_resolves_to_its_module_object():
    for name in lightning_local.__all__:
        value = getattr(lightning_local, name)
        assert getattr(value, "__name__", name) == name or not hasattr(value, "__name__")
    assert set(lightning_local.__all__) <= set(dir(lightning_local))


def test_unknown_name_is_an_attribute_error():
    try:
        lightning_local.NotAThing  # noqa: B018
    except AttributeError as error:
        assert "NotAThing" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_import_does_not_load_torch_or_lightning():
    code = "import sys, lightning_local; print('torch' in sys.modules, 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
