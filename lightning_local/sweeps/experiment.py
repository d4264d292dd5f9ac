"""One experiment = a rule variant x a parametrization x a width x a learning rate x a seed.

This module names the rule variants a sweep or a coordinate check compares, loads a data set
into memory once per process, and builds one run: the network at width M from the model (the
built-in MLP or the user's, see :mod:`lightning_local.sweeps.components`), wired by
:func:`lightning_local.wiring.wire` like the Lightning modules:

    network at width M  ->  base shapes (muP)  ->  init rescale  ->  PC's gamma_L = gamma_L' m^{-g}
                        ->  plain torch.optim with per-role lr  eta_l = eta' m^{-c_l}

with ``m = M / M_base`` (docs/math.md §3). At the base width SP and muP coincide.

Rule variants (names used on the command line and in ``results.jsonl``):

=============  =========================================================================
``bp``         backpropagation
``pc-si-fpa``  PC, one sequential inference sweep (SI), kappa = 1, FPA (= backprop exactly)
``pc-si``      PC, one SI sweep, kappa = 1, without FPA
``pc-sim``     PC, 8 simultaneous inference steps of size 0.2, without FPA
``dtp``        difference target propagation, closed-form ridge feedback, beta = 0.5
``tp``         target propagation, closed-form ridge feedback, beta = 0.5
=============  =========================================================================

A variant takes overrides of its rule's settings after a colon, e.g.
``pc-sim:inference_steps=16,inference_lr=0.1`` or ``dtp:beta=0.25``; values are read as JSON
(``true``, ``0.1``, ``"tolerance"``, ``[0.5, 0.25]``) and fall back to plain strings. The
variant's name (shown in results and part of the run key) keeps only the overrides that can
change the trained weights: ``pc-si:fast_path=false`` is the run ``pc-si``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_local.errors import LocalLearningError
from lightning_local.models import MLP
from lightning_local.parametrization import Parametrization
from lightning_local.rules import get_rule_class
from lightning_local.rules.base import LocalRule
from lightning_local.sweeps.components import DataSpec, ModelSpec, plain_json
from lightning_local.wiring import NetworkFactory, make_parametrization, wire

__all__ = [
    "RULE_VARIANTS",
    "DATASETS",
    "RuleVariant",
    "Experiment",
    "parse_variant",
    "make_parametrization",
    "build_experiment",
    "network_factory",
    "load_dataset",
]

_SI = dict(inference="sequential", inference_steps=1, inference_lr=1.0)
RULE_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bp": ("bp", {}),
    "pc-si-fpa": ("pc", dict(_SI, fixed_prediction=True)),
    "pc-si": ("pc", dict(_SI, fixed_prediction=False)),
    "pc-sim": (
        "pc",
        dict(inference="simultaneous", inference_steps=8, inference_lr=0.2, fixed_prediction=False),
    ),
    "dtp": ("tp", dict(variant="dtp", beta=0.5, feedback_training="ridge")),
    "tp": ("tp", dict(variant="tp", beta=0.5, feedback_training="ridge")),
}
"""``name -> (rule family, rule arguments)``; the family is the parametrization tables' key."""

DATASETS = ("mnist1d", "fashion-mnist")


@dataclass(frozen=True)
class RuleVariant:
    """A named rule with its arguments: ``family`` is ``"bp"``, ``"pc"`` or ``"tp"``."""

    name: str
    family: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, loss: str = "mse") -> LocalRule:
        """A fresh rule object with these arguments (checked against the rule's settings)."""
        cls = get_rule_class(self.family)
        settings = cls.Settings.build(
            self.kwargs,
            owner=f"rule variant {self.name!r} (override only settings of the {cls.name} rule)",
        )
        return cls(loss, settings)

    def hparams(self, loss: str = "mse") -> dict[str, Any]:
        """The rule's settings that can change the weights (part of a run's resume key)."""
        return plain_json(self.build(loss).result_hparams())


def parse_variant(spec: str | RuleVariant) -> RuleVariant:
    """A :class:`RuleVariant` from ``"name"`` or ``"name:key=value,key=value"``."""
    if isinstance(spec, RuleVariant):
        return spec
    name, _, overrides = str(spec).strip().partition(":")
    if name not in RULE_VARIANTS:
        raise LocalLearningError(
            f"unknown rule variant {name!r}. Fix: use one of {sorted(RULE_VARIANTS)}, "
            "optionally with overrides such as 'pc-sim:inference_steps=16'."
        )
    family, defaults = RULE_VARIANTS[name]
    kwargs = dict(defaults)
    changed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_overrides(overrides))):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LocalLearningError(
                f"cannot read the override {item!r} of {spec!r}. Fix: write key=value, e.g. "
                "'pc-sim:inference_steps=16,inference_lr=0.1'."
            )
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text.strip()
        changed[key.strip()] = value
    kwargs.update(changed)
    variant = RuleVariant(_with_overrides(name, changed), family, kwargs)
    settings = variant.build().settings  # validates the overrides
    plain = settings.result_dict()
    reference = get_rule_class(family).Settings.build(defaults).result_dict()
    effective = {k: v for k, v in changed.items() if k in plain and plain[k] != reference[k]}
    # the name (and so the run key) keeps only overrides that can change the weights
    return RuleVariant(_with_overrides(name, effective), family, kwargs)


