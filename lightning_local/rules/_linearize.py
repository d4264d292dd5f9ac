"""Block linearization: the prediction ``mu = f(x)`` and its pullback ``v -> J_f(x)^T v``.

Predictive-coding inference needs, for every block, the prediction at the current state and
the vector-Jacobian product with the error of the layer above. Two implementations:

- the general path, by autograd, for any block (Conv2d + pooling, residual blocks, ...);
- a closed-form fast path for an ``nn.Linear`` optionally followed by an elementwise
  activation whose derivative is a function of its output (tanh, relu, sigmoid, identity):
  ``u = x W^T + b``, ``mu = phi(u)``, ``J^T v = (v * phi'(u)) W`` with ``phi'`` read off
  ``mu`` (``1 - mu^2`` for tanh, ``[mu > 0]`` for relu, ``mu (1 - mu)`` for sigmoid).

Both return identical values (tested); the fast path skips the autograd graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_local.errors import UnsupportedNetworkError
from lightning_local.network import compiled_original, tensor_output

__all__ = ["Linearization", "linearize", "supports_fast_path"]

Pullback = Callable[[Tensor], Tensor]

_DERIVATIVE_FROM_OUTPUT: dict[type[nn.Module], Callable[[Tensor], Tensor] | None] = {
    nn.Tanh: lambda mu: torch.mul(mu, mu).neg_().add_(1),
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
    linear: nn.Linear, activation: nn.Module | None, x: Tensor, track_parameters: bool
) -> Linearization:
    weight = linear.weight.detach()
    with torch.set_grad_enabled(track_parameters):
        output = F.linear(x.detach(), linear.weight, linear.bias)
        if activation is not None:
            output = activation(output)
    prediction = output.detach()
    derivative = None if activation is None else _DERIVATIVE_FROM_OUTPUT[type(activation)]
    slope = None if derivative is None else derivative(prediction)

    def pullback(v: Tensor) -> Tensor:
        return (v if slope is None else v * slope) @ weight

    return Linearization(prediction, pullback, output if track_parameters else None)


def _linearize_autograd(block: nn.Module, x: Tensor) -> Linearization:
    if not torch.is_floating_point(x):  # integer inputs (an embedding's indices): no pullback
        with torch.no_grad():
            output = tensor_output(block(x), block)

        def no_pullback(v: Tensor) -> Tensor:
            raise UnsupportedNetworkError(
                f"{type(block).__name__} takes integer inputs, which have no gradient: only the "
                "first block, whose input is the data, may take them."
            )

        return Linearization(output, no_pullback)
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        output = tensor_output(block(leaf), block)

    def pullback(v: Tensor) -> Tensor:
        (grad,) = torch.autograd.grad(output, leaf, grad_outputs=v, retain_graph=True)
        return grad

    return Linearization(output.detach(), pullback)


def linearize(
    block: nn.Module, x: Tensor, fast_path: bool = True, track_parameters: bool = False
) -> Linearization:
    """Linearize ``block`` at ``x``: closed form where supported and allowed, else autograd.

    With ``track_parameters`` the closed form also keeps ``output``, ``f(x)`` with a graph to
    the parameters, so a weight update at this point needs no second forward pass.
    """
    parts = _affine_parts(block) if fast_path else None
    if parts is not None:
        with torch.no_grad():
            return _linearize_affine(parts[0], parts[1], x, track_parameters)
    return _linearize_autograd(block, x)
