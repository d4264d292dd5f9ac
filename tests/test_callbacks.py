"""Diagnostics callbacks: coordinate check during training, local-update/backprop cosines, the
run config, the progress bar.

References: the coordinate-check callback's values against a forward pass after training;
cosines against gradients by ``.backward()`` on copies, computed by hand in float64.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from _capture_logger import CaptureLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.diagnostics.callbacks import (
    CoordCheckCallback,
    LocalUpdateAlignment,
    LogRunConfig,
    base_shape_table,
    local_update_cosines,
)
from lightning_local.diagnostics.measures import forward_rms
from lightning_local.errors import LocalLearningError
from lightning_local.models import MLP
from lightning_local.modules import BackpropModule, PredictiveCodingModule
from lightning_local.network import as_blocks, feedforward
from lightning_local.rules import PredictiveCoding
from lightning_local.rules.target_propagation import TargetPropagation


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def _loader(steps: int) -> DataLoader:
    inputs, targets = _batch(8 * steps)
    return DataLoader(TensorDataset(inputs, targets), batch_size=8)


def _fit(module: L.LightningModule, steps: int, callbacks: list, logger: Any = False) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=logger, callbacks=callbacks,
        log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, _loader(steps))
    return trainer


def test_coord_check_callback_logs_every_layer_to_the_logger():
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


def test_coord_check_callback_values_match_a_forward_pass():
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


def _reference_cosines(rule: PredictiveCoding, network: nn.Module, inputs, targets) -> list:
    """Per block: gradients by ``.backward()`` on copies, cosine in float64 by hand."""
    local_net, bp_net = copy.deepcopy(network), copy.deepcopy(network)
    rule.training_loss(local_net, inputs, targets).surrogate.backward()
    rule.loss.mean(feedforward(as_blocks(bp_net), inputs)[-1], targets).backward()
    cosines = []
    for a_block, b_block in zip(as_blocks(local_net), as_blocks(bp_net)):
        a = torch.cat([p.grad.flatten() for p in a_block.parameters()]).double()
        b = torch.cat([p.grad.flatten() for p in b_block.parameters()]).double()
        cosines.append(float(a @ b / (a.norm() * b.norm())))
    return cosines


def test_exact_pc_update_has_cosine_one_with_backprop():
    """F-ini + one SI sweep + FPA, kappa = gamma = 1: PC's update is gamma_L x backprop's."""
    torch.manual_seed(0)
    network = MLP(width=16, depth=4)
    rule = PredictiveCoding(inference="sequential", inference_steps=1, output_weight=3.0)
    cosines = local_update_cosines(rule, network, *_batch())
    assert cosines.shape == (4,)
    assert torch.allclose(cosines, torch.ones(4), atol=1e-5)


def test_cosines_match_backward_on_copies():
    torch.manual_seed(1)
    network = MLP(width=16, depth=3)
    rule = PredictiveCoding(
        inference="simultaneous", inference_steps=4, inference_lr=0.3, fixed_prediction=False
    )
    inputs, targets = _batch()
    cosines = local_update_cosines(rule, network, inputs, targets)
    reference = _reference_cosines(rule, network, inputs, targets)
    assert cosines.tolist() == pytest.approx(reference, abs=1e-5)
    assert min(reference) < 0.999  # not the exact setting: the cosines carry information


def test_cosines_leave_gradients_and_random_stream_untouched():
    torch.manual_seed(2)
    rule = TargetPropagation(feedback_training="noisy", noise_std=0.3)
    network = rule.build_network(MLP(width=16, depth=3))
    state = torch.get_rng_state()
    cosines = local_update_cosines(rule, network, *_batch())
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in network.parameters())
    assert cosines.shape == (3,) and bool((cosines.abs() <= 1 + 1e-6).all())


def test_alignment_callback_logs_every_n_steps_and_does_not_change_training():
    def module() -> PredictiveCodingModule:
        torch.manual_seed(3)
        return PredictiveCodingModule(
            MLP(width=16), inference="simultaneous", inference_steps=3, inference_lr=0.2
        )

    watched, plain, logger = module(), module(), CaptureLogger()
    _fit(watched, 4, [LocalUpdateAlignment(every_n_steps=2)], logger)
    _fit(plain, 4, [])
    for p, q in zip(watched.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    logged = [step for step, metrics in logger.metrics if "train/bp_cosine/layer_2" in metrics]
    assert logged == [0, 2]


def test_alignment_callback_rejects_bad_settings():
    with pytest.raises(LocalLearningError, match="every_n_steps"):
        LocalUpdateAlignment(every_n_steps=0)


def test_run_config_under_sp_has_plain_shapes_and_the_optimizer_lr():
    module, logger = BackpropModule(MLP(width=16), lr=0.05), CaptureLogger()
    _fit(module, 1, [LogRunConfig()], logger)
    table = logger.hyperparams["base_shape_table"]
    for name, p in module.network_for_rule().named_parameters():
        assert table[name] == {"shape": list(p.shape), "base_shape": list(p.shape),
                               "width_mult": 1.0, "role": None, "lr": 0.05}
    assert logger.hyperparams["rule"] == {"rule": "bp", "loss": "mse"}
    assert logger.hyperparams["processes"]["world_size"] == 1


def test_base_shape_table_reads_mup_roles():
    network = PredictiveCodingModule(MLP(width=32), parametrization="mup", base_width=8).network
    rows = {row["name"]: row for row in base_shape_table(network)}
    assert rows["1.0.weight"]["base_shape"] == [8, 8] and rows["1.0.weight"]["role"] == "hidden"
    assert rows["2.bias"]["width_mult"] == 1.0 and rows["2.bias"]["role"] == "scalar"
    assert rows["0.0.bias"]["width_mult"] == 4.0 and rows["0.0.bias"]["lr"] is None


def test_progress_bar_shows_loss_and_energy():
    trainer = _fit(PredictiveCodingModule(MLP(width=16)), 1, [])
    assert {"train/loss", "train/energy_after"} <= set(trainer.progress_bar_metrics)
