"""Target propagation (TP / DTP) as a :class:`LocalLearningModule` (docs/math.md §2).

The rule trains a :class:`~lightning_local.rules.target_propagation.TPNetwork`: the forward
network plus feedback maps ``g_2 .. g_L`` built from its blocks, so base shapes, the init
rescale, the optimizer's parameter groups, checkpoints and DDP all see both. A wrapped
network (``network=...``) is stored as that ``TPNetwork`` (``self.network``); in the subclass
style (``self.net = ...``) only the feedback maps are added, as ``_lightning_local_extra``.
Under muP a network that is not a width builder needs base shapes for the feedback too:
override :meth:`~lightning_local.modules.base.LocalLearningModule.width_factory`
(``return make_net``) or pass ``base_shapes``. TP's muP
(b = (0, 1/2, 1/2), c = (0, 1, 1)) applies to feedback weights by their own shapes.

One optimizer, one ``global_step`` per batch. With ``feedback_steps = k`` the first ``k - 1``
feedback steps are feedback-only steps of that optimizer (not counted in ``global_step``); the
k-th shares the forward step. During the first ``feedback_pretrain_epochs`` epochs only the
feedback trains (``k`` steps per batch, the last counted, so ``global_step`` still counts
batches).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_local.errors import LocalLearningError
from lightning_local.modules.base import LocalLearningModule
from lightning_local.rules.base import RuleSettings, setting
from lightning_local.rules.target_propagation import TargetPropagation

__all__ = ["TargetPropagationModule", "TargetPropagationModuleSettings"]


@dataclass(frozen=True)
class TargetPropagationModuleSettings(RuleSettings):
    """The TP module's own settings (the rule's are in ``TargetPropagationSettings``)."""

    feedback_pretrain_epochs: int = setting(
        0, "epochs at the start that train the feedback only (needs feedback_training='noisy')")
    input_shape: Sequence[int] | None = setting(
        None, "per-sample input shape, for convolutional networks that are not a "
        "lightning_local.models.CNN (whose shape is known)")

    def __post_init__(self) -> None:
        epochs = self.feedback_pretrain_epochs
        if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 0:
            raise LocalLearningError(
                f"feedback_pretrain_epochs must be a whole number >= 0, got {epochs!r}."
            )
        object.__setattr__(self, "feedback_pretrain_epochs", int(epochs))
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))


class _ScaledGradients:
    """The Lightning optimizer for a feedback step whose gradients are set by hand, unscaled.

    Under a loss scaler Lightning's ``step`` unscales the gradients (and needs the scaler to
    have scaled something this iteration): they are multiplied by the scale first, as
    ``manual_backward`` would have, so the step applies them as computed, and the scaler checks
    them and updates its scale as for any step.
    """

    def __init__(self, optimizer: Any, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = optimizer, scaler

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> Any:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = self.scaler.scale(p.grad)
        return self.optimizer.step()


class TargetPropagationModule(LocalLearningModule):
    """TP or DTP with closed-form, noisy-reconstruction or fixed feedback.

    The settings are those of
    :class:`~lightning_local.rules.target_propagation.TargetPropagationSettings` and
    :class:`TargetPropagationModuleSettings`.
    """

    rule_class = TargetPropagation
    module_settings = TargetPropagationModuleSettings
    progress_bar_metrics = ("local_loss_total", "feedback_loss")

    def check_settings(self) -> None:
        inner = self.rule_settings.feedback_steps > 1 or self.feedback_pretrain_epochs > 0
        if self.training_settings.accumulate_grad_batches > 1 and inner:
            raise LocalLearningError(
                "accumulate_grad_batches > 1 with feedback-only steps (feedback_steps > 1 or "
                "feedback_pretrain_epochs > 0) would step the optimizer between micro-batches. "
                "Fix: feedback_steps=1 and feedback_pretrain_epochs=0, or "
                "accumulate_grad_batches=1 with a larger batch."
            )
        if self.feedback_pretrain_epochs and self.rule_settings.feedback_training != "noisy":
            raise LocalLearningError(
                f"feedback_pretrain_epochs={self.feedback_pretrain_epochs}: pre-training trains "
                "the feedback by gradient and needs feedback_training='noisy' (closed-form "
                "feedback is fitted on every batch anyway). Fix: feedback_pretrain_epochs=0, or "
                "feedback_training='noisy'."
            )

    @property
    def feedback_pretrain_epochs(self) -> int:
        return self.extra_settings.feedback_pretrain_epochs

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``k - 1`` feedback-only steps, then the joint step (feedback only while pre-training)."""
        rule = self.rule
        pretraining = self.current_epoch < self.feedback_pretrain_epochs
        inner_steps = rule.feedback_steps - (0 if pretraining else 1)
        if inner_steps == 0:
            return super().training_step(batch, batch_idx)
        inputs, _ = self._split_batch(batch)
        optimizer, network = self.optimizers(), self.trained_network
        scaler = self._loss_scaler()
        for step in range(inner_steps):
            counted = pretraining and step == inner_steps - 1  # global_step counts the batch
            if not counted:
                step_optimizer: Any = optimizer.optimizer
            elif scaler is None:
                step_optimizer = optimizer
            else:  # Lightning's step unscales: hand it scaled gradients
                step_optimizer = _ScaledGradients(optimizer, scaler)
            loss = rule.feedback_step(network, inputs, step_optimizer)
        if not pretraining:
            return super().training_step(batch, batch_idx)
        self.log("train/feedback_loss", loss.float(), prog_bar=True, batch_size=inputs.shape[0])
        self.__dict__["_local_stepped"] = True
        return loss
