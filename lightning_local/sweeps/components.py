"""The model and the data of a sweep or a coordinate check: the library's or the user's.

Both are given the way ``LightningCLI`` names classes, ``{"class_path", "init_args"}``, from a
YAML file or from Python, or directly as Python objects:

- a **model** is anything that builds the network at a width ``M``: an ``nn.Module`` class
  whose ``width_argument`` (``"width"`` by default) is ``M``, a function ``width -> network``,
  or a :class:`~lightning_local.modules.base.LocalLearningModule` class with a width argument
  (its network, :meth:`network_for_rule`, is taken; the rule, learning rates and
  parametrization are the sweep's). ``None`` is the built-in
  :class:`~lightning_local.models.MLP` on the data's input and class counts.
- the **data** is a ``LightningDataModule`` (class or instance: its ``train_dataloader()``
  gives the training set, ``test_dataloader()``, else ``val_dataloader()``, the evaluation
  set), four tensors ``(x_train, y_train, x_test, y_test)``, or ``None`` for the built-in
  MNIST-1D / FashionMNIST loader.

Each has a plain-JSON ``to_dict()`` that goes into the run key (tensors by a content hash), so
a resumed sweep only skips runs of the same model and data.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_local.errors import LocalLearningError
from lightning_local.wiring import NetworkFactory

__all__ = ["DataSpec", "ModelSpec", "import_object", "make_current_folder_importable", "plain_json"]



def make_current_folder_importable() -> None:
    """Put the current folder on ``sys.path`` (as ``python -m`` does), once."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())


