"""Shards of a sweep: ``--shard i/n`` runs the i-th of n parts of the grid into its own file.

A SLURM array (or any scheduler that starts n copies of one command with an index) runs the
same sweep command n times with ``--shard 0/n`` .. ``--shard n-1/n``. Shard ``i`` takes the
runs ``j`` of the grid (in :meth:`~lightning_local.sweeps.runner.SweepConfig.run_specs`'
order: rules, parametrizations, widths, learning rates, seeds) with ``j mod n == i``, so each
shard gets every width and its cost is about ``1/n`` of the sweep's. It is the only writer of
``results.shard-<i>-of-<n>.jsonl`` in the output folder; an unsharded sweep writes
``results.jsonl``.

Every reader of a sweep folder (resume, the best-lr tables, ``transfer.png``,
:func:`lightning_local.sweeps.results.load_results`) merges all these files
(:func:`result_files`), so shards finish runs in any order, a rerun of any shard skips what
any shard already finished, and the unsharded command run afterwards runs whatever is still
missing and writes the tables of the whole grid.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from lightning_local.errors import LocalLearningError

__all__ = ["RESULTS_FILE", "Shard", "parse_shard", "result_files", "results_path"]

RESULTS_FILE = "results.jsonl"
"""The results file of an unsharded sweep."""

_SHARD_FILE = re.compile(r"results\.shard-(\d+)-of-(\d+)\.jsonl")

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (from 0) of ``count`` of a sweep's grid."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise LocalLearningError(
                f"bad shard {self.index}/{self.count}. Fix: i/n with 0 <= i < n, e.g. 0/4 .. 3/4 "
                "(SLURM: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3)."
            )

    def select(self, items: Sequence[T]) -> list[T]:
        """The items at positions ``j`` with ``j mod count == index``."""
        return [item for j, item in enumerate(items) if j % self.count == self.index]

    @property
    def file_name(self) -> str:
        """``results.shard-<index>-of-<count>.jsonl``."""
        return f"results.shard-{self.index}-of-{self.count}.jsonl"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str | Shard | None) -> Shard | None:
    """A :class:`Shard` from ``"i/n"`` (``None`` and shards pass through)."""
    if text is None or isinstance(text, Shard):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if match is None:
        raise LocalLearningError(
            f"bad shard {text!r}. Fix: i/n, e.g. --shard 0/4 for the first of 4 shards."
        )
    return Shard(int(match.group(1)), int(match.group(2)))


def results_path(folder: str | os.PathLike[str], shard: Shard | None = None) -> Path:
    """The file a sweep (or one shard of it) writes in ``folder``."""
    return Path(folder) / (RESULTS_FILE if shard is None else shard.file_name)


def result_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every results file of a sweep folder: ``results.jsonl`` first, then the shards' files
    by shard count and index (only those that exist)."""
    folder = Path(folder)
    found = [folder / RESULTS_FILE] if (folder / RESULTS_FILE).is_file() else []
    shards = []
    for path in folder.glob("results.shard-*-of-*.jsonl"):
        match = _SHARD_FILE.fullmatch(path.name)
        if match is not None and path.is_file():
            shards.append(((int(match.group(2)), int(match.group(1))), path))
    return found + [path for _, path in sorted(shards)]
