"""The Lightning surface: a ``LightningModule`` whose training step is a local rule's.

:class:`LocalLearningModule` only glues three plain-PyTorch pieces together:

- a *network* (an ordered list of blocks ``f_1 .. f_L``, see :mod:`lightning_local.network`);
- a *rule* (:class:`~lightning_local.rules.base.LocalRule`) that turns a batch into a scalar
  surrogate whose gradient is the rule's weight update (a batch mean);
- a *parametrization* (SP or muP) that rescales the initialization once and builds the
  optimizer's per-role learning rates ``eta_l = eta' (M / M_base)^{-c_l}``.

One training step is ``zero_grad -> rule.training_loss -> manual_backward(surrogate) -> step``
(manual optimization: one optimizer, so ``global_step`` counts batches; under DDP one
all-reduce per step). Validation, test and predict use the plain forward pass.

Two ways in:

(a) wrap a network: ``PredictiveCodingModule(network=MLP(width=128), parametrization="mup")``;
(b) subclass: a user's module calls ``super().__init__(...)`` without a network, then builds
    it (``self.net = ...``). The network is found by :meth:`network_for_rule` (the attribute
    ``network``, else the only child module that is not a metric; override it to choose).

muP wiring happens once, on fresh weights, before any optimizer or DDP wrapper: at the end of
``__init__`` when a network is given, otherwise in :meth:`setup` (or on the first use of
:attr:`rule`, :meth:`configure_optimizers` or ``load_state_dict``). Base shapes come, in this
order, from the network's own ``p.infshape``, from a ``.bsh`` file (``base_shapes``), or from a
:class:`~lightning_local.models.WidthBuilder` at ``base_width``; else
:class:`~lightning_local.errors.MissingBaseShapesError` says how to provide them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import IO, Any

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import Self

from lightning_local.distributed import check_supported_strategy
from lightning_local.errors import (
    LocalLearningError,
    MissingBaseShapesError,
    UnsupportedNetworkError,
)
from lightning_local.losses import get_loss
from lightning_local.models import WidthBuilder
from lightning_local.modules.checkpoint import checkpoint_errors
from lightning_local.network import as_blocks, output_width
from lightning_local.parametrization import (
    Parametrization,
    get_parametrization,
    has_base_shapes,
    set_base_shapes,
)
from lightning_local.parametrization.parametrization import MuP
from lightning_local.rules.base import LocalRule, StepResult

__all__ = ["LocalLearningModule", "network_spec"]

_OPTIMIZERS = ("sgd", "adam", "adamw")


def network_spec(network: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuilds ``network``; ``None`` if it cannot.

    Only a :class:`~lightning_local.models.WidthBuilder` remembers its arguments (its
    ``config``). The format is ``jsonargparse``'s, so ``LightningCLI`` reads it as well.
    """
    if not isinstance(network, WidthBuilder):
        return None
    cls = type(network)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(network.config)}


