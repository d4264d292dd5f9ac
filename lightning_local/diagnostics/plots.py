"""Figures of the sweeps and coordinate checks (matplotlib, no global pyplot state).

- :func:`plot_transfer`: one panel per rule x parametrization, the metric against
  ``log2(lr)``, one curve per width, the best lr of each width
  (:func:`~lightning_local.diagnostics.best_lr.best_learning_rates`) marked by a star and
  diverged runs by a cross at the top of the panel;
- :func:`plot_coord_check`: for one rule, one row per parametrization and one panel per
  quantity, the rms size against width (log-log) after the last step, one line per layer, with
  the fitted slope in the legend.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from lightning_local._atomic import atomic_write_bytes
from lightning_local.diagnostics.best_lr import METRICS, best_learning_rates
from lightning_local.errors import LocalLearningError

__all__ = ["plot_transfer", "plot_coord_check"]


def _save(figure: Figure, path: str | os.PathLike[str], dpi: int = 90) -> Path:
    """Save ``figure`` as a PNG with a 64-colour palette (a third of matplotlib's size),
    written atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    output = io.BytesIO()
    with Image.open(buffer) as image:
        palette = image.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
        palette.save(output, format="PNG", optimize=True)
    return atomic_write_bytes(path, output.getvalue())


def _width_colors(widths: Sequence[int]) -> dict[int, Any]:
    cmap = colormaps["viridis"]
    span = max(len(widths) - 1, 1)
    return {w: cmap(0.9 * i / span) for i, w in enumerate(sorted(widths))}


def plot_transfer(
    records: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    metric: str = "train_loss",
    title: str | None = None,
) -> Path:
    """Write the transfer figure of sweep ``records`` to ``path``; return the path."""
    records = list(records)
    best = best_learning_rates(records, metric)
    rules = list(dict.fromkeys(b.rule for b in best))
    params = list(dict.fromkeys(b.parametrization for b in best))
    widths = sorted({b.width for b in best})
    colors = _width_colors(widths)
    lower_is_better = METRICS[metric] == "min"
    figure = Figure(figsize=(4.2 * len(params), 3.0 * len(rules) + 0.4))
    axes = figure.subplots(len(rules), len(params), squeeze=False)
    for row, rule in enumerate(rules):
        for col, param in enumerate(params):
            ax = axes[row][col]
            entries = [b for b in best if b.rule == rule and b.parametrization == param]
            finite_values = [s for b in entries for s in b.scores.values() if math.isfinite(s)]
            top = ax.get_xaxis_transform()
            for entry in entries:
                lrs = sorted(entry.scores)
                xs = [math.log2(lr) for lr in lrs if math.isfinite(entry.scores[lr])]
                ys = [entry.scores[lr] for lr in lrs if math.isfinite(entry.scores[lr])]
                color = colors[entry.width]
                ax.plot(xs, ys, "o-", ms=3, lw=1.2, color=color, label=f"M={entry.width}")
                crossed = [math.log2(lr) for lr in lrs if not math.isfinite(entry.scores[lr])]
                height = 0.97 - 0.035 * widths.index(entry.width)  # one row of crosses per width
                ax.plot(crossed, [height] * len(crossed), "x", color=color, ms=5, transform=top)
                if entry.lr is not None:
                    ax.plot([math.log2(entry.lr)], [entry.score], "*", ms=13, color=color,
                            mec="black", mew=0.8, zorder=5)
            if finite_values and lower_is_better and min(finite_values) > 0:
                low = min(finite_values)  # losses far above the best are cut off the panel
                high = min(max(finite_values), 2.5 * low)
                ax.set_ylim(low - 0.05 * (high - low), high + 0.12 * (high - low))
            ax.set_title(f"{rule} / {param}", fontsize=10)
            ax.set_xlabel("log2 lr")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="best")
    if title:
        figure.suptitle(title)
    figure.text(0.01, 0.005, "star: best lr per width; x (top of a panel): diverged; losses "
                "above 2.5x the panel's best are cut off", fontsize=7)
    figure.tight_layout(rect=(0, 0.015, 1, 1))
    return _save(figure, path)


def plot_coord_check(
    records: Iterable[Mapping[str, Any]],
    slopes: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    rule: str,
    step: int | None = None,
) -> Path:
    """Write the coordinate-check figure of one ``rule`` to ``path``; return the path.

    ``records`` and ``slopes`` are those of
    :class:`~lightning_local.diagnostics.coord_check.CoordCheckResult`; ``step`` defaults to
    the last.
    """
    records = [r for r in records if r["rule"] == rule]
    slopes = [s for s in slopes if s["rule"] == rule]
    step = max(r["step"] for r in records) if step is None else step
    params = list(dict.fromkeys(r["parametrization"] for r in records))
    quantities = list(dict.fromkeys(r["quantity"] for r in records))
    slope_of = {
        (s["parametrization"], s["quantity"], s["layer"]): s["slope"]
        for s in slopes if s["step"] == step
    }
    figure = Figure(figsize=(3.1 * len(quantities), 2.7 * len(params) + 0.5))
    axes = figure.subplots(len(params), len(quantities), squeeze=False)
    cmap = colormaps["plasma"]
    depth = max(r["layer"] for r in records)
    for row, param in enumerate(params):
        for col, quantity in enumerate(quantities):
            ax = axes[row][col]
            chosen = [r for r in records if r["parametrization"] == param
                      and r["quantity"] == quantity and r["step"] == step]
            for layer in sorted({r["layer"] for r in chosen}):
                by_width: dict[int, list] = {}
                for r in chosen:
                    if r["layer"] == layer:
                        by_width.setdefault(r["width"], []).append(r["value"])
                points = [  # the seed mean, as the slope is fitted to it
                    (w, sum(v) / len(v)) for w, v in sorted(by_width.items())
                    if None not in v and sum(v) > 0
                ]
                if not points:
                    continue
                slope = slope_of.get((param, quantity, layer))
                label = f"layer {layer}" + ("" if slope is None else f" ({slope:+.2f})")
                color = cmap(0.85 * (layer - 1) / max(depth - 1, 1))
                ax.plot(*zip(*points), "o-", ms=3, color=color, label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{param}: {quantity}", fontsize=9)
            ax.set_xlabel("width")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    figure.suptitle(f"{rule}: rms after step {step} (slope vs width in the legend)", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)



def plot_layer_learning(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "",
) -> Path:
    """Write the per-layer learning figure of a
    :class:`~lightning_local.diagnostics.layer_learning.LayerLearningCallback` history to
    ``path``: for each quantity, every layer's value against the step (log scale)."""
    from lightning_local.diagnostics.layer_learning import QUANTITIES

    if not history:
        raise LocalLearningError(
            "the layer-learning history is empty. Fix: train for at least every_n_steps steps "
            "with the callback attached."
        )
    figure = Figure(figsize=(3.3 * len(QUANTITIES), 2.9))
    axes = figure.subplots(1, len(QUANTITIES), squeeze=False)[0]
    depth = len(history[0][QUANTITIES[0]])
    cmap = colormaps["plasma"]
    steps = [entry["step"] for entry in history]
    for ax, quantity in zip(axes, QUANTITIES):
        for layer in range(depth):
            values = [entry[quantity][layer] for entry in history]
            color = cmap(0.85 * layer / max(depth - 1, 1))
            label = f"layer {layer + 1}" if depth <= 8 or layer in (0, depth - 1) else None
            ax.plot(steps, values, "-", color=color, lw=1.2, label=label)
        ax.set_yscale("log")
        ax.set_title(quantity.replace("_", " "), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)
