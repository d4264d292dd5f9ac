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

from lightning_local.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNIST1DDataModule,
    load_mnist1d,
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
from lightning_local.losses import OutputLoss
from lightning_local.models import CNN, MLP, WidthBuilder
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
    local_loss,
)

__version__ = "0.1.0"

__all__ = [
    "CNN",
    "MLP",
    "SP",
    "Backprop",
    "CIFAR10DataModule",
    "CheckpointError",
    "DatasetNotFoundError",
    "FashionMNISTDataModule",
    "InferenceResult",
    "LocalLearningError",
    "LocalRule",
    "MNIST1DDataModule",
    "MissingBaseShapesError",
    "MuP",
    "NonFiniteEnergyError",
    "OutputLoss",
    "Parametrization",
    "PredictiveCoding",
    "ShapeMismatchError",
    "StepResult",
    "UnclassifiableParameterError",
    "UnsupportedNetworkError",
    "WidthBuilder",
    "as_blocks",
    "base_shapes_from_builder",
    "feedforward",
    "get_parametrization",
    "has_base_shapes",
    "load_base_shapes",
    "load_mnist1d",
    "local_loss",
    "reattach_base_shapes",
    "set_base_shapes",
]
