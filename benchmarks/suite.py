"""Time per training step of every rule, by hand and inside a Lightning Trainer.

One command prints a Markdown table and writes the raw figures as JSON::

    python benchmarks/suite.py                                  # widths 64 256 1024 4096 + CNN
    python benchmarks/suite.py --quick                          # widths 64 256, one round
    python benchmarks/suite.py --threads 2 --json speed.json --pcx-python PATH/TO/python

Task: the MLP ``40-M-M-10`` (``lightning_local.models.MLP``, depth 3, tanh, biases) at batch
256 for each width ``M``, and a small CNN (``lightning_local.models.CNN``), MSE loss, one SGD
weight step per batch. Cases:

- ``bp``: backprop;
- ``pc-si``: predictive coding, one sequential-inference sweep with FPA (exact backprop);
- ``pc-T1``, ``pc-T8``, ``pc-T20``: PC with ``T`` simultaneous inference steps of 0.1 on the
  hidden states, weight update at the relaxed states (no FPA: the update pcx computes);
- ``pc-tol``: PC run to a relative energy decrease of ``--tolerance`` (cap 50 steps);
- ``dtp-ridge``, ``dtp-noisy``: difference target propagation with closed-form ridge feedback
  (linear feedback maps only, so not the CNN) and with one noisy-reconstruction feedback step.

Each case is timed two ways: ``rule.step(network, x, y, optimizer)`` on the network that
:func:`lightning_local.wiring.wire` builds, and the library's ``LightningModule``
(``BackpropModule``, ``PredictiveCodingModule``, ``TargetPropagationModule``) in
``L.Trainer.fit`` on an in-memory loader of fixed batches, with a ``CSVLogger`` in a temporary
folder so Lightning's default logging (every 50 steps) is part of the cost. Inside the Trainer a
step is the time from one ``on_train_batch_start`` to the next (the last one to
``on_train_end``), so it holds data fetching, hooks and logging; the first steps of every fit
are warm-up and not counted. "Trainer overhead" is Trainer time minus ``rule.step`` time,
paired within each round.

Timing: every measurement runs a number of steps chosen once so that it lasts about
``--budget`` seconds (at least one step). After a calibration pass, ``--rounds`` interleaved
rounds each measure every case once, in the same order, so that machine noise hits all cases
alike; each figure is the median over rounds (ratios are medians of per-round ratios). Step
counts follow the fastest step seen so far, so a calibration under load heals in the next
round. On a shared machine prefer ``--threads 1``: when another process takes a core, torch's
multi-threaded regions can stall ten times over or more, while one thread only loses its share.

Matmul reference and FLOP estimates. In each round the suite also times ``torch.mm`` on the
network's largest layer as one matrix product (MLP: ``(B x M) @ (M x M)``; CNN: the im2col
product ``(B H W x C_in k^2) @ (C_in k^2 x C_out)`` of its largest convolution) and reports
its GFLOP/s. Each case's FLOPs per step are estimated from the layer sizes, counted with
forward hooks on one batch (Linear ``2 B n_in n_out``; Conv2d and ConvTranspose2d
``2 B (output or input positions) C_in C_out k^2 / groups``):

- forward ``F``; backprop ``3F`` (forward, input-gradient and weight-gradient passes);
- PC with ``T`` inference steps ``(2T + 3) F``, i.e. ``(2T + 3) / 3`` backprop steps: ``T``
  forward passes and ``T`` pullbacks during inference, a forward pass and a weight-gradient
  pass for the update, against backprop's three passes (SI: ``T = 1`` sweep; tolerance: the
  mean number of steps taken);
- DTP ``3F + 2G`` (forward, local-loss forward and weight gradient; feedback ``g_l`` applied to
  ``h_l`` and to ``tau_l``, ``G`` = the FLOPs of all feedback maps on one batch), plus for
  ridge feedback the Gram sums and the solve of each layer (``n`` = width of ``h_l``, ``m`` =
  width of ``h_{l-1}``; primal when ``n <= B``: ``2Bn^2 + 2Bnm + 2n^3/3 + 2n^2 m``, dual
  otherwise: ``4B^2 n + 2B^3/3 + 2Bnm``), and for one noisy feedback step ``F - F_1 + 2G``
  (the blocks above the first on noisy inputs, the feedback forward and its weight gradient).

The "FLOP budget" column is a case's estimate over backprop's (``(2T + 3) / 3`` for PC) and
"of matmul" is the estimated FLOPs per second as a fraction of the measured matmul GFLOP/s.

pcx side by side (optional): with ``--pcx-python`` naming the interpreter of a virtual
environment that has pcx (``pip install "pcx==0.6.3" "jax<0.5"``; this project does not
depend on pcx), ``benchmarks/pcx_worker.py`` runs there, builds the same MLP task in pcx (its
example training step: an ``EnergyModule`` of ``Vode`` s, ``T`` jitted SGD steps on the
states, one weight step) and answers timing requests over stdin/stdout, so each round times
pcx right after the matching ``pc-T8`` case. With ``--threads N`` below the CPU count the
worker is pinned to ``N`` CPUs (XLA sizes its thread pool from the affinity).

Targets (printed with a pass/fail column; on a shared machine a failing row can be noise):
``rule.step`` of ``pc-T8`` at most 0.9x / 0.75x / 0.65x pcx at widths 64 / 256 / 1024; inside
the Trainer the PC module's overhead over its ``rule.step`` at most the backprop module's;
at widths >= 1024 PC with ``T`` steps within 1.15x of ``(2T + 3) / 3`` backprop steps; DTP with
one feedback step at most 3x a backprop step.

JSON: settings, machine (torch version, threads, CPU count, load average), date, every sample,
and the derived figures and target checks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_local
from lightning_local.models import CNN, MLP
from lightning_local.modules import (
    BackpropModule,
    PredictiveCodingModule,
    TargetPropagationModule,
)
from lightning_local.network import as_blocks
from lightning_local.rules.backprop import Backprop
from lightning_local.rules.base import LocalRule
from lightning_local.rules.predictive_coding import PredictiveCoding
from lightning_local.rules.target_propagation import TargetPropagation
from lightning_local.wiring import wire

DEFAULT_WIDTHS = (64, 256, 1024, 4096)
QUICK_WIDTHS = (64, 256)
PCX_LIMITS = {64: 0.9, 256: 0.75, 1024: 0.65}
"""``rule.step`` of ``pc-T8`` over pcx's step, at most, per width."""
BUDGET_SLACK = 1.15
"""PC with ``T`` steps at widths >= :data:`BUDGET_MIN_WIDTH`: at most this times its budget."""
BUDGET_MIN_WIDTH = 1024
DTP_LIMIT = 3.0
"""DTP with one feedback step: at most this many backprop steps."""
TOLERANCE_CAP = 50
PCX_CASE = "pc-T8"


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One rule configuration: its rule class and settings (shared by rule.step and module)."""

    name: str
    label: str
    rule_class: type[LocalRule]
    settings: dict[str, Any]
    module_class: type[L.LightningModule]
    inference_steps: int | None = None
    """``T`` of the budget for PC (``None``: not PC; tolerance: the mean steps taken)."""

    @property
    def family(self) -> str:
        return {Backprop: "bp", PredictiveCoding: "pc", TargetPropagation: "dtp"}[self.rule_class]


def make_cases(tolerance: float, inference_lr: float) -> list[Case]:
    """The suite's cases, in the order each round measures them."""
    relaxed = dict(inference_lr=inference_lr, fixed_prediction=False)
    cases = [
        Case("bp", "backprop", Backprop, {}, BackpropModule),
        Case("pc-si", "PC, one SI sweep + FPA", PredictiveCoding,
             dict(inference="sequential", inference_steps=1), PredictiveCodingModule, 1),
    ]
    for steps in (1, 8, 20):
        cases.append(Case(
            f"pc-T{steps}", f"PC, T = {steps} simultaneous", PredictiveCoding,
            dict(inference="simultaneous", inference_steps=steps, **relaxed),
            PredictiveCodingModule, steps,
        ))
    cases += [
        Case("pc-tol", f"PC, to tolerance {tolerance:g}", PredictiveCoding,
             dict(inference="tolerance", inference_steps=TOLERANCE_CAP, tolerance=tolerance,
                  **relaxed), PredictiveCodingModule, TOLERANCE_CAP),
        Case("dtp-ridge", "DTP, ridge feedback", TargetPropagation,
             dict(variant="dtp", feedback_training="ridge"), TargetPropagationModule),
        Case("dtp-noisy", "DTP, 1 noisy feedback step", TargetPropagation,
             dict(variant="dtp", feedback_training="noisy", feedback_steps=1),
             TargetPropagationModule),
    ]
    return cases


