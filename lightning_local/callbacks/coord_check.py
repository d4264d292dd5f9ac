"""A coordinate check that rides along with training and logs to any logger.

Every ``every_n_steps`` optimizer steps (up to ``max_steps``), :class:`CoordCheckCallback`
logs the rms size of each block's quantities (see :mod:`lightning_local.coord_check`):

- ``coord/activation/layer_<i>``: ``h_l`` on a fixed probe batch after the step;
- ``coord/activation_change/layer_<i>``: ``h_l - h_l(start)``, the change since the first
  measured step (the initialization when training starts fresh);
- ``coord/weight_update/layer_<i>``: what the step's own weight change does to block ``l``'s
  output, ``f_l(h_{l-1}; W_new) - f_l(h_{l-1}; W_old)``;
- predictive coding only: ``coord/state/layer_<i>`` (``x_l`` after inference on the step's
  batch) and ``coord/error/layer_<i>`` (``eps_l``, the last entry the output error).

``<i>`` counts blocks from 0, like the modules' per-layer metrics (``layer_0`` is the first
block, ``l = 1`` in the spec's notation). Train the same model at several widths with this
callback and compare the curves: under muP they lie on top of each other, under SP the readout's
grow with width. For a one-call check across widths use
:func:`lightning_local.coord_check.coord_check`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_local.coord_check import forward_rms, pc_rms, snapshot, weight_update_rms
from lightning_local.errors import LocalLearningError
from lightning_local.network import as_blocks
from lightning_local.rules.base import rms
from lightning_local.rules.predictive_coding import PredictiveCoding

__all__ = ["CoordCheckCallback"]


class CoordCheckCallback(L.Callback):
    """Log per-layer rms sizes of activations, their changes, weight updates (and PC states
    and errors) every ``every_n_steps`` steps, to every logger of the trainer.

    Args:
        every_n_steps: measure at steps ``0, n, 2n, ..`` (optimizer steps), >= 1.
        max_steps: stop measuring after this many steps (``None``: never stop).
        probe_size: samples of the first training batch kept as the fixed probe batch.
        prefix: metric name prefix.

    Attributes:
        history: one dict of metrics per measured step (with ``"step"``), for notebooks.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        max_steps: int | None = 10,
        probe_size: int = 256,
        prefix: str = "coord",
    ) -> None:
        if every_n_steps < 1 or probe_size < 1 or (max_steps is not None and max_steps < 1):
            raise LocalLearningError(
                f"every_n_steps={every_n_steps}, probe_size={probe_size}, max_steps={max_steps}: "
                "each must be >= 1 (max_steps may be None). Fix: e.g. every_n_steps=1, "
                "max_steps=10."
            )
        self.every_n_steps = int(every_n_steps)
        self.max_steps = max_steps
        self.probe_size = int(probe_size)
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self._probe: Tensor | None = None
        self._start: list[Tensor] | None = None
        self._before: list[dict[str, Tensor]] | None = None
        self._inputs: list[Tensor] | None = None
        self._pending: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _network(pl_module: L.LightningModule) -> nn.Module:
        finder = getattr(pl_module, "network_for_rule", None)
        return finder() if callable(finder) else pl_module

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0 and (self.max_steps is None or step < self.max_steps)

    def _add(self, metrics: dict[str, float], quantity: str, values: list[float]) -> None:
        for index, value in enumerate(values):
            metrics[f"{self.prefix}/{quantity}/layer_{index}"] = float(value)

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._before = None
        if not self._due(trainer.global_step):
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise LocalLearningError(
                "CoordCheckCallback needs (inputs, targets) batches. Fix: make the data loader "
                "yield (x, y) pairs."
            )
        inputs, targets = batch[0], batch[1]
        network = self._network(pl_module)
        blocks = as_blocks(network)
        if self._probe is None:
            self._probe = inputs[: self.probe_size].detach().clone()
            self._start = forward_rms(blocks, self._probe)[0]
        self._inputs = forward_rms(blocks, self._probe)[0]
        self._before = snapshot(blocks)
        self._pending = {}
        rule = getattr(pl_module, "rule", None)
        if isinstance(rule, PredictiveCoding):
            for quantity, values in pc_rms(rule, network, inputs, targets).items():
                self._add(self._pending, quantity, values)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._before is None or self._probe is None:
            return
        blocks = as_blocks(self._network(pl_module))
        activations, sizes = forward_rms(blocks, self._probe)
        metrics = dict(self._pending)
        self._add(metrics, "activation", sizes)
        with torch.no_grad():
            changes = [float(rms(h - h0)) for h, h0 in zip(activations[1:], self._start[1:])]
        self._add(metrics, "activation_change", changes)
        self._add(metrics, "weight_update",
                  weight_update_rms(blocks, self._before, self._inputs[:-1]))
        self._before = None
        # straight to the loggers: ``pl_module.log`` would repeat the value on every step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self.history.append({"step": float(trainer.global_step), **metrics})
