"""SWA under muP: the averaging phase keeps the per-role learning-rate ratios at every width."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from _module_fixtures import trainer as _trainer
from lightning.pytorch.callbacks import StochasticWeightAveraging
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.errors import LocalLearningError
from lightning_local.models import MLP
from lightning_local.modules import BackpropModule, MuPStochasticWeightAveraging
from lightning_local.parametrization import MuP


class _Rates(L.Callback):
    """Each epoch's per-role learning rates, at its end."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append({g["role"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 40, generator=generator)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (32,), generator=generator)),
                      batch_size=16)


def _swa_rates(width: int, callback: L.Callback) -> list[dict[str, float]]:
    rates = _Rates()
    model = BackpropModule(network=MLP(width=width), parametrization="mup", base_width=16,
                           lr=0.1)
    _trainer(max_epochs=3, callbacks=[callback, rates]).fit(model, _loader())
    return rates.epochs


def test_mup_swa_scales_the_swa_rate_per_role_like_the_table():
    widths = (32, 128)
    swa = {w: _swa_rates(w, MuPStochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1,
                                                         annealing_epochs=1))[-1]
           for w in widths}
    table = MuP().exponents("bp", "sgd")
    for role, rate in swa[widths[0]].items():
        assert rate == pytest.approx(0.05 * (widths[0] / 16) ** -table[role].lr)
        slope = math.log(swa[widths[1]][role] / rate) / math.log(widths[1] / widths[0])
        assert slope == pytest.approx(-table[role].lr, abs=1e-9), role
    assert len(set(swa[widths[1]].values())) > 1  # the ratios survive (plain SWA: one rate)


def test_plain_swa_with_one_rate_is_refused_under_mup_and_a_list_is_taken():
    with pytest.raises(LocalLearningError, match="MuPStochasticWeightAveraging"):
        _swa_rates(32, StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1))
    rates = [0.01, 0.02, 0.03, 0.04, 0.05]
    epochs = _swa_rates(32, StochasticWeightAveraging(swa_lrs=rates, swa_epoch_start=1,
                                                      annealing_epochs=1))
    assert list(epochs[-1].values()) == pytest.approx(rates)
