"""Data-parallel ranks as threads of this process, for the rules' parity tests without DDP.

Each rank gets a :class:`~lightning_local.rules.base.ProcessLayout` whose ``all_reduce_sum``
is a real collective among the threads: every rank must call it at the same point, and the
sum (in rank order, so bit-identical on every rank) replaces each rank's tensor. A rank that
calls it a different number of times than the others (which would hang DDP) breaks the barrier
instead, and the error is raised in the test.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from torch import Tensor

from lightning_local.rules.base import ProcessLayout

T = TypeVar("T")


class ThreadRanks:
    """``world_size`` ranks; :meth:`run` calls ``work(layout)`` for each in its own thread."""

    def __init__(self, world_size: int, timeout: float = 20.0) -> None:
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: list[Tensor | None] = [None] * world_size
        self.calls = [0] * world_size

    def layout(self, rank: int) -> ProcessLayout:
        def all_reduce_sum(tensor: Tensor) -> Tensor:
            self.calls[rank] += 1
            self._slots[rank] = tensor.clone()
            self._barrier.wait()
            total = self._slots[0]
            for part in self._slots[1:]:
                total = total + part
            self._barrier.wait()  # every rank has read the slots before any writes again
            return tensor.copy_(total)

        return ProcessLayout(rank, self.world_size, all_reduce_sum)

    def run(self, work: Callable[[ProcessLayout], T]) -> list[T]:
        """``[work(layout(0)), .., work(layout(N - 1))]``, the ranks running concurrently."""
        results: list[T | None] = [None] * self.world_size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = work(self.layout(rank))
            except BaseException as error:  # noqa: BLE001  (re-raised in the caller)
                errors.append(error)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]
