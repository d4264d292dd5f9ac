"""Width x learning-rate sweeps: does the lr tuned on a narrow net transfer to a wide one?

- :mod:`.experiment`: rule variants, data in memory, wiring one run (network, rule, optimizer);
- :mod:`.training`: :func:`train_run`, one run in plain PyTorch (divergence recorded);
- :mod:`.trials`: a trial as every backend runs it (any other exception: a failed record);
- :mod:`.runner`: :func:`sweep`, the driver (grid, resume, the only writer, tables, figure);
- :mod:`.backends`: where trials run: this process, local processes, Ray tasks;
- :mod:`.shards`: ``--shard i/n`` for SLURM arrays, one results file per shard;
- :mod:`.results`: run keys, results files (merged over shards), best lr per width and its shift;
- :mod:`.wandb_logging`: one W&B run per trial, in one group per sweep;
- :mod:`.cli`: the ``lightning-local sweep`` command.
"""

from lightning_local.sweeps.backends import Backend, LocalBackend, RayBackend
from lightning_local.sweeps.experiment import (
    RULE_VARIANTS,
    RuleVariant,
    build_experiment,
    load_dataset,
    parse_variant,
)
from lightning_local.sweeps.results import (
    BestLR,
    best_learning_rates,
    format_best_lr_table,
    format_wider_is_better_table,
    load_results,
    read_results,
    shift_in_grid_steps,
)
from lightning_local.sweeps.runner import SweepConfig, SweepResult, log2_grid, sweep, train_run
from lightning_local.sweeps.shards import Shard

__all__ = [
    "RULE_VARIANTS",
    "RuleVariant",
    "parse_variant",
    "build_experiment",
    "load_dataset",
    "SweepConfig",
    "SweepResult",
    "sweep",
    "train_run",
    "log2_grid",
    "BestLR",
    "best_learning_rates",
    "format_best_lr_table",
    "format_wider_is_better_table",
    "read_results",
    "load_results",
    "shift_in_grid_steps",
    "Backend",
    "LocalBackend",
    "RayBackend",
    "Shard",
]
