"""The coordinate-check callback.

Moved to :mod:`lightning_local.diagnostics.callbacks`; re-exported here.
"""

from lightning_local.diagnostics.callbacks import CoordCheckCallback

__all__ = [
    "CoordCheckCallback",
]
