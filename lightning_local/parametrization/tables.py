"""The abc tables of docs/math.md §3.3 (the abc form of §3.1; paper, Eq. (8)), as data.

A weight of role ``r`` is initialized as ``W ~ N(0, sigma^2 M^{-2 b_r})`` (the input layer's
variance is relative to ``1/d0``) and trained with the learning rate
``eta_r = eta' * (M / M_base)^{-c_r}``. Only ratios to the base width ``M_base`` are used, so at
the base width every parametrization coincides with SP.

SGD, roles (input, hidden, output):

================  =================  ===================================================
rule / param      b                  c
================  =================  ===================================================
SP (all rules)    (0, 1/2, 1/2)      (0, 0, 0)
BP muP            (0, 1/2, 1)        (-1, 0, 1)
PC muP            (0, 1/2, 1)        (-1-g, -g, 1-g), with gamma_L = gamma_L' M^{-g}
TP/DTP muP        (0, 1/2, 1/2)      (0, 1, 1)
================  =================  ===================================================

Adam (not covered by the paper; our default): BP/PC muP b = (0, 1/2, 1), c = (0, 1, 1);
TP muP b = (0, 1/2, 1/2), c = (0, 1, 1); SP as for SGD. PC's gamma shift is *not* applied to
Adam: Adam divides the gradient by its own running scale, so multiplying PC's weight gradient
by ``gamma_L`` leaves the update unchanged (up to ``eps``) and needs no compensation.

The other roles (see :mod:`lightning_local.parametrization.roles`):

- ``vector`` (hidden biases, norm weights): the input layer's exponents, as in ``mup``;
- ``scalar`` (the readout bias) and ``fixed`` (weights with no width dimension): b = c = 0.

PC muP with SGD: PC's whole weight gradient is ``gamma_L`` times the backprop gradient
(the exactness identity), so with ``gamma_L = gamma_L' M^{-g}`` every role's ``c`` is BP's
shifted by ``-g``: scalar, vector and fixed parameters included.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_local.errors import LocalLearningError

__all__ = [
    "ROLES",
    "RULES",
    "OPTIMIZERS",
    "PARAMETRIZATIONS",
    "RoleExponents",
    "role_exponents",
    "output_weight_exponent",
    "normalize_rule",
    "normalize_optimizer",
]

ROLES = ("input", "hidden", "output", "vector", "scalar", "fixed")
RULES = ("bp", "pc", "tp")
OPTIMIZERS = ("sgd", "adam")
PARAMETRIZATIONS = ("sp", "mup")

_RULE_ALIASES = {
    "bp": "bp", "backprop": "bp", "backpropagation": "bp",
    "pc": "pc", "predictive_coding": "pc",
    "tp": "tp", "dtp": "tp", "target_propagation": "tp",
}
_OPTIMIZER_ALIASES = {"sgd": "sgd", "adam": "adam", "adamw": "adam"}

# (b_input, b_hidden, b_output), (c_input, c_hidden, c_output); PC-SGD-muP's -g shift is
# applied in role_exponents, so PC appears here with g = 0 (= BP's muP).
_HALF = 0.5
_TABLE: dict[tuple[str, str, str], tuple[tuple[float, ...], tuple[float, ...]]] = {}
for _rule in RULES:
    for _optimizer in OPTIMIZERS:
        _TABLE["sp", _rule, _optimizer] = ((0, _HALF, _HALF), (0, 0, 0))
_TABLE["mup", "bp", "sgd"] = ((0, _HALF, 1), (-1, 0, 1))
_TABLE["mup", "pc", "sgd"] = ((0, _HALF, 1), (-1, 0, 1))
_TABLE["mup", "tp", "sgd"] = ((0, _HALF, _HALF), (0, 1, 1))
_TABLE["mup", "bp", "adam"] = ((0, _HALF, 1), (0, 1, 1))
_TABLE["mup", "pc", "adam"] = ((0, _HALF, 1), (0, 1, 1))
_TABLE["mup", "tp", "adam"] = ((0, _HALF, _HALF), (0, 1, 1))


@dataclass(frozen=True)
class RoleExponents:
    """Width exponents of one parameter role: init std ``~ M^{-init}``, lr ``~ M^{-lr}``."""

    init: float
    lr: float


def normalize_rule(rule: object) -> str:
    """``"bp"``, ``"pc"`` or ``"tp"`` from a name, an alias or a rule object with ``.name``."""
    name = getattr(rule, "name", rule)
    key = _RULE_ALIASES.get(str(name).lower()) if isinstance(name, str) else None
    if key is None:
        raise LocalLearningError(
            f"unknown rule {rule!r} for the parametrization tables. Fix: use one of "
            f"{sorted(_RULE_ALIASES)} (or a LocalRule whose .name is one of {list(RULES)})."
        )
    return key


def normalize_optimizer(optimizer: str) -> str:
    """``"sgd"`` or ``"adam"`` (``"adamw"`` uses Adam's table)."""
    key = _OPTIMIZER_ALIASES.get(str(optimizer).lower())
    if key is None:
        raise LocalLearningError(
            f"no width-scaling table for optimizer {optimizer!r}. Fix: use one of "
            f"{sorted(_OPTIMIZER_ALIASES)}."
        )
    return key


def role_exponents(
    parametrization: str, rule: object, optimizer: str, output_weight_exponent: float = 0.0
) -> dict[str, RoleExponents]:
    """``{role: RoleExponents(b, c)}`` for every role of :data:`ROLES`.

    Args:
        parametrization: ``"sp"`` or ``"mup"``.
        rule: ``"bp"``, ``"pc"`` or ``"tp"`` (aliases accepted).
        optimizer: ``"sgd"`` or ``"adam"``.
        output_weight_exponent: PC's ``g`` (used only by PC muP with SGD).
    """
    rule, optimizer = normalize_rule(rule), normalize_optimizer(optimizer)
    b, c = _TABLE[parametrization, rule, optimizer]
    shift = output_weight_exponent if _has_gamma_shift(parametrization, rule, optimizer) else 0.0
    main = {
        role: RoleExponents(float(b_role), float(c_role) - shift)
        for role, b_role, c_role in zip(("input", "hidden", "output"), b, c)
    }
    main["vector"] = main["input"]
    main["scalar"] = main["fixed"] = RoleExponents(0.0, 0.0 - shift)
    return main


def output_weight_exponent(parametrization: str, rule: object, g: float = 0.0) -> float:
    """Exponent ``e`` of ``gamma_L = gamma_L' (M / M_base)^{e}``: ``-g`` for PC muP, else 0.

    Independent of the optimizer: ``gamma_L`` also weighs the output loss against the hidden
    energies during inference, which Adam does not normalize away.
    """
    return -g if parametrization == "mup" and normalize_rule(rule) == "pc" else 0.0


def _has_gamma_shift(parametrization: str, rule: str, optimizer: str) -> bool:
    return parametrization == "mup" and rule == "pc" and optimizer == "sgd"
