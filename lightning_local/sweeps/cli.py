"""``lightning-local sweep``: the width x learning-rate sweep from the command line.

    lightning-local sweep --rules bp pc-si dtp --widths 64 256 1024 --log2-lr -8 1 \\
        --epochs 5 --output runs/transfer

    lightning-local sweep --config sweep.yaml        # your model and data, see config_file

    lightning-local sweep ... --backend ray --ray-address auto --gpus-per-trial 0.25
    lightning-local sweep ... --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT

Rerunning the same command skips the runs already finished in any results file of
``<output>`` (``results.jsonl`` and the shards' ``results.shard-<i>-of-<n>.jsonl``) and runs
failed ones again (``--no-retry-failed`` keeps them). With ``--wandb`` every trial becomes a W&B
run and the arguments, ``transfer.png`` and the best-lr table go to the sweep's own run, all in
one group, offline in ``<output>/wandb/`` (``wandb sync <run folder>`` uploads them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_local.errors import LocalLearningError
from lightning_local.loggers import add_wandb_arguments
from lightning_local.sweeps.backends import BACKENDS, Backend, make_backend
from lightning_local.sweeps.config_file import apply_config_file
from lightning_local.sweeps.experiment import RULE_VARIANTS
from lightning_local.sweeps.results import METRICS
from lightning_local.sweeps.runner import SweepConfig, log2_grid, sweep
from lightning_local.sweeps.shards import parse_shard
from lightning_local.sweeps.wandb_logging import (
    WANDB_MODES,
    WandbTrialLogger,
    default_group,
    sweep_wandb_run,
)

__all__ = ["backend_of", "build_parser", "main", "parse"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-local sweep``."""
    defaults = SweepConfig()
    parser = argparse.ArgumentParser(
        prog="lightning-local sweep",
        description="Train every (rule, parametrization, width, lr, seed) run, write "
        "results.jsonl and transfer.png, print the best lr per width and its shift. "
        "Rerunning the same command skips finished runs.",
    )
    parser.add_argument("--config", default=None,
                        help="YAML file of these options plus model and data "
                        "(class_path/init_args); command-line options override it")
    grid = parser.add_argument_group("grid")
    grid.add_argument("--rules", nargs="+", default=["bp"],
                      help=f"rule variants: {', '.join(RULE_VARIANTS)}; overrides after a "
                      "colon, e.g. 'pc-sim:inference_steps=16,inference_lr=0.1'")
    grid.add_argument("--parametrizations", nargs="+", default=["sp", "mup"],
                      choices=["sp", "mup"])
    grid.add_argument("--widths", nargs="+", type=int, default=list(defaults.widths))
    lrs = grid.add_mutually_exclusive_group()
    lrs.add_argument("--log2-lr", nargs="+", type=float, default=None,
                     metavar="START STOP [STEP]",
                     help="lr grid 2^START .. 2^STOP in steps of STEP (default: -6 1 1, "
                     "factors of 2)")
    lrs.add_argument("--lrs", nargs="+", type=float, default=None, help="explicit lr values")
    grid.add_argument("--seeds", nargs="+", type=int, default=[0])
    budget = parser.add_argument_group("budget and data")
    budget.add_argument("--epochs", type=int, default=defaults.epochs)
    budget.add_argument("--steps", type=int, default=None, help="optimizer steps (not epochs)")
    budget.add_argument("--dataset", default="mnist1d", choices=["mnist1d", "fashion-mnist"])
    budget.add_argument("--data-dir", default=None)
    budget.add_argument("--num-samples", type=int, default=defaults.num_samples,
                        help="MNIST-1D size (80%% train)")
    model = parser.add_argument_group("model and optimizer")
    model.add_argument("--batch-size", type=int, default=defaults.batch_size)
    model.add_argument("--base-width", type=int, default=defaults.base_width)
    model.add_argument("--depth", type=int, default=defaults.depth)
    model.add_argument("--activation", default=defaults.activation)
    model.add_argument("--bias", action="store_true", help="give the layers biases")
    model.add_argument("--loss", default=defaults.loss, choices=["mse", "cross_entropy"])
    model.add_argument("--momentum", type=float, default=defaults.momentum)
    model.add_argument("--output-weight-exponent", type=float, default=0.0,
                       help="muP's g for PC (gamma_L = gamma_L' m^-g)")
    model.add_argument("--zero-readout", action="store_true",
                       help="start the readout's weights at 0")
    run = parser.add_argument_group("running")
    run.add_argument("--output", default="sweep", help="output folder")
    run.add_argument("--backend", default="local", choices=BACKENDS,
                     help="where trials run: local processes (default) or Ray tasks")
    run.add_argument("--workers", type=int, default=1,
                     help="parallel local processes (local backend)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch threads per trial (local: default 1 with several workers; "
                     "ray: CPUs reserved per trial, default 1)")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N parts of the grid (from 0), into "
                     "results.shard-I-of-N.jsonl; readers merge every shard's file")
    run.add_argument("--no-retry-failed", action="store_true",
                     help="keep failed runs as failed instead of running them again")
    run.add_argument("--max-retries", type=int, default=2,
                     help="how often a trial whose worker process or node was lost runs again")
    run.add_argument("--metric", default="train_loss", choices=sorted(METRICS),
                     help="what the best lr optimizes")
    run.add_argument("--no-plot", action="store_true")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    ray = parser.add_argument_group("Ray backend (pip install \"lightning-local[ray]\")")
    ray.add_argument("--ray-address", default=None,
                     help="join this Ray cluster ('auto': the one `ray start` made on this "
                     "node; default: start a local Ray instance)")
    ray.add_argument("--gpus-per-trial", type=float, default=0.0,
                     help="GPU share of each trial, fractions allowed (0.25: four per GPU)")
    ray.add_argument("--trials-per-task", type=int, default=8,
                     help="most trials one Ray task runs in a row")
    add_wandb_arguments(parser)
    wandb = next((g for g in parser._action_groups if g.title == "Weights & Biases"), parser)
    wandb.add_argument("--wandb-group", default=None,
                       help="W&B group of the sweep's run and of its trials' runs, one run per "
                       "trial (default: sweep-<output folder name>)")
    wandb.add_argument("--wandb-mode", default="offline", choices=WANDB_MODES,
                       help="offline (default; `wandb sync` uploads later) or online")
    return parser


