"""Width x learning-rate sweeps: does the lr tuned on a narrow net transfer to a wide one?

- :mod:`.experiment`: rule variants, data in memory, wiring one run (network, rule, optimizer);
- :mod:`.runner`: :func:`sweep` (progress, divergence, processes, resume) and :func:`train_run`;
- :mod:`.results`: run keys, ``results.jsonl``, best lr per width and its shift;
- :mod:`.cli`: the ``lightning-local sweep`` command.
"""

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
    read_results,
    shift_in_grid_steps,
)
from lightning_local.sweeps.runner import SweepConfig, SweepResult, log2_grid, sweep, train_run

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
    "shift_in_grid_steps",
]
