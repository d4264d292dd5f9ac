"""The run's configuration for the loggers: rule, parametrization, processes and base shapes.

Lightning logs the module's constructor arguments by itself. :class:`LogRunConfig` adds what
they do not show: the rule's effective hyperparameters (e.g. PC's width-scaled output weight
``gamma_L``), the process layout, and a *base-shape table*, one row per parameter::

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
from torch import nn

from lightning_local.errors import LocalLearningError
from lightning_local.modules.base import LocalLearningModule
from lightning_local.parametrization import classify_parameters, has_base_shapes

__all__ = ["LogRunConfig", "base_shape_table", "run_config"]

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
