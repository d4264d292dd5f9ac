"""The benchmark suite runs end to end at the tiniest sizes and writes valid JSON.

No timing is asserted: these check the suite's plumbing (cases, Trainer timing, FLOP
budgets, target checks, the pcx worker's protocol), not the machine's speed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = ["--widths", "8", "--rounds", "1", "--budget", "0.001", "--batch", "8",
        "--cnn-width", "2", "--cnn-image", "8", "--cnn-batch", "4"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite() -> ModuleType:
    return _load("suite")


@pytest.fixture(scope="module")
def tiny_run(suite, tmp_path_factory) -> tuple[dict, dict, str]:
    path = tmp_path_factory.mktemp("bench") / "out.json"
    buffer = io.StringIO()
    saved, sys.stdout = sys.stdout, buffer
    try:
        report = suite.main([*TINY, "--json", str(path)])
    finally:
        sys.stdout = saved
    return report, json.loads(path.read_text()), buffer.getvalue()


def test_json_has_the_expected_keys(tiny_run, suite):
    _, data, _ = tiny_run
    for key in ("date", "command", "machine", "settings", "matmul", "results", "targets",
                "errors", "wall_s"):
        assert key in data, key
    for key in ("torch", "torch_threads", "cpu_count", "load_average", "python"):
        assert key in data["machine"], key
    assert data["errors"] == {}
    assert set(data["matmul"]) == {"mlp-8", "cnn-2"}
    for row in data["matmul"].values():
        assert row["gflops"] > 0 and len(row["gemm"]) == 3
    cases = {(row["task"], row["case"]) for row in data["results"]}
    assert cases == {(task, case) for task in ("mlp-8", "cnn-2") for case in suite.CASE_NAMES}


def test_every_case_has_its_figures(tiny_run):
    _, data, _ = tiny_run
    for row in data["results"]:
        if row["task"] == "cnn-2" and row["case"] == "dtp-ridge":
            assert "linear feedback" in row["skipped"]  # ridge needs linear feedback maps
            continue
        assert row["rule_step"]["median_ms"] > 0
        assert row["trainer"]["median_ms"] > 0
        assert math.isfinite(row["trainer_overhead_ms"])
        assert row["fraction_of_matmul"] > 0
        assert math.isfinite(row["final_loss"])
        if row["case"] == "bp":
            assert row["x_backprop"] == 1.0 and row["flop_budget"] == 1.0
        if row["case"] in ("pc-T1", "pc-T8", "pc-T20"):
            steps = row["inference_steps"]
            assert row["flop_budget"] == pytest.approx((2 * steps + 3) / 3)
        if row["case"] == "pc-tol":
            assert 1 <= row["inference_steps"] <= 50


def test_targets_and_table(tiny_run):
    _, data, printed = tiny_run
    targets = {check["target"] for check in data["targets"]}
    assert "Trainer overhead pc-T8 <= backprop's" in targets
    assert {"dtp-ridge x backprop", "dtp-noisy x backprop"} <= targets
    assert not any("pcx" in target for target in targets)  # no pcx: no pcx column or check
    for check in data["targets"]:
        assert check["pass"] in (True, False, None)
    assert "| model | case | rule.step ms | Trainer ms |" in printed
    assert "| target | model | measured | limit | pass |" in printed


def test_quick_defaults(suite):
    args = suite.parse_args(["--quick"])
    assert args.widths == [64, 256] and args.rounds == 1
    args = suite.parse_args(["--cases", "pc-T8"])
    assert args.widths == [64, 256, 1024, 4096] and args.rounds == 3
    assert args.cases == ["bp", "pc-T8"]  # ratios are to backprop


def test_flop_budget_formula(suite):
    model = suite.FlopModel(forward=100, first_block=10, feedback=50, ridge=7, largest=(1, 1, 1))
    cases = {case.name: case for case in suite.make_cases(1e-2, 0.1)}
    assert model.estimate(cases["bp"], None) == 300
    assert model.estimate(cases["pc-T8"], 8) / model.backprop == pytest.approx(19 / 3)
    assert model.estimate(cases["dtp-ridge"], None) == 300 + 100 + 7
    assert model.estimate(cases["dtp-noisy"], None) == 300 + 100 + 90 + 100


def test_pcx_worker_protocol():
    worker = _load("pcx_worker")
    answers = io.StringIO()
    worker.serve(io.StringIO('{"op": "nothing"}\nnot json\n{"op": "quit"}\n{"op": "hello"}\n'),
                 answers)
    lines = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert "unknown op" in lines[0]["error"]
    assert "error" in lines[1]
    assert lines[2] == {"bye": True} and len(lines) == 3  # stops at quit


@pytest.mark.skipif(importlib.util.find_spec("pcx") is not None, reason="pcx is installed here")
def test_pcx_python_without_pcx_fails_clearly(suite):
    with pytest.raises(RuntimeError, match="pcx worker"):
        suite.PcxWorker(sys.executable)
