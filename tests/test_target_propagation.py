"""Target propagation (TP / DTP): targets, feedback, updates, parametrization, feature learning."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_local.errors import LocalLearningError, UnsupportedNetworkError
from lightning_local.models import CNN, MLP
from lightning_local.network import as_blocks, feedforward
from lightning_local.parametrization import MuP, base_shapes_from_builder, set_base_shapes
from lightning_local.rules.base import ProcessLayout
from lightning_local.rules.target_propagation import TargetPropagation, TPNetwork

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tp_feature_learning.py"


def _data(batch: int = 12, features: int = 6, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=generator)
    return x, y


def _reference_loss(output: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return 0.5 * (output - F.one_hot(labels, output.shape[1])).pow(2).sum(1).mean()
    return F.cross_entropy(output, labels)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("variant", ["tp", "dtp"])
@pytest.mark.parametrize("feedback_training", ["ridge", "noisy"])
def test_last_layer_update_is_beta_times_backprop(loss, variant, feedback_training):
    torch.manual_seed(0)
    x, y = _data()
    rule = TargetPropagation(loss, variant=variant, beta=0.3, feedback_training=feedback_training)
    net = rule.build_network(MLP(6, 8, 3, depth=3)).double()
    readout = list(as_blocks(net)[-1].parameters())
    tp = torch.autograd.grad(rule.training_loss(net, x, y).surrogate, readout)
    bp = torch.autograd.grad(_reference_loss(net(x), y, loss), readout)
    for tp_grad, bp_grad in zip(tp, bp):
        torch.testing.assert_close(tp_grad, 0.3 * bp_grad, rtol=1e-10, atol=1e-12)


def _inverse_feedback_linear_net(width: int, depth: int) -> TPNetwork:
    """Square, well-conditioned linear blocks with feedback g_l = W_l^{-1} exactly."""
    generator = torch.Generator().manual_seed(1)
    blocks, inverses = [], []
    for _ in range(depth):
        weight = torch.eye(width, dtype=torch.float64) + 0.4 * torch.randn(
            width, width, generator=generator, dtype=torch.float64
        ) / math.sqrt(width)
        block = nn.Linear(width, width, bias=False).double()
        block.weight.data.copy_(weight)
        blocks.append(block)
        inverse = nn.Linear(width, width, bias=False).double()
        inverse.weight.data.copy_(torch.linalg.inv(weight))
        inverses.append(inverse)
    return TPNetwork(nn.Sequential(*blocks), nn.ModuleList(inverses[1:]), trainable_feedback=False)


@pytest.mark.parametrize("variant", ["dtp", "tp"])
def test_linear_exact_inverse_targets_are_gauss_newton_targets(variant):
    width, depth, beta = 4, 3, 0.4
    net = _inverse_feedback_linear_net(width, depth)
    x, y = _data(batch=5, features=width, classes=width)
    rule = TargetPropagation("mse", variant=variant, beta=beta, feedback_training="none")
    targets = rule.layer_targets(net, x, y)
    blocks = as_blocks(net)
    activations = feedforward(blocks, x)
    error = activations[-1] - F.one_hot(y, width)  # d loss / d f for MSE
    for layer in range(1, depth + 1):
        def upper(h, layer=layer):
            for block in blocks[layer:]:
                h = block(h)
            return h

        for b in range(x.shape[0]):
            jacobian = torch.func.jacrev(upper)(activations[layer][b])
            gauss_newton = activations[layer][b] - beta * torch.linalg.pinv(jacobian) @ error[b]
            torch.testing.assert_close(targets[layer - 1][b], gauss_newton)


def test_difference_correction_cancels_the_reconstruction_error():
    """With a zero output error (tau_L = f), DTP's targets are the activations themselves,
    whatever the feedback; TP's are the feedback reconstructions g_l(tau_l)."""
    torch.manual_seed(0)
    x, _ = _data()
    for variant in ("dtp", "tp"):
        rule = TargetPropagation("mse", variant=variant, feedback_training="none")
        net = rule.build_network(MLP(6, 8, 3, depth=3)).double()
        activations = feedforward(as_blocks(net), x)
        targets = rule.layer_targets(net, x, activations[-1].detach())  # MSE error is 0
        if variant == "dtp":
            expected = activations[1:]
        else:
            second = net.feedback[1](activations[3])
            expected = [net.feedback[0](second), second, activations[3]]
        for tau, reference in zip(targets, expected):
            torch.testing.assert_close(tau, reference)


