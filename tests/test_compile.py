"""Compiled inference steps (``LocalRule.compile_inference``) and host synchronizations.

References: the same rule uncompiled (the update must not change), a counting
``torch.compile`` backend (how many graphs get compiled over a run of steps), and patched
``Tensor`` conversions (how often a step reads the device from the host). The backends here
only capture graphs (``"eager"``, ``"aot_eager"``), so the tests need no C++ compiler.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import torch
import torch._dynamo
from torch import nn

from lightning_local.errors import NonFiniteEnergyError, ShapeMismatchError
from lightning_local.models import MLP
from lightning_local.rules import Backprop, LocalRule, PredictiveCoding, TargetPropagation

PC_SCHEDULES = {
    "si": dict(),
    "si-3-momentum": dict(inference_steps=3, state_momentum=0.5),
    "simultaneous": dict(inference="simultaneous", inference_steps=8, inference_lr=0.1),
    "simultaneous-no-fpa": dict(
        inference="simultaneous", inference_steps=8, inference_lr=0.1, fixed_prediction=False),
    "simultaneous-autograd": dict(
        inference="simultaneous", inference_steps=4, inference_lr=0.1, fast_path=False),
    "tolerance": dict(inference="tolerance", inference_steps=30, inference_lr=0.1,
                      tolerance=1e-4),
}
FIXED_STEP = [name for name in PC_SCHEDULES if name != "tolerance"]
TP_VARIANTS = {
    f"{variant}-{training}-{feedback}": dict(
        variant=variant, feedback_training=training, feedback=feedback)
    for variant in ("tp", "dtp")
    for training, feedback in (("ridge", "linear"), ("noisy", "linear"),
                               ("noisy", "nonlinear"), ("none", "linear"))
}


def _rule(name: str) -> LocalRule:
    if name in PC_SCHEDULES:
        return PredictiveCoding(**PC_SCHEDULES[name])
    return TargetPropagation(**TP_VARIANTS[name])


def _network(rule: LocalRule, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return rule.prepare_network(MLP(in_features=12, width=16, num_classes=4, depth=4))


def _batches(sizes: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    for size in sizes:
        yield torch.randn(size, 12, generator=generator), torch.randint(
            0, 4, (size,), generator=generator)


#: two epochs of 10 batches whose last batch is short, as a data loader without drop_last
EPOCHS = ([32] * 9 + [20]) * 2


def _train(rule: LocalRule, sizes: list[int], log: bool = False) -> nn.Module:
    """``rule.step`` over batches of ``sizes``; with ``log`` every metric is read each step,
    as a logger does."""
    network = _network(rule)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    torch.manual_seed(2)  # noisy feedback: the same noise for both runs
    for inputs, targets in _batches(sizes):
        result = rule.step(network, inputs, targets, optimizer)
        if log:
            [value.tolist() for value in (result.loss, *result.metrics.values())]
    return network


class CountingBackend:
    """A ``torch.compile`` backend that runs each captured graph as it is and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return graph.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _assert_same_parameters(a: nn.Module, b: nn.Module, rtol: float = 1e-6) -> None:
    for (name, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
        x, y = x.detach(), y.detach()
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * float(y.abs().max()), msg=name)


@pytest.mark.parametrize("name", [*PC_SCHEDULES, *TP_VARIANTS])
def test_compiled_inference_gives_the_same_update(name):
    """Three steps (one with a short batch) land on the same weights, and one step's update
    and metrics agree, compiled (aot_eager: the captured aten graph) and as written."""
    sizes = [32, 32, 20]
    compiled = _rule(name).compile_inference(backend="aot_eager")
    assert compiled.inference_compiled
    _assert_same_parameters(_train(compiled, sizes), _train(_rule(name), sizes))
    inputs, targets = next(_batches([24]))
    results = []
    for rule in (compiled, _rule(name)):
        network = _network(rule)
        torch.manual_seed(3)
        result = rule.training_loss(network, inputs, targets)
        result.surrogate.backward()
        results.append((result, [p.grad for p in network.parameters() if p.grad is not None]))
    (got, got_grads), (want, want_grads) = results
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))
    assert got.metrics.keys() == want.metrics.keys()
    for key, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", [*PC_SCHEDULES, "dtp-ridge-linear", "tp-noisy-nonlinear"])
def test_compilations_stay_under_a_fixed_bound(name):
    """20 steps, the last batch of each epoch short, every metric read each step (as a
    logger does): the inference step compiles once at the first batch size and once more,
    dynamic in the batch, at the second (2 graphs today; the bound leaves room for torch's
    heuristics), without graph breaks; further batch sizes and logging compile nothing.

    The tolerance schedule reads the energy after every step (its stop is a host decision),
    so its loop runs as written and each step between reads is one compiled graph."""
    backend = CountingBackend()
    rule = _rule(name).compile_inference(backend=backend)
    _train(rule, EPOCHS, log=True)
    assert 1 <= backend.graphs <= 4
    assert not torch._dynamo.utils.counters["graph_break"]
    compiled = backend.graphs
    _train(rule, [20, 7, 32, 13], log=True)
    assert backend.graphs == compiled


