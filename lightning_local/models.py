"""Builders for the paper's networks, parameterized by width.

Each builder returns an ``nn.Sequential`` of blocks (see :mod:`lightning_local.network`):
hidden blocks end with their activation, the last block is a linear readout. A builder
remembers its arguments, so ``net.with_width(w)`` rebuilds the same architecture at another
width: that is what muP's base and delta shapes are made from.

Initialization is Gaussian, ``W_l ~ N(0, sigma^2 / fan_in)`` and zero biases: the standard
parameterization at every width, which a muP parametrization then rescales (docs/math.md §3.4).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lightning_local.errors import LocalLearningError

__all__ = ["MLP", "CNN", "CNN1d", "WidthBuilder", "activation_module", "gaussian_init_"]

_ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "identity": nn.Identity,
    "linear": nn.Identity,
    "sigmoid": nn.Sigmoid,
}


def activation_module(name: str) -> nn.Module:
    """The activation module called ``name`` (tanh, relu, identity/linear, sigmoid)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise LocalLearningError(
            f"unknown activation {name!r}. Fix: use one of {sorted(_ACTIVATIONS)}."
        ) from None


@torch.no_grad()
def gaussian_init_(module: nn.Module, sigma: float = 1.0) -> None:
    """``W ~ N(0, sigma^2 / fan_in)`` for every Linear/Conv weight, zero biases."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.Conv1d)):
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, sigma / math.sqrt(fan_in))
            if layer.bias is not None:
                layer.bias.zero_()


class WidthBuilder(nn.Sequential):
    """An ``nn.Sequential`` that remembers its constructor arguments.

    ``config`` holds them (for hyperparameters and checkpoints); ``with_width(w)`` builds the
    same network at width ``w``, optionally on another device (``"meta"`` for base shapes).
    """

    config: dict[str, Any]

    def with_width(self, width: int, device: torch.device | str | None = None) -> WidthBuilder:
        kwargs = dict(self.config, width=width)
        if device is not None:
            with torch.device(device):
                return type(self)(**kwargs)
        return type(self)(**kwargs)

    @property
    def width(self) -> int:
        return int(self.config["width"])


class MLP(WidthBuilder):
    """An MLP with ``depth`` weight layers: ``d0 -> M -> ... -> M -> C``.

    Blocks: ``[Linear(d0, M), act]``, ``depth - 2`` times ``[Linear(M, M), act]``, and the
    readout ``Linear(M, C)``. The paper's model is ``MLP(activation="tanh", depth=3)``.
    """

    def __init__(
        self,
        in_features: int = 40,
        width: int = 512,
        num_classes: int = 10,
        depth: int = 3,
        activation: str = "tanh",
        bias: bool = True,
        sigma: float = 1.0,
    ) -> None:
        if depth < 2:
            raise LocalLearningError(f"depth must be at least 2 weight layers, got {depth}.")
        if width < 1 or in_features < 1 or num_classes < 1:
            raise LocalLearningError("in_features, width and num_classes must be positive.")
        sizes = [in_features] + [width] * (depth - 1)
        blocks: list[nn.Module] = [
            nn.Sequential(nn.Linear(fan_in, fan_out, bias=bias), activation_module(activation))
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:])
        ]
        blocks.append(nn.Linear(width, num_classes, bias=bias))
        super().__init__(*blocks)
        self.config = dict(
            in_features=in_features,
            width=width,
            num_classes=num_classes,
            depth=depth,
            activation=activation,
            bias=bias,
            sigma=sigma,
        )
        gaussian_init_(self, sigma)


class CNN(WidthBuilder):
    """A CNN whose width is its channel count ``M``.

    Blocks: ``conv_layers`` times ``[Conv2d(c, M, 3, padding=1), act, AvgPool2d(2)]`` (the
    first maps the image's channels), then ``[Flatten, Linear(M * s * s, C)]`` as readout,
    where ``s`` is the image size after pooling. The paper's model uses ``activation="tanh"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        width: int = 32,
        num_classes: int = 10,
        conv_layers: int = 2,
        activation: str = "tanh",
        bias: bool = True,
        sigma: float = 1.0,
    ) -> None:
        if conv_layers < 1:
            raise LocalLearningError("a CNN needs at least one convolutional block.")
        size = image_size
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(conv_layers):
            if size < 2:
                raise LocalLearningError(
                    f"image_size {image_size} is too small for {conv_layers} pooled conv blocks."
                )
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(channels, width, 3, padding=1, bias=bias),
                    activation_module(activation),
                    nn.AvgPool2d(2),
                )
            )
            channels, size = width, size // 2
        blocks.append(
            nn.Sequential(nn.Flatten(), nn.Linear(width * size * size, num_classes, bias=bias))
        )
        super().__init__(*blocks)
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            width=width,
            num_classes=num_classes,
            conv_layers=conv_layers,
            activation=activation,
            bias=bias,
            sigma=sigma,
        )
        gaussian_init_(self, sigma)


class CNN1d(WidthBuilder):
    """A 1-D CNN whose width is its channel count ``M``, for sequences such as MNIST-1D.

    Blocks: ``conv_layers`` times ``[Conv1d(c, M, kernel_size, padding=kernel_size // 2), act,
    AvgPool1d(2)]`` (the first maps the input's channels, and takes flat ``(batch, length)``
    inputs through ``Unflatten`` when ``in_channels == 1``), then ``[Flatten, Linear(M * s,
    C)]`` as readout, where ``s`` is the length after pooling. MNIST-1D was designed for
    1-D convolutions: ``CNN1d(length=40)`` is its tanh CNN.
    """

    def __init__(
        self,
        in_channels: int = 1,
        length: int = 40,
        width: int = 32,
        num_classes: int = 10,
        conv_layers: int = 2,
        kernel_size: int = 5,
        activation: str = "tanh",
        bias: bool = True,
        sigma: float = 1.0,
    ) -> None:
        if conv_layers < 1:
            raise LocalLearningError("a CNN1d needs at least one convolutional block.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise LocalLearningError(
                f"kernel_size must be odd and positive (the length is kept before pooling), "
                f"got {kernel_size}. Fix: e.g. kernel_size=5."
            )
        if length < 2**conv_layers:
            raise LocalLearningError(
                f"length {length} is too short for {conv_layers} pooled conv blocks. Fix: use "
                f"at most {max(1, int(math.log2(max(length, 1))))} conv_layers."
            )
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise LocalLearningError("in_channels, width and num_classes must be positive.")
        size, channels = length, in_channels
        blocks: list[nn.Module] = []
        for index in range(conv_layers):
            layers: list[nn.Module] = []
            if index == 0 and in_channels == 1:
                layers.append(nn.Unflatten(1, (1, length)))
            layers += [
                nn.Conv1d(channels, width, kernel_size, padding=kernel_size // 2, bias=bias),
                activation_module(activation),
                nn.AvgPool1d(2),
            ]
            blocks.append(nn.Sequential(*layers))
            channels, size = width, size // 2
        blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(width * size, num_classes, bias=bias)))
        super().__init__(*blocks)
        self.config = dict(
            in_channels=in_channels,
            length=length,
            width=width,
            num_classes=num_classes,
            conv_layers=conv_layers,
            kernel_size=kernel_size,
            activation=activation,
            bias=bias,
            sigma=sigma,
        )
        gaussian_init_(self, sigma)
