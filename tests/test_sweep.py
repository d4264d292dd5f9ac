"""The width x lr sweep: record schema, resume, divergence, best-lr tables, processes, CLI.

References: records read back from disk against the run grid; a resumed or parallel sweep
against a fresh sequential one; best lrs against hand-made scores; muP at the base width
against SP (they must coincide).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import wandb
import yaml
from _wandb_run import offline_wandb
from _wandb_run import records as wandb_records

from lightning_local import cli
from lightning_local.errors import LocalLearningError
from lightning_local.sweeps import (
    SweepConfig,
    best_learning_rates,
    build_experiment,
    format_best_lr_table,
    format_wider_is_better_table,
    log2_grid,
    parse_variant,
    read_results,
    sweep,
)
from lightning_local.sweeps.results import RECORD_FIELDS, append_result, repair_results
from tests._sweep_fixtures import tiny_config, with_data


@pytest.fixture
def tmp_path(tmp_path, data_dir):
    return with_data(tmp_path, data_dir)

_config = tiny_config


def test_records_follow_the_schema_and_cover_the_grid(tmp_path):
    config = _config(tmp_path, rules=["bp", "pc-si", "dtp"])
    result = sweep(config, tmp_path / "out", log=None)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON, one object per line
    assert len(records) == 3 * 2 * 2 * 2 == result.executed
    for record in records:
        for name, kind in RECORD_FIELDS.items():
            assert isinstance(record[name], kind), (name, record[name])
        assert record["diverged"] is False
        assert 0.0 <= record["test_acc"] <= 1.0 and record["train_loss"] > 0
        assert record["steps_done"] == 3
    grid = {(r["rule"], r["parametrization"], r["width"], r["lr"]) for r in records}
    assert grid == {
        (rule, param, width, lr)
        for rule in ("bp", "pc-si", "dtp") for param in ("sp", "mup")
        for width in (8, 16) for lr in (0.05, 0.1)
    }
    assert result.plot_path.exists() and result.plot_path.stat().st_size > 1000
    assert "| dtp | mup |" in result.table and "shift" in result.table


def test_rerun_skips_finished_runs_and_runs_only_new_ones(tmp_path):
    first = sweep(_config(tmp_path), tmp_path / "out", plot=False, log=None)
    again = sweep(_config(tmp_path), tmp_path / "out", plot=False, log=None)
    assert (first.executed, first.skipped) == (8, 0)
    assert (again.executed, again.skipped) == (0, 8)
    assert [r["key"] for r in again.records] == [r["key"] for r in first.records]
    more = sweep(_config(tmp_path, lrs=[0.05, 0.1, 0.2]), tmp_path / "out", plot=False, log=None)
    assert (more.executed, more.skipped) == (4, 8)
    # another budget is another run: nothing is skipped
    longer = sweep(_config(tmp_path, steps=4), tmp_path / "out", plot=False, log=None)
    assert longer.executed == 8
    assert len(read_results(tmp_path / "out" / "results.jsonl")) == 20


def test_a_truncated_last_line_is_ignored_and_that_run_repeated(tmp_path):
    sweep(_config(tmp_path), tmp_path / "out", plot=False, log=None)
    path = tmp_path / "out" / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed mid-write
    with pytest.warns(RuntimeWarning, match="truncated"):
        resumed = sweep(_config(tmp_path), tmp_path / "out", plot=False, log=None)
    assert (resumed.executed, resumed.skipped) == (1, 7)
    rewritten = path.read_text().splitlines()
    assert len(rewritten) == 8 and all(json.loads(line) for line in rewritten)


def test_the_config_and_the_table_are_written_atomically(tmp_path, monkeypatch):
    """A failed write leaves the previous ``sweep_config.json`` / ``best_lr.md`` whole."""
    from lightning_local import _atomic
    from lightning_local.sweeps import runner

    written = []

    def recording(path, text, **kwargs):
        written.append(Path(path).name)
        return _atomic.atomic_write_text(path, text, **kwargs)

    monkeypatch.setattr(runner, "atomic_write_text", recording)
    out = tmp_path / "out"
    result = sweep(_config(tmp_path, widths=[8]), out, plot=False, log=None)
    assert written == ["sweep_config.json", "best_lr.md"]
    assert result.table_path.read_text().startswith(result.table)
    assert json.loads((out / "sweep_config.json").read_text())["widths"] == [8]

    def failing(path, data, **kwargs):
        raise OSError("disk full")

    before = {name: (out / name).read_text() for name in written}
    monkeypatch.setattr(_atomic, "atomic_write_bytes", failing)
    with pytest.raises(OSError, match="disk full"):
        sweep(_config(tmp_path, widths=[8]), out, plot=False, log=None)
    assert {name: (out / name).read_text() for name in written} == before
    assert not list(out.glob(".*.tmp"))


def test_repair_and_append_keep_one_object_per_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"a": 1, "loss": float("nan")})
    with open(path, "a") as file:
        file.write('{"a": 2, "lo')
    with pytest.warns(RuntimeWarning, match="truncated"):
        repair_results(path)
    append_result(path, {"a": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"a": 1, "loss": None}, {"a": 3},
    ]


@pytest.mark.parametrize(
    "huge, divergence_factor, reason", [(100.0, 100.0, "exceeds"), (1e30, math.inf, "non-finite")]
)
def test_diverging_runs_are_recorded_and_the_sweep_goes_on(
    tmp_path, huge, divergence_factor, reason
):
    config = _config(tmp_path, parametrizations=["sp"], widths=[16], lrs=[0.05, huge, 0.1],
                     steps=6, divergence_factor=divergence_factor)
    result = sweep(config, tmp_path / "out", plot=False, log=None)
    by_lr = {r["lr"]: r for r in result.records}
    assert len(by_lr) == 3
    bad = by_lr[huge]
    assert bad["diverged"] is True and reason in bad["diverged_reason"]
    assert bad["train_loss"] is None and bad["test_acc"] is None
    assert not by_lr[0.05]["diverged"] and not by_lr[0.1]["diverged"]
    best = best_learning_rates(result.records)
    assert best[0].lr in (0.05, 0.1) and best[0].scores[huge] == math.inf


def test_a_trial_that_raises_is_recorded_as_failed_and_the_others_finish(tmp_path, capsys):
    """Every width-16 trial raises (a bug in the model, say): the width-8 trials finish, the
    failed ones are recorded with their error, left out of the tables, and run again on
    resume unless ``--no-retry-failed``."""
    model = {"class_path": "_sweep_models.TrappedNet", "init_args": {"traps": {16: "raise"}}}
    config = _config(tmp_path, model=model)
    result = sweep(config, tmp_path / "out", plot=True, log=None)
    assert result.executed == 8
    assert [(r["width"], r["status"]) for r in result.records] == [(8, "ok")] * 4
    assert len(result.failed) == 4
    for record in result.failed:
        assert record["width"] == 16 and record["diverged"] is False
        assert record["error"] == "RuntimeError: injected failure at width 16"
        assert record["train_loss"] is None and "raise RuntimeError" in record["traceback"]
        for name, kind in RECORD_FIELDS.items():
            assert isinstance(record[name], kind), (name, record[name])
    assert [b.width for b in result.best] == [8, 8]  # failed runs are no data point
    assert "4 run(s) failed" in result.table_path.read_text()
    assert result.plot_path.exists()
    again = sweep(config, tmp_path / "out", plot=False, log=None)
    assert (again.executed, again.skipped, len(again.failed)) == (4, 4, 4)
    kept = sweep(config, tmp_path / "out", plot=False, log=None, retry_failed=False)
    assert (kept.executed, kept.skipped) == (0, 8)
    assert len(read_results(tmp_path / "out" / "results.jsonl")) == 12  # 8 + 4 retried
    args = ["--config", str(_yaml(tmp_path, model)), "--output", str(tmp_path / "out"),
            "--quiet", "--no-plot"]
    capsys.readouterr()
    assert cli.main(["sweep", *args, "--no-retry-failed"]) == 0
    assert "0 runs trained, 8 skipped (already finished), 4 failed" in capsys.readouterr().err


def _yaml(tmp_path, model) -> Path:
    """The grid of :func:`_config` as a ``--config`` file with ``model``."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(dict(
        model=model, rules=["bp"], parametrizations=["sp", "mup"], widths=[8, 16],
        lrs=[0.05, 0.1], seeds=[0], steps=3, num_samples=200, batch_size=32, base_width=8,
        data_dir=str(tmp_path / "data"),
    )))
    return path


