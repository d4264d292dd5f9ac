"""The README's Python snippets run as written (the training loop cut to a few batches)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _snippet(marker: str) -> str:
    found = [code for code in SNIPPETS if marker in code]
    assert len(found) == 1, f"expected one README snippet containing {marker!r}"
    return found[0]


def test_plain_pytorch_snippet_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # load_mnist1d() caches into ./data
    code = _snippet("rule.step(net, x, y, optimizer)")
    assert "range(0, 4000, 128)" in code
    namespace: dict = {}
    exec(code.replace("range(0, 4000, 128)", "range(0, 384, 128)"), namespace)
    assert namespace["result"].loss.item() > 0


@pytest.mark.parametrize("marker", ["gamma_L = mup.output_weight(1.0, net)", "rule.build_network"])
def test_snippets_run(marker):
    namespace: dict = {}
    exec(_snippet(marker), namespace)
    if marker.startswith("gamma_L"):
        assert namespace["gamma_L"] == 1.0  # g = 0: no width scaling of gamma_L
    else:
        assert len(namespace["net"].feedback) == 2
