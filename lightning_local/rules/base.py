"""What every rule shares: the step result, the rule interface, and the local-loss surrogate.

A rule turns a batch into a scalar *surrogate* whose gradient with respect to the network's
parameters is the rule's weight gradient (a batch mean). One ``surrogate.backward()`` (one
``manual_backward`` in Lightning) therefore yields the update, and under DDP it is one
bucketed all-reduce per training step, whatever the rule does inside inference.

The ladder, as in jpc: ``energy -> state grads -> updates -> step``.
:meth:`LocalRule.training_loss` runs inference and returns the surrogate;
:meth:`LocalRule.step` zeroes gradients, back-propagates the surrogate and steps the optimizer.

Each rule declares its settings once, as the fields of a frozen dataclass
(:class:`RuleSettings` subclass, the rule's ``Settings``). Everything else derives from that
declaration: the rule's keyword arguments and attributes, :meth:`LocalRule.hparams`, the
Lightning modules' signatures (and so ``LightningCLI`` and checkpoint hyperparameters), the
sweep's rule variants and run keys. Rules register themselves by ``name`` in :data:`RULES`.

Under data parallelism each rule sees its process's share of the global batch and, where its
computation before the surrogate needs the global batch, reads :attr:`LocalRule.process_layout`
(a :class:`ProcessLayout`: this process's rank, the number of processes and the sum over
them; one process by default).

Host synchronizations: a step's checks (labels in range, a finite surrogate and energies) are
boolean tensors gathered in a :class:`StepChecks` and read from the device once per step, at
the end of :meth:`LocalRule.rule_loss`, before anything touches the weights. Labels are turned
into the float target matrix once per batch; inference itself reads nothing from the device
(PC's tolerance schedule excepted: its stop is a host decision on the energy of each step).
:meth:`LocalRule.compile_inference` compiles a rule's inference step with ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

# ``rms`` lives in diagnostics.measures; re-exported here for ``from ...rules.base import rms``
from lightning_local.diagnostics.measures import rms  # noqa: F401
from lightning_local.errors import LocalLearningError, NonFiniteEnergyError
from lightning_local.losses import LossName, OutputLoss, get_loss
from lightning_local.network import as_blocks, feedforward
from lightning_local.rules._compile import CompileRequest, own_method

if TYPE_CHECKING:
    from typing_extensions import Self

    from lightning_local.parametrization import Parametrization

__all__ = [
    "RULES",
    "LocalRule",
    "ProcessLayout",
    "RuleSettings",
    "StepChecks",
    "StepResult",
    "check_batch",
    "check_finite",
    "full_precision",
    "local_loss",
    "local_losses",
    "setting",
]


@dataclass
class StepResult:
    """What one training step of a rule produced.

    Attributes:
        loss: output loss at the feedforward prediction, batch mean (detached).
        surrogate: scalar whose gradient w.r.t. the parameters is the rule's weight gradient.
        output: feedforward network output ``f`` (detached), for metrics.
        metrics: detached diagnostics (scalars, or 1-d tensors with one entry per layer).
    """

    loss: Tensor
    surrogate: Tensor
    output: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def full_precision(reference: Tensor) -> torch.autocast:
    """Autocast switched off on ``reference``'s device: inside, operations run in the tensors'
    own dtype, fp32 under mixed precision (the parameters stay fp32 there). The rules run
    inference (PC states, errors, energies; TP targets and feedback fits) inside it, and the
    weight update's forward pass outside, in the precision the caller asked for."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


_RESAMPLING = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


