"""Weights & Biases through Lightning's ``WandbLogger``: offline by default, figures as images.

What a run holds (with the callbacks of :mod:`lightning_local.callbacks`):

- every metric the module logs: ``train/loss`` and the rule's diagnostics, per layer as
  ``train/<name>/layer_<l>`` (PC: ``energy_per_layer``, ``state_update_rms``,
  ``inference_steps``, ``energy_before``/``energy_after``; TP: ``local_loss``,
  ``reconstruction_error``, ``target_norm``); epoch metrics (``train/loss_epoch``,
  ``val/loss``, ``val/acc``) are synchronised across processes;
- ``train/bp_cosine/layer_<l>`` from :class:`~lightning_local.callbacks.LocalUpdateAlignment`;
- the run config with the rule, the parametrization and a base-shape table from
  :class:`~lightning_local.callbacks.LogRunConfig`;
- figures (sweeps, coordinate checks) through :func:`log_figure`, as image panels.

Lightning's loggers write from global rank 0 only, so a DDP run is one W&B run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import Logger, WandbLogger

__all__ = ["log_figure", "make_wandb_logger"]


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
    if loggers is None:
        return 0
    loggers = [loggers] if isinstance(loggers, Logger) else list(loggers)
    figures = list(figures) if isinstance(figures, (list, tuple)) else [figures]
    images = [os.fspath(f) if isinstance(f, (str, os.PathLike)) else f for f in figures]
    extra = {} if captions is None else {"caption": list(captions)}
    written = 0
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key, images=images, step=step, **extra)
            written += 1
    return written
