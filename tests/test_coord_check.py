"""Coordinate checks: slope fit, per-layer measurements, width scaling, callback, CLI.

References: slopes of synthetic power laws; weight-update sizes written out by hand; PC errors
against autograd's backprop gradient (SI + FPA makes them equal); TP's output target against
``f - beta (f - y)``; the callback's values against a forward pass after training.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import wandb
from _capture_logger import CaptureLogger
from _wandb_run import offline_wandb, read_run
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_local import cli
from lightning_local.callbacks.coord_check import CoordCheckCallback
from lightning_local.coord_check import (
    CoordCheckResult,
    coord_check,
    fit_slope,
    forward_rms,
    pc_rms,
    snapshot,
    tp_rms,
    weight_update_rms,
)
from lightning_local.errors import LocalLearningError
from lightning_local.models import MLP
from lightning_local.modules import PredictiveCodingModule
from lightning_local.network import as_blocks, feedforward
from lightning_local.rules.predictive_coding import PredictiveCoding
from lightning_local.rules.target_propagation import TargetPropagation


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().double().pow(2).mean().sqrt())


@pytest.mark.parametrize("exponent", [0.5, -1.0, 0.0, 1.7])
def test_fit_slope_recovers_a_power_law(exponent):
    widths = [64, 128, 256, 512, 1024]
    assert fit_slope(widths, [3.0 * w**exponent for w in widths]) == pytest.approx(exponent)


def test_fit_slope_skips_missing_values():
    widths = [8, 16, 32, 64]
    values = [2.0 * w**0.25 for w in widths]
    values[1], values[3] = None, math.nan
    assert fit_slope(widths, values) == pytest.approx(0.25)
    assert fit_slope(widths, [1.0, None, 0.0, math.inf]) is None
    noisy = [w**0.5 * (1.1 if i % 2 else 0.9) for i, w in enumerate(widths)]
    assert 0.4 < fit_slope(widths, noisy) < 0.6


def test_weight_update_rms_is_the_blocks_own_change():
    torch.manual_seed(0)
    net = MLP(in_features=4, width=6, num_classes=3, depth=3, bias=True).double()
    blocks = as_blocks(net)
    z = torch.randn(5, 4, dtype=torch.float64)
    inputs = feedforward(blocks, z)[:-1]
    before = snapshot(blocks)
    old = [(b[0] if isinstance(b, nn.Sequential) else b) for b in blocks]
    old = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in old]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    measured = weight_update_rms(blocks, before, inputs)
    expected = []
    for index, (block, (w, b)) in enumerate(zip(blocks, old)):
        linear = block[0] if isinstance(block, nn.Sequential) else block
        new_u, old_u = inputs[index] @ linear.weight.T + linear.bias, inputs[index] @ w.T + b
        if index < 2:
            new_u, old_u = torch.tanh(new_u), torch.tanh(old_u)
        expected.append(_rms(new_u - old_u))
    assert measured == pytest.approx(expected, rel=1e-9)


def test_pc_errors_are_backprop_gradients_under_si_with_fpa():
    torch.manual_seed(1)
    net = MLP(in_features=5, width=7, num_classes=3, depth=4).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    gamma = 0.7
    measured = pc_rms(PredictiveCoding(output_weight=gamma), net, x, y)
    blocks = as_blocks(net)
    hidden = [x]
    for block in blocks[:-1]:
        hidden.append(block(hidden[-1]))
    for h in hidden[1:]:
        h.retain_grad()
    output = blocks[-1](hidden[-1])
    loss = 0.5 * (output - torch.nn.functional.one_hot(y, 3).double()).pow(2).sum()
    loss.backward()
    expected_errors = [_rms(gamma * h.grad) for h in hidden[1:]]
    expected_errors.append(_rms(output.detach() - torch.nn.functional.one_hot(y, 3)))
    assert measured["error"] == pytest.approx(expected_errors, rel=1e-9)
    states = [h.detach() - gamma * h.grad for h in hidden[1:]]
    assert measured["state"] == pytest.approx([_rms(s) for s in states], rel=1e-9)


def test_tp_output_target_is_a_gradient_step_from_the_output():
    torch.manual_seed(2)
    rule = TargetPropagation(beta=0.3)
    net = rule.build_network(MLP(in_features=5, width=9, num_classes=3, depth=3, bias=False))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    activations = feedforward(as_blocks(net), x)
    f, onehot = activations[-1].detach(), torch.nn.functional.one_hot(y, 3).float()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    sizes = tp_rms(rule.step(net, x, y, optimizer), activations)
    assert len(sizes["target"]) == len(sizes["target_change"]) == 3
    assert sizes["target_change"][-1] == pytest.approx(_rms(0.3 * (f - onehot)), rel=1e-5)
    assert sizes["target"][-1] == pytest.approx(_rms(f - 0.3 * (f - onehot)), rel=1e-5)


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


def test_callback_logs_every_layer_to_the_logger():
    torch.manual_seed(0)
    module = PredictiveCodingModule(network=MLP(width=16, bias=False), parametrization="mup",
                                    base_width=8, lr=0.05)
    x, y = torch.randn(48, 40), torch.randint(0, 10, (48,))
    logger = CaptureLogger()
    callback = CoordCheckCallback(every_n_steps=1, max_steps=3, probe_size=8)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=4, logger=logger, callbacks=[callback],
        log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    logged = [(step, m) for step, m in logger.metrics if "coord/activation/layer_0" in m]
    assert [step for step, _ in logged] == [1, 2, 3]  # max_steps=3: steps 0, 1, 2 measured
    keys = set(logged[0][1])
    for quantity, count in [("activation", 3), ("activation_change", 3), ("weight_update", 3),
                            ("state", 2), ("error", 3)]:
        assert {f"coord/{quantity}/layer_{i}" for i in range(count)} <= keys
    assert len(callback.history) == 3
    # the first measured step's change equals its own weight update in the first block
    first = callback.history[0]
    assert first["coord/activation_change/layer_0"] == pytest.approx(
        first["coord/weight_update/layer_0"], rel=1e-6)


def test_callback_values_match_a_forward_pass():
    torch.manual_seed(1)
    module = PredictiveCodingModule(network=MLP(width=12, bias=False), lr=0.05)
    x, y = torch.randn(24, 40), torch.randint(0, 10, (24,))
    callback = CoordCheckCallback(every_n_steps=1, max_steps=None, probe_size=8)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, callbacks=[callback],
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    _, sizes = forward_rms(as_blocks(module.network), x[:8])
    last = callback.history[-1]
    assert [last[f"coord/activation/layer_{i}"] for i in range(3)] == pytest.approx(sizes)
    with pytest.raises(LocalLearningError, match=">= 1"):
        CoordCheckCallback(every_n_steps=0)


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
