"""The wiring seam: a network, a rule, a parametrization and an optimizer choice -> a run.

Every entry point (the Lightning modules, the sweep, the coordinate check, the quickstart)
wires a run here and nowhere else, in this order (docs/math.md, section 3):

    user network  ->  rule.prepare_network (TP: + feedback maps g_2 .. g_L)
                  ->  base shapes (muP; from p.infshape already there, a .bsh file, a width
                      factory, or a width builder at base_width)
                  ->  init rescale, once: W_r *= m^{-(b_r - b_r^SP)}
                  ->  rule.width_scaled (PC: gamma_L = gamma_L' m^{-g})
                  ->  optimizer: plain torch.optim with per-role groups lr_r = lr m^{-c_r}

with ``m = M / M_base`` read off ``p.infshape``. The run's non-rule settings are declared once
in :class:`TrainingSettings` (the Lightning modules' and the sweep's arguments derive from it).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_local.errors import LocalLearningError, MissingBaseShapesError
from lightning_local.losses import get_loss
from lightning_local.network import as_blocks
from lightning_local.parametrization import (
    MuP,
    Parametrization,
    get_parametrization,
    has_base_shapes,
    set_base_shapes,
)
from lightning_local.parametrization.base_shapes import check_not_rescaled_by_mup
from lightning_local.parametrization.roles import check_data_dims
from lightning_local.rules import get_rule_class
from lightning_local.rules.base import LocalRule, RuleSettings, setting

__all__ = [
    "OPTIMIZERS",
    "check_optimizer",
    "optimizer_table",
    "TrainingSettings",
    "WiredRun",
    "make_parametrization",
    "make_rule",
    "wire",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
"""Optimizers whose muP tables the library has (plain ``torch.optim`` classes)."""

_ADAM_LIKE = (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)


def optimizer_table(optimizer_class: type[torch.optim.Optimizer]) -> str:
    """The row of the parametrization tables for a ``torch.optim`` class: ``"sgd"`` for SGD
    and its subclasses, ``"adamw"`` for AdamW, ``"adam"`` for the other Adam-like classes
    (Adam, NAdam, RAdam, Adamax: per-entry normalized updates).

    Raises:
        LocalLearningError: for a class the tables do not cover (the run would silently not
            be muP).
    """
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, _ADAM_LIKE):
        return "adam"
    if isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.SGD):
        return "sgd"
    name = getattr(optimizer_class, "__name__", repr(optimizer_class))
    raise LocalLearningError(
        f"the width-scaling tables cover SGD-like and Adam-like optimizers, not {name}. Fix: "
        "use torch.optim.SGD, Adam, AdamW, NAdam, RAdam or Adamax (or a subclass)."
    )


NetworkFactory = Callable[[int], nn.Module]


def check_optimizer(name: str) -> str:
    """``name`` in lower case if the tables have its row (:data:`OPTIMIZERS`), else an error."""
    key = str(name).lower()
    if key not in OPTIMIZERS:
        raise LocalLearningError(f"unknown optimizer {name!r}. Fix: use one of {list(OPTIMIZERS)}.")
    return key
"""``width -> network``: the same architecture at any width (base and delta shapes)."""


@dataclass(frozen=True)
class TrainingSettings(RuleSettings):
    """The settings of a run that are not the rule's: parametrization, optimizer, loss."""

    parametrization: str = setting("sp", "'sp' (standard) or 'mup' (maximal update)")
    output_weight_exponent: float = setting(
        0.0, "muP's g for predictive coding: gamma_L = gamma_L' m^-g (0: SGD muP, -1: "
        "Gauss-Newton-target muP); ignored by SP and the other rules")
    base_width: int = setting(64, "M_base when base shapes are made from a width builder")
    base_shapes: str | None = setting(
        None, "a .bsh file of base shapes (for a network that is not a width builder)")
    lr: float = setting(0.1, "the width-independent learning rate eta'")
    optimizer: str = setting("sgd", "'sgd', 'adam' or 'adamw' (plain torch.optim, muP groups)")
    momentum: float = setting(0.0, "SGD momentum")
    weight_decay: float = setting(
        0.0, "weight decay, scaled per group like mup (lr * weight_decay width-free)")
    loss: str = setting("mse", "output loss: 'mse' (the paper's) or 'cross_entropy'")
    accumulate_grad_batches: int = setting(
        1, "optimizer step every k batches, each surrogate divided by k (Lightning's flag of "
        "this name is refused under manual optimization; this one replaces it)")
    gradient_clip_val: float | None = setting(
        None, "clip the gradients before each optimizer step (None: no clipping); replaces "
        "the Trainer flag of this name")
    gradient_clip_algorithm: Literal["norm", "value"] = setting(
        "norm", "'norm' (total 2-norm at most gradient_clip_val) or 'value' (each entry)")
    skip_nonfinite_batches: bool = setting(
        False, "skip a batch whose loss, energy or gradients are not finite (counted in "
        "train/skipped_batches) instead of stopping with an error")
    compile_inference: bool = setting(
        False, "compile the rule's inference step with torch.compile (PC's state steps, TP's "
        "targets; backprop has none)", affects_result=False)
    compile_backend: str = setting(
        "inductor", "torch.compile backend for compile_inference", affects_result=False)
    max_weight_magnitude: float | None = setting(
        1e6, "an update leaving a weight entry larger than this in magnitude stops training as "
        "divergence, before the step's checkpoint (None: only non-finite weights)")

    def __post_init__(self) -> None:
        make_parametrization(self.parametrization, self.output_weight_exponent)
        object.__setattr__(self, "parametrization", str(self.parametrization).lower())
        object.__setattr__(self, "optimizer", check_optimizer(self.optimizer))
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise LocalLearningError(f"lr must be a finite positive number, got {self.lr!r}. "
                                     "Fix: e.g. lr=0.1.")
        limit = self.max_weight_magnitude
        if limit is not None and (isinstance(limit, bool) or not (
                isinstance(limit, (int, float)) and limit > 0 and not math.isnan(limit))):
            raise LocalLearningError(
                f"max_weight_magnitude must be a positive number or None, got {limit!r}. "
                "Fix: e.g. 1e6, or None to check only for non-finite weights."
            )
        for name, example in (("momentum", "0.9"), ("weight_decay", "1e-4")):
            value = getattr(self, name)
            if isinstance(value, bool) or not (
                isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
            ):
                raise LocalLearningError(
                    f"{name} must be a finite number >= 0, got {value!r}. Fix: e.g. "
                    f"{name}={example}, or 0 for none."
                )
        base_width = self.base_width
        whole = isinstance(base_width, numbers.Integral) or (
            isinstance(base_width, float) and base_width.is_integer()
        )
        if isinstance(base_width, bool) or not whole or base_width < 1:
            raise LocalLearningError(
                f"base_width must be a whole number >= 1, got {base_width!r}. Fix: e.g. "
                "base_width=64 (M_base: the width at which muP equals SP)."
            )
        object.__setattr__(self, "loss", get_loss(self.loss).name)
        k = self.accumulate_grad_batches
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise LocalLearningError(
                f"accumulate_grad_batches must be a whole number >= 1, got {k!r}. Fix: e.g. "
                "accumulate_grad_batches=4, or 1 to step every batch."
            )
        clip = self.gradient_clip_val
        if clip is not None and not (
            isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0
        ):
            raise LocalLearningError(
                f"gradient_clip_val must be a finite positive number or None, got {clip!r}. "
                "Fix: e.g. gradient_clip_val=1.0, or None for no clipping."
            )
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise LocalLearningError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got "
                f"{self.gradient_clip_algorithm!r}. Fix: gradient_clip_algorithm='norm'."
            )
        for name in ("output_weight_exponent", "lr", "momentum", "weight_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "base_width", int(self.base_width))


def make_parametrization(
    spec: str | Parametrization, output_weight_exponent: float = 0.0
) -> Parametrization:
    """``SP()`` for ``"sp"``; ``MuP(output_weight_exponent)`` for ``"mup"``; or ``spec``."""
    if isinstance(spec, str) and spec.lower() in ("mup", "mu_p", "maximal_update"):
        return MuP(output_weight_exponent=output_weight_exponent)
    return get_parametrization(spec)


def make_rule(
    rule: str | type[LocalRule] | LocalRule,
    settings: RuleSettings | Mapping[str, Any] | None = None,
    loss: str = "mse",
) -> LocalRule:
    """A rule object from a name (``"bp"``, ``"pc"``, ``"tp"``) or class and its settings."""
    if isinstance(rule, LocalRule):
        if settings:
            raise LocalLearningError("pass either a rule object or a rule name with settings.")
        return rule
    cls = get_rule_class(rule)
    if isinstance(settings, RuleSettings):
        return cls(loss, settings)
    return cls(loss, cls.Settings.build(settings, owner=f"rule {cls.name!r}"))


@dataclass
class WiredRun:
    """A wired run, ready to train.

    Attributes:
        network: the module the rule trains (the user's network; for TP a
            :class:`~lightning_local.rules.target_propagation.TPNetwork` around it).
        rule: the rule with its width-scaled settings (PC: ``gamma_L``).
        parametrization: SP or muP.
        optimizer_name: the optimizer row of the tables the init was rescaled for.
        init_width_mult: under muP, the ``m`` the init was rescaled for; the optimizer
            builders refuse base shapes that changed since (``None``: not checked).
    """

    network: nn.Module
    rule: LocalRule
    parametrization: Parametrization
    optimizer_name: str = "sgd"
    init_width_mult: float | None = None

    @property
    def width_mult(self) -> float:
        """``m = M / M_base`` (1 under SP without base shapes)."""
        return self.parametrization.width_mult(self.network)

    def _check_width_mult(self) -> None:
        """Refuse base shapes re-attached with another ``m`` after the init was rescaled."""
        if self.init_width_mult is None:
            return
        now = self.width_mult
        if not math.isclose(now, self.init_width_mult, rel_tol=1e-9):
            raise LocalLearningError(
                f"the base shapes changed after wiring: the init was rescaled for the width "
                f"multiplier m = {self.init_width_mult:g}, but the network's p.infshape now give "
                f"m = {now:g} (set_base_shapes or mup.set_base_shapes called again with other "
                "base shapes), so the learning rates would follow the new m and the init the "
                "old one. Fix: attach base shapes once, before wiring (or let the wiring attach "
                "them), or build the network afresh and wire it again."
            )

    def param_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Per-role ``torch.optim`` groups: ``lr_r = lr m^{-c_r}``, each tagged with its role."""
        self._check_width_mult()
        return self.parametrization.param_groups(
            self.network, lr, self.rule, self.optimizer_name, weight_decay
        )

    def make_optimizer(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        lr: float,
        weight_decay: float = 0.0,
        **options: Any,
    ) -> torch.optim.Optimizer:
        """``optimizer_class`` (any SGD-like or Adam-like ``torch.optim`` class) over the
        per-role groups of its table row, ``lr_r = lr m^{-c_r}``; ``options`` (betas,
        momentum, ...) go to the class.

        Raises:
            LocalLearningError: a class the tables do not cover, or one whose table wants
                another init than the one the run was rescaled for.
        """
        table = optimizer_table(optimizer_class)
        self._check_width_mult()
        wired = self.parametrization.exponents(self.rule, self.optimizer_name)
        wanted = self.parametrization.exponents(self.rule, table)
        if any(wired[role].init != wanted[role].init for role in wired):
            raise LocalLearningError(
                f"the init was rescaled for optimizer={self.optimizer_name!r}, but "
                f"{optimizer_class.__name__}'s muP wants another init. Fix: set "
                f"optimizer={table!r} in the settings (module or wire)."
            )
        groups = self.parametrization.param_groups(
            self.network, lr, self.rule, table, weight_decay
        )
        return optimizer_class(groups, lr=lr, **options)

    def adapt_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` itself when its groups are the parametrization's (they carry a
        ``role``); otherwise the same class and options rebuilt over the per-role groups,
        with its ``lr`` as ``eta'`` and its ``weight_decay``.

        Raises:
            LocalLearningError: several groups of the user's own (their intent is unknown),
                parameters that are not the run's, or an uncovered class.
        """
        groups = optimizer.param_groups
        if all("role" in group for group in groups):
            return optimizer
        if optimizer.state:
            raise LocalLearningError("cannot regroup an optimizer that has already stepped.")
        held = [p for group in groups for p in group["params"]]
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        if len(groups) > 1 or {id(p) for p in held} != {id(p) for p in trainable}:
            raise LocalLearningError(
                f"cannot give muP's per-role learning rates to a {type(optimizer).__name__} "
                f"with {len(groups)} parameter group(s) of your own over "
                f"{len(held)} tensors (the rule trains {len(trainable)}). Fix: build it with "
                "self.local_run.make_optimizer(torch.optim.Adam, lr=..., ...) (module) or "
                "run.make_optimizer(...) (wire)."
            )
        options = {k: v for k, v in optimizer.defaults.items() if k not in ("lr", "weight_decay")}
        return self.make_optimizer(
            type(optimizer), float(groups[0]["lr"]),
            float(groups[0].get("weight_decay", 0.0)), **options,
        )

    def build_optimizer(
        self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> torch.optim.Optimizer:
        """A plain ``torch.optim.SGD``/``Adam``/``AdamW`` over :meth:`param_groups`."""
        self._check_width_mult()
        return self.parametrization.build_optimizer(
            self.network, lr, rule=self.rule, optimizer=self.optimizer_name, momentum=momentum,
            weight_decay=weight_decay,
        )


def wire(
    network: nn.Module,
    rule: LocalRule,
    parametrization: str | Parametrization = "sp",
    *,
    optimizer: str = "sgd",
    output_weight_exponent: float = 0.0,
    base_width: int = 64,
    base_shapes: str | None = None,
    width_factory: NetworkFactory | None = None,
    input_shape: Sequence[int] | None = None,
    zero_readout: bool = False,
) -> WiredRun:
    """Wire ``network`` for ``rule`` under ``parametrization``; see the module docstring.

    Args:
        network: the user's network (blocks ``f_1 .. f_L``), fresh weights.
        rule: the rule with its settings as the user gave them (PC: ``gamma_L'``).
        parametrization: ``"sp"``, ``"mup"`` or a :class:`Parametrization`.
        optimizer: the optimizer row of the tables (``"sgd"``, ``"adam"``, ``"adamw"``).
        output_weight_exponent: muP's ``g`` when ``parametrization`` is a name.
        base_width: ``M_base`` for base shapes from ``width_factory`` or a width builder.
        base_shapes: a ``.bsh`` file of base shapes (takes precedence).
        width_factory: ``width -> network`` for networks that are not width builders: base
            and delta shapes are made from ``width_factory(base_width)`` and
            ``width_factory(2 * base_width)`` on the meta device.
        input_shape: per-sample input shape (TP feedback of convolutional networks).
        zero_readout: set the readout's weights to 0 after the init (``mup``'s
            ``readout_zero_init``).

    Raises:
        MissingBaseShapesError: muP and no way to get base shapes.
        UnsupportedNetworkError: a network the rules cannot read (see
            :func:`~lightning_local.network.as_blocks`).
        UnclassifiableParameterError: muP with base shapes that make the input layer's fan-in
            or the readout's fan-out a width (a base network with another input size or
            number of classes), or that fit no role.
        LocalLearningError: a network whose layers ``mup.set_base_shapes`` already rescaled
            (its default ``rescale_params=True``).
    """
    param = make_parametrization(parametrization, output_weight_exponent)
    optimizer = check_optimizer(optimizer)
    as_blocks(network)  # fail early on a network the rules cannot read
    check_not_rescaled_by_mup(network)
    prepared = rule.prepare_network(network, input_shape)
    if param.requires_base_shapes and not has_base_shapes(prepared):
        _attach_base_shapes(prepared, rule, base_width, base_shapes, width_factory, input_shape)
    if param.requires_base_shapes:  # also shapes the user attached (e.g. with mup itself)
        check_data_dims(prepared, source="the base shapes attached to the network (p.infshape)")
    param.initialize(prepared, rule, optimizer)
    if zero_readout:
        _zero_readout(prepared)
    init_width_mult = param.width_mult(prepared) if param.requires_base_shapes else None
    return WiredRun(
        prepared, rule.width_scaled(param, prepared), param, optimizer, init_width_mult
    )


def _attach_base_shapes(
    network: nn.Module,
    rule: LocalRule,
    base_width: int,
    base_shapes: str | None,
    width_factory: NetworkFactory | None,
    input_shape: Sequence[int] | None,
) -> None:
    if base_shapes is not None:
        set_base_shapes(network, base_shapes)
        return
    if width_factory is not None:
        with torch.device("meta"):
            base, delta = (
                rule.prepare_network(width_factory(w), input_shape)
                for w in (base_width, 2 * base_width)
            )
        set_base_shapes(network, base, delta)
        return
    if callable(getattr(network, "with_width", None)):
        set_base_shapes(network, base_width)
        return
    raise MissingBaseShapesError(
        f"muP needs base shapes, but the {type(network).__name__} network has no p.infshape, "
        "no base_shapes file was given and it is not a width builder. Fix: build it with "
        "lightning_local.models (MLP/CNN), pass base_shapes='net.bsh' (written by "
        "set_base_shapes(net, base, delta, savefile='net.bsh')), give a width factory "
        "(width -> network; the sweep's model), or call lightning_local.set_base_shapes(net, "
        "base=<net at base width>, delta=<net at another width>) before handing it over."
    )


@torch.no_grad()
def _zero_readout(network: nn.Module) -> None:
    linears = [m for m in as_blocks(network)[-1].modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise LocalLearningError(
            "zero_readout needs a readout block with an nn.Linear. Fix: zero_readout=False."
        )
    linears[-1].weight.zero_()
