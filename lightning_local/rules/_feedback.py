"""Feedback networks ``g_2 .. g_L`` for target propagation, built from the forward blocks.

``g_l`` maps block ``l``'s output ``h_l`` back to its input ``h_{l-1}`` (docs/math.md §2.1). It is
read off the forward block ``f_l``:

- a block whose only weight layer is an ``nn.Linear`` (optionally after ``nn.Flatten`` and
  before an elementwise activation), or any block whose only parameters are one
  ``nn.Linear``'s (e.g. a residual block ``h + tanh(W h)``) with a flat output, gets
  ``Q_l = nn.Linear(out, in, bias=False)``, followed by ``nn.Unflatten`` when ``h_{l-1}`` is
  not flat;
- a block ``Conv2d -> activation -> [AvgPool2d | MaxPool2d]`` (or the same in 1-D) gets a
  resize-convolution ``nn.Upsample(h_{l-1}'s size) -> nn.Conv2d(out, in, same kernel and
  padding)`` (``Conv1d`` in 1-D): a transposed
  convolution with a nearest-neighbour kernel, kept as ``Conv2d`` so muP classifies its weight
  like a forward conv (``mup`` reads ``ConvTranspose2d`` weights with fan-in and fan-out
  swapped, and the parametrization refuses them).

``kind="nonlinear"`` appends the activation that ends block ``l-1`` (so ``g_l(h_l)`` lives in
``h_{l-1}``'s range, as in Lee et al.'s DTP); a block ending with pooling adds none. Feedback
maps are bias-free (the theory's ``g_l(h) = Q_l h``) and initialised like a forward layer of
the same shape, ``N(0, sigma^2 / fan_in)``.

The closed-form feedback (docs/math.md §2.5) is the ridge optimum on the batch,
``Q_l* = argmin_Q ||Q H_l - H_{l-1}||^2 + mu_l ||Q||^2`` with ``H_l`` the ``n_l x B`` matrix of
batch features, solved in the primal form ``Q = (H_{l-1} H_l^T)(H_l H_l^T + mu I)^{-1}`` from
batch sums (so summing the two Gram matrices across processes gives the global-batch optimum)
or, in one process when ``B < n_l``, in the equal (push-through) dual form
``Q = H_{l-1} (H_l^T H_l + mu I)^{-1} H_l^T``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_local.errors import UnsupportedNetworkError
from lightning_local.models import gaussian_init_

__all__ = ["FeedbackKind", "build_feedback", "linear_map", "noise_gram", "ridge_solution"]

FeedbackKind = Literal["linear", "nonlinear"]

_ELEMENTWISE = (
    nn.Tanh, nn.ReLU, nn.Identity, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU,
    nn.Softplus, nn.Hardtanh,
)
_POOLS = (nn.AvgPool1d, nn.MaxPool1d, nn.AvgPool2d, nn.MaxPool2d)


def _layers(block: nn.Module) -> list[nn.Module]:
    return list(block) if isinstance(block, nn.Sequential) else [block]


def _trailing_activation(block: nn.Module) -> nn.Module | None:
    last = _layers(block)[-1]
    return copy.deepcopy(last) if isinstance(last, _ELEMENTWISE) else None


@torch.no_grad()
def _block_shapes(blocks: Sequence[nn.Module], input_shape: Sequence[int] | None) -> list[tuple]:
    """Per-sample shapes ``[S_0, ..., S_L]`` of ``h_0 .. h_L`` from a batch-1 forward pass."""
    first = _layers(blocks[0])[0]
    if input_shape is None:
        if not isinstance(first, nn.Linear):
            example = "(5,) for 5 token indices" if isinstance(first, nn.Embedding) else (
                "(1, 28, 28)")
            raise UnsupportedNetworkError(
                f"cannot infer the input shape of a network starting with "
                f"{type(first).__name__}. Fix: pass input_shape (per sample, e.g. {example})."
            )
        input_shape = (first.in_features,)
    parameter = next(iter(nn.ModuleList(blocks).parameters()), None)
    device = parameter.device if parameter is not None else None
    dtype = parameter.dtype if parameter is not None else None
    if isinstance(first, nn.Embedding):  # it takes indices: probe with index 0
        dtype = torch.long
    h = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    shapes = [tuple(h.shape[1:])]
    modes = [(m, m.training) for block in blocks for m in block.modules()]
    try:  # the probe in eval mode: it must not update BatchNorm statistics (nor fail on them)
        for block in blocks:
            block.eval()
        for block in blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
    finally:
        for module, training in modes:
            module.training = training
    return shapes


def _linear_feedback(block: nn.Module, in_shape: tuple, out_shape: tuple) -> nn.Module | None:
    layers = _layers(block)
    rest = [m for m in layers if not isinstance(m, (nn.Linear, nn.Flatten, *_ELEMENTWISE))]
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if rest and not _one_linear_inside(block):
        return None
    if (not rest and len(linears) != 1) or len(out_shape) != 1:
        return None
    linear = nn.Linear(out_shape[0], math.prod(in_shape), bias=False, **_like(block))
    gaussian_init_(linear)
    if len(in_shape) == 1:
        return linear
    return nn.Sequential(linear, nn.Unflatten(1, in_shape))


def _like(block: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of the block's parameters: its feedback map is made alike."""
    parameter = next(block.parameters(), None)
    return {} if parameter is None else {"device": parameter.device, "dtype": parameter.dtype}


