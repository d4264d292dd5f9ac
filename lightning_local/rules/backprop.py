"""Backpropagation as a rule: the reference every local rule is compared with.

The surrogate is the batch-mean output loss ``(1/B) sum_b loss(f(x_b), y_b)``; its gradient is
the SGD/backprop gradient ``dL/dW_l``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from lightning_local.network import as_blocks, feedforward
from lightning_local.rules.base import (
    LocalRule,
    RuleSettings,
    StepChecks,
    StepResult,
)

__all__ = ["Backprop", "BackpropSettings"]


@dataclass(frozen=True)
class BackpropSettings(RuleSettings):
    """Backprop has no settings of its own (the loss and the optimizer are the run's)."""


class Backprop(LocalRule):
    """End-to-end backpropagation of the output loss through every block.

    Backprop has no inference: :meth:`compile_inference` leaves it as it is (a no-op, and
    :attr:`inference_compiled` stays ``False``); compile the blocks themselves
    (``torch.compile(block)``) to compile its forward pass.
    """

    name = "bp"
    Settings = BackpropSettings

    def rule_loss(self, network: nn.Module, inputs: Tensor, targets: Tensor) -> StepResult:
        output = feedforward(as_blocks(network), inputs)[-1]
        loss = self.loss.mean(output, self.loss.target_matrix(output, targets, validate=False))
        checks = StepChecks()  # one host read: labels in range, a finite loss
        checks.labels(self.loss, output, targets)
        checks.finite(loss, "the backprop loss")
        checks.verify()
        return StepResult(loss=loss.detach(), surrogate=loss, output=output.detach())