def _record(rule, param, width, lr, loss, seed=0, acc=None):
    diverged = loss is None
    return dict(rule=rule, parametrization=param, width=width, lr=lr, seed=seed,
                train_loss=loss, test_loss=loss, test_acc=acc, diverged=diverged)


def test_best_lr_table_from_synthetic_results():
    losses = {  # width -> loss per log2 lr -3 .. 0; None = diverged
        64: [0.5, 0.2, 0.3, None],
        128: [0.5, 0.3, 0.1, None],
        256: [0.4, 0.35, 0.3, 0.05],  # best at the grid's edge
    }
    records = [
        _record("bp", "mup", width, 2.0**e, loss)
        for width, row in losses.items() for e, loss in zip(range(-3, 1), row)
    ]
    best = best_learning_rates(records)
    assert [b.log2_lr for b in best] == [-2, -1, 0]
    assert [b.at_edge for b in best] == [False, False, True]
    assert best[0].scores[1.0] == math.inf
    table = format_best_lr_table(best)
    assert "| bp | mup | -2 | -1 | 0* | 2 |" in table
    narrowest = format_wider_is_better_table(best, reference="narrowest")  # its best: 2^-2
    assert "| bp | mup | -2 | 0.2 | 0.3 | 0.35 |" in narrowest
    mean = format_wider_is_better_table(best)  # best sum over widths: 2^-1 (0.7)
    assert "| bp | mup | -1 | 0.3 | 0.1 | 0.3 |" in mean


