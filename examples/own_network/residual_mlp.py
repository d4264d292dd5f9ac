"""A network of one's own: a residual tanh MLP, as a user writes it (not a library builder).

Each residual block is ``h + tanh(W h) * scale``; the readout is linear. It exposes its ordered
blocks as ``self.blocks``, which is all a local rule needs (the first block lifts the input to
the width, the last is the readout). ``width`` is the argument a sweep varies; base shapes for
muP come from building the same class at two widths, so nothing else is needed.

``ResidualClassifier`` is the converted Lightning module (predictive coding by default), the
way a user's project looks after following the README's "convert your project" section.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_local.modules import PredictiveCodingModule


class ResidualBlock(nn.Module):
    """``h -> h + scale * tanh(W h + b)`` at a fixed width."""

    def __init__(self, width: int, scale: float = 0.5) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.scale = scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.scale * torch.tanh(self.linear(h))


class ResidualMLP(nn.Module):
    """``in -> width`` (tanh), ``residual_blocks`` residual blocks, ``width -> classes``."""

    def __init__(self, width: int = 128, in_features: int = 40, num_classes: int = 10,
                 residual_blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Linear(in_features, width), nn.Tanh()),
            *(ResidualBlock(width) for _ in range(residual_blocks)),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualClassifier(PredictiveCodingModule):
    """The converted module: PC settings go to ``super().__init__``; the network is found as
    the only child with parameters; ``width_factory`` gives muP its base shapes."""

    def __init__(self, width: int = 128, residual_blocks: int = 2, lr: float = 0.1,
                 parametrization: str = "mup") -> None:
        super().__init__(lr=lr, parametrization=parametrization, inference="simultaneous",
                         inference_steps=8, inference_lr=0.2, fixed_prediction=False)
        self.residual_blocks = residual_blocks
        self.net = ResidualMLP(width, residual_blocks=residual_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def width_factory(self):
        return lambda width: ResidualMLP(width, residual_blocks=self.residual_blocks)
