"""The run's configuration for the loggers: rule, parametrization, processes and base shapes.

Moved to :mod:`lightning_local.diagnostics.callbacks`; re-exported here.
"""

from lightning_local.diagnostics.callbacks import (
    LogRunConfig,
    base_shape_table,
    run_config,
)

__all__ = [
    "LogRunConfig",
    "base_shape_table",
    "run_config",
]
