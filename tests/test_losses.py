"""Output losses: values against torch's reference losses, gradients against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_local.errors import LocalLearningError, ShapeMismatchError
from lightning_local.losses import OutputLoss


@pytest.mark.parametrize("name", ["mse", "cross_entropy"])
def test_values_and_gradients(name):
    torch.manual_seed(0)
    output = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (6,))
    loss = OutputLoss(name)
    if name == "mse":
        reference = 0.5 * F.mse_loss(output, F.one_hot(labels, 4).double(), reduction="sum")
    else:
        reference = F.cross_entropy(output, labels, reduction="sum")
    torch.testing.assert_close(loss.per_sample_sum(output, labels), reference)
    torch.testing.assert_close(loss.mean(output, labels), reference / 6)
    (autograd,) = torch.autograd.grad(reference, output)
    torch.testing.assert_close(loss.grad(output.detach(), labels), autograd)


def test_float_targets_for_regression():
    output, target = torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(OutputLoss("mse").grad(output, target), output - target)


def test_errors():
    with pytest.raises(LocalLearningError, match="unknown loss"):
        OutputLoss("hinge")
    loss = OutputLoss()
    with pytest.raises(ShapeMismatchError, match="one label per sample"):
        loss.mean(torch.randn(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match="readout width"):
        loss.mean(torch.randn(3, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ShapeMismatchError, match="output's shape"):
        loss.mean(torch.randn(3, 2), torch.randn(3, 3))


@pytest.mark.parametrize("name", ["mse", "cross_entropy"])
def test_the_residual_is_exactly_the_negated_gradient(name):
    torch.manual_seed(1)
    loss, output = OutputLoss(name), torch.randn(7, 5)
    for target in (torch.randint(0, 5, (7,)), torch.rand(7, 5)):
        assert torch.equal(loss.residual(output, target), -loss.grad(output, target))


def test_labels_become_a_one_hot_matrix_with_or_without_the_range_check():
    loss, output = OutputLoss(), torch.randn(4, 3)
    labels = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    expected = F.one_hot(labels.long(), 3).float()
    assert torch.equal(loss.target_matrix(output, labels), expected)
    assert torch.equal(loss.target_matrix(output, labels, validate=False), expected)
    assert bool(loss.labels_in_range(output, labels))
    assert loss.labels_in_range(output, torch.rand(4, 3)) is None  # float targets: nothing
    bad = torch.tensor([0, 3, 1, -1])
    assert not bool(loss.labels_in_range(output, bad))
    with pytest.raises(ShapeMismatchError, match=r"\[0, 3\).*\[-1, 3\]"):
        loss.check_labels(output, bad)
    # unchecked, an out-of-range label gets a row of zeros; shapes are checked either way
    assert loss.target_matrix(output, bad, validate=False)[[1, 3]].eq(0).all()
    with pytest.raises(ShapeMismatchError, match="one label per sample"):
        loss.target_matrix(output, bad[:3], validate=False)
