"""Output losses ``loss(f, y)`` of the readout, per sample, with their gradients.

Two losses are supported:

- ``"mse"``: ``loss(f, y) = 1/2 ||f - y||^2`` with ``y`` one-hot for class labels (the
  paper's setting) or a float target of the output's shape; ``d loss / d f = f - y``.
- ``"cross_entropy"``: ``loss(f, y) = -log softmax(f)_y``; ``d loss / d f = softmax(f) - y``.

``per_sample_sum`` is the sum over the batch of the per-sample losses (what inference uses,
so a state step does not depend on the batch size); ``mean`` divides it by the batch size
(what weight updates use).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_local.errors import LocalLearningError, ShapeMismatchError

__all__ = ["LossName", "OutputLoss", "get_loss"]

LossName = Literal["mse", "cross_entropy"]


class OutputLoss:
    """A readout loss with closed-form gradient with respect to the output ``f``."""

    def __init__(self, name: LossName = "mse") -> None:
        if name not in ("mse", "cross_entropy"):
            raise LocalLearningError(
                f"unknown loss {name!r}. Fix: use 'mse' or 'cross_entropy'."
            )
        self.name: LossName = name

    def __repr__(self) -> str:
        return f"OutputLoss({self.name!r})"

    def target_matrix(self, output: Tensor, target: Tensor) -> Tensor:
        """Targets as a float tensor of the output's shape (one-hot for class labels)."""
        if output.dim() < 2:
            raise ShapeMismatchError(
                f"the network output has shape {tuple(output.shape)}; expected (batch, outputs)."
            )
        if target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if target.shape != output.shape[:1]:
                raise ShapeMismatchError(
                    f"class labels have shape {tuple(target.shape)} but the output has shape "
                    f"{tuple(output.shape)}. Fix: pass one label per sample, shape (batch,)."
                )
            classes = output.shape[1]
            if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
                raise ShapeMismatchError(
                    f"labels must lie in [0, {classes}) for a readout with {classes} outputs; "
                    f"got values in [{int(target.min())}, {int(target.max())}]. Fix: match the "
                    "readout width to the number of classes."
                )
            return F.one_hot(target.long(), classes).to(output.dtype)
        if target.shape != output.shape:
            raise ShapeMismatchError(
                f"targets have shape {tuple(target.shape)} but the output has shape "
                f"{tuple(output.shape)}. Fix: pass integer class labels of shape (batch,) or "
                "float targets of the output's shape."
            )
        return target.to(output.dtype)

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        """The loss of each sample, shape ``(batch,)``."""
        y = self.target_matrix(output, target)
        if self.name == "mse":
            return 0.5 * (output - y).pow(2).flatten(1).sum(1)
        return -(y * F.log_softmax(output, dim=1)).sum(1)

    def per_sample_sum(self, output: Tensor, target: Tensor) -> Tensor:
        """``sum_b loss(f_b, y_b)``: the energy term inference uses."""
        return self.per_sample(output, target).sum()

    def mean(self, output: Tensor, target: Tensor) -> Tensor:
        """``(1/B) sum_b loss(f_b, y_b)``: the objective weight updates descend."""
        return self.per_sample(output, target).mean()

    def grad(self, output: Tensor, target: Tensor) -> Tensor:
        """``d loss(f_b, y_b) / d f_b`` for every sample (the gradient of the per-sample sum)."""
        y = self.target_matrix(output, target)
        if self.name == "mse":
            return output - y
        return torch.softmax(output, dim=1) - y


def get_loss(loss: LossName | OutputLoss) -> OutputLoss:
    """Accept a loss name or an :class:`OutputLoss`."""
    return loss if isinstance(loss, OutputLoss) else OutputLoss(loss)
