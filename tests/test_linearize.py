"""Block linearization: the closed-form fast path against autograd, on every supported block."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_local.rules._linearize import linearize, linearizer, supports_fast_path


@pytest.mark.parametrize("activation", [nn.Tanh(), nn.ReLU(), nn.Sigmoid(), nn.Identity(), None])
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_matches_autograd(activation, bias):
    torch.manual_seed(0)
    linear = nn.Linear(7, 5, bias=bias).double()
    block = linear if activation is None else nn.Sequential(linear, activation)
    assert supports_fast_path(block)
    x = torch.randn(4, 7, dtype=torch.float64)
    v = torch.randn(4, 5, dtype=torch.float64)
    fast = linearize(block, x, fast_path=True)
    leaf = x.clone().requires_grad_(True)
    output = block(leaf)
    (reference,) = torch.autograd.grad(output, leaf, v)
    torch.testing.assert_close(fast.prediction, output.detach())
    torch.testing.assert_close(fast.pullback(v), reference)
    general = linearize(block, x, fast_path=False)
    torch.testing.assert_close(general.pullback(v), reference)
    assert fast.prediction.grad_fn is None and general.prediction.grad_fn is None


def test_other_blocks_use_autograd():
    torch.manual_seed(1)
    block = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2))
    assert not supports_fast_path(block)
    assert not supports_fast_path(nn.Sequential(nn.Linear(3, 3), nn.GELU()))
    x = torch.randn(2, 2, 4, 4)
    v = torch.randn(2, 3, 2, 2)
    result = linearize(block, x)
    leaf = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(block(leaf), leaf, v)
    torch.testing.assert_close(result.pullback(v), reference)


def test_linearization_leaves_no_parameter_gradients():
    block = nn.Sequential(nn.Linear(3, 3), nn.GELU())
    result = linearize(block, torch.randn(2, 3))
    result.pullback(torch.ones(2, 3))
    assert all(p.grad is None for p in block.parameters())


def test_tracked_output_carries_the_parameter_graph_only():
    torch.manual_seed(2)
    block = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    result = linearize(block, x, track_parameters=True)
    torch.testing.assert_close(result.output.detach(), result.prediction)
    grads = torch.autograd.grad(
        result.output.sum(), list(block.parameters()), retain_graph=True
    )
    reference = torch.autograd.grad(block(x.detach()).sum(), list(block.parameters()))
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want)
    result.output.sum().backward()
    assert x.grad is None  # no graph back to the input
    assert linearize(block, x).output is None


@pytest.mark.parametrize("block", [
    nn.Sequential(nn.Linear(6, 5), nn.Tanh()),
    nn.Sequential(nn.Linear(6, 5), nn.GELU()),
], ids=["fast-path", "autograd"])
def test_a_resolved_linearizer_and_its_compiled_trace_match_linearize(block):
    """``linearizer(block)`` is ``linearize`` with the path resolved once; traced by
    ``torch.compile`` (the general path then takes its pullback through ``torch.func.vjp``)
    it gives the same prediction and pullback."""
    torch.manual_seed(3)
    block = block.double()
    x = torch.randn(4, 6, dtype=torch.float64)
    v = torch.randn(4, 5, dtype=torch.float64)
    want = linearize(block, x)
    got = linearizer(block)(x, False)
    assert torch.equal(got.prediction, want.prediction)
    assert torch.equal(got.pullback(v), want.pullback(v))

    def both(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        result = linearizer(block)(x, False)
        return result.prediction, result.pullback(v)

    with torch.no_grad():
        prediction, pullback = torch.compile(both, backend="aot_eager", fullgraph=True)(x, v)
    torch.testing.assert_close(prediction, want.prediction, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pullback, want.pullback(v), rtol=1e-12, atol=1e-12)