def check_batch(
    network: nn.Module, inputs: Tensor, targets: Tensor, *, local: bool = True
) -> None:
    """Refuse a batch or network the rule would train on silently wrongly, naming the fix.

    Checks: tensors with one row per sample and equal batch sizes; a non-empty batch; inputs
    in the weights' dtype (integers only into an ``nn.Embedding``); for a first block that is
    (or starts with) an ``nn.Linear``, inputs of shape ``(batch, in_features)``. For a local
    rule (``local``) also no Dropout or BatchNorm in training mode: the rule runs each block
    several times per step (inference, targets, the update), so each call would draw a new
    dropout mask or update the running statistics again.

    Raises:
        ShapeMismatchError: for shapes; LocalLearningError for the rest.
    """
    from lightning_local.errors import ShapeMismatchError, UnsupportedNetworkError

    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise LocalLearningError(
            f"inputs and targets must be tensors, got {type(inputs).__name__} and "
            f"{type(targets).__name__}. Fix: make the data loader yield (x, y) tensors."
        )
    if inputs.dim() < 2:
        raise ShapeMismatchError(
            f"inputs of shape {tuple(inputs.shape)} have no batch dimension. Fix: pass "
            "(batch, features...), e.g. x.unsqueeze(0) for one sample."
        )
    if inputs.shape[0] == 0:
        raise LocalLearningError("the batch is empty. Fix: check the data set and loader.")
    if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
        raise ShapeMismatchError(
            f"{inputs.shape[0]} inputs but targets of shape {tuple(targets.shape)}. Fix: one "
            "target per sample (labels of shape (batch,), or (batch, outputs))."
        )
    first = as_blocks(network)[0]
    parameter = next(network.parameters(), None)
    layers = list(first) if isinstance(first, nn.Sequential) else [first]
    embeds = any(isinstance(m, nn.Embedding) for m in first.modules())
    if not torch.is_floating_point(inputs) and not embeds:
        raise LocalLearningError(
            f"inputs are {inputs.dtype}, but the network takes floating-point inputs. Fix: "
            "x.float()."
        )
    if parameter is not None and torch.is_floating_point(inputs) and not embeds and (
        inputs.dtype != parameter.dtype
    ):
        raise LocalLearningError(
            f"inputs are {inputs.dtype} but the network's weights are {parameter.dtype}. Fix: "
            f"convert the inputs (x.to({parameter.dtype})) or the network."
        )
    head = layers[0]
    if isinstance(head, nn.Linear) and (inputs.dim() != 2 or inputs.shape[1] != head.in_features):
        raise ShapeMismatchError(
            f"inputs of shape {tuple(inputs.shape)}, but the first layer takes (batch, "
            f"{head.in_features}). Fix: flatten the inputs (x.flatten(1)) or build the network "
            f"for {inputs[0].numel()} input features."
        )
    if local:
        for module in network.modules():
            if isinstance(module, _RESAMPLING) and module.training:
                raise UnsupportedNetworkError(
                    f"{type(module).__name__} in training mode under a local rule: the rule runs "
                    "each block several times per step, and each run would draw a new dropout "
                    "mask or update the running statistics again. Fix: remove it, or put it in "
                    "eval mode (module.eval()) so it is a fixed function during training."
                )


def _non_finite(what: str) -> NonFiniteEnergyError:
    return NonFiniteEnergyError(
        f"{what} is not finite. The step diverged: lower the learning rate or the inference "
        "step size, or check the inputs for NaN/inf. Nothing was applied to the weights."
    )


def check_finite(value: Tensor, what: str) -> Tensor:
    """Raise :class:`NonFiniteEnergyError` when ``value`` holds NaN or infinity (one host
    read; a training step gathers its checks in a :class:`StepChecks` instead)."""
    if not bool(torch.isfinite(value).all()):
        raise _non_finite(what)
    return value


class StepChecks:
    """The checks of one training step, read from the device at once.

    Each check is a boolean scalar computed on the device, ``True`` when all is well;
    :meth:`verify` stacks them and reads them with one host synchronization, then raises the
    error of the first failing check in the order they were added. An error is built only
    when its check fails, so its message may read values (e.g. the labels' range) then.
    """

    def __init__(self) -> None:
        self._checks: list[tuple[Tensor, Callable[[], Exception]]] = []

    def require(self, ok: Tensor, error: Callable[[], Exception]) -> None:
        """Check ``ok`` (a boolean scalar tensor); ``error()`` is raised if it is ``False``."""
        self._checks.append((ok, error))

    def finite(self, value: Tensor, what: str) -> Tensor:
        """Check that ``value`` holds no NaN or infinity (:class:`NonFiniteEnergyError`
        naming ``what``); returns ``value``."""
        self.require(torch.isfinite(value.detach()).all(), lambda: _non_finite(what))
        return value

    def labels(self, loss: OutputLoss, output: Tensor, targets: Tensor) -> None:
        """Check that class labels lie in ``[0, outputs)`` (``output``: the network's
        output); float targets have nothing to check."""
        ok = loss.labels_in_range(output, targets)
        if ok is not None:
            self.require(ok, lambda: _label_error(loss, output, targets))

    def verify(self) -> None:
        """Read every check (one host synchronization) and raise the first failure."""
        if not self._checks:
            return
        oks = torch.stack([ok.to(device=self._checks[0][0].device) for ok, _ in self._checks])
        for passed, (_, error) in zip(oks.tolist(), self._checks):
            if not passed:
                raise error()


