"""Deep linear PC closed form (spec section 4).

References: the stationarity linear system of an energy written out here and solved with
``torch.linalg.solve``; autograd of the MSE loss and of the energy; minimum-norm least squares
(``torch.linalg.lstsq``); and the library's PC rule run to convergence (both its closed-form
fast path and its autograd path).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_local.diagnostics.deep_linear import (
    compare_updates,
    gd_gradients,
    gnt_gradients,
    layer_cosines,
    linear_equilibrium,
    linear_weights,
    output_jacobians,
    pc_gradients,
    pc_gram_matrix,
)
from lightning_local.errors import LocalLearningError, UnsupportedNetworkError
from lightning_local.models import MLP
from lightning_local.parametrization import SP, MuP, set_base_shapes
from lightning_local.rules.predictive_coding import PredictiveCoding

DEPTHS = [2, 3, 4, 5]


def _net(depth: int, seed: int = 0, width: int = 7, features: int = 5, outputs: int = 3):
    torch.manual_seed(seed)
    return MLP(features, width, outputs, depth=depth, activation="identity", bias=False).double()


def _batch(seed: int = 0, batch: int = 4, features: int = 5, outputs: int = 3):
    generator = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(batch, features, generator=generator, dtype=torch.float64)
    y = torch.randn(batch, outputs, generator=generator, dtype=torch.float64)
    return x, y


def _gammas(depth: int) -> tuple[list[float], float]:
    """Unequal energy weights, so a misplaced gamma cannot cancel."""
    return [1.0 + 0.5 * i for i in range(depth - 1)], 1.7


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _weights(net: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, nn.Linear)]


def _energy(weights, x, y, states, hidden, output):
    """F = sum_l gamma_l/2 ||x_l - W_l x_{l-1}||^2 + gamma_L/2 ||W_L x_{L-1} - y||^2 (batch sum)."""
    layers = [x, *states]
    total = sum(
        0.5 * g * (layers[i + 1] - layers[i] @ w.T).pow(2).sum()
        for i, (g, w) in enumerate(zip(hidden, weights[:-1]))
    )
    return total + 0.5 * output * (layers[-1] @ weights[-1].T - y).pow(2).sum()


# ----------------------------------------------------------- closed form vs. brute force
@pytest.mark.parametrize("depth", DEPTHS)
def test_equilibrium_solves_the_stationarity_system(depth):
    """Stack all hidden states of a sample into z; F is quadratic: solve A z = -b directly."""
    net = _net(depth, seed=depth)
    x, y = _batch(depth)
    hidden, output = _gammas(depth)
    weights = [w.detach() for w in _weights(net)]
    sizes = [w.shape[0] for w in weights[:-1]]
    equilibrium = linear_equilibrium(net, x, y, output, hidden)
    energy_at_solution = 0.0
    for b in range(x.shape[0]):

        def energy_of(z, b=b):
            states = [part.unsqueeze(0) for part in torch.split(z, sizes)]
            return _energy(weights, x[b : b + 1], y[b : b + 1], states, hidden, output)

        zero = torch.zeros(sum(sizes), dtype=torch.float64)
        hessian = torch.autograd.functional.hessian(energy_of, zero)
        linear_term = torch.autograd.functional.jacobian(energy_of, zero)
        solution = torch.linalg.solve(hessian, -linear_term)
        expected = torch.split(solution, sizes)
        for got, want in zip(equilibrium.states[1:], expected):
            assert _relative(got[b], want) < 1e-10
        energy_at_solution += float(energy_of(solution))
    # errors are x_l - W_l x_{l-1} at the same states, and the energy is its minimum
    for error, weight, below, above in zip(
        equilibrium.errors, weights, equilibrium.states[:-1], equilibrium.states[1:]
    ):
        assert _relative(error, above - below @ weight.T) < 1e-12
    assert float(equilibrium.energy) == pytest.approx(energy_at_solution, rel=1e-10)
    prediction = equilibrium.states[-1] @ weights[-1].T
    assert _relative(equilibrium.output_residual, prediction - y) < 1e-10


def test_equilibrium_matches_the_spec_formula_for_two_layers():
    """L = 2: eps_1* = -(gL/g1) W2^T (I + C)^{-1} (W2 W1 x - y) with C = (gL/g1) W2 W2^T."""
    net = _net(2, seed=3)
    x, y = _batch(3)
    g1, g_out = 0.6, 2.5
    w1, w2 = (w.detach() for w in _weights(net))
    c = (g_out / g1) * w2 @ w2.T
    damped = torch.linalg.inv(torch.eye(3, dtype=torch.float64) + c) @ (w2 @ w1 @ x.T - y.T)
    expected = (-(g_out / g1) * w2.T @ damped).T
    got = linear_equilibrium(net, x, y, g_out, g1)
    assert _relative(got.errors[0], expected) < 1e-12
    assert _relative(got.gram, c) < 1e-14
    assert _relative(pc_gram_matrix(net, g_out, g1), c) < 1e-14


@pytest.mark.parametrize("depth", DEPTHS)
def test_gd_gradients_match_autograd(depth):
    net = _net(depth, seed=depth)
    x, y = _batch(depth)
    net.zero_grad()
    (0.5 * (net(x) - y).pow(2).sum(1).mean()).backward()
    for got, weight in zip(gd_gradients(net, x, y), _weights(net)):
        assert _relative(got, weight.grad) < 1e-12


@pytest.mark.parametrize("depth", DEPTHS)
def test_gnt_gradients_regress_to_minimum_norm_targets(depth):
    """Each layer's target moves the output onto y alone, with the least-norm change."""
    net = _net(depth, seed=depth, width=6)
    x, y = _batch(depth)
    weights = [w.detach() for w in _weights(net)]
    activations = [x]
    for weight in weights:
        activations.append(activations[-1] @ weight.T)
    jacobians = output_jacobians(weights)
    for layer, (got, jacobian) in enumerate(zip(gnt_gradients(net, x, y), jacobians)):
        # minimum-norm delta with J delta = y - f (columns = samples), by SVD least squares
        delta = torch.linalg.lstsq(jacobian, (y - activations[-1]).T, driver="gelsd").solution
        target = activations[layer + 1] + delta.T
        output = target
        for weight in weights[layer + 1 :]:
            output = output @ weight.T
        assert _relative(output, y) < 1e-10  # the target reaches y by itself
        local = torch.zeros_like(weights[layer], requires_grad=True)
        loss = 0.5 * (target - activations[layer] @ (weights[layer] + local).T).pow(2).sum(1)
        (reference,) = torch.autograd.grad(loss.mean(), local)
        assert _relative(got, reference) < 1e-10
    assert _relative(gnt_gradients(net, x, y)[-1], gd_gradients(net, x, y)[-1]) < 1e-12


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("fixed_prediction", [False, True])
def test_pc_gradients_are_the_energy_gradient(depth, fixed_prediction):
    """Without FPA: dF/dW / B at the equilibrium states; with FPA: feedforward inputs."""
    net = _net(depth, seed=depth)
    x, y = _batch(depth)
    hidden, output = _gammas(depth)
    equilibrium = linear_equilibrium(net, x, y, output, hidden)
    weights = [w.detach().clone().requires_grad_(True) for w in _weights(net)]
    if fixed_prediction:
        h = equilibrium.feedforward
        surrogate = sum(
            0.5 * g * (xl - hp @ w.T).pow(2).sum()
            for g, xl, hp, w in zip(hidden, equilibrium.states[1:], h[:-2], weights[:-1])
        ) + 0.5 * output * (h[-2] @ weights[-1].T - y).pow(2).sum()
    else:
        surrogate = _energy(weights, x, y, equilibrium.states[1:], hidden, output)
    references = torch.autograd.grad(surrogate / x.shape[0], weights)
    got = pc_gradients(net, x, y, output, hidden, fixed_prediction=fixed_prediction)
    for a, b in zip(got, references):
        assert _relative(a, b) < 1e-10


