"""Tiny data, networks and Trainers shared by the Lightning-module tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_local.modules as modules
from lightning_local.models import MLP
from lightning_local.modules import LocalLearningModule
from lightning_local.rules import LocalRule

IN, CLASSES, WIDTH, BASE = 8, 3, 32, 16


def data(n: int = 48, seed: int = 0) -> TensorDataset:
    """A tiny separable problem: labels from a random linear teacher."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=generator)
    teacher = torch.randn(IN, CLASSES, generator=generator)
    return TensorDataset(x, (x @ teacher).argmax(1))


def loader(n: int = 48, batch_size: int = 16) -> DataLoader:
    return DataLoader(data(n), batch_size=batch_size, shuffle=False)


def mlp(width: int = WIDTH, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=IN, width=width, num_classes=CLASSES, depth=3)


def trainer(tmp_path: Path | None = None, **kwargs) -> L.Trainer:
    """A quiet CPU Trainer (no logger, checkpoints or progress bar unless asked)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    if tmp_path is not None:
        options["default_root_dir"] = tmp_path
    options.update(kwargs)
    return L.Trainer(**options)


def mse(model: nn.Module, dataset: TensorDataset) -> float:
    """Reference MSE loss 1/2 ||f - onehot(y)||^2, batch mean, computed with plain torch."""
    x, y = dataset.tensors
    with torch.no_grad():
        f = model(x)
    return float(0.5 * (f - F.one_hot(y, CLASSES).float()).pow(2).sum(1).mean())


def module_class(rule_class: type[LocalRule]) -> type[LocalLearningModule]:
    """The library's preset for the rule, else a preset made the way the library makes one
    (so a newly registered rule gets every module-level battery)."""
    for value in vars(modules).values():
        if (isinstance(value, type) and issubclass(value, LocalLearningModule)
                and value.__dict__.get("rule_class") is rule_class):
            return value
    return type(f"{rule_class.__name__}Module", (LocalLearningModule,),
                {"rule_class": rule_class})