def test_best_lr_averages_seeds_and_a_diverged_seed_spoils_its_lr():
    records = [
        _record("pc", "sp", 64, 0.25, 0.1, seed=0), _record("pc", "sp", 64, 0.25, None, seed=1),
        _record("pc", "sp", 64, 0.125, 0.3, seed=0), _record("pc", "sp", 64, 0.125, 0.1, seed=1),
        _record("pc", "sp", 64, 0.0625, 0.25, seed=0), _record("pc", "sp", 64, 0.0625, 0.25, 1),
    ]
    (best,) = best_learning_rates(records)
    assert best.lr == 0.125 and best.score == pytest.approx(0.2)
    acc = [_record("pc", "sp", 64, lr, 0.1, acc=a) for lr, a in [(0.1, 0.5), (0.2, 0.7)]]
    assert best_learning_rates(acc, metric="test_acc")[0].lr == 0.2
    with pytest.raises(LocalLearningError, match="metric"):
        best_learning_rates(records, metric="speed")


def test_every_lr_diverged_reads_div():
    records = [_record("bp", "sp", 64, lr, None) for lr in (0.5, 1.0)]
    records += [_record("bp", "sp", 128, lr, 0.3) for lr in (0.5, 1.0)]
    best = best_learning_rates(records)
    assert best[0].lr is None
    assert "| bp | sp | div | -1* | div |" in format_best_lr_table(best)


@pytest.mark.slow  # spawning two workers that import torch takes tens of seconds on 2 cores
def test_parallel_workers_give_the_same_records_as_one_process(tmp_path):
    config = _config(tmp_path, parametrizations=["mup"])
    sequential = sweep(config, tmp_path / "one", plot=False, log=None, threads=1)
    parallel = sweep(config, tmp_path / "two", workers=2, plot=False, log=None)
    assert parallel.executed == 4

    def losses(result):
        return sorted((r["key"], r["train_loss"], r["test_acc"]) for r in result.records)

    assert losses(parallel) == losses(sequential)


def test_mup_at_the_base_width_is_sp():
    runs = {}
    for param in ("sp", "mup"):
        torch.manual_seed(3)
        runs[param] = build_experiment("pc-si", param, 32, 0.1, in_features=5, num_classes=3,
                                       base_width=32)
    sp, mup = runs["sp"], runs["mup"]
    for a, b in zip(sp.network.parameters(), mup.network.parameters()):
        assert torch.equal(a, b)
    assert {g["lr"] for g in mup.optimizer.param_groups} == {0.1}
    assert mup.rule.output_weight == sp.rule.output_weight == 1.0


def test_variant_names_and_overrides():
    variant = parse_variant("pc-sim:inference_steps=3,fixed_prediction=true")
    assert variant.family == "pc"
    rule = variant.build()
    assert (rule.inference, rule.inference_steps, rule.inference_lr) == ("simultaneous", 3, 0.2)
    assert rule.fixed_prediction is True
    assert variant.name == "pc-sim:fixed_prediction=true,inference_steps=3"
    assert parse_variant("dtp").build().variant == "dtp"
    with pytest.raises(LocalLearningError, match="unknown rule variant"):
        parse_variant("pc-fast")
    with pytest.raises(LocalLearningError, match="override"):
        parse_variant("pc-sim:warp=2").build()
    with pytest.raises(LocalLearningError, match="key=value"):
        parse_variant("pc-sim:steps")


