"""The seam between a sweep and what runs its trials: the :class:`Backend` protocol.

The driver (:func:`lightning_local.sweeps.runner.sweep`) decides *which* runs are pending
(resume by run key, shards) and is the only writer of the results file; a backend only
decides *where* each pending trial runs. It calls ``finish(record)`` in the driver's process
once per trial, in any order, with the trial's record: finished, diverged or failed
(:mod:`lightning_local.sweeps.trials`). A backend never raises for a trial's failure; it
raises only when it cannot run at all (Ray not installed, a cluster that cannot fit one
trial), before any trial runs, or when the driver itself is interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["Backend", "Finish", "Log"]

Finish = Callable[[dict[str, Any]], None]
"""Called in the driver with each trial's record."""

Log = Callable[[str], None]
"""Where a backend's progress lines go."""


@runtime_checkable
class Backend(Protocol):
    """Runs trials (specs of :meth:`SweepConfig.run_specs`) and hands back their records."""

    name: str
    """Short name for progress lines and ``best_lr.md`` (``"local"``, ``"ray"``)."""

    def describe(self) -> str:
        """One line on how trials run (workers, threads, devices)."""
        ...

    def run(self, specs: Sequence[dict[str, Any]], finish: Finish, log: Log) -> None:
        """Run every spec; call ``finish(record)`` in this process for each one."""
        ...
