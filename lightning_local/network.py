"""The network view: a model seen as an ordered list of blocks ``f_1 .. f_L``.

A block is any ``nn.Module`` mapping the previous block's output to its own output
(``h_l = f_l(h_{l-1})``); the last block ``f_L`` is the readout, whose output is the network
output ``f = u_L``. A model is accepted when it is an ``nn.Sequential`` (its children are the
blocks) or when it exposes its ordered blocks as an attribute ``blocks`` (an
``nn.Sequential`` or ``nn.ModuleList``); a plain list or tuple of modules is taken as is.
Predictive-coding states ``x_l`` live at block outputs (the post-activation convention when a
block ends with its activation).

Stand-alone activations are grouped: a parameter-free elementwise activation (one of
:data:`ACTIVATIONS`, e.g. ``nn.Tanh``) that is a block of its own is joined to the block
before it, so the flat ``nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))`` has the
two blocks ``[nn.Sequential(Linear, Tanh), Linear]``, exactly like the hand-grouped
``nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 3))`` (consecutive
activations all join the block before them). The grouped ``nn.Sequential`` wraps the model's own
modules (parameters are shared, nothing is copied, the model is not modified) and is cached
per model, so repeated calls return the same block objects; ``as_blocks(model,
group_activations=False)`` takes every child as a block.

A block gets one tensor and returns one tensor. Modules that cannot be called that way are
refused when the view is built, wherever the network's own composition would call them (as a
block, or as a step of an ``nn.Sequential`` block): modules returning tuples (``nn.LSTM``,
``nn.GRU``, ``nn.RNN``, ``nn.LSTMCell``, poolings with ``return_indices=True``), modules
taking several inputs (``nn.MultiheadAttention``, ``nn.Bilinear``, ``nn.Transformer`` and its
decoder), and an ``nn.Embedding`` anywhere but at the network's input (it takes integer
indices; every block output before it is a continuous tensor, and under predictive coding and
target propagation a state that is inferred or given a target). Inside a module of the user's
own (a wrapper whose ``forward`` returns one tensor) they are accepted.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_local.errors import ShapeMismatchError, UnsupportedNetworkError

__all__ = [
    "ACTIVATIONS", "as_blocks", "compiled_original", "feedforward", "output_width",
    "shape_errors", "tensor_output",
]


#: Parameter-free elementwise activations that ``as_blocks`` joins to the block before them.
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Tanh, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.ELU, nn.Softplus,
    nn.Hardtanh, nn.ReLU6, nn.Mish, nn.Softsign, nn.Tanhshrink, nn.SELU, nn.CELU,
)

# model -> (ids of its children, grouped blocks). The value holds the children (so their ids
# stay unique while the entry lives) but never the model, so the model can be collected.
_MODEL_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], tuple[nn.Module, ...]]]
_MODEL_CACHE = weakref.WeakKeyDictionary()
# ids of (block, activation, ...) -> their grouped nn.Sequential, alive while anyone holds it
# (which keeps the grouped modules, and so their ids, alive): the same group for the same
# modules, also when the blocks come as a plain list.
_GROUP_CACHE: weakref.WeakValueDictionary[tuple[int, ...], nn.Sequential]
_GROUP_CACHE = weakref.WeakValueDictionary()


_WRAP = (
    "Fix: wrap it in a module of your own whose forward takes one tensor and returns one "
    "tensor{example}; that module is then one block (backprop trains it whole; under PC/TP its "
    "output is the block's state)."
)


def _call_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be called as ``h = f(h)`` with one tensor in and out, or None."""
    name = type(module).__name__
    if isinstance(module, nn.MultiheadAttention):
        return (
            "it takes (query, key, value) and returns a tuple (output, attention weights), but "
            "a block is called with one tensor and must return one. "
            + _WRAP.format(example=", e.g. forward(x): return self.attention(x, x, x, "
                           "need_weights=False)[0]; or use nn.TransformerEncoderLayer")
        )
    if isinstance(module, nn.RNNBase):
        state = "(h_n, c_n)" if isinstance(module, nn.LSTM) else "h_n"
        return (
            f"it returns a tuple (output sequence, {state}), not one tensor, so the next block "
            "or the rule would get a tuple. "
            + _WRAP.format(example=f", e.g. forward(x): return self.{name.lower()}(x)[0] (the "
                           "output sequence) or [0][:, -1] (the last step)")
        )
    if isinstance(module, nn.LSTMCell):
        return "it returns a tuple (h, c), not one tensor. " + _WRAP.format(
            example=", e.g. forward(x): return self.cell(x)[0]")
    if isinstance(module, (nn.Bilinear, nn.Transformer, nn.TransformerDecoder,
                           nn.TransformerDecoderLayer)):
        inputs = "(input1, input2)" if isinstance(module, nn.Bilinear) else "(target, memory)"
        return f"it takes two inputs {inputs}, but a block is called with one tensor. " + (
            _WRAP.format(example=""))
    if getattr(module, "return_indices", False) is True:
        return (
            "it was built with return_indices=True, so it returns a tuple (output, indices), "
            "not one tensor. Fix: build it with return_indices=False."
        )
    return None


