"""End to end on MNIST-1D: predictive coding under muP against backprop, with Lightning.

The full claim (width 512, 40 epochs: PC >= 65% and within 3 points of backprop) runs with
``pytest -m slow``; CI runs a short version that checks both rules learn (well above the 10%
of chance) through the whole stack.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist1d_pc_vs_bp.py"


def _example():
    spec = importlib.util.spec_from_file_location("mnist1d_pc_vs_bp", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_both_rules_learn(tmp_path):
    results = _example().main(
        [
            "--epochs",
            "6",
            "--width",
            "64",
            "--num-samples",
            "2000",
            "--data-dir",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path),
        ]
    )
    # chance is 10%; 400 test samples put its 99.9% band below 15%
    assert results["bp"]["test_acc"] > 0.2
    assert results["pc"]["test_acc"] > 0.2
    assert (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_pc_under_mup_matches_backprop_on_mnist1d(tmp_path):
    results = _example().main(["--data-dir", str(tmp_path / "data"), "--out", str(tmp_path)])
    pc, bp = results["pc"]["test_acc"], results["bp"]["test_acc"]
    assert pc >= 0.65
    assert abs(bp - pc) <= 0.03
