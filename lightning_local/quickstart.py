"""``lightning-local quickstart``: the main job, end to end on a CPU in about a minute.

Trains a 3-layer tanh MLP (width 512) on MNIST-1D (generated locally) with predictive coding
under muP: single-shot sequential inference (SI) from the feedforward states with the fixed
prediction assumption (FPA), MSE loss, SGD. Then it tests the model and prints the test
accuracy and where the logs (CSV, or offline wandb) and the checkpoint went::

    lightning-local quickstart
    lightning-local quickstart --rule bp --parametrization sp --epochs 5
    lightning-local quickstart --inference-steps 8 --inference simultaneous --inference-lr 0.2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_local._settings_cli import add_settings_arguments, settings_from_args
from lightning_local.rules.predictive_coding import PredictiveCodingSettings

__all__ = ["build_parser", "main", "run"]

PC_OPTIONS = ("inference", "inference_steps", "inference_lr", "fixed_prediction",
              "output_weight", "tolerance")
"""The predictive-coding settings the quickstart exposes (declared by the rule)."""

DEFAULTS: dict[str, Any] = dict(
    rule="pc",
    parametrization="mup",
    width=512,
    depth=3,
    epochs=30,
    batch_size=128,
    lr=0.1,
    momentum=0.9,
    seed=0,
    threads=1,
    out="runs",
)


def build_parser() -> argparse.ArgumentParser:
    """The quickstart's command-line options."""
    parser = argparse.ArgumentParser(
        prog="lightning-local quickstart",
        description=(
            "Train a muP predictive-coding MLP on MNIST-1D on the CPU, then print its test "
            "accuracy and where its logs and checkpoint went."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--rule", choices=("pc", "bp"), default=DEFAULTS["rule"],
        help="predictive coding or backprop")
    add("--parametrization", choices=("mup", "sp"), default=DEFAULTS["parametrization"],
        help="muP (base width 64) or the standard parametrization")
    add("--width", type=int, default=DEFAULTS["width"], help="hidden width M")
    add("--depth", type=int, default=DEFAULTS["depth"], help="number of weight layers")
    add("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs")
    add("--batch-size", type=int, default=DEFAULTS["batch_size"], help="batch size")
    add("--lr", type=float, default=DEFAULTS["lr"],
        help="width-independent SGD learning rate eta'")
    add("--momentum", type=float, default=DEFAULTS["momentum"], help="SGD momentum")
    pc = parser.add_argument_group(
        "predictive coding", "the rule's settings (ignored with --rule bp)"
    )
    add_settings_arguments(pc, PredictiveCodingSettings, only=PC_OPTIONS)
    add("--no-fpa", dest="fixed_prediction", action="store_false",
        help="same as --no-fixed-prediction")
    add("--seed", type=int, default=DEFAULTS["seed"], help="seed of the initialization")
    add("--threads", type=int, default=DEFAULTS["threads"],
        help="torch intra-op threads (the matrices are small: more threads mostly add "
             "synchronization, and stall badly on a busy machine)")
    add("--out", default=DEFAULTS["out"], help="folder of the run folders")
    add("--data-dir", default=None,
        help="data folder (default: $LIGHTNING_LOCAL_DATA, else ./data)")
    add("--num-samples", type=int, default=5000, help="MNIST-1D size (train + test)")
    add("--wandb", action="store_true", help="log with wandb in offline mode instead of CSV")
    add("--progress-bar", action=argparse.BooleanOptionalAction, default=True,
        help="show Lightning's progress bar")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and test as ``args`` say; returns test accuracy, loss, paths and wall time."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_local.data import MNIST1DDataModule
    from lightning_local.models import MLP
    from lightning_local.modules import BackpropModule, PredictiveCodingModule
    from lightning_local.modules.checkpoint import AtomicCheckpointIO

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)
    data = MNIST1DDataModule(
        data_dir=args.data_dir, batch_size=args.batch_size, seed=42, num_samples=args.num_samples
    )
    network = MLP(
        in_features=data.in_features, width=args.width, num_classes=data.num_classes,
        depth=args.depth, activation="tanh",
    )
    common = dict(
        network=network, parametrization=args.parametrization, lr=args.lr,
        momentum=args.momentum, loss="mse",
    )
    if args.rule == "pc":
        model: L.LightningModule = PredictiveCodingModule(
            **common, **settings_from_args(args, PredictiveCodingSettings, only=PC_OPTIONS)
        )
    else:
        model = BackpropModule(**common)

    name = f"{args.rule}_{args.parametrization}_w{args.width}"
    logger = _logger(args, name)
    checkpoints = ModelCheckpoint(monitor="val/acc", mode="max", save_last=True)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[checkpoints],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=args.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=10,
        default_root_dir=args.out,
    )
    trainer.fit(model, datamodule=data)
    # read the paths now: testing from the best checkpoint restores the callback's old state
    best, last = checkpoints.best_model_path, checkpoints.last_model_path
    tested = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)[0]
    if args.wandb:  # close the run, so later runs in this process start their own
        logger.experiment.finish()
    return {
        "test_acc": float(tested["test/acc"]),
        "test_loss": float(tested["test/loss"]),
        "log_dir": _log_dir(logger),
        "best_checkpoint": best,
        "last_checkpoint": last,
        "seconds": time.perf_counter() - start,
    }


def _log_dir(logger: Any) -> str:
    """The run's log folder: the CSV version folder, or wandb's offline run folder."""
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "dir"):  # wandb
        return str(Path(logger.experiment.dir).parent)
    return str(logger.log_dir)


def _logger(args: argparse.Namespace, name: str) -> Any:
    save_dir = Path(args.out) / "quickstart"
    if args.wandb:
        from lightning_local.loggers import make_wandb_logger

        return make_wandb_logger(name=name, save_dir=save_dir, offline=True)
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(save_dir), name=name)


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-local quickstart [options]``; returns the exit code."""
    args = build_parser().parse_args(argv)
    what = "predictive coding (SI + FPA)" if args.rule == "pc" else "backprop"
    if args.rule == "pc" and (args.inference != "sequential" or args.inference_steps != 1):
        what = f"predictive coding ({args.inference}, T={args.inference_steps})"
    print(
        f"quickstart: {what}, {args.parametrization}, {args.depth}-layer tanh MLP of width "
        f"{args.width}, MNIST-1D, {args.epochs} epochs on the CPU"
    )
    from lightning_local.errors import NonFiniteEnergyError

    try:
        result = run(args)
    except NonFiniteEnergyError as error:
        print(f"the run diverged: {error}", file=sys.stderr)
        if args.parametrization == "sp":
            print(
                f"hint: under SP the largest stable learning rate falls as the width grows "
                f"(here {args.width}); lower --lr, or keep --parametrization mup, whose "
                "learning rate does not depend on the width.",
                file=sys.stderr,
            )
        return 1
    print(f"test accuracy: {result['test_acc']:.4f} (test loss {result['test_loss']:.4f})")
    print(f"logs:          {result['log_dir']}")
    if args.wandb:
        print(f"               (offline wandb run: `wandb sync {result['log_dir']}` uploads it)")
    print(f"checkpoint:    {result['best_checkpoint']} (best val/acc)")
    print(f"               {result['last_checkpoint']} (last)")
    print(f"wall time:     {result['seconds']:.1f} s")
    return 0
