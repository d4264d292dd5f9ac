"""Width builders: architecture, width rebuild, and the Gaussian SP initialization."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_local.errors import LocalLearningError
from lightning_local.models import CNN, MLP, CNN1d


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


def test_cnn1d_takes_flat_sequences_and_keeps_the_length_before_pooling():
    net = CNN1d(length=40, width=6, num_classes=10, conv_layers=2, kernel_size=5)
    x = torch.randn(3, 40)
    reference = x.unsqueeze(1)
    for block in list(net)[:-1]:
        conv = next(m for m in block if isinstance(m, nn.Conv1d))
        reference = nn.functional.avg_pool1d(torch.tanh(conv(reference)), 2)
    readout = net[-1][1]
    torch.testing.assert_close(net(x), readout(reference.flatten(1)))
    assert readout.in_features == 6 * 10
    assert net.with_width(12)[-1][1].in_features == 12 * 10


def test_cnn1d_roles_under_mup_follow_the_channels():
    """The first conv's fan-in is the input's channels (input role), the hidden conv scales
    with width on both sides, the readout's fan-in only [mup's own infshape]."""
    from lightning_local.parametrization import set_base_shapes

    net = CNN1d(width=16)
    set_base_shapes(net, net.with_width(8, device="meta"), net.with_width(4, device="meta"))
    first, hidden, readout = net[0][1].weight, net[1][0].weight, net[2][1].weight
    assert [d.isinf() for d in first.infshape] == [True, False, False]
    assert [d.isinf() for d in hidden.infshape] == [True, True, False]
    assert [d.isinf() for d in readout.infshape] == [False, True]


@pytest.mark.parametrize("kwargs", [dict(kernel_size=4), dict(length=3, conv_layers=2),
                                    dict(conv_layers=0), dict(width=0)])
def test_cnn1d_refuses_bad_arguments(kwargs):
    with pytest.raises(LocalLearningError):
        CNN1d(**kwargs)