@pytest.mark.parametrize("depth", DEPTHS)
def test_small_output_weight_gives_gradient_descent(depth):
    """C -> 0: PC's equilibrium gradient (without FPA) is gamma_L times GD's."""
    net = _net(depth, seed=depth)
    x, y = _batch(depth)
    gamma = 1e-7
    for a, b in zip(pc_gradients(net, x, y, gamma), gd_gradients(net, x, y)):
        assert _relative(a / gamma, b) < 1e-5
    assert float(compare_updates(net, x, y, gamma).cos_pc_gd.min()) > 1 - 1e-9
    # FPA at equilibrium is not GD beyond two layers: x_l* - h_l accumulates the errors of
    # the layers below (eps_l + W_l eps_{l-1} + ...), not eps_l alone
    fpa = pc_gradients(net, x, y, gamma, fixed_prediction=True)
    mismatch = max(_relative(a / gamma, b) for a, b in zip(fpa, gd_gradients(net, x, y)))
    assert (mismatch > 1e-2) == (depth > 2)


def test_large_output_weight_gives_gauss_newton_targets_in_two_layers():
    """C -> inf (L = 2): the hidden PC error is -W2^+ r, so PC's hidden update is GNT's."""
    net = _net(2, seed=4, width=9)
    x, y = _batch(4)
    comparison = compare_updates(net, x, y, output_weight=1e9)
    assert float(comparison.cos_pc_gnt[0]) > 1 - 1e-9
    assert float(comparison.cos_pc_gd[0]) < 0.999  # and GD's direction differs
    fpa = pc_gradients(net, x, y, 1e9, fixed_prediction=True)
    assert _relative(fpa[0], gnt_gradients(net, x, y)[0]) < 1e-6


