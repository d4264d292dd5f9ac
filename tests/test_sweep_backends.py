"""Where a sweep's trials run: the local backend (this process or a pool) and Ray tasks.

References: every backend's records against the in-process local backend's (same keys, same
losses to float tolerance, the same tables); a sweep whose worker is killed once
(``os._exit``) against one that was not; the runs a resumed Ray sweep trains against the
runs missing from the folder.

The Ray tests share one local Ray instance with 2 CPUs (the module's fixture). They are
skipped when Ray is not installed, except in CI (``CI`` set), which installs the ``ray`` extra
and must run them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_local import cli
from lightning_local.errors import LocalLearningError
from lightning_local.sweeps import SweepConfig, load_results, read_results, sweep
from lightning_local.sweeps.backends import LocalBackend, RayBackend, make_backend
from lightning_local.sweeps.backends.ray_backend import import_ray, plan_tasks
from tests._sweep_fixtures import tiny_config, with_data


@pytest.fixture
def tmp_path(tmp_path, data_dir):
    return with_data(tmp_path, data_dir)

TESTS = Path(__file__).resolve().parent
TRAPPED = "_sweep_models.TrappedNet"


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs and one declared GPU (Ray schedules GPU shares on it
    whether or not the machine has one) whose workers can import this folder's modules."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            raise  # CI installs the ray extra: these tests must run there
        pytest.skip("Ray is not installed (pip install -e \".[ray]\")")
    with pytest.MonkeyPatch.context() as env:
        previous = os.environ.get("PYTHONPATH")
        env.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), *filter(None, [previous])]))
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")  # offline: nothing leaves the machine
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


_config = tiny_config


def _trapped(traps: dict, marker: Path | None = None, **args) -> dict:
    init_args = {"traps": traps, "marker": str(marker or ""), **args}
    return {"class_path": TRAPPED, "init_args": init_args}


def _assert_same_runs(got, want) -> None:
    """The same runs in the same order, with the same results to float tolerance."""
    assert [r["key"] for r in got] == [r["key"] for r in want]
    for a, b in zip(got, want):
        assert a["status"] == b["status"] and a["diverged"] == b["diverged"], a["key"]
        for name in ("train_loss", "test_loss"):
            assert a[name] == pytest.approx(b[name], rel=1e-6, abs=1e-9), (a["key"], name)
        assert a["test_acc"] == b["test_acc"] and a["epoch_train_loss"] == pytest.approx(
            b["epoch_train_loss"], rel=1e-6)


# ------------------------------------------------------------------------- task plans
def _specs(widths):
    return [{"key": f"k{i}", "width": w, "_model": None, "_data": None}
            for i, w in enumerate(widths)]


def test_tasks_pack_narrow_trials_and_give_the_widest_a_task_each():
    tasks = plan_tasks(_specs([8, 8, 8, 8, 8, 16, 16, 32, 32]), trials_per_task=8, slots=1)
    assert [[s["width"] for s in t] for t in tasks] == [  # a task costs <= 8 * 8^2
        [8, 8, 8, 8, 8], [16, 16], [32], [32]]
    capped = plan_tasks(_specs([8] * 10), trials_per_task=4, slots=1)
    assert [len(t) for t in capped] == [4, 4, 2]
    spread = plan_tasks(_specs([8] * 10), trials_per_task=8, slots=4)  # every slot gets work
    assert [len(t) for t in spread] == [3, 3, 3, 1]
    assert [s["key"] for t in spread for s in t] == [f"k{i}" for i in range(10)]
    assert plan_tasks([], 8, 2) == []


def test_backend_options_are_checked():
    assert isinstance(make_backend("local", workers=2), LocalBackend)
    assert make_backend("ray", gpus_per_trial=0.25, threads=2).describe() == (
        "Ray, 2 CPU + 0.25 GPU per trial")
    with pytest.raises(LocalLearningError, match="do not apply to the local backend"):
        make_backend("local", gpus_per_trial=1)
    with pytest.raises(LocalLearningError, match="unknown backend"):
        make_backend("slurm")
    with pytest.raises(LocalLearningError, match="gpus_per_trial"):
        RayBackend(gpus_per_trial=-1)
    with pytest.raises(LocalLearningError, match="workers"):
        LocalBackend(workers=0)
    with pytest.raises(LocalLearningError, match="belong to the backend"):
        sweep(SweepConfig(), "unused", workers=2, backend=LocalBackend())


def test_command_line_refuses_options_of_the_other_backend(tmp_path, capsys):
    base = ["sweep", "--output", str(tmp_path / "out"), "--quiet"]
    assert cli.main([*base, "--gpus-per-trial", "0.5"]) == 2
    assert "only with --backend ray" in capsys.readouterr().err
    assert cli.main([*base, "--backend", "ray", "--workers", "2"]) == 2
    assert "--workers is the local backend's" in capsys.readouterr().err


def test_ray_missing_is_named_with_its_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(LocalLearningError, match=r"lightning-local\[ray\]"):
        import_ray()


# ------------------------------------------------------------------------- local pool
def test_a_pool_worker_killed_once_is_retried_and_the_sweep_matches_one_process(tmp_path):
    """Two worker processes; the first width-8 trial's worker exits abruptly (``os._exit``).
    The pool is rebuilt, the lost trial runs again alone, and every record equals the
    in-process sweep's."""
    marker = tmp_path / "crashed"
    config = _config(tmp_path, model=_trapped({8: "crash_once"}, marker))
    lines = []
    pooled = sweep(config, tmp_path / "pool", plot=False, log=lines.append,
                   backend=LocalBackend(workers=2, threads=1))
    assert marker.exists()  # a worker did die
    assert any("a worker process died" in line for line in lines)
    assert pooled.executed == 8 and not pooled.failed
    in_process = sweep(config, tmp_path / "one", plot=False, log=None, threads=1)
    _assert_same_runs(pooled.records, in_process.records)
    assert pooled.table == in_process.table


