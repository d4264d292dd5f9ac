"""The width x learning-rate sweep: train every (rule, parametrization, width, lr, seed) run.

:func:`sweep` is the driver. It expands the grid (:meth:`SweepConfig.run_specs`), takes this
command's share of it (``shard``, :mod:`lightning_local.sweeps.shards`), drops the runs
already finished in any results file of the output folder (resume by run key), and hands the
rest to a backend (:mod:`lightning_local.sweeps.backends`: this process, local processes, or
Ray tasks). Each trial is trained by :func:`~lightning_local.sweeps.training.train_run` (plain
PyTorch, seeded data order, divergence recorded) inside
:func:`~lightning_local.sweeps.trials.run_trial` (any other exception: a failed record).

The driver is the only writer of its results file (``<output>/results.jsonl``, or the shard's
``results.shard-<i>-of-<n>.jsonl``): it appends each record as one line, flushed and
``fsync``-ed, as the trial finishes, so a killed sweep loses only the trials in flight, and
rerunning the same command runs only the unfinished trials (and the failed ones, unless
``retry_failed=False``). The tables (``best_lr.md``) and ``transfer.png`` are written from
every results file of the folder, merged, without the failed runs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_local._atomic import atomic_write_text
from lightning_local.errors import LocalLearningError
from lightning_local.sweeps.backends import Backend, make_backend
from lightning_local.sweeps.components import DataSpec, ModelSpec
from lightning_local.sweeps.experiment import make_parametrization, parse_variant
from lightning_local.sweeps.results import (
    BestLR,
    append_result,
    best_learning_rates,
    format_best_lr_table,
    format_wider_is_better_table,
    merge_records,
    read_results,
    record_status,
    repair_results,
    run_key,
)
from lightning_local.sweeps.shards import Shard, parse_shard, result_files, results_path
from lightning_local.sweeps.training import build_trial, check_buildable, spec_data, train_run
from lightning_local.wiring import check_optimizer

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

# build_trial and train_run live in lightning_local.sweeps.training; re-exported here.
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
        records: this sweep's finished runs (``ok`` or diverged), from every results file of
            the output folder, in grid order: what the tables are made of.
        best: the best lr per (rule, parametrization, width) by ``metric``.
        table: the markdown tables (best lr and its shift; metric per width at a fixed lr).
        executed: runs trained by this call; ``skipped``: runs found already finished.
        seconds: wall time of this call; ``run_seconds``: summed time of all its runs.
        results_path: the file this call wrote (``results.jsonl`` or the shard's file);
            plot_path, table_path: the other files written.
        failed: this sweep's failed runs (``status = "failed"``, with their ``error``), in
            grid order; they are not in ``records`` nor in the tables.
        backend: how the trials ran (:meth:`Backend.describe`); shard: this call's shard.
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
    failed: list[dict[str, Any]] = field(default_factory=list)
    backend: str = ""
    shard: Shard | None = None


def _describe(record: dict[str, Any]) -> str:
    head = (
        f"{record['rule']} {record['parametrization']} width={record['width']} "
        f"lr=2^{math.log2(record['lr']):g} seed={record['seed']}"
    )
    if record_status(record) == "failed":
        return f"{head}: FAILED ({record.get('error')})"
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
    backend: str | Backend = "local",
    shard: str | Shard | None = None,
    retry_failed: bool = True,
    metric: str = "train_loss",
    plot: bool = True,
    log: Callable[[str], None] | None = _stderr,
    log_to: Logger | Iterable[Logger] | None = None,
    trial_logger: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Run every run of ``config`` (of this ``shard``) not yet finished in ``output``; write
    the tables and ``transfer.png``; return a :class:`SweepResult`.

    Args:
        config: the grid, budget, data and model.
        output: the output folder (created).
        workers: local processes running runs in parallel (1: in this process).
        threads: torch threads per trial (local default: 1 when ``workers > 1``, else
            unchanged; Ray: CPUs reserved per trial, default 1).
        backend: ``"local"`` (default), ``"ray"`` (a local Ray instance, or the one this
            process joined), or a :class:`~lightning_local.sweeps.backends.Backend`, e.g.
            ``RayBackend(address="auto", gpus_per_trial=0.5)`` (then leave ``workers`` and
            ``threads`` out: they are the backend's own).
        shard: ``"i/n"`` or a :class:`~lightning_local.sweeps.shards.Shard`: run only the
            runs ``j`` of the grid with ``j mod n == i``, into ``results.shard-i-of-n.jsonl``.
        retry_failed: run failed runs again (default); ``False`` keeps their failed records.
        metric: what "best lr" means: ``"train_loss"`` (lowest final training loss) or
            ``"test_acc"``/``"train_acc"`` (highest) or ``"test_loss"``.
        plot: write ``transfer.png``.
        log: where progress lines go (``None``: silent).
        log_to: Lightning loggers that get the config and ``metric`` as hyperparameters and,
            the ``WandbLogger`` among them, ``transfer.png`` as the image ``figures/transfer``
            and the best lrs as the table ``tables/best_lr`` (see :mod:`lightning_local.loggers`).
        trial_logger: called in this process with each new record once it is written, e.g.
            :class:`~lightning_local.sweeps.wandb_logging.WandbTrialLogger` (one W&B run per
            trial); an error in it is reported and the sweep goes on.
    """
    if workers < 1:
        raise LocalLearningError(f"workers must be >= 1, got {workers}.")
    if isinstance(backend, str):
        local = backend.lower() == "local"
        engine = make_backend(
            backend, workers=workers if local or workers != 1 else None, threads=threads
        )
    elif workers != 1 or threads is not None:
        raise LocalLearningError(
            "workers and threads belong to the backend when one is given. Fix: e.g. "
            "backend=LocalBackend(workers=2, threads=1) or RayBackend(threads=2)."
        )
    else:
        engine = make_backend(backend)
    part = parse_shard(shard)
    log = log or (lambda message: None)
    begin = time.perf_counter()
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    own_path = results_path(folder, part)
    repair_results(own_path)  # only this writer's own file: other shards may be writing theirs
    specs = config.run_specs()
    share = part.select(specs) if part is not None else specs
    previous = merge_records(r for path in result_files(folder) for r in read_results(path))
    finished = {
        r.get("key") for r in previous if not retry_failed or record_status(r) != "failed"
    }
    pending = [spec for spec in share if spec["key"] not in finished]
    skipped = len(share) - len(pending)
    atomic_write_text(folder / "sweep_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    how = engine.describe()
    of = f" (shard {part}: {len(share)} of {len(specs)})" if part is not None else ""
    log(f"sweep: {len(share)} runs{of}, {skipped} already finished, {len(pending)} to run "
        f"({how}) -> {own_path}")
    if pending:
        spec_data(pending[0])
        check_buildable(pending)
    run_seconds = 0.0
    written: set[str] = set()

    def finish(record: dict[str, Any]) -> None:
        nonlocal run_seconds
        if record.get("key") in written:  # a record delivered twice is written once
            return
        append_result(own_path, record)
        written.add(record.get("key"))
        run_seconds += float(record.get("seconds") or 0.0)
        done = len(written)
        elapsed = time.perf_counter() - begin
        remaining = elapsed / done * (len(pending) - done)
        log(f"[{done}/{len(pending)}] {_describe(record)} | elapsed {_clock(elapsed)}, "
            f"left ~{_clock(remaining)}")
        if trial_logger is not None:
            try:
                trial_logger(record)
            except Exception as error:  # the record is safe on disk: report, go on
                log(f"trial logger failed for {record.get('key')}: "
                    f"{type(error).__name__}: {error}")

    if pending:
        engine.run(pending, finish, log)
    order = {spec["key"]: index for index, spec in enumerate(specs)}
    merged = merge_records(r for path in result_files(folder) for r in read_results(path))
    mine = sorted((r for r in merged if r.get("key") in order), key=lambda r: order[r["key"]])
    records = [r for r in mine if record_status(r) != "failed"]
    failed = [r for r in mine if record_status(r) == "failed"]
    best = best_learning_rates(records, metric)
    table = (
        format_best_lr_table(best, metric) + "\n\n" + format_wider_is_better_table(best, metric)
    )
    seconds = time.perf_counter() - begin
    table_path = folder / "best_lr.md"
    missing = len(specs) - len(records) - len(failed)
    atomic_write_text(
        table_path,
        table + f"\n\nThis call{of}: {len(pending)} runs in {_clock(seconds)} wall time "
        f"({how}); summed run time {_clock(run_seconds)}."
        + (f" {missing} of the grid's {len(specs)} runs not run yet." if missing else "")
        + _failures_note(failed) + "\n"
    )
    if failed:
        log(f"sweep: {len(failed)} run(s) failed (not in the tables; rerun the command to "
            f"retry them): {', '.join(sorted({str(r.get('error')) for r in failed})[:3])}")
    plot_path = None
    if plot and records:
        from lightning_local.diagnostics.plots import plot_transfer

        plot_path = plot_transfer(records, folder / "transfer.png", metric=metric)
    if log_to is not None:
        _log_sweep(log_to, config, metric, best, plot_path)
    return SweepResult(records, best, table, len(pending), skipped, seconds, run_seconds,
                       own_path, plot_path, table_path, failed, how, part)


def _failures_note(failed: Sequence[Mapping[str, Any]], limit: int = 10) -> str:
    if not failed:
        return ""
    lines = [f"\n\n{len(failed)} run(s) failed (not in the tables; run again on resume):", ""]
    for record in failed[:limit]:
        lines.append(f"- {_describe(dict(record))} [{record.get('key')}]")
    if len(failed) > limit:
        lines.append(f"- ... and {len(failed) - limit} more (status \"failed\" in the results)")
    return "\n".join(lines)


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


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