def _label_error(loss: OutputLoss, output: Tensor, targets: Tensor) -> Exception:
    """The error :meth:`OutputLoss.check_labels` raises for these labels."""
    try:
        loss.check_labels(output, targets)
    except LocalLearningError as error:
        return error
    return LocalLearningError("the labels failed their range check.")  # pragma: no cover


def local_losses(
    blocks: Sequence[nn.Module],
    layer_inputs: Sequence[Tensor],
    layer_targets: Sequence[Tensor],
    layer_weights: Sequence[float],
    predictions: Sequence[Tensor | None] | None = None,
) -> list[Tensor]:
    """Weighted local losses, one per block, with detached inputs and targets.

    ``(w_l / 2B) ||tau_l - f_l(z_{l-1})||^2`` with ``z_{l-1}`` = ``layer_inputs[l]`` and
    ``tau_l`` = ``layer_targets[l]`` (both detached). Its gradient w.r.t. block ``l``'s
    parameters is ``-(w_l / B) (d f_l / d theta_l)^T (tau_l - f_l(z_{l-1}))``: the local update
    shared by predictive coding (``tau_l = x_l``, ``w_l = gamma_l``) and target propagation.
    A block whose weight is 0 is not run and contributes a zero. ``predictions[l]``, where
    given, is ``f_l(z_{l-1})`` already computed with its graph to the parameters.
    """
    batch = layer_inputs[0].shape[0]
    known = list(predictions) if predictions is not None else [None] * len(blocks)
    losses = []
    for block, z, tau, weight, prediction in zip(
        blocks, layer_inputs, layer_targets, layer_weights, known
    ):
        if weight == 0:
            losses.append(z.new_zeros(()))
            continue
        if prediction is None:
            prediction = block(z.detach())
        losses.append((weight / (2 * batch)) * (tau.detach() - prediction).pow(2).sum())
    return losses


def local_loss(
    blocks: Sequence[nn.Module],
    layer_inputs: Sequence[Tensor],
    layer_targets: Sequence[Tensor],
    layer_weights: Sequence[float],
) -> Tensor:
    """``sum_l (w_l / 2B) ||tau_l - f_l(z_{l-1})||^2``: the sum of :func:`local_losses`."""
    total = layer_inputs[0].new_zeros(())
    for term in local_losses(blocks, layer_inputs, layer_targets, layer_weights):
        total = total + term
    return total


def setting(default: Any, doc: str, *, affects_result: bool = True) -> Any:
    """A field of a :class:`RuleSettings` dataclass: its default and its one-line meaning.

    ``affects_result=False`` marks an implementation or logging choice that cannot change the
    trained weights (e.g. a fast path with bit-identical results, an extra diagnostic): it is
    a hyperparameter like the others, but not part of a sweep's run key.
    """
    return field(default=default, metadata={"doc": doc, "affects_result": affects_result})


def _plain(value: Any) -> Any:
    """JSON/YAML-friendly copy: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class RuleSettings:
    """Base of a rule's settings: a frozen dataclass whose fields are the rule's arguments.

    Subclasses validate in ``__post_init__`` and raise
    :class:`~lightning_local.errors.LocalLearningError` with the fix.
    """

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The declared settings, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def field_doc(cls, name: str) -> str:
        """The one-line meaning of setting ``name``."""
        return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("doc", "")

    @classmethod
    def build(cls, values: Mapping[str, Any] | None = None, *, owner: str = "") -> Self:
        """Settings from a mapping; unknown names raise an error listing the known ones."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            who = owner or cls.__name__
            raise LocalLearningError(
                f"{who} has no setting(s) {unknown}. Fix: use only "
                f"{list(cls.field_names()) or 'no settings'}."
            )
        return cls(**values)

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied (validated again)."""
        return type(self).build({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a plain value (tuples as lists), in declaration order."""
        return {name: _plain(getattr(self, name)) for name in self.field_names()}

    def result_dict(self) -> dict[str, Any]:
        """The settings that can change the trained weights (a sweep's run key uses these)."""
        keep = {f.name for f in dataclasses.fields(self) if f.metadata.get("affects_result", True)}
        return {k: v for k, v in self.to_dict().items() if k in keep}


