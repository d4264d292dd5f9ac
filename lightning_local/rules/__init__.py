"""Learning rules in plain PyTorch: one rule per file, all on the same network view.

Each rule declares its settings once (a frozen dataclass, the rule's ``Settings``) and
registers itself in :data:`RULES` by name.
"""

from __future__ import annotations

from lightning_local.errors import LocalLearningError
from lightning_local.rules.backprop import Backprop, BackpropSettings
from lightning_local.rules.base import (
    RULES,
    LocalRule,
    RuleSettings,
    StepResult,
    local_loss,
)
from lightning_local.rules.predictive_coding import (
    InferenceResult,
    PredictiveCoding,
    PredictiveCodingSettings,
)
from lightning_local.rules.target_propagation import (
    TargetPropagation,
    TargetPropagationSettings,
    TPNetwork,
)

_ALIASES = {"backprop": "bp", "predictive_coding": "pc", "target_propagation": "tp"}


def get_rule_class(name: str | type[LocalRule]) -> type[LocalRule]:
    """The registered rule class called ``name`` (``"bp"``, ``"pc"``, ``"tp"`` or a long
    name such as ``"predictive_coding"``), or ``name`` itself if it is a rule class."""
    if isinstance(name, type) and issubclass(name, LocalRule):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in RULES:
        raise LocalLearningError(f"unknown rule {name!r}. Fix: use one of {sorted(RULES)}.")
    return RULES[key]


__all__ = [
    "RULES",
    "Backprop",
    "BackpropSettings",
    "InferenceResult",
    "LocalRule",
    "PredictiveCoding",
    "PredictiveCodingSettings",
    "RuleSettings",
    "StepResult",
    "TPNetwork",
    "TargetPropagation",
    "TargetPropagationSettings",
    "get_rule_class",
    "local_loss",
]