def test_compile_inference_api():
    rule = PredictiveCoding(inference="simultaneous", inference_steps=2)
    assert not rule.inference_compiled
    assert rule.compile_inference(backend="eager") is rule
    assert rule.inference_compiled
    step = rule._inference_step()
    assert rule.compile_inference(backend="eager") is rule  # idempotent: the same step
    assert rule._inference_step() is step
    rule.compile_inference(backend="aot_eager")  # another backend replaces it
    assert rule._inference_step() is not step
    # a copy (pickled, deep-copied, or with other settings) compiles a step of its own
    for other in (pickle.loads(pickle.dumps(rule)), copy.deepcopy(rule),
                  rule.with_settings(inference_steps=3)):
        assert other.inference_compiled
        assert other._inference_step() is not rule._inference_step()
    # backprop has no inference: a documented no-op
    bp = Backprop()
    assert bp.compile_inference() is bp
    assert not bp.inference_compiled


def test_a_compiled_copy_runs_its_own_settings():
    """The compiled step of a copy is bound to the copy: a deep copy with changed settings
    infers with its own settings, not with the original's."""
    rule = PredictiveCoding(inference="simultaneous", inference_steps=2).compile_inference(
        backend="eager")
    network = _network(rule)
    inputs, targets = next(_batches([8]))
    rule.infer(network, inputs, targets)
    other = copy.deepcopy(rule)
    other.inference_steps = 5
    assert other.infer(network, inputs, targets).steps == 5
    assert rule.infer(network, inputs, targets).steps == 2


@contextlib.contextmanager
def host_reads() -> Iterator[Counter]:
    """Count the ``Tensor`` methods that read a tensor's values on the host (each one a
    device synchronization on an accelerator) while the block runs."""
    names = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__",
             "__index__", "__complex__")
    reads: Counter = Counter()
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name: str) -> Callable:
        original = saved[name]

        def read(self, *args, **kwargs):
            reads[name] += 1
            return original(self, *args, **kwargs)

        return read

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield reads
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def test_the_read_counter_counts():
    with host_reads() as reads:
        value = torch.ones(2)
        bool(value.sum()), float(value[0]), value.tolist(), value[0].item()
    assert reads == Counter({"__bool__": 1, "__float__": 1, "tolist": 1, "item": 1})


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("name", FIXED_STEP)
def test_fixed_step_inference_reads_nothing_from_the_device(name, loss):
    """No host read inside sequential or simultaneous inference; a whole training step
    (inference, weight update, metrics, optimizer step) reads the device once: the step's
    checks (labels in range, finite surrogate and energy), fused into one read."""
    rule = PredictiveCoding(loss, **PC_SCHEDULES[name])
    network = _network(rule)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    inputs, targets = next(_batches([16]))
    with host_reads() as reads:
        rule.infer(network, inputs, targets)
    assert not reads
    with host_reads() as reads:
        rule.step(network, inputs, targets, optimizer)
    assert reads == Counter({"tolist": 1})


@pytest.mark.parametrize("name", ["bp", *TP_VARIANTS])
def test_other_rules_read_the_device_once_per_step(name):
    rule = Backprop() if name == "bp" else _rule(name)
    network = _network(rule)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
    inputs, targets = next(_batches([16]))
    with host_reads() as reads:
        rule.step(network, inputs, targets, optimizer)
    assert reads == Counter({"tolist": 1})


def test_tolerance_reads_the_energy_once_per_step():
    rule = _rule("tolerance")
    network = _network(rule)
    inputs, targets = next(_batches([16]))
    with host_reads() as reads:
        result = rule.infer(network, inputs, targets)
    assert reads == Counter({"tolist": result.steps + 1})  # F_0 .. F_T


@pytest.mark.parametrize("name", ["bp", "simultaneous", "dtp-ridge-linear"])
def test_the_fused_checks_still_refuse_bad_labels_and_divergence(name):
    rule = Backprop() if name == "bp" else _rule(name)
    network = _network(rule)
    inputs, targets = next(_batches([6]))
    with pytest.raises(ShapeMismatchError, match=r"labels must lie in \[0, 4\).*\[0, 7\]"):
        rule.training_loss(network, inputs, torch.tensor([0, 1, 7, 2, 3, 0]))
    with pytest.raises(NonFiniteEnergyError, match="not finite"):
        rule.training_loss(network, inputs * float("nan"), targets)
    for p in network.parameters():
        assert p.grad is None
