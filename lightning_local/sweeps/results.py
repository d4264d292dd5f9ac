"""Bookkeeping of a sweep: run keys, the ``results.jsonl`` file, and the best-lr tables.

``results.jsonl`` holds one JSON object per finished run (schema: :data:`RECORD_FIELDS`, plus
extra fields). Each run has a *key*, a hash of everything that defines it (rule variant and its
hyperparameters, parametrization, width, lr, seed, budget, data set, model, batch size), so a
rerun of the same sweep skips the runs whose key is already in the file.

A record's ``status`` is ``"ok"``, ``"diverged"`` (``diverged = true``: a finished run whose
metrics are ``None``) or ``"failed"``: the trial raised for another reason, or its worker was
lost more often than the retries allow; ``error`` then holds ``"<type>: <message>"``
(:func:`record_status` reads records written before ``status`` existed). Failed runs are no
data point: they stay out of the best-lr tables and are run again on resume. A sweep folder
may hold several results files, one per shard (:mod:`lightning_local.sweeps.shards`):
:func:`load_results` merges them, one record per run key.

Lines are appended one at a time (``O_APPEND``, flushed and ``fsync``-ed); a run interrupted
while writing leaves at most a truncated last line, which :func:`read_results` ignores and
:func:`repair_results` cuts off (an atomic rewrite) before the next append.

The *best lr* of a (rule, parametrization, width) is the grid lr with the best metric, averaged
over seeds: the lowest final ``train_loss`` (default) or the highest ``test_acc``; a diverged
run counts as infinitely bad, and a lr where any seed diverged counts as diverged.
(:data:`METRICS`, :class:`BestLR` and :func:`best_learning_rates` are computed in
:mod:`lightning_local.diagnostics.best_lr` and re-exported here.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_local._atomic import atomic_write_bytes
from lightning_local.diagnostics.best_lr import METRICS, BestLR, best_learning_rates
from lightning_local.errors import LocalLearningError
from lightning_local.sweeps.shards import result_files

__all__ = [
    "RECORD_FIELDS",
    "METRICS",
    "STATUSES",
    "run_key",
    "record_status",
    "read_results",
    "merge_records",
    "load_results",
    "repair_results",
    "append_result",
    "BestLR",
    "best_learning_rates",
    "format_best_lr_table",
    "format_wider_is_better_table",
    "shift_in_grid_steps",
]

RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "key": str,
    "rule": str,
    "parametrization": str,
    "width": int,
    "lr": float,
    "seed": int,
    "train_loss": (float, type(None)),
    "test_loss": (float, type(None)),
    "test_acc": (float, type(None)),
    "diverged": bool,
    "status": str,
    "seconds": float,
}
"""Fields every record has, with their JSON types (``None`` for a diverged or failed run's
metrics)."""

STATUSES = ("ok", "diverged", "failed")
"""The values of a record's ``status``."""


def run_key(spec: Mapping[str, Any]) -> str:
    """A stable hash (hex) of a run's defining settings (any JSON-serializable mapping)."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def read_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl`` file (``[]`` when it does not exist).

    Lines that are not complete JSON objects (a truncated last line from an interrupted run)
    are skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad:
        warnings.warn(
            f"{path}: skipped {bad} unreadable line(s) (an interrupted write); those runs "
            "will be run again.",
            RuntimeWarning,
            stacklevel=2,
        )
    return records


def record_status(record: Mapping[str, Any]) -> str:
    """``"ok"``, ``"diverged"`` or ``"failed"`` (records without ``status``: from ``diverged``)."""
    status = record.get("status")
    if status in STATUSES:
        return str(status)
    return "diverged" if record.get("diverged") else "ok"


def merge_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per run key, in the order keys first appear: the last finished (``ok`` or
    ``diverged``) record of a key, else its last failed one. Records without a key are kept."""
    chosen: dict[Any, dict[str, Any]] = {}
    loose = 0
    for record in records:
        key = record.get("key")
        if key is None:
            chosen[("no key", loose)] = dict(record)
            loose += 1
            continue
        previous = chosen.get(key)
        if (previous is None or record_status(record) != "failed"
                or record_status(previous) == "failed"):
            chosen[key] = dict(record)
    return list(chosen.values())


def load_results(
    folder: str | os.PathLike[str], *, include_failed: bool = False
) -> list[dict[str, Any]]:
    """The records of a sweep folder: ``results.jsonl`` and every shard's file, merged by run
    key (:func:`merge_records`); failed runs only with ``include_failed``."""
    records = merge_records(
        record for path in result_files(folder) for record in read_results(path)
    )
    if include_failed:
        return records
    return [record for record in records if record_status(record) != "failed"]


