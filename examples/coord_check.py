"""Coordinate checks of backprop, PC and DTP under SP and muP (docs/math.md §5.1-5.3).

The paper's 3-layer tanh MLP without biases on MNIST-1D, widths 64 .. 1024, 3 SGD steps at
lr 0.1, 3 seeds. After each step the rms size of every layer's activations, feature change,
weight update, PC states and errors, and DTP targets is recorded, and its slope against width
fitted. Two muP runs: the paper's random readout, and a zero readout (``mup``'s
``readout_zero_init``), which removes the readout init's contribution that shrinks like
``M^{-1/2}`` and so shows the infinite-width scaling.

    python examples/coord_check.py                 # about 10-15 minutes on 2 cores
    python examples/coord_check.py --quick         # widths 64 .. 256, 1 seed
    python examples/coord_check.py --docs          # also copy figures and tables into docs/

Writes ``<output>/{paper_init,zero_readout}/coord_check.{json,md}`` and one figure per rule,
``<output>/coord_check_<rule>.png``, with rows SP, muP and muP with a zero readout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from lightning_local.coord_check import coord_check
from lightning_local.plots import plot_coord_check

RULES = ["bp", "pc-si-fpa", "pc-si", "pc-sim", "dtp"]
ZERO = "mup, zero readout"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/coord_check")
    parser.add_argument("--rules", nargs="+", default=RULES)
    parser.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--docs", action="store_true",
                        help="copy figures and tables into docs/ (run from the repo root)")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.seeds = [64, 128, 256], [0]
    output = Path(args.output)
    start = time.perf_counter()
    common = dict(widths=args.widths, steps=args.steps, lr=args.lr, seeds=args.seeds,
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    paper = coord_check(args.rules, ["sp", "mup"], output=output / "paper_init", **common)
    zero = coord_check(args.rules, ["mup"], zero_readout=True, output=output / "zero_readout",
                       **common)
    wall = time.perf_counter() - start
    relabel = [dict(r, parametrization=ZERO) for r in zero.records]
    slopes = paper.slopes + [dict(s, parametrization=ZERO) for s in zero.slopes]
    figures = []
    for rule in dict.fromkeys(r["rule"] for r in paper.records):
        figures.append(plot_coord_check(paper.records + relabel, slopes,
                                        output / f"coord_check_{rule}.png", rule))
    text = (
        f"# Coordinate check on MNIST-1D\n\n3-layer tanh MLP without biases, MSE, SGD at lr "
        f"{args.lr}, batch 128, widths {args.widths}, seeds {args.seeds}; slopes of log rms "
        f"against log width after step {args.steps}, fitted to the seed mean.\n\n"
        f"## Paper init (random readout)\n\n{paper.table()}\n\n"
        f"## muP with a zero readout\n\n{zero.table()}\n\n"
        f"Wall time {wall / 60:.1f} min (one process).\n"
    )
    (output / "coord_check.md").write_text(text)
    print(text)
    if args.docs:
        Path("docs/figures").mkdir(parents=True, exist_ok=True)
        Path("docs/results").mkdir(parents=True, exist_ok=True)
        for figure in figures:
            shutil.copyfile(figure, Path("docs/figures") / figure.name)
        shutil.copyfile(output / "coord_check.md", "docs/results/coord_check_mnist1d.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
