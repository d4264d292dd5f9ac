"""Where a sweep's trials run: the :class:`Backend` seam and its two backends.

- :class:`LocalBackend` (default, ``--backend local``): this process, or ``--workers N``
  local processes; no extra dependency.
- :class:`RayBackend` (``--backend ray``): Ray tasks on a local Ray instance or a cluster
  (``--ray-address``); Ray is the optional extra ``lightning-local[ray]``, imported only
  when this backend runs.

Sharding (``--shard i/n``, :mod:`lightning_local.sweeps.shards`) is not a backend: it picks
which runs a command takes, and any backend runs them.
"""

from __future__ import annotations

from typing import Any

from lightning_local.errors import LocalLearningError
from lightning_local.sweeps.backends.base import Backend, Finish, Log
from lightning_local.sweeps.backends.local import LocalBackend
from lightning_local.sweeps.backends.ray_backend import RayBackend

__all__ = ["BACKENDS", "Backend", "Finish", "LocalBackend", "Log", "RayBackend", "make_backend"]

BACKENDS = ("local", "ray")
"""The backends' names, as ``--backend`` takes them."""


def make_backend(backend: str | Backend, **options: Any) -> Backend:
    """A backend from its name and options (``workers``/``threads`` for ``"local"``;
    ``address``, ``threads``, ``gpus_per_trial``, ``trials_per_task`` for ``"ray"``; both take
    ``max_retries``); a :class:`Backend` passes through. ``None`` options are left out."""
    if not isinstance(backend, str):
        if not isinstance(backend, Backend):
            raise LocalLearningError(
                f"a backend is 'local', 'ray' or a Backend, got {type(backend).__name__}."
            )
        return backend
    options = {name: value for name, value in options.items() if value is not None}
    allowed = {
        "local": {"workers", "threads", "max_retries"},
        "ray": {"address", "threads", "gpus_per_trial", "trials_per_task", "max_retries",
                "init_kwargs"},
    }
    name = backend.lower()
    if name not in allowed:
        raise LocalLearningError(f"unknown backend {backend!r}. Fix: use one of {BACKENDS}.")
    extra = sorted(set(options) - allowed[name])
    if extra:
        raise LocalLearningError(
            f"option(s) {extra} do not apply to the {name} backend. Fix: leave them out, or "
            "choose the backend they belong to."
        )
    return LocalBackend(**options) if name == "local" else RayBackend(**options)
