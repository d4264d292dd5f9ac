"""Learning rules in plain PyTorch: one rule per file, all on the same network view."""

from lightning_local.rules.backprop import Backprop
from lightning_local.rules.base import LocalRule, StepResult, local_loss
from lightning_local.rules.predictive_coding import InferenceResult, PredictiveCoding
from lightning_local.rules.target_propagation import TargetPropagation, TPNetwork

__all__ = [
    "Backprop",
    "InferenceResult",
    "LocalRule",
    "PredictiveCoding",
    "StepResult",
    "TPNetwork",
    "TargetPropagation",
    "local_loss",
]
