"""``--config sweep.yaml`` for ``lightning-local sweep`` and ``coord-check``.

The file is a mapping whose keys are the command's options with underscores (``widths``,
``batch_size``, ``output``, ...) plus ``model`` and ``data`` in ``LightningCLI``'s
``class_path``/``init_args`` style (see :mod:`lightning_local.sweeps.components`)::

    model:
      class_path: residual_mlp.ResidualMLP      # importable from the current folder
      init_args: {in_features: 40, num_classes: 10, blocks: 2}
      width_argument: width
    data:
      class_path: lightning_local.data.MNIST1DDataModule
      init_args: {num_samples: 4000}
    rules: [bp, pc-si-fpa, dtp]
    widths: [64, 128, 256]
    lrs: {log2: [-6, 1]}                         # or a list of values
    epochs: 2
    output: runs/residual_sweep

Options given on the command line override the file.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_local.errors import LocalLearningError

__all__ = ["apply_config_file", "config_path", "read_config", "split_config"]


def config_path(argv: Sequence[str] | None) -> str | None:
    """The value of ``--config`` in ``argv``, if any."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(list(argv) if argv is not None else None)
    return known.config


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The file's mapping, with ``lrs: {log2: [start, stop, step]}`` expanded to values."""
    from lightning_local.sweeps.runner import log2_grid

    path = Path(path)
    if not path.is_file():
        raise LocalLearningError(f"config file {str(path)!r} not found.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise LocalLearningError(f"cannot read {str(path)!r} as YAML: {error}") from None
    if not isinstance(values, Mapping):
        raise LocalLearningError(f"{str(path)!r} must hold a mapping of options.")
    values = dict(values)
    lrs = values.get("lrs")
    if isinstance(lrs, Mapping):
        if set(lrs) != {"log2"} or not 2 <= len(lrs["log2"]) <= 3:
            raise LocalLearningError(
                f"lrs must be a list or {{log2: [start, stop, step]}}, got {lrs!r}."
            )
        values["lrs"] = log2_grid(*(float(v) for v in lrs["log2"]))
    return values


def split_config(
    values: Mapping[str, Any], parser: argparse.ArgumentParser, accepted: Iterable[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(parser defaults, other accepted settings)``; an unknown key raises with the list."""
    dests = {action.dest for action in parser._actions} - {"help", "config"}
    accepted = set(accepted)
    unknown = sorted(set(values) - dests - accepted)
    if unknown:
        raise LocalLearningError(
            f"unknown option(s) {unknown} in the config file. Fix: use {sorted(dests | accepted)}."
        )
    defaults = {k: v for k, v in values.items() if k in dests}
    extra = {k: v for k, v in values.items() if k not in dests}
    return defaults, extra


def apply_config_file(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, accepted: Iterable[str]
) -> dict[str, Any]:
    """Read ``--config`` from ``argv`` (if given) into ``parser``'s defaults, so options on
    the command line override it; return the file's other ``accepted`` settings."""
    path = config_path(argv)
    if path is None:
        return {}
    defaults, extra = split_config(read_config(path), parser, accepted)
    parser.set_defaults(**defaults)
    return extra
