"""The network view: which models are layered, and the errors for those that are not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_local.errors import ShapeMismatchError, UnsupportedNetworkError
from lightning_local.network import as_blocks, feedforward, output_width


class _Exposing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(3, 4), nn.Linear(4, 2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_sequential_and_exposed_blocks():
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    assert as_blocks(seq) == list(seq)
    model = _Exposing()
    assert as_blocks(model) == list(model.blocks)
    x = torch.randn(5, 3)
    torch.testing.assert_close(feedforward(as_blocks(model), x)[-1], model(x))
    assert len(feedforward(as_blocks(seq), x)) == 4
    assert output_width(as_blocks(seq)) == 2


def test_unsupported_models_get_clear_errors():
    with pytest.raises(UnsupportedNetworkError, match="ordered list of blocks"):
        as_blocks(nn.Linear(3, 2))
    with pytest.raises(UnsupportedNetworkError, match="at least two"):
        as_blocks(nn.Sequential(nn.Linear(3, 2)))


def test_shape_mismatch_names_the_block():
    seq = nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2))
    with pytest.raises(ShapeMismatchError, match="block 1"):
        feedforward(as_blocks(seq), torch.randn(2, 3))
