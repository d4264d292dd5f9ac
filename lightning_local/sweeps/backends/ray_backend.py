"""Trials as Ray tasks: one machine's Ray instance or a whole cluster (``--backend ray``).

Ray is an optional extra (``pip install "lightning-local[ray]"``), imported only when this
backend runs. ``address=None`` uses the Ray instance this process already joined, else
starts a local one (``ray.init()``); ``address="auto"`` (or ``"ray://host:10001"``, or
``"host:6379"``) joins the cluster that ``ray start`` made. Every node needs
``lightning_local`` (and the module of a user's model or data) importable, and the data
where ``data_dir`` says (MNIST-1D is generated on each node when missing).

Tasks. Each Ray task runs several trials in a row (a generator task that yields each
trial's record as soon as it is done), so the per-task cost (a process for each GPU task,
data loading, scheduling) is paid once for several short trials. :func:`plan_tasks` packs
consecutive trials of the grid (same rule, parametrization and width) into one task up to
the cost of ``trials_per_task`` trials of the narrowest width (cost ~ width^2): that many
narrow trials share a task, fewer wider ones do, a trial that costs more runs alone, and
there are at least as many tasks as trials can run at once. Each task reserves ``threads``
CPUs and ``gpus_per_trial`` of a GPU (fractions share one device: 0.25 runs four trials on
each GPU); its trials use that many torch threads and, with a GPU share, the GPU Ray
assigned (``cuda``).

Failures. A trial that raises is a failed record from the task itself
(:mod:`lightning_local.sweeps.trials`). When a task's worker process or node is lost (Ray's
``WorkerCrashedError``, ``NodeDiedError``, out-of-memory kills, ...), the records it already
sent are kept; the trial it was running is run again in a task of its own, the trials it had
not started yet in another, so no finished trial runs twice and the lost trial is the only
one charged: after ``max_retries`` losses it is recorded as failed. Ray's own task retries are
off (``max_retries=0``) because this driver retries per trial, not per task.

The driver is the only writer: tasks return records, they never touch the output folder.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_local.errors import LocalLearningError
from lightning_local.sweeps.backends.base import Finish, Log
from lightning_local.sweeps.trials import error_text, failed_record, run_trial

__all__ = ["RayBackend", "import_ray", "plan_tasks"]

_SHARED = ("_model", "_data")  # objects shipped to the object store once, not with each task


def import_ray() -> Any:
    """The ``ray`` module, or an error that says how to install it."""
    try:
        import ray
    except ImportError as error:
        raise LocalLearningError(
            f"the Ray backend needs Ray ({error}). Fix: pip install \"lightning-local[ray]\" "
            "(or pip install -e \".[ray]\" in a checkout), or use the local backend."
        ) from None
    return ray


def _cost(spec: Mapping[str, Any]) -> float:
    return float(spec["width"]) ** 2


def plan_tasks(
    specs: Sequence[dict[str, Any]], trials_per_task: int, slots: int
) -> list[list[dict[str, Any]]]:
    """Group consecutive specs into tasks.

    A task costs at most ``trials_per_task`` trials of the narrowest width (cost ~ width^2):
    that many trials at the narrowest width, fewer at wider ones, one where a single trial
    costs more. It holds at most ``ceil(len(specs) / slots)`` trials, so every slot gets
    work, and only specs that share their model and data objects.
    """
    if not specs:
        return []
    limit = max(1, min(trials_per_task, math.ceil(len(specs) / max(slots, 1))))
    budget = trials_per_task * min(_cost(spec) for spec in specs)
    tasks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    spent = 0.0
    for spec in specs:
        same_objects = not current or all(
            current[0].get(name) is spec.get(name) for name in _SHARED
        )
        if current and (len(current) >= limit or spent + _cost(spec) > budget
                        or not same_objects):
            tasks.append(current)
            current, spent = [], 0.0
        current.append(spec)
        spent += _cost(spec)
    tasks.append(current)
    return tasks


def _trial_task(
    shared: tuple[Any, ...], specs: list[dict[str, Any]], threads: int, device: str | None
) -> Iterator[dict[str, Any]]:
    """The body of a Ray task: each trial's record, as soon as it is done."""
    for spec in specs:
        yield run_trial({**spec, **dict(zip(_SHARED, shared))}, threads=threads, device=device)


