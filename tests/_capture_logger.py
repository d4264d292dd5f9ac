"""A Lightning logger that keeps what it is given in memory, for tests."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger


class CaptureLogger(Logger):
    """Keeps what Lightning logs, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.hyperparams: dict[str, Any] = {}
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hyperparams.update(dict(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))
