"""Pure measurements of a network's sizes: rms values per layer and their slope against width.

``rms(v) = sqrt(mean(v^2))`` over every entry (batch and features). For blocks ``f_1 .. f_L``
with feedforward activations ``h_0 = x``, ``h_l = f_l(h_{l-1})``:

- :func:`forward_rms`: ``rms(h_l)`` for ``l = 1 .. L`` on a probe batch;
- :func:`weight_update_rms`: ``rms(f_l(z_{l-1}; W_new) - f_l(z_{l-1}; W_old))``, what a step's
  own weight change does to block ``l``'s output at fixed inputs ``z`` (``Delta W_l z_{l-1}``
  for a linear block), from a :func:`snapshot` of the old weights;
- :func:`pc_rms`: predictive coding's states ``x_l`` and errors ``eps_l`` after inference;
- :func:`tp_rms`: target propagation's targets ``tau_l`` and ``tau_l - h_l`` of a step;
- :func:`fit_slope`: the least-squares slope ``a`` of ``log value = a log width + c``.

Nothing here imports :mod:`lightning_local.rules` (the rules' types are only named in type
hints), so the rules may use these functions themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_local.errors import LocalLearningError
from lightning_local.network import as_blocks, feedforward

if TYPE_CHECKING:
    from lightning_local.rules.base import StepResult
    from lightning_local.rules.predictive_coding import PredictiveCoding

__all__ = [
    "fit_slope",
    "forward_rms",
    "pc_rms",
    "rms",
    "snapshot",
    "tp_rms",
    "weight_update_rms",
]


def rms(value: Tensor) -> Tensor:
    """Root mean square ``sqrt(mean(value^2))``, detached (0 for an empty tensor)."""
    if value.numel() == 0:
        return value.new_zeros(())
    return value.detach().pow(2).mean().sqrt()


def fit_slope(widths: Sequence[float], values: Sequence[float | None]) -> float | None:
    """Least-squares slope of ``log(value)`` against ``log(width)``.

    Non-finite, missing and non-positive values are left out; ``None`` when fewer than two
    widths remain. ``value = c * width^a`` gives ``a``.
    """
    points = [
        (math.log(w), math.log(v)) for w, v in zip(widths, values)
        if v is not None and math.isfinite(v) and v > 0
    ]
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = zip(*points)
    return float(np.polyfit(xs, ys, 1)[0])


def snapshot(blocks: Sequence[nn.Module]) -> list[dict[str, Tensor]]:
    """Detached copies of every block's parameters and buffers (for :func:`weight_update_rms`)."""
    return [
        {name: t.detach().clone() for name, t in [*b.named_parameters(), *b.named_buffers()]}
        for b in blocks
    ]


@torch.no_grad()
def forward_rms(blocks: Sequence[nn.Module], probe: Tensor) -> tuple[list[Tensor], list[float]]:
    """Feedforward activations ``[h_0 .. h_L]`` on ``probe`` and ``[rms(h_1) .. rms(h_L)]``."""
    activations = feedforward(blocks, probe)
    return activations, [float(rms(h)) for h in activations[1:]]


@torch.no_grad()
def weight_update_rms(
    blocks: Sequence[nn.Module], before: Sequence[Mapping[str, Tensor]], inputs: Sequence[Tensor]
) -> list[float]:
    """``rms(f_l(z_{l-1}; W_now) - f_l(z_{l-1}; W_before))`` per block, ``z = inputs``.

    ``before`` is a :func:`snapshot` taken before the step and ``inputs`` the activations
    ``[h_0 .. h_{L-1}]`` of the network before the step, so only block ``l``'s own weight change
    enters its entry.
    """
    return [
        float(rms(block(z) - functional_call(block, dict(old), (z,))))
        for block, old, z in zip(blocks, before, inputs)
    ]


@torch.no_grad()
def pc_rms(
    rule: PredictiveCoding, network: nn.Module, inputs: Tensor, targets: Tensor
) -> dict[str, list[float]]:
    """PC's ``state`` (``x_1 .. x_{L-1}``) and ``error`` (``eps_1 .. eps_L``) sizes after
    inference on ``(inputs, targets)``; the weights are not touched.

    The errors are the ones the weight update uses: ``eps_l = x_l - mu_l`` with
    ``mu_l = f_l(h_{l-1})`` under FPA and ``mu_l = f_l(x_{l-1})`` without, and the output error
    ``eps_L = -d loss / d mu_L``.
    """
    blocks = as_blocks(network)
    inference = rule.infer(network, inputs, targets)
    states = inference.states
    sources = inference.feedforward[:-1] if rule.fixed_prediction else states
    predictions = [block(z) for block, z in zip(blocks, sources)]
    errors = [x - mu for x, mu in zip(states[1:], predictions[:-1])]
    errors.append(-rule.loss.grad(predictions[-1], targets))
    return {
        "state": [float(rms(x)) for x in states[1:]],
        "error": [float(rms(e)) for e in errors],
    }


def tp_rms(result: StepResult, activations: Sequence[Tensor]) -> dict[str, list[float]]:
    """TP's ``target`` (``rms tau_l``) and ``target_change`` (``rms(tau_l - h_l)``) from a step.

    Read off the rule's metrics: ``target_norm`` is ``rms(tau_l)`` and ``local_loss`` is
    ``(w_l / 2B) ||tau_l - h_l||^2``, so ``rms(tau_l - h_l) = sqrt(2 local_loss_l / (w_l n_l))``
    with ``n_l`` the features of ``h_l`` (``activations = [h_0 .. h_L]`` of the step's batch,
    or any batch of the same feature shapes) and ``w_l = 1``.
    """
    metrics = result.metrics
    if "target_norm" not in metrics or "local_loss" not in metrics:
        raise LocalLearningError(
            "the step's metrics carry no 'target_norm'/'local_loss'; the coordinate check "
            "reads TP targets from them. Fix: use lightning_local's TargetPropagation rule."
        )
    features = [h[0].numel() for h in activations[1:]]
    changes = [
        math.sqrt(max(2.0 * float(loss) / n, 0.0))
        for loss, n in zip(metrics["local_loss"], features)
    ]
    return {"target": [float(v) for v in metrics["target_norm"]], "target_change": changes}
