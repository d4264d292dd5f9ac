"""What every rule shares: the step result, the rule interface, and the local-loss surrogate.

A rule turns a batch into a scalar *surrogate* whose gradient with respect to the network's
parameters is the rule's weight gradient (a batch mean). One ``surrogate.backward()`` (one
``manual_backward`` in Lightning) therefore yields the update, and under DDP it is one
bucketed all-reduce per training step, whatever the rule does inside inference.

The ladder, as in jpc: ``energy -> state grads -> updates -> step``.
:meth:`LocalRule.training_loss` runs inference and returns the surrogate;
:meth:`LocalRule.step` zeroes gradients, back-propagates the surrogate and steps the optimizer.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_local.errors import NonFiniteEnergyError
from lightning_local.losses import LossName, OutputLoss, get_loss
from lightning_local.network import as_blocks, feedforward

__all__ = ["LocalRule", "StepResult", "check_finite", "local_loss", "local_losses"]


@dataclass
class StepResult:
    """What one training step of a rule produced.

    Attributes:
        loss: output loss at the feedforward prediction, batch mean (detached).
        surrogate: scalar whose gradient w.r.t. the parameters is the rule's weight gradient.
        output: feedforward network output ``f`` (detached), for metrics.
        metrics: detached diagnostics (scalars, or 1-d tensors with one entry per layer).
    """

    loss: Tensor
    surrogate: Tensor
    output: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def check_finite(value: Tensor, what: str) -> Tensor:
    """Raise :class:`NonFiniteEnergyError` when ``value`` holds NaN or infinity."""
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteEnergyError(
            f"{what} is not finite. The step diverged: lower the learning rate or the inference "
            "step size, or check the inputs for NaN/inf. Nothing was applied to the weights."
        )
    return value


def local_losses(
    blocks: Sequence[nn.Module],
    layer_inputs: Sequence[Tensor],
    layer_targets: Sequence[Tensor],
    layer_weights: Sequence[float],
    predictions: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """Weighted local losses, one per block, with detached inputs and targets.

    ``(w_l / 2B) ||tau_l - f_l(z_{l-1})||^2`` with ``z_{l-1}`` = ``layer_inputs[l]`` and
    ``tau_l`` = ``layer_targets[l]`` (both detached). Its gradient w.r.t. block ``l``'s
    parameters is ``-(w_l / B) (d f_l / d theta_l)^T (tau_l - f_l(z_{l-1}))``: the local update
    shared by predictive coding (``tau_l = x_l``, ``w_l = gamma_l``) and target propagation.
    A block whose weight is 0 is not run and contributes a zero. ``predictions[l]``, where
    given, is ``f_l(z_{l-1})`` already computed with its graph to the parameters.
    """
    batch = layer_inputs[0].shape[0]
    known = list(predictions) if predictions is not None else [None] * len(blocks)
    losses = []
    for block, z, tau, weight, prediction in zip(
        blocks, layer_inputs, layer_targets, layer_weights, known
    ):
        if weight == 0:
            losses.append(z.new_zeros(()))
            continue
        if prediction is None:
            prediction = block(z.detach())
        losses.append((weight / (2 * batch)) * (tau.detach() - prediction).pow(2).sum())
    return losses


def local_loss(
    blocks: Sequence[nn.Module],
    layer_inputs: Sequence[Tensor],
    layer_targets: Sequence[Tensor],
    layer_weights: Sequence[float],
) -> Tensor:
    """``sum_l (w_l / 2B) ||tau_l - f_l(z_{l-1})||^2``: the sum of :func:`local_losses`."""
    total = layer_inputs[0].new_zeros(())
    for term in local_losses(blocks, layer_inputs, layer_targets, layer_weights):
        total = total + term
    return total


class LocalRule(ABC):
    """A learning rule on a layered network, in plain PyTorch.

    Subclasses implement :meth:`training_loss`. ``name`` is the key the parametrization
    tables use (``"bp"``, ``"pc"``, ``"tp"``).
    """

    name: str = "rule"

    def __init__(self, loss: LossName | OutputLoss = "mse") -> None:
        self.loss = get_loss(loss)

    @abstractmethod
    def training_loss(self, network: nn.Module, inputs: Tensor, targets: Tensor) -> StepResult:
        """Run the rule on a batch; return the surrogate whose gradient is the update."""

    def step(
        self,
        network: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        optimizer: torch.optim.Optimizer,
    ) -> StepResult:
        """One training step without Lightning: zero grads, surrogate backward, optimizer step."""
        optimizer.zero_grad(set_to_none=True)
        result = self.training_loss(network, inputs, targets)
        result.surrogate.backward()
        optimizer.step()
        return result

    @torch.no_grad()
    def predict(self, network: nn.Module, inputs: Tensor) -> Tensor:
        """The feedforward output ``f(x)`` (all rules predict with the forward pass)."""
        return feedforward(as_blocks(network), inputs)[-1]

    def hparams(self) -> dict[str, object]:
        """The rule's hyperparameters as plain values (for logging and configs)."""
        return {"rule": self.name, "loss": self.loss.name}


def rms(value: Tensor) -> Tensor:
    """Root mean square ``sqrt(mean(value^2))`` (0 for an empty tensor)."""
    if value.numel() == 0:
        return value.new_zeros(())
    return value.detach().pow(2).mean().sqrt()


def finite_or_nan(value: float) -> float:
    """``value`` if finite, else NaN (for bookkeeping of diverged runs)."""
    return value if math.isfinite(value) else float("nan")
