"""Stochastic weight averaging that keeps muP's per-role learning rates.

Lightning's ``StochasticWeightAveraging(swa_lrs=0.05)`` sets every parameter group's learning
rate to 0.05 when averaging starts: under muP the per-role rates ``eta' m^{-c_r}`` collapse to
one SP-like rate. :class:`MuPStochasticWeightAveraging` reads ``swa_lrs`` as the
width-independent ``eta'_swa`` and gives group ``r`` the rate ``eta'_swa * m^{-c_r}`` (the
group's ``lr_scale``, docs/math.md §3.5), so the averaging phase transfers across widths like
the training phase. Under muP a plain ``StochasticWeightAveraging`` with one float is refused
by the modules with this fix; a list with one rate per group is taken as given.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import StochasticWeightAveraging

from lightning_local.errors import LocalLearningError

__all__ = ["MuPStochasticWeightAveraging", "check_weight_averaging"]


class MuPStochasticWeightAveraging(StochasticWeightAveraging):
    """``StochasticWeightAveraging`` whose ``swa_lrs`` is ``eta'_swa``, scaled per group.

    Args:
        swa_lrs: the width-independent SWA learning rate ``eta'_swa``.
        **kwargs: the other arguments of Lightning's ``StochasticWeightAveraging``
            (``swa_epoch_start``, ``annealing_epochs``, ``annealing_strategy``, ...).
    """

    def __init__(self, swa_lrs: float, **kwargs: Any) -> None:
        super().__init__(swa_lrs=float(swa_lrs), **kwargs)
        self.width_independent_swa_lr = float(swa_lrs)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        groups = trainer.optimizers[0].param_groups
        if not all("lr_scale" in group for group in groups):
            raise LocalLearningError(
                "MuPStochasticWeightAveraging needs the parametrization's parameter groups "
                "(each with its lr_scale). Fix: let the module build the optimizer."
            )
        self._swa_lrs = [self.width_independent_swa_lr * g["lr_scale"] for g in groups]


def check_weight_averaging(trainer: L.Trainer, mup: bool) -> None:
    """Refuse, under muP, a plain ``StochasticWeightAveraging`` with one float ``swa_lrs``."""
    if not mup:
        return
    for callback in trainer.callbacks:
        plain = isinstance(callback, StochasticWeightAveraging) and not isinstance(
            callback, MuPStochasticWeightAveraging
        )
        if plain and isinstance(callback._swa_lrs, (int, float)):
            raise LocalLearningError(
                f"StochasticWeightAveraging(swa_lrs={callback._swa_lrs}) would set every "
                "parameter group to that rate, dropping muP's per-role learning rates. Fix: "
                "use lightning_local.modules.MuPStochasticWeightAveraging(swa_lrs=...) (the "
                "rate is eta', scaled per group), or pass one rate per parameter group."
            )
