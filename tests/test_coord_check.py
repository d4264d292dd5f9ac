"""Coordinate checks across widths: width scaling of the slopes, files, divergence, CLI, W&B.

References: SP's readout update grows like the width and muP's sizes stay flat (with a zero
readout); the files read back as written; the command's JSON and offline W&B run hold the
slopes of the check.
"""

from __future__ import annotations

import json

import pytest
import wandb
from _wandb_run import offline_wandb, read_run

from lightning_local import cli
from lightning_local.diagnostics.coord_check import CoordCheckResult, coord_check
from lightning_local.errors import LocalLearningError


def test_under_sp_the_readout_grows_with_width_and_under_mup_nothing_does(data_dir):
    """With a zero readout (muP's limit) every slope is flat under muP; SP's readout update
    grows about like the width."""
    result = coord_check(
        ["bp"], ["sp", "mup"], [64, 128, 256, 512], steps=2, lr=0.1, probe_size=128,
        num_samples=1000, data_dir=data_dir, zero_readout=True,
    )
    assert result.slope("bp", "sp", "weight_update", 3) > 0.6
    assert result.slope("bp", "sp", "activation_change", 3) > 0.4
    for quantity in ("activation", "activation_change", "weight_update"):
        for layer in (1, 2, 3):
            assert abs(result.slope("bp", "mup", quantity, layer)) < 0.25, (quantity, layer)
    plain = coord_check(["bp"], ["sp"], [64, 128, 256, 512], steps=2, lr=0.1,
                        probe_size=128, num_samples=1000, data_dir=data_dir)
    assert plain.slope("bp", "sp", "weight_update", 3) > 0.6


def test_every_rule_reports_its_quantities_and_files(data_dir, tmp_path):
    result = coord_check(
        ["pc-si", "dtp"], ["mup"], [16, 32], steps=2, lr=0.05, probe_size=32,
        num_samples=200, batch_size=32, data_dir=data_dir, output=tmp_path,
    )
    kinds = {(r["rule"], r["quantity"]) for r in result.records}
    assert {("pc-si", q) for q in ("state", "error", "activation", "weight_update")} <= kinds
    assert {("dtp", q) for q in ("target", "target_change", "activation_change")} <= kinds
    layers = {r["layer"] for r in result.records if r["quantity"] == "error"}
    assert layers == {1, 2, 3}
    assert {r["step"] for r in result.records} == {1, 2}
    assert all(r["value"] is not None and r["value"] >= 0 for r in result.records)
    loaded = CoordCheckResult.load(tmp_path / "coord_check.json")
    assert loaded.records == result.records and loaded.slopes == result.slopes
    assert (tmp_path / "coord_check_pc-si.png").stat().st_size > 1000
    assert "| dtp | mup | target_change |" in (tmp_path / "coord_check.md").read_text()
    with pytest.raises(LocalLearningError, match="no slope"):
        result.slope("bp", "mup", "activation", 1)


def test_a_diverging_width_leaves_no_values_and_no_slope(data_dir):
    result = coord_check(["bp"], ["sp"], [16, 32], steps=3, lr=1e30, probe_size=16,
                         num_samples=200, batch_size=32, data_dir=data_dir)
    last = [r for r in result.records if r["step"] == 3]
    assert last == [] or all(r["value"] is None for r in last)


def test_coord_check_argument_errors(data_dir):
    with pytest.raises(LocalLearningError, match="two widths"):
        coord_check(["bp"], widths=[64])
    with pytest.raises(LocalLearningError, match="steps"):
        coord_check(["bp"], widths=[8, 16], steps=0)


def test_command_line(data_dir, tmp_path, capsys):
    code = cli.main([
        "coord-check", "--rules", "bp", "--widths", "8", "16", "--steps", "1", "--batch-size",
        "16", "--num-samples", "200", "--data-dir", data_dir, "--output", str(tmp_path),
    ])
    assert code == 0
    assert "| bp | mup | weight_update |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "coord_check.json").read_text())
    assert set(saved) == {"records", "slopes", "settings"}
    assert (tmp_path / "coord_check_bp.png").exists()
    assert cli.main(["coord-check", "--rules", "nope", "--output", str(tmp_path)]) == 2


def test_wandb_flag_writes_an_offline_run_with_the_figures_slopes_and_arguments(
    data_dir, tmp_path, capsys, monkeypatch
):
    offline_wandb(tmp_path, monkeypatch)
    out = tmp_path / "out"
    code = cli.main([
        "coord-check", "--rules", "bp", "pc-si", "--parametrizations", "mup", "--widths", "8",
        "16", "--steps", "1", "--batch-size", "16", "--num-samples", "200", "--data-dir",
        data_dir, "--output", str(out), "--wandb",
    ])
    assert code == 0
    wandb.teardown()  # stops the wandb service, which writes the run file to its end
    (run_dir,) = out.glob("wandb/offline-run-*")
    assert f"wandb sync {run_dir}" in capsys.readouterr().err
    config, history = read_run(out)
    assert config["arguments"]["rules"] == ["bp", "pc-si"] and config["arguments"]["wandb"]
    assert config["widths"] == [8, 16] and config["steps"] == 1
    for rule in ("bp", "pc-si"):  # each rule's image is its coord_check_<rule>.png
        key = f"figures/coord_check/{rule}"
        (row,) = [row for row in history if f"{key}/_type" in row]
        (image,) = row[f"{key}/filenames"]
        expected = (out / f"coord_check_{rule}.png").read_bytes()
        assert (run_dir / "files" / image).read_bytes() == expected
    # the slope table holds the slopes of coord_check.json at the last step
    (table,) = [row for row in history if "tables/coord_check_slopes/path" in row]
    saved = json.loads((run_dir / "files" / table["tables/coord_check_slopes/path"]).read_text())
    rows = [dict(zip(saved["columns"], row)) for row in saved["data"]]
    slopes = json.loads((out / "coord_check.json").read_text())["slopes"]
    assert rows == [s for s in slopes if s["step"] == 1] and len(rows) > 0
