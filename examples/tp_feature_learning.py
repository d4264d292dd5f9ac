"""Target propagation learns features at every width (docs/math.md §3.7).

Trains a 3-layer tanh MLP (no biases, MSE) for ``k`` steps at widths 64 .. 2048, with

- DTP with closed-form ridge feedback under TP's muP (b = (0, 1/2, 1/2), c = (0, 1, 1)), and
- backprop under BP's muP (b = (0, 1/2, 1), c = (-1, 0, 1)),

then measures, on a fixed probe batch, the feature change ``Delta h_l`` (after minus before):

- ``||Delta h_l||_rms`` per layer: flat across widths = features move by Theta(1);
- the readout alignment ``A = ||W_L Delta h_{L-1}|| / (rms(W_L) rms(Delta h_{L-1}))``
  (per probe sample, averaged): the sum ``sum_i W_L,ci Delta h_i`` with the entry scales of
  ``W_L`` and ``Delta h`` factored out. It grows like ``M`` when ``Delta h_{L-1}`` is aligned with
  ``W_L`` (backprop: law of large numbers) and like ``M^{1/2}`` when it is not (TP: the feedback
  regression does not see ``W_L``, central limit theorem). The fitted log-log slopes are
  printed, with the raw ``||W_L Delta h_{L-1}||`` slope (about 0 for both: muP keeps the
  output change Theta(1); the two differ in how).

Run ``python examples/tp_feature_learning.py`` (about 10 minutes on 2 CPU cores); it writes
``docs/figures/tp_feature_learning.png`` and prints the measured slopes. ``--help`` for options.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_local.data import load_mnist1d
from lightning_local.models import MLP
from lightning_local.network import as_blocks, feedforward
from lightning_local.parametrization import MuP, set_base_shapes
from lightning_local.rules.backprop import Backprop
from lightning_local.rules.target_propagation import TargetPropagation

RULES = ("tp", "bp")
DEFAULT_LR = {"tp": 0.5, "bp": 0.1}
DEFAULT_ADAM_LR = {"tp": 0.01, "bp": 0.01}


def measure(
    rule_name: str,
    width: int,
    inputs: Tensor,
    labels: Tensor,
    probe: Tensor,
    steps: int = 10,
    lr: float | None = None,
    batch_size: int = 128,
    base_width: int = 64,
    seed: int = 0,
    optimizer: str = "sgd",
) -> dict[str, object]:
    """Train ``steps`` steps of ``optimizer`` (``"sgd"`` or ``"adam"``) under the rule's muP;
    return the feature-change measures."""
    torch.manual_seed(seed)
    net = MLP(inputs.shape[1], width, int(labels.max()) + 1, depth=3, bias=False)
    if rule_name == "tp":
        rule = TargetPropagation("mse", variant="dtp", beta=0.5, feedback_training="ridge")
        model = rule.build_network(net)
    else:
        rule, model = Backprop("mse"), net
    set_base_shapes(model, base_width)
    parametrization = MuP()
    parametrization.initialize(model, rule=rule, optimizer=optimizer)
    lr = lr or (DEFAULT_LR if optimizer == "sgd" else DEFAULT_ADAM_LR)[rule_name]
    optimizer = parametrization.build_optimizer(model, lr, rule=rule, optimizer=optimizer)
    blocks = as_blocks(model)
    with torch.no_grad():
        before = feedforward(blocks, probe)
    generator = torch.Generator().manual_seed(10_000 + seed)
    for _ in range(steps):
        index = torch.randint(0, inputs.shape[0], (batch_size,), generator=generator)
        rule.step(model, inputs[index], labels[index], optimizer)
    with torch.no_grad():
        after = feedforward(blocks, probe)
        delta = [a - b for a, b in zip(after[1:], before[1:])]
        readout = blocks[-1].weight
        change = delta[-2] @ readout.T  # W_L Delta h_{L-1}, one row per probe sample
        raw = change.norm(dim=1).mean().item()
        scale = readout.pow(2).mean().sqrt() * delta[-2].pow(2).mean().sqrt()
    return {
        "delta_h_rms": [d.pow(2).mean().sqrt().item() for d in delta],
        "readout_change": raw,
        "alignment": raw / scale.item(),
    }


def fitted_slope(widths: Sequence[int], values: Sequence[float]) -> float:
    """Least-squares slope of ``log(values)`` against ``log(widths)``."""
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def run(
    widths: Sequence[int], seeds: Sequence[int], steps: int, inputs: Tensor, labels: Tensor,
    probe: Tensor,
) -> dict[str, dict[str, np.ndarray]]:
    """Seed-averaged measures per rule: arrays indexed by width."""
    results = {}
    for rule_name in RULES:
        rows = [
            [measure(rule_name, w, inputs, labels, probe, steps, seed=s) for s in seeds]
            for w in widths
        ]
        results[rule_name] = {
            key: np.array([np.mean([r[key] for r in row], axis=0) for row in rows])
            for key in ("delta_h_rms", "readout_change", "alignment")
        }
        slope = fitted_slope(widths, results[rule_name]["alignment"])
        raw = fitted_slope(widths, results[rule_name]["readout_change"])
        print(f"{rule_name}: alignment slope {slope:.3f}, raw ||W_L dh|| slope {raw:.3f}")
        for width, dh in zip(widths, results[rule_name]["delta_h_rms"]):
            print(f"  width {width:5d}: ||dh_l||_rms = " + ", ".join(f"{v:.3f}" for v in dh))
    return results


def plot(widths: Sequence[int], results: dict, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    styles = {"tp": ("DTP, TP muP", "-"), "bp": ("backprop, BP muP", "--")}
    for rule_name, (label, style) in styles.items():
        dh = results[rule_name]["delta_h_rms"]
        for layer in range(dh.shape[1]):
            left.plot(widths, dh[:, layer], style, marker="o",
                      label=f"{label}, layer {layer + 1}")
        alignment = results[rule_name]["alignment"]
        slope = fitted_slope(widths, alignment)
        right.plot(widths, alignment, style, marker="o", label=f"{label}: slope {slope:.2f}")
    reference = results["tp"]["alignment"][0]
    for exponent in (0.5, 1.0):
        right.plot(widths, [reference * (w / widths[0]) ** exponent for w in widths], ":",
                   color="grey", linewidth=1)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("width M")
    left.set_title(f"feature change after {steps} steps")
    left.set_ylabel(r"$\|\Delta h_l\|_{rms}$")
    left.legend(fontsize=7)
    right.set_title("readout alignment (grey: slopes 1/2 and 1)")
    right.set_ylabel(r"$\|W_L \Delta h_{L-1}\| / (rms(W_L)\, rms(\Delta h_{L-1}))$")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data-dir", default=None, help="MNIST-1D cache folder")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/tp_feature_learning.png"))
    args = parser.parse_args(argv)
    data = load_mnist1d(args.data_dir)
    inputs, labels = data["x_train"], data["y_train"]
    results = run(args.widths, range(args.seeds), args.steps, inputs, labels, inputs[:256])
    plot(args.widths, results, args.out, args.steps)
    if math.isnan(results["tp"]["alignment"].sum()):
        raise SystemExit("a run diverged")


if __name__ == "__main__":
    main()