def _ridge_reference(features, reconstruct, mu):
    """argmin_Q ||X Q^T - Y||^2 + mu ||Q||^2 as least squares on the augmented system."""
    width = features.shape[1]
    a = torch.cat([features, math.sqrt(mu) * torch.eye(width, dtype=features.dtype)])
    b = torch.cat([reconstruct, torch.zeros(width, reconstruct.shape[1], dtype=features.dtype)])
    return torch.linalg.lstsq(a, b).solution.T


@pytest.mark.parametrize("batch", [5, 40])  # dual (B < width) and primal systems
@pytest.mark.parametrize("ranks", [1, 2])
def test_closed_form_feedback_is_the_ridge_regression_solution(batch, ranks):
    torch.manual_seed(0)
    rule = TargetPropagation(ridge=0.05)
    net = rule.build_network(MLP(6, 16, 3, depth=3)).double()
    if ranks == 2:  # two processes holding the same batch: Gram sums double
        rule.all_reduce_sum = lambda tensor: 2 * tensor
    x, _ = _data(batch=batch)
    activations = feedforward(as_blocks(net), x)
    rule.fit_feedback(net, activations)
    for layer, g in enumerate(net.feedback, start=2):
        features, reconstruct = activations[layer], activations[layer - 1]
        mu = 0.05 * features.shape[1]
        expected = _ridge_reference(
            torch.cat([features] * ranks), torch.cat([reconstruct] * ranks), mu
        )
        torch.testing.assert_close(g.weight, expected, rtol=1e-7, atol=1e-9)


def test_noisy_closed_form_minimizes_the_expected_noisy_reconstruction_loss():
    """ridge_noise = s: Q_l* minimizes sum_b ||Q h_l,b - h_l-1,b||^2 + s^2 sum_b ||Q J_b - I||^2
    + mu ||Q||^2 with J_b = d f_l / d h_{l-1} at sample b (the noise term of the noisy
    reconstruction loss, exact for the affine readout); reference: least squares with the
    Jacobians from autograd."""
    torch.manual_seed(0)
    s, ridge = 0.7, 0.05
    rule = TargetPropagation(ridge=ridge, ridge_noise=s)
    net = rule.build_network(MLP(6, 8, 3, depth=3)).double()
    x, _ = _data(batch=10)
    blocks, activations = as_blocks(net), feedforward(as_blocks(net), x)
    rule.fit_feedback(net, activations)
    for layer, g in enumerate(net.feedback, start=2):
        features, below = activations[layer], activations[layer - 1]
        width, size = features.shape[1], below.shape[1]
        jacobians = [torch.func.jacrev(blocks[layer - 1])(h) for h in below]
        a = torch.cat([features, *[s * j.T for j in jacobians],
                       math.sqrt(ridge * width) * torch.eye(width, dtype=x.dtype)])
        b = torch.cat([below, *[s * torch.eye(size, dtype=x.dtype)] * len(jacobians),
                       torch.zeros(width, size, dtype=x.dtype)])
        expected = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(g.weight, expected, rtol=1e-7, atol=1e-9)


def test_large_ridge_noise_gives_the_pseudo_inverse_readout_feedback():
    torch.manual_seed(0)
    rule = TargetPropagation(ridge=1e-6, ridge_noise=1e4)
    net = rule.build_network(MLP(6, 8, 3, depth=3)).double()
    x, _ = _data(batch=10)
    rule.fit_feedback(net, feedforward(as_blocks(net), x))
    readout = as_blocks(net)[-1].weight
    torch.testing.assert_close(net.feedback[-1].weight, torch.linalg.pinv(readout),
                               rtol=1e-5, atol=1e-6)