@dataclass(frozen=True)
class ProcessLayout:
    """Where this process's batch sits in the global batch, and how to sum over processes.

    Under data parallelism with ``N = world_size`` processes at batch ``B`` each, the global
    batch has ``NB`` samples and process ``r = rank`` holds rows ``r, r + N, r + 2N, ..``
    of it: global sample ``p`` is row ``p // N`` of rank ``p % N``. That is the layout of
    :func:`lightning_local.distributed.global_batch_sampler` (a ``DistributedSampler`` deals
    the samples to the ranks in turn), under which ``N`` processes at ``B`` see the batches of
    one process at ``NB``.

    Attributes:
        rank: this process's index, ``0 <= rank < world_size``.
        world_size: the number of processes ``N``.
        all_reduce_sum: sums a tensor over the processes and returns the sum (in place or
            not), a collective that every process calls at the same point
            (:func:`lightning_local.distributed.sum_across_processes`); ``None`` in one
            process.
    """

    rank: int = 0
    world_size: int = 1
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        whole = all(
            isinstance(v, int) and not isinstance(v, bool) for v in (self.rank, self.world_size)
        )
        if not whole or not 0 <= self.rank < self.world_size:
            raise LocalLearningError(
                f"ProcessLayout(rank={self.rank!r}, world_size={self.world_size!r}): need "
                "whole numbers with 0 <= rank < world_size. Fix: e.g. "
                "lightning_local.distributed.process_layout(trainer)."
            )
        if self.world_size > 1 and self.all_reduce_sum is None:
            raise LocalLearningError(
                f"ProcessLayout with world_size={self.world_size} has no all_reduce_sum: the "
                "processes could not agree on global-batch quantities. Fix: pass "
                "all_reduce_sum=lightning_local.distributed.sum_across_processes."
            )

    def global_randn_like(
        self, local: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Standard normal noise for this process's rows, drawn per *global* sample.

        With ``local`` of shape ``(B, ...)`` it draws ``xi`` of shape ``(NB, ...)`` (in
        ``local``'s dtype, device and memory format) from ``generator`` (the default one if
        ``None``) and returns this rank's rows ``xi[rank::N]``. When the generator's state is
        the same on every process (``seed_everything`` with one seed), the ``N`` processes
        together hold exactly the noise one process at batch ``NB`` draws with
        ``torch.randn_like``, every process consumes the same random numbers (so the states
        stay equal), and the samples' noises are independent. In one process it is
        ``torch.randn_like(local)`` (with ``generator``). Cost: ``N`` times the random numbers
        of the local batch, on every process.
        """
        if self.world_size == 1:  # randn_like is empty_like + normal_
            if generator is None:
                return torch.randn_like(local)
            return torch.empty_like(local).normal_(generator=generator)
        shape = (local.shape[0] * self.world_size, *local.shape[1:])
        noise = torch.empty(
            shape, dtype=local.dtype, device=local.device, memory_format=_memory_format(local)
        ).normal_(generator=generator)
        return noise[self.rank::self.world_size]


def _memory_format(tensor: Tensor) -> torch.memory_format:
    """The dense memory format ``torch.randn_like`` gives ``tensor``'s noise (its own, for
    channels-last images; contiguous otherwise)."""
    if not tensor.is_contiguous():
        for fmt, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if tensor.dim() == dim and tensor.is_contiguous(memory_format=fmt):
                return fmt
    return torch.contiguous_format


RULES: dict[str, type[LocalRule]] = {}
"""Registered rules by ``name`` (``"bp"``, ``"pc"``, ``"tp"``); a subclass that sets ``name``
registers itself."""


class LocalRule(ABC):
    """A learning rule on a layered network, in plain PyTorch.

    Subclasses implement :meth:`rule_loss` and declare their settings as a
    :class:`RuleSettings` dataclass ``Settings``; the constructor takes the output loss and
    the settings as keyword arguments (``PredictiveCoding("mse", inference_steps=8)``) or as a
    ``settings=`` object, and each setting reads as an attribute (``rule.inference_steps``).
    Assigning a setting attribute replaces (and validates) the settings. ``name`` is the key
    of the parametrization tables and of :data:`RULES` (``"bp"``, ``"pc"``, ``"tp"``).

    Attributes:
        process_layout: this process's place among data-parallel processes
            (:class:`ProcessLayout`; one process by default). The Lightning modules set it
            at setup (:func:`lightning_local.distributed.process_layout`); without Lightning,
            assign it in every process. Rules use it only for what must be computed on the
            global batch before the surrogate: PC's tolerance stop, TP's ridge Gram sums,
            feedback-step gradients and noise.
        all_reduce_sum: ``process_layout.all_reduce_sum``; assigning it replaces the sum and
            keeps the rank and world size.
    """

    name: str = "rule"
    Settings: ClassVar[type[RuleSettings]] = RuleSettings
    inference_method: ClassVar[str | None] = None
    """The name of the method that is the rule's inference step, the part of a training step
    :meth:`compile_inference` compiles (``None``: the rule has no inference, as backprop)."""
    full_precision_update: ClassVar[bool] = False
    """Whether the surrogate's backward pass must also run outside autocast (the local rules:
    their updates are products of small errors; CPU autograd runs the backward pass in the
    caller's thread, under its autocast). Backprop follows the caller's precision."""
    settings: RuleSettings
    process_layout: ProcessLayout = ProcessLayout()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            RULES[cls.name] = cls

    def __init__(
        self,
        loss: LossName | OutputLoss = "mse",
        settings: RuleSettings | None = None,
        **values: Any,
    ) -> None:
        self.loss = get_loss(loss)
        if settings is None:
            settings = self.Settings.build(values, owner=type(self).__name__)
        elif not isinstance(settings, self.Settings):
            raise LocalLearningError(
                f"{type(self).__name__} takes {self.Settings.__name__}, got "
                f"{type(settings).__name__}. Fix: pass {self.Settings.__name__}(...) or keywords."
            )
        elif values:
            settings = settings.replace(**values)
        self.__dict__["settings"] = settings

    def __getattr__(self, name: str) -> Any:
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings.__dataclass_fields__:
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        settings = self.__dict__.get("settings")
        if settings is not None and name in settings.__dataclass_fields__:
            self.__dict__["settings"] = settings.replace(**{name: value})
            return
        super().__setattr__(name, value)

    @property
    def all_reduce_sum(self) -> Callable[[Tensor], Tensor] | None:
        """The sum over processes of :attr:`process_layout` (``None`` in one process)."""
        return self.process_layout.all_reduce_sum

    @all_reduce_sum.setter
    def all_reduce_sum(self, value: Callable[[Tensor], Tensor] | None) -> None:
        self.process_layout = dataclasses.replace(self.process_layout, all_reduce_sum=value)

    def with_settings(self, **changes: Any) -> Self:
        """A fresh rule of the same class and loss with ``changes`` to its settings (and the
        same :meth:`compile_inference` request, if any)."""
        rule = type(self)(self.loss, self.settings.replace(**changes))
        request = self.__dict__.get("_compile_request")
        if request is not None:
            rule.compile_inference(request.backend, **request.options)
        return rule

    # ------------------------------------------------------------ compilation
    def compile_inference(
        self, backend: str | Callable[..., Any] = "inductor", **options: Any
    ) -> Self:
        """Compile the rule's inference step (:attr:`inference_method`) in place; returns self.

        ``torch.compile(step, backend=backend, **options)``, made at the step's first call.
        The compiled step computes what the step as written computes (same operations, up to
        the backend's floating-point reordering and fusion); a rule without inference
        (backprop) is left as it is, and :attr:`inference_compiled` stays ``False``.
        Idempotent: calling it again with the same arguments changes nothing; with others it
        replaces the compiled step (never compiling a compiled one). The rule compiles its
        own copy of the step, so rules do not share compiled graphs or the recompile limit
        (see :mod:`lightning_local.rules._compile`).

        Args:
            backend: ``"inductor"`` (fused kernels; needs a C++ compiler on CPU),
                ``"aot_eager"`` or ``"eager"`` (graph capture only), or a compiler callable.
            options: further ``torch.compile`` keywords (``mode``, ``dynamic``, ...).
        """
        if self.inference_method is None:
            return self
        request = CompileRequest(backend, dict(options))
        if self.__dict__.get("_compile_request") != request:
            self.__dict__["_compile_request"] = request
            self.__dict__.pop("_compiled_steps", None)
        return self

    @property
    def inference_compiled(self) -> bool:
        """Whether :meth:`compile_inference` compiled the inference step."""
        return self.__dict__.get("_compile_request") is not None

    def _inference_step(self, name: str | None = None) -> Callable[..., Any]:
        """The bound method ``name`` (by default :attr:`inference_method`): compiled after
        :meth:`compile_inference`, else as written. A step with host decisions inside (PC's
        tolerance stop) runs its loop as written and compiles the parts between them by name."""
        name = name or self.inference_method
        if name is None:
            raise LocalLearningError(f"{type(self).__name__} has no inference step.")
        request: CompileRequest | None = self.__dict__.get("_compile_request")
        if request is None:
            return getattr(self, name)
        compiled = self.__dict__.setdefault("_compiled_steps", {})
        if name not in compiled:
            compiled[name] = request.compile(own_method(getattr(self, name)))
        return compiled[name]

    def __getstate__(self) -> dict[str, Any]:
        # the compiled step is bound to this object: a copy compiles its own
        state = dict(self.__dict__)
        state.pop("_compiled_steps", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------ wiring hooks
    def prepare_network(
        self, network: nn.Module, input_shape: Sequence[int] | None = None
    ) -> nn.Module:
        """The module this rule trains, made from the user's network (itself by default;
        target propagation adds feedback maps)."""
        return network

    def width_scaled(
        self, parametrization: Parametrization, network: nn.Module | Sequence[nn.Module]
    ) -> LocalRule:
        """This rule with the settings the parametrization scales with width (itself by
        default; predictive coding scales its output weight ``gamma_L``)."""
        return self

    def training_loss(self, network: nn.Module, inputs: Tensor, targets: Tensor) -> StepResult:
        """Run the rule on a batch; return the surrogate whose gradient is the update.

        Checks the batch and network first (:func:`check_batch`); a rule with
        :attr:`full_precision_update` runs outside autocast (:func:`full_precision`): its
        updates are products of small local errors, differences of order-1 values that bf16
        would round away (docs/math.md §6).
        """
        check_batch(network, inputs, targets, local=self.full_precision_update)
        if not self.full_precision_update:
            return self.rule_loss(network, inputs, targets)
        with full_precision(inputs):
            return self.rule_loss(network, inputs, targets)

    @abstractmethod
    def rule_loss(self, network: nn.Module, inputs: Tensor, targets: Tensor) -> StepResult:
        """The rule's own computation for :meth:`training_loss` (which checks the batch and
        sets the precision first): inference, targets, the surrogate and its metrics.

        It reads the device once, for its :class:`StepChecks`, before returning."""

    def step(
        self,
        network: nn.Module,
        inputs: Tensor,
        targets: Tensor,
        optimizer: torch.optim.Optimizer,
    ) -> StepResult:
        """One training step without Lightning: zero grads, surrogate backward, optimizer step."""
        optimizer.zero_grad(set_to_none=True)
        result = self.training_loss(network, inputs, targets)
        with self.backward_precision(inputs):
            result.surrogate.backward()
        optimizer.step()
        return result

    def backward_precision(self, reference: Tensor) -> Any:
        """The context the surrogate's backward pass runs in: :func:`full_precision` for a
        rule with :attr:`full_precision_update`, else the caller's (a no-op context)."""
        return full_precision(reference) if self.full_precision_update else nullcontext()

    @torch.no_grad()
    def predict(self, network: nn.Module, inputs: Tensor) -> Tensor:
        """The feedforward output ``f(x)`` (all rules predict with the forward pass)."""
        return feedforward(as_blocks(network), inputs)[-1]

    def hparams(self) -> dict[str, object]:
        """The rule's name, loss and every setting, as plain values (logging and configs)."""
        return {"rule": self.name, "loss": self.loss.name, **self.settings.to_dict()}

    def result_hparams(self) -> dict[str, object]:
        """:meth:`hparams` less the settings that cannot change the weights (run keys)."""
        return {"rule": self.name, "loss": self.loss.name, **self.settings.result_dict()}


def finite_or_nan(value: float) -> float:
    """``value`` if finite, else NaN (for bookkeeping of diverged runs)."""
    return value if math.isfinite(value) else float("nan")
