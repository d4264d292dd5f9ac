"""One run of a sweep, trained in plain PyTorch: :func:`train_run` turns a spec into a record.

Each run is plain PyTorch: the data set sits in memory, minibatches come from a permutation
drawn by a generator seeded with the run's seed, and the rule steps the network
(:meth:`~lightning_local.rules.base.LocalRule.step`). A run *diverges* when the rule reports a
non-finite energy or loss (:class:`~lightning_local.errors.NonFiniteEnergyError`), a linear
solve fails on non-finite features, or a batch loss exceeds ``divergence_factor`` times the
first batch's; it is recorded with ``diverged = true`` (``status = "diverged"``).

After training, the final loss and accuracy are measured on the whole training and test sets
with the feedforward pass.

The network is built and initialised on the CPU (so a seed gives the same init everywhere)
and then moved to ``device``, with the data; the batch order is drawn on the CPU too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_local.errors import NonFiniteEnergyError
from lightning_local.rules.base import LocalRule
from lightning_local.sweeps.experiment import Experiment, build_experiment, load_dataset

__all__ = ["build_trial", "check_buildable", "spec_data", "train_run"]


class _Diverged(Exception):
    pass


@torch.no_grad()
def _evaluate(rule: LocalRule, network: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean loss and accuracy of the feedforward output on ``(x, y)``, in chunks."""
    loss_sum, correct = 0.0, 0
    for start in range(0, x.shape[0], 4096):
        inputs, targets = x[start:start + 4096], y[start:start + 4096]
        output = rule.predict(network, inputs)
        loss_sum += float(rule.loss.per_sample(output, targets).sum())
        correct += int((output.argmax(1) == targets).sum())
    return loss_sum / x.shape[0], correct / x.shape[0]


def spec_data(spec: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The in-memory ``(x_train, y_train, x_test, y_test)`` of a run (cached per process)."""
    return load_dataset(
        spec.get("dataset", "mnist1d"), spec.get("_data_dir"), spec.get("num_samples", 5000),
        spec.get("data_seed", 42), data=spec.get("_data") or spec.get("data"),
    )


def build_trial(spec: Mapping[str, Any]) -> Experiment:
    """The wired run of one spec of :meth:`SweepConfig.run_specs` (seed torch first)."""
    x_train, y_train, _, _ = spec_data(spec)
    return build_experiment(
        spec["rule"], spec.get("_param", spec["parametrization"]), spec["width"], spec["lr"],
        in_features=int(x_train[0].numel()), num_classes=int(y_train.max()) + 1,
        base_width=spec["base_width"], depth=spec.get("depth", 3),
        activation=spec.get("activation", "tanh"), bias=spec.get("bias", False),
        loss=spec["loss"], momentum=spec["momentum"],
        output_weight_exponent=spec["output_weight_exponent"],
        optimizer=spec.get("optimizer", "sgd"), zero_readout=spec.get("zero_readout", False),
        model=spec.get("_model") or spec.get("model"),
    )


def train_run(
    spec: dict[str, Any],
    *,
    keep: list[Experiment] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train one run described by a spec of :meth:`SweepConfig.run_specs`; return its record.

    The init is seeded with the run's seed and the minibatches are slices of a permutation
    drawn per epoch by a generator seeded with it, so a ``Trainer.fit`` of the same module
    with the same seed and batch order ends with the same weights. The global torch random
    state is restored afterwards (``torch.random.fork_rng``). ``keep``, when given, receives
    the trained run. ``device`` (default: the CPU) is where the network and the data train;
    it is not part of the run's key.
    """
    target = torch.device("cpu" if device is None else device)
    x_train, y_train, x_test, y_test = (t.to(target) for t in spec_data(spec))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        experiment = build_trial(spec)
        if target.type != "cpu":
            experiment.network.to(target)  # in place: the optimizer keeps its parameters
        if keep is not None:
            keep.append(experiment)
        rule, network = experiment.rule, experiment.network
        generator = torch.Generator().manual_seed(spec["seed"])
        budget = spec["steps"]
        epochs = spec["epochs"] if budget is None else math.inf
        steps, epoch, first = 0, 0, None
        epoch_losses: list[float] = []
        reason = None
        batch = spec["batch_size"]
        try:
            while epoch < epochs and (budget is None or steps < budget):
                order = torch.randperm(x_train.shape[0], generator=generator).to(target)
                total, count = 0.0, 0
                for begin in range(0, x_train.shape[0], batch):
                    if budget is not None and steps >= budget:
                        break
                    index = order[begin:begin + batch]
                    result = rule.step(network, x_train[index], y_train[index],
                                       experiment.optimizer)
                    loss = float(result.loss)
                    steps += 1
                    first = loss if first is None else first
                    if not math.isfinite(loss):
                        raise _Diverged(f"non-finite loss at step {steps}")
                    if loss > spec["divergence_factor"] * max(first, 1e-12):
                        raise _Diverged(
                            f"loss {loss:.3g} at step {steps} exceeds "
                            f"{spec['divergence_factor']:g} x the first batch loss {first:.3g}"
                        )
                    total, count = total + loss * index.numel(), count + index.numel()
                epoch += 1
                epoch_losses.append(total / max(count, 1))
        except NonFiniteEnergyError as error:
            reason = f"non-finite energy at step {steps + 1}: {str(error).split('.')[0]}"
        except torch.linalg.LinAlgError as error:
            reason = f"linear solve failed at step {steps + 1}: {str(error).splitlines()[0]}"
        except _Diverged as error:
            reason = str(error)
        train_loss = test_loss = train_acc = test_acc = None
        if reason is None:
            train_loss, train_acc = _evaluate(rule, network, x_train, y_train)
            test_loss, test_acc = _evaluate(rule, network, x_test, y_test)
            if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                reason = "non-finite loss after training"
                train_loss = test_loss = train_acc = test_acc = None
    return make_record(
        spec,
        train_loss=train_loss,
        test_loss=test_loss,
        test_acc=test_acc,
        train_acc=train_acc,
        diverged=reason is not None,
        diverged_reason=reason,
        status="ok" if reason is None else "diverged",
        seconds=time.perf_counter() - start,
        steps_done=steps,
        epoch_train_loss=epoch_losses,
        device=str(target),
    )


_IDENTITY = ("key", "rule", "parametrization", "width", "lr", "seed")


def make_record(spec: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    """A results record: the run's identity (key, rule, parametrization, width, lr, seed), then
    ``fields``, then the spec's other public settings (names without a leading ``_``)."""
    public = {k: v for k, v in spec.items() if not k.startswith("_")}
    identity = {name: public.pop(name) for name in _IDENTITY}
    return {**identity, **fields, **public}


def check_buildable(specs: Sequence[dict[str, Any]]) -> None:
    """Build one trial per (rule, parametrization) at the smallest width before any training,
    so a network the rule cannot take fails now, not after hours of other runs."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for spec in specs:
        key = (spec["rule"], spec["parametrization"])
        if key not in seen or spec["width"] < seen[key]["width"]:
            seen[key] = spec
    with torch.random.fork_rng(devices=[]):
        for spec in seen.values():
            build_trial(spec)
