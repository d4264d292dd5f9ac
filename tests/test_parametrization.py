"""SP and muP: init std and learning rates against width, checked by fitted log-log slopes.

The expected exponents are the spec's table (section 3), written out here as literals: init
std ~ M^{-b} (input layer relative to 1/d0, so slope 0), lr ~ M^{-c}. They are compared with
slopes fitted (numpy.polyfit) to *measured* weight stds and optimizer group lrs.
"""

from __future__ import annotations

import math
import pickle

import mup
import numpy as np
import pytest
import torch
from torch import nn

from lightning_local.errors import (
    LocalLearningError,
    MissingBaseShapesError,
    UnclassifiableParameterError,
)
from lightning_local.models import CNN, MLP
from lightning_local.parametrization import (
    SP,
    MuP,
    classify_parameters,
    get_parametrization,
    set_base_shapes,
)

WIDTHS = (64, 128, 256, 512, 1024)
BASE = 64

# (parametrization, rule, optimizer, g): (std slopes, lr slopes) for (input, hidden, output),
# from the spec's tables: std ~ M^{-b} with b_input relative to d0, lr ~ M^{-c}.
EXPECTED = {
    ("sp", "bp", "sgd", 0.0): ((0, -0.5, -0.5), (0, 0, 0)),
    ("sp", "pc", "sgd", 0.0): ((0, -0.5, -0.5), (0, 0, 0)),
    ("sp", "tp", "sgd", 0.0): ((0, -0.5, -0.5), (0, 0, 0)),
    ("sp", "bp", "adam", 0.0): ((0, -0.5, -0.5), (0, 0, 0)),
    ("sp", "pc", "adam", 0.0): ((0, -0.5, -0.5), (0, 0, 0)),
    ("sp", "tp", "adam", 0.0): ((0, -0.5, -0.5), (0, 0, 0)),
    ("mup", "bp", "sgd", 0.0): ((0, -0.5, -1), (1, 0, -1)),
    ("mup", "pc", "sgd", 0.0): ((0, -0.5, -1), (1, 0, -1)),
    ("mup", "pc", "sgd", -1.0): ((0, -0.5, -1), (0, -1, -2)),
    ("mup", "pc", "sgd", 0.5): ((0, -0.5, -1), (1.5, 0.5, -0.5)),
    ("mup", "tp", "sgd", 0.0): ((0, -0.5, -0.5), (0, -1, -1)),
    ("mup", "bp", "adam", 0.0): ((0, -0.5, -1), (0, -1, -1)),
    ("mup", "pc", "adam", 0.0): ((0, -0.5, -1), (0, -1, -1)),
    ("mup", "pc", "adam", -1.0): ((0, -0.5, -1), (0, -1, -1)),
    ("mup", "tp", "adam", 0.0): ((0, -0.5, -0.5), (0, -1, -1)),
}
# Slopes of the other roles' lrs: vector = input's, scalar = 0 except PC-SGD's gamma shift (+g).
EXPECTED_SCALAR_LR_SLOPE = {("mup", "pc", "sgd", -1.0): -1.0, ("mup", "pc", "sgd", 0.5): 0.5}


def make(name: str, g: float) -> SP | MuP:
    return SP() if name == "sp" else MuP(output_weight_exponent=g)


def slope(widths, values) -> float:
    return float(np.polyfit(np.log(widths), np.log(values), 1)[0])


def built(builder, width, parametrization, rule, optimizer, seed=0):
    torch.manual_seed(seed)
    model = builder(width)
    set_base_shapes(model, BASE)
    parametrization.initialize(model, rule, optimizer)
    return model


def measure(builder, parametrization, rule, optimizer, widths=WIDTHS):
    """Per width: stds of the (input, hidden, output) weights and lr per role."""
    stds, lrs = [], []
    for width in widths:
        model = built(builder, width, parametrization, rule, optimizer)
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        stds.append([weights[0].std().item(), weights[1].std().item(), weights[-1].std().item()])
        optimizer_ = parametrization.build_optimizer(model, 0.1, rule, optimizer)
        lrs.append({group["role"]: group["lr"] for group in optimizer_.param_groups})
    return np.array(stds), lrs


