"""Callbacks for seeing inside training (they watch; the algorithm lives in the rules).

- :class:`CoordCheckCallback`: per-layer rms sizes during training, a coordinate check that
  rides along with training and logs to any logger;
- :class:`LocalUpdateAlignment`: every N steps, the cosine between each layer's local update
  and the backprop gradient on the same batch (:func:`local_update_cosines`);
- :class:`LogRunConfig`: the rule's settings, the process layout and the base-shape table
  (:func:`base_shape_table`, :func:`run_config`), logged with the run.

**Coordinate check.** Every ``every_n_steps`` optimizer steps (up to ``max_steps``),
:class:`CoordCheckCallback` logs the rms size (``rms(v) = sqrt(mean(v^2))``, see
:mod:`lightning_local.diagnostics.measures`) of each block's quantities:

- ``coord/activation/layer_<i>``: ``h_l`` on a fixed probe batch after the step;
- ``coord/activation_change/layer_<i>``: ``h_l - h_l(start)``, the change since the first
  measured step (the initialization when training starts fresh);
- ``coord/weight_update/layer_<i>``: what the step's own weight change does to block ``l``'s
  output, ``f_l(h_{l-1}; W_new) - f_l(h_{l-1}; W_old)``;
- predictive coding only: ``coord/state/layer_<i>`` (``x_l`` after inference on the step's
  batch) and ``coord/error/layer_<i>`` (``eps_l``, the last entry the output error).

``<i>`` counts blocks from 0, like the modules' per-layer metrics (``layer_0`` is the first
block, ``l = 1`` in the notation of docs/math.md §0.1). Train the same model at several widths
with this callback and compare the curves: under muP they lie on top of each other, under SP the
readout's grow with width. For a one-call check across widths use
:func:`lightning_local.diagnostics.coord_check.coord_check`.

**Alignment with backprop.** ``train/bp_cosine/layer_<i>`` is
``cos_l = <G_l, G_l^BP> / (||G_l|| ||G_l^BP||)`` between the rule's weight gradient ``G_l`` and
backprop's ``G_l^BP`` of block ``l`` (:mod:`lightning_local.diagnostics.alignment`).

**Run config.** Lightning logs the module's constructor arguments by itself.
:class:`LogRunConfig` adds what they do not show: the rule's effective hyperparameters (e.g.
PC's width-scaled output weight ``gamma_L``), the process layout, and a *base-shape table*, one
row per parameter::

    name         shape     base_shape  width_mult  role    lr
    0.0.weight   [512, 40] [64, 40]    8.0         input   0.8

(``base_shape`` is ``p.infshape``'s base size per dim, ``width_mult = M / M_base`` of its width
dims, ``role`` the muP role and ``lr`` the learning rate of the parameter's optimizer group).
Under SP the network carries no base shapes: ``base_shape`` equals ``shape`` and ``role`` is
``None``. W&B also gets it as a ``wandb.Table`` (key ``base_shape_table``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from lightning_local.diagnostics.alignment import update_alignment
from lightning_local.diagnostics.measures import (
    forward_rms,
    pc_rms,
    rms,
    snapshot,
    weight_update_rms,
)
from lightning_local.errors import LocalLearningError
from lightning_local.modules.base import LocalLearningModule
from lightning_local.network import as_blocks
from lightning_local.parametrization import classify_parameters, has_base_shapes
from lightning_local.rules.backprop import Backprop
from lightning_local.rules.base import LocalRule
from lightning_local.rules.predictive_coding import PredictiveCoding

__all__ = [
    "CoordCheckCallback",
    "LocalUpdateAlignment",
    "LogRunConfig",
    "base_shape_table",
    "local_update_cosines",
    "run_config",
]


# ------------------------------------------------------------------------- coordinate check
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


# ------------------------------------------------------------------------- alignment
def local_update_cosines(
    rule: LocalRule, network: nn.Module, inputs: Tensor, targets: Tensor
) -> Tensor:
    """``[cos_1, .., cos_L]``: per block, the cosine between the rule's and backprop's gradient.

    For block ``l`` with parameters ``theta_l``, the rule's weight gradient
    ``G_l = d surrogate / d theta_l`` (its update is ``-eta_l G_l``) and the backprop gradient
    ``G_l^BP = dL/d theta_l`` of the batch-mean output loss, both at the current weights and
    on the same batch, give ``cos_l = <G_l, G_l^BP> / (||G_l|| ||G_l^BP||)`` (flattened over
    the block's parameters; 0 when either is zero), computed by
    :func:`~lightning_local.diagnostics.alignment.update_alignment`. Predictive coding with
    F-ini, one SI sweep and FPA has ``cos_l = 1`` (its update is ``gamma_L`` times
    backprop's); at finite width or with other schedules it measures how far PC moves from
    gradient descent (docs/math.md §4.3, §4.5), and for target propagation how far the targets are
    from the gradient.

    Runs the rule once more on the batch (its inference included) under a forked random state,
    so a rule that draws noise leaves the training run's random stream untouched. Both
    gradients come from ``torch.autograd.grad`` with respect to the parameters: nothing is
    accumulated in ``p.grad``, so a DDP wrapper sees no backward and no all-reduce happens.
    Blocks without trainable parameters get NaN.
    """
    blocks = as_blocks(network)
    groups = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
    params = [p for group in groups for p in group]
    if not params:
        raise LocalLearningError(
            "the network has no trainable parameters to compare. Fix: unfreeze its blocks."
        )
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        surrogate = rule.training_loss(network, inputs, targets).surrogate
        local = torch.autograd.grad(surrogate, params, allow_unused=True)
        reference = Backprop(loss=rule.loss).training_loss(network, inputs, targets).surrogate
        backprop = torch.autograd.grad(reference, params, allow_unused=True)
    return update_alignment(groups, local, backprop, measure="cosine")


class LocalUpdateAlignment(L.Callback):
    """Every ``every_n_steps`` training steps, log ``train/bp_cosine/layer_<l>``.

    The values go to the trainer's loggers (rank 0 writes) at that step only, and the latest
    ones stay in :attr:`cosines`.

    Computed before the step, on the step's batch and at the weights the step starts from (see
    :func:`local_update_cosines`); it costs one more rule pass and one backprop pass, so keep
    ``every_n_steps`` large on big runs. Under DDP each process computes it on its own batch and
    rank 0's values are logged.

    Args:
        every_n_steps: how often (in optimizer steps), >= 1.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        if every_n_steps < 1:
            raise LocalLearningError(
                f"every_n_steps must be >= 1, got {every_n_steps}. Fix: e.g. every_n_steps=100."
            )
        self.every_n_steps = int(every_n_steps)
        self.cosines: torch.Tensor | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if not isinstance(pl_module, LocalLearningModule):
            raise LocalLearningError(
                f"LocalUpdateAlignment needs a LocalLearningModule (a rule and a network); got "
                f"{type(pl_module).__name__}. Fix: train one of lightning_local's modules."
            )
        inputs, targets = pl_module._split_batch(batch)
        network = pl_module.network_for_rule()
        self.cosines = local_update_cosines(pl_module.rule, network, inputs, targets)
        metrics = {f"train/bp_cosine/layer_{i}": float(v) for i, v in enumerate(self.cosines)}
        # straight to the loggers: ``pl_module.log`` would repeat the last value every step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


# ------------------------------------------------------------------------- run config
_COLUMNS = ("name", "shape", "base_shape", "width_mult", "role", "lr")


def base_shape_table(
    modules: nn.Module | Sequence[nn.Module],
    optimizer: torch.optim.Optimizer | None = None,
) -> list[dict[str, Any]]:
    """One row per parameter: name, shape, base shape, width multiplier, muP role and lr.

    ``lr`` is ``None`` without an optimizer or for a parameter the optimizer does not hold.
    """
    modules = [modules] if isinstance(modules, nn.Module) else list(modules)
    lrs: dict[int, float] = {}
    if optimizer is not None:
        for group in optimizer.param_groups:
            lrs.update({id(p): float(group["lr"]) for p in group["params"]})
    roles: dict[int, str] = {}
    if all(has_base_shapes(m) for m in modules):
        roles = {id(item.parameter): item.role for item in classify_parameters(modules)}
    rows = []
    for index, module in enumerate(modules):
        prefix = f"{index}." if len(modules) > 1 else ""
        for name, p in module.named_parameters():
            infshape = getattr(p, "infshape", None)
            base = list(p.shape) if infshape is None else [
                d.dim if d.base_dim is None else d.base_dim for d in infshape
            ]
            rows.append({
                "name": prefix + name,
                "shape": list(p.shape),
                "base_shape": base,
                "width_mult": 1.0 if infshape is None else float(infshape.width_mult()),
                "role": roles.get(id(p)),
                "lr": lrs.get(id(p)),
            })
    return rows


def run_config(pl_module: LocalLearningModule, trainer: L.Trainer | None = None) -> dict[str, Any]:
    """What :class:`LogRunConfig` logs: ``rule``, ``processes`` and ``base_shape_table``.

    ``base_shape_table`` maps each parameter name to its row of :func:`base_shape_table`
    (without the name). (The module's own hyperparameter ``base_shapes`` is the ``.bsh`` file
    it was given, if any.)
    """
    optimizer = None
    if trainer is not None and trainer.optimizers:
        optimizer = trainer.optimizers[0]
    table = base_shape_table(pl_module.parametrized_modules(), optimizer)
    shapes = {row["name"]: {k: v for k, v in row.items() if k != "name"} for row in table}
    config: dict[str, Any] = {"rule": pl_module.rule.hparams(), "base_shape_table": shapes}
    if trainer is not None:
        config["processes"] = {
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "strategy": type(trainer.strategy).__name__,
            "accelerator": type(trainer.accelerator).__name__,
        }
    return config


class LogRunConfig(L.Callback):
    """At the start of fitting, log :func:`run_config` to every logger (from rank 0)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, LocalLearningModule):
            raise LocalLearningError(
                f"LogRunConfig needs a LocalLearningModule; got {type(pl_module).__name__}. "
                "Fix: train one of lightning_local's modules."
            )
        if not trainer.is_global_zero:
            return
        config = run_config(pl_module, trainer)
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
            if isinstance(logger, WandbLogger):
                rows = [[name, *(_cell(row[c]) for c in _COLUMNS[1:])]
                        for name, row in config["base_shape_table"].items()]
                logger.log_table("base_shape_table", columns=list(_COLUMNS), data=rows)


def _cell(value: Any) -> Any:
    """Shapes as ``"512x40"`` strings in the W&B table (its cells hold scalars)."""
    return "x".join(map(str, value)) if isinstance(value, list) else value
