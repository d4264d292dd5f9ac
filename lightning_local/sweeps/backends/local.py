"""The default backend: trials in this process, or in a pool of local processes.

``workers = 1`` trains the trials one after another in the driver's process. More workers
start that many processes (``spawn``: no fork of a threaded torch runtime), each with
``threads`` torch threads (default 1), and keep one trial in flight per process.

A worker process that dies (killed by the out-of-memory killer, a segfault in a native
library) breaks the pool: every trial in flight then is *lost*. Lost trials are retried in a
fresh pool, each one alone (nothing else runs beside it), so a trial that kills its worker
again is the one blamed; after ``max_retries`` retries it is recorded as failed and the sweep
goes on. Nothing is offline or optional here: no dependency beyond torch.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import torch

from lightning_local.errors import LocalLearningError
from lightning_local.sweeps.backends.base import Finish, Log
from lightning_local.sweeps.trials import error_text, failed_record, run_trial

__all__ = ["LocalBackend"]


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


@dataclass
class LocalBackend:
    """Trials on this machine.

    Args:
        workers: processes running trials in parallel (1: in the driver's process).
        threads: torch threads per trial (default: 1 with several workers, else unchanged).
        max_retries: how often a trial whose worker process died is run again.
    """

    workers: int = 1
    threads: int | None = None
    max_retries: int = 2
    name: str = "local"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise LocalLearningError(f"workers must be >= 1, got {self.workers}.")
        if self.threads is not None and self.threads < 1:
            raise LocalLearningError(f"threads must be >= 1, got {self.threads}.")
        if self.max_retries < 0:
            raise LocalLearningError(f"max_retries must be >= 0, got {self.max_retries}.")

    def describe(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}"

    def run(self, specs: Sequence[dict[str, Any]], finish: Finish, log: Log) -> None:
        if self.workers == 1 or len(specs) <= 1:
            for spec in specs:
                finish(run_trial(spec, threads=self.threads))
        else:
            self._run_pool(list(specs), finish, log)

    def _pool(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_init_worker,
                                   initargs=(self.threads or 1,))

    def _run_pool(self, specs: list[dict[str, Any]], finish: Finish, log: Log) -> None:
        queue = deque(specs)
        lost_count: dict[str, int] = {}
        running: dict[Future, dict[str, Any]] = {}
        pool = self._pool()
        completed = False
        try:
            while queue or running:
                broken = not self._fill(pool, queue, running, lost_count)
                lost = []
                if running:
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    if broken or any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                        done, _ = wait(running)  # a broken pool fails every trial in flight
                        broken = True
                    for future in done:
                        spec = running.pop(future)
                        error = future.exception()
                        if isinstance(error, BrokenProcessPool):
                            lost.append(spec)
                        elif error is not None:  # e.g. a record that cannot be sent back
                            finish(failed_record(spec, error_text(error)))
                        else:
                            finish(future.result())
                if broken:
                    pool.shutdown(wait=False, cancel_futures=True)
                    self._requeue(lost, queue, lost_count, finish, log)
                    pool = self._pool()
            completed = True
        finally:
            pool.shutdown(wait=completed, cancel_futures=True)

    def _fill(
        self, pool: ProcessPoolExecutor, queue: deque[dict[str, Any]],
        running: dict[Future, dict[str, Any]], lost_count: dict[str, int],
    ) -> bool:
        """Start trials until every worker has one (a retried trial starts only alone);
        ``False`` when the pool turned out broken."""
        while queue and len(running) < self.workers:
            alone = queue[0]["key"] in lost_count
            if running and (alone or any(s["key"] in lost_count for s in running.values())):
                return True
            try:
                future = pool.submit(run_trial, queue[0], threads=self.threads or 1)
            except BrokenProcessPool:
                return False
            running[future] = queue.popleft()
        return True

    def _requeue(
        self, lost: list[dict[str, Any]], queue: deque[dict[str, Any]],
        lost_count: dict[str, int], finish: Finish, log: Log,
    ) -> None:
        for spec in reversed(lost):
            count = lost_count.get(spec["key"], 0) + 1
            lost_count[spec["key"]] = count
            if count > self.max_retries:
                finish(failed_record(
                    spec, f"WorkerLost: the worker process running this trial died "
                    f"{count} time(s)", attempts=count,
                ))
            else:
                log(f"a worker process died; trial {spec['key']} runs again, alone "
                    f"(retry {count} of {self.max_retries})")
                queue.appendleft(spec)
