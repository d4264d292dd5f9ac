"""Seeing inside training: measurements, alignment with backprop, coordinate checks, figures.

One concept per module:

- :mod:`.measures`: pure rms measurements per layer (activations, weight updates, PC states
  and errors, TP targets) and the slope of ``log rms`` against ``log width``;
- :mod:`.alignment`: per block, the angle or cosine between a local update and backprop's
  gradient (pure; the rules may import it);
- :mod:`.best_lr`: the best learning rate per width of a sweep's records;
- :mod:`.coord_check`: the coordinate check across widths, its result and the
  ``lightning-local coord-check`` command;
- :mod:`.deep_linear`: predictive coding's equilibrium of deep linear networks in closed form;
- :mod:`.layer_learning`: whether every layer learns (relative weight updates and feature
  changes per layer, their slope against depth) and its callback;
- :mod:`.plots`: the transfer, coordinate-check and layer-learning figures;
- :mod:`.loggers`: Weights & Biases helpers (offline runs, figures and tables);
- :mod:`.callbacks`: the Lightning callbacks (coordinate check during training, alignment
  with backprop, the run's configuration).

Dependencies point one way: :mod:`.measures` and :mod:`.alignment` import nothing from
:mod:`lightning_local.rules`; :mod:`lightning_local.sweeps` may import this package, and of
the sweeps only :mod:`.coord_check` imports :mod:`lightning_local.sweeps.experiment` (to build
its runs). Names are imported on first use (PEP 562), so importing one module of this package
(e.g. :mod:`.alignment` from a rule) does not import the others. The function
:func:`.coord_check.coord_check` is not among them (its name is its module's): import it
from :mod:`lightning_local.diagnostics.coord_check`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_local.diagnostics.alignment import update_alignment
    from lightning_local.diagnostics.best_lr import METRICS, BestLR, best_learning_rates
    from lightning_local.diagnostics.callbacks import (
        CoordCheckCallback,
        LocalUpdateAlignment,
        LogRunConfig,
        base_shape_table,
        local_update_cosines,
        run_config,
    )
    from lightning_local.diagnostics.coord_check import QUANTITIES, CoordCheckResult
    from lightning_local.diagnostics.deep_linear import (
        LinearEquilibrium,
        UpdateComparison,
        compare_updates,
        gd_gradients,
        gnt_gradients,
        layer_cosines,
        linear_equilibrium,
        linear_weights,
        output_jacobians,
        pc_gradients,
        pc_gram_matrix,
    )
    from lightning_local.diagnostics.layer_learning import (
        LayerLearningCallback,
        depth_slopes,
    )
    from lightning_local.diagnostics.loggers import (
        add_wandb_arguments,
        command_wandb_run,
        log_figure,
        log_table,
        make_wandb_logger,
    )
    from lightning_local.diagnostics.measures import (
        fit_slope,
        forward_rms,
        pc_rms,
        rms,
        snapshot,
        tp_rms,
        weight_update_rms,
    )
    from lightning_local.diagnostics.plots import (
        plot_coord_check,
        plot_layer_learning,
        plot_transfer,
    )

_MODULES: dict[str, tuple[str, ...]] = {
    "alignment": ("update_alignment",),
    "best_lr": ("METRICS", "BestLR", "best_learning_rates"),
    "callbacks": (
        "CoordCheckCallback", "LocalUpdateAlignment", "LogRunConfig", "base_shape_table",
        "local_update_cosines", "run_config",
    ),
    "coord_check": ("QUANTITIES", "CoordCheckResult"),  # coord_check() itself: from the module
    "deep_linear": (
        "LinearEquilibrium", "UpdateComparison", "compare_updates", "gd_gradients",
        "gnt_gradients", "layer_cosines", "linear_equilibrium", "linear_weights",
        "output_jacobians", "pc_gradients", "pc_gram_matrix",
    ),
    "loggers": (
        "add_wandb_arguments", "command_wandb_run", "log_figure", "log_table",
        "make_wandb_logger",
    ),
    "measures": (
        "fit_slope", "forward_rms", "pc_rms", "rms", "snapshot", "tp_rms", "weight_update_rms",
    ),
    "layer_learning": ("LayerLearningCallback", "depth_slopes"),
    "plots": ("plot_coord_check", "plot_layer_learning", "plot_transfer"),
}

_EXPORTS: dict[str, str] = {
    name: f"{__name__}.{module}" for module, names in _MODULES.items() for name in names
}

__all__ = [
    "BestLR",
    "CoordCheckCallback",
    "CoordCheckResult",
    "LayerLearningCallback",
    "LinearEquilibrium",
    "LocalUpdateAlignment",
    "LogRunConfig",
    "METRICS",
    "QUANTITIES",
    "UpdateComparison",
    "add_wandb_arguments",
    "base_shape_table",
    "best_learning_rates",
    "command_wandb_run",
    "compare_updates",
    "depth_slopes",
    "fit_slope",
    "forward_rms",
    "gd_gradients",
    "gnt_gradients",
    "layer_cosines",
    "linear_equilibrium",
    "linear_weights",
    "local_update_cosines",
    "log_figure",
    "log_table",
    "make_wandb_logger",
    "output_jacobians",
    "pc_gradients",
    "pc_gram_matrix",
    "pc_rms",
    "plot_coord_check",
    "plot_layer_learning",
    "plot_transfer",
    "rms",
    "run_config",
    "snapshot",
    "tp_rms",
    "update_alignment",
    "weight_update_rms",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
