"""Parameter roles read off ``mup`` base shapes (``p.infshape``).

For ``nn.Linear`` and ``nn.ConvNd`` weights, dim 0 is the fan-out and dim 1 the fan-in; a dim
is "infinite" when it scales with width (``p.infshape[i].isinf()``). Roles:

- ``input``: finite fan-in, infinite fan-out (``d0 -> M``);
- ``hidden``: both infinite (``M -> M``);
- ``output``: infinite fan-in, finite fan-out (``M -> C``, the readout);
- ``vector``: a 1-d parameter with an infinite dim (hidden biases, norm weights);
- ``scalar``: a parameter of at most one dim with no infinite dim (e.g. the readout bias);
- ``fixed``: a parameter of two or more dims with no infinite dim (a weight of fixed size).

Everything else raises :class:`UnclassifiableParameterError`: a weight whose width dims are not
dims 0/1, more than two width dims, a transposed convolution, or a multi-dim parameter with a
width dim in a module other than ``nn.Linear``/``nn.ConvNd`` (e.g. ``nn.Embedding``, whose
weight is ``(num_embeddings, embedding_dim)`` rather than ``(fan_out, fan_in)``).

The input layer's fan-in is the data's input size and the readout's fan-out the number of
outputs: neither is a width. Base shapes made from a network with another input size or number
of classes than the model mark them as width dims (``mup`` takes every dim that differs for a
width), which would silently class the input layer (or readout) as hidden: wrong init and
learning rate. :func:`check_data_dims` refuses that.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lightning_local.errors import (
    MissingBaseShapesError,
    UnclassifiableParameterError,
    UnsupportedNetworkError,
)

__all__ = [
    "ClassifiedParameter",
    "Modules",
    "check_data_dims",
    "classify_parameters",
    "named_parameters",
    "model_width_mult",
    "parameters_without_base_shapes",
    "require_base_shapes",
    "unwrap",
]

Modules = nn.Module | Sequence[nn.Module]

_SUPPORTED = (
    "Supported: weights of nn.Linear / nn.Conv1d/2d/3d whose width dims are dim 0 (fan-out) "
    "and/or dim 1 (fan-in); 1-d parameters (biases, norm weights); parameters whose size does "
    "not change with width."
)


@dataclass(frozen=True)
class ClassifiedParameter:
    """A parameter with its qualified name, owning module type and role."""

    name: str
    parameter: nn.Parameter
    module_type: str
    role: str


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside ``DistributedDataParallel``/``DataParallel``/``torch.compile``
    wrappers (else itself).

    Base shapes are recorded and applied on the unwrapped network: ``mup``'s prefix helper
    strips characters, not the ``module.`` prefix.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while True:
        if isinstance(module, wrappers):
            module = module.module
        elif type(module).__name__ == "OptimizedModule" and isinstance(
            getattr(module, "_orig_mod", None), nn.Module
        ):
            module = module._orig_mod  # torch.compile(network)
        else:
            return module


def named_parameters(modules: Modules) -> Iterator[tuple[str, nn.Module, nn.Parameter]]:
    """``(qualified name, owning module, parameter)``, each parameter once.

    ``modules`` is one module or a list of modules (e.g. a network plus TP feedback networks);
    in a list, names are prefixed with the module's index.
    """
    roots = [("", unwrap(modules))] if isinstance(modules, nn.Module) else [
        (f"{index}.", unwrap(module)) for index, module in enumerate(modules)
    ]
    seen: set[int] = set()
    for prefix, root in roots:
        for module_name, module in root.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                qualified = f"{module_name}.{param_name}" if module_name else param_name
                yield prefix + qualified, module, param


def parameters_without_base_shapes(modules: Modules) -> list[str]:
    """Names of the parameters that carry no ``infshape``."""
    return [name for name, _, p in named_parameters(modules) if not hasattr(p, "infshape")]


def model_width_mult(modules: Modules) -> float | None:
    """The width multiplier ``M / M_base`` shared by every width dim; ``None`` without shapes.

    Raises:
        UnclassifiableParameterError: when width dims scale by different ratios (the tables
            assume one hidden width M).
    """
    found: tuple[str, float] | None = None
    any_shape = False
    for name, _, p in named_parameters(modules):
        infshape = getattr(p, "infshape", None)
        if infshape is None:
            continue
        any_shape = True
        for index, dim in enumerate(infshape):
            if not dim.isinf():
                continue
            ratio = float(dim.width_mult())
            where = f"dim {index} of {name!r} ({dim.base_dim} in the base -> {dim.dim})"
            if found is None:
                found = (where, ratio)
            elif not math.isclose(ratio, found[1], rel_tol=1e-9):
                raise UnclassifiableParameterError(
                    f"{where} is a width dim scaled by {ratio:g}, but {found[0]} is one scaled "
                    f"by {found[1]:g}. The muP tables assume all widths scale together. A dim "
                    "that is not a width (input size, number of classes, image size) differs "
                    "between the base network and the model, or two widths change by different "
                    "factors. Fix: build the base and delta networks with the same input size, "
                    "number of classes and image size as the model, only the width changed, "
                    "and every width changed by the same factor."
                )
    if not any_shape:
        return None
    return 1.0 if found is None else found[1]


def require_base_shapes(modules: Modules) -> None:
    """Raise :class:`MissingBaseShapesError` unless every parameter carries ``p.infshape``."""
    missing = parameters_without_base_shapes(modules)
    if missing:
        raise MissingBaseShapesError(
            f"parameters {missing[:5]}{' ...' if len(missing) > 5 else ''} have no base shapes "
            "(p.infshape), which muP needs. Fix: call lightning_local.set_base_shapes(model, "
            "base, delta) on the whole module tree first (or set_base_shapes(model, base_width) "
            "for a WidthBuilder such as MLP/CNN, or base= a .bsh file); after copy.deepcopy or "
            "load_state_dict(assign=True) use lightning_local.reattach_base_shapes."
        )


def classify_parameters(modules: Modules) -> list[ClassifiedParameter]:
    """Classify every parameter of ``modules`` by its base shape.

    Raises:
        MissingBaseShapesError: when a parameter carries no ``infshape``.
        UnclassifiableParameterError: when a parameter fits no role.
    """
    require_base_shapes(modules)
    return [
        ClassifiedParameter(name, p, type(module).__name__, _role(name, module, p))
        for name, module, p in named_parameters(modules)
    ]


def _role(name: str, module: nn.Module, p: nn.Parameter) -> str:
    infinite = [dim.isinf() for dim in p.infshape]
    count = sum(infinite)
    if count == 0:
        return "scalar" if p.dim() <= 1 else "fixed"
    if p.dim() == 1:
        return "vector"
    is_weight = isinstance(module, (nn.Linear, _ConvNd)) and p is module.weight
    if count > 2 or not is_weight or isinstance(module, _ConvTransposeNd) or any(infinite[2:]):
        dims = [i for i, inf in enumerate(infinite) if inf]
        raise UnclassifiableParameterError(
            f"parameter {name!r} of {type(module).__name__} (shape {tuple(p.shape)}, width dims "
            f"{dims}) fits no role of the width-scaling tables. {_SUPPORTED} Fix: express the "
            "layer as nn.Linear/nn.Conv2d (e.g. an embedding as one-hot inputs to nn.Linear), "
            "or keep its size fixed across base, delta and model."
        )
    fan_out, fan_in = infinite[0], infinite[1]
    return "hidden" if fan_in and fan_out else ("output" if fan_in else "input")


def _layers(module: nn.Module) -> list[nn.Module]:
    """The modules of ``module`` that hold parameters of their own, in registration order
    (the forward order of ``nn.Sequential`` blocks)."""
    return [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]


def _is_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _ConvNd)) and not isinstance(module, _ConvTransposeNd)


def check_data_dims(
    model: nn.Module,
    infshapes: Mapping[str, Any] | None = None,
    source: str = "the base shapes",
) -> None:
    """Refuse base shapes that make the input layer's fan-in or the readout's fan-out a width.

    The input layer is the first ``nn.Linear``/``nn.ConvNd`` of block 0 (unless a module with a
    width dim comes before it, e.g. an embedding into the width), the readout the last one of
    the last block (unless a module with a width dim comes after it). ``infshapes`` maps
    parameter names of ``model`` to their ``InfShape`` (the shapes about to be attached);
    without it the attached ``p.infshape`` are read. A model the network view cannot read (not
    an ``nn.Sequential`` or a model with ``blocks``) is not checked.

    Raises:
        UnclassifiableParameterError: naming the layer, its shape, its base shape and the fix.
    """
    from lightning_local.network import as_blocks  # the view lives above this package

    net = unwrap(model)
    if not isinstance(net, nn.Sequential) and not isinstance(
        getattr(net, "blocks", None), (nn.Sequential, nn.ModuleList)
    ):
        return  # not a layered network (e.g. a list of feedback maps): no input / readout
    try:
        blocks = as_blocks(net)
    except UnsupportedNetworkError:
        return
    names = {id(p): name for name, p in net.named_parameters()}
    module_names = {id(m): name for name, m in net.named_modules()}

    def shape_of(p: nn.Parameter) -> Any:
        if infshapes is None:
            return getattr(p, "infshape", None)
        return infshapes.get(names.get(id(p), ""))

    def widths(module: nn.Module) -> bool:
        return any(
            (shape := shape_of(p)) is not None and any(d.isinf() for d in shape)
            for p in module.parameters(recurse=False)
        )

    def layer(candidates: list[nn.Module]) -> nn.Module | None:
        for module in candidates:
            if _is_layer(module):
                return module
            if widths(module):  # e.g. an embedding into the width: the layer after is hidden
                return None
        return None

    first = layer(_layers(blocks[0]))
    last = layer(_layers(blocks[-1])[::-1])
    for module, dim, what, setting in (
        (first, 1, "input layer", "input size (features, or channels of an image)"),
        (last, 0, "readout", "number of outputs (classes)"),
    ):
        if module is None:
            continue
        shape = shape_of(module.weight)
        if shape is None or not shape[dim].isinf():
            continue
        model_size, base_size = shape[dim].dim, shape[dim].base_dim
        name = module_names.get(id(module), "?")
        side = "fan-in (dim 1)" if dim == 1 else "fan-out (dim 0)"
        role = "hidden" if dim == 1 else "hidden (or a vector for its bias)"
        raise UnclassifiableParameterError(
            f"{source} mark the {side} of the {what} {name!r} ({type(module).__name__}, weight "
            f"{tuple(module.weight.shape)}) as a width dim, but it is the data's {setting}: "
            f"{model_size} in the model, {base_size} in the base network. The base shapes were "
            f"made from a network with another {setting} than the model, so this layer would "
            f"be classed as {role}, with the wrong init and learning rate. Fix: build the base "
            f"(and delta) network with the same {setting} as the model ({model_size}) and the "
            "same other non-width sizes, only the width changed; for a WidthBuilder "
            "(MLP/CNN) pass the base width instead: set_base_shapes(model, base_width)."
        )
