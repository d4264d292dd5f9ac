"""Many processes: DDP with exactly one gradient all-reduce per training step.

Why it is right. Every rule turns a batch of ``B`` samples into one scalar *surrogate* whose
gradient is the rule's weight update, a batch mean ``(1/B) sum_b g_b``. One
``manual_backward(surrogate)`` lets DDP's reducer all-reduce the gradient buckets once, and DDP
divides the sum by the number of processes ``N``:

    (1/N) sum_r (1/B) sum_{b in rank r} g_b  =  (1/NB) sum_{b in global batch} g_b

so ``N`` processes at batch ``B`` take the same step as one process at batch ``NB`` (up to
float summation order), and every rank applies the same averaged gradient, so ranks stay
bit-identical. That holds only if nothing a rule computes *before* the surrogate depends on the
batch split. Predictive-coding inference descends a per-sample *sum* energy, with closed-form
state gradients or ``torch.autograd.grad`` with respect to the states only, so no parameter
gradient is accumulated and no DDP hook fires during inference. What does need the global batch
goes through the rule's :class:`~lightning_local.rules.base.ProcessLayout`
(``rule.process_layout``, made by :func:`process_layout`): its sum is
:func:`sum_across_processes`, an all-reduce of statistics, not of gradients:

- PC's ``"tolerance"`` schedule stops on the global energy ``F = sum_r F_r`` (one scalar
  all-reduce per inference step), so every rank takes the steps one process takes on ``NB``;
- TP's closed-form ridge feedback sums its Gram matrices (one all-reduce per step), and its
  feedback-only steps their gradients (one per feedback step);
- TP's noisy reconstruction draws its noise per *global* sample
  (:meth:`~lightning_local.rules.base.ProcessLayout.global_randn_like`): every rank draws the
  ``NB`` rows one process draws and keeps its own, so the samples' noises are independent and
  the random states stay equal on all ranks.

:class:`LocalDDPStrategy` is Lightning's ``DDPStrategy`` with what local rules need:

- ``find_unused_parameters=False`` always (every trainable parameter is in the surrogate; the
  unused-parameter search would only add a graph traversal per step);
- one gradient bucket: ``bucket_cap_mb`` sized to hold every trainable parameter, so the one
  backward is literally one all-reduce (DDP's default 25 MiB buckets would split a large model
  into several calls; the step is still one synchronisation, just in pieces);
- communication hooks on CPU (gloo) as well as GPU (Lightning registers them on CUDA only).

It is registered as ``strategy="local_ddp"`` (script relaunch, like ``"ddp"``) and
``"local_ddp_spawn"`` (like ``"ddp_spawn"``); the plain ``"ddp"`` and ``"ddp_spawn"`` strategies
work too (their default is already ``find_unused_parameters=False``).

FSDP, DeepSpeed and model parallelism are not supported (:func:`check_supported_strategy`
says so): FSDP2 replaces the parameters by sharded tensors and drops their ``p.infshape``, so
muP's per-layer learning rates are lost, and it all-gathers the sharded weights on every
forward call of a block, i.e. on every inference step of a local rule (``T`` gathers per
training step instead of none); Lightning also refuses FSDP on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.utils.data import Dataset, DistributedSampler

from lightning_local.errors import LocalLearningError
from lightning_local.rules.base import ProcessLayout

__all__ = [
    "AllReduceCounter",
    "LocalDDPStrategy",
    "StepCommunication",
    "check_supported_strategy",
    "global_batch_sampler",
    "process_layout",
    "single_bucket_mb",
    "sum_across_processes",
]

_MIB = 2**20


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def sum_across_processes(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all processes, in place, and return it (identity in one process).

    The sum of :func:`process_layout` for rules whose computation before the surrogate needs
    global-batch statistics (PC's tolerance stop, TP's ridge Gram sums and feedback-step
    gradients). Every rank must call it at the same point (it is a collective).
    """
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _replicas_and_rank(trainer: L.Trainer | None) -> tuple[int, int]:
    """World size and global rank: the trainer's, else ``torch.distributed``'s, else (1, 0)."""
    if trainer is not None:
        return trainer.world_size, trainer.global_rank
    if _world_size() > 1:
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def process_layout(trainer: L.Trainer | None = None) -> ProcessLayout:
    """The :class:`~lightning_local.rules.base.ProcessLayout` of this process, for
    ``rule.process_layout``.

    The trainer's world size and global rank (else ``torch.distributed``'s default group, else
    one process), with :func:`sum_across_processes` as the sum when there are several
    processes. Together with :func:`global_batch_sampler` (the same ranks), rank ``r`` of ``N``
    holds global samples ``r, r + N, ..`` of each batch.
    """
    replicas, rank = _replicas_and_rank(trainer)
    reduce = sum_across_processes if replicas > 1 else None
    return ProcessLayout(rank=rank, world_size=replicas, all_reduce_sum=reduce)


