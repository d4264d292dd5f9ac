"""The best learning rate per width of a sweep's records: does the optimum move with width?

Each record is one finished run ``{rule, parametrization, width, lr, seed, <metric>, diverged,
..}`` (the schema of ``results.jsonl``, :data:`lightning_local.sweeps.results.RECORD_FIELDS`).
For a (rule, parametrization, width) the score of a grid lr is the seed mean of the metric,

    score(lr) = mean_seeds metric(run),

counted as ``+inf`` (a metric to minimize) or ``-inf`` (to maximize) when any seed diverged or
has no finite value, and the best lr is ``argmin_lr sign * score(lr)`` with
``sign = +1`` for ``train_loss``/``test_loss`` and ``-1`` for the accuracies (ties go to the
smaller lr). Under muP the best lr should stay put as the width grows; under SP it shrinks.

Pure functions of the records: nothing is read or written here (:mod:`lightning_local.sweeps`
keeps the file and re-exports these names).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_local.errors import LocalLearningError

__all__ = ["METRICS", "BestLR", "best_learning_rates"]

METRICS = {"train_loss": "min", "test_loss": "min", "test_acc": "max", "train_acc": "max"}
"""Metrics a best lr can be chosen by, and whether lower or higher is better."""


@dataclass(frozen=True)
class BestLR:
    """The best grid lr of one (rule, parametrization, width), with the score behind it.

    ``lr`` is ``None`` when every lr diverged; ``at_edge`` says the best lr is the smallest or
    largest of the grid (the true optimum may lie outside); ``scores`` maps each lr to the
    seed-mean metric (``inf``/``-inf`` for diverged).
    """

    rule: str
    parametrization: str
    width: int
    lr: float | None
    score: float
    at_edge: bool
    scores: dict[float, float]

    @property
    def log2_lr(self) -> float | None:
        return None if self.lr is None else math.log2(self.lr)


def _score(records: Sequence[Mapping[str, Any]], metric: str) -> float:
    worst = math.inf if METRICS[metric] == "min" else -math.inf
    values = []
    for record in records:
        value = record.get(metric)
        if record.get("diverged") or value is None or not math.isfinite(value):
            return worst
        values.append(float(value))
    return sum(values) / len(values)


def best_learning_rates(
    records: Iterable[Mapping[str, Any]], metric: str = "train_loss"
) -> list[BestLR]:
    """The best lr per (rule, parametrization, width): (rule, parametrization) pairs in the
    order they first appear in ``records``, widths ascending.

    Raises:
        LocalLearningError: for a metric other than those in :data:`METRICS`.
    """
    if metric not in METRICS:
        raise LocalLearningError(f"unknown metric {metric!r}. Fix: use one of {sorted(METRICS)}.")
    groups: dict[tuple, dict[float, list]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        key = (record["rule"], record["parametrization"], int(record["width"]))
        groups[key][float(record["lr"])].append(record)
    sign = 1.0 if METRICS[metric] == "min" else -1.0
    pairs = list(dict.fromkeys((rule, param) for rule, param, _ in groups))
    best = []
    order = sorted(groups.items(), key=lambda item: (pairs.index(item[0][:2]), item[0][2]))
    for (rule, param, width), by_lr in order:
        scores = {lr: _score(runs, metric) for lr, runs in sorted(by_lr.items())}
        finite = {lr: s for lr, s in scores.items() if math.isfinite(s)}
        if not finite:
            best.append(BestLR(rule, param, width, None, sign * math.inf, False, scores))
            continue
        lr = min(finite, key=lambda v: (sign * finite[v], v))
        lrs = sorted(scores)
        best.append(BestLR(rule, param, width, lr, finite[lr], lr in (lrs[0], lrs[-1]), scores))
    return best
