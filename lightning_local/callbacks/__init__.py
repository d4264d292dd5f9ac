"""Callbacks for seeing inside training (they watch; the algorithm lives in the rules).

- :class:`LocalUpdateAlignment`: every N steps, the cosine between each layer's local update
  and the backprop gradient on the same batch;
- :class:`CoordCheckCallback`: per-layer rms sizes during training (a coordinate check);
- :class:`LogRunConfig`: the rule's settings, the process layout and the base-shape table,
  logged with the run.
"""

from lightning_local.callbacks.coord_check import CoordCheckCallback
from lightning_local.callbacks.local_update_alignment import (
    LocalUpdateAlignment,
    local_update_cosines,
)
from lightning_local.callbacks.run_config import LogRunConfig, base_shape_table, run_config

__all__ = [
    "CoordCheckCallback",
    "LocalUpdateAlignment",
    "LogRunConfig",
    "base_shape_table",
    "local_update_cosines",
    "run_config",
]
