"""lightning_local: local learning rules (predictive coding, target propagation) with muP.

A flat API over small modules, one seam each:

- :mod:`lightning_local.network`: a model as ordered blocks ``f_1 .. f_L``;
- :mod:`lightning_local.rules`: backprop, predictive coding, target propagation (plain PyTorch);
- :mod:`lightning_local.parametrization`: SP and muP through ``mup`` base shapes;
- :mod:`lightning_local.modules`: the ``LightningModule`` surface;
- :mod:`lightning_local.data`: MNIST-1D (embedded), FashionMNIST and CIFAR-10 (local folder);
- :mod:`lightning_local.analysis`: deep linear PC in closed form;
- :mod:`lightning_local.distributed`, :mod:`lightning_local.callbacks`: DDP and diagnostics;
- :mod:`lightning_local.sweep`, :mod:`lightning_local.coord_check`, :mod:`lightning_local.cli`.
"""

from lightning_local.analysis import compare_updates, linear_equilibrium, pc_gram_matrix
from lightning_local.callbacks import LocalUpdateAlignment, LogRunConfig, local_update_cosines
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
from lightning_local.models import CNN, MLP, WidthBuilder
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

__version__ = "0.1.0"

__all__ = [
    "AllReduceCounter",
    "AtomicCheckpointIO",
    "Backprop",
    "BackpropModule",
    "CIFAR10DataModule",
    "CNN",
    "CheckpointError",
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
    "TPNetwork",
    "TargetPropagation",
    "TargetPropagationModule",
    "UnclassifiableParameterError",
    "UnsupportedNetworkError",
    "WidthBuilder",
    "as_blocks",
    "base_shapes_from_builder",
    "compare_updates",
    "feedforward",
    "get_parametrization",
    "global_batch_sampler",
    "has_base_shapes",
    "linear_equilibrium",
    "load_base_shapes",
    "load_mnist1d",
    "local_loss",
    "local_update_cosines",
    "log_figure",
    "make_wandb_logger",
    "pc_gram_matrix",
    "reattach_base_shapes",
    "set_base_shapes",
    "sum_across_processes",
]
