"""Deep linear predictive coding: between gradient descent and Gauss-Newton (docs/math.md §4).

Three figures, written to ``--out`` (default ``docs/figures``):

- ``deep_linear_cosines.png``: cos(PC, GD) and cos(PC, GNT) of the equilibrium PC update
  against width, for output-weight exponents ``g`` (``gamma_L = (M / M_base)^{-g}``), under muP
  and SP, at initialization (closed form, :mod:`lightning_local.analysis`);
- ``deep_linear_gram.png``: ``||C||_2`` against width with fitted log-log slopes;
- ``deep_linear_training.png``: training loss of wide linear networks trained with the
  library's PC rule under muP, for ``g`` around the stability boundary ``g = -1``.

Everything runs in float64 on the CPU, with fixed seeds; the defaults take a few minutes on
two cores. ``--quick`` runs a smaller version (used as a smoke test).

    python examples/deep_linear_pc.py
    python examples/deep_linear_pc.py --widths 32 64 128 256 --train-widths 64 256 --quick
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lightning_local.analysis import compare_updates  # noqa: E402
from lightning_local.errors import NonFiniteEnergyError  # noqa: E402
from lightning_local.models import MLP  # noqa: E402
from lightning_local.parametrization import SP, MuP, set_base_shapes  # noqa: E402
from lightning_local.rules.predictive_coding import PredictiveCoding  # noqa: E402

EXPONENTS = (0.0, -0.5, -1.0, -1.5)
COLORS = {0.0: "tab:blue", -0.5: "tab:green", -1.0: "tab:orange", -1.5: "tab:red"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--train-widths", type=int, nargs="+", default=[32, 128, 512])
    parser.add_argument("--base-width", type=int, default=32)
    parser.add_argument("--exponents", type=float, nargs="+", default=list(EXPONENTS))
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3, help="networks averaged per width")
    parser.add_argument("--in-features", type=int, default=16)
    parser.add_argument("--outputs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.05, help="base learning rate eta'")
    parser.add_argument("--inference-steps", type=int, default=20)
    parser.add_argument("--inference-lr", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--summary", type=Path, default=None, help="write all numbers as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.train_widths = [32, 64, 128], [32, 128]
        args.seeds, args.train_steps = 1, 5
    return args


def build(args: argparse.Namespace, width: int, parametrization, seed: int) -> torch.nn.Module:
    """A bias-free linear MLP in float64, muP/SP-initialized relative to the base width."""
    torch.manual_seed(seed)
    net = MLP(args.in_features, width, args.outputs, depth=args.depth, activation="identity",
              bias=False).double()
    set_base_shapes(net, args.base_width)
    parametrization.initialize(net, rule="pc", optimizer="sgd")
    return net


def teacher_data(args: argparse.Namespace, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs, targets from a random linear teacher plus noise (fixed seed)."""
    generator = torch.Generator().manual_seed(1234)
    x = torch.randn(samples, args.in_features, generator=generator, dtype=torch.float64)
    teacher = torch.randn(args.outputs, args.in_features, generator=generator,
                          dtype=torch.float64)
    noise = torch.randn(samples, args.outputs, generator=generator, dtype=torch.float64)
    return x, x @ teacher.T / math.sqrt(args.in_features) + 0.3 * noise


def _mup(g: float) -> MuP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # g < -1 warns: it is the point of the experiment
        return MuP(output_weight_exponent=g)


def sweep_updates(args: argparse.Namespace) -> dict:
    """||C|| and per-layer cosines (means over seeds), per width, g and parametrization.

    The cosines of the equilibrium energy gradient are kept per layer; the rule's default FPA
    variant is summarized by its mean over layers.
    """
    x, y = teacher_data(args, args.batch)
    results: dict = {}
    for name in ("mup", "sp"):
        for g in args.exponents:
            rows = []
            for width in args.widths:
                norms, to_gd, to_gnt, fpa_gd, fpa_gnt = [], [], [], [], []
                for seed in range(args.seeds):
                    net = build(args, width, _mup(g) if name == "mup" else SP(), seed)
                    gamma = _mup(g).output_weight(1.0, net)  # (M / M_base)^{-g}, both params
                    c = compare_updates(net, x, y, gamma)
                    norms.append(c.gram_norm)
                    to_gd.append(c.cos_pc_gd.tolist())
                    to_gnt.append(c.cos_pc_gnt.tolist())
                    fpa = compare_updates(net, x, y, gamma, fixed_prediction=True)
                    fpa_gd.append(float(fpa.cos_pc_gd.mean()))
                    fpa_gnt.append(float(fpa.cos_pc_gnt.mean()))
                rows.append({
                    "width": width,
                    "gamma_L": gamma,
                    "gram_norm": float(np.mean(norms)),
                    "cos_pc_gd": np.mean(to_gd, axis=0).tolist(),
                    "cos_pc_gnt": np.mean(to_gnt, axis=0).tolist(),
                    "cos_pc_gd_fpa_mean": float(np.mean(fpa_gd)),
                    "cos_pc_gnt_fpa_mean": float(np.mean(fpa_gnt)),
                })
            results[f"{name} g={g:g}"] = rows
    return results


