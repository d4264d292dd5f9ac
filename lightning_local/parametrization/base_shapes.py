"""Attaching ``mup`` base shapes (``p.infshape``) to a network, never rescaling it.

``p.infshape`` records, per dim, whether it scales with width and its size at the base width
``M_base``; the width multiplier is ``M / M_base``. Shapes come from a base network plus a
*delta* network (the same architecture at another width: the dims that differ are the width
dims), from a saved ``.bsh`` file (``mup``'s yaml format), or from a width-parameterized builder
that makes base and delta on the meta device (no memory, no compute).

This module only attaches shapes: ``mup``'s own bias/readout rescale is never run, and the
init rescale of a parametrization lives in :meth:`Parametrization.initialize`, which runs once.

Traps (measured with mup 1.0.0):

- ``p.infshape`` is an attribute of the parameter object. It survives pickling
  (``torch.save(model)``), DDP and in-place ``load_state_dict``; it is *lost* by
  ``copy.deepcopy`` and ``load_state_dict(assign=True)`` (and FSDP2). Re-attach with
  :func:`reattach_base_shapes`, which, like everything here, never rescales weights.
- Call it on the unwrapped network, before the optimizer, DDP or ``torch.compile``.
- ``mup.set_base_shapes`` itself (``rescale_params=True``, its default) multiplies every
  Linear/Conv bias by ``sqrt(fan-in width multiplier)`` (and a ``MuReadout``'s weight): an init
  this library does not use, on top of which it would apply its own rescale.
  :func:`check_not_rescaled_by_mup` refuses such a network (the wiring calls it); with
  ``rescale_params=False`` mup only attaches shapes, like :func:`set_base_shapes`.
- Attaching again is harmless (nothing is rescaled) while the shapes are the same or the init
  has not been rescaled yet. Other shapes after the init rescale would leave the init scaled
  for the old width multiplier and the learning rates for the new one: refused.
- Base shapes from a network with another input size or number of classes mark the input
  layer's fan-in (or the readout's fan-out) as a width: refused, see
  :func:`~lightning_local.parametrization.roles.check_data_dims`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import yaml
from mup import set_base_shapes as _mup_set_base_shapes
from mup.infshape import InfShape
from mup.shape import get_shapes, make_base_shapes, save_base_shapes, zip_infshapes
from torch import nn

from lightning_local.errors import (
    CheckpointError,
    LocalLearningError,
    MissingBaseShapesError,
    ShapeMismatchError,
)
from lightning_local.parametrization.parametrization import _INIT_MARK
from lightning_local.parametrization.roles import check_data_dims, unwrap

__all__ = [
    "set_base_shapes",
    "base_shapes_from_builder",
    "load_base_shapes",
    "has_base_shapes",
    "reattach_base_shapes",
    "check_not_rescaled_by_mup",
]

BaseShapes = Mapping[str, InfShape]
Builder = Callable[[int], nn.Module]
PathLike = str | os.PathLike


def set_base_shapes(
    model: nn.Module,
    base: nn.Module | BaseShapes | PathLike | int | None = None,
    delta: nn.Module | BaseShapes | int | None = None,
    *,
    savefile: PathLike | None = None,
) -> nn.Module:
    """Attach ``p.infshape`` to every parameter of ``model`` (no rescaling); return ``model``.

    Args:
        model: the network at its training width (a DDP wrapper is unwrapped).
        base: the network at the base width, a dict of base shapes
            (:func:`base_shapes_from_builder`), a ``.bsh`` file path, or an ``int`` base width
            when ``model`` is a :class:`~lightning_local.models.WidthBuilder`. ``None``: the
            model itself is the base (then ``delta`` is required).
        delta: the same network at another width (or an ``int`` width for a WidthBuilder);
            not needed with a file or a dict of base shapes.
        savefile: where to write the base shapes as a ``.bsh`` file (``mup``'s yaml format).

    Raises:
        MissingBaseShapesError: when no parameter ends up with a width dim.
        CheckpointError: for a missing, corrupt or non-fitting ``.bsh`` file.
        ShapeMismatchError: when base/delta have other parameter names or ranks than the model.
        UnclassifiableParameterError: when the shapes make the input layer's fan-in or the
            readout's fan-out a width dim (a base network with another input size or number
            of classes).
        LocalLearningError: when the model's init was already rescaled for other base shapes.
    """
    net = unwrap(model)
    source = "base shapes"
    if isinstance(base, int) and not isinstance(base, bool):
        base = base_shapes_from_builder(net, base, delta if isinstance(delta, int) else None)
        delta, source = None, "the builder's base shapes"
    elif isinstance(base, (str, os.PathLike)):
        source = f"base-shape file {os.fspath(base)!r}"
        base = load_base_shapes(base)
    base_shapes: BaseShapes | dict = get_shapes(net) if base is None else _shapes(base)
    if delta is not None:
        delta_shapes = _shapes(delta)
        _check_fits(base_shapes, delta_shapes, "the base network", "the delta network")
        base_shapes = make_base_shapes(base_shapes, delta_shapes)
    _check_fits(base_shapes, get_shapes(net), source, "the model", file=source.startswith("base-"))
    infshapes = zip_infshapes(base_shapes, net)
    if not any(dim.isinf() for shape in infshapes.values() for dim in shape):
        raise MissingBaseShapesError(
            "no parameter has a width dimension: the base shapes equal the model's shapes. "
            "Fix: pass delta= (the same network at another width), use "
            "base_shapes_from_builder(builder, base_width), or a .bsh file of base shapes."
        )
    check_data_dims(net, infshapes, source)
    _check_not_rescaled_for_other_shapes(net, infshapes)
    _mup_set_base_shapes(net, base_shapes, rescale_params=False, do_assert=False)
    if savefile is not None:
        _save(net, savefile)
    return model


def base_shapes_from_builder(
    builder: Builder | nn.Module,
    base_width: int,
    delta_width: int | None = None,
    *,
    savefile: PathLike | None = None,
) -> dict[str, InfShape]:
    """Base shapes made by building the network at ``base_width`` and ``delta_width``.

    ``builder`` is a :class:`~lightning_local.models.WidthBuilder` (anything with
    ``with_width(width, device=...)``) or a callable ``width -> nn.Module``. Both networks are
    built on the meta device. ``delta_width`` defaults to ``2 * base_width``.
    """
    delta_width = 2 * base_width if delta_width is None else delta_width
    if base_width < 1 or delta_width == base_width:
        raise LocalLearningError(
            f"base_width={base_width}, delta_width={delta_width}: the base width must be "
            "positive and the delta width different from it (the dims that differ are the "
            "width dims). Fix: e.g. base_shapes_from_builder(builder, 64) (delta 128)."
        )
    base, delta = _build(builder, base_width), _build(builder, delta_width)
    shapes = make_base_shapes(base, delta)
    if savefile is not None:
        _save(shapes, savefile)
    return shapes


def load_base_shapes(path: PathLike) -> dict[str, InfShape]:
    """Read a ``.bsh`` file (``mup``'s yaml: name -> list of base dims, ``null`` = finite)."""
    path = Path(path)
    fix = (
        "Fix: write it again with set_base_shapes(model, base, delta, savefile=...) or "
        "base_shapes_from_builder(builder, base_width, savefile=...)."
    )
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise CheckpointError(f"cannot read base-shape file '{path}': {error}. {fix}") from error
    except yaml.YAMLError as error:
        raise CheckpointError(
            f"base-shape file '{path}' is not valid yaml: {error}. {fix}"
        ) from error
    valid = isinstance(data, dict) and data and all(
        isinstance(name, str) and isinstance(dims, list)
        and all(d is None or (isinstance(d, int) and d > 0) for d in dims)
        for name, dims in data.items()
    )
    if not valid:
        raise CheckpointError(
            f"base-shape file '{path}' does not hold a mapping from parameter names to lists of "
            f"base dims (positive ints or null); it may be truncated or not a .bsh file. {fix}"
        )
    return {name: InfShape.from_base_shape(dims) for name, dims in data.items()}


def has_base_shapes(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` carries ``p.infshape`` (and there is one)."""
    params = list(unwrap(model).parameters())
    return bool(params) and all(hasattr(p, "infshape") for p in params)


def reattach_base_shapes(
    model: nn.Module, source: nn.Module | BaseShapes | PathLike
) -> nn.Module:
    """Re-attach base shapes lost by ``copy.deepcopy`` or ``load_state_dict(assign=True)``.

    ``source`` is a network that still carries ``p.infshape`` (e.g. the original before the
    copy), a dict of base shapes or a ``.bsh`` file. Weights are never rescaled, so this is safe
    to call on trained or loaded weights.
    """
    if isinstance(source, nn.Module):
        net = unwrap(source)
        if not has_base_shapes(net):
            raise MissingBaseShapesError(
                "the source network carries no base shapes to copy. Fix: pass the network "
                "that set_base_shapes was called on, a dict of base shapes or a .bsh file."
            )
        source = {name: copy.copy(p.infshape) for name, p in net.named_parameters()}
    return set_base_shapes(model, source)


def check_not_rescaled_by_mup(model: nn.Module) -> None:
    """Refuse a network whose layers ``mup``'s own rescale already changed.

    ``mup.set_base_shapes(model, base, delta=...)`` with its default ``rescale_params=True``
    multiplies each Linear/Conv bias by ``sqrt(fan-in width multiplier)`` and a
    ``MuReadout``'s weight and bias by ``sqrt(width multiplier)``, and marks the layer
    (``_has_rescaled_params``). This library rescales the init itself, once, from its tables,
    so on such a network the init would be neither its SP nor its muP. A plain Linear/Conv
    whose bias is absent or zero (the builders' init) was not changed and is accepted.

    Raises:
        LocalLearningError: naming the first rescaled layer and the fix.
    """
    net = unwrap(model)
    rescaled = [name or type(net).__name__ for name, module in net.named_modules()
                if getattr(module, "_has_rescaled_params", False) is True and _changed(module)]
    if rescaled:
        raise LocalLearningError(
            f"layers {rescaled[:3]}{' ...' if len(rescaled) > 3 else ''} were rescaled by "
            "mup.set_base_shapes (its default rescale_params=True multiplies biases by "
            "sqrt(fan-in width multiplier)); this library rescales the init itself, once, so "
            "the init would be wrong. Fix: build the network afresh and attach base shapes "
            "with lightning_local.set_base_shapes(model, base, delta) (it never rescales), or "
            "call mup.set_base_shapes(model, base, delta=delta, rescale_params=False)."
        )


def _changed(module: nn.Module) -> bool:
    """Whether mup's rescale can have changed ``module``: a ``MuReadout`` (weight rescaled), or
    a layer with a non-zero bias and a width-scaled fan-in (mup multiplies the bias by
    ``sqrt`` of the fan-in's width multiplier, 1 for a finite fan-in)."""
    if type(module).__name__ in ("MuReadout", "MuSharedReadout"):
        return True
    bias, weight = getattr(module, "bias", None), getattr(module, "weight", None)
    if not isinstance(bias, torch.Tensor) or not bool(bias.detach().ne(0).any()):
        return False
    infshape = getattr(weight, "infshape", None)
    return infshape is None or len(infshape) < 2 or float(infshape[1].width_mult()) != 1.0


def _check_not_rescaled_for_other_shapes(net: nn.Module, infshapes: Mapping) -> None:
    """Refuse new base shapes on a network whose init was rescaled under other ones.

    A parameter without ``p.infshape`` (lost by ``copy.deepcopy``) may get any: that is the
    re-attach after a copy, whose old shapes cannot be known here.
    """
    marks = [getattr(m, _INIT_MARK) for m in net.modules()
             if isinstance(getattr(m, _INIT_MARK, None), dict)]
    if not any(shift != 0.0 for mark in marks for shift in mark.get("init_shifts", {}).values()):
        return  # nothing was rescaled: the shapes may change freely
    for name, p in net.named_parameters():
        old, new = getattr(p, "infshape", None), infshapes[name]
        if old is None:
            continue
        if [(d.isinf(), d.base_dim) for d in old] != [(d.isinf(), d.base_dim) for d in new]:
            raise LocalLearningError(
                f"the init of this network was already rescaled for its base shapes, and "
                f"{name!r} would now get other ones (base {new.base_shape()}, was "
                f"{old.base_shape()}): the init would stay scaled for the old width multiplier "
                "while the learning rates follow the new one. Attaching the same base shapes "
                "again is harmless. Fix: build the network afresh (new weights) and attach the "
                "base shapes once, before wiring it."
            )


def _save(shapes: nn.Module | BaseShapes, savefile: PathLike) -> None:
    try:
        save_base_shapes(shapes if isinstance(shapes, nn.Module) else dict(shapes),
                         os.fspath(savefile))
    except OSError as error:
        raise CheckpointError(
            f"cannot write the base-shape file {os.fspath(savefile)!r}: {error}. Fix: give a "
            "writable path whose folder exists."
        ) from error


def _shapes(x: nn.Module | BaseShapes) -> dict:
    if isinstance(x, nn.Module):
        return get_shapes(unwrap(x))
    if isinstance(x, Mapping):
        return dict(x)
    raise LocalLearningError(
        f"cannot read base shapes from a {type(x).__name__}. Fix: pass an nn.Module, a dict of "
        "base shapes, a .bsh file path, or an int base width for a WidthBuilder."
    )


def _check_fits(
    expected: Mapping, actual: Mapping, source: str, target: str, file: bool = False
) -> None:
    error_type = CheckpointError if file else ShapeMismatchError
    missing, extra = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
    if missing or extra:
        raise error_type(
            f"{source} does not fit {target}: names only in {target}: {missing[:5]}, names only "
            f"in {source}: {extra[:5]}. Fix: make base shapes from the same architecture (same "
            "module names) as the model; call it on the unwrapped network, not a wrapper."
        )
    for name, shape in expected.items():
        if len(shape) != len(actual[name]):
            raise error_type(
                f"{source} gives {name!r} {len(shape)} dims but {target} has "
                f"{len(actual[name])}. Fix: make base shapes from the same architecture."
            )


def _build(builder: Builder | nn.Module, width: int) -> nn.Module:
    if hasattr(builder, "with_width"):
        return builder.with_width(width, device="meta")
    if not callable(builder) or isinstance(builder, nn.Module):
        raise LocalLearningError(
            f"a {type(builder).__name__} cannot build networks by width. Fix: pass a "
            "lightning_local.models.WidthBuilder (e.g. MLP(...)) or a function width -> nn.Module."
        )
    with torch.device("meta"):
        return builder(width)
