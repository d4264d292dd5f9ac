"""Target propagation (TP) and difference target propagation (DTP), docs/math.md §2.

Forward blocks ``f_l`` (``h_l = f_l(h_{l-1})``, ``f = h_L``) and feedback maps ``g_l`` for
``l = 2 .. L`` (``g_l`` maps layer ``l`` back to layer ``l-1``). Per batch:

1. feedforward ``h_0 .. h_L``;
2. feedback: the closed-form ridge optimum on the batch (optionally of the expected noisy
   reconstruction loss, ``ridge_noise``), or gradient steps on the DTP noisy reconstruction
   loss ``1/2 ||g_l(f_l(h_{l-1} + xi)) - (h_{l-1} + xi)||^2``, ``xi ~ N(0, s^2)``, or fixed
   random feedback. (Difference reconstruction, DRL, is not implemented: it trains each
   ``g_l`` through the whole feedback chain above it);
3. targets: ``tau_L = f - beta * d loss / d f``; TP ``tau_{l-1} = g_l(tau_l)``, DTP
   ``tau_{l-1} = h_{l-1} + g_l(tau_l) - g_l(h_l)``;
4. forward update from the local losses ``sum_l (w_l / 2B) ||tau_l - f_l(h_{l-1})||^2`` with
   detached targets and inputs. The last layer's gradient is ``beta`` times backprop's.

The surrogate returned by :meth:`TargetPropagation.training_loss` is that local loss plus (for
``feedback_training="noisy"``) the batch-mean reconstruction loss: one scalar, one backward,
one optimizer with forward and feedback parameter groups, one all-reduce under DDP.
With ``feedback_steps = k > 1`` the first ``k - 1`` feedback steps run before the targets are
built, as feedback-only steps of the same optimizer (:meth:`TargetPropagation.feedback_step`,
whose gradients are summed over processes by the rule's ``all_reduce_sum``);
the k-th shares the forward step. So targets always come from the feedback after ``k - 1``
steps on this batch, and closed-form feedback is fitted before the targets.

Under data parallelism (:attr:`~lightning_local.rules.base.LocalRule.process_layout`, ``N``
processes at batch ``B``) the noise ``xi`` is drawn per global sample: every process draws the
``(NB, ...)`` noise one process at ``NB`` draws and keeps its own rows
(:meth:`~lightning_local.rules.base.ProcessLayout.global_randn_like`), so ``N`` processes at
``B`` train exactly like one at ``NB`` and the global batch sees ``NB`` independent noises.

Host synchronizations: a step reads the device once, for its checks (labels in range, a
finite surrogate), after the labels became the float target matrix once. The inference step
that :meth:`~lightning_local.rules.base.LocalRule.compile_inference` compiles is step 3, the
targets (:meth:`TargetPropagation._target_step`); the feedforward pass and the feedback fits
(ridge solves, noisy reconstruction) stay eager: they are a few large operations each (a
matmul per layer, a linear solve, or one autograd pass), which compiling would not speed up,
and the closed form writes the feedback weights in place between them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_local.diagnostics.alignment import update_alignment
from lightning_local.diagnostics.measures import rms
from lightning_local.errors import LocalLearningError, UnsupportedNetworkError
from lightning_local.losses import LossName, OutputLoss
from lightning_local.models import CNN, CNN1d
from lightning_local.network import as_blocks, feedforward
from lightning_local.rules._feedback import (
    FeedbackKind,
    build_feedback,
    linear_map,
    noise_gram,
    ridge_solution,
)
from lightning_local.rules.base import (
    LocalRule,
    RuleSettings,
    StepChecks,
    StepResult,
    full_precision,
    local_loss,
    setting,
)

__all__ = ["TPNetwork", "TargetPropagation", "TargetPropagationSettings"]

FeedbackTraining = Literal["ridge", "noisy", "none"]


class TPNetwork(nn.Module):
    """A forward network and its feedback maps, in one module tree.

    ``blocks`` is the forward network (so :func:`~lightning_local.network.as_blocks` sees its
    blocks and muP base shapes cover both), ``feedback[l - 2]`` is ``g_l``. Built from a width
    builder (e.g. :class:`~lightning_local.models.MLP`), :meth:`with_width` rebuilds both at
    another width, which is what base and delta shapes are made from.

    Args:
        network: the forward network (``nn.Sequential`` of blocks, or a module with ``blocks``).
        feedback: ``"linear"``, ``"nonlinear"`` (built from the blocks, see
            :func:`~lightning_local.rules._feedback.build_feedback`) or your own
            ``nn.ModuleList`` of ``L - 1`` maps.
        input_shape: per-sample input shape, needed for convolutional networks other than
            :class:`~lightning_local.models.CNN` (whose shape is read off its config).
        trainable_feedback: whether feedback parameters take gradients (``False`` for feedback
            fitted in closed form or kept fixed).
        sigma: feedback init scale.
    """

    def __init__(
        self,
        network: nn.Module,
        feedback: FeedbackKind | nn.ModuleList = "linear",
        input_shape: Sequence[int] | None = None,
        trainable_feedback: bool = True,
        sigma: float = 1.0,
    ) -> None:
        super().__init__()
        blocks = as_blocks(network)
        is_list = isinstance(network, (nn.Sequential, nn.ModuleList))
        self.blocks = network if is_list else nn.Sequential(*blocks)
        self.config = dict(
            feedback=feedback if isinstance(feedback, str) else None,
            input_shape=input_shape, trainable_feedback=trainable_feedback, sigma=sigma,
        )
        if input_shape is None and isinstance(network, CNN):
            size = network.config["image_size"]
            input_shape = (network.config["in_channels"], size, size)
        if input_shape is None and isinstance(network, CNN1d):
            channels, length = network.config["in_channels"], network.config["length"]
            input_shape = (length,) if channels == 1 else (channels, length)
        if isinstance(feedback, str):
            feedback = build_feedback(blocks, feedback, input_shape, sigma)
        elif not isinstance(feedback, nn.ModuleList) or len(feedback) != len(blocks) - 1:
            raise UnsupportedNetworkError(
                f"feedback must be 'linear', 'nonlinear' or an nn.ModuleList of "
                f"{len(blocks) - 1} maps (g_2 .. g_L) for this {len(blocks)}-block network. "
                "Fix: pass feedback='linear' to build the maps from the blocks."
            )
        self.feedback = feedback.requires_grad_(trainable_feedback)

    def forward(self, inputs: Tensor) -> Tensor:
        return feedforward(as_blocks(self), inputs)[-1]

    @property
    def width(self) -> int:
        return int(self.blocks.width)

    def with_width(self, width: int, device: torch.device | str | None = None) -> TPNetwork:
        """The same forward architecture and feedback kind at width ``width``."""
        if not hasattr(self.blocks, "with_width") or self.config["feedback"] is None:
            raise UnsupportedNetworkError(
                "with_width needs a forward network built by a width builder (e.g. MLP, CNN) "
                "and feedback built from it ('linear' or 'nonlinear'). Fix: build the network "
                "with lightning_local.models, or make base shapes from your own models."
            )
        network = self.blocks.with_width(width, device)
        if device is None:
            return TPNetwork(network, **self.config)
        with torch.device(device):
            return TPNetwork(network, **self.config)


@dataclass(frozen=True)
class TargetPropagationSettings(RuleSettings):
    """The settings of :class:`TargetPropagation` (see the module docstring for the math)."""

    variant: Literal["tp", "dtp"] = setting(
        "dtp", "'dtp' (difference-corrected targets) or 'tp'")
    beta: float = setting(0.5, "output target step size: tau_L = f - beta d loss / d f")
    feedback: FeedbackKind = setting("linear", "feedback maps: 'linear' or 'nonlinear'")
    feedback_training: FeedbackTraining = setting(
        "ridge", "'ridge' (closed form per batch), 'noisy' (noisy reconstruction loss) or "
        "'none' (fixed random feedback)")
    ridge: float = setting(0.1, "mu' of the closed form; layer l uses mu_l = mu' n_l")
    ridge_noise: float = setting(
        0.0, "noise level s of the closed form (its expected noisy reconstruction loss; 0: "
        "plain batch ridge)")
    noise_std: float = setting(0.1, "noise standard deviation s of the reconstruction loss")
    feedback_steps: int = setting(1, "k noisy-reconstruction feedback steps per batch")
    layer_weights: list[float] | None = setting(
        None, "weights w_l of the local losses, one per block (default 1)")
    compute_bp_angle: bool = setting(
        False, "also log the angle between each layer's update and backprop's gradient",
        affects_result=False)

    def __post_init__(self) -> None:
        for key, allowed in (
            ("variant", ("tp", "dtp")),
            ("feedback", ("linear", "nonlinear")),
            ("feedback_training", ("ridge", "noisy", "none")),
        ):
            if getattr(self, key) not in allowed:
                raise LocalLearningError(
                    f"unknown {key} {getattr(self, key)!r}. Fix: use one of {allowed}."
                )
        if self.feedback_training == "ridge" and self.feedback != "linear":
            raise LocalLearningError(
                "closed-form ridge feedback needs linear feedback maps. Fix: feedback='linear', "
                "or feedback_training='noisy' for nonlinear feedback."
            )
        steps = self.feedback_steps
        if (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1
                or (self.feedback_training != "noisy" and steps != 1)):
            raise LocalLearningError(
                f"feedback_steps={steps!r}: it counts noisy-reconstruction steps per batch "
                "and must be a whole number >= 1, and 1 for ridge or fixed feedback. Fix: "
                "feedback_steps=1, or feedback_training='noisy'."
            )
        values = (self.beta, self.ridge, self.noise_std, self.ridge_noise)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values) or (
            self.beta <= 0 or self.ridge <= 0 or self.noise_std < 0 or self.ridge_noise < 0
        ):
            raise LocalLearningError(
                f"beta={self.beta}, ridge={self.ridge}, noise_std={self.noise_std}, "
                f"ridge_noise={self.ridge_noise}: beta and ridge must be positive, the noise "
                "levels non-negative, all finite. Fix: e.g. beta=0.5, ridge=0.1, "
                "noise_std=0.1, ridge_noise=0."
            )
        for name in ("beta", "ridge", "noise_std", "ridge_noise"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.layer_weights is not None:
            object.__setattr__(self, "layer_weights", [float(w) for w in self.layer_weights])
        object.__setattr__(self, "compute_bp_angle", bool(self.compute_bp_angle))


class TargetPropagation(LocalRule):
    """TP / DTP on a :class:`TPNetwork` (build one with :meth:`build_network`).

    Args:
        loss: the output loss (``"mse"`` or ``"cross_entropy"``).
        settings: a :class:`TargetPropagationSettings`, or its fields as keywords:
            ``variant``, ``beta``, ``feedback``, ``feedback_training``, ``ridge`` (``mu'``;
            layer ``l`` uses ``mu_l = mu' * n_l`` with ``n_l`` the size of ``h_l``, so the
            penalty keeps pace with the Gram eigenvalues ``H_l^T H_l = Theta(n_l)``: the
            ridge scales like the width, docs/math.md §2.5), ``ridge_noise`` (the closed form
            then minimizes the expected noisy reconstruction loss on the batch; large values
            give the pseudo-inverse ``W_l^+`` for an affine block, see :meth:`fit_feedback`),
            ``noise_std``, ``feedback_steps`` (``k``), ``layer_weights`` (``w_l``) and
            ``compute_bp_angle`` (one extra forward and backward pass).

    Under data parallelism :attr:`~lightning_local.rules.base.LocalRule.process_layout` sums
    the ridge Gram sums and the gradients of :meth:`feedback_step` over processes (one call
    each) and places this process's noise in the global batch's.
    """

    name = "tp"
    Settings = TargetPropagationSettings
    inference_method = "_target_step"
    full_precision_update = True
    settings: TargetPropagationSettings

    def __init__(
        self,
        loss: LossName | OutputLoss = "mse",
        settings: TargetPropagationSettings | None = None,
        **values: Any,
    ) -> None:
        super().__init__(loss, settings, **values)

    def prepare_network(
        self, network: nn.Module, input_shape: Sequence[int] | None = None
    ) -> TPNetwork:
        """``network`` with feedback maps (:meth:`build_network`); a :class:`TPNetwork` as is."""
        if isinstance(network, TPNetwork):
            self._parts(network)  # the feedback must fit this rule's settings
            return network
        return self.build_network(network, input_shape)

    def build_network(
        self, network: nn.Module, input_shape: Sequence[int] | None = None
    ) -> TPNetwork:
        """Wrap ``network`` with feedback maps built from its blocks for this rule's settings."""
        trainable = self.feedback_training == "noisy"
        wrapped = TPNetwork(network, self.feedback, input_shape, trainable_feedback=trainable)
        if self.feedback_training == "ridge":
            self._linear_maps(wrapped.feedback)  # fail now rather than at the first step
        return wrapped

    def _parts(self, network: nn.Module) -> tuple[list[nn.Module], nn.ModuleList]:
        blocks, feedback = as_blocks(network), getattr(network, "feedback", None)
        if not isinstance(feedback, nn.ModuleList) or len(feedback) != len(blocks) - 1:
            raise UnsupportedNetworkError(
                f"{type(network).__name__} carries no feedback maps g_2..g_L. Fix: wrap the "
                "forward network with rule.build_network(network) and train that."
            )
        wanted = self.feedback_training == "noisy"
        if any(p.requires_grad for p in feedback.parameters()) != wanted:
            raise LocalLearningError(
                f"feedback_training={self.feedback_training!r} needs feedback parameters with "
                f"requires_grad={wanted}. Fix: build the network with this rule's "
                f"build_network(...), or call network.feedback.requires_grad_({wanted}) before "
                "creating the optimizer."
            )
        return blocks, feedback

    def _weights(self, depth: int) -> list[float]:
        if self.layer_weights is None:
            return [1.0] * depth
        if len(self.layer_weights) != depth:
            raise LocalLearningError(
                f"layer_weights has {len(self.layer_weights)} entries for {depth} blocks. Fix: "
                "give one weight per block."
            )
        return self.layer_weights

    @staticmethod
    def _linear_maps(feedback: nn.ModuleList) -> list[nn.Linear]:
        maps = [linear_map(g) for g in feedback]
        if any(m is None for m in maps):
            raise UnsupportedNetworkError(
                "closed-form ridge feedback needs linear feedback maps (an nn.Linear, "
                "optionally followed by Unflatten); convolutional or nonlinear feedback has none. "
                "Fix: feedback_training='noisy'."
            )
        return maps

    @torch.no_grad()
    def fit_feedback(self, network: nn.Module, activations: Sequence[Tensor]) -> None:
        """Write the closed-form optimum ``Q_l*`` on this batch into each ``g_l``.

        ``Q_l* = argmin_Q ||Q H_l - H_{l-1}||^2 + mu_l ||Q||^2``, plus, with ``ridge_noise = s
        > 0``, the expected noise term ``s^2 sum_b ||Q D_b W_l - I||^2`` of the noisy
        reconstruction loss (exact for an affine block, first order through the activation
        slope ``D_b`` otherwise; see :func:`~lightning_local.rules._feedback.noise_gram`).
        """
        blocks, feedback = as_blocks(network), network.feedback
        maps = self._linear_maps(feedback)
        features = [h.flatten(1) for h in activations[2:]]
        ridges = [self.ridge * x.shape[1] for x in features]
        reconstruct = [h.flatten(1) for h in activations[1:-1]]
        noise = None
        if self.ridge_noise > 0:
            noise = [noise_gram(block, h, self.ridge_noise)
                     for block, h in zip(blocks[1:], activations[1:-1])]
        solutions = ridge_solution(features, reconstruct, ridges, self.all_reduce_sum, noise)
        for linear, solution in zip(maps, solutions):
            linear.weight.copy_(solution)

    def _reconstruction_sum(
        self, blocks: Sequence[nn.Module], feedback: nn.ModuleList, activations: Sequence[Tensor]
    ) -> Tensor:
        """``sum_b sum_l 1/2 ||g_l(f_l(h_{l-1} + xi)) - (h_{l-1} + xi)||^2``.

        ``xi ~ N(0, s^2)`` independently per global sample, layer and entry, drawn from the
        default generator for the whole global batch (this process's rows, see
        :meth:`~lightning_local.rules.base.ProcessLayout.global_randn_like`; in one process
        ``s * randn_like(h_{l-1})``). ``f_l`` runs without grad, so only the feedback
        parameters get gradients.
        """
        total = activations[0].new_zeros(())
        layout = self.process_layout
        with full_precision(activations[0]):  # the feedback fit: fp32 under mixed precision
            for index, g in enumerate(feedback, start=1):
                noise = layout.global_randn_like(activations[index])
                noisy = activations[index] + self.noise_std * noise
                with torch.no_grad():
                    forward = blocks[index](noisy)
                total = total + 0.5 * (g(forward) - noisy).pow(2).sum()
        return total

    def feedback_step(
        self, network: nn.Module, inputs: Tensor, optimizer: torch.optim.Optimizer
    ) -> Tensor:
        """One feedback-only optimizer step on the noisy reconstruction loss; returns its mean.

        Gradients of the batch sum go through :attr:`all_reduce_sum` (one call) and are divided
        by the global batch size; forward parameters keep ``grad = None``, so the optimizer
        leaves them (and their optimizer state) untouched.
        """
        blocks, feedback = self._parts(network)
        if self.feedback_training != "noisy":
            raise LocalLearningError("feedback_step trains feedback by gradient; this rule has "
                                     f"feedback_training={self.feedback_training!r}.")
        with torch.no_grad(), full_precision(inputs):
            activations = feedforward(blocks, inputs)
        params = list(feedback.parameters())
        total = self._reconstruction_sum(blocks, feedback, activations)
        with full_precision(inputs):
            grads = torch.autograd.grad(total, params)
        flat = torch.cat([g.flatten() for g in grads] + [total.detach().view(1),
                                                        total.new_full((1,), inputs.shape[0])])
        if self.all_reduce_sum is not None:
            flat = self.all_reduce_sum(flat)
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, flat[:-2].split([p.numel() for p in params])):
            p.grad = g.view_as(p) / flat[-1]
        optimizer.step()
        return flat[-2] / flat[-1]

    def step(
        self, network: nn.Module, inputs: Tensor, targets: Tensor, optimizer: torch.optim.Optimizer
    ) -> StepResult:
        """``k - 1`` feedback steps, then one joint step of forward and feedback weights."""
        for _ in range(self.feedback_steps - 1):
            self.feedback_step(network, inputs, optimizer)
        return super().step(network, inputs, targets, optimizer)

    @torch.no_grad()
    def _targets(
        self, feedback: nn.ModuleList, activations: Sequence[Tensor], output_grad: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Targets ``[tau_1, ..., tau_L]`` and reconstruction errors of ``g_2 .. g_L``."""
        depth = len(activations) - 1
        targets = [activations[-1] - self.beta * output_grad]
        errors = []
        for layer in range(depth, 1, -1):
            g, below = feedback[layer - 2], activations[layer - 1]
            reconstruction = g(activations[layer])
            errors.append(0.5 * (reconstruction - below).pow(2).sum() / below.shape[0])
            if self.variant == "dtp":
                targets.append(below + g(targets[-1]) - reconstruction)
            else:
                targets.append(g(targets[-1]))
        return targets[::-1], errors[::-1]

    def _target_step(
        self, feedback: nn.ModuleList, activations: list[Tensor], targets: Tensor
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The inference step (what :meth:`compile_inference` compiles): the target matrix
        ``y`` (one-hot labels, unchecked: the step checks their range), then
        :meth:`_targets` from ``d loss / d f`` at ``f = h_L``. Returns ``(y, targets,
        reconstruction errors)``; runs under the caller's ``no_grad``."""
        matrix = self.loss.target_matrix(activations[-1], targets, validate=False)
        output_grad = self.loss.grad(activations[-1], matrix)
        return matrix, *self._targets(feedback, activations, output_grad)

    @torch.no_grad()
    def _feedforward_and_targets(
        self, network: nn.Module, inputs: Tensor, targets: Tensor
    ) -> tuple[list[Tensor], Tensor, list[Tensor], list[Tensor]]:
        """``(h_0 .. h_L, y, [tau_1 .. tau_L], reconstruction errors)`` for a batch."""
        blocks, feedback = self._parts(network)
        with full_precision(inputs):  # targets and feedback fits: fp32 under mixed precision
            activations = feedforward(blocks, inputs)
            if self.feedback_training == "ridge":
                self.fit_feedback(network, activations)
            return activations, *self._inference_step()(feedback, activations, targets)

    def layer_targets(self, network: nn.Module, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        """The targets ``[tau_1, ..., tau_L]`` that :meth:`training_loss` builds for a batch.

        Closed-form feedback is fitted on the batch first (and stays written in the network).
        """
        activations, _, layer_targets, _ = self._feedforward_and_targets(network, inputs, targets)
        self.loss.check_labels(activations[-1], targets)
        return layer_targets

    def rule_loss(self, network: nn.Module, inputs: Tensor, targets: Tensor) -> StepResult:
        blocks, feedback = self._parts(network)
        activations, matrix, layer_targets, errors = self._feedforward_and_targets(
            network, inputs, targets
        )
        output = activations[-1]
        checks = StepChecks()  # read once, at the end, before anything touches the weights
        checks.labels(self.loss, output, targets)
        loss = self.loss.mean(output, matrix)
        weights = self._weights(len(blocks))
        forward_loss = local_loss(blocks, activations[:-1], layer_targets, weights)
        surrogate = forward_loss
        if self.feedback_training == "noisy":
            reconstruction = self._reconstruction_sum(blocks, feedback, activations)
            surrogate = surrogate + reconstruction / inputs.shape[0]
        checks.finite(surrogate, "the target-propagation local loss")
        batch = inputs.shape[0]
        metrics = {
            "local_loss": torch.stack([
                w * 0.5 * (tau - h).pow(2).sum() / batch
                for w, tau, h in zip(weights, layer_targets, activations[1:])
            ]),
            # the forward local losses summed: TP's counterpart of PC's energy
            "local_loss_total": forward_loss.detach(),
            "reconstruction_error": torch.stack(errors),
            "target_norm": torch.stack([rms(tau) for tau in layer_targets]),
        }
        if self.feedback_training == "noisy":
            metrics["feedback_loss"] = reconstruction.detach() / batch
        if self.compute_bp_angle:
            metrics["bp_angle"] = self._bp_angles(blocks, inputs, matrix, forward_loss)
        checks.verify()
        return StepResult(loss=loss, surrogate=surrogate, output=output, metrics=metrics)

    def _bp_angles(
        self, blocks: Sequence[nn.Module], inputs: Tensor, targets: Tensor, forward_loss: Tensor
    ) -> Tensor:
        """Per block, the angle in degrees between the TP and backprop weight gradients.

        Measured by :func:`~lightning_local.diagnostics.alignment.update_alignment` (NaN for a
        block without trainable parameters), docs/math.md §2.9 and §4.5.
        """
        groups = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
        params = [p for group in groups for p in group]
        tp = torch.autograd.grad(forward_loss, params, retain_graph=True, allow_unused=True)
        with torch.enable_grad():
            bp_loss = self.loss.mean(feedforward(blocks, inputs)[-1], targets)
        bp = torch.autograd.grad(bp_loss, params, allow_unused=True)
        return update_alignment(groups, tp, bp, measure="angle")
