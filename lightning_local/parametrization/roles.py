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
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from lightning_local.errors import MissingBaseShapesError, UnclassifiableParameterError

__all__ = [
    "ClassifiedParameter",
    "Modules",
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
        for dim in infshape:
            if not dim.isinf():
                continue
            ratio = float(dim.width_mult())
            if found is None:
                found = (name, ratio)
            elif not math.isclose(ratio, found[1], rel_tol=1e-9):
                raise UnclassifiableParameterError(
                    f"parameter {name!r} has a width dim scaled by {ratio:g} relative to its base, "
                    f"but {found[0]!r} has one scaled by {found[1]:g}. The muP tables assume all "
                    "widths scale together. Fix: build base and delta networks whose widths "
                    "change by the same factor as the model's."
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