def import_object(path: str) -> Any:
    """The object at ``"package.module.Name"`` (the current folder is importable, like
    ``python -m``, so ``mymodels.ResidualMLP`` finds ``./mymodels.py``)."""
    make_current_folder_importable()
    module_name, _, name = str(path).rpartition(".")
    if not module_name:
        raise LocalLearningError(
            f"cannot import {path!r}: give a dotted path such as 'mymodels.ResidualMLP'."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise LocalLearningError(
            f"cannot import {module_name!r} for {path!r}: {error}. Fix: run from the folder "
            "that holds it, or install the package that defines it."
        ) from error
    try:
        return getattr(module, name)
    except AttributeError:
        raise LocalLearningError(f"{module_name!r} defines no {name!r}.") from None


def _qualified(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def plain_json(value: Any) -> Any:
    """JSON-friendly copy: tuples to lists, other objects to their ``repr``."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


@dataclass(frozen=True)
class ModelSpec:
    """How to build the network at a width.

    Attributes:
        class_path: the dotted path of the class or function (for the run key and YAML).
        init_args: its other arguments.
        width_argument: the argument that receives the width.
        target: the class or function itself (imported from ``class_path`` when not given).
    """

    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)
    width_argument: str = "width"
    target: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, model: Any) -> ModelSpec | None:
        """A spec from ``None`` (the built-in MLP), a spec, a ``{"class_path", "init_args",
        "width_argument"}`` mapping, a dotted path, or a class or function."""
        if model is None or isinstance(model, ModelSpec):
            return model
        if isinstance(model, Mapping):
            unknown = sorted(set(model) - {"class_path", "init_args", "width_argument"})
            if unknown or "class_path" not in model:
                raise LocalLearningError(
                    f"a model is {{class_path, init_args, width_argument}}, got keys "
                    f"{sorted(model)}. Fix: e.g. {{class_path: mymodels.ResidualMLP, "
                    "init_args: {depth: 4}, width_argument: width}."
                )
            return cls(str(model["class_path"]), dict(model.get("init_args") or {}),
                       str(model.get("width_argument", "width")))
        if isinstance(model, str):
            return cls(model)
        if callable(model):
            return cls(_qualified(model), target=model)
        raise LocalLearningError(
            f"cannot build networks from a {type(model).__name__}. Fix: give a class or a "
            "function width -> network, or {class_path, init_args, width_argument}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {"class_path": self.class_path, "init_args": plain_json(dict(self.init_args)),
                "width_argument": self.width_argument}

    def factory(self) -> NetworkFactory:
        """``width -> network`` (a fresh network each call; seed torch first)."""
        from lightning_local.modules.base import LocalLearningModule

        target = self.target if self.target is not None else import_object(self.class_path)
        args = dict(self.init_args)
        if isinstance(target, type) and issubclass(target, LocalLearningModule):
            def build(width: int) -> nn.Module:
                module = target(**{**args, self.width_argument: width})
                return module.network_for_rule()
        elif callable(target):
            self._check_width_argument(target)

            def build(width: int) -> nn.Module:
                return target(**{**args, self.width_argument: width})
        else:
            raise LocalLearningError(f"{self.class_path!r} is not a class or function.")
        return _checked(build, self.class_path)

    def _check_width_argument(self, target: Any) -> None:
        try:
            parameters = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        if self.width_argument not in parameters and not takes_any:
            raise LocalLearningError(
                f"{self.class_path} has no argument {self.width_argument!r} to set the width. "
                f"Fix: set width_argument to one of {list(parameters)}."
            )


def _checked(build: NetworkFactory, name: str) -> NetworkFactory:
    def factory(width: int) -> nn.Module:
        network = build(int(width))
        if not isinstance(network, nn.Module):
            raise LocalLearningError(
                f"{name} built a {type(network).__name__} at width {width}, not an nn.Module."
            )
        return network

    return factory


def _tensor_digest(tensors: Sequence[Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:20]


@dataclass(frozen=True)
class DataSpec:
    """Where the sweep's data comes from (the built-in loader is ``None``, not a spec).

    Attributes:
        class_path: the ``LightningDataModule`` class (or ``"tensors"`` for tensors).
        init_args: its arguments (for tensors: their content hash).
        target: the class, the data module instance or the four tensors.

    A data module instance is identified by its saved ``hparams``; one without them (no
    ``save_hyperparameters()``) by a hash of its loaded tensors, so two instances with
    different arguments never share run keys.
    """

    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)
    target: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, data: Any) -> DataSpec | None:
        """A spec from ``None``, a spec, ``{"class_path", "init_args"}``, a dotted path, a
        data module class or instance, or ``(x_train, y_train, x_test, y_test)``."""
        import lightning as L

        if data is None or isinstance(data, DataSpec):
            return data
        if isinstance(data, Mapping):
            if "class_path" not in data or set(data) - {"class_path", "init_args"}:
                raise LocalLearningError(
                    f"data is {{class_path, init_args}}, got keys {sorted(data)}. Fix: e.g. "
                    "{class_path: lightning_local.data.MNIST1DDataModule, init_args: "
                    "{num_samples: 2000}}."
                )
            return cls(str(data["class_path"]), dict(data.get("init_args") or {}))
        if isinstance(data, str):
            return cls(data)
        if isinstance(data, (tuple, list)) and len(data) == 4 and all(
            isinstance(t, Tensor) for t in data
        ):
            return cls("tensors", {"sha256": _tensor_digest(data)}, tuple(data))
        if isinstance(data, type) and issubclass(data, L.LightningDataModule):
            return cls(_qualified(data), target=data)
        if isinstance(data, L.LightningDataModule):
            hparams = dict(getattr(data, "hparams", {}) or {})
            spec = cls(_qualified(type(data)), hparams, data)
            if not hparams:  # its arguments are unknown: identify it by its content
                tensors = spec.load()
                return cls(_qualified(type(data)), {"sha256": _tensor_digest(tensors)},
                           ("loaded", tensors))
            return spec
        raise LocalLearningError(
            f"cannot read data from a {type(data).__name__}. Fix: give a LightningDataModule "
            "(class or instance), (x_train, y_train, x_test, y_test) tensors, or "
            "{class_path, init_args}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {"class_path": self.class_path, "init_args": plain_json(dict(self.init_args))}

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_train, y_train, x_test, y_test)`` in memory."""
        import lightning as L
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        if self.class_path == "tensors":
            return self.target  # type: ignore[return-value]
        if isinstance(self.target, tuple) and self.target[0] == "loaded":
            return self.target[1]
        target = self.target if self.target is not None else import_object(self.class_path)
        module = target(**dict(self.init_args)) if isinstance(target, type) else target
        if not isinstance(module, L.LightningDataModule):
            raise LocalLearningError(f"{self.class_path} is not a LightningDataModule.")
        module.prepare_data()
        module.setup("fit")
        try:
            x_train, y_train = _stack(module.train_dataloader(), "train_dataloader")
        except (NotImplementedError, MisconfigurationException):
            raise LocalLearningError(
                f"{self.class_path} gives no training data. Fix: define train_dataloader."
            ) from None
        evaluation = None
        for stage, hook in (("test", "test_dataloader"), ("validate", "val_dataloader")):
            try:
                if stage == "test":
                    module.setup("test")
                evaluation = _stack(getattr(module, hook)(), hook)
                break
            except (NotImplementedError, MisconfigurationException):  # hook not defined
                continue
        if evaluation is None:
            raise LocalLearningError(
                f"{self.class_path} has no test_dataloader or val_dataloader to evaluate on. "
                "Fix: define one of them."
            )
        return x_train, y_train, evaluation[0], evaluation[1]


def _stack(loader: Any, hook: str) -> tuple[Tensor, Tensor]:
    """All ``(x, y)`` pairs of a loader's data set, in the data set's order."""
    if isinstance(loader, (list, tuple)):
        if not loader:
            raise NotImplementedError(f"{hook} returned no loader")
        loader = loader[0]
    dataset: Dataset = getattr(loader, "dataset", loader)
    xs, ys = [], []
    for batch in DataLoader(dataset, batch_size=4096, shuffle=False):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise LocalLearningError(
                f"{hook}'s data set must yield (input, target) pairs, got a "
                f"{type(batch).__name__}."
            )
        xs.append(batch[0])
        ys.append(batch[1])
    if not xs:
        raise LocalLearningError(f"{hook}'s data set is empty.")
    return torch.cat(xs), torch.cat(ys)