CASE_NAMES = [case.name for case in make_cases(1e-2, 0.1)]


# ----------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A network and a fixed batch: an MLP of one width, or the CNN."""

    name: str
    model: str
    width: int
    batch: int
    build: Callable[[], nn.Module]
    inputs: Tensor
    targets: Tensor
    seed: int = 0

    def network(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.build()


def make_tasks(args: argparse.Namespace) -> list[Task]:
    """One MLP task per width, then the CNN task (unless ``--no-cnn``)."""
    tasks = []
    generator = torch.Generator().manual_seed(0)
    for width in args.widths:
        x = torch.randn(args.batch, args.in_features, generator=generator)
        y = torch.randint(0, args.classes, (args.batch,), generator=generator)
        tasks.append(Task(
            f"mlp-{width}", "mlp", width, args.batch,
            lambda w=width: MLP(in_features=args.in_features, width=w,
                                num_classes=args.classes, depth=args.depth),
            x, y,
        ))
    if not args.no_cnn:
        x = torch.randn(args.cnn_batch, 1, args.cnn_image, args.cnn_image, generator=generator)
        y = torch.randint(0, args.classes, (args.cnn_batch,), generator=generator)
        tasks.append(Task(
            f"cnn-{args.cnn_width}", "cnn", args.cnn_width, args.cnn_batch,
            lambda: CNN(in_channels=1, image_size=args.cnn_image, width=args.cnn_width,
                        num_classes=args.classes),
            x, y,
        ))
    return tasks


# ----------------------------------------------------------------------------- FLOPs
@dataclass
class LayerCount:
    """FLOPs of the matrix products of one forward pass, and its largest one as a GEMM."""

    total: int = 0
    per_module: list[int] = field(default_factory=list)
    largest: tuple[int, int, int] = (0, 0, 0)
    """``(rows, inner, columns)`` of the largest product."""

    def add(self, flops: int, gemm: tuple[int, int, int]) -> None:
        self.total += flops
        self.per_module.append(flops)
        if flops > 2 * math.prod(self.largest):
            self.largest = gemm


@contextlib.contextmanager
def count_flops(module: nn.Module) -> Iterator[LayerCount]:
    """Count the matmul FLOPs of Linear, Conv2d and ConvTranspose2d layers run inside."""
    count = LayerCount()

    def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0]
        if isinstance(layer, nn.Linear):
            rows = x.numel() // x.shape[-1]
            gemm = (rows, layer.in_features, layer.out_features)
        elif isinstance(layer, nn.Conv2d):
            taps = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
            gemm = (output.numel() // layer.out_channels, taps, layer.out_channels)
        elif isinstance(layer, nn.ConvTranspose2d):
            taps = layer.out_channels // layer.groups * math.prod(layer.kernel_size)
            gemm = (x.numel() // layer.in_channels, layer.in_channels, taps)
        else:
            return
        count.add(2 * math.prod(gemm), gemm)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class FlopModel:
    """The layer sizes of a task that the FLOP estimates need."""

    forward: int
    first_block: int
    feedback: int
    ridge: int
    largest: tuple[int, int, int]

    @property
    def backprop(self) -> float:
        """Backprop's FLOPs per step, ``3F``."""
        return 3.0 * self.forward

    def estimate(self, case: Case, steps: float | None) -> float:
        """Estimated FLOPs of one training step of ``case`` (see the module docstring)."""
        if case.family == "bp":
            return self.backprop
        if case.family == "pc":
            return (2.0 * (steps or 1) + 3.0) * self.forward
        flops = 3.0 * self.forward + 2.0 * self.feedback
        if case.settings.get("feedback_training") == "ridge":
            flops += self.ridge
        elif case.settings.get("feedback_training") == "noisy":
            flops += self.forward - self.first_block + 2.0 * self.feedback
        return flops


@torch.no_grad()
def flop_model(task: Task) -> FlopModel:
    """Count ``F``, ``F_1``, ``G`` and the ridge solve for ``task``'s network and batch."""
    network = task.network()
    blocks = as_blocks(network)
    with count_flops(network) as forward:
        activations = [task.inputs]
        for block in blocks:
            activations.append(block(activations[-1]))
    first = sum(_block_flops(blocks[0], task.inputs))
    tp = TargetPropagation("mse", variant="dtp", feedback_training="noisy").build_network(
        task.network())
    with count_flops(tp.feedback) as feedback:
        for g, h in zip(tp.feedback, activations[2:]):
            g(h)
    ridge = 0
    batch = task.batch
    for above, below in zip(activations[2:], activations[1:-1]):
        n, m = above[0].numel(), below[0].numel()
        if n <= batch:
            ridge += 2 * batch * n * n + 2 * batch * n * m + 2 * n**3 // 3 + 2 * n * n * m
        else:
            ridge += 4 * batch * batch * n + 2 * batch**3 // 3 + 2 * batch * n * m
    return FlopModel(forward.total, first, feedback.total, ridge, forward.largest)


def _block_flops(block: nn.Module, inputs: Tensor) -> list[int]:
    with count_flops(block) as count:
        block(inputs)
    return count.per_module


# ----------------------------------------------------------------------------- timers
STEP_LIMIT = 100_000


def _steps_for(budget: float, seconds: float) -> int:
    return max(1, min(STEP_LIMIT, round(budget / max(seconds, 1e-9))))


class Timer:
    """A measurement that :func:`run_rounds` repeats once per round."""

    key: str
    steps: int = 1
    """Steps (or products) per measurement, chosen by :meth:`prepare`, then :meth:`adapt`."""
    fastest: float = math.inf
    steps_used: list[int]

    def prepare(self, budget: float) -> None:
        """Build, warm up and choose :attr:`steps` so one measurement lasts about ``budget``."""

    def measure(self) -> float:
        """Seconds per step over :attr:`steps` steps."""
        raise NotImplementedError

    def adapt(self, seconds: float, budget: float) -> None:
        """After a measurement: steps for ``budget`` at the fastest step seen so far (a
        calibration under a burst of load from other processes heals in the next round)."""
        self.fastest = min(self.fastest, seconds)
        self.steps = _steps_for(budget, self.fastest)

    def close(self) -> None:
        """Release what the timer holds (processes, folders)."""


def _calibrate(step: Callable[[], Any], budget: float, limit: int = STEP_LIMIT) -> int:
    """Steps for a measurement of about ``budget`` seconds (at least one).

    ``step`` runs once as warm-up, then, timed one by one, for about ``budget / 5`` seconds
    (and at least three times while under ``budget``). The count is taken from the fastest
    step, so a burst of load from other processes does not shrink every later measurement.
    """
    step()
    fastest, spent, count = math.inf, 0.0, 0
    while count < limit and (spent < budget / 5 or (count < 3 and spent < budget)):
        start = time.perf_counter()
        step()
        elapsed = time.perf_counter() - start
        fastest, spent, count = min(fastest, elapsed), spent + elapsed, count + 1
    return max(1, min(limit, round(budget / max(fastest, 1e-9))))


class MatmulTimer(Timer):
    """``torch.mm`` of one layer's size: the throughput reference."""

    def __init__(self, task: Task, gemm: tuple[int, int, int]) -> None:
        self.key, self.gemm = f"{task.name}/matmul", gemm
        generator = torch.Generator().manual_seed(1)
        rows, inner, columns = gemm
        self.a = torch.randn(rows, inner, generator=generator)
        self.b = torch.randn(inner, columns, generator=generator)

    @property
    def flops(self) -> int:
        return 2 * math.prod(self.gemm)

    def prepare(self, budget: float) -> None:
        self.steps = _calibrate(lambda: torch.mm(self.a, self.b), budget)

    def measure(self) -> float:
        a, b = self.a, self.b
        start = time.perf_counter()
        for _ in range(self.steps):
            torch.mm(a, b)
        return (time.perf_counter() - start) / self.steps


class RuleStepTimer(Timer):
    """``rule.step(network, x, y, optimizer)`` on the wired network, without Lightning."""

    def __init__(self, task: Task, case: Case, lr: float) -> None:
        self.key, self.task, self.case = f"{task.name}/{case.name}/rule.step", task, case
        rule = case.rule_class("mse", **case.settings)
        self.run = wire(task.network(), rule, "sp")
        self.optimizer = self.run.build_optimizer(lr)
        self.inference_steps: list[float] = []
        self.last_loss = float("nan")

    def _step(self) -> None:
        result = self.run.rule.step(self.run.network, self.task.inputs, self.task.targets,
                                    self.optimizer)
        if self.case.settings.get("inference") == "tolerance":
            self.inference_steps.append(float(result.metrics["inference_steps"]))
        self._result = result

    def prepare(self, budget: float) -> None:
        self.steps = _calibrate(self._step, budget)
        self.inference_steps.clear()

    def measure(self) -> float:
        start = time.perf_counter()
        for _ in range(self.steps):
            self._step()
        elapsed = (time.perf_counter() - start) / self.steps
        self.last_loss = float(self._result.loss)
        return elapsed


class _StepClock(L.Callback):
    """Timestamps of every ``on_train_batch_start`` and of ``on_train_end``."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = math.nan

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.end = time.perf_counter()


class TrainerTimer(Timer):
    """The case's LightningModule in ``L.Trainer.fit``; time per step after warm-up steps."""

    def __init__(self, task: Task, case: Case, lr: float, folder: Path, partner: Timer
                 ) -> None:
        self.key, self.task, self.case = f"{task.name}/{case.name}/trainer", task, case
        self.folder, self.partner = folder, partner
        torch.manual_seed(task.seed)
        self.module = case.module_class(
            network=task.build(), loss="mse", parametrization="sp", lr=lr, **case.settings)
        self.fits = 0

    @property
    def steps(self) -> int:  # type: ignore[override]
        """As many steps as the same case's ``rule.step`` measurement."""
        return self.partner.steps

    @property
    def warmup(self) -> int:
        """Steps at the start of every fit that are not counted."""
        return 1 if self.steps < 10 else 3

    def prepare(self, budget: float) -> None:
        self._fit(1)

    def adapt(self, seconds: float, budget: float) -> None:
        """Nothing: the steps follow the ``rule.step`` measurement's."""

    def _fit(self, steps: int) -> float:
        clock = _StepClock()
        warmup = self.warmup
        total = warmup + steps
        self.fits += 1
        loader = DataLoader([(self.task.inputs, self.task.targets)] * total, batch_size=None)
        with _quiet():
            trainer = L.Trainer(
                accelerator="cpu", devices=1, max_steps=total, max_epochs=-1,
                logger=CSVLogger(self.folder, name=self.key.replace("/", "_"),
                                 version=self.fits),
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, callbacks=[clock],
            )
            trainer.fit(self.module, train_dataloaders=loader)
        if len(clock.starts) != total:
            raise RuntimeError(f"{self.key}: the Trainer ran {len(clock.starts)} of {total} steps")
        return (clock.end - clock.starts[warmup]) / steps

    def measure(self) -> float:
        return self._fit(self.steps)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's banners and its advice about workers and logging intervals."""
    lightning_logger = logging.getLogger("lightning.pytorch")
    level = lightning_logger.level
    lightning_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lightning_logger.setLevel(level)


class PcxWorker:
    """``benchmarks/pcx_worker.py`` in another interpreter: one JSON line per request."""

    def __init__(self, python: str, cpus: Sequence[int] | None = None) -> None:
        command = [python, str(Path(__file__).with_name("pcx_worker.py"))]
        if cpus:
            command += ["--cpus", ",".join(str(c) for c in cpus)]
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, bufsize=1,
        )
        self.info = self.request(op="hello")

    def request(self, **message: Any) -> dict[str, Any]:
        """Send one request and wait for its answer."""
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:]
            raise RuntimeError(f"the pcx worker stopped answering ({message.get('op')}):\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"pcx worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(Exception):
                self.request(op="quit")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.stderr.close()


class PcxTimer(Timer):
    """pcx's step on the same MLP task, timed by the worker."""

    def __init__(self, worker: PcxWorker, task: Task, args: argparse.Namespace) -> None:
        self.key, self.worker = f"{task.name}/pcx", worker
        self.setup = dict(
            op="setup", key=self.key, in_features=args.in_features, width=task.width,
            classes=args.classes, depth=args.depth, batch=task.batch, inference_steps=8,
            inference_lr=args.inference_lr, lr=args.lr, seed=task.seed,
        )
        self.compile_s = math.nan

    def prepare(self, budget: float) -> None:
        self.compile_s = float(self.worker.request(**self.setup)["compile_s"])
        probes: list[float] = []
        while len(probes) < 3 and sum(probes) < budget:  # the fastest, as in _calibrate
            probes.append(self.worker.request(op="time", key=self.key, steps=1)
                          ["seconds_per_step"])
        self.steps = _steps_for(budget, min(probes))

    def measure(self) -> float:
        answer = self.worker.request(op="time", key=self.key, steps=self.steps)
        return float(answer["seconds_per_step"])


# ----------------------------------------------------------------------------- the run
@dataclass
class Entry:
    """A task-case pair and its timers."""

    task: Task
    case: Case
    step: RuleStepTimer | None = None
    trainer: TrainerTimer | None = None
    pcx: PcxTimer | None = None
    skipped: str | None = None


def run_rounds(timers: Sequence[Timer], rounds: int, budget: float,
               log: Callable[[str], None], errors: dict[str, str]) -> dict[str, list[float]]:
    """``rounds`` interleaved rounds: each measures every timer once, in the same order.

    Each timer adapts its step count to ``budget`` after each measurement (the counts used
    are kept in ``steps_used``). A measurement that fails (a diverged run) is a NaN sample;
    its error lands in ``errors`` and the timer is not measured again.
    """
    samples: dict[str, list[float]] = {timer.key: [] for timer in timers}
    for timer in timers:
        timer.steps_used = []
    for index in range(rounds):
        start = time.perf_counter()
        for timer in timers:
            value = math.nan
            if timer.key not in errors:
                timer.steps_used.append(timer.steps)
                try:
                    value = timer.measure()
                    timer.adapt(value, budget)
                except Exception as error:
                    errors[timer.key] = f"{type(error).__name__}: {error}"
                    log(f"{timer.key}: failed ({_short(error)})")
            samples[timer.key].append(value)
        log(f"round {index + 1}/{rounds}: {time.perf_counter() - start:.1f} s")
    return samples


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _min(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return min(finite) if finite else math.nan


def _spread(values: Sequence[float]) -> float:
    """``(max - min) / median`` over rounds: how much the machine's noise moved a figure."""
    finite = [v for v in values if math.isfinite(v)]
    return (max(finite) - min(finite)) / statistics.median(finite) if finite else math.nan


def _paired(a: Sequence[float], b: Sequence[float], op: Callable[[float, float], float]
            ) -> float:
    return _median([op(x, y) for x, y in zip(a, b)])


def machine_info(threads: int) -> dict[str, Any]:
    """Versions, threads, CPUs and load (the figures depend on all of them)."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "lightning_local": getattr(lightning_local, "__version__", None),
        "torch_threads": threads,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help=f"MLP widths M (default {' '.join(map(str, DEFAULT_WIDTHS))}; "
                             f"--quick: {' '.join(map(str, QUICK_WIDTHS))})")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds, median over them (default 3; --quick: 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--quick", action="store_true", help="widths 64 256, one round")
    parser.add_argument("--pcx-python", default=None,
                        help="interpreter of an environment with pcx 0.6.3 and jax<0.5")
    parser.add_argument("--budget", type=float, default=0.3,
                        help="seconds per measurement (at least one step)")
    parser.add_argument("--cases", nargs="+", choices=CASE_NAMES, default=CASE_NAMES,
                        help="cases to run")
    parser.add_argument("--batch", type=int, default=256, help="MLP batch size")
    parser.add_argument("--in-features", type=int, default=40)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--depth", type=int, default=3, help="MLP weight layers")
    parser.add_argument("--lr", type=float, default=1e-3, help="SGD weight learning rate")
    parser.add_argument("--inference-lr", type=float, default=0.1,
                        help="state step size of the simultaneous and tolerance cases")
    parser.add_argument("--tolerance", type=float, default=1e-2,
                        help=f"relative energy decrease of pc-tol (cap {TOLERANCE_CAP} steps)")
    parser.add_argument("--no-trainer", action="store_true", help="skip the Trainer timings")
    parser.add_argument("--no-cnn", action="store_true", help="skip the CNN task")
    parser.add_argument("--cnn-width", type=int, default=16, help="CNN channels")
    parser.add_argument("--cnn-image", type=int, default=28, help="CNN image size")
    parser.add_argument("--cnn-batch", type=int, default=64, help="CNN batch size")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.widths is None:
        args.widths = list(QUICK_WIDTHS if args.quick else DEFAULT_WIDTHS)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if "bp" not in args.cases:
        args.cases = ["bp", *args.cases]  # every ratio is to backprop
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the suite; print the tables, write the JSON (``--json``) and return the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    say = _printer()
    info = machine_info(threads)
    say(f"torch {info['torch']}, {threads} threads, {info['cpu_count']} CPUs, "
        f"load average {info['load_average']}")
    cases = [c for c in make_cases(args.tolerance, args.inference_lr) if c.name in args.cases]
    tasks = make_tasks(args)
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        worker = None
        if args.pcx_python and PCX_CASE in args.cases:
            cpus = None
            available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
                else []
            if args.threads and available and args.threads < len(available):
                cpus = available[: args.threads]
            worker = PcxWorker(args.pcx_python, cpus)
            stack.callback(worker.close)
            say(f"pcx {worker.info.get('pcx')}, jax {worker.info.get('jax')} on "
                f"{worker.info.get('devices')}")
        flops = {task.name: flop_model(task) for task in tasks}
        matmuls = {task.name: MatmulTimer(task, flops[task.name].largest) for task in tasks}
        entries: list[Entry] = []
        timers: list[Timer] = []
        for task in tasks:
            timers.append(matmuls[task.name])
            matmuls[task.name].prepare(args.budget)
            for case in cases:
                entry = Entry(task, case)
                entries.append(entry)
                try:
                    entry.step = RuleStepTimer(task, case, args.lr)
                    entry.step.prepare(args.budget)
                    if not args.no_trainer:
                        entry.trainer = TrainerTimer(task, case, args.lr, Path(folder),
                                                     entry.step)
                        entry.trainer.prepare(args.budget)
                except Exception as error:  # a case this network does not support
                    entry.step = entry.trainer = None
                    entry.skipped = f"{type(error).__name__}: {error}"
                    say(f"{task.name} {case.name}: skipped ({_short(error)})")
                    continue
                timers += [t for t in (entry.step, entry.trainer) if t is not None]
                if worker is not None and task.model == "mlp" and case.name == PCX_CASE:
                    entry.pcx = PcxTimer(worker, task, args)
                    entry.pcx.prepare(args.budget)
                    timers.append(entry.pcx)
            say(f"prepared {task.name} ({time.perf_counter() - started:.0f} s)")
        errors: dict[str, str] = {}
        samples = run_rounds(timers, args.rounds, args.budget, say, errors)
        report = build_report(args, info, tasks, entries, matmuls, flops, samples)
        report["errors"] = errors
        report["pcx"] = worker.info if worker is not None else None
    report["machine"]["load_average_end"] = (
        list(os.getloadavg()) if hasattr(os, "getloadavg") else None)
    report["wall_s"] = time.perf_counter() - started
    print(render(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
        say(f"wrote {args.json}")
    return report


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and paths as strings (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _printer() -> Callable[[str], None]:
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)
    return say


def build_report(args: argparse.Namespace, info: dict[str, Any], tasks: Sequence[Task],
                 entries: Sequence[Entry], matmuls: dict[str, MatmulTimer],
                 flops: dict[str, FlopModel], samples: dict[str, list[float]]
                 ) -> dict[str, Any]:
    """The derived figures (medians, paired ratios, FLOP fractions) and target checks."""
    matmul_rows = {}
    for task in tasks:
        timer = matmuls[task.name]
        seconds = _median(samples[timer.key])
        matmul_rows[task.name] = {
            "gemm": list(timer.gemm), "products_per_sample": timer.steps_used,
            "samples_ms": [1e3 * s for s in samples[timer.key]], "median_ms": 1e3 * seconds,
            "gflops": timer.flops / seconds / 1e9,
        }
    results = []
    backprop: dict[str, Entry] = {e.task.name: e for e in entries if e.case.name == "bp"}
    for entry in entries:
        task, case = entry.task, entry.case
        row: dict[str, Any] = {
            "task": task.name, "model": task.model, "width": task.width, "batch": task.batch,
            "case": case.name, "label": case.label, "settings": case.settings,
        }
        if entry.skipped is not None or entry.step is None:
            row["skipped"] = entry.skipped
            results.append(row)
            continue
        step = samples[entry.step.key]
        bp_entry = backprop.get(task.name)
        bp_step = samples[bp_entry.step.key] if bp_entry and bp_entry.step else []
        steps_taken = (statistics.fmean(entry.step.inference_steps)
                       if entry.step.inference_steps else case.inference_steps)
        estimate = flops[task.name].estimate(case, steps_taken)
        median_step = _median(step)
        row.update({
            "steps_per_sample": entry.step.steps_used,
            "rule_step": {"samples_ms": [1e3 * s for s in step], "median_ms": 1e3 * median_step,
                          "min_ms": 1e3 * _min(step), "spread": _spread(step)},
            "x_backprop": _paired(step, bp_step, lambda a, b: a / b),
            "flops_estimate": estimate,
            "flop_budget": estimate / flops[task.name].backprop,
            "gflops": estimate / median_step / 1e9,
            "fraction_of_matmul": estimate / median_step / 1e9
            / matmul_rows[task.name]["gflops"],
            "final_loss": entry.step.last_loss,
        })
        if case.family == "pc":
            row["inference_steps"] = steps_taken
        if entry.trainer is not None:
            trainer = samples[entry.trainer.key]
            row["trainer"] = {
                "samples_ms": [1e3 * s for s in trainer], "median_ms": 1e3 * _median(trainer),
                "min_ms": 1e3 * _min(trainer), "spread": _spread(trainer),
                "steps_per_sample": entry.trainer.steps_used,
            }
            row["trainer_overhead_ms"] = 1e3 * _paired(trainer, step, lambda a, b: a - b)
        if entry.pcx is not None:
            pcx = samples[entry.pcx.key]
            row["pcx"] = {"samples_ms": [1e3 * s for s in pcx], "median_ms": 1e3 * _median(pcx),
                          "min_ms": 1e3 * _min(pcx), "spread": _spread(pcx),
                          "steps_per_sample": entry.pcx.steps_used,
                          "compile_s": entry.pcx.compile_s}
            row["ratio_to_pcx"] = _paired(step, pcx, lambda a, b: a / b)
        results.append(row)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "benchmarks/suite.py", *args.argv],
        "machine": info,
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
        },
        "notes": [
            "medians over interleaved rounds; ratios are medians of per-round ratios",
            "Trainer time: on_train_batch_start to the next (last: on_train_end), after "
            "warm-up steps; CSVLogger, default log_every_n_steps=50",
            "FLOP estimates: backprop 3F, PC (2T+3)F, DTP 3F+2G (+ ridge solve or noisy "
            "feedback step); see benchmarks/suite.py",
        ],
        "matmul": matmul_rows,
        "results": results,
        "targets": check_targets(results),
    }


def check_targets(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target against the measured figures: value, limit and pass (``None``: no data)."""
    rows = {(r["task"], r["case"]): r for r in results if "rule_step" in r}
    checks: list[dict[str, Any]] = []

    def add(target: str, task: str, value: float, limit: float, shown: str, bound: str) -> None:
        ok = bool(value <= limit) if math.isfinite(value) and math.isfinite(limit) else None
        checks.append({"target": target, "task": task, "value": value, "limit": limit,
                       "measured": shown, "bound": bound, "pass": ok})

    for (task, case), row in rows.items():
        if case == PCX_CASE and "ratio_to_pcx" in row and row["width"] in PCX_LIMITS \
                and row["model"] == "mlp":
            limit = PCX_LIMITS[row["width"]]
            add("rule.step pc-T8 / pcx", task, row["ratio_to_pcx"], limit,
                f"{row['ratio_to_pcx']:.2f}x", f"<= {limit:.2f}x")
    for (task, case), row in rows.items():
        bp = rows.get((task, "bp"))
        if case == PCX_CASE and bp and "trainer_overhead_ms" in row \
                and "trainer_overhead_ms" in bp:
            pc_ms, bp_ms = row["trainer_overhead_ms"], bp["trainer_overhead_ms"]
            add("Trainer overhead pc-T8 <= backprop's", task, pc_ms, bp_ms,
                f"{pc_ms:.3f} ms", f"<= {bp_ms:.3f} ms")
    for (task, case), row in rows.items():
        if case in ("pc-T1", "pc-T8", "pc-T20") and row["model"] == "mlp" \
                and row["width"] >= BUDGET_MIN_WIDTH:
            value = row["x_backprop"] / row["flop_budget"]
            add(f"{case} x backprop / (2T+3)/3", task, value, BUDGET_SLACK,
                f"{value:.2f}", f"<= {BUDGET_SLACK:.2f}")
    for (task, case), row in rows.items():
        if case in ("dtp-ridge", "dtp-noisy"):
            add(f"{case} x backprop", task, row["x_backprop"], DTP_LIMIT,
                f"{row['x_backprop']:.2f}x", f"<= {DTP_LIMIT:.1f}x")
    return checks


# ----------------------------------------------------------------------------- output
def _short(error: object) -> str:
    """The first clause of an error message (before any ``;``, ``(`` or ``Fix:``)."""
    text = str(error).split("Fix:")[0].split(";")[0].split(" (")[0]
    return text.strip().rstrip(".")


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}"


def _ms(value: Any) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def render(report: dict[str, Any]) -> str:
    """The report as Markdown: the step table, the matmul reference and the target checks."""
    machine = report["machine"]
    spreads = [row[kind]["spread"] for row in report["results"] for kind in ("rule_step", "trainer")
               if kind in row and math.isfinite(row[kind]["spread"])]
    rounds = report["settings"]["rounds"]
    noise = (f"; median spread (max - min) / median over the {rounds} rounds: "
             f"{100 * statistics.median(spreads):.0f}%" if spreads and rounds > 1 else "")
    lines = [
        f"torch {machine['torch']}, {machine['torch_threads']} threads, "
        f"{machine['cpu_count']} CPUs ({machine['cpu']}); {report['date']}; load average "
        f"{_fmt((machine['load_average'] or [None])[0])} at the start{noise}",
        "",
        "| model | case | rule.step ms | Trainer ms | Trainer overhead ms | x backprop "
        "| FLOP budget ((2T+3)/3 for PC) | of matmul | pcx ms | ratio to pcx |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        if "rule_step" not in row:
            reason = _short(str(row.get("skipped")).split(": ", 1)[-1])
            lines.append(f"| {row['task']} | {row['label']} | n/a: {reason} | | | | | | | |")
            continue
        label = row["label"]
        if row.get("case") == "pc-tol":
            label += f" ({row['inference_steps']:.0f} steps)"
        lines.append(
            f"| {row['task']} | {label} | {_ms(row['rule_step']['median_ms'])} "
            f"| {_ms(row.get('trainer', {}).get('median_ms'))} "
            f"| {_ms(row.get('trainer_overhead_ms'))} | {_fmt(row['x_backprop'])} "
            f"| {_fmt(row['flop_budget'])} | {_fmt(row['fraction_of_matmul'])} "
            f"| {_ms(row.get('pcx', {}).get('median_ms'))} | {_fmt(row.get('ratio_to_pcx'))} |"
        )
    lines += ["", "| model | matmul (rows x inner x columns) | ms | GFLOP/s |", "|---|---|---|---|"]
    for task, row in report["matmul"].items():
        gemm = " x ".join(str(d) for d in row["gemm"])
        lines.append(f"| {task} | {gemm} | {_ms(row['median_ms'])} | {_fmt(row['gflops'], 1)} |")
    lines += ["", "| target | model | measured | limit | pass |", "|---|---|---|---|---|"]
    for check in report["targets"]:
        verdict = {True: "pass", False: "FAIL", None: "—"}[check["pass"]]
        lines.append(f"| {check['target']} | {check['task']} | {check['measured']} "
                     f"| {check['bound']} | {verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
