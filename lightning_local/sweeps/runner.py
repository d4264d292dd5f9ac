"""The width x learning-rate sweep: train every (rule, parametrization, width, lr, seed) run.

Each run is plain PyTorch: the data set sits in memory, minibatches come from a permutation
drawn by a generator seeded with the run's seed, and the rule steps the network
(:meth:`~lightning_local.rules.base.LocalRule.step`). A run *diverges* when the rule reports a
non-finite energy or loss (:class:`~lightning_local.errors.NonFiniteEnergyError`), a linear
solve fails on non-finite features, or a batch loss exceeds ``divergence_factor`` times the
first batch's; it is recorded with ``diverged = true`` and the sweep goes on.

After training, the final loss and accuracy are measured on the whole training and test sets
with the feedforward pass. Results go to ``<output>/results.jsonl`` as each run finishes, so an
interrupted sweep resumes where it stopped when the same command runs again.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_local._atomic import atomic_write_text
from lightning_local.errors import LocalLearningError, NonFiniteEnergyError
from lightning_local.rules.base import LocalRule
from lightning_local.sweeps.components import DataSpec, ModelSpec
from lightning_local.sweeps.experiment import (
    Experiment,
    build_experiment,
    load_dataset,
    make_parametrization,
    parse_variant,
)
from lightning_local.sweeps.results import (
    BestLR,
    append_result,
    best_learning_rates,
    format_best_lr_table,
    format_wider_is_better_table,
    read_results,
    repair_results,
    run_key,
)
from lightning_local.wiring import check_optimizer

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

__all__ = ["SweepConfig", "SweepResult", "build_trial", "log2_grid", "sweep", "train_run"]


def log2_grid(start: float, stop: float, step: float = 1.0) -> list[float]:
    """Learning rates ``2^start, 2^(start + step), .., 2^stop`` (both ends included)."""
    if step <= 0 or stop < start:
        raise LocalLearningError(
            f"bad log2 grid {start}:{stop}:{step}. Fix: start <= stop and a positive step, "
            "e.g. -8:0 for 2^-8 .. 1."
        )
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [2.0 ** (start + i * step) for i in range(count)]


@dataclass
class SweepConfig:
    """What a sweep runs: the grid, the budget, the data and the model.

    Args:
        rules: rule variants (see :mod:`lightning_local.sweeps.experiment`), e.g.
            ``["bp", "pc-si-fpa", "pc-si", "pc-sim", "dtp"]``.
        parametrizations: ``"sp"`` and/or ``"mup"``.
        widths: hidden widths ``M``.
        lrs: learning rates ``eta'`` (the width-independent lr; muP scales it per layer).
        seeds: seeds of the init and of the minibatch order.
        epochs: training epochs (ignored when ``steps`` is set).
        steps: optimizer steps instead of epochs.
        dataset: ``"mnist1d"`` or ``"fashion-mnist"``; ``data_dir`` is its folder.
        num_samples: MNIST-1D's size (80 % train, 20 % test).
        batch_size, base_width, depth, activation, bias, loss, momentum: the training setup
            (defaults: the paper's 3-layer tanh MLP without biases, MSE, plain SGD, base 64).
        output_weight_exponent: muP's ``g`` for PC.
        divergence_factor: a batch loss above this times the first batch loss is divergence.
        zero_readout: start the readout's weights at 0 (``mup``'s ``readout_zero_init``).
        model: the network at each width: ``None`` (the built-in MLP with ``depth``,
            ``activation``, ``bias``), a class or function with a width argument, a
            ``LocalLearningModule`` class, or ``{class_path, init_args, width_argument}``
            (see :mod:`lightning_local.sweeps.components`).
        data: ``None`` (``dataset``), a ``LightningDataModule`` (class, instance or
            ``{class_path, init_args}``) or ``(x_train, y_train, x_test, y_test)``.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (muP's tables for each).
    """

    rules: Sequence[str] = ("bp",)
    parametrizations: Sequence[str] = ("sp", "mup")
    widths: Sequence[int] = (64, 128, 256)
    lrs: Sequence[float] = field(default_factory=lambda: log2_grid(-6, 1))
    seeds: Sequence[int] = (0,)
    epochs: int = 5
    steps: int | None = None
    dataset: str = "mnist1d"
    data_dir: str | None = None
    num_samples: int = 5000
    data_seed: int = 42
    batch_size: int = 128
    base_width: int = 64
    depth: int = 3
    activation: str = "tanh"
    bias: bool = False
    loss: str = "mse"
    momentum: float = 0.0
    output_weight_exponent: float = 0.0
    divergence_factor: float = 100.0
    zero_readout: bool = False
    model: Any = None
    data: Any = None
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        self.model = ModelSpec.of(self.model)
        self.data = DataSpec.of(self.data)
        self.optimizer = check_optimizer(self.optimizer)
        for name in ("rules", "parametrizations", "widths", "lrs", "seeds"):
            if not list(getattr(self, name)):
                raise LocalLearningError(
                    f"the sweep's {name} list is empty. Fix: give at least one value."
                )
        if self.steps is None and self.epochs < 1 or self.steps is not None and self.steps < 1:
            raise LocalLearningError("the budget must be at least 1 epoch or 1 step.")
        if any(lr <= 0 or not math.isfinite(lr) for lr in self.lrs):
            raise LocalLearningError(f"learning rates must be positive, got {list(self.lrs)}.")
        for rule in self.rules:
            parse_variant(rule)
        for param in self.parametrizations:
            make_parametrization(param, self.output_weight_exponent)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON values (the model and data as their specs)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("model", "data"):
            values[name] = None if values[name] is None else values[name].to_dict()
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    def run_specs(self) -> list[dict[str, Any]]:
        """One spec per run (with its ``key``), in the order rules, params, widths, lrs, seeds."""
        specs = []
        for rule in self.rules:
            variant = parse_variant(rule)
            hparams = variant.hparams(self.loss)
            for param in self.parametrizations:
                param_name = _param_label(param, self.output_weight_exponent, variant.family)
                for width in self.widths:
                    for lr in self.lrs:
                        for seed in self.seeds:
                            spec = dict(
                                rule=variant.name, rule_family=variant.family,
                                rule_hparams=hparams, parametrization=param_name,
                                width=int(width), lr=float(lr), seed=int(seed),
                                epochs=None if self.steps is not None else int(self.epochs),
                                steps=None if self.steps is None else int(self.steps),
                                dataset=self.dataset, num_samples=self.num_samples,
                                data_seed=self.data_seed, batch_size=self.batch_size,
                                base_width=self.base_width, depth=self.depth,
                                activation=self.activation, bias=self.bias, loss=self.loss,
                                momentum=self.momentum,
                                output_weight_exponent=self.output_weight_exponent,
                                divergence_factor=self.divergence_factor,
                            )
                            # only non-default entries: keeps the keys of earlier sweeps valid
                            if self.zero_readout:
                                spec["zero_readout"] = True
                            if self.optimizer != "sgd":
                                spec["optimizer"] = self.optimizer
                            if self.model is not None:
                                spec["model"] = self.model.to_dict()
                                for name in ("depth", "activation", "bias"):
                                    spec.pop(name)
                            if self.data is not None:
                                spec["data"] = self.data.to_dict()
                                for name in ("dataset", "num_samples", "data_seed"):
                                    spec.pop(name)
                            spec["key"] = run_key(spec)
                            spec["_param"], spec["_data_dir"] = param, self.data_dir
                            spec["_model"], spec["_data"] = self.model, self.data
                            specs.append(spec)
        return specs


def _param_label(param: str, g: float, family: str) -> str:
    if str(param).lower() == "mup" and g != 0.0 and family == "pc":
        return f"mup:g={g:g}"
    return str(param).lower()


@dataclass
class SweepResult:
    """What :func:`sweep` produced.

    Attributes:
        records: this sweep's records (from ``results.jsonl``, old and new).
        best: the best lr per (rule, parametrization, width) by ``metric``.
        table: the markdown tables (best lr and its shift; metric per width at a fixed lr).
        executed: runs trained by this call; ``skipped``: runs found already finished.
        seconds: wall time of this call; ``run_seconds``: summed time of all its runs.
        results_path, plot_path, table_path: the files written.
    """

    records: list[dict[str, Any]]
    best: list[BestLR]
    table: str
    executed: int
    skipped: int
    seconds: float
    run_seconds: float
    results_path: Path
    plot_path: Path | None
    table_path: Path


class _Diverged(Exception):
    pass


@torch.no_grad()
def _evaluate(rule: LocalRule, network: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean loss and accuracy of the feedforward output on ``(x, y)``, in chunks."""
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], 4096):
        inputs, targets = x[start:start + 4096], y[start:start + 4096]
        output = rule.predict(network, inputs)
        loss_sum += float(rule.loss.per_sample(output, targets).sum())
        correct += int((output.argmax(1) == targets).sum())
    return loss_sum / x.shape[0], correct / x.shape[0]


