"""Width builders: architecture, width rebuild, and the Gaussian SP initialization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_local.errors import LocalLearningError
from lightning_local.models import CNN, MLP


def test_mlp_structure_and_init_std():
    torch.manual_seed(0)
    net = MLP(in_features=40, width=1024, num_classes=10, depth=3, sigma=1.0)
    assert [type(b) for b in net] == [nn.Sequential, nn.Sequential, nn.Linear]
    hidden = net[1][0].weight
    assert abs(float(hidden.std()) - 1 / math.sqrt(1024)) < 0.02 / math.sqrt(1024)
    assert float(net[0][0].bias.abs().max()) == 0.0
    wide = net.with_width(64)
    assert isinstance(wide, MLP) and wide[1][0].weight.shape == (64, 64)
    assert net.with_width(32, device="meta")[0][0].weight.is_meta


def test_cnn_output_shape_and_errors():
    cnn = CNN(in_channels=3, image_size=32, width=8, num_classes=10, conv_layers=2)
    assert cnn(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(LocalLearningError, match="activation"):
        MLP(activation="swish")
    with pytest.raises(LocalLearningError, match="depth"):
        MLP(depth=1)
