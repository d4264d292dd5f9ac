"""Callbacks for seeing inside training: moved to :mod:`lightning_local.diagnostics.callbacks`.

This package re-exports them so ``lightning_local.callbacks`` (and its submodules
``coord_check``, ``local_update_alignment``, ``run_config``) keep working:

- :class:`LocalUpdateAlignment`: every N steps, the cosine between each layer's local update
  and the backprop gradient on the same batch;
- :class:`CoordCheckCallback`: per-layer rms sizes during training (a coordinate check);
- :class:`LogRunConfig`: the rule's settings, the process layout and the base-shape table,
  logged with the run.
"""

from lightning_local.diagnostics.callbacks import (
    CoordCheckCallback,
    LocalUpdateAlignment,
    LogRunConfig,
    base_shape_table,
    local_update_cosines,
    run_config,
)

__all__ = [
    "CoordCheckCallback",
    "LocalUpdateAlignment",
    "LogRunConfig",
    "base_shape_table",
    "local_update_cosines",
    "run_config",
]
