"""Command-line options generated from a settings dataclass (one declaration, no restating).

``add_settings_arguments(parser, PredictiveCodingSettings)`` adds ``--inference-steps`` etc.
with the field's default, its one-line doc as help, ``choices`` from a ``Literal`` type and
``--name/--no-name`` for booleans; :func:`settings_from_args` reads them back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["add_settings_arguments", "settings_from_args"]


def _value(text: str) -> Any:
    """A JSON value (``0.2``, ``[1, 0.5]``, ``null``), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def add_settings_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    settings: type,
    *,
    only: Iterable[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """Add one option per field of ``settings`` (those in ``only``, all by default)."""
    hints = typing.get_type_hints(settings)
    wanted = None if only is None else set(only)
    defaults = dict(defaults or {})
    for field in dataclasses.fields(settings):
        if wanted is not None and field.name not in wanted:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = defaults.get(field.name, field.default)
        help_text = field.metadata.get("doc", "")
        hint = hints[field.name]
        if hint is bool:
            parser.add_argument(flag, dest=field.name, default=default, help=help_text,
                                action=argparse.BooleanOptionalAction)
        elif typing.get_origin(hint) is typing.Literal:
            parser.add_argument(flag, dest=field.name, default=default, help=help_text,
                                choices=typing.get_args(hint))
        elif hint in (int, float, str):
            parser.add_argument(flag, dest=field.name, default=default, help=help_text,
                                type=hint)
        else:
            parser.add_argument(flag, dest=field.name, default=default, type=_value,
                                help=f"{help_text} (a JSON value)")


def settings_from_args(
    args: argparse.Namespace, settings: type, *, only: Iterable[str] | None = None
) -> dict[str, Any]:
    """The values of the options :func:`add_settings_arguments` added, by field name."""
    wanted = None if only is None else set(only)
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(settings)
        if (wanted is None or f.name in wanted) and hasattr(args, f.name)
    }