def test_config_and_grid_errors():
    assert log2_grid(-2, 1) == [0.25, 0.5, 1.0, 2.0]
    assert log2_grid(-1, 0, 0.5) == pytest.approx([0.5, 2**-0.5, 1.0])
    with pytest.raises(LocalLearningError):
        log2_grid(1, -1)
    with pytest.raises(LocalLearningError, match="empty"):
        SweepConfig(widths=[])
    with pytest.raises(LocalLearningError, match="positive"):
        SweepConfig(lrs=[0.0])


def test_command_line(tmp_path, capsys):
    args = ["--rules", "bp", "--widths", "8", "16", "--log2-lr", "-4", "-3", "--steps", "2",
            "--num-samples", "200", "--batch-size", "32", "--base-width", "8",
            "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "out"), "--quiet"]
    assert cli.main(["sweep", *args]) == 0  # through the lightning-local dispatcher
    out = capsys.readouterr().out
    assert "| bp | mup |" in out and "| bp | sp |" in out
    assert len(read_results(tmp_path / "out" / "results.jsonl")) == 8
    assert (tmp_path / "out" / "transfer.png").exists()
    assert cli.main(["sweep", "--rules", "nope", "--output", str(tmp_path / "x")]) == 2


def _offline_runs(out: Path) -> dict[str, tuple[Path, object, dict, list[dict]]]:
    """Each offline W&B run in ``out/wandb`` by display name: its folder, its run record
    (group, job type), its config (last value per key) and its history rows."""
    runs = {}
    for path in out.glob("wandb/offline-run-*/run-*.wandb"):
        run, config, history = None, {}, []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            updates = {"config": record.config, "run": record.run.config}.get(kind)
            if kind == "run":
                run = record.run
            if updates is not None:
                config.update({i.key: json.loads(i.value_json) for i in updates.update})
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        runs[run.display_name] = (path.parent, run, config, history)
    return runs


def test_wandb_flag_writes_a_run_per_trial_and_the_sweeps_figure_table_and_arguments(
    tmp_path, capsys, monkeypatch
):
    offline_wandb(tmp_path, monkeypatch)
    out = tmp_path / "out"
    args = ["--rules", "bp", "--parametrizations", "mup", "--widths", "8", "16",
            "--lrs", "0.05", "0.1", "--steps", "2", "--num-samples", "200", "--batch-size", "32",
            "--base-width", "8", "--data-dir", str(tmp_path / "data"), "--output", str(out),
            "--quiet", "--wandb", "--wandb-project", "test"]
    assert cli.main(["sweep", *args]) == 0
    wandb.teardown()  # stops the wandb service, which writes the run files to their end
    runs = _offline_runs(out)
    assert len(runs) == 1 + 4  # the sweep's run and one per trial, all in the sweep's group
    assert {run.run_group for _, run, _, _ in runs.values()} == {"sweep-out"}
    run_dir, run, config, history = runs["sweep-out"]
    assert run.job_type == "sweep"
    assert f"wandb sync {run_dir}" in capsys.readouterr().err
    assert config["arguments"]["widths"] == [8, 16] and config["arguments"]["wandb"] is True
    assert config["lrs"] == [0.05, 0.1] and config["metric"] == "train_loss"
    # the image is transfer.png itself
    (figure,) = [row for row in history if "figures/transfer/_type" in row]
    (image,) = figure["figures/transfer/filenames"]
    assert (run_dir / "files" / image).read_bytes() == (out / "transfer.png").read_bytes()
    # the table holds the best lr per width of results.jsonl
    (table,) = [row for row in history if row.get("tables/best_lr/_type") == "table-file"]
    saved = json.loads((run_dir / "files" / table["tables/best_lr/path"]).read_text())
    rows = [dict(zip(saved["columns"], row)) for row in saved["data"]]
    results = read_results(out / "results.jsonl")
    best = best_learning_rates(results)
    assert [(r["rule"], r["parametrization"], r["width"], r["lr"]) for r in rows] == [
        (b.rule, b.parametrization, b.width, b.lr) for b in best
    ]
    # each trial's run: its settings (run key included) and its loss per epoch
    trials = {config["key"]: (run, history) for _, run, config, history in runs.values()
              if run.job_type == "trial"}
    assert set(trials) == {r["key"] for r in results}
    for record in results:
        run, history = trials[record["key"]]
        assert run.display_name == (f"bp mup w={record['width']} "
                                    f"lr=2^{math.log2(record['lr']):g} s=0")
        losses = [row["train/loss_epoch"] for row in history if "train/loss_epoch" in row]
        assert losses == pytest.approx(record["epoch_train_loss"])
