"""Coordinate checks for local rules: does every layer's size stay put as the width grows?

Moved to :mod:`lightning_local.diagnostics.coord_check` (the check, its result and the
``lightning-local coord-check`` command) and :mod:`lightning_local.diagnostics.measures` (the
measurements); re-exported here.
"""

from lightning_local.diagnostics.coord_check import (
    QUANTITIES,
    CoordCheckResult,
    coord_check,
    main,
    variant_family,
)
from lightning_local.diagnostics.measures import (
    fit_slope,
    forward_rms,
    pc_rms,
    snapshot,
    tp_rms,
    weight_update_rms,
)

__all__ = [
    "QUANTITIES",
    "CoordCheckResult",
    "coord_check",
    "main",
    "variant_family",
    "fit_slope",
    "forward_rms",
    "pc_rms",
    "snapshot",
    "tp_rms",
    "weight_update_rms",
]
