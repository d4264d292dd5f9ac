"""Test-suite settings: offline, quiet, deterministic."""

from __future__ import annotations

import os

# Never reach the network from tests: wandb stays disabled unless a test opts into offline mode.
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test networks run fastest on one thread, and a busy machine makes more threads far slower.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A data folder per test file: MNIST-1D caches shared by that file's tests."""
    return str(tmp_path_factory.mktemp("data"))
