"""How far a local rule's update is from backprop's, layer by layer.

Moved to :mod:`lightning_local.diagnostics.callbacks` (the callback and
:func:`local_update_cosines`) and :mod:`lightning_local.diagnostics.alignment` (the cosine of
two gradients); re-exported here.
"""

from lightning_local.diagnostics.callbacks import LocalUpdateAlignment, local_update_cosines

__all__ = [
    "LocalUpdateAlignment",
    "local_update_cosines",
]