@dataclass
class RayBackend:
    """Trials as Ray tasks.

    Args:
        address: ``None``: the Ray instance this process already joined, else a new local
            one; ``"auto"`` or an address: join that cluster (``ray.init(address=...)``).
        threads: CPUs reserved by, and torch threads of, each trial.
        gpus_per_trial: GPU share of each trial (``0``: CPU only; ``0.5``: two per GPU).
        trials_per_task: most trials run by one Ray task (see :func:`plan_tasks`).
        max_retries: how often a trial whose worker or node was lost is run again.
        init_kwargs: more ``ray.init`` arguments when this backend starts or joins Ray
            (``runtime_env``, ``num_cpus`` of a local instance, ...).
    """

    address: str | None = None
    threads: int = 1
    gpus_per_trial: float = 0.0
    trials_per_task: int = 8
    max_retries: int = 2
    init_kwargs: Mapping[str, Any] = field(default_factory=dict)
    name: str = "ray"

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise LocalLearningError(f"threads must be >= 1, got {self.threads}.")
        if not (0 <= self.gpus_per_trial and math.isfinite(self.gpus_per_trial)):
            raise LocalLearningError(
                f"gpus_per_trial must be >= 0, got {self.gpus_per_trial}. Fix: e.g. 1, or 0.25 "
                "for four trials per GPU."
            )
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise LocalLearningError(
                f"gpus_per_trial above 1 must be whole, got {self.gpus_per_trial}."
            )
        if self.trials_per_task < 1:
            raise LocalLearningError(
                f"trials_per_task must be >= 1, got {self.trials_per_task}."
            )
        if self.max_retries < 0:
            raise LocalLearningError(f"max_retries must be >= 0, got {self.max_retries}.")

    def describe(self) -> str:
        where = "Ray" if self.address is None else f"Ray at {self.address}"
        share = f" + {self.gpus_per_trial:g} GPU" if self.gpus_per_trial else ""
        return f"{where}, {self.threads} CPU{share} per trial"

    def run(self, specs: Sequence[dict[str, Any]], finish: Finish, log: Log) -> None:
        ray = import_ray()
        started = False
        if not ray.is_initialized():
            kwargs = dict(self.init_kwargs)
            if self.address is None:
                kwargs.setdefault("include_dashboard", False)
            ray.init(address=self.address, **kwargs)
            started = True
        try:
            slots = self._slots(ray)
            log(f"ray: {slots} trial(s) at once on {len(_alive(ray))} node(s)")
            self._run(ray, list(specs), slots, finish, log)
        finally:
            if started:
                ray.shutdown()

    def _slots(self, ray: Any) -> int:
        """How many trials the cluster runs at once; refuse one where no node fits a trial."""
        nodes = _alive(ray)
        fits = [
            node for node in nodes
            if node.get("CPU", 0) >= self.threads and node.get("GPU", 0) >= self.gpus_per_trial
        ]
        if not fits:
            have = ", ".join(f"{n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU" for n in nodes)
            raise LocalLearningError(
                f"no Ray node can run a trial of {self.threads} CPU(s) and "
                f"{self.gpus_per_trial:g} GPU(s) (nodes: {have or 'none'}). Fix: lower "
                "--threads / --gpus-per-trial, or add nodes with GPUs (ray start --num-gpus)."
            )
        slots = 0
        for node in fits:
            count = node.get("CPU", 0) // self.threads
            if self.gpus_per_trial:
                count = min(count, math.floor(node.get("GPU", 0) / self.gpus_per_trial + 1e-9))
            slots += int(count)
        return max(slots, 1)

    def _run(
        self, ray: Any, specs: list[dict[str, Any]], slots: int, finish: Finish, log: Log
    ) -> None:
        device = "cuda" if self.gpus_per_trial else None
        remote = ray.remote(_trial_task).options(
            num_cpus=self.threads, num_gpus=self.gpus_per_trial, max_retries=0,
            retry_exceptions=False,
        )
        shared_refs: dict[tuple[int, ...], Any] = {}
        active: dict[Any, deque[dict[str, Any]]] = {}
        lost_count: dict[str, int] = {}

        def submit(task: list[dict[str, Any]]) -> None:
            objects = tuple(task[0].get(name) for name in _SHARED)
            ident = tuple(id(obj) for obj in objects)
            if ident not in shared_refs:
                shared_refs[ident] = ray.put(objects)
            slim = [{k: v for k, v in spec.items() if k not in _SHARED} for spec in task]
            generator = remote.remote(shared_refs[ident], slim, self.threads, device)
            active[generator] = deque(task)

        for task in plan_tasks(specs, self.trials_per_task, slots):
            submit(task)
        try:
            while active:
                ready, _ = ray.wait(list(active), num_returns=1)
                for generator in ready:
                    self._advance(ray, generator, active, lost_count, submit, finish, log)
        except BaseException:
            for generator in active:
                _cancel(ray, generator)
            raise

    def _advance(
        self, ray: Any, generator: Any, active: dict[Any, deque[dict[str, Any]]],
        lost_count: dict[str, int], submit: Any, finish: Finish, log: Log,
    ) -> None:
        """Take the next record of a task, or handle its end or its loss."""
        remaining = active[generator]
        try:
            record = ray.get(next(generator))
        except StopIteration:
            del active[generator]
            for spec in remaining:  # a task that ended early: never seen, but never lost
                finish(failed_record(spec, "TaskEnded: the Ray task ended without this trial"))
            return
        except ray.exceptions.RayTaskError as error:  # raised by the task, outside any trial
            del active[generator]
            cause = getattr(error, "cause", None)
            text = error_text(cause if isinstance(cause, BaseException) else error)
            for spec in remaining:
                finish(failed_record(spec, text))
            return
        except ray.exceptions.RayError as error:  # the worker or its node was lost
            del active[generator]
            suspect, rest = remaining[0], list(remaining)[1:]
            count = lost_count.get(suspect["key"], 0) + 1
            lost_count[suspect["key"]] = count
            if count > self.max_retries:
                finish(failed_record(
                    suspect, f"WorkerLost: {error_text(error)} ({count} time(s))",
                    attempts=count,
                ))
            else:
                log(f"ray: lost a worker ({type(error).__name__}); trial {suspect['key']} "
                    f"runs again (retry {count} of {self.max_retries})")
                submit([suspect])
            if rest:
                submit(rest)
            return
        for index, spec in enumerate(remaining):
            if spec["key"] == record.get("key"):
                del remaining[index]
                break
        finish(record)


def _alive(ray: Any) -> list[dict[str, float]]:
    return [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]


def _cancel(ray: Any, generator: Any) -> None:
    try:
        ray.cancel(generator, force=True)
    except Exception:  # cancelling is best effort while the driver stops
        pass