def _network_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild a network from :func:`network_spec` (as stored in a checkpoint's hparams).

    Only classes that are already imported and are ``WidthBuilder`` subclasses are built: a
    checkpoint never decides which code is imported or run.
    """
    class_path = spec.get("class_path")
    module_name, _, class_name = str(class_path).rpartition(".")
    cls = getattr(sys.modules.get(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, WidthBuilder)):
        raise LocalLearningError(
            f"cannot rebuild the network {class_path!r}: only WidthBuilder classes that are "
            "already imported can be rebuilt from their saved arguments. Fix: import the module "
            "that defines it first, or pass the network yourself (network=...)."
        )
    return cls(**dict(spec.get("init_args") or {}))


class LocalLearningModule(L.LightningModule):
    """Base ``LightningModule`` for local learning rules (manual optimization).

    Subclasses implement :meth:`build_rule` and set :attr:`rule_name` (the key of the
    parametrization tables: ``"bp"``, ``"pc"`` or ``"tp"``).

    Args:
        network: the network (blocks ``f_1 .. f_L``); ``None`` when a subclass builds it.
            A ``{"class_path", "init_args"}`` mapping (as saved in checkpoints) rebuilds a
            :class:`~lightning_local.models.WidthBuilder`.
        parametrization: ``"sp"`` (standard) or ``"mup"`` (maximal update), or a
            :class:`~lightning_local.parametrization.Parametrization` instance.
        output_weight_exponent: muP's ``g`` for predictive coding, ``gamma_L = gamma_L' m^{-g}``
            with ``m = M / M_base`` (0: SGD's muP, -1: Gauss-Newton-target muP). Ignored by SP
            and by the other rules.
        base_width: ``M_base`` when base shapes are made from a WidthBuilder.
        base_shapes: path of a ``.bsh`` file of base shapes (for a network that is not a
            WidthBuilder); takes precedence over ``base_width``.
        lr: the width-independent learning rate ``eta'``.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (plain ``torch.optim`` with muP groups).
        momentum: SGD momentum.
        weight_decay: weight decay (scaled per group like ``mup``: ``lr * wd`` width-free).
        loss: output loss, ``"mse"`` (the paper's) or ``"cross_entropy"``.
    """

    rule_name: str = "bp"
    progress_bar_metrics: tuple[str, ...] = ()
    """Rule metrics (scalar names) also shown in the progress bar."""

    def __init__(
        self,
        network: nn.Module | None = None,
        *,
        parametrization: str | Parametrization = "sp",
        output_weight_exponent: float = 0.0,
        base_width: int = 64,
        base_shapes: str | None = None,
        lr: float = 0.1,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        loss: str = "mse",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["network"])
        if isinstance(network, Mapping):
            network = _network_from_spec(network)
        if network is not None and not isinstance(network, nn.Module):
            raise LocalLearningError(
                f"network must be an nn.Module, got a {type(network).__name__}. Fix: pass e.g. "
                "lightning_local.models.MLP(width=512)."
            )
        if str(optimizer).lower() not in _OPTIMIZERS:
            raise LocalLearningError(
                f"unknown optimizer {optimizer!r}. Fix: use one of {list(_OPTIMIZERS)}."
            )
        if lr <= 0:
            raise LocalLearningError(f"lr must be positive, got {lr}. Fix: e.g. lr=0.1.")
        self.parametrization = self._make_parametrization(parametrization, output_weight_exponent)
        if isinstance(parametrization, Parametrization):  # keep hparams plain values
            for hparams in (self.hparams, self._hparams_initial):
                hparams.update(self.parametrization.hparams())
        self.base_width = int(base_width)
        self.base_shapes = base_shapes
        self.lr = float(lr)
        self.optimizer_name = str(optimizer).lower()
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.loss_name = get_loss(loss).name
        self._rule: LocalRule | None = None
        self._wired: nn.Module | None = None
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_acc: MulticlassAccuracy | None = None
        self.test_acc: MulticlassAccuracy | None = None
        if network is not None:
            self.network = network
            spec = network_spec(network)
            if spec is not None:  # rebuilds the network on load_from_checkpoint(path)
                self.hparams["network"] = spec
                self._hparams_initial["network"] = spec
            self.apply_parametrization()

    # ------------------------------------------------------------------ the pieces
    @staticmethod
    def _make_parametrization(
        spec: str | Parametrization, output_weight_exponent: float
    ) -> Parametrization:
        if isinstance(spec, str) and spec.lower() in ("mup", "mu_p", "maximal_update"):
            return MuP(output_weight_exponent=output_weight_exponent)
        return get_parametrization(spec)

    def build_rule(self) -> LocalRule:
        """The rule this module trains with; subclasses implement it."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_rule().")

    def network_for_rule(self) -> nn.Module:
        """The network the rule trains: ``self.network``, else the only non-metric child.

        Override it when a subclass keeps several modules (``return self.net``).
        """
        network = self.__dict__["_modules"].get("network")
        if network is not None:
            return network
        children = [
            (name, child)
            for name, child in self.named_children()
            if not isinstance(child, Metric)
        ]
        if len(children) == 1:
            return children[0][1]
        names = [name for name, _ in children]
        raise UnsupportedNetworkError(
            f"{type(self).__name__} has {len(children)} candidate networks {names}. Fix: pass "
            "network=... to the constructor, assign it to self.network, or override "
            "network_for_rule() to return the module the rule should train."
        )

    def parametrized_modules(self) -> list[nn.Module]:
        """Every network whose parameters get base shapes, the init rescale and an optimizer.

        The rule's network by default; a rule with more trainable networks (e.g. feedback
        weights) returns them all.
        """
        return [self.network_for_rule()]

    @property
    def rule(self) -> LocalRule:
        """The rule, built once after the parametrization is applied."""
        self.apply_parametrization()
        if self._rule is None:
            self._rule = self.build_rule()
        return self._rule

    def apply_parametrization(self) -> None:
        """Attach base shapes (muP) and rescale the init, once, on the current network.

        Idempotent; runs again only when the network object was replaced. Call it at the end
        of a subclass's ``__init__`` to wire muP at construction time (otherwise ``setup`` does).

        Raises:
            MissingBaseShapesError: muP on a network without base shapes, ``.bsh`` file or
                width builder.
        """
        network = self.network_for_rule()
        if self._wired is network:
            return
        as_blocks(network)  # fail early on a network the rules cannot read
        modules = self.parametrized_modules()
        if self.parametrization.requires_base_shapes:
            for module in modules:
                if not has_base_shapes(module):
                    self._attach_base_shapes(module)
        self.parametrization.initialize(modules, self.rule_name, self.optimizer_name)
        self._wired = network
        self._rule = None
        self._build_accuracy(network)

    def _attach_base_shapes(self, module: nn.Module) -> None:
        if self.base_shapes is not None:
            set_base_shapes(module, self.base_shapes)
        elif isinstance(module, WidthBuilder):
            set_base_shapes(module, self.base_width)
        else:
            raise MissingBaseShapesError(
                f"muP needs base shapes, but the {type(module).__name__} network has no "
                "p.infshape, no base_shapes file was given and it is not a WidthBuilder. Fix: "
                "build it with lightning_local.models (MLP/CNN), pass base_shapes='net.bsh' "
                "(written by set_base_shapes(net, base, delta, savefile='net.bsh')), or call "
                "lightning_local.set_base_shapes(net, base=<net at base width>, "
                "delta=<net at another width>) before handing it over."
            )

    def _build_accuracy(self, network: nn.Module) -> None:
        classes = output_width(as_blocks(network))
        if classes is None or classes < 2:
            self.val_acc = self.test_acc = None
            return
        device = next(network.parameters(), torch.empty(0)).device
        self.val_acc = MulticlassAccuracy(num_classes=classes, average="micro").to(device)
        self.test_acc = MulticlassAccuracy(num_classes=classes, average="micro").to(device)

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike[str] | IO[bytes],
        map_location: Any = None,
        hparams_file: str | os.PathLike[str] | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's ``load_from_checkpoint``; a missing, truncated or non-fitting file raises
        :class:`~lightning_local.errors.CheckpointError`.

        A module that wrapped a :class:`~lightning_local.models.WidthBuilder` is rebuilt from
        the checkpoint alone; for another network pass it again (``network=...``), or let the
        subclass build it in ``__init__``. Base shapes are attached to the fresh network before
        the weights are loaded in place, so ``p.infshape`` is intact and nothing is rescaled.
        """
        with checkpoint_errors(checkpoint_path):
            return super().load_from_checkpoint(
                checkpoint_path,
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=weights_only,
                **kwargs,
            )

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Apply the parametrization before the optimizer and any DDP wrapper exist.

        Raises:
            LocalLearningError: under a sharding strategy (FSDP, DeepSpeed), which loses the
                base shapes and gathers weights on every inference step.
        """
        if self._trainer is not None:
            check_supported_strategy(self._trainer.strategy)
        self.apply_parametrization()

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load in place after the parametrization is applied (so it never rescales loaded
        weights); with ``assign=True`` the base shapes are carried over to the new tensors."""
        try:
            self.network_for_rule()
        except LocalLearningError:  # no network yet: nothing to wire
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.apply_parametrization()
        shapes = {name: p.infshape for name, p in self.named_parameters() if hasattr(p, "infshape")}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            for name, p in self.named_parameters():
                if name in shapes and not hasattr(p, "infshape"):
                    p.infshape = shapes[name]
        return result

    def __getstate__(self) -> dict[str, Any]:
        """Pickle with the base shapes beside the parameters, by name.

        ``torch.multiprocessing`` (``ddp_spawn``) rebuilds parameters without their Python
        attributes, so ``p.infshape`` would be lost in the spawned processes.
        """
        state = super().__getstate__()
        state["_infshapes"] = {
            name: p.infshape for name, p in self.named_parameters() if hasattr(p, "infshape")
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        shapes = state.pop("_infshapes", {})
        super().__setstate__(state)
        for name, p in self.named_parameters():
            if name in shapes and not hasattr(p, "infshape"):
                p.infshape = shapes[name]

    def forward(self, x: Tensor) -> Tensor:
        """The network's forward pass ``f(x)``."""
        return self.network_for_rule()(x)

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """A plain ``torch.optim`` optimizer with the parametrization's per-role groups."""
        rule = self.rule
        return self.parametrization.build_optimizer(
            self.parametrized_modules(),
            self.lr,
            rule=rule,
            optimizer=self.optimizer_name,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``zero_grad -> rule.training_loss -> manual_backward(surrogate) -> step``."""
        inputs, targets = self._split_batch(batch)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        result = self.rule.training_loss(self.network_for_rule(), inputs, targets)
        self.manual_backward(result.surrogate)
        optimizer.step()
        self._step_schedulers("step")
        self._log_training(result, inputs.shape[0])
        return result.loss

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss, self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_loss, self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """The network output for the batch's inputs (a batch or an ``(x, y)`` pair)."""
        inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(inputs)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[0], batch[1]
        raise LocalLearningError(
            f"a training batch must be an (inputs, targets) pair, got a {type(batch).__name__}. "
            "Fix: make the data loader yield (x, y) tuples, e.g. a TensorDataset(x, y)."
        )

    def _log_training(self, result: StepResult, batch_size: int) -> None:
        """Per-step loss and rule metrics (per-layer ones as ``name/layer_i``); epoch mean loss."""
        self.log("train/loss", result.loss, prog_bar=True, batch_size=batch_size)
        self.train_loss.update(result.loss)
        self.log("train/loss_epoch", self.train_loss, on_step=False, on_epoch=True)
        for name, value in result.metrics.items():
            value = value.detach()
            if value.dim() == 0:
                self.log(
                    f"train/{name}",
                    value.float(),
                    prog_bar=name in self.progress_bar_metrics,
                    batch_size=batch_size,
                )
            else:
                for index, entry in enumerate(value.flatten()):
                    self.log(f"train/{name}/layer_{index}", entry.float(), batch_size=batch_size)

    def _evaluate(
        self, batch: Any, stage: str, loss_metric: MeanMetric, accuracy: Metric | None
    ) -> None:
        inputs, targets = self._split_batch(batch)
        output = self(inputs)
        loss_metric.update(self.rule.loss.mean(output, targets), weight=inputs.shape[0])
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=True)
        if accuracy is not None and not torch.is_floating_point(targets):
            accuracy.update(output, targets)
            self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)

    def _step_schedulers(self, interval: str) -> None:
        """Step the schedulers of ``configure_optimizers`` (manual optimization does not)."""
        trainer = self._trainer
        if trainer is None:
            return
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = trainer.global_step if interval == "step" else trainer.current_epoch + 1
            if count % config.frequency:
                continue
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitored = trainer.callback_metrics.get(config.monitor)
                if monitored is None:
                    raise LocalLearningError(
                        f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged. "
                        "Fix: monitor a logged metric such as 'val/loss'."
                    )
                config.scheduler.step(monitored)
            else:
                config.scheduler.step()
