"""Block linearization: the prediction ``mu = f(x)`` and its pullback ``v -> J_f(x)^T v``.

Predictive-coding inference needs, for every block, the prediction at the current state and
the vector-Jacobian product with the error of the layer above. Two implementations:

- the general path, by autograd, for any block (Conv2d + pooling, residual blocks, ...);
- a closed-form fast path for an ``nn.Linear`` optionally followed by an elementwise
  activation whose derivative is a function of its output (tanh, relu, sigmoid, identity):
  ``u = x W^T + b``, ``mu = phi(u)``, ``J^T v = (v * phi'(u)) W`` with ``phi'`` read off
  ``mu`` (``1 - mu^2`` for tanh, ``[mu > 0]`` for relu, ``mu (1 - mu)`` for sigmoid).

Both return identical values (tested); the fast path skips the autograd graph.
:func:`linearizer` resolves which path a block takes once, for a loop that linearizes the
same block at many states (predictive-coding inference); :func:`linearize` is one call. Inside a
compiled inference step the general path takes the same vector-Jacobian product through
``torch.func.vjp``, which ``torch.compile`` traces into the graph (``torch.autograd.grad``
would break it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_local.errors import UnsupportedNetworkError
from lightning_local.network import compiled_original, tensor_output

__all__ = ["Linearization", "Linearizer", "linearize", "linearizer", "supports_fast_path"]

Pullback = Callable[[Tensor], Tensor]

_DERIVATIVE_FROM_OUTPUT: dict[type[nn.Module], Callable[[Tensor], Tensor] | None] = {
    nn.Tanh: lambda mu: torch.rsub(torch.mul(mu, mu), 1),
    nn.ReLU: lambda mu: (mu > 0).to(mu.dtype),
    nn.Sigmoid: lambda mu: torch.sub(1, mu).mul_(mu),
    nn.Identity: None,
}


class Linearization:
    """``mu = f(x)`` with its pullback ``J^T``; ``mu`` carries no autograd graph.

    ``output`` is the same ``f(x)`` with a graph to the block's parameters (not to ``x``) when
    it was asked for and comes for free, else ``None``.
    """

    __slots__ = ("prediction", "pullback", "output")

    def __init__(self, prediction: Tensor, pullback: Pullback, output: Tensor | None = None):
        self.prediction = prediction
        self.pullback = pullback
        self.output = output


Linearizer = Callable[[Tensor, bool], Linearization]
"""``(x, track_parameters) -> Linearization`` of one block (see :func:`linearizer`)."""


def _affine_parts(block: nn.Module) -> tuple[nn.Linear, nn.Module | None] | None:
    """``(linear, activation)`` when ``block`` is Linear or Sequential(Linear, elementwise act)
    (a compiled block is read through its original module)."""
    block = compiled_original(block)
    if isinstance(block, nn.Linear):
        return block, None
    if (
        isinstance(block, nn.Sequential)
        and len(block) == 2
        and isinstance(compiled_original(block[0]), nn.Linear)
        and type(compiled_original(block[1])) in _DERIVATIVE_FROM_OUTPUT
    ):
        return compiled_original(block[0]), compiled_original(block[1])
    if isinstance(block, nn.Sequential) and len(block) == 1:
        return _affine_parts(block[0])
    return None


def supports_fast_path(block: nn.Module) -> bool:
    """Whether ``block`` has the closed-form linearization."""
    return _affine_parts(block) is not None


def _linearize_affine(
    linear: nn.Linear,
    activation: nn.Module | None,
    derivative: Callable[[Tensor], Tensor] | None,
    x: Tensor,
    track_parameters: bool = False,
) -> Linearization:
    """``mu = phi(x W^T + b)`` and ``v -> (v * phi'(u)) W``, the slope read off ``mu`` when
    the pullback is taken (a block whose pullback is never taken, the first, computes none)."""
    weight = linear.weight.detach()
    with torch.set_grad_enabled(track_parameters):
        output = F.linear(x.detach(), linear.weight, linear.bias)
        if activation is not None:
            output = activation(output)
    prediction = output.detach()

    def pullback(v: Tensor) -> Tensor:
        return (v if derivative is None else v * derivative(prediction)) @ weight

    return Linearization(prediction, pullback, output if track_parameters else None)


def _linearize_autograd(
    block: nn.Module, x: Tensor, track_parameters: bool = False
) -> Linearization:
    """``f(x)`` and ``v -> J_f(x)^T v`` by autograd (``track_parameters`` is not taken: no
    output with a graph to the parameters is kept)."""
    if not torch.is_floating_point(x):  # integer inputs (an embedding's indices): no pullback
        with torch.no_grad():
            output = tensor_output(block(x), block)

        def no_pullback(v: Tensor) -> Tensor:
            raise UnsupportedNetworkError(
                f"{type(block).__name__} takes integer inputs, which have no gradient: only the "
                "first block, whose input is the data, may take them."
            )

        return Linearization(output, no_pullback)
    if torch.compiler.is_compiling():  # torch.compile traces torch.func, not autograd.grad
        output, vjp = torch.func.vjp(lambda z: tensor_output(block(z), block), x.detach())

        def traced_pullback(v: Tensor) -> Tensor:
            return vjp(v)[0]

        return Linearization(output, traced_pullback)
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        output = tensor_output(block(leaf), block)

    def pullback(v: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(output, leaf, grad_outputs=v, retain_graph=True)
        return grad

    return Linearization(output.detach(), pullback)


def linearizer(block: nn.Module, fast_path: bool = True) -> Linearizer:
    """``(x, track_parameters) -> linearize(block, x, fast_path, track_parameters)``, with
    the block's path (closed form or autograd) resolved here, once."""
    parts = _affine_parts(block) if fast_path else None
    if parts is None:
        return functools.partial(_linearize_autograd, block)
    linear, activation = parts
    derivative = None if activation is None else _DERIVATIVE_FROM_OUTPUT[type(activation)]
    return functools.partial(_linearize_affine, linear, activation, derivative)


def linearize(
    block: nn.Module, x: Tensor, fast_path: bool = True, track_parameters: bool = False
) -> Linearization:
    """Linearize ``block`` at ``x``: closed form where supported and allowed, else autograd.

    With ``track_parameters`` the closed form also keeps ``output``, ``f(x)`` with a graph to
    the parameters, so a weight update at this point needs no second forward pass.
    """
    return linearizer(block, fast_path)(x, track_parameters)