def global_batch_sampler(
    dataset: Dataset,
    trainer: L.Trainer | None = None,
    *,
    shuffle: bool = True,
    seed: int = 0,
) -> DistributedSampler:
    """A sampler under which ``N`` processes at batch ``B`` see what one process sees at ``NB``.

    A ``DistributedSampler`` for the trainer's world size and global rank (else
    ``torch.distributed``'s, else one process): one permutation of the data set, seeded by
    ``seed`` and the epoch and the same for every process count, dealt to the ranks in turn.
    Global batch ``j`` is therefore entries ``[jNB, (j+1)NB)`` of that permutation for every
    ``N``, so training with any number of processes takes the same steps (when ``len(dataset)``
    is a multiple of ``N``; otherwise the sampler pads with repeated samples). Lightning keeps
    a ``DistributedSampler`` it is given and calls its ``set_epoch``; its own automatic one
    reshuffles with another order than a single process's ``shuffle=True`` loader.
    """
    replicas, rank = _replicas_and_rank(trainer)
    return DistributedSampler(
        dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
    )


def single_bucket_mb(module: nn.Module) -> int:
    """A DDP ``bucket_cap_mb`` (MiB) that holds every trainable parameter of ``module``.

    At least DDP's default 25 MiB, so small models keep the default.
    """
    size = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return max(25, math.ceil(size / _MIB) + 1)


class LocalDDPStrategy(DDPStrategy):
    """Lightning's ``DDPStrategy`` set up for local learning rules.

    Args:
        single_bucket: size the gradient bucket to the whole model so each training step is
            one all-reduce (``bucket_cap_mb`` given explicitly takes precedence).
        start_method: ``"popen"`` (relaunch the script, as ``"ddp"``), ``"spawn"`` (as
            ``"ddp_spawn"``), ``"fork"``/``"forkserver"``.
        ddp_comm_hook, ddp_comm_state, ddp_comm_wrapper: a DDP communication hook (e.g.
            :class:`AllReduceCounter`), its state and wrapper; registered on CPU too.
        **kwargs: the other arguments of ``DDPStrategy`` and ``DistributedDataParallel``.

    Raises:
        LocalLearningError: for ``find_unused_parameters=True``, which local rules never need.
    """

    def __init__(self, *, single_bucket: bool = True, **kwargs: Any) -> None:
        if kwargs.pop("find_unused_parameters", False):
            raise LocalLearningError(
                "find_unused_parameters=True is not needed: every rule's surrogate touches every "
                "trainable parameter, and the search costs a graph traversal per step. Fix: drop "
                "the argument. If DDP reports unused parameters, a layer has weight 0 in the "
                "rule (e.g. a hidden_weights entry of 0) or is not part of the network's blocks: "
                "freeze it (requires_grad_(False)) or remove it."
            )
        super().__init__(find_unused_parameters=False, **kwargs)
        self._single_bucket = bool(single_bucket)

    def _setup_model(self, model: nn.Module) -> Any:
        if self._single_bucket and "bucket_cap_mb" not in self._ddp_kwargs:
            self._ddp_kwargs["bucket_cap_mb"] = single_bucket_mb(model)
        return super()._setup_model(model)

    def _register_ddp_hooks(self) -> None:
        if self.root_device.type == "cuda" or self._ddp_comm_hook is None:
            super()._register_ddp_hooks()
            return
        hook = self._ddp_comm_hook
        if self._ddp_comm_wrapper is not None:
            hook = self._ddp_comm_wrapper(hook)
        self.model.register_comm_hook(state=self._ddp_comm_state, hook=hook)

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("local_ddp", "popen"), ("local_ddp_spawn", "spawn")):
            strategy_registry.register(
                name,
                cls,
                description=f"DDP for local rules: one bucket, start_method {start_method!r}",
                override=True,
                start_method=start_method,
            )


