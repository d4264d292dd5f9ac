"""lightning_local: local learning rules (predictive coding, target propagation) with muP.

A flat API over small modules, one seam each:

- :mod:`lightning_local.network`: a model as ordered blocks ``f_1 .. f_L``;
- :mod:`lightning_local.rules`: backprop, predictive coding, target propagation (plain PyTorch);
- :mod:`lightning_local.parametrization`: SP and muP through ``mup`` base shapes;
- :mod:`lightning_local.modules`: the ``LightningModule`` surface;
- :mod:`lightning_local.data`: MNIST-1D (embedded), FashionMNIST and CIFAR-10 (local folder);
- :mod:`lightning_local.analysis`: deep linear PC in closed form;
- :mod:`lightning_local.distributed`, :mod:`lightning_local.callbacks`: DDP and diagnostics;
- :mod:`lightning_local.sweeps`, :mod:`lightning_local.coord_check`, :mod:`lightning_local.cli`.

Names are imported on first use, so ``import lightning_local`` (and the command line) stay
fast until torch or Lightning is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_local.analysis import compare_updates, linear_equilibrium, pc_gram_matrix
    from lightning_local.callbacks import (
        CoordCheckCallback,
        LocalUpdateAlignment,
        LogRunConfig,
        local_update_cosines,
    )
    from lightning_local.coord_check import CoordCheckResult, fit_slope
    from lightning_local.data import (
        CIFAR10DataModule,
        FashionMNISTDataModule,
        MNIST1DDataModule,
        load_mnist1d,
    )
    from lightning_local.distributed import (
        AllReduceCounter,
        LocalDDPStrategy,
        global_batch_sampler,
        sum_across_processes,
    )
    from lightning_local.errors import (
        CheckpointError,
        DatasetNotFoundError,
        LocalLearningError,
        MissingBaseShapesError,
        NonFiniteEnergyError,
        ShapeMismatchError,
        UnclassifiableParameterError,
        UnsupportedNetworkError,
    )
    from lightning_local.loggers import log_figure, make_wandb_logger
    from lightning_local.losses import OutputLoss
    from lightning_local.models import CNN, MLP, CNN1d, WidthBuilder
    from lightning_local.modules import (
        AtomicCheckpointIO,
        BackpropModule,
        LocalLearningModule,
        PredictiveCodingModule,
        TargetPropagationModule,
    )
    from lightning_local.network import as_blocks, feedforward
    from lightning_local.parametrization import (
        SP,
        MuP,
        Parametrization,
        base_shapes_from_builder,
        get_parametrization,
        has_base_shapes,
        load_base_shapes,
        reattach_base_shapes,
        set_base_shapes,
    )
    from lightning_local.plots import plot_coord_check, plot_transfer
    from lightning_local.rules import (
        Backprop,
        InferenceResult,
        LocalRule,
        PredictiveCoding,
        StepResult,
        TargetPropagation,
        TPNetwork,
        local_loss,
    )
    from lightning_local.sweeps import (
        SweepConfig,
        SweepResult,
        best_learning_rates,
        log2_grid,
        sweep,
    )

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "AllReduceCounter": "lightning_local.distributed",
    "AtomicCheckpointIO": "lightning_local.modules",
    "Backprop": "lightning_local.rules",
    "BackpropModule": "lightning_local.modules",
    "CIFAR10DataModule": "lightning_local.data",
    "CNN": "lightning_local.models",
    "CNN1d": "lightning_local.models",
    "CheckpointError": "lightning_local.errors",
    "CoordCheckCallback": "lightning_local.callbacks",
    "CoordCheckResult": "lightning_local.coord_check",
    "DatasetNotFoundError": "lightning_local.errors",
    "FashionMNISTDataModule": "lightning_local.data",
    "InferenceResult": "lightning_local.rules",
    "LocalDDPStrategy": "lightning_local.distributed",
    "LocalLearningError": "lightning_local.errors",
    "LocalLearningModule": "lightning_local.modules",
    "LocalRule": "lightning_local.rules",
    "LocalUpdateAlignment": "lightning_local.callbacks",
    "LogRunConfig": "lightning_local.callbacks",
    "MLP": "lightning_local.models",
    "MNIST1DDataModule": "lightning_local.data",
    "MissingBaseShapesError": "lightning_local.errors",
    "MuP": "lightning_local.parametrization",
    "NonFiniteEnergyError": "lightning_local.errors",
    "OutputLoss": "lightning_local.losses",
    "Parametrization": "lightning_local.parametrization",
    "PredictiveCoding": "lightning_local.rules",
    "PredictiveCodingModule": "lightning_local.modules",
    "SP": "lightning_local.parametrization",
    "ShapeMismatchError": "lightning_local.errors",
    "StepResult": "lightning_local.rules",
    "SweepConfig": "lightning_local.sweeps",
    "SweepResult": "lightning_local.sweeps",
    "TPNetwork": "lightning_local.rules",
    "TargetPropagation": "lightning_local.rules",
    "TargetPropagationModule": "lightning_local.modules",
    "UnclassifiableParameterError": "lightning_local.errors",
    "UnsupportedNetworkError": "lightning_local.errors",
    "WidthBuilder": "lightning_local.models",
    "as_blocks": "lightning_local.network",
    "base_shapes_from_builder": "lightning_local.parametrization",
    "best_learning_rates": "lightning_local.sweeps",
    "compare_updates": "lightning_local.analysis",
    "feedforward": "lightning_local.network",
    "fit_slope": "lightning_local.coord_check",
    "get_parametrization": "lightning_local.parametrization",
    "global_batch_sampler": "lightning_local.distributed",
    "has_base_shapes": "lightning_local.parametrization",
    "linear_equilibrium": "lightning_local.analysis",
    "load_base_shapes": "lightning_local.parametrization",
    "load_mnist1d": "lightning_local.data",
    "local_loss": "lightning_local.rules",
    "local_update_cosines": "lightning_local.callbacks",
    "log2_grid": "lightning_local.sweeps",
    "log_figure": "lightning_local.loggers",
    "make_wandb_logger": "lightning_local.loggers",
    "pc_gram_matrix": "lightning_local.analysis",
    "plot_coord_check": "lightning_local.plots",
    "plot_transfer": "lightning_local.plots",
    "reattach_base_shapes": "lightning_local.parametrization",
    "set_base_shapes": "lightning_local.parametrization",
    "sum_across_processes": "lightning_local.distributed",
    "sweep": "lightning_local.sweeps",
}

__all__ = [
    "AllReduceCounter",
    "AtomicCheckpointIO",
    "Backprop",
    "BackpropModule",
    "CIFAR10DataModule",
    "CNN",
    "CNN1d",
    "CheckpointError",
    "CoordCheckCallback",
    "CoordCheckResult",
    "DatasetNotFoundError",
    "FashionMNISTDataModule",
    "InferenceResult",
    "LocalDDPStrategy",
    "LocalLearningError",
    "LocalLearningModule",
    "LocalRule",
    "LocalUpdateAlignment",
    "LogRunConfig",
    "MLP",
    "MNIST1DDataModule",
    "MissingBaseShapesError",
    "MuP",
    "NonFiniteEnergyError",
    "OutputLoss",
    "Parametrization",
    "PredictiveCoding",
    "PredictiveCodingModule",
    "SP",
    "ShapeMismatchError",
    "StepResult",
    "SweepConfig",
    "SweepResult",
    "TPNetwork",
    "TargetPropagation",
    "TargetPropagationModule",
    "UnclassifiableParameterError",
    "UnsupportedNetworkError",
    "WidthBuilder",
    "as_blocks",
    "base_shapes_from_builder",
    "best_learning_rates",
    "compare_updates",
    "feedforward",
    "fit_slope",
    "get_parametrization",
    "global_batch_sampler",
    "has_base_shapes",
    "linear_equilibrium",
    "load_base_shapes",
    "load_mnist1d",
    "local_loss",
    "local_update_cosines",
    "log2_grid",
    "log_figure",
    "make_wandb_logger",
    "pc_gram_matrix",
    "plot_coord_check",
    "plot_transfer",
    "reattach_base_shapes",
    "set_base_shapes",
    "sum_across_processes",
    "sweep",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_local' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
