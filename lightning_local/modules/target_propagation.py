"""Target propagation (TP / DTP) as a :class:`LocalLearningModule` (spec section 2).

The module holds a :class:`~lightning_local.rules.target_propagation.TPNetwork`: the forward
network plus feedback maps ``g_2 .. g_L`` built from its blocks, so base shapes, the init
rescale, the optimizer's parameter groups, checkpoints and DDP all see both. TP's muP
(b = (0, 1/2, 1/2), c = (0, 1, 1)) applies to feedback weights by their own shapes.

One optimizer, one ``global_step`` per batch. With ``feedback_steps = k`` the first ``k - 1``
feedback steps are feedback-only steps of that optimizer (not counted in ``global_step``); the
k-th shares the forward step. During the first ``feedback_pretrain_epochs`` epochs only the
feedback trains (``k`` steps per batch, the last counted, so ``global_step`` still counts
batches).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor, nn

from lightning_local.distributed import sum_across_processes
from lightning_local.errors import LocalLearningError
from lightning_local.modules.base import LocalLearningModule, _network_from_spec, network_spec
from lightning_local.parametrization import set_base_shapes
from lightning_local.rules.target_propagation import TargetPropagation, TPNetwork

__all__ = ["TargetPropagationModule"]


class TargetPropagationModule(LocalLearningModule):
    """TP or DTP with closed-form, noisy-reconstruction or fixed feedback.

    Args (besides those of :class:`LocalLearningModule`):
        variant: ``"dtp"`` (difference-corrected targets) or ``"tp"``.
        beta: output target step size, ``tau_L = f - beta * d loss / d f``.
        feedback: ``"linear"`` or ``"nonlinear"`` feedback maps.
        feedback_training: ``"ridge"`` (closed form per batch), ``"noisy"`` (noisy
            reconstruction loss) or ``"none"`` (fixed random feedback).
        ridge: ``mu'``; layer ``l`` uses ``mu_l = mu' * n_l``.
        ridge_noise: noise level of the closed form (its expected noisy reconstruction loss;
            0 = the plain batch ridge).
        noise_std: reconstruction noise standard deviation ``s``.
        feedback_steps: ``k`` feedback steps per batch (noisy reconstruction).
        feedback_pretrain_epochs: epochs that train the feedback only, at the start.
        layer_weights: ``w_l`` of the local losses (default 1).
        compute_bp_angle: log the angle between each layer's TP update and backprop's.
        input_shape: per-sample input shape, for convolutional networks that are not a
            :class:`~lightning_local.models.CNN` (whose shape is known).
    """

    rule_name = "tp"
    progress_bar_metrics = ("local_loss_total", "feedback_loss")

    def __init__(
        self,
        network: nn.Module | Mapping[str, Any] | None = None,
        *,
        variant: Literal["tp", "dtp"] = "dtp",
        beta: float = 0.5,
        feedback: Literal["linear", "nonlinear"] = "linear",
        feedback_training: Literal["ridge", "noisy", "none"] = "ridge",
        ridge: float = 0.1,
        ridge_noise: float = 0.0,
        noise_std: float = 0.1,
        feedback_steps: int = 1,
        feedback_pretrain_epochs: int = 0,
        layer_weights: Sequence[float] | None = None,
        compute_bp_angle: bool = False,
        input_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(None, **kwargs)
        self._rule_settings = dict(
            variant=variant, beta=beta, feedback=feedback, feedback_training=feedback_training,
            ridge=ridge, ridge_noise=ridge_noise, noise_std=noise_std,
            feedback_steps=feedback_steps,
            layer_weights=layer_weights, compute_bp_angle=compute_bp_angle,
        )
        rule = self.build_rule()  # fails on bad settings now, not at the first step
        pretrain = int(feedback_pretrain_epochs)
        if pretrain < 0 or (pretrain and feedback_training != "noisy"):
            raise LocalLearningError(
                f"feedback_pretrain_epochs={feedback_pretrain_epochs}: pre-training trains the "
                "feedback by gradient and needs feedback_training='noisy' (closed-form "
                "feedback is fitted on every batch anyway). Fix: feedback_pretrain_epochs=0, or "
                "feedback_training='noisy'."
            )
        self.feedback_pretrain_epochs = pretrain
        if isinstance(network, Mapping):
            network = _network_from_spec(network)
        if network is not None:
            spec = network_spec(network)
            if spec is not None:  # the forward network; load_from_checkpoint rebuilds the rest
                self.hparams["network"] = spec
                self._hparams_initial["network"] = spec
            self.network = rule.build_network(network, input_shape)
            self.apply_parametrization()

    def build_rule(self) -> TargetPropagation:
        return TargetPropagation(loss=self.loss_name, **self._rule_settings)

    def _attach_base_shapes(self, module: nn.Module) -> None:
        if isinstance(module, TPNetwork) and self.base_shapes is None:
            set_base_shapes(module, self.base_width)  # TPNetwork.with_width builds base, delta
        else:
            super()._attach_base_shapes(module)

    def setup(self, stage: str) -> None:
        """Apply the parametrization; under DDP, sum the ridge Grams and feedback-step gradients
        over processes."""
        super().setup(stage)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        self.rule.all_reduce_sum = sum_across_processes if distributed else None

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``k - 1`` feedback-only steps, then the joint step (feedback only while pre-training)."""
        rule = self.rule
        pretraining = self.current_epoch < self.feedback_pretrain_epochs
        inner_steps = rule.feedback_steps - (0 if pretraining else 1)
        if inner_steps == 0:
            return super().training_step(batch, batch_idx)
        inputs, _ = self._split_batch(batch)
        optimizer, network = self.optimizers(), self.network_for_rule()
        for step in range(inner_steps):
            counted = pretraining and step == inner_steps - 1  # global_step counts the batch
            loss = rule.feedback_step(
                network, inputs, optimizer if counted else optimizer.optimizer
            )
        if not pretraining:
            return super().training_step(batch, batch_idx)
        self.log("train/feedback_loss", loss.float(), prog_bar=True, batch_size=inputs.shape[0])
        return loss
