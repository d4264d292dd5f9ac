"""Predictive coding as a :class:`LocalLearningModule` (docs/math.md §1).

Energy (per-sample sum over the batch), states ``x_l`` at block outputs, ``mu_l = f_l(x_{l-1})``:

    F(x; W) = sum_{l<L} (gamma_l / 2) ||x_l - mu_l||^2  +  gamma_L * loss(mu_L, y)

Inference from the feedforward states (F-ini) with the chosen schedule, then the weight update
``-eta_l dF/dW_l / B``. The output weight actually used is the parametrization's
``gamma_L = gamma_L' m^{-g}`` (``m = M / M_base``; ``gamma_L'`` is ``output_weight``, ``g`` is
``output_weight_exponent``; SP leaves it at ``gamma_L'``). The settings are those of
:class:`~lightning_local.rules.predictive_coding.PredictiveCodingSettings`.
"""

from __future__ import annotations

from lightning_local.modules.base import LocalLearningModule
from lightning_local.rules.predictive_coding import PredictiveCoding

__all__ = ["PredictiveCodingModule"]


class PredictiveCodingModule(LocalLearningModule):
    """Predictive coding with SI / simultaneous / run-to-tolerance inference and FPA.

    With SI (one sweep), FPA, ``inference_lr = hidden_weights = 1`` the update is exactly
    ``gamma_L`` times backprop's.
    """

    rule_class = PredictiveCoding
    progress_bar_metrics = ("energy_after",)

    def effective_output_weight(self) -> float:
        """``gamma_L`` used by the rule: the parametrization's width scaling of ``gamma_L'``."""
        return float(self.rule.output_weight)
