"""The Lightning surface: a ``LightningModule`` whose training step is a local rule's.

:class:`LocalLearningModule` glues plain-PyTorch pieces together and owns nothing else:

- a *network* (an ordered list of blocks ``f_1 .. f_L``, see :mod:`lightning_local.network`);
- a *rule* (:class:`~lightning_local.rules.base.LocalRule`, chosen by :attr:`rule_class`) that
  turns a batch into a scalar surrogate whose gradient is the rule's weight update;
- the run's wiring (base shapes, init rescale, per-role optimizer groups, PC's ``gamma_L``),
  done by :func:`lightning_local.wiring.wire` and nowhere else.

Settings are declared once. The constructor's keyword arguments are the fields of the rule's
``Settings`` dataclass, of :class:`~lightning_local.wiring.TrainingSettings` and of the
module's own :attr:`module_settings` (e.g. TP's feedback pre-training); the signature that
``LightningCLI`` and ``load_from_checkpoint`` read is generated from them, and every setting
lands in ``hparams``. A preset is therefore three lines::

    class PredictiveCodingModule(LocalLearningModule):
        rule_class = PredictiveCoding

One training step is ``zero_grad -> rule.training_loss -> manual_backward(surrogate) -> step``
(manual optimization: one optimizer, so ``global_step`` counts batches; under DDP one
all-reduce per step). Validation, test and predict use the plain forward pass.

Two ways in:

(a) wrap a network: ``PredictiveCodingModule(network=MLP(width=128), parametrization="mup")``;
(b) subclass: a user's module calls ``super().__init__(...)`` without a network, then builds
    it (``self.net = ...``). The network is found by :meth:`network_for_rule`: the attribute
    ``network``, else the only public child module that has parameters and is not a metric
    (a loss module such as ``self.criterion = nn.CrossEntropyLoss()`` is ignored); override
    it to choose.

The wiring happens once, on fresh weights, before any optimizer or DDP wrapper: at the end of
``__init__`` when a network is given, otherwise in :meth:`setup` (or on the first use of
:attr:`rule`, :meth:`configure_optimizers` or ``load_state_dict``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
import os
import sys
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import IO, Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import Self

from lightning_local.distributed import check_supported_strategy, process_layout
from lightning_local.errors import (
    CheckpointError,
    LocalLearningError,
    NonFiniteEnergyError,
    UnsupportedNetworkError,
)
from lightning_local.models import WidthBuilder
from lightning_local.modules.checkpoint import checkpoint_errors, install_atomic_checkpoints
from lightning_local.modules.resume import (
    check_identity,
    random_state,
    restore_random_state,
    run_identity,
)
from lightning_local.modules.weight_averaging import check_weight_averaging
from lightning_local.network import as_blocks, output_width
from lightning_local.parametrization import Parametrization
from lightning_local.rules.backprop import Backprop
from lightning_local.rules.base import LocalRule, RuleSettings, StepResult
from lightning_local.wiring import (
    NetworkFactory,
    TrainingSettings,
    WiredRun,
    make_parametrization,
    make_rule,
    wire,
)

__all__ = ["LocalLearningModule", "NoModuleSettings", "network_spec"]


@dataclasses.dataclass(frozen=True)
class NoModuleSettings(RuleSettings):
    """A module without settings of its own (besides the rule's and the run's)."""


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


def _settings_classes(cls: type) -> tuple[type[RuleSettings], ...]:
    return (cls.rule_class.Settings, cls.module_settings, TrainingSettings)


def _signature(cls: type) -> inspect.Signature:
    """``(self, network=None, *, <rule settings>, <module settings>, <training settings>)``."""
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter(
            "network", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
            annotation=nn.Module | None,
        ),
    ]
    seen: dict[str, type] = {}
    for settings in _settings_classes(cls):
        hints = typing.get_type_hints(settings)
        for field in dataclasses.fields(settings):
            if field.name in seen or field.name == "network":
                raise TypeError(
                    f"{cls.__name__}: setting {field.name!r} is declared by both "
                    f"{seen.get(field.name, cls).__name__} and {settings.__name__}."
                )
            seen[field.name] = settings
            parameters.append(inspect.Parameter(
                field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                annotation=hints[field.name],
            ))
    return inspect.Signature(parameters)


def _settings_doc(cls: type) -> str:
    lines = ["", "    Settings (keyword arguments, each saved in ``hparams``):", ""]
    for settings in _settings_classes(cls):
        for field in dataclasses.fields(settings):
            lines.append(f"        {field.name}: {field.metadata.get('doc', '')}")
    return "\n".join(lines) + "\n"


def _generated_init(cls: type) -> Callable[..., None]:
    """An ``__init__`` for ``cls`` whose signature lists its declared settings.

    It deliberately does not use ``super()``: Lightning reads the init arguments of frames
    that carry a ``__class__`` cell, and this wrapper's locals are not its signature.
    """

    def __init__(self: LocalLearningModule, network: nn.Module | None = None, **settings: Any):
        LocalLearningModule.__init__(self, network, **settings)

    __init__.__signature__ = _signature(cls)  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    __init__.__doc__ = f"Build a {cls.__name__}; see the class docstring for the settings."
    return __init__


def _caller_init_args(module: nn.Module, frame: Any) -> dict[str, Any]:
    """Arguments of the subclass ``__init__`` frames that called the base ``__init__``.

    Walks out from ``frame`` while the frames are ``__init__`` methods of ``module``; outer
    frames (the user's own class) take precedence, like Lightning's ``save_hyperparameters``.
    """
    collected: dict[str, Any] = {}
    while frame is not None and frame.f_code.co_name == "__init__":
        info = inspect.getargvalues(frame)
        if not info.args or info.locals.get(info.args[0]) is not module:
            break
        values = {name: info.locals[name] for name in info.args[1:] if name in info.locals}
        if info.keywords:
            values.update(info.locals.get(info.keywords) or {})
        collected.update(values)
        frame = frame.f_back
    return collected


def _norms(tensors: list[Tensor]) -> Tensor:
    """The 2-norm of each tensor, in one fused pass (non-finite when any entry is, and it
    bounds the largest entry from above); an order of magnitude cheaper than ``isfinite`` or
    the max norm on large weights."""
    return torch.stack(torch._foreach_norm(tensors, 2.0)).float()


def _first_diverged(
    named: list[tuple[str, Tensor]], limit: float | None = None
) -> tuple[str, float] | None:
    """``(name, largest |entry|)`` of the first tensor with a non-finite entry or one above
    ``limit``, else None. The 2-norms bound every entry, so when all are within ``limit`` one
    fused pass and one host synchronisation decide; the largest entry is computed only for a
    tensor above it (a finite tensor whose norm alone overflows passes without a limit)."""
    named = [(name, t.detach()) for name, t in named if t.numel()]
    if not named:
        return None
    bound = math.inf if limit is None else float(limit)
    suspicious = ~(_norms([t for _, t in named]) <= bound)  # NaN, inf or above the bound
    if not bool(suspicious.any()):
        return None
    for index in suspicious.nonzero().flatten().tolist():
        largest = float(named[index][1].abs().max())  # NaN propagates
        if not math.isfinite(largest) or largest > bound:
            return named[index][0], largest
    return None


def _dynamo_backend(context: Any) -> Any:
    """The backend a ``torch.compile`` context was made with, when torch exposes it."""
    backend = getattr(getattr(context, "callback", None), "_torchdynamo_orig_backend", None)
    while hasattr(backend, "_torchdynamo_orig_backend"):
        backend = backend._torchdynamo_orig_backend
    inner = getattr(backend, "_inner_convert", None) or backend
    compiler = getattr(inner, "_torchdynamo_orig_backend", None) or getattr(
        inner, "compiler_fn", None)
    return compiler


_LOADING: contextvars.ContextVar[str] = contextvars.ContextVar("loading", default="(loaded)")


@contextlib.contextmanager
def _loading(path: Any) -> Iterator[None]:
    """Name the checkpoint being loaded, for the messages of ``on_load_checkpoint``."""
    token = _LOADING.set(str(path))
    try:
        yield
    finally:
        _LOADING.reset(token)


def _checkpoint_module(path: Any) -> str | None:
    """The module class recorded in a local checkpoint file (None when unknown)."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # unreadable: the caller's error stands
        return None
    identity = (checkpoint.get("lightning_local") or {}).get("identity") or {}
    return identity.get("module")


def _adapting(configure: Callable[..., Any]) -> Callable[..., Any]:
    """A subclass's ``configure_optimizers`` whose optimizer gets muP's per-role groups."""

    @functools.wraps(configure)
    def configure_optimizers(self: LocalLearningModule) -> Any:
        return self.adapt_optimizers(configure(self))

    configure_optimizers._lightning_local_adapts = True  # type: ignore[attr-defined]
    return configure_optimizers


class LocalLearningModule(L.LightningModule):
    """Base ``LightningModule`` for local learning rules (manual optimization).

    Args:
        network: the network (blocks ``f_1 .. f_L``); ``None`` when a subclass builds it.
            A ``{"class_path", "init_args"}`` mapping (as saved in checkpoints) rebuilds a
            :class:`~lightning_local.models.WidthBuilder`.
        **settings: the rule's settings (:attr:`rule_class` ``.Settings``), the module's own
            (:attr:`module_settings`) and the run's
            (:class:`~lightning_local.wiring.TrainingSettings`: parametrization, lr, ...).
            ``parametrization`` also takes a
            :class:`~lightning_local.parametrization.Parametrization` instance.

    Class attributes a preset sets:
        rule_class: the rule (``Backprop``, ``PredictiveCoding``, ``TargetPropagation``).
        module_settings: a :class:`~lightning_local.rules.base.RuleSettings` dataclass of the
            module's own settings (``NoModuleSettings`` by default).
        progress_bar_metrics: rule metrics (scalar names) also shown in the progress bar.
    """

    rule_class: ClassVar[type[LocalRule]] = Backprop
    module_settings: ClassVar[type[RuleSettings]] = NoModuleSettings
    progress_bar_metrics: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declares = "rule_class" in cls.__dict__ or "module_settings" in cls.__dict__
        if declares and "__init__" not in cls.__dict__:
            cls.__init__ = _generated_init(cls)  # type: ignore[method-assign]
            cls.__doc__ = (cls.__doc__ or "") + _settings_doc(cls)
        own = cls.__dict__.get("configure_optimizers")
        if own is not None and not getattr(own, "_lightning_local_adapts", False):
            cls.configure_optimizers = _adapting(own)  # type: ignore[method-assign]

    def __init__(self, network: nn.Module | None = None, **settings: Any) -> None:
        L.LightningModule.__init__(self)
        self.automatic_optimization = False
        rule_values, module_values, training_values = self._split_settings(settings)
        parametrization = training_values.get("parametrization")
        if isinstance(parametrization, Parametrization):
            training_values.update(parametrization.hparams())
        self.training_settings = TrainingSettings.build(training_values, owner=type(self).__name__)
        self.rule_settings = self.rule_class.Settings.build(rule_values, owner=type(self).__name__)
        self.extra_settings = self.module_settings.build(module_values, owner=type(self).__name__)
        self.parametrization = (
            parametrization if isinstance(parametrization, Parametrization)
            else make_parametrization(
                self.training_settings.parametrization,
                self.training_settings.output_weight_exponent,
            )
        )
        self.check_settings()
        self.build_rule()  # fails on bad settings now, not at the first training step
        self.__dict__["_local_run"] = None
        self.__dict__["_local_source"] = None
        self.__dict__["_local_stepped"] = True
        self._ll_train_loss = MeanMetric()
        self._ll_val_loss = MeanMetric()
        self._ll_test_loss = MeanMetric()
        self._ll_val_acc: MulticlassAccuracy | None = None
        self._ll_test_acc: MulticlassAccuracy | None = None
        if isinstance(network, Mapping):
            network = _network_from_spec(network)
        if network is not None and not isinstance(network, nn.Module):
            raise LocalLearningError(
                f"network must be an nn.Module, got a {type(network).__name__}. Fix: pass e.g. "
                "lightning_local.models.MLP(width=512)."
            )
        self.save_hyperparameters(self._hyperparameters(network, inspect.currentframe()))
        if network is not None:
            self._wire(network, register=True)

    # ------------------------------------------------------------------ settings
    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """Every keyword argument the constructor takes besides ``network``."""
        return tuple(name for s in _settings_classes(cls) for name in s.field_names())

    def _split_settings(
        self, settings: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        parts: tuple[dict[str, Any], ...] = ({}, {}, {})
        classes = _settings_classes(type(self))
        for name, value in settings.items():
            for part, owner in zip(parts, classes):
                if name in owner.field_names():
                    part[name] = value
                    break
            else:
                raise LocalLearningError(
                    f"{type(self).__name__} has no setting {name!r}. Fix: use one of "
                    f"{sorted(self.setting_names())}."
                )
        return parts  # type: ignore[return-value]

    def check_settings(self) -> None:
        """Check settings that depend on each other (a preset overrides it)."""

    def _hyperparameters(self, network: nn.Module | None, frame: Any) -> dict[str, Any]:
        """Every declared setting as a plain value, the network's spec (when it can be
        rebuilt) and the arguments of the subclass ``__init__`` frames that called us."""
        hparams: dict[str, Any] = {
            **self.rule_settings.to_dict(),
            **self.extra_settings.to_dict(),
            **self.training_settings.to_dict(),
        }
        spec = network_spec(network) if network is not None else None
        if spec is not None:  # rebuilds the network on load_from_checkpoint(path)
            hparams["network"] = spec
        for name, value in _caller_init_args(self, frame.f_back).items():
            if name == "network" or isinstance(value, (nn.Module, Parametrization)):
                continue  # kept as its spec / plain settings above
            hparams[name] = value
        given = _given_hyperparameters.get()  # set when LightningCLI instantiates the module
        for name, value in (given or {}).items():
            if name.startswith("_") or name not in hparams:  # _class_path, _instantiator, ...
                hparams[name] = value
        return hparams

    # ------------------------------------------------------------------ the pieces
    @property
    def lr(self) -> float:
        """The width-independent learning rate ``eta'``."""
        return self.training_settings.lr

    @lr.setter
    def lr(self, value: float) -> None:
        self.training_settings = self.training_settings.replace(lr=value)

    @property
    def optimizer_name(self) -> str:
        return self.training_settings.optimizer

    @property
    def momentum(self) -> float:
        return self.training_settings.momentum

    @property
    def weight_decay(self) -> float:
        return self.training_settings.weight_decay

    @property
    def base_width(self) -> int:
        return self.training_settings.base_width

    @property
    def base_shapes(self) -> str | None:
        return self.training_settings.base_shapes

    @property
    def loss_name(self) -> str:
        return self.training_settings.loss

    @property
    def rule_name(self) -> str:
        """The key of the parametrization tables: ``"bp"``, ``"pc"`` or ``"tp"``."""
        return self.rule_class.name

    def build_rule(self) -> LocalRule:
        """The rule with the settings as given (before width scaling)."""
        return make_rule(self.rule_class, self.rule_settings, self.loss_name)

    def width_factory(self) -> NetworkFactory | None:
        """``width -> network`` for base shapes under muP (override in a subclass that builds
        its network with ``make_net(width)``: ``return make_net``). ``None`` by default."""
        return None

    def network_for_rule(self) -> nn.Module:
        """The user's network: ``self.network``, else the only public child with parameters
        that is not a metric. Override it when a subclass keeps several (``return self.net``).
        """
        network = self.__dict__["_modules"].get("network")
        if network is not None:
            return network
        children = [
            (name, child)
            for name, child in self.named_children()
            if not name.startswith("_")
            and not isinstance(child, Metric)
            and next(child.parameters(), None) is not None
        ]
        if len(children) == 1:
            return children[0][1]
        if not children:
            raise UnsupportedNetworkError(
                f"{type(self).__name__} has no network yet. Fix: pass network=... to the "
                "constructor, or assign it (self.net = ...) after super().__init__(...); the "
                "rule (and TP's feedback) is built from it at setup, so do not use self.rule "
                "inside __init__ before the network exists."
            )
        names = [name for name, _ in children]
        raise UnsupportedNetworkError(
            f"{type(self).__name__} has {len(children)} candidate networks {names}. Fix: pass "
            "network=... to the constructor, assign it to self.network, or override "
            "network_for_rule() to return the module the rule should train."
        )

    @property
    def local_run(self) -> WiredRun:
        """The wired run (network as the rule trains it, rule, parametrization)."""
        self.apply_parametrization()
        return self.__dict__["_local_run"]

    @property
    def rule(self) -> LocalRule:
        """The rule as it trains: with the parametrization's width scaling (PC's gamma_L)."""
        return self.local_run.rule

    @property
    def trained_network(self) -> nn.Module:
        """The module the rule trains (the network; for TP with its feedback maps)."""
        return self.local_run.network

    def parametrized_modules(self) -> list[nn.Module]:
        """Every network whose parameters get base shapes, the init rescale and an optimizer."""
        return [self.trained_network]

    def apply_parametrization(self) -> None:
        """Wire the run once on the current network (idempotent; again only when the network
        object was replaced). Call it at the end of a subclass's ``__init__`` to wire at
        construction time (otherwise ``setup`` does).

        Raises:
            MissingBaseShapesError: muP on a network without base shapes, ``.bsh`` file,
                width factory or width builder.
        """
        network = self.network_for_rule()
        if self.__dict__["_local_run"] is not None and self.__dict__["_local_source"] is network:
            return
        self._wire(network, register=False)

    def _wire(self, network: nn.Module, *, register: bool) -> None:
        settings = self.training_settings
        run = wire(
            network,
            self.build_rule(),
            self.parametrization,
            optimizer=settings.optimizer,
            base_width=settings.base_width,
            base_shapes=settings.base_shapes,
            width_factory=self.width_factory(),
            input_shape=getattr(self.extra_settings, "input_shape", None),
        )
        if register:  # the wrapped network, as the rule trains it (TP: with feedback)
            self.network = run.network
        elif run.network is not network:  # subclass style: register only what the rule added
            extra = {
                name: child for name, child in run.network.named_children() if child is not network
            }
            self._lightning_local_extra = nn.ModuleDict(extra)
        if settings.compile_inference:
            run.rule.compile_inference(backend=settings.compile_backend)
        self.__dict__["_local_run"] = run
        self.__dict__["_local_source"] = self.network_for_rule()
        self._build_accuracy(run.network)

    def _build_accuracy(self, network: nn.Module) -> None:
        classes = output_width(as_blocks(network))
        if classes is None or classes < 2:
            self._ll_val_acc = self._ll_test_acc = None
            return
        device = next(network.parameters(), torch.empty(0)).device
        self._ll_val_acc = MulticlassAccuracy(num_classes=classes, average="micro").to(device)
        self._ll_test_acc = MulticlassAccuracy(num_classes=classes, average="micro").to(device)

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
        with checkpoint_errors(checkpoint_path), _loading(checkpoint_path):
            try:
                return super().load_from_checkpoint(
                    checkpoint_path,
                    map_location=map_location,
                    hparams_file=hparams_file,
                    strict=strict,
                    weights_only=weights_only,
                    **kwargs,
                )
            except LocalLearningError as error:
                writer = _checkpoint_module(checkpoint_path)
                if writer is None or writer == f"{cls.__module__}.{cls.__qualname__}":
                    raise
                raise CheckpointError(
                    f"checkpoint '{checkpoint_path}' was written by {writer}, not by "
                    f"{cls.__qualname__} ({error}). Fix: load it with "
                    f"{writer.rsplit('.', 1)[-1]}.load_from_checkpoint(path)."
                ) from error

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load in place after the run is wired (so it never rescales loaded weights); with
        ``assign=True`` the base shapes are carried over to the new tensors. Keys of 0.1.0's
        duplicate ``_wired.*`` copy are dropped."""
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_wired.")}
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

    def run_identity(self) -> dict[str, Any]:
        """The run's muP identity, stored in every checkpoint and checked on load and resume:
        module class, rule settings as trained (PC's ``gamma_L``), parametrization, optimizer
        row, base width and base shapes (:mod:`lightning_local.modules.resume`)."""
        settings = self.training_settings
        return run_identity(
            type(self), self.rule.hparams(), self.parametrization.hparams(),
            settings.optimizer, settings.base_width, self.trained_network,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the run's identity, the random state and the step's bookkeeping (the
        gradients of an unfinished accumulation window, the skipped-batch count, the epoch's
        running training loss), so that a resumed run continues exactly."""
        state: dict[str, Any] = {
            "identity": self.run_identity(),
            "random_state": random_state(),
            "lr": self.training_settings.lr,
            "skipped_batches": self.__dict__.get("_local_skipped", 0),
            "epochs_ended": self.__dict__.get("_local_epochs_ended", 0),
        }
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        if state["epochs_ended"] == epoch:  # mid-epoch: its running loss is part of the state
            state["train_loss"] = {
                name: value.detach().clone()
                for name, value in self._ll_train_loss.metric_state.items()
            }
            state["train_loss_updates"] = self._ll_train_loss._update_count
        if self.__dict__.get("_local_pending", 0):
            state["accumulated_gradients"] = {
                name: p.grad.detach().clone()
                for name, p in self.trained_network.named_parameters() if p.grad is not None
            }
        checkpoint["lightning_local"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another run (:meth:`run_identity`); when the Trainer resumes
        from it, keep its random state and bookkeeping for the first training batch.

        Raises:
            CheckpointError: the checkpoint's identity differs from this module's; the message
                names each value in both.
        """
        state = checkpoint.get("lightning_local")
        if state is None:  # written by 0.1.0
            return
        trainer = self._trainer
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        check_identity(state.get("identity"), self.run_identity(), path or _LOADING.get())
        if trainer is not None and trainer.state.fn == "fit":
            self.__dict__["_local_resume"] = state

    def _continue_resumed_run(self, state: Mapping[str, Any]) -> None:
        """Put back what the checkpoint kept for the next batch (see :meth:`on_save_checkpoint`);
        a learning rate changed since the checkpoint scales every group's rate by new/old."""
        restore_random_state(state["random_state"])
        self.__dict__["_local_skipped"] = state.get("skipped_batches", 0)
        epoch = self.trainer.current_epoch if self._trainer is not None else 0
        if state.get("epochs_ended", epoch) < epoch:
            # written after an epoch's last batch, before its end: Lightning resumes with the
            # next epoch and skips that end, so do the rule's part of it (epoch schedulers)
            self._step_schedulers("epoch", epoch=epoch - 1)
        else:  # mid-epoch: the epoch's running training loss goes on
            metric = self._ll_train_loss
            for name, value in state.get("train_loss", {}).items():
                setattr(metric, name, value.to(metric.device))
            metric._update_count = state.get("train_loss_updates", 0)
            metric._computed = None
        self.__dict__["_local_epochs_ended"] = epoch
        parameters = dict(self.trained_network.named_parameters())
        for name, gradient in state.get("accumulated_gradients", {}).items():
            parameters[name].grad = gradient.to(parameters[name].device)
        saved_lr, lr = state.get("lr"), self.training_settings.lr
        if saved_lr is not None and saved_lr != lr and self._trainer is not None:
            ratio = lr / saved_lr
            for optimizer in self.trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= ratio
                    if "initial_lr" in group:
                        group["initial_lr"] *= ratio
            for config in self.trainer.lr_scheduler_configs:
                if hasattr(config.scheduler, "base_lrs"):
                    config.scheduler.base_lrs = [rate * ratio for rate in config.scheduler.base_lrs]
            rank_zero_warn(
                f"resuming with lr={lr:g} where the checkpoint trained with lr={saved_lr:g}: "
                f"every parameter group's learning rate is scaled by {ratio:g} (muP's per-role "
                "ratios are kept)."
            )

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

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        """Wire the run before the optimizer and any DDP wrapper exist, and give the Trainer
        atomic, validated checkpoints (unless it has a checkpoint IO of the user's own).

        Raises:
            LocalLearningError: under a sharding strategy (FSDP, DeepSpeed), which loses the
                base shapes and gathers weights on every inference step.
        """
        if self._trainer is not None:
            check_supported_strategy(self._trainer.strategy)
            install_atomic_checkpoints(self._trainer.strategy)  # before any save or resume
        self.apply_parametrization()
        self.rule.process_layout = process_layout(self._trainer)  # ranks, for global decisions
        self._compile_inference_instead_of_training_step()

    def _compile_inference_instead_of_training_step(self) -> None:
        """``trainer.fit(torch.compile(module))``: Lightning compiles ``training_step`` whole,
        where the rule's host decisions (tolerance, finiteness) break the graph and every
        per-layer metric name recompiles it. Keep ``training_step`` as written and compile the
        rule's inference step instead, with the same backend."""
        context = self.__dict__.get("_compiler_ctx")
        if not (isinstance(context, dict) and "original_training_step" in context):
            return
        self.training_step = context["original_training_step"]  # type: ignore[method-assign]
        backend = _dynamo_backend(context.get("dynamo_ctx"))
        self.rule.compile_inference(backend=backend or self.training_settings.compile_backend)
        rank_zero_info(
            f"{type(self).__name__} under torch.compile: training_step runs as written and the "
            "rule's inference step is compiled (the same as compile_inference=True)."
        )

    def configure_callbacks(self) -> list[L.Callback]:
        """No callbacks of the module's own; refuses the Trainer flags that the manual
        optimization every rule needs cannot take (Lightning checks them right after this
        hook, with advice that does not apply here).

        Raises:
            LocalLearningError: ``Trainer(accumulate_grad_batches=k > 1)`` or
                ``Trainer(gradient_clip_val=...)``, naming the module setting that does it.
        """
        trainer = self._trainer
        if trainer is None:
            return []
        flags = {
            "accumulate_grad_batches": trainer.accumulate_grad_batches
            if trainer.accumulate_grad_batches != 1 else None,
            "gradient_clip_val": trainer.gradient_clip_val or None,
        }
        for name, value in flags.items():
            if value is not None:
                raise LocalLearningError(
                    f"Trainer({name}={value}) does not apply here: every rule runs its own "
                    f"step (manual optimization), for which Lightning refuses this flag. Fix: "
                    f"remove it from the Trainer and pass {name}={value} to "
                    f"{type(self).__name__} (with gradient_clip_algorithm='norm' or 'value' "
                    "for clipping); the module does it for every rule."
                )
        return []

    def on_train_start(self) -> None:
        """Refuse an optimizer that is not the run's (a kept ``configure_optimizers``, a CLI
        ``--optimizer``): under muP it lacks the per-role learning rates."""
        if self._trainer is not None:
            check_weight_averaging(self.trainer, self.parametrization.requires_base_shapes)
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if len(optimizers) != 1:
            raise LocalLearningError(
                f"{type(self).__name__} trains with one optimizer, got {len(optimizers)}. Fix: "
                "return one optimizer from configure_optimizers (or delete it)."
            )
        groups = optimizers[0].param_groups
        held = {id(p) for group in groups for p in group["params"]}
        missing = [p for p in self.trained_network.parameters() if p.requires_grad
                   and id(p) not in held]
        if missing:
            raise LocalLearningError(
                f"the optimizer does not hold {len(missing)} of the rule's parameters. Fix: "
                "delete your configure_optimizers (the library builds the optimizer), or build "
                "it with self.local_run.build_optimizer(lr, momentum, weight_decay)."
            )
        if self.parametrization.requires_base_shapes and not all("role" in g for g in groups):
            raise LocalLearningError(
                "under muP the optimizer needs the per-role learning rates lr * m^-c of the "
                "parametrization, but its parameter groups carry no 'role' (a configure_optimizers "
                "of your own, or LightningCLI's --optimizer, replaced them: the run would be SP). "
                "Fix: delete configure_optimizers and set the optimizer with the module's "
                "settings (optimizer='adam', lr=..., momentum=..., weight_decay=...), or build "
                "it with self.local_run.make_optimizer(torch.optim.Adam, lr=..., ...)."
            )

    def forward(self, x: Tensor) -> Tensor:
        """The network's forward pass ``f(x)``."""
        return self.network_for_rule()(x)

    def adapt_optimizers(self, configured: Any) -> Any:
        """What a ``configure_optimizers`` of a subclass returned, with its optimizer rebuilt
        over muP's per-role groups when it has none (``torch.optim.Adam(self.parameters(),
        lr=1e-3)`` becomes muP's Adam with ``eta' = 1e-3``). Under SP it is returned as is.

        Raises:
            LocalLearningError: a scheduler built on an optimizer without the groups (it
                would hold the wrong groups; build the optimizer with
                ``self.local_run.make_optimizer``), or an optimizer the tables do not cover.
        """
        if not self.parametrization.requires_base_shapes:
            return configured
        run = self.local_run
        if isinstance(configured, torch.optim.Optimizer):
            return run.adapt_optimizer(configured)
        if isinstance(configured, Mapping) and isinstance(
            configured.get("optimizer"), torch.optim.Optimizer
        ):
            optimizer = configured["optimizer"]
            if all("role" in g for g in optimizer.param_groups):
                return configured
            if configured.get("lr_scheduler") is not None:
                raise LocalLearningError(
                    "configure_optimizers returned a scheduler over an optimizer without muP's "
                    "per-role groups. Fix: build the optimizer with "
                    "self.local_run.make_optimizer(torch.optim.Adam, lr=..., ...) and the "
                    "scheduler on it."
                )
            return {**configured, "optimizer": run.adapt_optimizer(optimizer)}
        if isinstance(configured, (list, tuple)) and len(configured) == 1 and isinstance(
            configured[0], torch.optim.Optimizer
        ):
            return [run.adapt_optimizer(configured[0])]
        return configured  # other forms: on_train_start checks the groups

    def configure_optimizers(self) -> OptimizerLRScheduler:
        """A plain ``torch.optim`` optimizer with the parametrization's per-role groups."""
        settings = self.training_settings
        return self.local_run.build_optimizer(
            settings.lr, settings.momentum, settings.weight_decay
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """``zero_grad -> rule.training_loss -> manual_backward(surrogate / k) -> [clip] ->
        step``, the step every ``k = accumulate_grad_batches`` batches.

        With ``k > 1`` the gradients of ``k`` micro-batches add up (each surrogate divided by
        ``k``, so ``k`` batches of ``B`` give one batch of ``kB``'s mean for backprop and PC
        SI+FPA); under DDP the all-reduce runs only on the ``k``-th. The last group of an
        epoch steps even when shorter. ``gradient_clip_val`` clips through Lightning's
        ``clip_gradients``, at the unscaled gradients' threshold under 16-bit mixed precision's
        loss scaler (whose own skip of an overflowed step replaces the non-finite check).
        """
        inputs, targets = self._split_batch(batch)
        settings = self.training_settings
        k = settings.accumulate_grad_batches
        optimizer = self.optimizers()
        first = batch_idx % k == 0
        last = (batch_idx + 1) % k == 0 or self._last_batch_of_epoch()
        if first:
            optimizer.zero_grad(set_to_none=True)
        self.__dict__["_local_pending"] = 0 if last else batch_idx % k + 1  # for checkpoints
        rule = self.rule
        self.__dict__["_local_stepped"] = True
        try:
            result = rule.training_loss(self.trained_network, inputs, targets)
        except NonFiniteEnergyError as error:  # the rule's message says nothing was applied
            return self._skip_or_raise(f"{error}", optimizer, explained=True)
        with self._backward_sync(enabled=last), rule.backward_precision(inputs):
            self.manual_backward(result.surrogate if k == 1 else result.surrogate / k)
        if last:
            scaler = self._loss_scaler()
            gradients = [(name, p.grad) for name, p in self.trained_network.named_parameters()
                         if p.grad is not None]
            diverged = _first_diverged(gradients)
            bad = diverged[0] if diverged is not None else None
            if bad is not None and scaler is None:
                return self._skip_or_raise(
                    f"the gradient of {bad} is not finite.{self._lr_hint(bad)}", optimizer
                )
            # Under a GradScaler the gradients are still multiplied by its scale s here (the
            # precision plugin unscales them inside optimizer.step, after this point), and a
            # non-finite one is an overflow of the scaled backward pass: the scaler skips the
            # step and lowers s. Clipping s * g at s * c is clipping g at c (norm and value);
            # an overflowed step is not clipped, so the scaler still sees its infinities.
            if settings.gradient_clip_val is not None and bad is None:
                scale = 1.0 if scaler is None else scaler.get_scale()
                self.clip_gradients(
                    optimizer, gradient_clip_val=settings.gradient_clip_val * scale,
                    gradient_clip_algorithm=settings.gradient_clip_algorithm,
                )
            optimizer.step()
            limit = settings.max_weight_magnitude
            diverged = _first_diverged(list(self.trained_network.named_parameters()), limit)
            if diverged is not None:  # before this step's checkpoint: nothing reaches disk
                name, magnitude = diverged
                state = ("is not finite" if not math.isfinite(magnitude) else
                         f"has an entry of magnitude {magnitude:.3g} > max_weight_magnitude="
                         f"{limit:g}")
                raise NonFiniteEnergyError(  # global_step already counts this step
                    f"step {self._step_number() - 1}: after the update the weight {name} "
                    f"{state}: training diverged.{self._lr_hint(name)} The error stops "
                    "training before this step's checkpoint is written: resume from the last "
                    "checkpoint with a lower learning rate."
                )
            self._step_schedulers("step")
        self._log_training(result, inputs.shape[0])
        return result.loss

    def _loss_scaler(self) -> torch.amp.GradScaler | None:
        """The Trainer's enabled loss scaler (``precision="16-mixed"``), else ``None``: the
        gradients after ``manual_backward`` are multiplied by its scale until
        ``optimizer.step()`` unscales them."""
        trainer = self._trainer
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _step_number(self) -> int:
        return (self._trainer.global_step + 1) if self._trainer is not None else 0

    def _lr_hint(self, name: str) -> str:
        """`` Its learning rate is ... at width multiplier m ...`` for parameter ``name``."""
        parameter = dict(self.trained_network.named_parameters()).get(name)
        for group in self.optimizers().param_groups if self._trainer is not None else []:
            if any(p is parameter for p in group["params"]):
                return (
                    f" Its learning rate is {group['lr']:.3g} (role "
                    f"{group.get('role', '?')}, width multiplier "
                    f"{group.get('width_mult', 1.0):g}): lower lr."
                )
        return " Lower the learning rate."

    def _skip_or_raise(
        self, message: str, optimizer: Any, explained: bool = False
    ) -> Tensor | None:
        """Skip the batch (``skip_nonfinite_batches``) or raise with the step number."""
        if not self.training_settings.skip_nonfinite_batches:
            applied = "" if explained else " Nothing was applied to the weights."
            raise NonFiniteEnergyError(
                f"step {self._step_number()}: {message}{applied} Or set "
                "skip_nonfinite_batches=True to skip such batches."
            )
        optimizer.zero_grad(set_to_none=True)
        skipped = self.__dict__.get("_local_skipped", 0) + 1
        self.__dict__["_local_skipped"] = skipped
        self.log("train/skipped_batches", float(skipped), on_step=True, on_epoch=False)
        return None

    def _last_batch_of_epoch(self) -> bool:
        trainer = self._trainer
        return bool(trainer is not None and trainer.is_last_batch)

    def _backward_sync(self, enabled: bool) -> Any:
        """``nullcontext()``, or DDP's ``no_sync`` while accumulating (no all-reduce)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if enabled or strategy is None or not hasattr(strategy, "block_backward_sync"):
            return nullcontext()
        return strategy.block_backward_sync()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.__dict__["_local_stepped"] = False
        resumed = self.__dict__.pop("_local_resume", None)
        if resumed is not None:
            self._continue_resumed_run(resumed)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Refuse a ``training_step`` of the user's that does not run the rule."""
        if not self.__dict__.get("_local_stepped", True):
            raise LocalLearningError(
                f"{type(self).__name__}.training_step did not run the rule, so nothing was "
                "trained. Fix: delete your training_step (the rule's runs the step), or call "
                "super().training_step(batch, batch_idx) from it."
            )

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch")
        self.__dict__["_local_epochs_ended"] = self.trainer.current_epoch + 1

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self._ll_val_loss, self._ll_val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self._ll_test_loss, self._ll_test_acc)

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
        """Per-step loss and scalar rule metrics; per-layer ones (``name/layer_i``) on the
        Trainer's logging steps only (``log_every_n_steps``: what a logger receives anyway,
        at a fraction of the cost); the epoch's mean loss."""
        self.log("train/loss", result.loss, prog_bar=True, batch_size=batch_size)
        self._ll_train_loss.update(result.loss)
        self.log("train/loss_epoch", self._ll_train_loss, on_step=False, on_epoch=True)
        per_layer = self._logging_step()
        for name, value in result.metrics.items():
            value = value.detach()
            if value.dim() and not per_layer:
                continue
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

    def _logging_step(self) -> bool:
        """Whether the Trainer hands this step's logs to its loggers."""
        trainer = self._trainer
        if trainer is None:
            return True
        connector = getattr(trainer, "_logger_connector", None)
        should = getattr(connector, "should_update_logs", None)
        return True if should is None else bool(should)

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

    def _step_schedulers(self, interval: str, epoch: int | None = None) -> None:
        """Step the schedulers of ``configure_optimizers`` (manual optimization does not) at the
        end of a step, or of the epoch ``epoch`` (default: the current one)."""
        trainer = self._trainer
        if trainer is None:
            return
        epoch = trainer.current_epoch if epoch is None else epoch
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            count = trainer.global_step if interval == "step" else epoch + 1
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


LocalLearningModule.__init__.__signature__ = _signature(LocalLearningModule)  # type: ignore[attr-defined]
