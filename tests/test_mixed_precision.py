"""Mixed precision keeps every rule's result: inference and the local updates run in fp32.

Reference: the same step in fp32. Backprop's own bf16 error (its forward and backward in bf16
under autocast) is the yardstick: every rule's update must be within twice of it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.models import MLP
from lightning_local.modules import PredictiveCodingModule
from lightning_local.rules import Backprop, PredictiveCoding, TargetPropagation

RULES = {
    "pc-si-fpa": lambda: PredictiveCoding(),
    "pc-si": lambda: PredictiveCoding(fixed_prediction=False),
    "pc-sim-50": lambda: PredictiveCoding(inference="simultaneous", inference_steps=50,
                                          inference_lr=0.1, fixed_prediction=False),
    "pc-tolerance": lambda: PredictiveCoding(inference="tolerance", inference_steps=50,
                                             inference_lr=0.1, tolerance=1e-3,
                                             fixed_prediction=False),
    "tp": lambda: TargetPropagation(variant="tp"),
    "dtp-ridge": lambda: TargetPropagation(),
    "dtp-noisy": lambda: TargetPropagation(feedback_training="noisy"),
}


def _batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=generator)
    return x, torch.randint(0, 10, (64,), generator=generator)


def _gradients(rule, network, bf16: bool):
    x, y = _batch()
    network.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # TP's reconstruction noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        result = rule.training_loss(network, x, y)
    with rule.backward_precision(x):  # what LocalRule.step and the modules do
        result.surrogate.float().backward()
    return [p.grad.clone() for p in network.parameters() if p.requires_grad], result


def _relative_error(rule, network) -> float:
    exact, _ = _gradients(rule, network, bf16=False)
    mixed, _ = _gradients(rule, network, bf16=True)
    return max(float((m - e).norm() / e.norm()) for m, e in zip(mixed, exact) if e.norm() > 0)


def _network(rule):
    torch.manual_seed(1)
    network = MLP(width=256)
    return rule.build_network(network) if isinstance(rule, TargetPropagation) else network


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_is_within_twice_backprops_bf16_error(name):
    backprop_error = _relative_error(Backprop(), _network(Backprop()))
    assert backprop_error > 1e-4  # autocast is active: backprop's own update moved
    rule = RULES[name]()
    assert _relative_error(rule, _network(rule)) <= 2 * backprop_error


def test_the_tolerance_schedule_stops_where_fp32_stops():
    rule = RULES["pc-tolerance"]()
    network = _network(rule)
    _, exact = _gradients(rule, network, bf16=False)
    _, mixed = _gradients(rule, network, bf16=True)
    assert int(mixed.metrics["inference_steps"]) == int(exact.metrics["inference_steps"])
    assert 1 < int(exact.metrics["inference_steps"]) < 50


def _fit(precision: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = PredictiveCodingModule(network=MLP(width=128), inference="simultaneous",
                                   inference_steps=20, inference_lr=0.1, fixed_prediction=False)
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    x, y = _batch()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def test_trainer_bf16_mixed_trains_pc_as_fp32():
    exact, mixed = _fit("32-true"), _fit("bf16-mixed")
    for name in exact:
        torch.testing.assert_close(mixed[name], exact[name], rtol=1e-5, atol=1e-6)
