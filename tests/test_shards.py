"""Shards of a sweep (``--shard i/n``) and the readers that merge their results files.

References: the union of shards 0/2 and 1/2 against the unsharded sweep of the same grid (same
runs, same results, the same tables); the merge of hand-made records against the rule "the
last finished record of a key, else its last failed one".
"""

from __future__ import annotations

import json

import pytest

from lightning_local import cli
from lightning_local.errors import LocalLearningError
from lightning_local.sweeps import SweepConfig, load_results, read_results, sweep
from lightning_local.sweeps.results import append_result, merge_records
from lightning_local.sweeps.shards import Shard, parse_shard, result_files
from tests._sweep_fixtures import tiny_config, with_data


@pytest.fixture
def tmp_path(tmp_path, data_dir):
    return with_data(tmp_path, data_dir)


def _config(tmp_path, **overrides) -> SweepConfig:
    return tiny_config(tmp_path, **{"rules": ["bp", "pc-si"], **overrides})


def test_shards_select_every_nth_run_and_name_their_files():
    assert Shard(1, 3).select(list(range(8))) == [1, 4, 7]
    assert parse_shard(" 2/4 ") == Shard(2, 4) and parse_shard(None) is None
    assert Shard(0, 2).file_name == "results.shard-0-of-2.jsonl" and str(Shard(0, 2)) == "0/2"
    for bad in ("2/2", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(LocalLearningError, match="shard"):
            parse_shard(bad)


def test_result_files_are_the_unsharded_file_then_the_shards_in_order(tmp_path):
    for name in ("results.shard-1-of-2.jsonl", "results.shard-10-of-12.jsonl",
                 "results.shard-0-of-2.jsonl", "results.jsonl", "results_old.jsonl"):
        (tmp_path / name).write_text("")
    assert [p.name for p in result_files(tmp_path)] == [
        "results.jsonl", "results.shard-0-of-2.jsonl", "results.shard-1-of-2.jsonl",
        "results.shard-10-of-12.jsonl",
    ]


def test_two_shards_together_give_the_unsharded_sweep_and_its_table(tmp_path):
    config = _config(tmp_path)
    whole = sweep(config, tmp_path / "whole", plot=False, log=None)
    out = tmp_path / "sharded"
    first = sweep(config, out, plot=False, log=None, shard="0/2")
    assert (first.executed, len(first.records)) == (8, 8)
    assert "8 of the grid's 16 runs not run yet" in first.table_path.read_text()
    second = sweep(config, out, plot=False, log=None, shard=Shard(1, 2))
    assert second.executed == 8 and second.shard == Shard(1, 2)
    files = {p.name: read_results(p) for p in result_files(out)}
    assert sorted(files) == ["results.shard-0-of-2.jsonl", "results.shard-1-of-2.jsonl"]
    keys = [{r["key"] for r in records} for records in files.values()]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {r["key"] for r in whole.records}
    # the readers merge both files: the same runs with the same results, the same tables
    assert [r["key"] for r in second.records] == [r["key"] for r in whole.records]  # grid order
    losses = {r["key"]: r["train_loss"] for r in whole.records}
    for got in (second.records, load_results(out)):  # load_results: in file order
        assert {r["key"]: r["train_loss"] for r in got} == losses
    assert second.table == whole.table
    assert second.best == whole.best
    # a shard rerun, and the unsharded command afterwards, train nothing
    assert sweep(config, out, plot=False, log=None, shard="1/2").executed == 0
    final = sweep(config, out, plot=True, log=None)
    assert (final.executed, final.skipped) == (0, 16)
    assert final.table == whole.table and final.plot_path.exists()
    assert not (out / "results.jsonl").exists()  # nothing new to write


def test_command_line_shards(tmp_path, capsys):
    args = ["sweep", "--rules", "bp", "--widths", "8", "16", "--lrs", "0.05", "0.1",
            "--steps", "2", "--num-samples", "200", "--batch-size", "32", "--base-width", "8",
            "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
            "--quiet", "--no-plot"]
    for index in range(3):
        assert cli.main([*args, "--shard", f"{index}/3"]) == 0
    err = capsys.readouterr().err
    assert [f"results.shard-{i}-of-3.jsonl" in err for i in range(3)] == [True] * 3
    assert len(load_results(tmp_path / "out")) == 8
    assert cli.main([*args, "--shard", "3/3"]) == 2


def test_merge_keeps_the_last_finished_record_of_a_key():
    ok = dict(key="a", status="ok", train_loss=0.5)
    failed = dict(key="a", status="failed", error="OSError: x")
    later = dict(key="a", status="ok", train_loss=0.4)
    assert merge_records([failed, ok]) == [ok]
    assert merge_records([ok, failed]) == [ok]  # a finished run is never undone
    assert merge_records([ok, later]) == [later]
    assert merge_records([failed, dict(failed, error="late")]) == [dict(failed, error="late")]
    old = dict(key="b", diverged=True)  # written before records had a status
    assert merge_records([failed, old, dict(key=None), dict(key=None)]) == [
        failed, old, dict(key=None), dict(key=None)]


def test_load_results_merges_files_and_leaves_out_failed_runs(tmp_path):
    append_result(tmp_path / "results.shard-0-of-2.jsonl", dict(key="a", status="failed"))
    append_result(tmp_path / "results.shard-1-of-2.jsonl", dict(key="b", status="ok"))
    append_result(tmp_path / "results.jsonl", dict(key="a", status="ok", train_loss=1.0))
    append_result(tmp_path / "results.jsonl", dict(key="c", status="failed", error="E: x"))
    assert [r["key"] for r in load_results(tmp_path)] == ["a", "b"]
    assert load_results(tmp_path)[0]["train_loss"] == 1.0
    assert [r["key"] for r in load_results(tmp_path, include_failed=True)] == ["a", "c", "b"]
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["key"] == "a"
