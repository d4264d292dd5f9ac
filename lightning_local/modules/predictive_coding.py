"""Predictive coding as a :class:`LocalLearningModule` (spec section 1).

Energy (per-sample sum over the batch), states ``x_l`` at block outputs, ``mu_l = f_l(x_{l-1})``:

    F(x; W) = sum_{l<L} (gamma_l / 2) ||x_l - mu_l||^2  +  gamma_L * loss(mu_L, y)

Inference from the feedforward states (F-ini) with the chosen schedule, then the weight update
``-eta_l dF/dW_l / B``. The output weight actually used is the parametrization's
``gamma_L = gamma_L' m^{-g}`` (``m = M / M_base``; ``gamma_L'`` is ``output_weight``, ``g`` is
``output_weight_exponent``; SP leaves it at ``gamma_L'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from lightning_local.modules.base import LocalLearningModule
from lightning_local.rules.predictive_coding import PredictiveCoding

__all__ = ["PredictiveCodingModule"]


class PredictiveCodingModule(LocalLearningModule):
    """Predictive coding with SI / simultaneous / run-to-tolerance inference and FPA.

    Args (besides those of :class:`LocalLearningModule`):
        inference: ``"sequential"`` (SI: top-down sweeps), ``"simultaneous"`` (T gradient
            steps on all states) or ``"tolerance"`` (steps until the relative energy decrease
            falls under ``tolerance``, ``inference_steps`` as the cap).
        inference_steps: sweeps (SI), steps (simultaneous) or the cap (tolerance).
        inference_lr: state step sizes ``kappa_l`` (one number or one per hidden layer).
        state_momentum: momentum of the gradient descent on states.
        fixed_prediction: the fixed prediction assumption (feedforward predictions in the
            weight update).
        output_weight: ``gamma_L'``, the output weight before width scaling.
        hidden_weights: ``gamma_l`` of the hidden layers (one number or one per layer).
        tolerance: stopping threshold of the ``"tolerance"`` schedule.

    With SI (one sweep), FPA, ``inference_lr = hidden_weights = 1`` the update is exactly
    ``gamma_L`` times backprop's.
    """

    rule_name = "pc"
    progress_bar_metrics = ("energy_after",)

    def __init__(
        self,
        network: nn.Module | None = None,
        *,
        inference: Literal["sequential", "simultaneous", "tolerance"] = "sequential",
        inference_steps: int = 1,
        inference_lr: float | Sequence[float] = 1.0,
        state_momentum: float = 0.0,
        fixed_prediction: bool = True,
        output_weight: float = 1.0,
        hidden_weights: float | Sequence[float] = 1.0,
        tolerance: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(network, **kwargs)
        self.output_weight = float(output_weight)
        self._rule_settings = dict(
            inference=inference,
            inference_steps=inference_steps,
            inference_lr=inference_lr,
            state_momentum=state_momentum,
            fixed_prediction=fixed_prediction,
            hidden_weights=hidden_weights,
            tolerance=tolerance,
        )
        # fail on bad settings now, not at the first training step
        PredictiveCoding(self.loss_name, output_weight=self.output_weight, **self._rule_settings)

    def effective_output_weight(self) -> float:
        """``gamma_L`` used by the rule: the parametrization's width scaling of ``gamma_L'``."""
        return self.parametrization.output_weight(
            self.output_weight, self.parametrized_modules(), rule=self.rule_name
        )

    def build_rule(self) -> PredictiveCoding:
        return PredictiveCoding(
            loss=self.loss_name,
            output_weight=self.effective_output_weight(),
            **self._rule_settings,
        )
