"""Test models for sweeps whose trials fail on purpose, importable by worker processes.

:class:`TrappedNet` is the two-hidden-layer tanh network of the component tests; at the widths
named in ``traps`` its first block does something before each forward pass:

- ``"raise"``: raises ``RuntimeError("injected failure at width W")``;
- ``"crash_once"``: the first process to claim ``marker`` (an exclusive create) exits at once
  with ``os._exit(3)``, as a worker killed by the kernel would; later forwards train normally.
  With ``crash_after=k`` the first ``k`` such networks of a process train untouched;
- ``"none"`` (any width not in ``traps``): nothing;
- ``"wait"``: waits until the file ``marker`` exists (at most ``wait_seconds``), so a test
  can kill the sweep while this trial is in flight.

Networks are only built, never run, by the sweep's checks and by muP's base shapes, so traps
fire only in training.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

_STARTED: dict[str, int] = {}  # per action: how many trapped networks ran in this process


def _claim(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class _Trap(nn.Module):
    def __init__(self, inner: nn.Module, action: str, width: int, marker: str,
                 crash_after: int, wait_seconds: float) -> None:
        super().__init__()
        self.inner = inner
        self.action, self.width, self.marker = action, width, marker
        self.crash_after, self.wait_seconds = crash_after, wait_seconds
        self.rank = 0  # set at the first forward: 1 for this process's first of this action

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rank:
            _STARTED[self.action] = self.rank = _STARTED.get(self.action, 0) + 1
        if self.action == "raise":
            raise RuntimeError(f"injected failure at width {self.width}")
        if self.action == "crash_once" and self.rank > self.crash_after and _claim(self.marker):
            os._exit(3)
        if self.action == "wait":
            deadline = time.monotonic() + self.wait_seconds
            while not Path(self.marker).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.marker} never appeared")
                time.sleep(0.01)
        return self.inner(x)


class TrappedNet(nn.Module):
    """A width-parametrized tanh network (``blocks``) with a trap at some widths."""

    def __init__(self, width: int, in_features: int = 40, num_classes: int = 10,
                 traps: dict | None = None, marker: str = "", crash_after: int = 0,
                 wait_seconds: float = 120.0) -> None:
        super().__init__()
        action = {int(w): a for w, a in (traps or {}).items()}.get(int(width), "none")
        # every width has the wrapper, so parameter names match across widths (base shapes)
        first = _Trap(nn.Linear(in_features, width), action, int(width), marker, crash_after,
                      wait_seconds)
        self.blocks = nn.ModuleList([
            nn.Sequential(first, nn.Tanh()),
            nn.Sequential(nn.Linear(width, width), nn.Tanh()),
            nn.Linear(width, num_classes),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