# ------------------------------------------------------------------------- a killed driver
def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_killed_driver_reruns_only_the_unfinished_trials(tmp_path, backend, request):
    """The sweep command runs in its own process; its third trial (the first of width 16)
    waits for a file. Once two records are on disk the process is killed with SIGKILL (with
    Ray: the driver of a job on a running Ray instance, as with --ray-address; Ray ends the
    job's tasks with it); the same sweep then runs only the six trials without a record."""
    extra = {}
    if backend == "ray":
        ray = request.getfixturevalue("ray_instance")
        extra["ray_address"] = ray.get_runtime_context().gcs_address
    release = tmp_path / "release"
    out = tmp_path / "out"
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "model": _trapped({16: "wait"}, release), "rules": ["bp"],
        "parametrizations": ["sp", "mup"], "widths": [8, 16], "lrs": [0.05, 0.1], "steps": 3,
        "num_samples": 200, "batch_size": 32, "base_width": 8,
        "data_dir": str(tmp_path / "data"), "output": str(out), "backend": backend, **extra,
    }))
    command = ["sweep", "--config", str(config), "--quiet", "--no-plot"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    results = out / "results.jsonl"
    with open(tmp_path / "driver.log", "w") as driver_log:
        driver = subprocess.Popen([sys.executable, "-m", "lightning_local.cli", *command],
                                  env=env, stdout=driver_log, stderr=subprocess.STDOUT,
                                  cwd=tmp_path)
        try:
            deadline = time.monotonic() + 180
            while len(_lines(results)) < 2 and driver.poll() is None:
                assert time.monotonic() < deadline, "the sweep never wrote two records"
                time.sleep(0.05)
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait(timeout=60)
    before = [json.loads(line) for line in _lines(results)]  # whole lines only
    assert len(before) == 2 and {r["width"] for r in before} == {8}
    release.touch()
    lines = []
    resumed = sweep(_config(tmp_path, model=_trapped({16: "wait"}, release)), out,
                    plot=False, log=lines.append, backend=backend)
    assert (resumed.executed, resumed.skipped) == (6, 2)
    after = [json.loads(line) for line in _lines(results)]
    assert after[:2] == before
    keys = [r["key"] for r in after]
    assert len(keys) == len(set(keys)) == 8
    assert {r["key"] for r in resumed.records} == set(keys)
    assert not resumed.failed


# ------------------------------------------------------------------------- Ray
def test_ray_backend_gives_the_local_backends_records_run_for_run(tmp_path, ray_instance):
    config = _config(tmp_path, rules=["bp", "pc-si", "dtp"])
    assert max(len(t) for t in plan_tasks(config.run_specs(), 8, 2)) > 1  # tasks of several
    local = sweep(config, tmp_path / "local", plot=False, log=None, threads=1)
    remote = sweep(config, tmp_path / "ray", plot=False, log=None,
                   backend=RayBackend(threads=1))
    assert remote.executed == local.executed == 24 and not remote.failed
    _assert_same_runs(remote.records, local.records)
    assert remote.table == local.table
    assert remote.backend == "Ray, 1 CPU per trial"


def test_ray_sweep_resumes_runs_only_what_is_missing(tmp_path, ray_instance):
    """Half the grid is already in the folder (a local shard): Ray trains the other half."""
    config = _config(tmp_path)
    out = tmp_path / "out"
    first = sweep(config, out, plot=False, log=None, shard="0/2")
    resumed = sweep(config, out, plot=False, log=None, backend="ray")
    assert (first.executed, resumed.executed, resumed.skipped) == (4, 4, 4)
    shard_one = sorted(spec["key"] for spec in config.run_specs()[1::2])
    assert sorted(r["key"] for r in read_results(out / "results.jsonl")) == shard_one
    again = sweep(config, out, plot=False, log=None, backend="ray")
    assert (again.executed, again.skipped) == (0, 8)
    reference = sweep(config, tmp_path / "reference", plot=False, log=None, threads=1)
    _assert_same_runs(again.records, reference.records)


def test_command_line_with_the_ray_backend(tmp_path, ray_instance, capsys):
    args = ["sweep", "--rules", "bp", "--widths", "8", "16", "--lrs", "0.05", "0.1",
            "--steps", "2", "--num-samples", "200", "--batch-size", "32", "--base-width", "8",
            "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
            "--quiet", "--no-plot", "--backend", "ray", "--threads", "1",
            "--trials-per-task", "2"]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "| bp | mup |" in captured.out
    assert "8 runs trained, 0 skipped" in captured.err
    assert len(load_results(tmp_path / "out")) == 8


def test_ray_trial_that_raises_is_failed_and_a_lost_worker_is_retried(tmp_path, ray_instance):
    """Width 16 raises in every trial; at width 8 the second trapped network of a worker
    process exits that process once, inside a task of several trials."""
    marker = tmp_path / "crashed"
    model = _trapped({8: "crash_once", 16: "raise"}, marker, crash_after=1)
    config = _config(tmp_path, model=model, lrs=[0.025, 0.05, 0.1])
    lines = []
    result = sweep(config, tmp_path / "out", plot=False, log=lines.append,
                   backend=RayBackend(trials_per_task=3))
    assert marker.exists()
    assert sum("lost a worker" in line for line in lines) == 1
    assert result.executed == 12
    assert {(r["width"], r["status"]) for r in result.records} == {(8, "ok")}
    assert len(result.records) == 6
    assert len(result.failed) == 6 and {r["width"] for r in result.failed} == {16}
    assert {r["error"] for r in result.failed} == {"RuntimeError: injected failure at width 16"}
    assert all("_sweep_models.py" in r["traceback"] for r in result.failed)
    assert "| 8 | shift |" in result.table  # the failed width is not in the table
    assert "6 run(s) failed" in result.table_path.read_text()
    local = sweep(_config(tmp_path, model=model, lrs=[0.025, 0.05, 0.1], widths=[8]),
                  tmp_path / "local", plot=False, log=None, threads=1)
    _assert_same_runs(result.records, local.records)


def test_ray_refuses_a_trial_no_node_can_run(tmp_path, ray_instance):
    for backend in (RayBackend(gpus_per_trial=2), RayBackend(threads=3)):
        with pytest.raises(LocalLearningError, match="no Ray node can run a trial"):
            sweep(_config(tmp_path), tmp_path / "out", plot=False, log=None, backend=backend)
    assert load_results(tmp_path / "out", include_failed=True) == []


def test_a_gpu_share_trains_each_trial_on_the_gpu_ray_assigns(tmp_path, ray_instance):
    """Half a GPU per trial: both trials run on the one declared GPU, each on ``cuda``. On a
    machine without a GPU, CUDA's own error is recorded for each trial."""
    import torch

    lines = []
    result = sweep(_config(tmp_path, parametrizations=["mup"], widths=[8]), tmp_path / "out",
                   plot=False, log=lines.append, backend=RayBackend(gpus_per_trial=0.5))
    assert "ray: 2 trial(s) at once on 1 node(s)" in lines
    assert result.executed == 2
    if torch.cuda.is_available():
        assert [r["device"] for r in result.records] == ["cuda", "cuda"]
    else:
        assert len(result.failed) == 2
        assert all("NVIDIA driver" in r["error"] for r in result.failed), result.failed