# ------------------------------------------------------------- the library's PC rule
def _rule_grads(net, rule, x, y):
    net.zero_grad(set_to_none=True)
    rule.training_loss(net, x, y).surrogate.backward()
    return [w.grad.detach().clone() for w in _weights(net)]


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("fixed_prediction", [False, True])
def test_rule_converges_to_the_closed_form(depth, fast_path, fixed_prediction):
    """Simultaneous inference to convergence reproduces e_l* and the PC weight gradient.

    ``fast_path=False`` runs the general (autograd, nonlinear) code path on the identity MLP:
    one implementation of inference, checked against the same closed form.
    """
    net = _net(depth, seed=depth)
    x, y = _batch(depth)
    hidden, output = _gammas(depth)
    rule = PredictiveCoding(
        inference="simultaneous", inference_steps=800, inference_lr=0.1, state_momentum=0.6,
        output_weight=output, hidden_weights=hidden, fixed_prediction=fixed_prediction,
        fast_path=fast_path,
    )
    closed = linear_equilibrium(net, x, y, output, hidden)
    inferred = rule.infer(net, x, y)
    for got, want in zip(inferred.states[1:], closed.states[1:]):
        assert _relative(got, want) < 1e-6
    errors = [
        x_l - x_prev @ w.detach().T
        for x_l, x_prev, w in zip(inferred.states[1:], inferred.states[:-1], _weights(net))
    ]
    for got, want in zip(errors, closed.errors):
        assert _relative(got, want) < 1e-6
    assert float(inferred.energy_after) == pytest.approx(float(closed.energy), rel=1e-6)
    expected = pc_gradients(net, x, y, output, hidden, fixed_prediction=fixed_prediction)
    for got, want in zip(_rule_grads(net, rule, x, y), expected):
        assert _relative(got, want) < 1e-6


@pytest.mark.parametrize("depth", [2, 4])
def test_rule_tolerance_schedule_reaches_the_closed_form(depth):
    """Run-to-tolerance inference (tolerance 0: until the energy stops decreasing)."""
    net = _net(depth, seed=10 + depth)
    x, y = _batch(depth)
    hidden, output = _gammas(depth)
    rule = PredictiveCoding(
        inference="tolerance", inference_steps=20_000, inference_lr=0.1, tolerance=0.0,
        output_weight=output, hidden_weights=hidden, fixed_prediction=False,
    )
    inferred = rule.infer(net, x, y)
    assert inferred.steps < 20_000
    closed = linear_equilibrium(net, x, y, output, hidden)
    for got, want in zip(inferred.states[1:], closed.states[1:]):
        assert _relative(got, want) < 1e-6
    expected = pc_gradients(net, x, y, output, hidden)
    for got, want in zip(_rule_grads(net, rule, x, y), expected):
        assert _relative(got, want) < 1e-6


