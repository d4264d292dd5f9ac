"""Weights & Biases for a sweep: one W&B run per trial, in one group per sweep, plus the
sweep's own run (its arguments, ``transfer.png`` and the best-lr table).

Trials are logged by the driver, from their records, as each record is written
(:class:`WandbTrialLogger`): each trial becomes a run of ``job_type="trial"`` whose config is
the run's settings (run key included) and whose history is the training loss per epoch, with
the final metrics, the status and any error in its summary. So trials on Ray workers or on
other nodes need no W&B setup, and a sweep resumed, sharded or run on another backend fills
the same group. The sweep's own run (``job_type="sweep"``) gets the figures and tables as
before (:func:`sweep_wandb_run`).

Offline by default: runs go to ``<output>/wandb/`` and ``wandb sync <run folder>`` uploads
them later; ``mode="online"`` uploads as they are written. Per-trial runs beside the sweep's
own run need ``wandb.init(reinit="create_new")`` (wandb 0.19.10 or newer).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_local.errors import LocalLearningError

if TYPE_CHECKING:
    from lightning.pytorch.loggers import Logger

__all__ = ["WANDB_MODES", "WandbTrialLogger", "default_group", "sweep_wandb_run"]

WANDB_MODES = ("offline", "online")

_SUMMARY = ("train_loss", "test_loss", "test_acc", "train_acc", "status", "diverged",
            "diverged_reason", "error", "seconds", "steps_done", "device", "attempts")
_NOT_CONFIG = set(_SUMMARY) | {"epoch_train_loss", "traceback"}


def default_group(output: str | os.PathLike[str]) -> str:
    """The W&B group of a sweep writing to ``output``: ``sweep-<folder name>``."""
    return f"sweep-{Path(output).resolve().name}"


def _trial_name(record: Mapping[str, Any]) -> str:
    lr = record.get("lr")
    lr_text = f"2^{math.log2(lr):g}" if isinstance(lr, (int, float)) and lr > 0 else str(lr)
    return (f"{record.get('rule')} {record.get('parametrization')} w={record.get('width')} "
            f"lr={lr_text} s={record.get('seed')}")


@dataclass
class WandbTrialLogger:
    """Log each trial record as its own W&B run; a sweep calls it once per new record.

    Args:
        group: the W&B group of the sweep (every trial and the sweep's own run).
        save_dir: folder under which ``wandb/`` run folders are written (the sweep's output).
        project: the W&B project.
        mode: ``"offline"`` (default) or ``"online"``.
    """

    group: str
    save_dir: str | os.PathLike[str] = "."
    project: str = "lightning-local"
    mode: str = "offline"

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise LocalLearningError(
                f"unknown W&B mode {self.mode!r}. Fix: use one of {WANDB_MODES}."
            )
        import wandb

        version = tuple(int(p) for p in wandb.__version__.split(".")[:3] if p.isdigit())
        if version < (0, 19, 10):
            raise LocalLearningError(
                f"per-trial W&B runs need wandb 0.19.10 or newer, found {wandb.__version__}. "
                "Fix: pip install -U wandb."
            )

    def __call__(self, record: Mapping[str, Any]) -> None:
        import wandb

        Path(self.save_dir).mkdir(parents=True, exist_ok=True)
        config = {k: v for k, v in record.items() if k not in _NOT_CONFIG}
        run = wandb.init(
            project=self.project, group=self.group, job_type="trial",
            name=_trial_name(record), dir=os.fspath(self.save_dir), mode=self.mode,
            config=config, reinit="create_new",
        )
        try:
            for epoch, loss in enumerate(record.get("epoch_train_loss") or [], start=1):
                run.log({"train/loss_epoch": loss, "epoch": epoch}, step=epoch)
            run.summary.update({k: record.get(k) for k in _SUMMARY if k in record})
        finally:
            run.finish(exit_code=1 if record.get("status") == "failed" else 0)


@contextmanager
def sweep_wandb_run(
    args: argparse.Namespace, name: str, save_dir: str | os.PathLike[str], group: str,
    mode: str = "offline",
) -> Iterator[list[Logger] | None]:
    """The sweep's own W&B run (``job_type="sweep"``) for a command with ``--wandb``.

    Yields ``None`` without ``--wandb``; otherwise ``[logger]`` (a ``WandbLogger``) with the
    command's arguments in its config (key ``arguments``). On exit the run is finished and,
    offline, the ``wandb sync`` command that uploads the sweep's runs is printed to stderr.
    """
    from lightning_local.diagnostics.loggers import command_wandb_run

    with command_wandb_run(
        args, name, save_dir, mode=mode, group=group, job_type="sweep",
        sync_hint=lambda folder: (
            f"the trials' runs (group {group}): wandb sync {folder.parent}/offline-run-*"),
    ) as loggers:
        yield loggers