def train(args: argparse.Namespace) -> dict:
    """Train with the PC rule under muP for each g and width; record the training loss."""
    x, y = teacher_data(args, 4 * args.batch)
    results: dict = {}
    for g in args.exponents:
        for width in args.train_widths:
            parametrization = _mup(g)
            net = build(args, width, parametrization, seed=0)
            rule = PredictiveCoding(
                "mse",
                inference="simultaneous",
                inference_steps=args.inference_steps,
                inference_lr=args.inference_lr,
                output_weight=parametrization.output_weight(1.0, net),
            )
            optimizer = parametrization.build_optimizer(net, args.lr, rule=rule, optimizer="sgd")
            losses = [float(rule.loss.mean(rule.predict(net, x), y))]
            generator = torch.Generator().manual_seed(0)
            for _ in range(args.train_steps):
                batch = torch.randint(0, x.shape[0], (args.batch,), generator=generator)
                try:
                    rule.step(net, x[batch], y[batch], optimizer)
                    loss = float(rule.loss.mean(rule.predict(net, x), y))
                except NonFiniteEnergyError:
                    loss = math.inf
                losses.append(loss if math.isfinite(loss) else math.inf)
                if not math.isfinite(loss):
                    break
            results[f"g={g:g} width={width}"] = losses
    return results


def _slope(widths, values) -> float:
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def plot_cosines(args: argparse.Namespace, sweep: dict, path: Path) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5), sharex=True, sharey="row")
    for column, name in enumerate(("mup", "sp")):
        for row, (key, label) in enumerate((("cos_pc_gd", "GD"), ("cos_pc_gnt", "GNT"))):
            ax = axes[row, column]
            for g in args.exponents:
                rows = sweep[f"{name} g={g:g}"]
                widths = [r["width"] for r in rows]
                first = [1 - r[key][0] for r in rows]
                others = [1 - float(np.mean(r[key][1:])) for r in rows]
                ax.loglog(widths, first, "o-", color=COLORS.get(g), label=f"g = {g:g}")
                ax.loglog(widths, others, "x--", color=COLORS.get(g), alpha=0.7)
            ax.set_title(f"{'muP' if name == 'mup' else 'SP'}: 1 - cos(PC, {label})")
            ax.grid(True, which="both", alpha=0.3)
            if row == 1:
                ax.set_xlabel("width M")
    axes[0, 0].legend(title="gamma_L = (M/M_base)^(-g)", fontsize=8)
    fig.suptitle(
        f"Deep linear PC at equilibrium, initialization (depth {args.depth}, mean of {args.seeds} "
        "inits). Solid: input layer W_1 (only gamma_L (I+C)^-1 acts);\n"
        "dashed: mean of the other layers (their inputs are the equilibrium states x*)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gram(args: argparse.Namespace, sweep: dict, path: Path) -> dict:
    slopes = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, name in zip(axes, ("mup", "sp")):
        for g in args.exponents:
            rows = sweep[f"{name} g={g:g}"]
            widths = [r["width"] for r in rows]
            norms = [r["gram_norm"] for r in rows]
            slope = _slope(widths, norms)
            slopes[f"{name} g={g:g}"] = slope
            theory = (-1.0 - g if name == "mup" else -g) + 0.0  # + 0.0: no "-0.0"
            ax.loglog(widths, norms, "o-", color=COLORS.get(g),
                      label=f"g = {g:g}: slope {slope:+.2f} (theory {theory:+.1f})")
        title = "muP" if name == "mup" else "SP"
        ax.set_title(f"{title}: ||C||_2 with gamma_L = (M/{args.base_width})^(-g)")
        ax.set_xlabel("width M")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return slopes


def plot_training(args: argparse.Namespace, runs: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(args.train_widths), figsize=(4 * len(args.train_widths), 3.8),
                             sharey=True, squeeze=False)
    for ax, width in zip(axes[0], args.train_widths):
        for g in args.exponents:
            losses = np.array(runs[f"g={g:g} width={width}"])
            ceiling = 10 * losses[0]
            diverged = not (np.isfinite(losses[-1]) and losses[-1] < ceiling)
            shown = np.minimum(losses, ceiling)
            ax.semilogy(np.arange(len(losses)), shown, color=COLORS.get(g),
                        label=f"g = {g:g}" + (" (diverged)" if diverged else ""))
            if diverged:
                ax.plot(len(losses) - 1, ceiling, "X", color=COLORS.get(g), ms=10)
        ax.set_title(f"muP, width {width}")
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("training loss (full data)")
    fig.suptitle(
        f"PC rule ({args.inference_steps} simultaneous inference steps of {args.inference_lr:g}, "
        f"FPA) on a linear teacher, lr' = {args.lr:g}", fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sweep = sweep_updates(args)
    plot_cosines(args, sweep, args.out / "deep_linear_cosines.png")
    slopes = plot_gram(args, sweep, args.out / "deep_linear_gram.png")
    runs = train(args)
    plot_training(args, runs, args.out / "deep_linear_training.png")
    summary = {
        "gram_slopes": slopes,
        "sweep": sweep,
        "final_loss": {key: losses[-1] for key, losses in runs.items()},
        "steps_run": {key: len(losses) - 1 for key, losses in runs.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.summary is not None:
        args.summary.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("gram_slopes", "final_loss", "seconds")}, indent=1))
    return summary


if __name__ == "__main__":
    main()
