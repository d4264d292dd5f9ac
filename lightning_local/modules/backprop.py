"""Backpropagation as a :class:`LocalLearningModule`: the reference the local rules match."""

from __future__ import annotations

from torch import nn

from lightning_local.modules.base import LocalLearningModule
from lightning_local.parametrization import Parametrization
from lightning_local.rules.backprop import Backprop

__all__ = ["BackpropModule"]


class BackpropModule(LocalLearningModule):
    """End-to-end backprop of the output loss, with SP or BP's muP (spec section 3).

    The surrogate is the batch-mean loss ``(1/B) sum_b loss(f(x_b), y_b)``. Arguments are those
    of :class:`LocalLearningModule`.
    """

    rule_name = "bp"

    def __init__(
        self,
        network: nn.Module | None = None,
        *,
        parametrization: str | Parametrization = "sp",
        base_width: int = 64,
        base_shapes: str | None = None,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        loss: str = "mse",
    ) -> None:
        super().__init__(
            network,
            parametrization=parametrization,
            base_width=base_width,
            base_shapes=base_shapes,
            lr=lr,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            loss=loss,
        )

    def build_rule(self) -> Backprop:
        return Backprop(loss=self.loss_name)
