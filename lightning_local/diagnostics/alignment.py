"""How far a local rule's update is from backprop's, block by block.

For block ``l`` with trainable parameters ``theta_l = (p_1, .., p_k)``, a local rule's weight
gradient ``G_l`` (its update is ``-eta_l G_l``) and backprop's gradient
``G_l^BP = dL/d theta_l``, each flattened and concatenated over the block's parameters in the
same order, give

    cos_l   = <G_l, G_l^BP> / (||G_l|| ||G_l^BP||),
    angle_l = arccos(cos_l) * 180 / pi          (degrees, in [0, 180]).

``cos_l = 1`` (angle 0) when the local update points along gradient descent, e.g. predictive
coding with F-ini, one SI sweep and FPA, whose update is ``gamma_L`` times backprop's, or target
propagation's readout, ``beta`` times backprop's. A parameter without a gradient (``None``, as
``torch.autograd.grad(..., allow_unused=True)`` returns it) counts as a zero gradient;
``cos_l = 0`` (angle 90) when either gradient is zero, and a block without trainable
parameters gets NaN.

:func:`update_alignment` is pure: it takes gradients that were computed elsewhere and runs no
rule, so it imports nothing from :mod:`lightning_local.rules` and the rules can call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_local.errors import LocalLearningError

__all__ = ["update_alignment"]

_EPS = 1e-30  # clamps the norms: a zero gradient gives cos = 0 instead of 0 / 0


def update_alignment(
    groups: Sequence[Sequence[Tensor]],
    local_grads: Sequence[Tensor | None],
    backprop_grads: Sequence[Tensor | None],
    *,
    measure: Literal["angle", "cosine"] = "angle",
) -> Tensor:
    """Per block, the angle (degrees) or cosine between a local update and backprop's gradient.

    Args:
        groups: the parameters of each block, ``groups[l]`` = block ``l``'s trainable
            parameters (possibly empty), e.g.
            ``[[p for p in b.parameters() if p.requires_grad] for b in blocks]``.
        local_grads: the local rule's gradients of the concatenated parameters
            ``[p for group in groups for p in group]``, in that order (``None`` = zero), as
            ``torch.autograd.grad(local_loss, params, allow_unused=True)`` returns them.
        backprop_grads: backprop's gradients of the same parameters, in the same order.
        measure: ``"angle"`` for ``arccos(cos_l)`` in degrees, ``"cosine"`` for ``cos_l``.

    Returns:
        A detached 1-d tensor with one entry per block (NaN for a block without parameters).

    Raises:
        LocalLearningError: when the gradients do not match the parameters in number or shape,
            or for an unknown ``measure``.
    """
    if measure not in ("angle", "cosine"):
        raise LocalLearningError(f"unknown measure {measure!r}. Fix: use 'angle' or 'cosine'.")
    params = [p for group in groups for p in group]
    if len(local_grads) != len(params) or len(backprop_grads) != len(params):
        raise LocalLearningError(
            f"{len(params)} parameters but {len(local_grads)} local and {len(backprop_grads)} "
            "backprop gradients. Fix: pass one gradient (or None) per parameter of the groups, "
            "in the order of [p for group in groups for p in group]."
        )
    for p, a, b in zip(params, local_grads, backprop_grads):
        for g in (a, b):
            if g is not None and g.shape != p.shape:
                raise LocalLearningError(
                    f"a gradient of shape {tuple(g.shape)} for a parameter of shape "
                    f"{tuple(p.shape)}. Fix: pass the gradients in the order of the parameters."
                )
    with torch.no_grad():
        values, start = [], 0
        for group in groups:
            stop = start + len(group)
            if not group:
                values.append(None)
                continue
            a = _flat(local_grads[start:stop], group)
            b = _flat(backprop_grads[start:stop], group)
            start = stop
            cosine = F.cosine_similarity(a, b, dim=0, eps=_EPS)
            values.append(
                torch.rad2deg(torch.arccos(cosine.clamp(-1.0, 1.0))) if measure == "angle"
                else cosine
            )
        like = next((v for v in values if v is not None), None)
        if like is None:
            return torch.full((len(groups),), float("nan"))
        nan = like.new_tensor(float("nan"))
        return torch.stack([nan if v is None else v for v in values]).detach()


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """The gradients of one block flattened and concatenated (zeros for ``None``)."""
    return torch.cat([
        (torch.zeros_like(p) if g is None else g.detach()).flatten() for g, p in zip(grads, params)
    ])