def test_plain_sequential_of_linear_layers_and_class_labels():
    """Any nn.Sequential of bias-free Linear blocks; integer labels are one-hot targets."""
    torch.manual_seed(7)
    net = nn.Sequential(
        nn.Linear(4, 6, bias=False), nn.Linear(6, 5, bias=False), nn.Linear(5, 3, bias=False)
    ).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    rule = PredictiveCoding(
        inference="simultaneous", inference_steps=800, inference_lr=0.1, state_momentum=0.6,
        output_weight=0.8, fixed_prediction=False,
    )
    expected = pc_gradients(net, x, labels, 0.8)
    for got, want in zip(_rule_grads(net, rule, x, labels), expected):
        assert _relative(got, want) < 1e-6
    one_hot = torch.nn.functional.one_hot(labels, 3).double()
    for a, b in zip(expected, pc_gradients(net, x, one_hot, 0.8)):
        assert _relative(a, b) < 1e-14


# ----------------------------------------------------------------- width scaling
WIDTHS = [32, 64, 128, 256, 512]


def _wide(width, parametrization, seed):
    torch.manual_seed(seed)
    net = MLP(16, width, 4, depth=3, activation="identity", bias=False).double()
    set_base_shapes(net, WIDTHS[0])
    parametrization.initialize(net, rule="pc", optimizer="sgd")
    return net


def _width_sweep(parametrization, cosines: bool = True):
    """Mean over 3 seeds of ||C||_2 and of 1 - cos(PC, GD) on the hidden layers, per width."""
    x, y = _batch(0, batch=8, features=16, outputs=4)
    norms, gaps = [], []
    for width in WIDTHS:
        values = []
        for seed in range(3):
            net = _wide(width, parametrization, seed)
            gamma = parametrization.output_weight(1.0, net)
            if cosines:
                comparison = compare_updates(net, x, y, gamma)
                values.append((comparison.gram_norm, 1 - comparison.hidden_cos_pc_gd))
            else:
                gram = pc_gram_matrix(net, gamma)
                values.append((float(torch.linalg.matrix_norm(gram, ord=2)), float("nan")))
        norm, gap = np.mean(values, axis=0)
        norms.append(norm)
        gaps.append(gap)
    return np.array(norms), np.array(gaps)


def _slope(values) -> float:
    return float(np.polyfit(np.log(WIDTHS), np.log(values), 1)[0])


def test_gram_norm_and_cosine_scaling_with_width():
    """||C|| ~ M^{-1} under muP (gamma_L = 1), ~ M^0 under SP; muP's PC -> GD with width."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MuP warns for g < -1, used here on purpose
        mup_norms, mup_gaps = _width_sweep(MuP(0.0))
        sp_norms, _ = _width_sweep(SP(), cosines=False)
        gnt_norms, gnt_gaps = _width_sweep(MuP(-1.0))
        unstable_norms, _ = _width_sweep(MuP(-1.5), cosines=False)
    assert -1.25 < _slope(mup_norms) < -0.85
    assert abs(_slope(sp_norms)) < 0.2
    assert abs(_slope(gnt_norms)) < 0.2  # gamma_L ~ M cancels the readout's 1/M
    assert 0.35 < _slope(unstable_norms) < 0.65  # C grows like M^{-1-g}
    # cos(PC, GD) -> 1 under muP with gamma_L = 1 ...
    assert _slope(mup_gaps) < -1.0 and mup_gaps[-1] < 1e-3
    # ... but not when gamma_L grows with width (g = -1): C stays Theta(1)
    assert gnt_gaps[-1] > 10 * mup_gaps[-1]


# ------------------------------------------------------------------------ errors
def test_rejects_nonlinear_or_biased_networks():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedNetworkError, match="activation='identity'"):
        linear_weights(MLP(4, 5, 2, depth=3, activation="tanh", bias=False))
    with pytest.raises(UnsupportedNetworkError, match="bias=False"):
        linear_weights(MLP(4, 5, 2, depth=3, activation="identity", bias=True))


def test_rejects_bad_energy_weights_and_mismatched_layers():
    net = _net(3)
    x, y = _batch()
    with pytest.raises(LocalLearningError, match="one value per hidden layer"):
        linear_equilibrium(net, x, y, 1.0, [1.0, 1.0, 1.0])
    with pytest.raises(LocalLearningError, match="positive"):
        linear_equilibrium(net, x, y, 0.0)
    with pytest.raises(LocalLearningError, match="one matrix per layer"):
        layer_cosines(gd_gradients(net, x, y), gd_gradients(net, x, y)[:-1])
