"""Predictive coding: exactness identity, energy descent, schedules, errors.

References: backprop gradients by autograd, the energy's autograd gradient w.r.t. the states.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_local.errors import LocalLearningError, NonFiniteEnergyError, ShapeMismatchError
from lightning_local.models import CNN, MLP
from lightning_local.rules.backprop import Backprop
from lightning_local.rules.base import ProcessLayout
from lightning_local.rules.predictive_coding import PredictiveCoding
from tests._ddp_ranks import ThreadRanks


def _grads(net: nn.Module, surrogate: torch.Tensor) -> list[torch.Tensor]:
    net.zero_grad(set_to_none=True)
    surrogate.backward()
    return [p.grad.detach().clone() for p in net.parameters()]


def _max_relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(a, b))


def _batch(features=6, classes=3, batch=10, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=generator, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, y


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_exactness_identity_mlp(activation, depth, fast_path, loss):
    """F-ini + SI + FPA, unit hidden weights/steps: PC update = gamma_L * backprop gradient."""
    torch.manual_seed(depth)
    net = MLP(in_features=6, width=12, num_classes=3, depth=depth, activation=activation).double()
    x, y = _batch()
    gamma = 0.37
    pc = PredictiveCoding(loss, output_weight=gamma, fast_path=fast_path)
    pc_grads = _grads(net, pc.training_loss(net, x, y).surrogate)
    bp_grads = _grads(net, Backprop(loss).training_loss(net, x, y).surrogate)
    assert _max_relative(pc_grads, [gamma * g for g in bp_grads]) < 1e-10


def test_exactness_identity_cnn():
    torch.manual_seed(0)
    net = CNN(in_channels=1, image_size=8, width=4, num_classes=3, conv_layers=2).double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    pc = PredictiveCoding(output_weight=2.0)
    pc_grads = _grads(net, pc.training_loss(net, x, y).surrogate)
    bp_grads = _grads(net, Backprop().training_loss(net, x, y).surrogate)
    assert _max_relative(pc_grads, [2.0 * g for g in bp_grads]) < 1e-10


def test_exactness_fails_without_fpa_or_with_other_step_sizes():
    """The identity needs its conditions: the comparison above can fail."""
    torch.manual_seed(1)
    net = MLP(in_features=6, width=12, num_classes=3, depth=4).double()
    x, y = _batch()
    bp_grads = _grads(net, Backprop().training_loss(net, x, y).surrogate)
    for rule in (
        PredictiveCoding(fixed_prediction=False),
        PredictiveCoding(inference_lr=0.5),
        PredictiveCoding(inference="simultaneous", inference_steps=3),
    ):
        assert _max_relative(_grads(net, rule.training_loss(net, x, y).surrogate), bp_grads) > 1e-3


def _autograd_energy(net, states, y, rule):
    """The energy written out directly, as a function the test differentiates."""
    blocks = list(net)
    gammas = rule._gammas(len(blocks) - 1)
    total = 0.0
    for l, block in enumerate(blocks[:-1]):
        total = total + 0.5 * gammas[l] * (states[l + 1] - block(states[l])).pow(2).sum()
    return total + gammas[-1] * rule.loss.per_sample_sum(blocks[-1](states[-1]), y)


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "identity"])
def test_state_grads_match_autograd_of_energy(fast_path, activation):
    torch.manual_seed(2)
    net = MLP(in_features=6, width=9, num_classes=4, depth=4, activation=activation).double()
    x, y = _batch(classes=4)
    states = [x] + [torch.randn(10, 9, dtype=torch.float64) for _ in range(3)]
    rule = PredictiveCoding(hidden_weights=[0.5, 1.5, 2.0], output_weight=3.0, fast_path=fast_path)
    leaves = [s.clone().requires_grad_(True) for s in states[1:]]
    reference = torch.autograd.grad(_autograd_energy(net, [x] + leaves, y, rule), leaves)
    grads = rule.state_grads(net, states, y)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    energy = rule.energy(net, states, y)
    torch.testing.assert_close(energy, _autograd_energy(net, states, y, rule).detach())


@pytest.mark.parametrize("schedule", ["simultaneous", "sequential"])
def test_small_steps_never_increase_the_energy(schedule):
    torch.manual_seed(3)
    net = MLP(in_features=6, width=16, num_classes=3, depth=4).double()
    x, y = _batch()
    energies = []
    for steps in range(1, 30, 3):
        rule = PredictiveCoding(
            inference=schedule, inference_steps=steps, inference_lr=0.05, output_weight=1.0
        )
        result = rule.infer(net, x, y)
        if not energies:  # the energy at the feedforward states (F-ini), before any step
            energies.append(float(result.energy_before))
        energies.append(float(result.energy_after))
    assert all(b <= a + 1e-12 for a, b in zip(energies, energies[1:]))
    assert energies[-1] < energies[0]


def test_tolerance_stops_early_on_an_easy_batch_and_matches_simultaneous():
    torch.manual_seed(4)
    net = MLP(in_features=6, width=16, num_classes=3, depth=3).double()
    x, _ = _batch()
    with torch.no_grad():
        output = net(x)
    easy = output.clone()  # the prediction is already right: nothing to infer
    hard = output + 3.0 * torch.randn_like(output)
    rule = PredictiveCoding(
        inference="tolerance", inference_steps=500, inference_lr=0.1, tolerance=1e-4
    )
    easy_run, hard_run = rule.infer(net, x, easy), rule.infer(net, x, hard)
    assert easy_run.steps == 1
    assert 10 < hard_run.steps < 500
    trace = hard_run.energy_trace
    assert len(trace) == hard_run.steps + 1
    assert all(b <= a for a, b in zip(trace, trace[1:]))
    assert (trace[-2] - trace[-1]) <= 1e-4 * trace[-2] < (trace[-3] - trace[-2])
    same = PredictiveCoding(
        inference="simultaneous", inference_steps=hard_run.steps, inference_lr=0.1
    ).infer(net, x, hard)
    for a, b in zip(same.states, hard_run.states):
        torch.testing.assert_close(a, b)


def test_momentum_changes_the_trajectory_and_reaches_lower_energy_faster():
    torch.manual_seed(5)
    net = MLP(in_features=6, width=16, num_classes=3, depth=3).double()
    x, y = _batch()
    plain = PredictiveCoding(inference="simultaneous", inference_steps=10, inference_lr=0.02)
    heavy = PredictiveCoding(
        inference="simultaneous", inference_steps=10, inference_lr=0.02, state_momentum=0.8
    )
    assert float(heavy.infer(net, x, y).energy_after) < float(plain.infer(net, x, y).energy_after)


def test_per_layer_step_sizes_zero_freezes_that_layer():
    torch.manual_seed(6)
    net = MLP(in_features=6, width=8, num_classes=3, depth=4).double()
    x, y = _batch()
    rule = PredictiveCoding(
        inference="simultaneous", inference_steps=5, inference_lr=[0.1, 0.0, 0.1]
    )
    result = rule.infer(net, x, y)
    # layer 2 is frozen, so no error reaches layer 1 either; layer 3 moves
    torch.testing.assert_close(result.states[2], result.feedforward[2])
    torch.testing.assert_close(result.states[1], result.feedforward[1])
    assert not torch.allclose(result.states[3], result.feedforward[3])


def test_batch_size_does_not_change_a_samples_inference():
    """Per-sample-sum energy: a sample's states do not depend on the rest of the batch."""
    torch.manual_seed(7)
    net = MLP(in_features=6, width=8, num_classes=3, depth=3).double()
    x, y = _batch(batch=12)
    rule = PredictiveCoding(inference="simultaneous", inference_steps=7, inference_lr=0.2)
    full = rule.infer(net, x, y)
    half = rule.infer(net, x[:6], y[:6])
    for a, b in zip(full.states, half.states):
        torch.testing.assert_close(a[:6], b)


