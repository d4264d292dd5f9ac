"""Figures of the sweeps and coordinate checks.

Moved to :mod:`lightning_local.diagnostics.plots`; re-exported here.
"""

from lightning_local.diagnostics.plots import plot_coord_check, plot_transfer

__all__ = [
    "plot_coord_check",
    "plot_transfer",
]
