"""Compiling a rule's inference step with ``torch.compile``.

A rule names its inference step (:attr:`~lightning_local.rules.base.LocalRule.inference_method`):
the part of a training step that runs many small tensor operations between the feedforward
pass and the weight update (predictive coding's state steps, target propagation's targets).
:meth:`~lightning_local.rules.base.LocalRule.compile_inference` records a
:class:`CompileRequest`; the first call of the step compiles it (``torch.compile`` is lazy),
so a request made before the process layout or the device is known costs nothing.

Each rule compiles its own copy of the step's function (:func:`own_method`). ``torch.compile``
keeps compiled graphs, their guards and its recompile limit per code object, so rules sharing
one function would share one limit: a process that trains many rules (a sweep, a test suite)
would exhaust it and fall back silently to eager execution. A copy per rule gives each rule
its own graphs and its own limit.

What recompiles a step: a new batch size once (the second size marks the batch dimension
dynamic, so later sizes reuse that graph), a changed setting (a new settings object), other
arguments that steer Python control flow (e.g. ``final_energy``). Logging, optimizer steps
(parameters change in place) and new batches of the same shapes do not.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CompileRequest", "own_method"]


@dataclass(frozen=True)
class CompileRequest:
    """``torch.compile(step, backend=backend, **options)``, as asked for.

    Attributes:
        backend: a ``torch.compile`` backend: its name (``"inductor"``, ``"aot_eager"``,
            ``"eager"``) or a compiler callable ``(graph_module, example_inputs) -> callable``.
        options: further keyword arguments of ``torch.compile`` (``mode``, ``dynamic``,
            ``fullgraph``, ``options``).
    """

    backend: str | Callable[..., Any] = "inductor"
    options: dict[str, Any] = field(default_factory=dict)

    def compile(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """The compiled ``step`` (compilation itself happens at its first call)."""
        return torch.compile(step, backend=self.backend, **self.options)


def own_method(method: types.MethodType) -> types.MethodType:
    """``method`` rebound to a copy of its function with a code object of its own.

    The copy runs the same code (same globals, defaults and closure); only its identity
    differs, which is what ``torch.compile`` keys its cache and recompile limit on.
    """
    function = method.__func__
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__doc__ = function.__doc__
    copy.__module__ = function.__module__
    copy.__dict__.update(function.__dict__)
    return types.MethodType(copy, method.__self__)