def test_metrics_and_result_fields():
    torch.manual_seed(8)
    net = MLP(in_features=6, width=8, num_classes=3, depth=3)
    x, y = _batch(dtype=torch.float32)
    result = PredictiveCoding(
        inference="simultaneous", inference_steps=4, inference_lr=0.1
    ).training_loss(net, x, y)
    assert result.metrics["inference_steps"].item() == 4
    assert result.metrics["state_update_rms"].shape == (2,)
    assert result.metrics["energy_per_layer"].shape == (3,)
    torch.testing.assert_close(
        result.metrics["energy_per_layer"].sum(), result.metrics["energy_after"]
    )
    inference = PredictiveCoding(
        inference="simultaneous", inference_steps=4, inference_lr=0.1
    ).infer(net, x, y)
    blocks = list(net)
    for l in (1, 2):
        eps = inference.states[l] - blocks[l - 1](inference.states[l - 1])
        torch.testing.assert_close(
            result.metrics["error_rms"][l - 1], eps.detach().pow(2).mean().sqrt()
        )
    reference = Backprop().training_loss(net, x, y).loss
    torch.testing.assert_close(result.loss, reference)


def test_inference_works_under_inference_mode():
    net = MLP(in_features=6, width=8, num_classes=3, depth=3)
    x, y = _batch(dtype=torch.float32)
    rule = PredictiveCoding(fast_path=False, inference="simultaneous", inference_steps=2)
    with torch.inference_mode():
        xi = x.clone()
        result = rule.infer(net, xi, y)
    assert torch.isfinite(result.energy_after)


