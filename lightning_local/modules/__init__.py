"""The Lightning surface: ``LightningModule`` subclasses that train with a local rule.

- :class:`LocalLearningModule`: manual optimization, rule + parametrization + metrics glue;
- :class:`BackpropModule`, :class:`PredictiveCodingModule`, :class:`TargetPropagationModule`:
  one per rule;
- :class:`MuPStochasticWeightAveraging`: SWA whose learning rate is scaled per group like
  muP's;
- :class:`AtomicCheckpointIO`: checkpoints written atomically, unreadable ones raise
  :class:`~lightning_local.errors.CheckpointError`.
"""

from lightning_local.modules.backprop import BackpropModule
from lightning_local.modules.base import LocalLearningModule
from lightning_local.modules.checkpoint import AtomicCheckpointIO, check_checkpoint_file
from lightning_local.modules.predictive_coding import PredictiveCodingModule
from lightning_local.modules.target_propagation import TargetPropagationModule
from lightning_local.modules.weight_averaging import MuPStochasticWeightAveraging

__all__ = [
    "AtomicCheckpointIO",
    "BackpropModule",
    "LocalLearningModule",
    "MuPStochasticWeightAveraging",
    "PredictiveCodingModule",
    "TargetPropagationModule",
    "check_checkpoint_file",
]