LocalDDPStrategy.register_strategies(StrategyRegistry)


_UNSUPPORTED = {
    "FSDPStrategy": "FSDP shards the parameters: it drops their muP base shapes (p.infshape) and "
    "all-gathers the weights on every inference step",
    "ModelParallelStrategy": "FSDP2/tensor parallelism shards the parameters: it drops their muP "
    "base shapes (p.infshape) and gathers the weights on every inference step",
    "DeepSpeedStrategy": "DeepSpeed owns the backward and the optimizer (ZeRO partitions them), "
    "which bypasses the rule's single surrogate backward and the muP parameter groups",
}


def check_supported_strategy(strategy: object) -> None:
    """Raise :class:`LocalLearningError` for a sharding strategy (FSDP, DeepSpeed, ...).

    Single-device and DDP strategies (any start method, any number of nodes) are supported.
    """
    for cls in type(strategy).__mro__:
        reason = _UNSUPPORTED.get(cls.__name__)
        if reason is not None:
            raise LocalLearningError(
                f"{type(strategy).__name__} is not supported by lightning_local: {reason}. Fix: "
                "use strategy='ddp' (or lightning_local.LocalDDPStrategy()); it scales to many "
                "GPUs and nodes with torchrun or SLURM (see docs/distributed.md)."
            )


@dataclass(frozen=True)
class StepCommunication:
    """Gradient all-reduces DDP issued in one training step, by phase.

    Attributes:
        before_backward: during the forward pass and the rule's inference (must be 0).
        backward: during ``manual_backward`` (1 with one bucket).
        after_backward: during the optimizer step and the rest of the step (must be 0).
        numel: elements all-reduced in the step (the number of trainable parameter entries).
    """

    before_backward: int
    backward: int
    after_backward: int
    numel: int


class AllReduceCounter(Callback):
    """A DDP communication hook that counts gradient all-reduces, per training step and phase.

    Pass the same object as the strategy's hook and as a callback; it then does DDP's default
    all-reduce (sum, divided by the number of processes) and records, for every training step,
    a :class:`StepCommunication` in :attr:`steps`::

        counter = AllReduceCounter()
        trainer = Trainer(strategy=LocalDDPStrategy(ddp_comm_hook=counter), callbacks=[counter])

    A correct local-learning step reads ``(before_backward=0, backward=1, after_backward=0)``.
    The counts live in each process (with ``ddp_spawn``, in the spawned ones).
    """

    def __init__(self) -> None:
        self.steps: list[StepCommunication] = []
        self._calls = 0
        self._numel = 0
        self._start = 0
        self._backward_marks: list[int] = []
        self.__name__ = self.__qualname__ = "all_reduce_counter"  # DDP reads the hook's name

    # DDP checks the hook's annotations against the real classes; postponed (string)
    # annotations fail that check, so the bucket (a dist.GradBucket) and the returned
    # torch.futures.Future[Tensor] stay unannotated.
    def __call__(self, state: Any, bucket):  # noqa: ANN001, ANN204
        self._calls += 1
        self._numel += bucket.buffer().numel()
        return allreduce_hook(state, bucket)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start, self._numel, self._backward_marks = self._calls, 0, []

    def on_before_backward(self, trainer: L.Trainer, *args: Any) -> None:
        self._backward_marks.append(self._calls)

    def on_after_backward(self, trainer: L.Trainer, *args: Any) -> None:
        self._backward_marks.append(self._calls)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        marks = self._backward_marks or [self._calls]
        before, after = marks[0] - self._start, self._calls - marks[-1]
        self.steps.append(
            StepCommunication(
                before_backward=before,
                backward=self._calls - self._start - before - after,
                after_backward=after,
                numel=self._numel,
            )
        )