def _steps(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(path, module)`` for each module an ``nn.Sequential`` block calls one after the other
    (nested ``nn.Sequential`` opened, in order); any other module is one step, not opened."""
    module = compiled_original(module)
    if isinstance(module, nn.Sequential):
        for index, child in enumerate(module):
            yield from _steps(child, f"{path}.{index}" if path else str(index))
    else:
        yield path, module


def _check_blocks(blocks: Sequence[nn.Module]) -> None:
    """Refuse modules the composition ``h_l = f_l(h_{l-1})`` cannot call (see module doc)."""
    after: str | None = None  # the last module with parameters seen so far
    for index, block in enumerate(blocks):
        for path, step in _steps(block):
            where = f"block {index}" + (f" (module {path} of the block)" if path else "")
            name = type(step).__name__
            problem = _call_problem(step)
            if problem is not None:
                raise UnsupportedNetworkError(f"{where} is an nn.{name}: {problem}")
            if isinstance(step, nn.Embedding) and (index > 0 or after is not None):
                before = f"after {after}" if after is not None else "after block 0"
                raise UnsupportedNetworkError(
                    f"{where} is an nn.{name}, {before}: an embedding takes integer indices, "
                    "but what reaches it is a block output, a continuous tensor (under "
                    "predictive coding and target propagation a state that is inferred or "
                    "given a continuous target; under every rule the inputs are refused as "
                    "integers unless block 0 takes them). Fix: make the embedding the first "
                    "layer of block 0, so that the integer inputs go straight into it (group "
                    "parameter-free steps such as nn.Flatten into block 0 with it: "
                    "nn.Sequential(nn.Sequential(nn.Embedding(n, d), nn.Flatten(), nn.Tanh()), "
                    "...)), or embed outside the network as preprocessing (in the data "
                    "pipeline) and give the network float vectors."
                )
            if next(step.parameters(), None) is not None:
                after = f"{name} (block {index}" + (f", module {path})" if path else ")")


def _is_activation(module: object) -> bool:
    module = compiled_original(module)  # a compiled activation is still one
    return isinstance(module, ACTIVATIONS) and next(module.parameters(), None) is None


def _group(members: list[nn.Module]) -> nn.Sequential:
    """The ``nn.Sequential`` of ``members`` (the same module objects), one per member tuple."""
    key = tuple(id(m) for m in members)
    group = _GROUP_CACHE.get(key)
    if group is None or len(group) != len(members) or any(
        a is not b for a, b in zip(group, members)
    ):
        group = nn.Sequential(*members)
        _GROUP_CACHE[key] = group
    group.training = members[0].training
    return group


def _grouped(children: list[nn.Module]) -> list[nn.Module]:
    """``children`` with each run of stand-alone activations joined to the block before it."""
    if children and _is_activation(children[0]):
        raise UnsupportedNetworkError(
            f"block 0 ({children[0]!r}) is a stand-alone activation with no layer before it to "
            "group it with. Fix: group each layer with its activation: "
            "nn.Sequential(nn.Sequential(nn.Linear(d, M), nn.Tanh()), ...), or drop the "
            "leading activation."
        )
    runs: list[list[nn.Module]] = []
    for child in children:
        if runs and _is_activation(child):
            runs[-1].append(child)
        else:
            runs.append([child])
    return [run[0] if len(run) == 1 else _group(run) for run in runs]


def compiled_original(module: Any) -> Any:
    """The module inside ``torch.compile(module)`` (an ``OptimizedModule``), else ``module``.

    A compiled network is read through its original module: the rules run its blocks one by
    one, so compiling the whole network compiles nothing they run; compile the blocks instead
    (``nn.Sequential(*(torch.compile(b) for b in blocks))``): each compiled block keeps its
    compiled forward, and the closed-form fast path still recognizes Linear(+activation)
    blocks through their original modules.
    """
    while isinstance(module, nn.Module) and isinstance(
        getattr(module, "_orig_mod", None), nn.Module
    ) and type(module).__name__ == "OptimizedModule":
        module = module._orig_mod
    return module


def as_blocks(
    model: nn.Module | Sequence[nn.Module], group_activations: bool = True
) -> list[nn.Module]:
    """Return the ordered blocks ``[f_1, ..., f_L]`` of ``model``.

    With ``group_activations`` (the default) a stand-alone activation (one of
    :data:`ACTIVATIONS`) is joined to the block before it, in an ``nn.Sequential`` of the same
    module objects; the grouping is cached per model (and redone when its children change), so
    repeated calls return the same block objects. ``group_activations=False`` takes every
    child as a block.

    Raises:
        UnsupportedNetworkError: when the model exposes no ordered blocks, starts with a
            stand-alone activation (when grouping), has fewer than two blocks (after
            grouping; a local rule needs at least one hidden state between input and readout),
            or a block (or a step of an ``nn.Sequential`` block) cannot be called with one
            tensor and return one (``nn.LSTM``, ``nn.MultiheadAttention``, ...), or is an
            ``nn.Embedding`` that is not the network's first layer.
    """
    model = compiled_original(model)
    if isinstance(model, nn.Sequential):
        children = list(model)
    elif isinstance(model, (list, tuple, nn.ModuleList)):
        children = list(model)
    elif isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        children = list(model.blocks)
    else:
        raise UnsupportedNetworkError(
            f"{type(model).__name__} does not expose an ordered list of blocks. Fix: build it as "
            "an nn.Sequential of blocks, or give it an attribute `blocks` (nn.Sequential or "
            "nn.ModuleList) whose forward composition is the network."
        )
    for index, block in enumerate(children):
        if not isinstance(block, nn.Module):
            raise UnsupportedNetworkError(
                f"block {index} is a {type(block).__name__}, not an nn.Module."
            )
    if group_activations:
        blocks = _cached_grouping(model, children)
    else:
        blocks = children
        _check_blocks(blocks)
    if len(blocks) < 2:
        raise UnsupportedNetworkError(
            f"the network has {len(blocks)} block(s); local rules need at least two (a hidden "
            "block and a readout). Fix: split the model into blocks, e.g. "
            "nn.Sequential(nn.Sequential(nn.Linear(d, M), nn.Tanh()), nn.Linear(M, C))."
        )
    return blocks


def _cached_grouping(
    model: nn.Module | Sequence[nn.Module], children: list[nn.Module]
) -> list[nn.Module]:
    """The grouped blocks of ``model``, from the per-model cache while its children are kept."""
    ids = tuple(id(child) for child in children)
    cacheable = isinstance(model, nn.Module)
    if cacheable:
        cached = _MODEL_CACHE.get(model)
        if cached is not None and cached[0] == ids:
            for block in cached[1]:
                if id(block) not in ids:  # a group made here: follow its members' mode
                    block.training = block[0].training
            return list(cached[1])
    blocks = _grouped(children)
    _check_blocks(blocks)  # once per model and set of children: cached only when accepted
    if cacheable:
        _MODEL_CACHE[model] = (ids, tuple(blocks))
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
            activations.append(tensor_output(block(activations[-1]), block, index))
    return activations


def tensor_output(output: object, block: nn.Module, index: int | None = None) -> Tensor:
    """``output`` of ``block`` if it is a tensor; else an error with the fix."""
    if isinstance(output, Tensor):
        return output
    where = f"block {index}" if index is not None else "a block"
    raise UnsupportedNetworkError(
        f"{where} ({type(block).__name__}) returned a {type(output).__name__}, not a tensor "
        "(nn.LSTM and nn.MultiheadAttention return tuples). Fix: wrap it in a module whose "
        "forward returns one tensor, e.g. the LSTM's output sequence."
    )


@torch.no_grad()
def output_width(blocks: Sequence[nn.Module]) -> int | None:
    """Number of outputs of the readout block when it is an ``nn.Linear``, else ``None``."""
    readout = blocks[-1]
    if isinstance(readout, nn.Linear):
        return readout.out_features
    linears = [m for m in readout.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
