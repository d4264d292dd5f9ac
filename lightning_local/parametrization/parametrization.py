"""Width parametrizations SP and muP: init rescale once, per-group learning rates.

A parametrization turns the tables of :mod:`~lightning_local.parametrization.tables` into

- an init rescale (:meth:`Parametrization.initialize`): the builders initialize in SP
  (``W ~ N(0, sigma^2 / fan_in)``, b = (0, 1/2, 1/2)); a weight of role r is multiplied by
  ``m^{-(b_r - b_r^SP)}`` with ``m = M / M_base`` (``mup``'s width multiplier). Only roles whose
  ``b`` differs from SP change (muP's readout: ``m^{-1/2}``). It runs once per model;
- parameter groups for plain ``torch.optim`` (:meth:`Parametrization.param_groups`): role r
  gets ``lr_r = lr * m^{-c_r}`` and ``weight_decay_r = weight_decay * m^{c_r}`` (so that
  ``lr_r * weight_decay_r`` does not depend on width, as in ``mup``);
- PC's output weight (:meth:`Parametrization.output_weight`): ``gamma_L = gamma_L' m^{-g}``.

At the base width ``m = 1`` and every parametrization coincides with SP.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from lightning_local.errors import LocalLearningError
from lightning_local.parametrization.roles import (
    Modules,
    classify_parameters,
    model_width_mult,
    named_parameters,
    require_base_shapes,
    unwrap,
)
from lightning_local.parametrization.tables import (
    ROLES,
    RoleExponents,
    normalize_optimizer,
    normalize_rule,
    output_weight_exponent,
    role_exponents,
)

__all__ = ["Parametrization", "SP", "MuP", "get_parametrization"]

_INIT_MARK = "_lightning_local_init"


class Parametrization:
    """Base class: a named row of the abc tables (``"sp"`` or ``"mup"``)."""

    name: str = "sp"
    requires_base_shapes: bool = False
    output_weight_exponent: float = 0.0

    def exponents(self, rule: Any = "bp", optimizer: str = "sgd") -> dict[str, RoleExponents]:
        """``{role: RoleExponents(b, c)}`` of this parametrization for ``rule`` and optimizer."""
        return role_exponents(self.name, rule, optimizer, self.output_weight_exponent)

    def width_mult(self, model: Modules) -> float:
        """The width multiplier ``m = M / M_base`` read off ``p.infshape`` (1.0 without shapes
        under SP)."""
        if self.requires_base_shapes:
            require_base_shapes(model)
        found = model_width_mult(model)
        return 1.0 if found is None else found

    def initialize(self, model: Modules, rule: Any = "bp", optimizer: str = "sgd") -> Modules:
        """Rescale the SP init of ``model`` to this parametrization, once; return ``model``.

        The model is marked; calling it again with settings of the same init (e.g. another
        optimizer of the same row) is a no-op, with another init it raises (the weights were
        already rescaled). Call it
        on fresh weights, *before* loading a checkpoint: ``torch.save(model)`` keeps the mark,
        and an in-place ``load_state_dict`` restores weights that were saved already rescaled.

        Raises:
            MissingBaseShapesError: muP on a model without ``p.infshape``.
            UnclassifiableParameterError: a parameter fits no role of the table.
            LocalLearningError: already initialized with other settings.
        """
        target = self.exponents(rule, optimizer)
        reference = role_exponents("sp", rule, optimizer)
        shifts = {role: target[role].init - reference[role].init for role in target}
        settings = {
            "parametrization": repr(self),
            "rule": normalize_rule(rule),
            "optimizer": normalize_optimizer(optimizer),
            "init_shifts": shifts,
        }
        roots = _roots(model)
        marks = [getattr(root, _INIT_MARK, None) for root in roots]
        if any(mark is not None for mark in marks):
            if all(mark is not None and mark["init_shifts"] == shifts for mark in marks):
                return model
            done = [None if m is None else {k: v for k, v in m.items() if k != "init_shifts"}
                    for m in marks]
            raise LocalLearningError(
                f"the model was already initialized with {done}; asked again with "
                f"{repr(self)}, rule {settings['rule']!r}, optimizer {settings['optimizer']!r}, "
                "whose init differs. The init rescale is applied once. Fix: build the model "
                "afresh (new weights) to initialize it with other settings."
            )
        if self.requires_base_shapes and any(shifts.values()):
            width_mult = self.width_mult(model)
            with torch.no_grad():
                for item in classify_parameters(model):
                    if shifts[item.role] != 0.0:
                        item.parameter.mul_(width_mult ** (-shifts[item.role]))
        elif self.requires_base_shapes:
            classify_parameters(model)  # same errors whether or not a weight changes
        for root in roots:
            setattr(root, _INIT_MARK, dict(settings))
        return model

    def param_groups(
        self, model: Modules, lr: float, rule: Any = "bp", optimizer: str = "sgd",
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """One ``torch.optim`` parameter group per role present in ``model``.

        Each group holds ``params``, ``lr = lr * m^{-c_role}``, ``weight_decay``, ``role``,
        ``width_mult`` (m) and ``lr_scale`` (``m^{-c_role}``, for schedules and weight
        averaging that set learning rates). ``model`` may be a list of modules (e.g. forward
        and feedback networks); every parameter of the module tree is classified, each once.
        """
        exponents = self.exponents(rule, optimizer)
        width_mult = self.width_mult(model)
        classified = self._classify(model)
        if classified is None:
            params = [p for _, _, p in named_parameters(model)]
            return _nonempty([_group(params, "all", lr, weight_decay, 0.0, width_mult)])
        by_role: dict[str, list[nn.Parameter]] = {role: [] for role in ROLES}
        for item in classified:
            by_role[item.role].append(item.parameter)
        groups = [
            _group(params, role, lr, weight_decay, exponents[role].lr, width_mult)
            for role, params in by_role.items()
            if params
        ]
        return _nonempty(groups)

    def build_optimizer(
        self,
        model: Modules,
        lr: float,
        rule: Any = "bp",
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> torch.optim.Optimizer:
        """A plain ``torch.optim.SGD``/``Adam``/``AdamW`` over :meth:`param_groups`."""
        groups = self.param_groups(model, lr, rule, optimizer, weight_decay)
        kind = str(optimizer).lower()
        if normalize_optimizer(kind) == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=momentum)
        impl = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        return impl(groups, lr=lr, betas=betas, eps=eps)

    def output_weight(self, gamma: float, model: Modules, rule: Any = "pc") -> float:
        """PC's output weight ``gamma_L = gamma_L' m^{-g}`` (``gamma`` unchanged otherwise)."""
        width_mult = self.width_mult(model)  # muP: checks the base shapes even when g = 0
        exponent = output_weight_exponent(self.name, rule, self.output_weight_exponent)
        return float(gamma) * width_mult**exponent

    def hparams(self) -> dict[str, Any]:
        """Plain values for logging and configs."""
        return {"parametrization": self.name}

    def _classify(self, model: Modules) -> list | None:
        return classify_parameters(model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Parametrization) and repr(self) == repr(other)

    def __hash__(self) -> int:
        return hash(repr(self))


class SP(Parametrization):
    """Standard parametrization: b = (0, 1/2, 1/2), c = 0 for every rule and optimizer.

    Needs no base shapes. With shapes the groups are split by role (all with the same lr);
    without shapes, or with a layer the tables cannot classify, there is one group ``"all"``.
    """

    name = "sp"

    def _classify(self, model: Modules) -> list | None:
        try:
            return classify_parameters(model)
        except LocalLearningError:  # no (or partial) shapes, or a layer with no role
            return None

    def width_mult(self, model: Modules) -> float:
        try:
            return super().width_mult(model)
        except LocalLearningError:  # widths scaling by different ratios: irrelevant to SP
            return 1.0


class MuP(Parametrization):
    """Maximal update parametrization, per rule and optimizer (docs/math.md §3.3).

    Args:
        output_weight_exponent: PC's ``g``: ``gamma_L = gamma_L' m^{-g}`` and PC-SGD's lr
            exponents ``c = (-1-g, -g, 1-g)``. ``g = 0`` is SGD's muP (the default), ``g = -1``
            the Gauss-Newton-target muP. The paper finds ``g < -1`` unstable at large width
            (allowed, with a warning, to show exactly that). Ignored by BP and TP.
    """

    name = "mup"
    requires_base_shapes = True

    def __init__(self, output_weight_exponent: float = 0.0) -> None:
        g = float(output_weight_exponent)
        if not math.isfinite(g):
            raise LocalLearningError(
                f"output_weight_exponent must be finite, got {output_weight_exponent!r}. "
                "Fix: use 0.0 (SGD muP) or -1.0 (Gauss-Newton-target muP)."
            )
        if g < -1:
            warnings.warn(
                f"output_weight_exponent={g} < -1: the paper finds PC unstable at large width "
                "below g = -1.",
                stacklevel=2,
            )
        self.output_weight_exponent = g

    def hparams(self) -> dict[str, Any]:
        return {"parametrization": self.name, "output_weight_exponent": self.output_weight_exponent}

    def __repr__(self) -> str:
        return f"MuP(output_weight_exponent={self.output_weight_exponent!r})"


def get_parametrization(spec: str | Parametrization) -> Parametrization:
    """``SP()`` for ``"sp"``, ``MuP()`` (g = 0) for ``"mup"``, or ``spec`` itself."""
    if isinstance(spec, Parametrization):
        return spec
    key = str(spec).lower()
    if key in ("sp", "standard"):
        return SP()
    if key in ("mup", "mu_p", "maximal_update"):
        return MuP()
    raise LocalLearningError(
        f"unknown parametrization {spec!r}. Fix: use 'sp', 'mup', or an instance such as "
        "MuP(output_weight_exponent=-1.0)."
    )


def _roots(model: Modules) -> list[nn.Module]:
    return [unwrap(model)] if isinstance(model, nn.Module) else [unwrap(m) for m in model]


def _group(
    params: list[nn.Parameter], role: str, lr: float, weight_decay: float, c: float,
    width_mult: float,
) -> dict[str, Any]:
    scale = width_mult ** (-c)
    return {
        "params": params,
        "lr": lr * scale,
        "weight_decay": weight_decay / scale,
        "role": role,
        "width_mult": width_mult,
        "lr_scale": scale,
    }


def _nonempty(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not any(group["params"] for group in groups):
        raise LocalLearningError(
            "the model has no parameters to optimize. Fix: pass the network (or a list of "
            "networks) whose parameters the optimizer should train."
        )
    return groups