def _reconstruction_errors(net, x):
    activations = feedforward(as_blocks(net), x)
    return torch.stack([
        0.5 * (g(activations[layer]) - activations[layer - 1]).pow(2).sum() / x.shape[0]
        for layer, g in enumerate(net.feedback, start=2)
    ])


@pytest.mark.parametrize("feedback", ["linear", "nonlinear"])
def test_noisy_reconstruction_training_lowers_reconstruction_error(feedback):
    torch.manual_seed(0)
    rule = TargetPropagation(feedback=feedback, feedback_training="noisy", noise_std=0.1)
    net = rule.build_network(MLP(6, 16, 3, depth=3))
    x = torch.randn(64, 6)
    forward_before = [p.detach().clone() for p in net.blocks.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    with torch.no_grad():
        before = _reconstruction_errors(net, x)
        metric_before = rule.training_loss(net, x, torch.zeros(64, dtype=torch.long))
    for _ in range(150):
        rule.feedback_step(net, x, optimizer)
    with torch.no_grad():
        after = _reconstruction_errors(net, x)
    torch.testing.assert_close(metric_before.metrics["reconstruction_error"], before)
    assert bool((after < 0.8 * before).all()), (before, after)
    for p, p0 in zip(net.blocks.parameters(), forward_before):
        assert torch.equal(p, p0)  # feedback steps leave the forward weights alone


def test_feedback_step_gradient_is_the_global_batch_mean():
    torch.manual_seed(0)
    rule = TargetPropagation(feedback_training="noisy", noise_std=0.2)
    net = rule.build_network(MLP(6, 8, 3, depth=3)).double()
    x, _ = _data(batch=10)
    start = [p.detach().clone() for p in net.feedback.parameters()]

    def updated(all_reduce_sum):
        with torch.no_grad():
            for p, p0 in zip(net.feedback.parameters(), start):
                p.copy_(p0)
        rule.all_reduce_sum = all_reduce_sum
        torch.manual_seed(7)  # the same noise xi in every run
        rule.feedback_step(net, x, torch.optim.SGD(net.parameters(), lr=1.0))
        return [p.detach() - p0 for p, p0 in zip(net.feedback.parameters(), start)]

    # reference: autograd of the batch-mean noisy reconstruction loss with the same noise
    torch.manual_seed(7)
    blocks, activations = as_blocks(net), feedforward(as_blocks(net), x)
    total = 0.0
    for layer, g in enumerate(net.feedback, start=2):
        noisy = activations[layer - 1] + 0.2 * torch.randn_like(activations[layer - 1])
        total = total + 0.5 * (g(blocks[layer - 1](noisy).detach()) - noisy).pow(2).sum(1).mean()
    expected = torch.autograd.grad(total, list(net.feedback.parameters()))
    for one_rank, two_ranks, reference in zip(updated(None), updated(lambda t: 2 * t), expected):
        torch.testing.assert_close(one_rank, -reference)
        torch.testing.assert_close(two_ranks, -reference)


def test_k_feedback_steps_share_one_optimizer_with_one_forward_step():
    torch.manual_seed(0)
    rule = TargetPropagation(feedback_training="noisy", feedback_steps=3)
    net = rule.build_network(MLP(6, 8, 3, depth=3))
    optimizer = torch.optim.Adam([
        {"params": list(net.blocks.parameters()), "lr": 1e-3},
        {"params": list(net.feedback.parameters()), "lr": 1e-2},
    ])
    x, y = _data()
    rule.step(net, x.float(), y, optimizer)
    assert all(optimizer.state[p]["step"] == 1 for p in net.blocks.parameters())
    assert all(optimizer.state[p]["step"] == 3 for p in net.feedback.parameters())


@pytest.mark.parametrize("feedback_training", ["ridge", "noisy"])
def test_metrics_are_per_layer_finite_and_consistent(feedback_training):
    torch.manual_seed(0)
    rule = TargetPropagation(feedback_training=feedback_training, compute_bp_angle=True)
    net = rule.build_network(MLP(6, 8, 3, depth=4)).double()
    x, y = _data()
    result = rule.training_loss(net, x, y)
    shapes = {"local_loss": 4, "reconstruction_error": 3, "target_norm": 4, "bp_angle": 4}
    for name, length in shapes.items():
        assert result.metrics[name].shape == (length,)
        assert bool(torch.isfinite(result.metrics[name]).all())
    forward_part = result.surrogate - result.metrics.get("feedback_loss", 0.0)
    torch.testing.assert_close(result.metrics["local_loss"].sum(), forward_part.detach())
    # the angle against backprop, from autograd on a fresh forward pass
    first = list(as_blocks(net)[0].parameters())
    tp = torch.cat([g.flatten() for g in torch.autograd.grad(forward_part, first)])
    bp_loss = 0.5 * (net(x) - F.one_hot(y, 3)).pow(2).sum(1).mean()
    bp = torch.cat([g.flatten() for g in torch.autograd.grad(bp_loss, first)])
    angle = torch.rad2deg(torch.arccos(F.cosine_similarity(tp, bp, dim=0)))
    torch.testing.assert_close(result.metrics["bp_angle"][0], angle)
    assert float(result.metrics["bp_angle"][-1]) < 1e-3  # last layer: beta * backprop


def _reference_angles(blocks, tp_loss, bp_loss):
    """Per block, the angle in degrees between the gradients of two losses, from autograd."""
    angles = []
    for block in blocks:
        params = [p for p in block.parameters() if p.requires_grad]
        if not params:
            angles.append(float("nan"))
            continue
        tp = torch.autograd.grad(tp_loss, params, retain_graph=True, allow_unused=True)
        bp = torch.autograd.grad(bp_loss, params, retain_graph=True, allow_unused=True)
        flat = [
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                       for g, p in zip(grads, params)])
            for grads in (tp, bp)
        ]
        cosine = flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm())
        angles.append(math.degrees(math.acos(max(-1.0, min(1.0, float(cosine))))))
    return torch.tensor(angles, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize(
    "settings",
    [
        dict(variant="dtp", feedback_training="ridge"),
        dict(variant="tp", feedback_training="ridge"),
        dict(variant="dtp", feedback_training="noisy"),
        dict(variant="dtp", feedback_training="none", layer_weights=[1.0, 0.5, 2.0, 1.0]),
    ],
)
def test_bp_angle_of_every_layer_matches_autograd_on_the_tp_surrogate(loss, settings):
    """The logged angle of each block against one computed here from the gradients of TP's
    forward local loss (the surrogate less the feedback loss) and of the output loss."""
    torch.manual_seed(0)
    x, y = _data()
    rule = TargetPropagation(loss, compute_bp_angle=True, **settings)
    net = rule.build_network(MLP(6, 8, 3, depth=4)).double()
    result = rule.training_loss(net, x, y)
    forward_part = result.surrogate - result.metrics.get("feedback_loss", 0.0)
    blocks = as_blocks(net)
    expected = _reference_angles(blocks, forward_part, _reference_loss(net(x), y, loss))
    assert 1.0 < float(expected[0]) < 179.0  # a hidden layer is not along backprop
    # atol: arccos is ill-conditioned at cos = 1 (the readout), ~1e-6 degrees of rounding
    torch.testing.assert_close(result.metrics["bp_angle"], expected, rtol=1e-7, atol=1e-5)


def test_bp_angle_of_a_block_without_trainable_parameters_is_nan():
    torch.manual_seed(0)
    x, y = _data()
    rule = TargetPropagation(compute_bp_angle=True)
    net = rule.build_network(MLP(6, 8, 3, depth=3)).double()
    blocks = as_blocks(net)
    blocks[1].requires_grad_(False)
    result = rule.training_loss(net, x, y)
    expected = _reference_angles(blocks, result.surrogate, _reference_loss(net(x), y, "mse"))
    angles = result.metrics["bp_angle"]
    assert math.isnan(float(angles[1])) and math.isnan(float(expected[1]))
    torch.testing.assert_close(angles, expected, rtol=1e-7, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize(
    "settings",
    [
        dict(variant="dtp", feedback_training="ridge"),
        dict(variant="tp", feedback_training="ridge"),
        dict(variant="dtp", feedback="nonlinear", feedback_training="noisy", feedback_steps=2),
    ],
)
def test_training_lowers_the_loss_on_a_small_task(settings):
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, :3] @ torch.randn(3, 3)).argmax(1)
    rule = TargetPropagation("mse", beta=0.5, **settings)
    net = rule.build_network(MLP(6, 32, 3, depth=3))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with torch.no_grad():
        first = rule.loss.mean(net(x), y)
    for _ in range(150):
        rule.step(net, x, y, optimizer)
    with torch.no_grad():
        last = rule.loss.mean(net(x), y)
    assert float(last) < 0.6 * float(first), (float(first), float(last))