def _with_overrides(name: str, overrides: Mapping[str, Any]) -> str:
    if not overrides:
        return name
    return name + ":" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(overrides.items()))


def _split_overrides(text: str) -> list[str]:
    """``"a=1,b=[1, 2]"`` -> ``["a=1", "b=[1, 2]"]`` (commas inside brackets stay)."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


@dataclass
class Experiment:
    """A wired run: the network (TP: with its feedback maps), the rule and the optimizer."""

    network: nn.Module
    rule: LocalRule
    optimizer: torch.optim.Optimizer
    parametrization: Parametrization


def network_factory(
    model: ModelSpec | NetworkFactory | Mapping[str, Any] | str | None,
    *,
    in_features: int | None = None,
    num_classes: int | None = None,
    depth: int = 3,
    activation: str = "tanh",
    bias: bool = False,
) -> NetworkFactory:
    """``width -> network``: the user's model (see :mod:`lightning_local.sweeps.components`)
    or, for ``None``, the built-in :class:`~lightning_local.models.MLP` (``depth`` weight
    layers, no biases by default, as in the paper's probe)."""
    spec = ModelSpec.of(model)
    if spec is not None:
        return spec.factory()
    if in_features is None or num_classes is None:
        raise LocalLearningError("the built-in MLP needs in_features and num_classes.")

    def mlp(width: int) -> nn.Module:
        return MLP(in_features, width, num_classes, depth, activation, bias=bias)

    return mlp


def build_experiment(
    variant: str | RuleVariant,
    parametrization: str | Parametrization,
    width: int,
    lr: float,
    *,
    in_features: int | None = None,
    num_classes: int | None = None,
    base_width: int = 64,
    depth: int = 3,
    activation: str = "tanh",
    bias: bool = False,
    loss: str = "mse",
    output_weight_exponent: float = 0.0,
    momentum: float = 0.0,
    optimizer: str = "sgd",
    zero_readout: bool = False,
    model: ModelSpec | NetworkFactory | Mapping[str, Any] | str | None = None,
) -> Experiment:
    """Build and wire one run at ``width`` (seed the generator first for a reproducible init).

    The network comes from :func:`network_factory` (``model``; the built-in MLP by default)
    and is wired by :func:`lightning_local.wiring.wire`, the same seam the Lightning modules
    use: under muP its base shapes come from the network's width builder, else from the same
    factory at ``base_width`` and ``2 * base_width``. ``zero_readout`` sets the readout's
    weights to 0 after the init (``mup``'s ``readout_zero_init``).
    """
    variant = parse_variant(variant)
    factory = network_factory(model, in_features=in_features, num_classes=num_classes,
                              depth=depth, activation=activation, bias=bias)
    rule = variant.build(loss)
    network = factory(int(width))
    builder = callable(getattr(network, "with_width", None))
    run = wire(
        network, rule, parametrization, optimizer=optimizer,
        output_weight_exponent=output_weight_exponent, base_width=base_width,
        width_factory=None if builder else factory, zero_readout=zero_readout,
    )
    opt = run.build_optimizer(lr, momentum)
    return Experiment(run.network, run.rule, opt, run.parametrization)


_DATA_CACHE: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def load_dataset(
    name: str = "mnist1d",
    data_dir: str | os.PathLike[str] | None = None,
    num_samples: int = 5000,
    data_seed: int = 42,
    data: DataSpec | Any = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` in memory (cached per process).

    With ``data`` (a data module, tensors or their spec, see
    :mod:`lightning_local.sweeps.components`) that data as it is; otherwise the built-in sets,
    inputs standardized per coordinate with the training statistics: ``"mnist1d"`` is
    generated locally (``num_samples`` signals, 80 % train); ``"fashion-mnist"`` is read from
    ``data_dir`` and flattened to 784-vectors.

    Raises:
        DatasetNotFoundError: FashionMNIST's files are not in ``data_dir``.
    """
    spec = DataSpec.of(data)
    if spec is not None:
        data_key = ("data", json.dumps(spec.to_dict(), sort_keys=True), id(spec.target))
        if data_key not in _DATA_CACHE:
            _DATA_CACHE[data_key] = spec.load()
        return _DATA_CACHE[data_key]
    key = (name, None if data_dir is None else os.fspath(data_dir), num_samples, data_seed)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    from lightning_local.data import FashionMNISTDataModule, MNIST1DDataModule

    if name == "mnist1d":
        module = MNIST1DDataModule(
            data_dir, seed=data_seed, num_samples=num_samples, val_fraction=0.0
        )
    elif name in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        module = FashionMNISTDataModule(data_dir, seed=data_seed, val_fraction=0.0, flatten=True)
    else:
        raise LocalLearningError(f"unknown data set {name!r}. Fix: use one of {DATASETS}.")
    module.prepare_data()
    module.setup("fit")
    (x_train, y_train), (x_test, y_test) = module.train_set.tensors, module.test_set.tensors
    _DATA_CACHE[key] = (x_train, y_train, x_test, y_test)
    return _DATA_CACHE[key]
