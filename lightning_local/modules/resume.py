"""What a checkpoint holds besides weights and optimizer state, so that a resumed run is the
uninterrupted run: the run's muP identity, the random state and the step's bookkeeping.

- **Identity** (:func:`run_identity`): the module class, the rule with its settings as it
  trains (width-scaled: PC's ``gamma_L``), the parametrization, the optimizer row of the
  tables, the base width, every parameter's shape and base shape (``p.infshape``: which dimensions
  scale with width, and their base size). Loading or resuming compares it with the module's
  own (:func:`check_identity`) and refuses a difference, naming both values: the same weights
  under another base shape, ``gamma_L`` or inference setting are another algorithm.
- **Random state** (:func:`random_state` / :func:`restore_random_state`): torch's CPU and CUDA
  generators, NumPy's and Python's, as they were when the checkpoint was written; restored just
  before the first training batch after a resume (so a sanity check or a data loader created
  on resume does not shift them), which makes a rule's random draws (DTP's noise) continue.
- **Step bookkeeping**: gradients accumulated by the micro-batches of an unfinished
  accumulation window, the count of skipped batches and the epoch's running training loss.

Every value is a plain Python value or a tensor, so the checkpoint loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_local.errors import CheckpointError

IDENTITY_FORMAT = 1
"""Version of the identity record; checkpoints of 0.1.0 have none and are not checked."""


def base_shapes_of(network: nn.Module) -> dict[str, list[int | None]]:
    """``{parameter name: [base size of each width dimension, None for a finite one]}``."""
    shapes: dict[str, list[int | None]] = {}
    for name, parameter in network.named_parameters():
        infshape = getattr(parameter, "infshape", None)
        if infshape is None:
            continue
        shapes[name] = [
            None if dim.base_dim is None else int(dim.base_dim) for dim in infshape
        ]
    return shapes


def run_identity(
    module_class: type,
    rule_hparams: Mapping[str, Any],
    parametrization_hparams: Mapping[str, Any],
    optimizer: str,
    base_width: int,
    network: nn.Module,
) -> dict[str, Any]:
    """The record :func:`check_identity` compares (see the module docstring)."""
    return {
        "format": IDENTITY_FORMAT,
        "module": f"{module_class.__module__}.{module_class.__qualname__}",
        "rule": dict(rule_hparams),  # plain values already (RuleSettings.to_dict)
        "parametrization": dict(parametrization_hparams),
        "optimizer": str(optimizer),
        "base_width": int(base_width),
        "base_shapes": base_shapes_of(network),
        "shapes": {name: list(p.shape) for name, p in network.named_parameters()},
    }


def check_identity(saved: Mapping[str, Any] | None, current: Mapping[str, Any], path: Any) -> None:
    """Refuse a checkpoint whose run differs from this module's.

    Raises:
        CheckpointError: naming each difference with the checkpoint's value and this module's.
    """
    if saved is None:  # written by 0.1.0: nothing recorded to check
        return
    before_sizes, now_sizes = saved.get("shapes", {}), current["shapes"]
    for name in sorted(set(before_sizes) | set(now_sizes)):
        if before_sizes.get(name) != now_sizes.get(name):
            raise CheckpointError(
                f"checkpoint '{path}' does not fit the model: parameter {name} has shape "
                f"{before_sizes.get(name)} in the checkpoint vs {now_sizes.get(name)} here. Fix: "
                "build the model with the same network (architecture and width) as the run "
                "that wrote the checkpoint."
            )
    differences: list[str] = []
    if saved.get("module") != current["module"]:
        differences.append(f"module class {saved.get('module')} vs {current['module']}")
    for part in ("rule", "parametrization"):
        before, now = saved.get(part, {}), current[part]
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                differences.append(f"{part} {key}={before.get(key)!r} vs {now.get(key)!r}")
    for key in ("optimizer", "base_width"):
        if saved.get(key) != current[key]:
            differences.append(f"{key}={saved.get(key)!r} vs {current[key]!r}")
    before_shapes, now_shapes = saved.get("base_shapes", {}), current["base_shapes"]
    for name in sorted(set(before_shapes) | set(now_shapes)):
        if before_shapes.get(name) != now_shapes.get(name):
            differences.append(
                f"base shape of {name} {before_shapes.get(name)} vs {now_shapes.get(name)}"
            )
            break  # one parameter is enough to show it; the rest usually follow
    if differences:
        shown = "; ".join(differences[:6]) + ("; ..." if len(differences) > 6 else "")
        raise CheckpointError(
            f"checkpoint '{path}' was written by another run (checkpoint vs this module: "
            f"{shown}). Continuing would train another algorithm on these weights. Fix: build "
            "the module with the checkpoint's settings (load_from_checkpoint(path) without "
            "overrides rebuilds them), or start a new run from its weights with "
            "module.load_state_dict(torch.load(path)['state_dict'])."
        )


def random_state() -> dict[str, Any]:
    """torch's (CPU and, once initialised, CUDA), NumPy's and Python's random states."""
    version, keys, gauss = random.getstate()
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(keys), gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  *map(_plain_number, numpy_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain_number(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def restore_random_state(state: Mapping[str, Any]) -> None:
    """Set the generators to ``state`` (from :func:`random_state`)."""
    torch.set_rng_state(state["torch"])
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
