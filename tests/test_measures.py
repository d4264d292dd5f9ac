"""Measurements per layer: slope fit, rms, weight-update sizes, PC errors, TP targets.

References: slopes of synthetic power laws; weight-update sizes written out by hand; PC errors
against autograd's backprop gradient (SI + FPA makes them equal); TP's output target against
``f - beta (f - y)``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_local.diagnostics.measures import (
    fit_slope,
    pc_rms,
    rms,
    snapshot,
    tp_rms,
    weight_update_rms,
)
from lightning_local.models import MLP
from lightning_local.network import as_blocks, feedforward
from lightning_local.rules.predictive_coding import PredictiveCoding
from lightning_local.rules.target_propagation import TargetPropagation


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().double().pow(2).mean().sqrt())


def test_rms_is_the_root_mean_square_and_zero_when_empty():
    value = torch.tensor([[3.0, -4.0], [0.0, 0.0]], requires_grad=True)
    assert float(rms(value)) == pytest.approx(math.sqrt(25.0 / 4.0))
    assert not rms(value).requires_grad
    assert float(rms(torch.empty(0, 3))) == 0.0


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
