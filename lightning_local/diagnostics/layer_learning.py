"""Does every layer learn? Per-layer relative weight updates and feature changes over training.

For block ``l`` with weights ``W_l`` (all of the block's parameters, flattened together) and
feedforward output ``h_l`` on a fixed probe batch, measured every ``n`` optimizer steps:

=======================  ====================================================================
``relative_update``      ``||W_l(t) - W_l(t-1)|| / ||W_l(t-1)||``: the last step's own update
``weight_change``        ``||W_l(t) - W_l(0)|| / ||W_l(0)||``: how far training moved the layer
``feature_change``       ``||h_l(t) - h_l(0)|| / ||h_l(0)||``: how far its features moved
=======================  ====================================================================

(Frobenius norms.) A layer whose entries stay orders of magnitude below the others barely
learns, the known failure of deep predictive-coding networks; under a parametrization that
transfers across depth every layer's entries stay of one order as depth grows.
:func:`depth_slopes` fits ``log value`` against ``log depth`` per quantity (about 0: the same
order at every depth). :class:`LayerLearningCallback` logs the quantities during a Lightning
run; :func:`~lightning_local.diagnostics.plots.plot_layer_learning` draws its history.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_local.diagnostics.measures import fit_slope
from lightning_local.errors import LocalLearningError
from lightning_local.network import as_blocks, feedforward

QUANTITIES = ("relative_update", "weight_change", "feature_change")


def block_weights(blocks: Sequence[nn.Module]) -> list[Tensor]:
    """Each block's parameters flattened into one detached vector (empty for none)."""
    return [
        torch.cat([p.detach().flatten() for p in block.parameters()])
        if any(True for _ in block.parameters()) else torch.zeros(0)
        for block in blocks
    ]


def relative_change(now: Sequence[Tensor], before: Sequence[Tensor]) -> list[float]:
    """``||now_l - before_l|| / ||before_l||`` per entry (0 for an empty or zero ``before``)."""
    values = []
    for current, previous in zip(now, before):
        scale = float(previous.norm())
        values.append(float((current - previous).norm()) / scale if scale > 0 else 0.0)
    return values


def depth_slopes(
    profiles: Mapping[int, Mapping[str, Sequence[float]]],
) -> dict[str, float | None]:
    """Per quantity, the slope of ``log`` (its layer-mean) against ``log depth``.

    ``profiles[depth][quantity]`` holds the per-layer values of a run at that depth.
    """
    depths = sorted(profiles)
    slopes: dict[str, float | None] = {}
    for quantity in QUANTITIES:
        means = []
        for depth in depths:
            values = list(profiles[depth].get(quantity, []))
            means.append(sum(values) / len(values) if values else None)
        slopes[quantity] = fit_slope(depths, means)
    return slopes


class LayerLearningCallback(L.Callback):
    """Log the per-layer relative update, weight change and feature change every
    ``every_n_steps`` steps (see the module docstring), as ``layers/<quantity>/layer_<l>``.

    Args:
        every_n_steps: measure after steps ``n, 2n, ..`` (optimizer steps), >= 1.
        probe_size: samples of the first training batch kept as the fixed probe batch.
        prefix: metric name prefix.

    Attributes:
        history: one dict per measured step: ``{"step": t, quantity: [per-layer values]}``.
    """

    def __init__(self, every_n_steps: int = 50, probe_size: int = 256,
                 prefix: str = "layers") -> None:
        if every_n_steps < 1 or probe_size < 1:
            raise LocalLearningError(
                f"every_n_steps={every_n_steps}, probe_size={probe_size}: each must be >= 1. "
                "Fix: e.g. every_n_steps=50, probe_size=256."
            )
        self.every_n_steps = int(every_n_steps)
        self.probe_size = int(probe_size)
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []
        self._probe: Tensor | None = None
        self._start: tuple[list[Tensor], list[Tensor]] | None = None
        self._before: list[Tensor] | None = None

    @staticmethod
    def _blocks(pl_module: L.LightningModule) -> list[nn.Module]:
        finder = getattr(pl_module, "network_for_rule", None)
        return as_blocks(finder() if callable(finder) else pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        blocks = self._blocks(pl_module)
        if self._probe is None:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            self._probe = inputs[: self.probe_size].detach().clone()
            with torch.no_grad():
                features = [h.detach().clone() for h in feedforward(blocks, self._probe)[1:]]
            self._start = (block_weights(blocks), features)
        due = (trainer.global_step + 1) % self.every_n_steps == 0
        self._before = block_weights(blocks) if due else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if self._before is None or self._start is None or self._probe is None:
            return
        blocks = self._blocks(pl_module)
        weights = block_weights(blocks)
        with torch.no_grad():
            features = feedforward(blocks, self._probe)[1:]
        entry: dict[str, Any] = {
            "step": trainer.global_step,
            "relative_update": relative_change(weights, self._before),
            "weight_change": relative_change(weights, self._start[0]),
            "feature_change": relative_change(
                [h.flatten() for h in features], [h.flatten() for h in self._start[1]]
            ),
        }
        self._before = None
        self.history.append(entry)
        metrics = {
            f"{self.prefix}/{quantity}/layer_{index + 1}": value
            for quantity in QUANTITIES for index, value in enumerate(entry[quantity])
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