def _one_linear_inside(block: nn.Module) -> bool:
    """Whether the block's only parameters are those of one ``nn.Linear`` (at any depth), as
    in a residual block ``h + tanh(W h)``: its feedback is a linear map like a Linear's."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        return False
    inside = {id(p) for p in linears[0].parameters()}
    return all(id(p) in inside for p in block.parameters())


def _conv_feedback(block: nn.Module, in_shape: tuple, out_shape: tuple) -> nn.Module | None:
    layers = _layers(block)
    conv_types = {2: nn.Conv1d, 3: nn.Conv2d}  # per-sample (channels, *spatial) ranks
    conv_type = conv_types.get(len(in_shape))
    if conv_type is None or type(layers[0]) is not conv_type or len(out_shape) != len(in_shape):
        return None
    conv, tail = layers[0], layers[1:]
    if not all(isinstance(m, (*_ELEMENTWISE, *_POOLS)) for m in tail) or conv.groups != 1:
        return None
    if conv.padding == "valid" or conv.padding == "same":
        padding = conv.padding
    else:
        padding = tuple(conv.padding)
    upsample = nn.Upsample(size=tuple(in_shape[1:]), mode="nearest")
    resize = conv_type(out_shape[0], in_shape[0], conv.kernel_size, padding=padding, bias=False,
                       **_like(block))
    gaussian_init_(resize)
    feedback = nn.Sequential(upsample, resize)
    probe = feedback(torch.zeros(1, *out_shape, device=conv.weight.device, dtype=conv.weight.dtype))
    return feedback if tuple(probe.shape[1:]) == tuple(in_shape) else None


def build_feedback(
    blocks: Sequence[nn.Module],
    kind: FeedbackKind = "linear",
    input_shape: Sequence[int] | None = None,
    sigma: float = 1.0,
) -> nn.ModuleList:
    """Feedback maps ``[g_2, ..., g_L]`` (entry ``l - 2`` maps ``h_l`` to ``h_{l-1}``).

    Args:
        blocks: the forward blocks ``f_1 .. f_L``.
        kind: ``"linear"`` (``g_l(h) = Q_l h``) or ``"nonlinear"`` (``phi_{l-1}(Q_l h)``).
        input_shape: per-sample input shape; inferred from a leading ``nn.Linear`` when omitted.
        sigma: init scale, ``Q_l ~ N(0, sigma^2 / fan_in)``.

    Raises:
        UnsupportedNetworkError: for a block whose feedback cannot be read off (the message
            names it), or an unknown ``kind``.
    """
    if kind not in ("linear", "nonlinear"):
        raise UnsupportedNetworkError(
            f"unknown feedback kind {kind!r}. Fix: use 'linear' or 'nonlinear'."
        )
    shapes = _block_shapes(blocks, input_shape)
    feedback = nn.ModuleList()
    for index in range(1, len(blocks)):
        block, in_shape, out_shape = blocks[index], shapes[index], shapes[index + 1]
        g = _linear_feedback(block, in_shape, out_shape) or _conv_feedback(
            block, in_shape, out_shape
        )
        if g is None:
            raise UnsupportedNetworkError(
                f"block {index} ({block!r}) has no automatic feedback map: supported blocks are "
                "one nn.Linear (optionally after Flatten, before an activation; or any block whose "
                "only parameters are one nn.Linear's, such as a residual block) or Conv2d -> "
                "activation -> pooling. Fix: restructure the block, or build the feedback "
                "yourself and pass it as TPNetwork(network, feedback=nn.ModuleList([...]))."
            )
        if sigma != 1.0:
            with torch.no_grad():
                for p in g.parameters():
                    p.mul_(sigma)
        activation = _trailing_activation(blocks[index - 1]) if kind == "nonlinear" else None
        feedback.append(g if activation is None else nn.Sequential(*_layers(g), activation))
    return feedback


def linear_map(g: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` of a linear feedback map (``Q_l``), or ``None`` when ``g`` is not one."""
    layers = _layers(g)
    if isinstance(layers[0], nn.Linear) and all(isinstance(m, nn.Unflatten) for m in layers[1:]):
        return layers[0]
    return None