@pytest.mark.parametrize("key", sorted(EXPECTED), ids=lambda k: "-".join(map(str, k)))
def test_mlp_init_std_and_lr_slopes_match_table(key):
    name, rule, optimizer, g = key
    std_slopes, lr_slopes = EXPECTED[key]
    stds, lrs = measure(lambda w: MLP(width=w), make(name, g), rule, optimizer)
    for index, role in enumerate(("input", "hidden", "output")):
        assert slope(WIDTHS, stds[:, index]) == pytest.approx(std_slopes[index], abs=0.03), role
        assert slope(WIDTHS, [lr[role] for lr in lrs]) == pytest.approx(lr_slopes[index], abs=1e-9)
    assert slope(WIDTHS, [lr["vector"] for lr in lrs]) == pytest.approx(lr_slopes[0], abs=1e-9)
    expected_scalar = EXPECTED_SCALAR_LR_SLOPE.get(key, 0.0)
    assert slope(WIDTHS, [lr["scalar"] for lr in lrs]) == pytest.approx(expected_scalar, abs=1e-9)


@pytest.mark.parametrize("key", [("mup", "bp", "sgd", 0.0), ("mup", "tp", "adam", 0.0),
                                 ("sp", "pc", "sgd", 0.0)], ids=lambda k: "-".join(map(str, k)))
def test_cnn_init_std_and_lr_slopes_match_table(key):
    name, rule, optimizer, g = key
    std_slopes, lr_slopes = EXPECTED[key]
    widths = WIDTHS[:4]
    stds, lrs = measure(lambda w: CNN(in_channels=3, image_size=8, width=w), make(name, g), rule,
                        optimizer, widths)
    for index, role in enumerate(("input", "hidden", "output")):
        # The input conv has few entries (3 * 9 * M): a looser tolerance for its noisy std.
        assert slope(widths, stds[:, index]) == pytest.approx(std_slopes[index], abs=0.05), role
        assert slope(widths, [lr[role] for lr in lrs]) == pytest.approx(lr_slopes[index], abs=1e-9)


def test_cnn_roles():
    model = CNN(image_size=8, width=32)
    set_base_shapes(model, 16)
    roles = {item.name: item.role for item in classify_parameters(model)}
    assert roles == {
        "0.0.weight": "input", "0.0.bias": "vector", "1.0.weight": "hidden",
        "1.0.bias": "vector", "2.1.weight": "output", "2.1.bias": "scalar",
    }


@pytest.mark.parametrize("g", [0.0, -1.0, -0.5])
def test_pc_output_weight_slope_and_gamma_times_lr(g):
    parametrization = MuP(output_weight_exponent=g)
    gammas, products = [], []
    for width in WIDTHS:
        model = built(lambda w: MLP(width=w), width, parametrization, "pc", "sgd")
        gamma = parametrization.output_weight(2.0, model)
        gammas.append(gamma)
        lrs = {gr["role"]: gr["lr"] for gr in parametrization.param_groups(model, 0.1, "pc")}
        products.append([gamma * lrs[role] for role in ("input", "hidden", "output", "scalar")])
        assert parametrization.output_weight(2.0, model, rule="bp") == 2.0
        assert SP().output_weight(2.0, model) == 2.0
    assert slope(WIDTHS, gammas) == pytest.approx(-g, abs=1e-9)
    # PC's update is gamma_L times BP's gradient: gamma_L * lr_PC must scale like BP's muP lr.
    products = np.array(products)
    for index, bp_slope in enumerate((1, 0, -1, 0)):
        assert slope(WIDTHS, products[:, index]) == pytest.approx(bp_slope, abs=1e-9)


