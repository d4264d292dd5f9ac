"""The network view: a model seen as an ordered list of blocks ``f_1 .. f_L``.

A block is any ``nn.Module`` mapping the previous block's output to its own output
(``h_l = f_l(h_{l-1})``); the last block ``f_L`` is the readout, whose output is the network
output ``f = u_L``. A model is accepted when it is an ``nn.Sequential`` (its children are the
blocks) or when it exposes its ordered blocks as an attribute ``blocks`` (an
``nn.Sequential`` or ``nn.ModuleList``). Predictive-coding states ``x_l`` live at block outputs
(the post-activation convention when a block ends with its activation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_local.errors import ShapeMismatchError, UnsupportedNetworkError

__all__ = ["as_blocks", "feedforward", "output_width", "shape_errors"]


def as_blocks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """Return the ordered blocks ``[f_1, ..., f_L]`` of ``model``.

    Raises:
        UnsupportedNetworkError: when the model exposes no ordered blocks, or has fewer than
            two (a local rule needs at least one hidden state between input and readout).
    """
    if isinstance(model, nn.Sequential):
        blocks = list(model)
    elif isinstance(model, (list, tuple, nn.ModuleList)):
        blocks = list(model)
    elif isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        blocks = list(model.blocks)
    else:
        raise UnsupportedNetworkError(
            f"{type(model).__name__} does not expose an ordered list of blocks. Fix: build it as "
            "an nn.Sequential of blocks, or give it an attribute `blocks` (nn.Sequential or "
            "nn.ModuleList) whose forward composition is the network."
        )
    if len(blocks) < 2:
        raise UnsupportedNetworkError(
            f"the network has {len(blocks)} block(s); local rules need at least two (a hidden "
            "block and a readout). Fix: split the model into blocks, e.g. "
            "nn.Sequential(nn.Sequential(nn.Linear(d, M), nn.Tanh()), nn.Linear(M, C))."
        )
    for index, block in enumerate(blocks):
        if not isinstance(block, nn.Module):
            raise UnsupportedNetworkError(
                f"block {index} is a {type(block).__name__}, not an nn.Module."
            )
    return blocks


@contextmanager
def shape_errors(index: int, block: nn.Module, inputs: Tensor) -> Iterator[None]:
    """Turn torch's shape errors inside ``block`` into a :class:`ShapeMismatchError`."""
    try:
        yield
    except RuntimeError as error:  # torch reports shape mismatches as RuntimeErrors
        if "shape" not in str(error) and "size" not in str(error):
            raise
        raise ShapeMismatchError(
            f"block {index} ({type(block).__name__}) cannot take an input of shape "
            f"{tuple(inputs.shape)}: {error}. Fix: check the data's feature size against the "
            "network's input size."
        ) from error


def feedforward(blocks: Sequence[nn.Module], inputs: Tensor) -> list[Tensor]:
    """Feedforward activations ``[h_0, h_1, ..., h_L]`` with ``h_0 = inputs``.

    Runs under the caller's grad mode; a block that cannot take the previous output gets a
    :class:`ShapeMismatchError` naming the block.
    """
    activations = [inputs]
    for index, block in enumerate(blocks):
        with shape_errors(index, block, activations[-1]):
            activations.append(block(activations[-1]))
    return activations


@torch.no_grad()
def output_width(blocks: Sequence[nn.Module]) -> int | None:
    """Number of outputs of the readout block when it is an ``nn.Linear``, else ``None``."""
    readout = blocks[-1]
    if isinstance(readout, nn.Linear):
        return readout.out_features
    linears = [m for m in readout.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
