"""Backpropagation as a :class:`LocalLearningModule`: the reference the local rules match."""

from __future__ import annotations

from lightning_local.modules.base import LocalLearningModule
from lightning_local.rules.backprop import Backprop

__all__ = ["BackpropModule"]


class BackpropModule(LocalLearningModule):
    """End-to-end backprop of the output loss, with SP or BP's muP (docs/math.md §3).

    The surrogate is the batch-mean loss ``(1/B) sum_b loss(f(x_b), y_b)``.
    """

    rule_class = Backprop