@pytest.mark.parametrize("rule", ["bp", "pc", "tp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("g", [0.0, -1.0])
def test_base_width_coincides_with_sp(rule, optimizer, g):
    sp_model = built(lambda w: MLP(width=w), BASE, SP(), rule, optimizer, seed=3)
    mup_model = built(lambda w: MLP(width=w), BASE, MuP(g), rule, optimizer, seed=3)
    for p, q in zip(sp_model.parameters(), mup_model.parameters()):
        assert torch.equal(p, q)
    sp_groups = SP().param_groups(sp_model, 0.1, rule, optimizer, weight_decay=0.01)
    mup_groups = MuP(g).param_groups(mup_model, 0.1, rule, optimizer, weight_decay=0.01)
    assert [(gr["role"], gr["lr"], gr["weight_decay"]) for gr in sp_groups] == [
        (gr["role"], gr["lr"], gr["weight_decay"]) for gr in mup_groups
    ]
    assert MuP(g).output_weight(1.5, mup_model) == 1.5


def _per_parameter_lr(optimizer):
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def _mup_reference_net(width):
    """The same MLP with mup's MuReadout, whose forward divides by the width multiplier."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(40, width), nn.Tanh()),
        nn.Sequential(nn.Linear(width, width), nn.Tanh()),
        mup.MuReadout(width, 10),
    )


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_bp_mup_training_matches_mup_reference(kind):
    """mup's MuReadout + MuSGD/MuAdam implement BP's muP: an independent reference.

    MuReadout computes ``(W / m) h``; with ``W = m W_ours`` both nets compute the same function,
    and after the same optimizer steps they must still compute the same function.
    """
    torch.manual_seed(0)
    ours = MLP(width=256).double()
    set_base_shapes(ours, BASE)
    MuP().initialize(ours)
    reference = _mup_reference_net(256).double()
    mup.set_base_shapes(reference, _mup_reference_net(BASE), delta=_mup_reference_net(128),
                        rescale_params=False)
    with torch.no_grad():
        for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
            q.copy_(p * 4 if name == "2.weight" else p)
    # Adam's eps is the one thing not scale-invariant (MuReadout's gradient is m times smaller).
    extra = {} if kind == "sgd" else {"eps": 1e-30}
    ours_optimizer = MuP().build_optimizer(ours, 0.05, "bp", kind, **extra)
    mup_type = mup.MuSGD if kind == "sgd" else mup.MuAdam
    reference_optimizer = mup_type(reference.parameters(), lr=0.05, **extra)
    inputs, targets = torch.randn(16, 40).double(), torch.randn(16, 10).double()
    for _ in range(3):
        for net, optimizer in ((ours, ours_optimizer), (reference, reference_optimizer)):
            optimizer.zero_grad()
            (net(inputs) - targets).pow(2).sum(1).mean().backward()
            optimizer.step()
    torch.testing.assert_close(ours(inputs), reference(inputs), rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # and the training moved the function
        assert (ours(inputs) - MLP(width=256).double()(inputs)).abs().max() > 1e-3


def test_optimizer_applies_group_learning_rates():
    torch.manual_seed(0)
    model = MLP(in_features=5, width=128, num_classes=3).double()
    set_base_shapes(model, 32)
    parametrization = MuP()
    parametrization.initialize(model)
    inputs, targets = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3).double()
    for kind in ("sgd", "adam"):
        optimizer = parametrization.build_optimizer(model, 0.01, "bp", kind)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        (model(inputs) - targets).pow(2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        lrs = _per_parameter_lr(optimizer)
        for p, p0, grad in zip(model.parameters(), before, grads):
            # SGD: -lr g. Adam's first step: -lr g / (|g| + eps).
            step = grad if kind == "sgd" else grad / (grad.abs() + 1e-8)
            torch.testing.assert_close(p.detach() - p0, -lrs[id(p)] * step, rtol=1e-7,
                                       atol=1e-12)
        assert sorted(set(lrs.values())) == sorted({0.01 * 4, 0.01, 0.01 / 4} if kind == "sgd"
                                                   else {0.01, 0.01 / 4})


def test_weight_decay_times_lr_is_width_independent():
    model = MLP(width=512)
    set_base_shapes(model, BASE)
    for group in MuP().param_groups(model, 0.1, "tp", "sgd", weight_decay=0.01):
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.1 * 0.01, rel=1e-12)


def test_initialize_rescales_once():
    torch.manual_seed(1)
    reference = MLP(width=256)
    torch.manual_seed(1)
    model = MLP(width=256)
    set_base_shapes(model, BASE)
    parametrization = MuP()
    parametrization.initialize(model, "pc", "sgd")
    parametrization.initialize(model, "pc", "sgd")  # a no-op
    parametrization.initialize(model, "bp", "adam")  # the same init: a no-op too
    torch.testing.assert_close(model[2].weight, reference[2].weight * 4 ** -0.5, rtol=0, atol=0)
    torch.testing.assert_close(model[1][0].weight, reference[1][0].weight, rtol=0, atol=0)
    reloaded = pickle.loads(pickle.dumps(model))  # what torch.save(model) does
    parametrization.initialize(reloaded, "pc", "sgd")
    torch.testing.assert_close(reloaded[2].weight, model[2].weight, rtol=0, atol=0)
    with pytest.raises(LocalLearningError, match="already initialized"):
        parametrization.initialize(model, "tp", "sgd")
    with pytest.raises(LocalLearningError, match="already initialized"):
        SP().initialize(model, "pc", "sgd")


def test_missing_base_shapes_error_names_the_fix():
    model = MLP(width=128)
    for call in (
        lambda: MuP().initialize(model),
        lambda: MuP().param_groups(model, 0.1),
        lambda: MuP().output_weight(1.0, model),
        lambda: MuP().width_mult(model),
    ):
        with pytest.raises(MissingBaseShapesError, match="set_base_shapes"):
            call()
    # SP needs no shapes: one group with the plain lr.
    groups = SP().param_groups(model, 0.1)
    assert [(g["role"], g["lr"], len(g["params"])) for g in groups] == [("all", 0.1, 6)]
    assert SP().width_mult(model) == 1.0
    SP().initialize(model)


def test_parameter_added_after_shapes_is_reported():
    model = MLP(width=128)
    set_base_shapes(model, BASE)
    extra = nn.Linear(128, 128)
    with pytest.raises(MissingBaseShapesError, match="1.weight"):
        MuP().param_groups([model, extra], 0.1)


def test_list_of_modules_classifies_every_parameter_once():
    forward, feedback = MLP(width=128), MLP(in_features=10, width=128, num_classes=40)
    feedback[0][0].bias = forward[0][0].bias  # a shared parameter counts once
    set_base_shapes(forward, BASE)
    set_base_shapes(feedback, BASE)
    groups = MuP().param_groups([forward, feedback], 0.1, "tp")
    params = [p for g in groups for p in g["params"]]
    unique = {id(p) for p in [*forward.parameters(), *feedback.parameters()]}
    assert len(params) == len(unique) == 11


def test_unclassifiable_layers_raise_clear_errors():
    def embedding_net(width):
        return nn.Sequential(nn.Embedding(10, width), nn.Linear(width, 3))

    model = embedding_net(128)
    set_base_shapes(model, embedding_net(64), embedding_net(96))
    with pytest.raises(UnclassifiableParameterError, match=r"'0\.weight' of Embedding"):
        MuP().param_groups(model, 0.1)

    def transposed(width):
        return nn.Sequential(nn.ConvTranspose2d(width, width, 3), nn.Conv2d(width, 2, 1))

    model = transposed(128)
    set_base_shapes(model, transposed(64), transposed(96))
    with pytest.raises(UnclassifiableParameterError, match="ConvTranspose2d"):
        MuP().initialize(model)
    # SP does not need roles, so it still builds an optimizer.
    assert SP().build_optimizer(model, 0.1).param_groups[0]["role"] == "all"


def test_widths_scaling_by_different_ratios_are_rejected():
    def net(a, b):
        return nn.Sequential(nn.Linear(3, a), nn.Linear(a, b), nn.Linear(b, 2))

    model = net(128, 512)
    set_base_shapes(model, net(64, 64), net(96, 80))
    with pytest.raises(UnclassifiableParameterError, match="scale together"):
        MuP().width_mult(model)


def test_fixed_width_parameters_are_not_scaled():
    def net(width):
        return nn.Sequential(nn.Linear(3, width), nn.Linear(width, 2), nn.Linear(2, 2))

    model = net(256)
    set_base_shapes(model, net(64), net(128))
    roles = {item.name: item.role for item in classify_parameters(model)}
    assert roles["2.weight"] == "fixed" and roles["2.bias"] == "scalar"
    groups = {g["role"]: g["lr"] for g in MuP().param_groups(model, 0.1, "bp")}
    assert groups["fixed"] == 0.1


def test_names_and_validation():
    assert isinstance(get_parametrization("sp"), SP)
    assert get_parametrization("mup") == MuP(0.0)
    assert get_parametrization(MuP(-1.0)) == MuP(-1.0) != MuP(0.0)
    with pytest.raises(LocalLearningError, match="unknown parametrization"):
        get_parametrization("ntk")
    with pytest.raises(LocalLearningError, match="unknown rule"):
        MuP().exponents("hebbian")
    with pytest.raises(LocalLearningError, match="optimizer"):
        MuP().exponents("bp", "lamb")
    with pytest.raises(LocalLearningError, match="finite"):
        MuP(math.nan)
    with pytest.warns(UserWarning, match="unstable"):
        MuP(-2.0)
    assert MuP(-1.0).hparams() == {"parametrization": "mup", "output_weight_exponent": -1.0}
