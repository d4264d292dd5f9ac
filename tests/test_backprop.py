"""Backprop rule: its surrogate gradient is the plain autograd gradient of the mean loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_local.errors import NonFiniteEnergyError
from lightning_local.models import MLP
from lightning_local.rules.backprop import Backprop


def test_gradient_equals_autograd_of_the_loss():
    torch.manual_seed(0)
    net = MLP(in_features=5, width=8, num_classes=3, depth=3)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    result = Backprop("cross_entropy").training_loss(net, x, y)
    grads = torch.autograd.grad(result.surrogate, list(net.parameters()))
    reference = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
    for a, b in zip(grads, reference):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(result.output, net(x).detach())


def test_diverged_loss_raises():
    net = MLP(in_features=5, width=8, num_classes=3, depth=3)
    with pytest.raises(NonFiniteEnergyError):
        Backprop().training_loss(net, torch.full((2, 5), float("inf")), torch.tensor([0, 1]))