def repair_results(path: str | os.PathLike[str]) -> None:
    """Cut a truncated last line off ``path`` so the next append starts on a fresh line.

    The file is rewritten atomically (:func:`lightning_local._atomic.atomic_write_bytes`,
    keeping its permissions): interrupted, it still holds every complete line.
    """
    path = Path(path)
    if not path.exists():
        return
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1  # 0 when the only line is truncated
    atomic_write_bytes(path, data[:keep], mode=stat.S_IMODE(path.stat().st_mode))
    warnings.warn(
        f"{path}: cut off a truncated last line (an interrupted write); that run will be run "
        "again.",
        RuntimeWarning,
        stacklevel=2,
    )


def append_result(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one record as one line, flushed to disk (strict JSON: no NaN or infinity)."""
    line = json.dumps(_finite(record), sort_keys=False, allow_nan=False) + "\n"
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _groups(best: Sequence[BestLR]) -> tuple[list[tuple[str, str]], list[int]]:
    pairs = list(dict.fromkeys((b.rule, b.parametrization) for b in best))
    widths = sorted({b.width for b in best})
    return pairs, widths


def shift_in_grid_steps(best: Sequence[BestLR]) -> float | None:
    """``max - min`` of ``log2(best lr)`` across widths (``None`` if any width diverged
    everywhere)."""
    logs = [b.log2_lr for b in best]
    if not logs or any(v is None for v in logs):
        return None
    return max(logs) - min(logs)  # type: ignore[type-var]


def format_best_lr_table(best: Sequence[BestLR], metric: str = "train_loss") -> str:
    """A markdown table: ``log2`` of the best lr per width, and its shift across widths.

    A best lr at the edge of the grid is starred; ``div`` marks a width where every lr
    diverged; ``shift`` is ``max - min`` of the ``log2`` best lr in grid steps of a factor 2.
    """
    pairs, widths = _groups(best)
    index = {(b.rule, b.parametrization, b.width): b for b in best}
    header = "| rule | param | " + " | ".join(str(w) for w in widths) + " | shift |"
    lines = [
        f"Best lr (log2) by {metric}; * = at the edge of the grid",
        "",
        header,
        "|" + "---|" * (len(widths) + 3),
    ]
    for rule, param in pairs:
        cells, row = [], []
        for width in widths:
            entry = index.get((rule, param, width))
            row.append(entry)
            if entry is None:
                cells.append("")
            elif entry.lr is None:
                cells.append("div")
            else:
                cells.append(f"{entry.log2_lr:g}{'*' if entry.at_edge else ''}")
        present = [b for b in row if b is not None]
        shift = shift_in_grid_steps(present)
        lines.append(
            f"| {rule} | {param} | " + " | ".join(cells)
            + f" | {'div' if shift is None else f'{shift:g}'} |"
        )
    return "\n".join(lines)


def format_wider_is_better_table(
    best: Sequence[BestLR], metric: str = "train_loss", reference: str = "mean"
) -> str:
    """A markdown table of ``metric`` per width at one fixed lr per (rule, parametrization).

    The fixed lr is the one with the best mean score over widths (``reference="mean"``: a
    good lr for every width), or the best lr at the narrowest width (``"narrowest"``: the lr
    one would tune on a small net and transfer). ``div`` marks a diverged width.
    """
    if reference not in ("mean", "narrowest"):
        raise LocalLearningError(
            f"unknown reference {reference!r}. Fix: use 'mean' or 'narrowest'."
        )
    pairs, widths = _groups(best)
    index = {(b.rule, b.parametrization, b.width): b for b in best}
    sign = 1.0 if METRICS[metric] == "min" else -1.0
    lines = [
        f"{metric} per width at a fixed lr (log2 lr in the second column)",
        "",
        "| rule | param | lr | " + " | ".join(str(w) for w in widths) + " |",
        "|" + "---|" * (len(widths) + 3),
    ]
    for rule, param in pairs:
        row = [index.get((rule, param, w)) for w in widths]
        present = [b for b in row if b is not None]
        if reference == "narrowest":
            fixed = present[0].lr
        else:
            common = set.intersection(*(set(b.scores) for b in present))
            fixed = min(
                common, key=lambda lr: sum(sign * b.scores[lr] for b in present), default=None
            )
        if fixed is None:
            lines.append(f"| {rule} | {param} | div | " + " | ".join("" for _ in widths) + " |")
            continue
        cells = []
        for b in row:
            value = None if b is None else b.scores.get(fixed)
            if value is None:
                cells.append("")
            elif not math.isfinite(value):
                cells.append("div")
            else:
                cells.append(f"{value:.4g}")
        lines.append(f"| {rule} | {param} | {math.log2(fixed):g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
