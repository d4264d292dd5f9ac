"""Analysis tools: closed forms that the learning rules are checked and explained against.

Moved to :mod:`lightning_local.diagnostics.deep_linear`; this package and
:mod:`lightning_local.analysis.deep_linear` re-export it.
"""

from lightning_local.diagnostics.deep_linear import (
    LinearEquilibrium,
    UpdateComparison,
    compare_updates,
    gd_gradients,
    gnt_gradients,
    layer_cosines,
    linear_equilibrium,
    linear_weights,
    output_jacobians,
    pc_gradients,
    pc_gram_matrix,
)

__all__ = [
    "LinearEquilibrium",
    "UpdateComparison",
    "compare_updates",
    "gd_gradients",
    "gnt_gradients",
    "layer_cosines",
    "linear_equilibrium",
    "linear_weights",
    "output_jacobians",
    "pc_gradients",
    "pc_gram_matrix",
]
