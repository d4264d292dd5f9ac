"""Output losses ``loss(f, y)`` of the readout, per sample, with their gradients.

Two losses are supported:

- ``"mse"``: ``loss(f, y) = 1/2 ||f - y||^2`` with ``y`` one-hot for class labels (the
  paper's setting) or a float target of the output's shape; ``d loss / d f = f - y``.
- ``"cross_entropy"``: ``loss(f, y) = -log softmax(f)_y``; ``d loss / d f = softmax(f) - y``.

``per_sample_sum`` is the sum over the batch of the per-sample losses (what inference uses,
so a state step does not depend on the batch size); ``mean`` divides it by the batch size
(what weight updates use).

Class labels are checked to lie in ``[0, outputs)``: :meth:`OutputLoss.target_matrix` reads
their range from the device (one host synchronization) each time it is given labels. A rule
converts a batch's labels once, with ``validate=False`` (no host read), checks their range
with the step's other checks (:meth:`OutputLoss.labels_in_range`, read once per step), and
passes the float target matrix on, which every method takes without a host read.
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

    def target_matrix(self, output: Tensor, target: Tensor, *, validate: bool = True) -> Tensor:
        """Targets as a float tensor of the output's shape (one-hot for class labels).

        ``y[b, k] = [target_b = k]`` for integer labels, ``target`` in the output's dtype for
        float targets. Shapes are always checked (on the host, for free). With ``validate``
        labels outside ``[0, outputs)`` raise, at the cost of one host read of their range;
        ``validate=False`` skips it (out-of-range labels then give rows of zeros), for a
        caller that checks :meth:`labels_in_range` itself.
        """
        if output.dim() < 2:
            raise ShapeMismatchError(
                f"the network output has shape {tuple(output.shape)}; expected (batch, outputs)."
            )
        if _is_label(target):
            if target.shape != output.shape[:1]:
                raise ShapeMismatchError(
                    f"class labels have shape {tuple(target.shape)} but the output has shape "
                    f"{tuple(output.shape)}. Fix: pass one label per sample, shape (batch,)."
                )
            if validate:
                self.check_labels(output, target)
            classes = torch.arange(output.shape[1], device=target.device)
            return (target.unsqueeze(1) == classes).to(output.dtype)
        if target.shape != output.shape:
            raise ShapeMismatchError(
                f"targets have shape {tuple(target.shape)} but the output has shape "
                f"{tuple(output.shape)}. Fix: pass integer class labels of shape (batch,) or "
                "float targets of the output's shape."
            )
        return target.to(output.dtype)

    @staticmethod
    def labels_in_range(output: Tensor, target: Tensor) -> Tensor | None:
        """Whether every label lies in ``[0, outputs)``: a boolean scalar on the device (no
        host read); ``None`` for float targets, which have nothing to check."""
        if not _is_label(target):
            return None
        return ((target >= 0) & (target < output.shape[1])).all()

    @staticmethod
    def check_labels(output: Tensor, target: Tensor) -> None:
        """Raise :class:`ShapeMismatchError` for labels outside ``[0, outputs)`` (one host
        read of their range; nothing for float targets or an empty batch)."""
        if not _is_label(target) or not target.numel():
            return
        classes = output.shape[1]
        low, high = torch.stack([target.min(), target.max()]).tolist()
        if low < 0 or high >= classes:
            raise ShapeMismatchError(
                f"labels must lie in [0, {classes}) for a readout with {classes} outputs; "
                f"got values in [{low}, {high}]. Fix: match the readout width to the number "
                "of classes."
            )

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

    def residual(self, output: Tensor, target: Tensor) -> Tensor:
        """``-d loss(f_b, y_b) / d f_b``: ``y - f`` (mse) or ``y - softmax(f)``, exactly the
        negated :meth:`grad` (in one operation fewer)."""
        y = self.target_matrix(output, target)
        if self.name == "mse":
            return y - output
        return y - torch.softmax(output, dim=1)


_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _is_label(target: Tensor) -> bool:
    """Whether ``target`` holds class labels (an integer dtype) rather than float targets."""
    return target.dtype in _LABEL_DTYPES


def get_loss(loss: LossName | OutputLoss) -> OutputLoss:
    """Accept a loss name or an :class:`OutputLoss`."""
    return loss if isinstance(loss, OutputLoss) else OutputLoss(loss)