def test_cnn_gets_shape_matching_feedback_and_trains_with_noisy_reconstruction():
    torch.manual_seed(0)
    rule = TargetPropagation(feedback_training="noisy", compute_bp_angle=True)
    net = rule.build_network(CNN(1, 9, 4, 3, conv_layers=2))  # input shape from the config
    x, y = torch.randn(5, 1, 9, 9), torch.randint(0, 3, (5,))
    activations = feedforward(as_blocks(net), x)
    for layer, g in enumerate(net.feedback, start=2):
        assert g(activations[layer]).shape == activations[layer - 1].shape
    result = rule.training_loss(net, x, y)
    result.surrogate.backward()
    assert all(p.grad is not None for p in net.parameters())
    assert float(result.metrics["bp_angle"][-1]) < 0.1


def test_unsupported_networks_and_settings_raise_library_errors():
    with pytest.raises(UnsupportedNetworkError, match="build_network"):
        TargetPropagation().training_loss(MLP(6, 8, 3).double(), *_data())
    with pytest.raises(UnsupportedNetworkError, match="noisy"):
        TargetPropagation().build_network(CNN(1, 8, 4, 3))
    conv = nn.Sequential(*CNN(1, 8, 4, 3))  # a plain Sequential: no known input shape
    with pytest.raises(UnsupportedNetworkError, match="input_shape"):
        TargetPropagation(feedback_training="noisy").build_network(conv)
    odd = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)),
                        nn.Linear(8, 2))
    with pytest.raises(UnsupportedNetworkError, match="block 1"):
        TargetPropagation().build_network(odd)
    with pytest.raises(LocalLearningError, match="linear"):
        TargetPropagation(feedback="nonlinear")
    with pytest.raises(LocalLearningError, match="feedback_steps"):
        TargetPropagation(feedback_steps=3)
    with pytest.raises(LocalLearningError, match="variant"):
        TargetPropagation(variant="gn")
    with pytest.raises(LocalLearningError, match="beta"):
        TargetPropagation(beta=0.0)
    noisy_net = TargetPropagation(feedback_training="noisy").build_network(MLP(6, 8, 3))
    with pytest.raises(LocalLearningError, match="requires_grad"):
        TargetPropagation(feedback_training="ridge").training_loss(noisy_net, *map(_float, _data()))
    with pytest.raises(LocalLearningError, match="layer_weights"):
        TargetPropagation(layer_weights=[1.0]).training_loss(
            TargetPropagation().build_network(MLP(6, 8, 3)), *map(_float, _data())
        )


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_tp_mup_keeps_the_readout_init_and_scales_feedback_by_their_own_shapes(optimizer):
    width, base, lr = 32, 8, 0.4
    rule = TargetPropagation()
    net = rule.build_network(MLP(6, width, 3, depth=3))
    shapes = base_shapes_from_builder(net, base)  # via TPNetwork.with_width on meta
    set_base_shapes(net, shapes)
    readout = as_blocks(net)[-1].weight.detach().clone()
    parametrization = MuP()
    parametrization.initialize(net, rule=rule, optimizer=optimizer)
    assert torch.equal(as_blocks(net)[-1].weight, readout)  # TP keeps b_L = 1/2
    groups = parametrization.build_optimizer(net, lr, rule=rule, optimizer=optimizer).param_groups
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    m = width / base  # c = (0, 1, 1) for (input, hidden, output), SGD and Adam
    assert lr_of[id(as_blocks(net)[0][0].weight)] == pytest.approx(lr)
    assert lr_of[id(as_blocks(net)[1][0].weight)] == pytest.approx(lr / m)
    assert lr_of[id(as_blocks(net)[2].weight)] == pytest.approx(lr / m)
    assert lr_of[id(net.feedback[0].weight)] == pytest.approx(lr / m)  # g_2: M -> M
    assert lr_of[id(net.feedback[1].weight)] == pytest.approx(lr)  # g_3: C -> M, input-like


