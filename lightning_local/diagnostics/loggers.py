"""Weights & Biases through Lightning's ``WandbLogger``: offline by default, figures as images.

What a run holds (with the callbacks of :mod:`lightning_local.diagnostics.callbacks`):

- every metric the module logs: ``train/loss`` and the rule's diagnostics, per layer as
  ``train/<name>/layer_<l>`` (PC: ``energy_per_layer``, ``state_update_rms``,
  ``inference_steps``, ``energy_before``/``energy_after``; TP: ``local_loss``,
  ``reconstruction_error``, ``target_norm``); epoch metrics (``train/loss_epoch``,
  ``val/loss``, ``val/acc``) are synchronised across processes;
- ``train/bp_cosine/layer_<l>`` from
  :class:`~lightning_local.diagnostics.callbacks.LocalUpdateAlignment`;
- the run config with the rule, the parametrization and a base-shape table from
  :class:`~lightning_local.diagnostics.callbacks.LogRunConfig`;
- figures (sweeps, coordinate checks) through :func:`log_figure`, as image panels, and their
  tables (best lr per width, slopes against width) through :func:`log_table`.

``lightning-local sweep --wandb`` and ``lightning-local coord-check --wandb`` write such an
offline run into their output folder (:func:`add_wandb_arguments`, :func:`command_wandb_run`).

Lightning's loggers write from global rank 0 only, so a DDP run is one W&B run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import Logger, WandbLogger

__all__ = [
    "add_wandb_arguments",
    "command_wandb_run",
    "log_figure",
    "log_table",
    "make_wandb_logger",
]


def make_wandb_logger(
    project: str = "lightning-local",
    *,
    name: str | None = None,
    save_dir: str | os.PathLike[str] = ".",
    offline: bool = True,
    mode: Literal["online", "offline", "disabled"] | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A ``WandbLogger`` that never touches the network unless asked to.

    Args:
        project: the W&B project.
        name: the run's display name.
        save_dir: folder under which ``wandb/`` run folders are written (created if needed).
        offline: write the run locally (``wandb sync <run folder>`` uploads it later).
        mode: ``wandb.init``'s mode; ``"disabled"`` logs nothing at all (tests), ``"online"``
            uploads live. Overrides ``offline``.
        **kwargs: passed on to ``WandbLogger`` and ``wandb.init`` (``tags``, ``group``, ...).
    """
    if mode is not None:
        kwargs["mode"] = mode
        offline = mode == "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(project=project, name=name, save_dir=os.fspath(save_dir),
                       offline=offline, **kwargs)


def log_figure(
    loggers: Logger | Iterable[Logger] | None,
    key: str,
    figures: Any | Sequence[Any],
    *,
    step: int | None = None,
    captions: Sequence[str] | None = None,
) -> int:
    """Upload matplotlib figures or image files (paths) as one W&B image panel ``key``.

    ``loggers`` is a logger, ``trainer.loggers`` or ``None``; every ``WandbLogger`` among them
    gets the images (``WandbLogger.log_image``, rank 0 only), other loggers are skipped.
    Returns how many loggers received them.
    """
    figures = list(figures) if isinstance(figures, (list, tuple)) else [figures]
    images = [os.fspath(f) if isinstance(f, (str, os.PathLike)) else f for f in figures]
    extra = {} if captions is None else {"caption": list(captions)}
    written = _wandb_loggers(loggers)
    for logger in written:
        logger.log_image(key, images=images, step=step, **extra)
    return len(written)


def log_table(
    loggers: Logger | Iterable[Logger] | None, key: str, rows: Sequence[Mapping[str, Any]]
) -> int:
    """Upload ``rows`` (dicts with the same keys: the columns) as one ``wandb.Table`` ``key``.

    Like :func:`log_figure`, only the ``WandbLogger`` among ``loggers`` get it; returns how many.
    """
    written = _wandb_loggers(loggers)
    columns = list(rows[0]) if rows else []
    data = [[row.get(column) for column in columns] for row in rows]
    for logger in written:
        logger.log_table(key, columns=columns, data=data)
    return len(written)


def _wandb_loggers(loggers: Logger | Iterable[Logger] | None) -> list[WandbLogger]:
    if loggers is None:
        return []
    loggers = [loggers] if isinstance(loggers, Logger) else list(loggers)
    return [logger for logger in loggers if isinstance(logger, WandbLogger)]


def add_wandb_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--wandb`` and ``--wandb-project`` to a command's parser."""
    group = parser.add_argument_group("Weights & Biases")
    group.add_argument("--wandb", action="store_true",
                       help="also log the figures, tables and arguments to an offline W&B run "
                       "in the output folder (`wandb sync <run folder>` uploads it)")
    group.add_argument("--wandb-project", default="lightning-local", help="the W&B project")


@contextmanager
def command_wandb_run(
    args: argparse.Namespace,
    name: str,
    save_dir: str | os.PathLike[str],
    *,
    sync_hint: Callable[[Path], str] | None = None,
    **logger_options: Any,
) -> Iterator[list[Logger] | None]:
    """An offline W&B run for a command parsed with :func:`add_wandb_arguments`.

    Yields ``None`` without ``--wandb``; otherwise ``[logger]`` with the command's arguments
    already in its config (key ``arguments``). On exit the run is finished and its folder and
    the ``wandb sync`` command that uploads it are printed to stderr (plus ``sync_hint`` of the
    run folder, when given). ``logger_options`` go to :func:`make_wandb_logger` (``mode``,
    ``group``, ``job_type``, ...).
    """
    if not args.wandb:
        yield None
        return
    logger = make_wandb_logger(args.wandb_project, name=name, save_dir=save_dir,
                               **logger_options)
    logger.log_hyperparams({"arguments": vars(args)})
    try:
        yield [logger]
    finally:
        run = logger.experiment
        folder = Path(run.dir).parent
        run.finish()
        if run.offline:
            extra = f"\n{sync_hint(folder)}" if sync_hint is not None else ""
            print(f"W&B offline run: {folder}\nupload it with: wandb sync {folder}{extra}",
                  file=sys.stderr)