def _spec_data(spec: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return load_dataset(
        spec.get("dataset", "mnist1d"), spec.get("_data_dir"), spec.get("num_samples", 5000),
        spec.get("data_seed", 42), data=spec.get("_data") or spec.get("data"),
    )


def build_trial(spec: Mapping[str, Any]) -> Experiment:
    """The wired run of one spec of :meth:`SweepConfig.run_specs` (seed torch first)."""
    x_train, y_train, _, _ = _spec_data(spec)
    return build_experiment(
        spec["rule"], spec.get("_param", spec["parametrization"]), spec["width"], spec["lr"],
        in_features=int(x_train[0].numel()), num_classes=int(y_train.max()) + 1,
        base_width=spec["base_width"], depth=spec.get("depth", 3),
        activation=spec.get("activation", "tanh"), bias=spec.get("bias", False),
        loss=spec["loss"], momentum=spec["momentum"],
        output_weight_exponent=spec["output_weight_exponent"],
        optimizer=spec.get("optimizer", "sgd"), zero_readout=spec.get("zero_readout", False),
        model=spec.get("_model") or spec.get("model"),
    )


def train_run(spec: dict[str, Any], *, keep: list[Experiment] | None = None) -> dict[str, Any]:
    """Train one run described by a spec of :meth:`SweepConfig.run_specs`; return its record.

    The init is seeded with the run's seed and the minibatches are slices of a permutation
    drawn per epoch by a generator seeded with it, so a ``Trainer.fit`` of the same module
    with the same seed and batch order ends with the same weights. The global torch random
    state is restored afterwards (``torch.random.fork_rng``). ``keep``, when given, receives
    the trained run.
    """
    x_train, y_train, x_test, y_test = _spec_data(spec)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        experiment = build_trial(spec)
        if keep is not None:
            keep.append(experiment)
        rule, network = experiment.rule, experiment.network
        generator = torch.Generator().manual_seed(spec["seed"])
        budget = spec["steps"]
        epochs = spec["epochs"] if budget is None else math.inf
        steps, epoch, first = 0, 0, None
        epoch_losses: list[float] = []
        reason = None
        batch = spec["batch_size"]
        try:
            while epoch < epochs and (budget is None or steps < budget):
                order = torch.randperm(x_train.shape[0], generator=generator)
                total, count = 0.0, 0
                for begin in range(0, x_train.shape[0], batch):
                    if budget is not None and steps >= budget:
                        break
                    index = order[begin:begin + batch]
                    result = rule.step(network, x_train[index], y_train[index],
                                       experiment.optimizer)
                    loss = float(result.loss)
                    steps += 1
                    first = loss if first is None else first
                    if not math.isfinite(loss):
                        raise _Diverged(f"non-finite loss at step {steps}")
                    if loss > spec["divergence_factor"] * max(first, 1e-12):
                        raise _Diverged(
                            f"loss {loss:.3g} at step {steps} exceeds "
                            f"{spec['divergence_factor']:g} x the first batch loss {first:.3g}"
                        )
                    total, count = total + loss * index.numel(), count + index.numel()
                epoch += 1
                epoch_losses.append(total / max(count, 1))
        except NonFiniteEnergyError as error:
            reason = f"non-finite energy at step {steps + 1}: {str(error).split('.')[0]}"
        except torch.linalg.LinAlgError as error:
            reason = f"linear solve failed at step {steps + 1}: {str(error).splitlines()[0]}"
        except _Diverged as error:
            reason = str(error)
        train_loss = test_loss = train_acc = test_acc = None
        if reason is None:
            train_loss, train_acc = _evaluate(rule, network, x_train, y_train)
            test_loss, test_acc = _evaluate(rule, network, x_test, y_test)
            if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                reason = "non-finite loss after training"
                train_loss = test_loss = train_acc = test_acc = None
    public = {k: v for k, v in spec.items() if not k.startswith("_")}
    return dict(
        key=public.pop("key"),
        rule=public.pop("rule"),
        parametrization=public.pop("parametrization"),
        width=public.pop("width"),
        lr=public.pop("lr"),
        seed=public.pop("seed"),
        train_loss=train_loss,
        test_loss=test_loss,
        test_acc=test_acc,
        train_acc=train_acc,
        diverged=reason is not None,
        diverged_reason=reason,
        seconds=time.perf_counter() - start,
        steps_done=steps,
        epoch_train_loss=epoch_losses,
        **public,
    )


def _check_buildable(specs: Sequence[dict[str, Any]]) -> None:
    """Build one trial per (rule, parametrization) at the smallest width before any training,
    so a network the rule cannot take fails now, not after hours of other runs."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for spec in specs:
        key = (spec["rule"], spec["parametrization"])
        if key not in seen or spec["width"] < seen[key]["width"]:
            seen[key] = spec
    with torch.random.fork_rng(devices=[]):
        for spec in seen.values():
            build_trial(spec)


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _describe(record: dict[str, Any]) -> str:
    head = (
        f"{record['rule']} {record['parametrization']} width={record['width']} "
        f"lr=2^{math.log2(record['lr']):g} seed={record['seed']}"
    )
    if record["diverged"]:
        return f"{head}: diverged ({record['diverged_reason']})"
    return (
        f"{head}: train_loss={record['train_loss']:.4g} test_acc={record['test_acc']:.3f} "
        f"({record['seconds']:.1f}s)"
    )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sweep(
    config: SweepConfig,
    output: str | os.PathLike[str] = "sweep",
    *,
    workers: int = 1,
    threads: int | None = None,
    metric: str = "train_loss",
    plot: bool = True,
    log: Callable[[str], None] | None = _stderr,
    log_to: Logger | Iterable[Logger] | None = None,
) -> SweepResult:
    """Run every run of ``config`` not yet in ``<output>/results.jsonl``; write the table and
    ``transfer.png``; return a :class:`SweepResult`.

    Args:
        config: the grid, budget, data and model.
        output: the output folder (created).
        workers: processes running runs in parallel (1: in this process).
        threads: torch threads per worker (default: 1 when ``workers > 1``, else unchanged).
        metric: what "best lr" means: ``"train_loss"`` (lowest final training loss) or
            ``"test_acc"``/``"train_acc"`` (highest) or ``"test_loss"``.
        plot: write ``transfer.png``.
        log: where progress lines go (``None``: silent).
        log_to: Lightning loggers that get the config and ``metric`` as hyperparameters and,
            the ``WandbLogger`` among them, ``transfer.png`` as the image ``figures/transfer``
            and the best lrs as the table ``tables/best_lr`` (see :mod:`lightning_local.loggers`).
    """
    if workers < 1:
        raise LocalLearningError(f"workers must be >= 1, got {workers}.")
    log = log or (lambda message: None)
    begin = time.perf_counter()
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    results_path = folder / "results.jsonl"
    repair_results(results_path)
    specs = config.run_specs()
    finished = {record.get("key") for record in read_results(results_path)}
    pending = [spec for spec in specs if spec["key"] not in finished]
    skipped = len(specs) - len(pending)
    atomic_write_text(folder / "sweep_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    log(f"sweep: {len(specs)} runs, {skipped} already finished, {len(pending)} to run "
        f"({workers} worker{'s' if workers > 1 else ''}) -> {results_path}")
    if pending:
        _spec_data(pending[0])
        _check_buildable(pending)
    run_seconds = 0.0

    def finish(record: dict[str, Any], done: int) -> None:
        nonlocal run_seconds
        append_result(results_path, record)
        run_seconds += record["seconds"]
        elapsed = time.perf_counter() - begin
        remaining = elapsed / done * (len(pending) - done)
        log(f"[{done}/{len(pending)}] {_describe(record)} | elapsed {_clock(elapsed)}, "
            f"left ~{_clock(remaining)}")

    if workers == 1 or len(pending) <= 1:
        previous = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            for done, spec in enumerate(pending, start=1):
                finish(train_run(spec), done)
        finally:
            torch.set_num_threads(previous)
    else:
        _run_parallel(pending, workers, threads or 1, finish)
    records = [r for r in read_results(results_path) if r.get("key") in {s["key"] for s in specs}]
    best = best_learning_rates(records, metric)
    table = (
        format_best_lr_table(best, metric) + "\n\n" + format_wider_is_better_table(best, metric)
    )
    seconds = time.perf_counter() - begin
    table_path = folder / "best_lr.md"
    atomic_write_text(
        table_path,
        table + f"\n\nThis call: {len(pending)} runs in {_clock(seconds)} wall time "
        f"({workers} worker{'s' if workers > 1 else ''}); summed run time {_clock(run_seconds)}."
        + "\n"
    )
    plot_path = None
    if plot and records:
        from lightning_local.diagnostics.plots import plot_transfer

        plot_path = plot_transfer(records, folder / "transfer.png", metric=metric)
    if log_to is not None:
        _log_sweep(log_to, config, metric, best, plot_path)
    return SweepResult(records, best, table, len(pending), skipped, seconds, run_seconds,
                       results_path, plot_path, table_path)


def _log_sweep(
    loggers: Logger | Iterable[Logger], config: SweepConfig, metric: str,
    best: Sequence[BestLR], plot_path: Path | None,
) -> None:
    from lightning.pytorch.loggers import Logger

    from lightning_local.loggers import log_figure, log_table

    loggers = [loggers] if isinstance(loggers, Logger) else list(loggers)
    for logger in loggers:
        logger.log_hyperparams({**config.to_dict(), "metric": metric})
    if plot_path is not None:
        log_figure(loggers, "figures/transfer", plot_path)
    log_table(loggers, "tables/best_lr", [
        dict(rule=b.rule, parametrization=b.parametrization, width=b.width, lr=b.lr,
             log2_lr=b.log2_lr, score=b.score if math.isfinite(b.score) else None,
             at_edge=b.at_edge)
        for b in best
    ])


def _run_parallel(
    pending: list[dict[str, Any]], workers: int, threads: int,
    finish: Callable[[dict[str, Any], int], None],
) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of a threaded torch runtime
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(train_run, spec) for spec in pending}
        done = 0
        try:
            while futures:
                finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    done += 1
                    finish(future.result(), done)
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
