"""A trial as every backend runs it: :func:`run_trial` never raises for a run's own failure.

:func:`~lightning_local.sweeps.training.train_run` records divergence itself. Any other
exception of a trial (a bug in a user's model, a CUDA out-of-memory, a data file that cannot
be read, ...) is caught here and turned into a *failed* record (:func:`failed_record`) with
``status = "failed"``, ``error = "<type>: <message>"`` and the traceback's last lines, so one
bad trial never stops the sweep. ``KeyboardInterrupt`` and ``SystemExit`` still stop it.

A trial sets its own torch thread count (``threads``) and runs on ``device``; the backends
choose both (:mod:`lightning_local.sweeps.backends`).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Mapping
from typing import Any

import torch

from lightning_local.sweeps.training import make_record, train_run

__all__ = ["error_text", "failed_record", "run_trial"]

_TRACEBACK_LINES = 30


def error_text(error: BaseException) -> str:
    """``"<type>: <message>"`` of an exception (the message's first 2000 characters)."""
    message = str(error).strip()
    name = type(error).__name__
    return f"{name}: {message[:2000]}" if message else name


def failed_record(
    spec: Mapping[str, Any],
    error: str,
    *,
    seconds: float = 0.0,
    trace: str | None = None,
    attempts: int = 1,
) -> dict[str, Any]:
    """The record of a trial that did not finish: the run's identity and settings, no
    metrics, ``status = "failed"`` and ``error``."""
    record = make_record(
        spec,
        train_loss=None,
        test_loss=None,
        test_acc=None,
        train_acc=None,
        diverged=False,
        diverged_reason=None,
        status="failed",
        error=error,
        traceback=trace,
        attempts=attempts,
        seconds=float(seconds),
    )
    return record


def run_trial(
    spec: dict[str, Any], *, threads: int | None = None, device: str | None = None
) -> dict[str, Any]:
    """Train one run (:func:`~lightning_local.sweeps.training.train_run`) with ``threads``
    torch threads on ``device``; a trial that raises gives its failed record instead."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        return train_run(spec, device=device)
    except Exception as error:  # every failure of the trial itself becomes a record
        lines = traceback.format_exc().rstrip().splitlines()[-_TRACEBACK_LINES:]
        return failed_record(spec, error_text(error), seconds=time.perf_counter() - start,
                             trace="\n".join(lines))
    finally:
        if threads is not None:
            torch.set_num_threads(previous)
