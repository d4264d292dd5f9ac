"""Learning-rate transfer across widths, for backprop, PC and DTP, under SP and muP.

Reproduces the paper's claim (docs/math.md §5) on MNIST-1D: the paper's 3-layer tanh MLP
without biases, MSE, plain SGD, batch 128, 5 epochs, base width 64, widths 64 .. 1024, lr grid
in factors of 2. Rules: backprop; PC with one sequential inference sweep (SI) with and without
the fixed prediction assumption, and with 8 simultaneous inference steps of size 0.2; DTP with
closed-form ridge feedback and beta 0.5.

    python examples/transfer_sweep.py                # the full sweep (35 min per seed, 2 cores)
    python examples/transfer_sweep.py --quick        # a few minutes' smoke version
    python examples/transfer_sweep.py --seeds 0 1 2  # add seeds: finished runs are skipped

It writes ``<output>/results.jsonl``, ``transfer.png`` and ``best_lr.md``, prints the verdict
(best-lr shift under muP and SP, "wider is better" at a fixed lr), and with ``--docs`` copies
the figure and tables to ``docs/figures/transfer_<dataset>.png`` and
``docs/results/transfer_<dataset>.{md,jsonl}``. FashionMNIST runs too when its files are in
``--data-dir`` (skipped with a message otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

from lightning_local.errors import DatasetNotFoundError
from lightning_local.sweeps import (
    SweepConfig,
    best_learning_rates,
    format_best_lr_table,
    log2_grid,
    shift_in_grid_steps,
    sweep,
)
from lightning_local.sweeps.experiment import load_dataset

RULES = ["bp", "pc-si-fpa", "pc-si", "pc-sim", "dtp"]


COMPACT = ("rule", "parametrization", "width", "lr", "seed", "train_loss", "test_loss",
           "test_acc", "diverged", "seconds")


def _rounded(value):
    return float(f"{value:.5g}") if isinstance(value, float) else value


def _standard_errors(records, metric: str = "train_loss") -> dict[tuple, float]:
    """Standard error of the seed mean of ``metric`` per (rule, param, width, lr); 0 for one
    seed."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        if r["diverged"]:
            continue
        key = (r["rule"], r["parametrization"], r["width"], r["lr"])
        groups.setdefault(key, []).append(r[metric])
    return {
        key: statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else 0.0
        for key, v in groups.items()
    }


def verdict(result, relative_floor: float = 0.01) -> str:
    """Plain-language summary per rule and parametrization: the shift of the best lr across
    widths, and whether a wider net is never worse than a narrower one at one fixed good lr
    (the lr with the best mean over widths) by more than noise: twice the standard error of
    the difference of the two seed means, and at least ``relative_floor`` of the loss."""
    spread = _standard_errors(result.records)
    lines = []
    by_pair: dict[tuple[str, str], list] = {}
    for entry in result.best:
        by_pair.setdefault((entry.rule, entry.parametrization), []).append(entry)
    for (rule, param), entries in by_pair.items():
        shift = shift_in_grid_steps(entries)
        common = set.intersection(*(set(b.scores) for b in entries))
        fixed = min(common, key=lambda lr: sum(b.scores[lr] for b in entries))
        scores = [b.scores[fixed] for b in entries]
        worse = []
        for i, (a, sa) in enumerate(zip(entries, scores)):
            for b, sb in zip(entries[i + 1:], scores[i + 1:]):
                noise = 2 * math.hypot(spread.get((rule, param, a.width, fixed), 0.0),
                                       spread.get((rule, param, b.width, fixed), 0.0))
                if not sb <= sa + max(noise, relative_floor * sa):
                    worse.append(f"{b.width} vs {a.width}")
        diverged = [str(b.width) for b, s in zip(entries, scores) if not math.isfinite(s)]
        if not math.isfinite(sum(scores)):
            wider = "n/a (a width diverged at every lr tried)"
        else:
            wider = "yes" if not worse else "no (" + ", ".join(worse) + ")"
        lines.append(
            f"{rule:10s} {param:4s} best-lr shift {'n/a' if shift is None else f'{shift:g}'} "
            f"grid steps; wider is better at lr 2^{math.log2(fixed):g}: {wider}"
            + (f"; diverged at widths {', '.join(diverged)}" if diverged else "")
        )
    return "\n".join(lines)


def run(dataset: str, args: argparse.Namespace) -> None:
    widths = args.widths if dataset == "mnist1d" else args.widths[:4]
    config = SweepConfig(
        rules=args.rules, parametrizations=["sp", "mup"], widths=widths,
        lrs=log2_grid(*args.log2_lr), seeds=args.seeds, epochs=args.epochs,
        dataset=dataset, data_dir=args.data_dir, base_width=widths[0],
    )
    output = Path(args.output) / dataset
    start = time.perf_counter()
    result = sweep(config, output, workers=args.workers, threads=args.threads)
    wall = time.perf_counter() - start
    summary = verdict(result)
    by_accuracy = format_best_lr_table(best_learning_rates(result.records, "test_acc"),
                                       "test_acc")
    print(result.table + "\n\n" + summary)
    text = (
        f"# Learning-rate transfer on {dataset}\n\n"
        f"3-layer tanh MLP without biases, MSE, SGD, batch {config.batch_size}, "
        f"{config.epochs} epochs, base width {config.base_width}, seeds {list(config.seeds)}, "
        f"lr grid 2^{args.log2_lr[0]:g} .. 2^{args.log2_lr[1]:g}.\n\n"
        f"{result.table}\n\n```\n{summary}\n```\n\n{by_accuracy}\n\n"
        f"Summed run time {sum(r['seconds'] for r in result.records) / 60:.1f} min over "
        f"{len(result.records)} runs (1 torch thread per process); "
        + (f"this invocation ran {result.executed} runs in {wall / 60:.1f} min wall time "
           f"({args.workers} worker(s)).\n" if result.executed else
           "every run was already in results.jsonl.\n")
    )
    (output / "summary.md").write_text(text)
    if args.docs:
        Path("docs/figures").mkdir(parents=True, exist_ok=True)
        Path("docs/results").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.plot_path, f"docs/figures/transfer_{dataset}.png")
        shutil.copyfile(output / "summary.md", f"docs/results/transfer_{dataset}.md")
        with open(f"docs/results/transfer_{dataset}.jsonl", "w") as file:
            for record in result.records:  # this sweep's runs, the fields the tables use
                compact = {k: record[k] if k == "lr" else _rounded(record[k]) for k in COMPACT}
                file.write(json.dumps(compact, separators=(",", ":")) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/transfer")
    parser.add_argument("--rules", nargs="+", default=RULES)
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--log2-lr", nargs=2, type=float, default=[-8.0, 2.0],
                        metavar=("MIN", "MAX"), help="lr grid 2^MIN .. 2^MAX in factors of 2")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: widths 64/128/256, 1 epoch, lr 2^-6 .. 2^0")
    parser.add_argument("--docs", action="store_true",
                        help="copy the figure and tables into docs/ (run from the repo root)")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.epochs, args.log2_lr = [64, 128, 256], 1, [-6.0, 0.0]
        args.output = str(Path(args.output) / "quick")
    run("mnist1d", args)
    try:
        load_dataset("fashion-mnist", args.data_dir)
    except DatasetNotFoundError as error:
        print(f"FashionMNIST skipped: {str(error).splitlines()[0]}", file=sys.stderr)
    else:
        run("fashion-mnist", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
