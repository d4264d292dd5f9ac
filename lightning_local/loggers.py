"""Weights & Biases through Lightning's ``WandbLogger``: offline by default, figures as images.

Moved to :mod:`lightning_local.diagnostics.loggers`; re-exported here.
"""

from lightning_local.diagnostics.loggers import (
    add_wandb_arguments,
    command_wandb_run,
    log_figure,
    log_table,
    make_wandb_logger,
)

__all__ = [
    "add_wandb_arguments",
    "command_wandb_run",
    "log_figure",
    "log_table",
    "make_wandb_logger",
]
