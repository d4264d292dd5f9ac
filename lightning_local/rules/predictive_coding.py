"""Predictive coding (PC): inference on value nodes, then local weight updates.

Notation (docs/math.md §0.1, §1.1). Blocks ``f_1 .. f_L``; the input ``x_0`` is clamped to
the data; hidden value nodes ``x_1 .. x_{L-1}`` sit at block outputs; predictions
``mu_l = f_l(x_{l-1})``. The energy, a per-sample *sum* over the batch, is

    F(x; W) = sum_{l<L} (gamma_l / 2) ||x_l - mu_l||^2  +  gamma_L * sum_b loss(mu_L, y)

with errors ``eps_l = x_l - mu_l`` for hidden layers and the output error
``eps_L = -d loss / d mu_L``. Its state gradient is

    dF/dx_l = gamma_l eps_l - J_{l+1}(x_l)^T (gamma_{l+1} eps_{l+1}),   l = 1 .. L-1

and inference descends it, ``x_l <- x_l - kappa_l dF/dx_l`` (SGD on states, optional momentum),
from the feedforward values (F-ini: every hidden error starts at 0). Schedules:

- ``"sequential"`` (SI): sweeps ``l = L-1 .. 1``, each layer using the freshly updated layer
  above; ``inference_steps`` sweeps (the paper's single-shot SI is one sweep);
- ``"simultaneous"``: ``inference_steps`` gradient steps on all layers at once;
- ``"tolerance"``: simultaneous steps until the relative energy decrease
  ``(F_{t-1} - F_t) / |F_{t-1}|`` falls under ``tolerance``, ``inference_steps`` as the cap.
  A step that raises the energy is not convergence: inference goes on and warns once. Under
  data parallelism (:attr:`~lightning_local.rules.base.LocalRule.process_layout`) ``F`` is the
  global batch's, ``sum_r F_r`` over the processes (one scalar all-reduce per step), so all
  ranks take the steps one process takes on the whole batch.

Weight update (batch mean): ``Delta W_l = -eta_l dF/dW_l / B``, i.e. for hidden blocks
``(gamma_l / B) (d mu_l / d W_l)^T eps_l`` and for the readout
``-(gamma_L / B) (d mu_L / d W_L)^T d loss / d mu_L``. With the fixed prediction assumption
(FPA) the predictions and their inputs are the feedforward ones (``mu_l = f_l(h_{l-1})``);
without it they are recomputed at the post-inference states (``mu_l = f_l(x_{l-1})``).

FPA, as docs/math.md §1.6 defines it, changes the weight update only: inference always descends the
energy above (live predictions). With one SI sweep this is exact backprop; with several steps or
inference to convergence the error ``x_l - h_l`` used under FPA also carries the state moves
of the layers below, so the usual choice there is ``fixed_prediction=False``.

Exactness identity: F-ini + one SI sweep + FPA with ``kappa_l = gamma_l = 1`` gives
``eps_l = -gamma_L dL/dh_l`` and so a weight update equal to ``gamma_L`` times backprop's.

Host synchronizations: the sequential and simultaneous schedules read nothing from the device
during inference (the labels become the float target matrix once, unchecked; the step checks
their range, and that the surrogate and the energy are finite, in one read at its end). The
tolerance schedule reads ``F`` after every step: stopping is a host decision.
:meth:`~lightning_local.rules.base.LocalRule.compile_inference` compiles the inference step
(:meth:`PredictiveCoding._infer`: feedforward pass, state steps, final energy, and the
predictions the weight update differentiates) into one graph for the fixed-step schedules;
the tolerance schedule runs its loop as written and compiles each step between two reads
(:meth:`PredictiveCoding._tolerance_step`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from lightning_local.diagnostics.measures import rms
from lightning_local.errors import LocalLearningError
from lightning_local.losses import LossName, OutputLoss
from lightning_local.network import as_blocks, shape_errors
from lightning_local.rules._linearize import Linearization, Linearizer, linearize, linearizer
from lightning_local.rules.base import (
    LocalRule,
    RuleSettings,
    StepChecks,
    StepResult,
    full_precision,
    local_losses,
    setting,
)

if TYPE_CHECKING:
    from lightning_local.parametrization import Parametrization

__all__ = ["InferenceResult", "PredictiveCoding", "PredictiveCodingSettings"]

Schedule = Literal["sequential", "simultaneous", "tolerance"]
_SCHEDULES = ("sequential", "simultaneous", "tolerance")


@dataclass
class InferenceResult:
    """The outcome of PC inference on a batch.

    Attributes:
        states: ``[x_0, x_1, .., x_{L-1}]`` after inference (``x_0`` is the input).
        feedforward: ``[h_0, h_1, .., h_L]``, the feedforward activations (F-ini values).
        energy_before: ``F`` at the feedforward states (per-sample sum over the batch).
        energy_after: ``F`` at the final states (per-sample sum over the batch).
        steps: inference steps (sweeps for SI) actually taken.
        energy_trace: ``F`` before each step, then after the last (tolerance schedule only;
            the global batch's ``F``, summed over processes, under a process layout).
        energy_per_layer: the terms of ``energy_after``, one per block (batch sums).
        feedforward_outputs: ``f_l(h_{l-1})`` with a graph to the parameters, per block, when
            inference kept the outputs the FPA weight update uses (``None`` otherwise, and for
            a hidden block with ``gamma_l = 0``, whose term is 0).
        state_outputs: ``f_l(x_{l-1})`` at the final states with a graph to the parameters,
            per block, when inference kept the outputs the weight update without FPA uses
            (``None`` otherwise, and for a hidden block with ``gamma_l = 0``).
        target_matrix: the targets as inference used them, a float tensor of the output's
            shape (one-hot for class labels; see
            :meth:`~lightning_local.losses.OutputLoss.target_matrix`).
    """

    states: list[Tensor]
    feedforward: list[Tensor]
    energy_before: Tensor
    energy_after: Tensor
    steps: int
    energy_trace: list[float] = field(default_factory=list)
    energy_per_layer: Tensor | None = None
    feedforward_outputs: list[Tensor | None] | None = field(default=None, repr=False)
    target_matrix: Tensor | None = field(default=None, repr=False)
    state_outputs: list[Tensor | None] | None = field(default=None, repr=False)


def _scaled(value: Tensor, factor: float) -> Tensor:
    """``factor * value``, in place (``value`` is a fresh temporary)."""
    return value if factor == 1.0 else value.mul_(factor)


def _read(value: Tensor) -> list[float]:
    """The entries of ``value`` on the host (one host synchronization): the tolerance
    schedule's stop decision."""
    return value.detach().reshape(-1).tolist()


def _per_layer(value: float | Sequence[float], count: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise LocalLearningError(
            f"{name} has {len(values)} entries but the network has {count} hidden layers. "
            f"Fix: give one value per hidden layer, or a single number."
        )
    return values


def _check_per_layer(value: Any, name: str, *, some_positive: bool) -> float | list[float]:
    """``value`` (a number or one per layer) checked finite and >= 0 (one > 0 if asked)."""
    values = [value] if isinstance(value, (int, float)) else list(value)
    bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
    if bad or (some_positive and not any(v > 0 for v in values)):
        raise LocalLearningError(
            f"{name}={value!r}: entries must be finite and >= 0"
            + (", and not all 0 (inference would not move)" if some_positive else "")
            + f". Fix: e.g. {name}=1.0, or one such number per hidden layer (0 freezes a layer)."
        )
    return float(value) if isinstance(value, (int, float)) else [float(v) for v in values]


@dataclass(frozen=True)
class PredictiveCodingSettings(RuleSettings):
    """The settings of :class:`PredictiveCoding` (see the module docstring for the math)."""

    inference: Schedule = setting(
        "sequential", "schedule: 'sequential' (SI sweeps), 'simultaneous' (T steps on all "
        "states) or 'tolerance' (steps until the relative energy decrease < tolerance)")
    inference_steps: int = setting(
        1, "sweeps (SI), steps (simultaneous) or the cap (tolerance)")
    inference_lr: float | list[float] = setting(
        1.0, "state step sizes kappa_l: one number or one per hidden layer")
    state_momentum: float = setting(0.0, "momentum of the gradient descent on states")
    fixed_prediction: bool = setting(
        True, "the fixed prediction assumption (feedforward predictions in the weight update)")
    output_weight: float = setting(
        1.0, "gamma_L' of the output loss in the energy (muP scales it to gamma_L' m^-g)")
    hidden_weights: float | list[float] = setting(
        1.0, "gamma_l of the hidden layers: one number or one per hidden layer")
    tolerance: float = setting(1e-6, "relative energy decrease that stops 'tolerance'")
    fast_path: bool = setting(
        True, "closed-form linearization of Linear(+activation) blocks (same results)",
        affects_result=False)

    def __post_init__(self) -> None:
        if self.inference not in _SCHEDULES:
            raise LocalLearningError(
                f"unknown inference schedule {self.inference!r}. Fix: use one of {_SCHEDULES}."
            )
        steps = self.inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            if isinstance(steps, float) and steps.is_integer() and steps >= 1:
                object.__setattr__(self, "inference_steps", int(steps))
            else:
                raise LocalLearningError(
                    f"inference_steps must be a whole number >= 1, got {steps!r} (0 would "
                    "leave every hidden error at 0, so only the readout would learn). Fix: e.g. "
                    "inference_steps=8, or inference_steps=1 for the single-shot SI sweep."
                )
        if not 0.0 <= self.state_momentum < 1.0:
            raise LocalLearningError(
                f"state_momentum must lie in [0, 1), got {self.state_momentum}."
            )
        if not (math.isfinite(self.output_weight) and self.output_weight > 0):
            raise LocalLearningError(
                f"output_weight must be a finite positive number, got {self.output_weight!r}. "
                "Fix: e.g. output_weight=1.0."
            )
        if not (math.isfinite(self.tolerance) and self.tolerance >= 0):
            raise LocalLearningError(
                f"tolerance must be finite and >= 0, got {self.tolerance!r}. Fix: e.g. 1e-6."
            )
        for name, positive in (("inference_lr", True), ("hidden_weights", False)):
            object.__setattr__(
                self, name, _check_per_layer(getattr(self, name), name, some_positive=positive)
            )
        for name in ("state_momentum", "output_weight", "tolerance"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("fixed_prediction", "fast_path"):
            object.__setattr__(self, name, bool(getattr(self, name)))


class PredictiveCoding(LocalRule):
    """Predictive coding with F-ini, SI / simultaneous / run-to-tolerance inference and FPA.

    Args:
        loss: output loss, ``"mse"`` (paper) or ``"cross_entropy"``.
        settings: a :class:`PredictiveCodingSettings`, or its fields as keywords:
            ``inference``, ``inference_steps``, ``inference_lr`` (``kappa_l``),
            ``state_momentum``, ``fixed_prediction`` (FPA), ``output_weight`` (``gamma_L``,
            already width-scaled here; see ``Parametrization.output_weight``),
            ``hidden_weights`` (``gamma_l``), ``tolerance``, ``fast_path``.
    """

    name = "pc"
    Settings = PredictiveCodingSettings
    inference_method = "_infer"
    full_precision_update = True
    settings: PredictiveCodingSettings

    def __init__(
        self,
        loss: LossName | OutputLoss = "mse",
        settings: PredictiveCodingSettings | None = None,
        **values: Any,
    ) -> None:
        super().__init__(loss, settings, **values)
        self._warned_energy_rise = False

    def width_scaled(
        self, parametrization: Parametrization, network: nn.Module | Sequence[nn.Module]
    ) -> PredictiveCoding:
        """The rule with ``gamma_L = gamma_L' m^{-g}`` (the parametrization's width scaling)."""
        scaled = parametrization.output_weight(self.output_weight, network, rule=self.name)
        return self if scaled == self.output_weight else self.with_settings(output_weight=scaled)

    # ------------------------------------------------------------------ energy
    def _gammas(self, hidden: int) -> list[float]:
        return _per_layer(self.hidden_weights, hidden, "hidden_weights") + [self.output_weight]

    def _output_error(self, prediction: Tensor, targets: Tensor) -> Tensor:
        """``eps_L = -d loss / d mu_L`` per sample."""
        return self.loss.residual(prediction, targets)

    def _energy_terms(
        self, blocks: Sequence[nn.Module], states: Sequence[Tensor], targets: Tensor
    ) -> Tensor:
        """Per-layer energies ``[(gamma_l/2)||eps_l||^2 .., gamma_L sum_b loss]`` (batch sums)."""
        predictions = [block(x) for block, x in zip(blocks, states)]
        return self._terms(states, predictions, targets)

    def _terms(
        self, states: Sequence[Tensor], predictions: Sequence[Tensor], targets: Tensor
    ) -> Tensor:
        """The energy's terms from predictions ``mu_l = f_l(x_{l-1})`` already computed."""
        gammas = self._gammas(len(states) - 1)
        terms = [
            0.5 * gamma * (x - mu).pow(2).sum()
            for gamma, x, mu in zip(gammas, states[1:], predictions[:-1])
        ]
        terms.append(gammas[-1] * self.loss.per_sample_sum(predictions[-1], targets))
        return torch.stack(terms)

    @torch.no_grad()
    def energy(self, network: nn.Module, states: Sequence[Tensor], targets: Tensor) -> Tensor:
        """``F(x; W)`` at ``states = [x_0 .. x_{L-1}]`` (per-sample sum over the batch)."""
        blocks = as_blocks(network)
        self._check_states(blocks, states)
        return self._energy_terms(blocks, states, targets).sum()

    def state_grads(
        self, network: nn.Module, states: Sequence[Tensor], targets: Tensor
    ) -> list[Tensor]:
        """``[dF/dx_1 .. dF/dx_{L-1}]`` at ``states`` (the simultaneous-step direction)."""
        blocks = as_blocks(network)
        self._check_states(blocks, states)
        with torch.no_grad():
            maps = [linearize(b, x, self.fast_path) for b, x in zip(blocks, states)]
            return self._grads(states, maps, targets, self._gammas(len(blocks) - 1))

    def _grads(
        self,
        states: Sequence[Tensor],
        maps: Sequence[Linearization],
        targets: Tensor,
        gammas: Sequence[float],
    ) -> list[Tensor]:
        weighted = [_scaled(x - m.prediction, g) for g, x, m in zip(gammas, states[1:], maps)]
        weighted.append(_scaled(self._output_error(maps[-1].prediction, targets), gammas[-1]))
        # in increasing l, weighted[l] is no longer needed once layer l-1's pullback used it
        return [
            weighted[l].sub_(maps[l + 1].pullback(weighted[l + 1]))
            for l in range(len(states) - 1)
        ]

    def _check_states(self, blocks: Sequence[nn.Module], states: Sequence[Tensor]) -> None:
        if len(states) != len(blocks):
            raise LocalLearningError(
                f"expected {len(blocks)} states [x_0 .. x_(L-1)] for {len(blocks)} blocks, got "
                f"{len(states)}. Fix: pass the input followed by one state per hidden block."
            )

    # --------------------------------------------------------------- inference
    def infer(
        self, network: nn.Module, inputs: Tensor, targets: Tensor, *, final_energy: bool = True
    ) -> InferenceResult:
        """Run inference from the feedforward states (F-ini); no weight gradients are made.

        With ``final_energy=False`` the energy at the final states is not computed
        (``energy_after`` is then ``energy_before`` and ``energy_per_layer`` is ``None``).
        Inference reads nothing from the device (but for the tolerance schedule's stop), so
        it does not check that labels lie in ``[0, outputs)``: one out of range gets a row of
        zeros as its target (:meth:`training_loss` refuses it; check yourself with
        ``rule.loss.check_labels(output, targets)``).
        """
        return self._run(network, inputs, targets, final_energy, keep_outputs=False)

    def _run(
        self,
        network: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        final_energy: bool,
        keep_outputs: bool,
    ) -> InferenceResult:
        blocks = as_blocks(network)
        # states, errors and energies in the parameters' dtype (fp32 under mixed precision):
        # many small state steps would drift in bf16 (see docs/math.md §1.5)
        with torch.inference_mode(False), torch.no_grad(), full_precision(inputs):
            if inputs.is_inference():  # validation data: autograd may not touch it
                inputs = inputs.clone()
            # compiled after compile_inference; the tolerance schedule's loop, with its host
            # decisions, runs as written and compiles each step (see _infer)
            infer = self._infer if self.inference == "tolerance" else self._inference_step()
            return infer(blocks, inputs, targets, final_energy, keep_outputs)

    def _infer(
        self,
        blocks: list[nn.Module],
        inputs: Tensor,
        targets: Tensor,
        final_energy: bool = True,
        keep_outputs: bool = False,
    ) -> InferenceResult:
        """The inference step, from the feedforward pass to the final energy: the part
        :meth:`compile_inference` compiles. ``targets`` are labels or float targets.

        With ``keep_outputs`` it also returns the block outputs the weight update uses, with
        their graph to the parameters (:attr:`InferenceResult.feedforward_outputs` under FPA,
        :attr:`InferenceResult.state_outputs` without), so that the update's forward pass is
        part of the (compiled) step. The states are the buffers the feedforward pass is
        cloned into once and then moved in place, ``x_l <- x_l - kappa_l g_l`` (under the
        tolerance schedule each step after the first makes new ones, see
        :meth:`_tolerance_step`).

        The tolerance schedule runs its loop as written and compiles the work between two
        host reads of the energy, :meth:`_tolerance_step`.
        """
        hidden = len(blocks) - 1
        gammas = self._gammas(hidden)
        kappas = _per_layer(self.inference_lr, hidden, "inference_lr")
        # each block's linearization (closed form or autograd) is resolved once per batch
        linearizers = [linearizer(block, self.fast_path) for block in blocks]
        track = keep_outputs and self.fixed_prediction
        maps, feedforward = self._feedforward(blocks, linearizers, inputs, track)
        free = [m.output for m in maps]  # f_l(h_{l-1}) with a graph, where the closed form kept it
        # one-hot once, not per step; the label range is checked by the step, not here
        targets = self.loss.target_matrix(feedforward[-1], targets, validate=False)
        states = [inputs] + [h.clone() for h in feedforward[1:-1]]  # moved in place below
        energy_before = gammas[-1] * self.loss.per_sample_sum(feedforward[-1], targets)
        velocity: list[Tensor | None] = [None] * hidden
        trace: list[float] = []
        steps = 0
        terms: Tensor | None = None  # the energy's terms at the current states, when known
        last = self.inference_steps
        if self.inference == "sequential":
            for steps in range(1, last + 1):
                # the first sweep starts at the feedforward states, where ``maps`` are valid
                cached = maps if steps == 1 else None
                self._sequential_sweep(
                    linearizers, states, cached, targets, gammas, kappas, velocity)
        elif self.inference == "simultaneous":
            for steps in range(1, last + 1):
                # after the last step only the final energy needs the states' predictions
                again = steps < last or final_energy
                maps, terms = self._simultaneous_step(
                    linearizers, states, maps, targets, gammas, kappas, velocity,
                    relinearize=again, with_terms=again and steps == last,
                )
        else:
            # the stop decision reads the global batch's energy: under several processes
            # the energy before inference is summed with the first energy after a step
            previous: float | None = None
            if self.all_reduce_sum is None:
                previous = _read(energy_before)[0]
                trace.append(previous)
            # the first step from the feedforward pass's maps; after it each call gives F at
            # the states and, ahead of the decision, the next step, taken if F says go on
            self._simultaneous_step(
                linearizers, states, maps, targets, gammas, kappas, velocity, relinearize=False)
            advance = self._inference_step("_tolerance_step")  # compiled between the reads
            steps = 1
            while True:
                ahead = None
                if steps < last:
                    terms, ahead, ahead_velocity = advance(
                        linearizers, states, velocity, targets, gammas, kappas)
                else:  # at the cap: the energy only, for the warning on a rise
                    terms = self._energy_terms(blocks, states, targets)
                previous, current = self._global_energies(
                    previous, energy_before, terms.sum(), trace)
                if self._converged(steps, previous, current) or ahead is None:
                    break
                previous, states, velocity = current, ahead, ahead_velocity
                steps += 1
        result = InferenceResult(
            states, feedforward, energy_before, energy_before, steps, trace, None, None, targets
        )
        if track:
            result.feedforward_outputs = self._update_outputs(
                blocks, feedforward[:-1], free, gammas)
        elif keep_outputs:
            result.state_outputs = self._update_outputs(blocks, states, None, gammas)
        if final_energy:  # else the caller gets it from its own forward pass at the states
            if terms is None:
                terms = self._energy_terms(blocks, states, targets)
            result.energy_after, result.energy_per_layer = terms.sum(), terms
        return result

    def _simultaneous_step(
        self,
        linearizers: Sequence[Linearizer],
        states: list[Tensor],
        maps: Sequence[Linearization],
        targets: Tensor,
        gammas: Sequence[float],
        kappas: Sequence[float],
        velocity: list[Tensor | None],
        relinearize: bool = True,
        with_terms: bool = False,
    ) -> tuple[Sequence[Linearization], Tensor | None]:
        """One gradient step on all hidden states at once, from ``maps`` (the blocks
        linearized at the current states); moves ``states`` in place.

        Returns the blocks linearized at the moved states (with ``relinearize``; else
        ``maps``) and, with ``with_terms``, the energy's terms there (else ``None``).
        """
        grads = self._grads(states, maps, targets, gammas)
        for layer in range(1, len(states)):
            self._move(states, velocity, kappas, layer, grads[layer - 1])
        if not relinearize:
            return maps, None
        maps = [lin(x, False) for lin, x in zip(linearizers, states)]
        if not with_terms:
            return maps, None
        return maps, self._terms(states, [m.prediction for m in maps], targets)

    def _tolerance_step(
        self,
        linearizers: Sequence[Linearizer],
        states: list[Tensor],
        velocity: list[Tensor | None],
        targets: Tensor,
        gammas: Sequence[float],
        kappas: Sequence[float],
    ) -> tuple[Tensor, list[Tensor], list[Tensor | None]]:
        """The energy's terms at ``states``, and one simultaneous step from there, out of
        place (the caller takes it only if the energy says go on): ``(terms, moved states,
        their velocity)``. The tolerance schedule's compiled unit: tensors in, tensors out.

        A stop after it leaves its step unused: one step's state update (no forward pass)
        per inference is the price of one compiled call per step."""
        maps = [lin(x, False) for lin, x in zip(linearizers, states)]
        terms = self._terms(states, [m.prediction for m in maps], targets)
        grads = self._grads(states, maps, targets, gammas)
        moved, speeds = list(states), list(velocity)
        for layer in range(1, len(states)):
            self._move(moved, speeds, kappas, layer, grads[layer - 1], in_place=False)
        return terms, moved, speeds

    def _move(
        self,
        states: list[Tensor],
        velocity: list[Tensor | None],
        kappas: Sequence[float],
        layer: int,
        grad: Tensor,
        in_place: bool = True,
    ) -> None:
        """``x_l <- x_l - kappa_l v_l`` with ``v_l = m v_l + g`` (``v_l = g`` without
        momentum ``m``); ``grad`` is a fresh temporary and may become ``v_l``. In place on
        the tensors, or (``in_place=False``) into new tensors put in the two lists."""
        if self.state_momentum:
            buffer = velocity[layer - 1]
            if buffer is not None:
                grad = (buffer.mul_(self.state_momentum) if in_place else
                        buffer * self.state_momentum).add_(grad)
            velocity[layer - 1] = grad
        if in_place:
            states[layer].sub_(grad, alpha=kappas[layer - 1])
        else:
            states[layer] = states[layer].sub(grad, alpha=kappas[layer - 1])

    @staticmethod
    def _update_outputs(
        blocks: Sequence[nn.Module],
        block_inputs: Sequence[Tensor],
        known: Sequence[Tensor | None] | None,
        gammas: Sequence[float],
    ) -> list[Tensor | None]:
        """``f_l(z_{l-1})`` with a graph to the parameters (not to ``z``) for each block,
        taken from ``known`` where given; ``None`` for a block with ``gamma_l = 0``."""
        known = known or [None] * len(blocks)
        with torch.enable_grad():
            return [
                None if not gamma else output if output is not None else block(z.detach())
                for block, z, output, gamma in zip(blocks, block_inputs, known, gammas)
            ]

    def _global_energies(
        self, previous: float | None, energy_before: Tensor, current: Tensor, trace: list[float]
    ) -> tuple[float, float]:
        """``(F_{t-1}, F_t)`` of the global batch for the tolerance stop; appends to ``trace``.

        ``F`` is a per-sample sum, so the global batch's is ``sum_r F_r`` over the processes
        of :attr:`process_layout`: exactly one process's ``F`` on the concatenated batch (up
        to float summation order), the same number on every rank, so every rank stops at the
        same step. One all-reduce per call, of ``F_t`` (and of ``F_0 = energy_before`` too
        while ``previous`` is ``None``); in one process (no ``all_reduce_sum``) none.
        """
        values = torch.stack([current] if previous is not None else [energy_before, current])
        if self.all_reduce_sum is not None:
            values = self.all_reduce_sum(values.detach())
        summed = _read(values)
        if previous is None:
            previous = summed[0]
            trace.append(previous)
        trace.append(summed[-1])
        return previous, summed[-1]

    def _converged(self, step: int, previous: float, current: float) -> bool:
        """Whether step ``step`` lowered the energy by less than ``tolerance`` (relative).

        A rise is instability, never convergence: it warns once and inference goes on.
        """
        decrease = previous - current
        if decrease < 0:
            self._warn_energy_rise(step, previous, current)
            return False
        return decrease <= self.tolerance * max(abs(previous), 1e-30)

    def _warn_energy_rise(self, step: int, previous: float, current: float) -> None:
        if not self._warned_energy_rise:
            self._warned_energy_rise = True
            warnings.warn(
                f"predictive-coding inference raised the energy at step {step} "
                f"({previous:.6g} -> {current:.6g}): the state step size is too large for this "
                "network. Fix: lower inference_lr (kappa) or use state_momentum=0.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _feedforward(
        self,
        blocks: Sequence[nn.Module],
        linearizers: Sequence[Linearizer],
        inputs: Tensor,
        track: bool = False,
    ) -> tuple[list[Linearization], list[Tensor]]:
        """The feedforward pass ``h_0 .. h_L`` with each block linearized at its input; a
        block that cannot take the previous output gets a :class:`ShapeMismatchError`."""
        maps: list[Linearization] = []
        activations = [inputs]
        for index, (block, lin) in enumerate(zip(blocks, linearizers)):
            with shape_errors(index, block, activations[index]):
                maps.append(lin(activations[index], track))
            activations.append(maps[-1].prediction)
        return maps, activations

    def _sequential_sweep(
        self,
        linearizers: Sequence[Linearizer],
        states: list[Tensor],
        cached: Sequence[Linearization] | None,
        targets: Tensor,
        gammas: Sequence[float],
        kappas: Sequence[float],
        velocity: list[Tensor | None],
    ) -> None:
        """One SI sweep ``l = L-1 .. 1``; each layer sees the freshly updated layer above.

        Block ``l`` is linearized at ``x_{l-1}`` just before layer ``l`` moves; ``x_{l-1}``
        has not moved yet in this sweep, so ``cached`` linearizations (at the states the sweep
        starts from) are used as they are.
        """

        def at(layer: int) -> Linearization:
            if cached is not None:
                return cached[layer - 1]
            return linearizers[layer - 1](states[layer - 1], False)

        hidden = len(linearizers) - 1
        above = at(hidden + 1)
        above_error = _scaled(self._output_error(above.prediction, targets), gammas[-1])
        for layer in range(hidden, 0, -1):
            current = at(layer)
            grad = _scaled(states[layer] - current.prediction, gammas[layer - 1])
            self._move(states, velocity, kappas, layer, grad.sub_(above.pullback(above_error)))
            above_error = _scaled(states[layer] - current.prediction, gammas[layer - 1])
            above = current

    # ----------------------------------------------------------- weight update
    def weight_loss(
        self, network: nn.Module, inference: InferenceResult, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The surrogate ``F(x; W) / B`` at fixed states, and its per-block terms.

        Its gradient w.r.t. the parameters is ``dF/dW / B``; with FPA the block inputs are the
        feedforward activations ``h_{l-1}`` and the hidden errors ``x_l - f_l(h_{l-1})``.
        Without FPA the terms times ``B`` are the energy's terms at the states.
        """
        blocks = as_blocks(network)
        gammas = self._gammas(len(blocks) - 1)
        inputs = inference.feedforward[:-1] if self.fixed_prediction else inference.states
        # the predictions inference kept with their graph, if it did
        known = inference.feedforward_outputs if self.fixed_prediction else (
            inference.state_outputs)
        known = known or [None] * len(blocks)
        terms = local_losses(
            blocks[:-1], inputs[:-1], inference.states[1:], gammas[:-1], known[:-1]
        )
        prediction = known[-1] if known[-1] is not None else blocks[-1](inputs[-1].detach())
        terms.append(gammas[-1] * self.loss.mean(prediction, targets))
        terms = torch.stack(terms)
        return terms.sum(), terms

    def rule_loss(self, network: nn.Module, inputs: Tensor, targets: Tensor) -> StepResult:
        # without FPA the update's forward pass at the final states (inference keeps its
        # predictions) gives the final energy, so inference skips computing it
        inference = self._run(network, inputs, targets, self.fixed_prediction, keep_outputs=True)
        matrix = inference.target_matrix  # the labels, one-hot once for the whole step
        surrogate, terms = self.weight_loss(network, inference, matrix)
        output = inference.feedforward[-1]
        checks = StepChecks()  # read once, at the end, before anything touches the weights
        checks.labels(self.loss, output, targets)
        checks.finite(surrogate, "the predictive-coding energy")
        batch = inputs.shape[0]
        if not self.fixed_prediction:
            inference.energy_per_layer = terms.detach() * batch
            inference.energy_after = inference.energy_per_layer.sum()
        checks.finite(inference.energy_after, "the energy after inference")
        errors = [x - h for x, h in zip(inference.states[1:], inference.feedforward[1:-1])]
        # ||eps_l||^2 = 2 F_l / gamma_l for the hidden terms F_l of the final energy
        # built on the energy's device: no host round trip in the training step
        scale = torch.tensor(
            [2 / (max(g, 1e-30) * x.numel()) for g, x in
             zip(self._gammas(len(errors))[:-1], inference.states[1:])],
            dtype=output.dtype, device=output.device,
        )
        error_rms = (inference.energy_per_layer.detach()[:-1] * scale).sqrt()
        metrics = {
            "energy_before": inference.energy_before.detach() / batch,
            "energy_after": inference.energy_after.detach() / batch,
            "inference_steps": torch.tensor(float(inference.steps)),
            "state_update_rms": torch.stack([rms(e) for e in errors]),
            "error_rms": error_rms,
            "energy_per_layer": inference.energy_per_layer.detach() / batch,
        }
        loss = self.loss.mean(output, matrix).detach()
        checks.verify()
        return StepResult(loss=loss, surrogate=surrogate, output=output.detach(), metrics=metrics)
