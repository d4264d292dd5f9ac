"""Property-based tests: the rules' stated identities over random networks, batches and settings.

Hypothesis draws the problem: 1 to 4 hidden blocks of width 2 to 24 (each its own), an input
size, an output size, an activation (tanh, relu, identity, gelu, sigmoid, silu, softplus), with
or without biases, the blocks grouped by hand or left as a flat ``nn.Sequential`` for the
network view to group, a batch of 1 to 9 samples, the MSE or cross-entropy loss, and class
labels or dense targets. Each test is deterministic (``derandomize=True``, no example
database) and small. Properties, with the reference each is checked against:

1. Exactness identity (docs/math.md, section 1.8). PC from the feedforward states with one
   sequential sweep and the fixed prediction assumption gives, for block ``l``,
   ``dS_PC/dW_l = gamma_L * prod_{k=l..L-1} (kappa_k gamma_k) * dL/dW_l``, for any state step
   sizes ``kappa_k``, hidden weights ``gamma_k``, output weight ``gamma_L``, state momentum and
   either linearization; the paper's setting ``kappa = gamma = 1`` is ``gamma_L`` times
   backprop. [autograd of the loss written out with ``torch.nn.functional``, float64.]
2. PC inference is gradient descent on the energy (sections 1.1, 1.5): the states after ``T``
   simultaneous steps, sequential sweeps or tolerance steps, with momentum, equal ``T`` steps
   of descent on the written-out energy; the reported energies, the tolerance trace and its
   stopping rule agree with it. [autograd of the energy written out in the test.]
3. Target propagation (sections 2.2 to 2.6): the readout's update is ``w_L beta`` times
   backprop's for every variant and feedback; the targets follow ``tau_L = f - beta dloss/df``
   and the TP / DTP recursions through the network's feedback maps; each block's update is
   the gradient of its local loss; and the closed-form ridge feedback (with or without the
   noise term) zeroes the gradient of the objective it minimizes. [autograd and the stated
   objectives, written out in the test.]
4. No rule crashes: every registered rule and every schedule (backprop; PC sequential with and
   without FPA, simultaneous, tolerance; TP; DTP with ridge, noisy-ridge, noisy-loss, fixed
   feedback) runs one ``rule.step`` with an optimizer from ``wire`` (SP or muP, SGD, Adam or
   AdamW, float32 or float64, some parameters frozen) and leaves finite gradients of the
   right shapes exactly on the parameters that require grad, and finite weights and metrics.
5. The energy does not rise at a small step size (section 1.5): with smooth activations and a
   small ``kappa``, the energy after ``t`` simultaneous steps or sequential sweeps is
   non-increasing in ``t``. [the energy written out in the test.] ReLU is left out: its
   energy has convex kinks, across which a step of any fixed size can raise it.

Last, the regression test of a bug property 4 found: TP's feedback maps follow the forward
network's dtype (and device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_local.rules import RULES, PredictiveCoding, TargetPropagation, get_rule_class
from lightning_local.rules._feedback import linear_map
from lightning_local.wiring import wire

PROPERTY = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "identity": None,  # no activation: a plain affine block
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}
SMOOTH = tuple(name for name in ACTIVATIONS if name != "relu")

SCHEDULES: dict[str, tuple[str, dict]] = {
    "bp": ("bp", {}),
    "pc-si-fpa": ("pc", dict(inference="sequential", fixed_prediction=True)),
    "pc-si": ("pc", dict(inference="sequential", inference_steps=2, fixed_prediction=False)),
    "pc-sim": ("pc", dict(inference="simultaneous", inference_steps=4, inference_lr=0.2,
                          fixed_prediction=False)),
    "pc-tolerance": ("pc", dict(inference="tolerance", inference_steps=20, inference_lr=0.2,
                                tolerance=1e-3, fixed_prediction=False)),
    "tp": ("tp", dict(variant="tp")),
    "dtp-ridge": ("tp", dict(variant="dtp", feedback_training="ridge")),
    "dtp-ridge-noise": ("tp", dict(variant="dtp", feedback_training="ridge", ridge_noise=0.5)),
    "dtp-noisy": ("tp", dict(variant="dtp", feedback_training="noisy", noise_std=0.1)),
    "dtp-noisy-nonlinear": ("tp", dict(variant="dtp", feedback="nonlinear",
                                       feedback_training="noisy", feedback_steps=2)),
    "dtp-fixed": ("tp", dict(variant="dtp", feedback_training="none")),
}
CASES = dict(SCHEDULES)
for _family in RULES:  # a registered rule without schedules runs with its defaults
    if _family not in {family for family, _ in CASES.values()}:
        CASES[_family] = (_family, {})


# ----------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """A drawn network architecture, loss and batch."""

    in_features: int
    widths: list[int]
    classes: int
    activation: str
    bias: bool
    flat: bool
    sigma: float
    loss: str
    batch: int
    dense_targets: bool
    seed: int

    @property
    def hidden(self) -> int:
        return len(self.widths)

    def network(
        self, dtype: torch.dtype = torch.float64, widths: list[int] | None = None
    ) -> tuple[nn.Sequential, list[nn.Module]]:
        """The network and its blocks ``f_1 .. f_L`` (the test's own grouping, same modules).

        Weights ``N(0, sigma^2 / fan_in)``, biases ``N(0, (sigma / 4)^2)``.
        """
        generator = torch.Generator().manual_seed(self.seed)
        sizes = [self.in_features, *(widths or self.widths), self.classes]
        layers: list[nn.Module] = []
        blocks: list[nn.Module] = []
        for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            linear = nn.Linear(fan_in, fan_out, bias=self.bias, dtype=dtype)
            with torch.no_grad():
                weight = torch.randn(fan_out, fan_in, generator=generator, device="cpu")
                linear.weight.copy_(weight * (self.sigma / math.sqrt(fan_in)))
                if linear.bias is not None:
                    bias = torch.randn(fan_out, generator=generator, device="cpu")
                    linear.bias.copy_(bias * (self.sigma / 4))
            activation = ACTIVATIONS[self.activation]
            if index == len(sizes) - 2:  # the linear readout
                layers.append(linear)
                blocks.append(linear)
            elif self.flat:  # the network view groups the activation with its Linear
                layers.extend([linear] if activation is None else [linear, activation()])
                blocks.append(linear if activation is None else nn.Sequential(*layers[-2:]))
            else:
                layers.append(nn.Sequential(linear, (activation or nn.Identity)()))
                blocks.append(layers[-1])
        return nn.Sequential(*layers), blocks

    def data(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        x = torch.randn(self.batch, self.in_features, generator=generator, dtype=dtype)
        if not self.dense_targets:
            return x, torch.randint(0, self.classes, (self.batch,), generator=generator)
        y = torch.randn(self.batch, self.classes, generator=generator, dtype=dtype)
        return x, (y if self.loss == "mse" else torch.softmax(2 * y, dim=1))


@st.composite
def problems(draw, activations=tuple(ACTIVATIONS), max_sigma=2.0, uniform=False):
    hidden = draw(st.integers(1, 4))
    if uniform:
        widths = [draw(st.integers(2, 24))] * hidden
    else:
        widths = draw(st.lists(st.integers(2, 24), min_size=hidden, max_size=hidden))
    return Problem(
        in_features=draw(st.integers(1, 8)),
        widths=widths,
        classes=draw(st.integers(2, 5)),
        activation=draw(st.sampled_from(activations)),
        bias=draw(st.booleans()),
        flat=draw(st.booleans()),
        sigma=draw(st.floats(0.5, max_sigma)),
        loss=draw(st.sampled_from(["mse", "cross_entropy"])),
        batch=draw(st.integers(1, 9)),
        dense_targets=draw(st.booleans()),
        seed=draw(st.integers(0, 2**20)),
    )


def per_layer(low=0.0, high=2.0, count=1):
    """``count`` step sizes or weights in ``[low, high]``; draws under 0.1 become exactly 0."""
    value = st.floats(low, high, allow_subnormal=False).map(lambda v: 0.0 if v < 0.1 else v)
    return st.lists(value, min_size=count, max_size=count)


# ----------------------------------------------------------------------------- references
def target_matrix(y: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    return F.one_hot(y, classes).to(dtype) if y.dtype == torch.int64 else y


def loss_sum(output: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """``sum_b loss(f_b, y_b)`` written with ``torch.nn.functional`` (docs/math.md, 0.2)."""
    if loss == "mse":
        return 0.5 * F.mse_loss(output, target_matrix(y, output.shape[1], output.dtype),
                                reduction="sum")
    return F.cross_entropy(output, y, reduction="sum")


def energy(layers: list[nn.Module], states, y, loss: str, gammas) -> torch.Tensor:
    """The PC energy of docs/math.md, section 1.1, with ``mu_l = f_l(x_{l-1})``."""
    total = states[0].new_zeros(())
    for l, layer in enumerate(layers[:-1]):
        total = total + 0.5 * gammas[l] * (states[l + 1] - layer(states[l])).pow(2).sum()
    return total + gammas[-1] * loss_sum(layers[-1](states[-1]), y, loss)


def feedforward(layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    activations = [x]
    for layer in layers:
        activations.append(layer(activations[-1]))
    return activations


def reference_inference(layers, x, y, loss, gammas, kappas, momentum, schedule, steps):
    """``steps`` steps (sweeps) of gradient descent on :func:`energy`, from F-ini.

    Returns the states after each step and the energy before the first and after each step.
    """
    with torch.no_grad():
        states = [x] + [h.clone() for h in feedforward(layers, x)[1:-1]]
    hidden = len(states) - 1
    velocity: list[torch.Tensor | None] = [None] * hidden

    def grads_at(moving: list[int]) -> list[torch.Tensor]:
        with torch.enable_grad():
            leaves = [s.detach().requires_grad_(i in moving) for i, s in enumerate(states)]
            value = energy(layers, leaves, y, loss, gammas)
            return torch.autograd.grad(value, [leaves[i] for i in moving])

    def move(layer: int, grad: torch.Tensor) -> None:
        if momentum and velocity[layer - 1] is not None:
            grad = momentum * velocity[layer - 1] + grad
        velocity[layer - 1] = grad
        states[layer] = states[layer] - kappas[layer - 1] * grad

    def current() -> float:
        with torch.no_grad():
            return float(energy(layers, states, y, loss, gammas))

    trace, history = [current()], []
    for _ in range(steps):
        if schedule == "sequential":  # top-down, each layer sees the layer above as moved
            for layer in range(hidden, 0, -1):
                move(layer, grads_at([layer])[0])
        else:
            for layer, grad in zip(range(1, hidden + 1), grads_at(list(range(1, hidden + 1)))):
                move(layer, grad)
        history.append([s.detach().clone() for s in states])
        trace.append(current())
    return history, trace


def gradients(net: nn.Module, surrogate: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """``d surrogate / d p`` for every parameter (0 where the surrogate does not use it)."""
    net.zero_grad(set_to_none=True)
    surrogate.backward()
    return {p: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
            for p in net.parameters()}


def assert_scaled(got, want, blocks, factors) -> None:
    """``got[p] == factors[l] * want[p]`` for every parameter ``p`` of block ``l``."""
    scale = max(abs(f) * float(want[p].abs().max()) for f, block in zip(factors, blocks)
                for p in block.parameters())
    for l, (factor, block) in enumerate(zip(factors, blocks)):
        for p in block.parameters():
            torch.testing.assert_close(got[p], factor * want[p], rtol=1e-9,
                                       atol=1e-12 * max(scale, 1e-30),
                                       msg=lambda m, l=l: f"block {l + 1}: {m}")


ENERGY_RISE = "ignore:predictive-coding inference raised the energy:RuntimeWarning"


# ----------------------------------------------------------------- 1. exactness identity
@PROPERTY
@given(problem=problems(), data=st.data())
def test_single_sweep_with_fpa_is_scaled_backprop(problem, data):
    """docs/math.md 1.8: dS_PC/dW_l = gamma_L prod_{k=l..L-1} (kappa_k gamma_k) dL/dW_l."""
    hidden = problem.hidden
    kappas = data.draw(per_layer(count=hidden).filter(lambda ks: any(k > 0 for k in ks)),
                       label="kappas")
    gammas = data.draw(per_layer(count=hidden), label="gammas")
    output_weight = data.draw(st.floats(0.1, 4.0), label="output_weight")
    rule = PredictiveCoding(
        problem.loss, inference="sequential", inference_steps=1, fixed_prediction=True,
        inference_lr=kappas, hidden_weights=gammas, output_weight=output_weight,
        state_momentum=data.draw(st.floats(0.0, 0.9), label="state_momentum"),
        fast_path=data.draw(st.booleans(), label="fast_path"),
    )
    net, blocks = problem.network()
    x, y = problem.data()
    pc = gradients(net, rule.training_loss(net, x, y).surrogate)
    bp = gradients(net, loss_sum(net(x), y, problem.loss) / problem.batch)
    factors = [output_weight * math.prod(k * g for k, g in zip(kappas[l:], gammas[l:]))
               for l in range(hidden)] + [output_weight]
    assert_scaled(pc, bp, blocks, factors)


@PROPERTY
@given(problem=problems(), fast_path=st.booleans())
def test_paper_setting_is_exactly_backprop(problem, fast_path):
    """The default rule (kappa = gamma = gamma_L = 1): PC's update is backprop's."""
    net, blocks = problem.network()
    x, y = problem.data()
    pc = gradients(net, PredictiveCoding(problem.loss, fast_path=fast_path)
                   .training_loss(net, x, y).surrogate)
    bp = gradients(net, loss_sum(net(x), y, problem.loss) / problem.batch)
    assert_scaled(pc, bp, blocks, [1.0] * len(blocks))


# ------------------------------------------------------ 2. inference is descent on F
@pytest.mark.filterwarnings(ENERGY_RISE)  # kappa up to 0.5: a step may raise the energy
@PROPERTY
@given(problem=problems(), data=st.data())
def test_inference_is_gradient_descent_on_the_energy(problem, data):
    hidden = problem.hidden
    schedule = data.draw(st.sampled_from(["sequential", "simultaneous", "tolerance"]),
                         label="schedule")
    steps = data.draw(st.integers(1, 5), label="steps")
    kappas = data.draw(per_layer(0.0, 0.5, hidden).filter(lambda ks: any(k > 0 for k in ks)),
                       label="kappas")
    gammas = data.draw(per_layer(count=hidden), label="gammas")
    output_weight = data.draw(st.floats(0.1, 2.0), label="output_weight")
    momentum = data.draw(st.sampled_from([0.0, 0.5]), label="state_momentum")
    rule = PredictiveCoding(
        problem.loss, inference=schedule, inference_steps=steps, inference_lr=kappas,
        hidden_weights=gammas, output_weight=output_weight, state_momentum=momentum,
        tolerance=data.draw(st.sampled_from([0.0, 1e-3, 1e-1]), label="tolerance"),
        fast_path=data.draw(st.booleans(), label="fast_path"),
    )
    net, layers = problem.network()
    x, y = problem.data()
    result = rule.infer(net, x, y)
    history, trace = reference_inference(
        layers, x, y, problem.loss, gammas + [output_weight], kappas, momentum,
        "sequential" if schedule == "sequential" else "simultaneous", steps,
    )
    taken = result.steps
    assert 1 <= taken <= steps and (schedule == "tolerance" or taken == steps)
    for got, want in zip(result.states[1:], history[taken - 1][1:]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    close = dict(rel_tol=1e-9, abs_tol=1e-11 * max(1.0, trace[0]))
    assert math.isclose(float(result.energy_before), trace[0], **close)
    assert math.isclose(float(result.energy_after), trace[taken], **close)
    with torch.no_grad():
        per_layer_terms = [0.5 * g * (s1 - layer(s0)).pow(2).sum() for g, layer, s0, s1 in
                           zip(gammas, layers, result.states[:-1], result.states[1:])]
    assert torch.allclose(result.energy_per_layer[:-1], torch.stack(per_layer_terms),
                          rtol=1e-9, atol=1e-11 * max(1.0, trace[0]))
    if schedule == "tolerance":  # the trace is the energy before each step, then after the last
        assert len(result.energy_trace) == taken + 1
        for got, want in zip(result.energy_trace, trace):
            assert math.isclose(got, want, **close)
        own = result.energy_trace

        def stops(t):  # docs/math.md 1.5: stop after step t when 0 <= F_{t-1} - F_t <= tol |F|
            return 0 <= own[t - 1] - own[t] <= rule.tolerance * max(abs(own[t - 1]), 1e-30)

        assert not any(stops(t) for t in range(1, taken))
        assert taken == steps or stops(taken)


# --------------------------------------------------------- 3. target propagation
@PROPERTY
@given(problem=problems(), data=st.data())
def test_target_propagation_targets_updates_and_ridge_feedback(problem, data):
    variant = data.draw(st.sampled_from(["tp", "dtp"]), label="variant")
    training = data.draw(st.sampled_from(["ridge", "noisy", "none"]), label="feedback_training")
    kind = "linear" if training == "ridge" else data.draw(
        st.sampled_from(["linear", "nonlinear"]), label="feedback")
    beta = data.draw(st.floats(0.05, 1.0), label="beta")
    weights = data.draw(per_layer(count=problem.hidden + 1).filter(lambda ws: any(ws)),
                        label="layer_weights")
    ridge = data.draw(st.floats(0.01, 1.0), label="ridge")
    ridge_noise = data.draw(st.sampled_from([0.0, 0.3]), label="ridge_noise")
    rule = TargetPropagation(
        problem.loss, variant=variant, feedback=kind, feedback_training=training, beta=beta,
        layer_weights=weights, ridge=ridge, ridge_noise=ridge_noise,
    )
    net, layers = problem.network()
    network = rule.build_network(net).double()  # see test_feedback_maps_follow_the_network_dtype
    x, y = problem.data()
    with torch.no_grad():
        h = feedforward(layers, x)
    surrogate = rule.training_loss(network, x, y).surrogate
    tp = gradients(net, surrogate)
    feedback = list(network.feedback)

    # the targets: tau_L = f - beta dloss/df, then TP / DTP through the feedback maps
    with torch.enable_grad():
        output = h[-1].detach().requires_grad_(True)
        (output_grad,) = torch.autograd.grad(loss_sum(output, y, problem.loss), output)
    targets = rule.layer_targets(network, x, y)  # closed-form feedback: the same fit again
    with torch.no_grad():
        want = [h[-1] - beta * output_grad]
        for l in range(len(layers), 1, -1):
            g = feedback[l - 2]
            below = g(want[0]) if variant == "tp" else h[l - 1] + g(want[0]) - g(h[l])
            want.insert(0, below)
    for got, expected in zip(targets, want):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)

    # each block's update is the gradient of its local loss (w_l / 2B) ||tau_l - f_l(h_{l-1})||^2
    for l, layer in enumerate(layers):
        params = list(layer.parameters())
        local = weights[l] / (2 * problem.batch) * (want[l] - layer(h[l])).pow(2).sum()
        reference = torch.autograd.grad(local, params, allow_unused=True)
        for p, r in zip(params, reference):
            torch.testing.assert_close(tp[p], torch.zeros_like(p) if r is None else r,
                                       rtol=1e-9, atol=1e-12)
    # ... so the readout's is w_L beta times backprop's (docs/math.md 2.4)
    bp = gradients(net, loss_sum(net(x), y, problem.loss) / problem.batch)
    for p in layers[-1].parameters():
        torch.testing.assert_close(tp[p], weights[-1] * beta * bp[p], rtol=1e-9, atol=1e-12)

    if training != "ridge":
        return
    # closed-form feedback zeroes the gradient of ||Q H_l - H_{l-1}||^2 + mu_l ||Q||^2
    # (+ s^2 sum_b ||Q D_b W_l - I||^2 with the noise term), mu_l = ridge * n_l (2.5, 2.6)
    for l in range(2, len(layers) + 1):
        q = linear_map(feedback[l - 2]).weight  # Q_l, n_{l-1} x n_l
        above, below = h[l], h[l - 1]
        mu = ridge * above.shape[1]
        residual = above @ q.T - below
        terms = [residual.T @ above, mu * q]  # half the objective's gradient in Q
        if ridge_noise:
            block = layers[l - 1]
            linear, activation = (block, None) if isinstance(block, nn.Linear) else block
            weight = linear.weight.detach()  # W_l, n_l x n_{l-1}
            with torch.enable_grad():
                u = linear(below).detach().requires_grad_(True)
                phi = u if activation is None else activation(u)
                (slopes,) = torch.autograd.grad(phi.sum(), u)
            eye = torch.eye(below.shape[1], dtype=q.dtype)
            for d in slopes:  # D_b = diag(phi'(u_b)): s^2 (Q D_b W_l - I) W_l^T D_b
                terms.append(ridge_noise**2 * ((q * d) @ weight - eye) @ weight.T * d)
        grad = sum(terms)
        size = sum(float(t.abs().max()) for t in terms)
        assert float(grad.abs().max()) <= 1e-9 * float(size), f"g_{l} is not the optimum"


# ------------------------------------------------------------------ 4. no rule crashes
@pytest.mark.filterwarnings(ENERGY_RISE)
@pytest.mark.parametrize("name", sorted(CASES))
@settings(PROPERTY, max_examples=10)
@given(
    problem=problems(uniform=True),
    parametrization=st.sampled_from(["sp", "mup"]),
    optimizer=st.sampled_from(["sgd", "adam", "adamw"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    data=st.data(),
)
def test_every_rule_and_schedule_steps_on_random_networks(
    problem, name, parametrization, optimizer, dtype, data
):
    family, rule_settings = CASES[name]
    rule = get_rule_class(family)(problem.loss, **rule_settings)
    net, _ = problem.network(dtype)
    params = list(net.parameters())
    frozen = data.draw(st.sets(st.integers(0, len(params) - 1), max_size=len(params) - 1),
                       label="frozen parameters")
    for index in frozen:
        params[index].requires_grad_(False)

    def factory(width: int) -> nn.Module:
        return problem.network(dtype, [width] * problem.hidden)[0]

    run = wire(net, rule, parametrization, optimizer=optimizer, width_factory=factory,
               base_width=8)
    x, y = problem.data(dtype)
    torch.manual_seed(problem.seed)  # noisy feedback draws from the global stream
    result = run.rule.step(run.network, x, y, run.build_optimizer(lr=0.01))

    assert torch.isfinite(result.loss) and torch.isfinite(result.surrogate.detach())
    assert result.output.shape == (problem.batch, problem.classes)
    for key, value in result.metrics.items():
        assert torch.isfinite(value).all(), key
    for pname, p in run.network.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {pname}"
            assert p.grad.shape == p.shape and p.grad.dtype == p.dtype, pname
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
        else:
            assert p.grad is None, f"{name}: gradient on the frozen {pname}"
        assert torch.isfinite(p).all(), pname


# ------------------------------------------------------- 5. energy descent at small steps
@PROPERTY
@given(
    problem=problems(activations=SMOOTH, max_sigma=1.5),
    schedule=st.sampled_from(["simultaneous", "sequential"]),
    data=st.data(),
)
def test_energy_does_not_rise_at_a_small_step_size(problem, schedule, data):
    hidden = problem.hidden
    gammas = data.draw(per_layer(0.5, 1.5, hidden), label="gammas")
    output_weight = data.draw(st.floats(0.25, 2.0), label="output_weight")
    kappa = 0.02
    net, layers = problem.network()
    x, y = problem.data()
    energies = []
    for steps in range(1, 9):
        rule = PredictiveCoding(
            problem.loss, inference=schedule, inference_steps=steps, inference_lr=kappa,
            hidden_weights=gammas, output_weight=output_weight,
        )
        result = rule.infer(net, x, y)
        with torch.no_grad():
            if not energies:  # F-ini: only the output term
                energies.append(float(output_weight * loss_sum(net(x), y, problem.loss)))
            energies.append(float(energy(layers, result.states, y, problem.loss,
                                         gammas + [output_weight])))
    slack = 1e-12 * max(1.0, energies[0])
    rises = [(t, a, b) for t, (a, b) in enumerate(zip(energies, energies[1:]), 1)
             if b > a + slack]
    assert not rises, f"the energy rose at steps {rises}"


def test_every_registered_rule_has_a_case():
    assert {family for family, _ in CASES.values()} == set(RULES)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_are_valid_settings(name):
    family, rule_settings = SCHEDULES[name]
    get_rule_class(family)(**rule_settings)


# Found by property 4: the feedback maps of target propagation were built in the default
# dtype (float32) whatever the forward network's, so a float64 network's first TP step failed
# with "expected m1 and m2 to have the same dtype" (and a float64 CNN in its shape probe).
@pytest.mark.parametrize("training", ["ridge", "noisy"])
def test_feedback_maps_follow_the_network_dtype(training):
    problem = Problem(in_features=3, widths=[4, 4], classes=2, activation="tanh", bias=True,
                      flat=False, sigma=1.0, loss="mse", batch=5, dense_targets=False, seed=0)
    net, _ = problem.network(torch.float64)
    rule = TargetPropagation(feedback_training=training)
    run = wire(net, rule)
    assert {p.dtype for p in run.network.parameters()} == {torch.float64}
    x, y = problem.data(torch.float64)
    run.rule.step(run.network, x, y, run.build_optimizer(lr=0.1))


def test_conv_feedback_maps_follow_the_network_dtype():
    from lightning_local.models import CNN

    network = TargetPropagation(feedback_training="noisy").build_network(
        CNN(image_size=8, width=4).double())
    assert {p.dtype for p in network.parameters()} == {torch.float64}
