"""The angle/cosine between a local update and backprop's gradient, per block.

References: the cosine ``<a, b> / (||a|| ||b||)`` and ``arccos`` in degrees computed by hand in
float64 on the flattened, concatenated gradients of each block; parallel, opposite and
orthogonal gradients (0, 180 and 90 degrees).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_local.diagnostics.alignment import update_alignment
from lightning_local.errors import LocalLearningError


def _groups(seed: int = 0) -> list[list[torch.Tensor]]:
    torch.manual_seed(seed)
    first = nn.Linear(4, 3)
    return [list(first.parameters()), [], [nn.Parameter(torch.randn(2, 3))]]


def _by_hand(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x = torch.cat([t.flatten() for t in a]).double()
    y = torch.cat([t.flatten() for t in b]).double()
    return float(x @ y / (x.norm() * y.norm()))


def test_cosines_and_angles_match_a_computation_by_hand():
    groups = _groups()
    params = [p for group in groups for p in group]
    local = [torch.randn_like(p) for p in params]
    backprop = [torch.randn_like(p) for p in params]
    cosines = update_alignment(groups, local, backprop, measure="cosine")
    angles = update_alignment(groups, local, backprop)
    assert cosines.shape == angles.shape == (3,)
    expected = [_by_hand(local[:2], backprop[:2]), _by_hand(local[2:], backprop[2:])]
    assert [float(cosines[0]), float(cosines[2])] == pytest.approx(expected, abs=1e-6)
    assert [float(angles[0]), float(angles[2])] == pytest.approx(
        [math.degrees(math.acos(c)) for c in expected], abs=1e-4
    )
    assert math.isnan(cosines[1]) and math.isnan(angles[1])  # a block without parameters


def test_parallel_opposite_orthogonal_and_zero_gradients():
    groups = [[nn.Parameter(torch.zeros(2))] for _ in range(4)]
    local = [torch.tensor([1.0, 0.0])] * 3 + [torch.zeros(2)]
    backprop = [torch.tensor([3.0, 0.0]), torch.tensor([-2.0, 0.0]), torch.tensor([0.0, 5.0]),
                torch.tensor([1.0, 1.0])]
    angles = update_alignment(groups, local, backprop)
    assert angles.tolist() == pytest.approx([0.0, 180.0, 90.0, 90.0], abs=1e-3)
    assert update_alignment(groups, local, backprop, measure="cosine").tolist() == pytest.approx(
        [1.0, -1.0, 0.0, 0.0], abs=1e-6
    )


def test_missing_gradients_count_as_zero():
    groups = _groups(1)
    params = [p for group in groups for p in group]
    backprop = [torch.randn_like(p) for p in params]
    local = [backprop[0], None, backprop[2]]  # the bias gets no local gradient
    cosines = update_alignment(groups, local, backprop, measure="cosine")
    expected = _by_hand([backprop[0], torch.zeros_like(params[1])], backprop[:2])
    assert float(cosines[0]) == pytest.approx(expected, abs=1e-6)
    assert float(cosines[2]) == pytest.approx(1.0, abs=1e-6)


def test_autograd_gradients_of_a_network_and_a_detached_result():
    """The way a rule calls it: groups of the blocks' parameters, ``torch.autograd.grad``."""
    torch.manual_seed(2)
    blocks = [nn.Sequential(nn.Linear(5, 6), nn.Tanh()), nn.Tanh(), nn.Linear(6, 3)]
    groups = [[p for p in b.parameters() if p.requires_grad] for b in blocks]
    params = [p for group in groups for p in group]
    x = torch.randn(8, 5)
    loss = nn.Sequential(*blocks)(x).pow(2).sum()
    backprop = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    local = tuple(2.5 * g for g in backprop)  # a scaled gradient: angle 0
    angles = update_alignment(groups, local, backprop)
    assert not angles.requires_grad
    assert float(angles[0]) == pytest.approx(0.0, abs=0.05)
    assert float(angles[2]) == pytest.approx(0.0, abs=0.05)
    assert math.isnan(angles[1])


def test_no_parameters_at_all_gives_nan_per_block():
    assert update_alignment([[], []], [], []).isnan().tolist() == [True, True]


def test_mismatched_gradients_are_library_errors():
    groups = _groups()
    params = [p for group in groups for p in group]
    grads = [torch.zeros_like(p) for p in params]
    with pytest.raises(LocalLearningError, match="Fix"):
        update_alignment(groups, grads[:-1], grads)
    with pytest.raises(LocalLearningError, match="shape"):
        update_alignment(groups, grads[::-1], grads)
    with pytest.raises(LocalLearningError, match="measure"):
        update_alignment(groups, grads, grads, measure="degrees")  # type: ignore[arg-type]
