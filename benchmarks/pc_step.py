"""Cost of one predictive-coding training step relative to one backprop step.

A PC step with T simultaneous inference steps costs about (2T + 3) / 3 backprop steps in
matmul FLOPs: T forward passes and T pullbacks during inference, then a forward and a
weight-gradient pass for the update, against backprop's forward, input-gradient and
weight-gradient passes. This script measures the wall-clock ratio on one machine in one run
(interleaved, median of repeats) and prints it next to that budget.

    python benchmarks/pc_step.py                       # widths 256 and 1024, batch 256
    python benchmarks/pc_step.py --widths 512 --steps 1 8 --depth 5 --autograd
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_local.models import MLP
from lightning_local.rules.backprop import Backprop
from lightning_local.rules.base import LocalRule
from lightning_local.rules.predictive_coding import PredictiveCoding


def _step_time(rule: LocalRule, net: torch.nn.Module, x, y, repeats: int) -> Callable[[], float]:
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-4)

    def run() -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            rule.step(net, x, y, optimizer)
        return (time.perf_counter() - start) / repeats

    run()  # warm-up
    return run


def measure(width: int, depth: int, batch: int, steps: list[int], fast_path: bool,
            rounds: int, repeats: int, compare_autograd: bool = False) -> list[dict[str, float]]:
    torch.manual_seed(0)
    net = MLP(in_features=40, width=width, num_classes=10, depth=depth)
    x, y = torch.randn(batch, 40), torch.randint(0, 10, (batch,))
    rules: dict[str, LocalRule] = {"bp": Backprop()}
    rules["pc-si"] = PredictiveCoding(fast_path=fast_path)
    for t in steps:
        rules[f"pc-T{t}"] = PredictiveCoding(
            inference="simultaneous", inference_steps=t, inference_lr=0.1, fast_path=fast_path
        )
        if compare_autograd:  # the general autograd path on the same step, same run
            rules[f"pc-T{t}-ag"] = PredictiveCoding(
                inference="simultaneous", inference_steps=t, inference_lr=0.1, fast_path=False
            )
    timers = {name: _step_time(rule, net, x, y, repeats) for name, rule in rules.items()}
    samples: dict[str, list[float]] = {name: [] for name in rules}
    for _ in range(rounds):  # interleave, so machine noise hits every rule alike
        for name, timer in timers.items():
            samples[name].append(timer())
    bp = statistics.median(samples["bp"])
    rows = []
    for name, values in samples.items():
        t = 1 if name == "pc-si" else (
            int(name.split("T")[1].split("-")[0]) if name.startswith("pc-T") else 0
        )
        budget = (2 * t + 3) / 3 if name != "bp" else 1.0
        ratio = statistics.median(values) / bp
        rows.append({"width": width, "rule": name, "ms": 1e3 * statistics.median(values),
                     "ratio": ratio, "budget": budget})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--autograd", action="store_true",
                        help="disable the closed-form Linear fast path (general autograd path)")
    parser.add_argument("--compare-autograd", action="store_true",
                        help="add the autograd path of each T (rows pc-T<T>-ag) to the same run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, depth {args.depth}, "
          f"batch {args.batch}, fast path {'off' if args.autograd else 'on'}")
    print(f"{'width':>6} {'rule':>10} {'ms/step':>9} {'x backprop':>11} {'budget (2T+3)/3':>16}")
    for width in args.widths:
        for row in measure(width, args.depth, args.batch, args.steps, not args.autograd,
                           args.rounds, args.repeats, args.compare_autograd):
            print(f"{row['width']:>6} {row['rule']:>10} {row['ms']:>9.2f} {row['ratio']:>11.2f} "
                  f"{row['budget']:>16.2f}")


if __name__ == "__main__":
    main()
