"""Width scaling: SP and muP tables per rule and optimizer, applied through mup base shapes.

- :mod:`.tables`: the abc exponents of docs/math.md §3.3, as data;
- :mod:`.roles`: parameter roles (input, hidden, output, vector, scalar, fixed) from
  ``p.infshape``;
- :mod:`.base_shapes`: attaching base shapes (networks, ``.bsh`` files, width builders),
  never rescaling;
- :mod:`.parametrization`: ``SP`` and ``MuP``: init rescale once, per-group learning rates for
  plain ``torch.optim``, PC's output weight.
"""

from lightning_local.parametrization.base_shapes import (
    base_shapes_from_builder,
    has_base_shapes,
    load_base_shapes,
    reattach_base_shapes,
    set_base_shapes,
)
from lightning_local.parametrization.parametrization import (
    SP,
    MuP,
    Parametrization,
    get_parametrization,
)
from lightning_local.parametrization.roles import ClassifiedParameter, classify_parameters
from lightning_local.parametrization.tables import ROLES, RoleExponents, role_exponents

__all__ = [
    "SP",
    "MuP",
    "Parametrization",
    "get_parametrization",
    "set_base_shapes",
    "base_shapes_from_builder",
    "load_base_shapes",
    "has_base_shapes",
    "reattach_base_shapes",
    "classify_parameters",
    "ClassifiedParameter",
    "role_exponents",
    "RoleExponents",
    "ROLES",
]