def test_with_width_rebuilds_forward_and_feedback():
    net = TPNetwork(MLP(6, 16, 3, depth=3), "nonlinear")
    wide = net.with_width(64, device="meta")
    assert [n for n, _ in wide.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert wide.feedback[0][0].weight.shape == (64, 64) and wide.width == 64
    assert isinstance(wide.feedback[0][1], nn.Tanh)
    with pytest.raises(UnsupportedNetworkError, match="width builder"):
        TPNetwork(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))).with_width(16)


def _feature_learning_example():
    spec = importlib.util.spec_from_file_location("tp_feature_learning", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_tp_learns_features_with_clt_readout_alignment(optimizer):
    """Spec section 5 at small widths: Delta h flat under TP muP; readout alignment exponent
    about 1/2 for TP (CLT) versus about 1 for backprop (LLN); with SGD and with Adam."""
    example = _feature_learning_example()
    torch.manual_seed(0)
    x = torch.randn(1024, 20)
    y = (x @ torch.randn(20, 10)).argmax(1)
    widths = [64, 128, 256, 512]
    measured = {
        rule: [example.measure(rule, w, x, y, x[:128], steps=5, batch_size=64,
                               optimizer=optimizer) for w in widths]
        for rule in ("tp", "bp")
    }
    tp_slope = example.fitted_slope(widths, [r["alignment"] for r in measured["tp"]])
    bp_slope = example.fitted_slope(widths, [r["alignment"] for r in measured["bp"]])
    assert 0.35 < tp_slope < 0.75, tp_slope
    assert 0.8 < bp_slope < 1.2, bp_slope
    for layer in range(3):
        dh = [r["delta_h_rms"][layer] for r in measured["tp"]]
        assert abs(example.fitted_slope(widths, dh)) < 0.2, dh


def test_total_local_loss_is_the_sum_of_the_per_layer_local_losses():
    torch.manual_seed(0)
    rule = TargetPropagation(variant="dtp", feedback_training="ridge")
    network = rule.build_network(MLP(in_features=5, width=16, num_classes=3, depth=3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    metrics = rule.training_loss(network, x, y).metrics
    torch.testing.assert_close(metrics["local_loss_total"], metrics["local_loss"].sum())


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + 0.5 * torch.tanh(self.linear(h))


def test_a_residual_block_gets_a_linear_feedback_fitted_in_closed_form():
    """A block whose only parameters are one Linear's (a residual block) gets a linear
    feedback map; with ridge feedback it is the batch ridge solution of h_{l-1} on h_l."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Linear(6, 10), nn.Tanh()), _Residual(10),
                        nn.Linear(10, 3))
    rule = TargetPropagation("mse", ridge=0.1)
    wrapped = rule.build_network(net)
    assert [tuple(g.weight.shape) for g in wrapped.feedback] == [(10, 10), (10, 3)]
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    wrapped.double()
    rule.training_loss(wrapped, x, y)
    with torch.no_grad():
        h1 = net[0](x)
        h2 = net[1](h1)
    mu = 0.1 * 10  # mu_l = mu' n_l
    expected = (h1.T @ h2) @ torch.linalg.inv(h2.T @ h2 + mu * torch.eye(10, dtype=x.dtype))
    torch.testing.assert_close(wrapped.feedback[0].weight, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5, 5)])
def test_global_noise_is_the_one_process_noise_dealt_to_the_ranks(shape):
    """Rank r of N at batch B gets rows r, r + N, .. of the noise one process at NB draws with
    randn_like (global_batch_sampler's layout), from the same random state, and every rank
    leaves the generator where that process does. In one process it is randn_like itself
    (also for channels-last images, and with an explicit generator)."""
    formats = [torch.contiguous_format] + ([torch.channels_last] if len(shape) == 4 else [])
    for memory_format in formats:
        local = torch.zeros(shape).to(memory_format=memory_format)
        whole = torch.zeros((3 * shape[0], *shape[1:])).to(memory_format=memory_format)
        torch.manual_seed(5)
        expected, state = torch.randn_like(whole), torch.get_rng_state()
        for rank in range(3):
            torch.manual_seed(5)
            noise = ProcessLayout(rank, 3, _no_sum).global_randn_like(local)
            assert torch.equal(noise, expected[rank::3]) and noise.shape == local.shape
            assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(5)
        one = torch.randn_like(local)
        torch.manual_seed(5)
        assert torch.equal(ProcessLayout().global_randn_like(local), one)
        generator = torch.Generator().manual_seed(5)
        assert torch.equal(ProcessLayout().global_randn_like(local, generator), one)
        generator = torch.Generator().manual_seed(5)
        assert torch.equal(
            ProcessLayout(1, 3, _no_sum).global_randn_like(local, generator), expected[1::3]
        )


def _no_sum(tensor: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the noise needs no communication")


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_noisy_dtp_on_ranks_equals_one_process_on_the_global_batch(loss):
    """Two ranks at batch B holding alternate rows of a batch of 2B, from the same random
    state: the mean of their surrogate gradients (what DDP applies) is one process's at 2B,
    forward and feedback weights, and the random state ends where that process's does. The
    control: each rank drawing the noise of its own batch alone (as one process would, the
    same noise on both ranks) is far off in the feedback gradients."""
    rule = TargetPropagation(loss, variant="dtp", feedback_training="noisy", noise_std=0.5)
    torch.manual_seed(0)
    net = rule.build_network(MLP(6, 8, 3, depth=4, activation="relu")).double()
    x, y = _data(batch=10)
    params = [p for p in net.parameters() if p.requires_grad]
    feedback = len(list(net.blocks.parameters()))

    def gradients(layout: ProcessLayout, rows: slice) -> tuple[list[torch.Tensor], torch.Tensor]:
        ranked = rule.with_settings()
        ranked.process_layout = layout
        torch.manual_seed(7)
        surrogate = ranked.training_loss(net, x[rows], y[rows]).surrogate
        return list(torch.autograd.grad(surrogate, params)), torch.get_rng_state()

    whole, state = gradients(ProcessLayout(), slice(None))
    ranks = [gradients(ProcessLayout(r, 2, _no_sum), slice(r, None, 2)) for r in range(2)]
    for a, b, expected in zip(ranks[0][0], ranks[1][0], whole):
        torch.testing.assert_close((a + b) / 2, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.equal(rank_state, state) for _, rank_state in ranks)
    alone = [gradients(ProcessLayout(), slice(r, None, 2))[0] for r in range(2)]
    gap = max(float(((a + b) / 2 - expected).abs().max())
              for a, b, expected in list(zip(*alone, whole))[feedback:])
    assert gap > 1e-2, gap


def test_noisy_dtp_on_the_1d_cnn_gets_resize_convolutions_that_map_back():
    """CNN1d's conv blocks get ``Upsample -> Conv1d`` feedback whose outputs have the shape of
    the layer below [the forward pass's own activations], and noisy DTP trains it."""
    from lightning_local.models import CNN1d
    from lightning_local.network import feedforward
    from lightning_local.wiring import wire

    torch.manual_seed(0)
    run = wire(CNN1d(width=8), TargetPropagation(variant="dtp", feedback_training="noisy"),
               "mup", base_width=4)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    activations = feedforward(list(run.network.blocks), x)
    assert isinstance(run.network.feedback[0][1], nn.Conv1d)
    for index, g in enumerate(run.network.feedback):  # g_{l} maps h_l back to h_{l-1}
        assert g(activations[index + 2]).shape == activations[index + 1].shape
    optimizer = run.build_optimizer(lr=0.1)
    losses = [float(run.rule.step(run.network, x, y, optimizer).loss) for _ in range(6)]
    assert losses[-1] < losses[0]