def backend_of(args: argparse.Namespace) -> Backend:
    """The backend the running options ask for.

    Raises:
        LocalLearningError: an option of one backend given to the other.
    """
    if args.backend == "ray":
        if args.workers != 1:
            raise LocalLearningError(
                "--workers is the local backend's. Fix: leave it out with --backend ray: Ray "
                "runs as many trials at once as its CPUs (--threads each) and GPUs "
                "(--gpus-per-trial each) allow."
            )
        return make_backend("ray", address=args.ray_address, threads=args.threads,
                            gpus_per_trial=args.gpus_per_trial,
                            trials_per_task=args.trials_per_task, max_retries=args.max_retries)
    ray_options = [name for name, given in (
        ("--ray-address", args.ray_address is not None),
        ("--gpus-per-trial", args.gpus_per_trial != 0.0),
        ("--trials-per-task", args.trials_per_task != 8),
    ) if given]
    if ray_options:
        raise LocalLearningError(
            f"{', '.join(ray_options)}: only with --backend ray. Fix: add --backend ray."
        )
    return make_backend("local", workers=args.workers, threads=args.threads,
                        max_retries=args.max_retries)


def parse(argv: Sequence[str] | None = None) -> tuple[SweepConfig, argparse.Namespace]:
    """The sweep configuration and the running options of a command line (``--config`` file
    first, then the options given, which override it).

    Raises:
        LocalLearningError: a bad config file or grid.
    """
    parser = build_parser()
    extra = apply_config_file(
        parser, argv, ("model", "data", "optimizer", "data_seed", "divergence_factor")
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.log2_lr is not None and len(args.log2_lr) not in (2, 3):
        raise LocalLearningError(
            f"--log2-lr takes START STOP [STEP], got {args.log2_lr}. Fix: e.g. --log2-lr -8 1."
        )
    # --log2-lr on the command line wins over lrs from a config file
    lrs = log2_grid(*args.log2_lr) if args.log2_lr else (args.lrs or log2_grid(-6, 1))
    config = SweepConfig(
        rules=args.rules, parametrizations=args.parametrizations, widths=args.widths,
        lrs=lrs, seeds=args.seeds, epochs=args.epochs, steps=args.steps,
        dataset=args.dataset, data_dir=args.data_dir, num_samples=args.num_samples,
        batch_size=args.batch_size, base_width=args.base_width, depth=args.depth,
        activation=args.activation, bias=args.bias, loss=args.loss,
        momentum=args.momentum, output_weight_exponent=args.output_weight_exponent,
        zero_readout=args.zero_readout, **extra,
    )
    return config, args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-local sweep``; returns the exit code."""
    try:
        config, args = parse(argv)
        backend = backend_of(args)
        shard = parse_shard(args.shard)
        group = args.wandb_group or default_group(args.output)
        trials = (WandbTrialLogger(group, args.output, args.wandb_project, args.wandb_mode)
                  if args.wandb else None)
        name = f"sweep-{Path(args.output).name}" + (
            f"-shard-{shard.index}-of-{shard.count}" if shard else "")
        with sweep_wandb_run(args, name, args.output, group, args.wandb_mode) as log_to:
            result = sweep(
                config, args.output, backend=backend, shard=shard,
                retry_failed=not args.no_retry_failed, metric=args.metric,
                plot=not args.no_plot,
                log=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
                log_to=log_to, trial_logger=trials,
            )
    except LocalLearningError as error:
        print(f"lightning-local sweep: {error}", file=sys.stderr)
        return 2
    print(result.table)
    failed = f", {len(result.failed)} failed (see best_lr.md)" if result.failed else ""
    print(f"\n{result.executed} runs trained, {result.skipped} skipped (already finished)"
          f"{failed}; results in {result.results_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
