"""The tiny sweep the sweep tests share: two widths, two lrs, three steps on MNIST-1D."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_local.sweeps import SweepConfig


def tiny_config(tmp_path: Path, **overrides: Any) -> SweepConfig:
    """Backprop under SP and muP at widths 8 and 16, lrs 0.05 and 0.1, 3 steps, 200 samples
    of the data set in ``tmp_path / "data"``; ``overrides`` replace any of these."""
    settings: dict[str, Any] = dict(
        rules=["bp"], parametrizations=["sp", "mup"], widths=[8, 16], lrs=[0.05, 0.1],
        seeds=[0], steps=3, num_samples=200, batch_size=32, base_width=8,
        data_dir=str(tmp_path / "data"),
    )
    settings.update(overrides)
    return SweepConfig(**settings)


def with_data(tmp_path: Path, data_dir: Path) -> Path:
    """``tmp_path`` with a ``data`` link to the session's generated data set."""
    tmp_path.joinpath("data").symlink_to(data_dir)
    return tmp_path