def test_errors_name_the_problem():
    net = MLP(in_features=6, width=8, num_classes=3, depth=3)
    x, y = _batch(dtype=torch.float32)
    rule = PredictiveCoding()
    with pytest.raises(ShapeMismatchError, match=r"first layer takes \(batch, 6\)"):
        rule.training_loss(net, torch.randn(10, 7), y)
    with pytest.raises(ShapeMismatchError, match="labels"):
        rule.training_loss(net, x, y + 5)
    with pytest.raises(NonFiniteEnergyError, match="not finite"):
        rule.training_loss(net, x * float("nan"), y)
    with pytest.raises(LocalLearningError, match="hidden layers"):
        PredictiveCoding(hidden_weights=[1.0]).training_loss(net, x, y)
    with pytest.raises(LocalLearningError, match="schedule"):
        PredictiveCoding(inference="magic")


def test_step_without_trainer_lowers_the_loss():
    torch.manual_seed(9)
    net = MLP(in_features=6, width=32, num_classes=3, depth=3)
    x, y = _batch(batch=64, dtype=torch.float32)
    rule = PredictiveCoding(inference="simultaneous", inference_steps=5, inference_lr=0.2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    first = rule.step(net, x, y, optimizer).loss
    for _ in range(50):
        last = rule.step(net, x, y, optimizer).loss
    assert last < 0.7 * first


def test_tolerance_does_not_take_an_energy_rise_for_convergence():
    torch.manual_seed(10)
    net = MLP(in_features=6, width=8, num_classes=3, depth=3, activation="identity").double()
    x, y = _batch()
    rule = PredictiveCoding(
        inference="tolerance", inference_steps=12, inference_lr=1.9, tolerance=1e-6
    )
    with pytest.warns(RuntimeWarning, match="raised the energy"):
        result = rule.infer(net, x, y)
    trace = result.energy_trace
    assert any(b > a for a, b in zip(trace, trace[1:]))
    assert result.steps == 12  # did not stop at the first rise


@pytest.mark.parametrize("fixed_prediction", [True, False])
def test_logged_final_energy_is_the_energy_at_the_inferred_states(fixed_prediction):
    torch.manual_seed(11)
    net = MLP(in_features=6, width=8, num_classes=3, depth=4).double()
    x, y = _batch()
    rule = PredictiveCoding(
        inference="simultaneous", inference_steps=6, inference_lr=0.1,
        fixed_prediction=fixed_prediction, hidden_weights=[0.5, 1.0, 2.0], output_weight=1.5,
    )
    states = rule.infer(net, x, y).states
    reference = _autograd_energy(net, states, y, rule).detach()
    metrics = rule.training_loss(net, x, y).metrics
    torch.testing.assert_close(metrics["energy_after"], reference / x.shape[0])
    torch.testing.assert_close(metrics["energy_per_layer"].sum(), reference / x.shape[0])


class _Residual(nn.Module):
    """``x + tanh(W x)``: a block that is not a Linear(+activation)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


def test_exactness_identity_with_residual_and_flatten_blocks():
    """Any nn.Module is a block: a conv block, a bare Flatten, a residual block, a readout."""
    torch.manual_seed(12)
    net = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        nn.Flatten(),
        nn.Sequential(nn.Linear(3 * 4 * 4, 10), nn.Tanh()),
        _Residual(10),
        nn.Linear(10, 4),
    ).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    pc = PredictiveCoding("cross_entropy", output_weight=0.5)
    pc_grads = _grads(net, pc.training_loss(net, x, y).surrogate)
    bp_grads = _grads(net, Backprop("cross_entropy").training_loss(net, x, y).surrogate)
    assert _max_relative(pc_grads, [0.5 * g for g in bp_grads]) < 1e-10


def test_tolerance_stops_on_the_global_energy_on_every_rank():
    """Two ranks (threads with a real all-reduce) holding alternate rows of a batch stop where
    one process stops on the whole batch: same steps, energy trace, states (the rows) and mean
    weight gradient, with one scalar all-reduce per inference step. The control: each rank
    deciding on its own rows stops elsewhere (after 67 and 53 steps instead of 54)."""
    torch.manual_seed(13)
    net = MLP(in_features=6, width=16, num_classes=3, depth=3).double()
    x, _ = _batch(batch=12)
    with torch.no_grad():
        targets = net(x)
    targets[0::2] += 0.5 * torch.randn_like(targets[0::2])  # rank 0's rows are the easy ones
    targets[1::2] += 3.0 * torch.randn_like(targets[1::2])
    rule = PredictiveCoding(
        inference="tolerance", inference_steps=500, inference_lr=0.1, tolerance=1e-4,
        fixed_prediction=False,
    )
    params = list(net.parameters())
    whole = rule.infer(net, x, targets)
    whole_grads = torch.autograd.grad(rule.training_loss(net, x, targets).surrogate, params)
    alone = [rule.infer(net, x[r::2], targets[r::2]).steps for r in range(2)]
    assert 10 < whole.steps < 500 and whole.steps not in alone, (whole.steps, alone)

    def rank_work(layout: ProcessLayout):
        ranked = rule.with_settings()
        ranked.process_layout = layout
        rows = slice(layout.rank, None, layout.world_size)
        result = ranked.infer(net, x[rows], targets[rows])
        surrogate = ranked.training_loss(net, x[rows], targets[rows]).surrogate
        return result, torch.autograd.grad(surrogate, params)

    ranks = ThreadRanks(2)
    (first, first_grads), (second, second_grads) = ranks.run(rank_work)
    assert ranks.calls == [2 * whole.steps] * 2  # infer + training_loss: one per step each
    for rank, result in enumerate((first, second)):
        assert result.steps == whole.steps
        assert result.energy_trace == pytest.approx(whole.energy_trace, rel=1e-12)
        for state, expected in zip(result.states, whole.states):
            torch.testing.assert_close(state, expected[rank::2], rtol=1e-12, atol=1e-12)
    for a, b, expected in zip(first_grads, second_grads, whole_grads):
        torch.testing.assert_close((a + b) / 2, expected, rtol=1e-10, atol=1e-12)


def test_only_the_tolerance_schedule_communicates():
    """Sequential and simultaneous inference are per sample: no all-reduce, even under a
    layout of several processes."""
    torch.manual_seed(14)
    net = MLP(in_features=6, width=8, num_classes=3, depth=3).double()
    x, y = _batch(batch=4)

    def refuse(tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("inference communicated")

    for schedule in ("sequential", "simultaneous"):
        rule = PredictiveCoding(inference=schedule, inference_steps=3)
        rule.process_layout = ProcessLayout(1, 2, refuse)
        rule.training_loss(net, x, y)


@pytest.mark.parametrize("fixed_prediction", [True, False])
@pytest.mark.parametrize("fast_path", [True, False])
def test_the_outputs_inference_keeps_give_the_update_a_fresh_forward_pass_gives(
    fixed_prediction, fast_path
):
    """The training step takes the weight update's predictions from inference (so that a
    compiled inference step holds the update's forward pass too); they give the surrogate
    and the gradient of a forward pass of its own at the same inputs."""
    torch.manual_seed(4)
    net = MLP(in_features=6, width=12, num_classes=3, depth=4).double()
    x, y = _batch()
    pc = PredictiveCoding(inference="simultaneous", inference_steps=4, inference_lr=0.1,
                          fixed_prediction=fixed_prediction, fast_path=fast_path,
                          hidden_weights=[1.0, 0.0, 0.5])
    kept = pc._run(net, x, y, final_energy=True, keep_outputs=True)
    assert (kept.feedforward_outputs is not None) == fixed_prediction
    assert (kept.state_outputs is not None) == (not fixed_prediction)
    outputs = kept.feedforward_outputs or kept.state_outputs
    assert outputs[1] is None  # gamma_2 = 0: its term is 0, no forward pass is kept
    fresh = pc.infer(net, x, y)
    assert fresh.feedforward_outputs is None and fresh.state_outputs is None
    got_loss, _ = pc.weight_loss(net, kept, y)
    want_loss, _ = pc.weight_loss(net, fresh, y)
    assert torch.equal(got_loss, want_loss)
    params = list(net.parameters())
    got = torch.autograd.grad(got_loss, params, allow_unused=True)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        assert (g is None and w is None) or torch.equal(g, w)