def noise_gram(block: nn.Module, below: Tensor, noise_std: float) -> tuple[Tensor, Tensor]:
    """The noise terms of the expected noisy reconstruction loss, for the closed form.

    For ``xi_b ~ N(0, s^2 I)`` and a block ``f(h) = phi(W h + b)`` expanded to first order,
    ``E sum_b ||Q f(h_b + xi_b) - (h_b + xi_b)||^2 = sum_b ||Q f(h_b) - h_b||^2
    + s^2 sum_b ||Q D_b W - I||^2`` with ``D_b = diag(phi'(u_b))`` (exact when the block is
    affine, ``D_b = I``). Returns the two terms the normal equations gain:
    ``s^2 sum_b D_b W W^T D_b`` (``n_l x n_l``) and ``s^2 sum_b D_b W`` (``n_l x n_{l-1}``).
    """
    layers = _layers(block)
    linear = next(m for m in layers if isinstance(m, nn.Linear))
    weight, variance = linear.weight, noise_std**2
    tail = layers[layers.index(linear) + 1:]
    if not tail:
        return variance * below.shape[0] * weight @ weight.T, variance * below.shape[0] * weight
    with torch.enable_grad():
        u = linear(below.flatten(1)).detach().requires_grad_(True)
        output = u
        for activation in tail:
            output = activation(output)
        slope = torch.autograd.grad(output.sum(), u)[0]
    return (
        variance * (weight @ weight.T) * (slope.T @ slope),
        variance * slope.sum(0)[:, None] * weight,
    )


def ridge_solution(
    features: Sequence[Tensor],
    reconstruct: Sequence[Tensor],
    ridges: Sequence[float],
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    noise_terms: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> list[Tensor]:
    """Closed-form ridge feedback ``Q_l*`` for each layer, from one batch.

    Args:
        features: ``h_l`` per layer, shape ``(B, n_l)`` (flattened).
        reconstruct: ``h_{l-1}`` per layer, shape ``(B, n_{l-1})``.
        ridges: ``mu_l`` per layer.
        all_reduce_sum: sums a tensor over processes; when given, the Gram sums
            ``H_l H_l^T`` and ``H_{l-1} H_l^T`` of all layers go through it in one call.
        noise_terms: per layer, the terms :func:`noise_gram` adds to the two Gram sums
            (batch sums too, so they are reduced with them).

    Returns:
        ``Q_l*`` per layer, shape ``(n_{l-1}, n_l)``.
    """
    if all_reduce_sum is None and noise_terms is None:
        return [_ridge_one(x, y, mu) for x, y, mu in zip(features, reconstruct, ridges)]
    grams = [(x.T @ x, x.T @ y) for x, y in zip(features, reconstruct)]
    if noise_terms is not None:
        grams = [(xx + nxx, xy + nxy) for (xx, xy), (nxx, nxy) in zip(grams, noise_terms)]
    if all_reduce_sum is not None:
        flat = all_reduce_sum(torch.cat([g.flatten() for pair in grams for g in pair]))
        parts = iter(flat.split([g.numel() for pair in grams for g in pair]))
        grams = [(next(parts).view_as(xx), next(parts).view_as(xy)) for xx, xy in grams]
    return [_solve_primal(xx, xy, mu) for (xx, xy), mu in zip(grams, ridges)]


def _solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """``matrix^{-1} rhs`` for a ridge system (symmetric positive definite: ``mu > 0``), with
    no host read of the solver's status (``torch.linalg.solve`` reads it, a device
    synchronization per solve on an accelerator); a NaN in the data makes the targets NaN,
    which the step's finiteness check refuses."""
    return torch.linalg.solve_ex(matrix, rhs)[0]


def _solve_primal(xx: Tensor, xy: Tensor, mu: float) -> Tensor:
    eye = torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device)
    return _solve(xx + mu * eye, xy).T


def _ridge_one(x: Tensor, y: Tensor, mu: float) -> Tensor:
    """One layer's ridge optimum, through the smaller of the primal and dual systems."""
    batch, width = x.shape
    if width <= batch:
        return _solve_primal(x.T @ x, x.T @ y, mu)
    kernel = x @ x.T + mu * torch.eye(batch, dtype=x.dtype, device=x.device)
    return y.T @ _solve(kernel, x)
