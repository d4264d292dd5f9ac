"""Mixed precision keeps every rule's result: inference and the local updates run in fp32.

Reference: the same step in fp32. Backprop's own bf16 (or float16) error, its forward and
backward under autocast, is the yardstick: every rule's update must be within twice of it.
Under 16-mixed the loss scaler must be invisible: the scale divided out of every update,
clipping at the unscaled threshold, an overflowed step skipped by the scaler (which backs off)
as in torch's AMP recipe, and TP's feedback-only steps applied as computed.
"""

from __future__ import annotations

import functools
import itertools
import math

import lightning as L
import pytest
import test_rule_tester as battery
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.models import MLP
from lightning_local.modules import LocalLearningModule, PredictiveCodingModule
from lightning_local.rules import Backprop, PredictiveCoding, TargetPropagation
from lightning_local.wiring import wire

RULES = {
    "pc-si-fpa": lambda: PredictiveCoding(),
    "pc-si": lambda: PredictiveCoding(fixed_prediction=False),
    "pc-sim-50": lambda: PredictiveCoding(inference="simultaneous", inference_steps=50,
                                          inference_lr=0.1, fixed_prediction=False),
    "pc-tolerance": lambda: PredictiveCoding(inference="tolerance", inference_steps=50,
                                             inference_lr=0.1, tolerance=1e-3,
                                             fixed_prediction=False),
    "tp": lambda: TargetPropagation(variant="tp"),
    "dtp-ridge": lambda: TargetPropagation(),
    "dtp-noisy": lambda: TargetPropagation(feedback_training="noisy"),
}


def _batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 40, generator=generator)
    return x, torch.randint(0, 10, (64,), generator=generator)


def _gradients(rule, network, bf16: bool):
    x, y = _batch()
    network.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # TP's reconstruction noise
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        result = rule.training_loss(network, x, y)
    with rule.backward_precision(x):  # what LocalRule.step and the modules do
        result.surrogate.float().backward()
    return [p.grad.clone() for p in network.parameters() if p.requires_grad], result


def _relative_error(rule, network) -> float:
    exact, _ = _gradients(rule, network, bf16=False)
    mixed, _ = _gradients(rule, network, bf16=True)
    return max(float((m - e).norm() / e.norm()) for m, e in zip(mixed, exact) if e.norm() > 0)


def _network(rule):
    torch.manual_seed(1)
    network = MLP(width=256)
    return rule.build_network(network) if isinstance(rule, TargetPropagation) else network


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_is_within_twice_backprops_bf16_error(name):
    backprop_error = _relative_error(Backprop(), _network(Backprop()))
    assert backprop_error > 1e-4  # autocast is active: backprop's own update moved
    rule = RULES[name]()
    assert _relative_error(rule, _network(rule)) <= 2 * backprop_error


def test_the_tolerance_schedule_stops_where_fp32_stops():
    rule = RULES["pc-tolerance"]()
    network = _network(rule)
    _, exact = _gradients(rule, network, bf16=False)
    _, mixed = _gradients(rule, network, bf16=True)
    assert int(mixed.metrics["inference_steps"]) == int(exact.metrics["inference_steps"])
    assert 1 < int(exact.metrics["inference_steps"]) < 50


def _fit(precision: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = PredictiveCodingModule(network=MLP(width=128), inference="simultaneous",
                                   inference_steps=20, inference_lr=0.1, fixed_prediction=False)
    trainer = L.Trainer(accelerator="cpu", precision=precision, max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    x, y = _batch()
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def test_trainer_bf16_mixed_trains_pc_as_fp32():
    exact, mixed = _fit("32-true"), _fit("bf16-mixed")
    for name in exact:
        torch.testing.assert_close(mixed[name], exact[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 16-mixed with a loss scaler, through the Trainer, for every rule and schedule of the battery
# (tests/test_rule_tester.py). CPU autocast runs float16 and torch.amp.GradScaler("cpu") scales
# the loss, so Lightning's 16-mixed path (scale in manual_backward, unscale_ + inf check in
# optimizer.step, then the scale update) runs as on a GPU. References: the fp32 run with the
# same settings, and torch's own AMP recipe (autocast + GradScaler) around the rule's step.

SCALE = 2.0**12  # a wrong factor of the scale anywhere is an error of orders of magnitude


def _scaler(init_scale: float = SCALE, **options) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale, **options)


def _train(name: str, scaler: torch.amp.GradScaler | None = None, *, epochs: int = 1,
           prepare=None, **settings) -> tuple[dict[str, torch.Tensor], LocalLearningModule]:
    """The module of case ``name`` fitted (fp32, or 16-mixed with ``scaler``): its weight
    updates (trained minus initial, by parameter name) and the module."""
    _, rule_settings, module_class = battery._case(name)
    model = module_class(network=battery._network(), lr=0.1, loss="cross_entropy",
                         **{**rule_settings, **settings})
    if prepare is not None:
        prepare(model.rule)
    initial = {k: p.detach().clone() for k, p in model.trained_network.named_parameters()}
    plugins = [] if scaler is None else [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    torch.manual_seed(11)
    battery._trainer(max_epochs=epochs, plugins=plugins).fit(
        model, battery._loader(battery._data()))
    trained = dict(model.trained_network.named_parameters())
    return {k: trained[k].detach() - initial[k] for k in initial}, model


@functools.cache
def _fp32_updates(name: str, epochs: int = 1, **settings) -> dict[str, torch.Tensor]:
    return _train(name, epochs=epochs, **settings)[0]


def _update_error(mixed: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """The largest relative error of a parameter's update (parameters that moved in fp32)."""
    assert mixed.keys() == exact.keys()
    return max(float((mixed[k] - exact[k]).norm() / exact[k].norm())
               for k in exact if exact[k].norm() > 0)


@functools.cache
def _backprop_16_mixed_error() -> float:
    """Backprop's own 16-mixed error (its forward and backward in float16): the yardstick."""
    return _update_error(_train("bp", _scaler())[0], _fp32_updates("bp"))


def _within_backprops_error(error: float) -> bool:
    return error <= 2 * _backprop_16_mixed_error() + 1e-6


def test_backprop_runs_16_mixed_with_the_scale_divided_out():
    error = _backprop_16_mixed_error()
    assert 1e-6 < error < 1e-2  # float16 really ran, and the scale 2^12 was divided out


@pytest.mark.parametrize("name", sorted(battery.CASES))
def test_16_mixed_with_a_scaler_is_fp32_within_backprops_error(name):
    scaler = _scaler(growth_interval=1)  # the scale doubles after every step: 4 scales seen
    mixed, model = _train(name, scaler)
    assert _within_backprops_error(_update_error(mixed, _fp32_updates(name)))
    assert model.trainer.global_step == 4
    assert scaler.get_scale() == SCALE * 2**4  # no step overflowed, each grew the scale


CLIPS = {"norm": 0.05, "value": 0.02}


@pytest.mark.parametrize("algorithm", sorted(CLIPS))
@pytest.mark.parametrize("name", sorted(battery.CASES))
def test_clipping_under_a_scaler_acts_on_the_unscaled_gradients(name, algorithm):
    clip = dict(gradient_clip_val=CLIPS[algorithm], gradient_clip_algorithm=algorithm)
    exact = _fp32_updates(name, **clip)
    assert _update_error(exact, _fp32_updates(name)) > 1e-2  # the clip is active in fp32
    mixed, _ = _train(name, _scaler(), **clip)
    assert _within_backprops_error(_update_error(mixed, exact))


@pytest.mark.parametrize("name", sorted(battery.CASES))
def test_accumulation_under_a_scaler_is_fp32_within_backprops_error(name):
    scaler = _scaler(growth_interval=1)
    mixed, model = _train(name, scaler, accumulate_grad_batches=2)
    assert _within_backprops_error(
        _update_error(mixed, _fp32_updates(name, accumulate_grad_batches=2)))
    assert model.trainer.global_step == 2 and scaler.get_scale() == SCALE * 2**2


def _amp_by_hand(name: str, scaler: torch.amp.GradScaler, prepare=None) -> dict:
    """torch's AMP recipe around the rule's step, in plain PyTorch: autocast(float16), scale the
    surrogate, ``scaler.step`` (skipped on inf gradients) and ``scaler.update``."""
    rule_class, rule_settings, _ = battery._case(name)
    rule = rule_class("cross_entropy", **rule_settings)
    if prepare is not None:
        prepare(rule)
    network = wire(battery._network(), rule, "sp").network
    initial = {k: p.detach().clone() for k, p in network.named_parameters()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    torch.manual_seed(11)
    for x, y in battery._loader(battery._data()):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            result = rule.training_loss(network, x, y)
            with rule.backward_precision(x):
                scaler.scale(result.surrogate).backward()
        scaler.step(optimizer)
        scaler.update()
    return {k: p.detach() - initial[k] for k, p in network.named_parameters()}


def _overflow_first_backward(rule) -> None:
    """The first step's scaled backward pass overflows (every gradient inf or NaN), as a too
    large scale overflows float16. A local rule's backward pass is fp32, where no loss scale
    reaches an overflow (gradients of order 0.1 would need a scale above fp32's maximum), so it
    is made to overflow the same way for every rule."""
    original, calls = rule.training_loss, itertools.count()

    def training_loss(network, inputs, targets):
        result = original(network, inputs, targets)
        if next(calls) == 0:
            result.surrogate.register_hook(lambda grad: grad * math.inf)
        return result

    rule.training_loss = training_loss


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip_nonfinite_batches"])
@pytest.mark.parametrize("name", sorted(battery.CASES))
def test_an_overflowed_step_is_skipped_by_the_scaler_which_backs_off(name, skip):
    scaler = _scaler()
    mixed, _ = _train(name, scaler, prepare=_overflow_first_backward,
                      skip_nonfinite_batches=skip)
    assert scaler.get_scale() == SCALE / 2  # one back-off; the next 3 steps did not overflow
    assert all(bool(torch.isfinite(u).all()) for u in mixed.values())
    reference = _amp_by_hand(name, _scaler(), prepare=_overflow_first_backward)
    for key in reference:  # the first step skipped, the next three applied
        torch.testing.assert_close(mixed[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("skip", [False, True], ids=["raise", "skip_nonfinite_batches"])
def test_backprop_float16_overflow_at_a_large_scale_backs_off_like_torch(skip):
    init = 2.0**18  # float16 gradients overflow at the first step(s), then the scale fits
    scaler = _scaler(init)
    mixed, _ = _train("bp", scaler, skip_nonfinite_batches=skip)
    reference_scaler = _scaler(init)
    reference = _amp_by_hand("bp", reference_scaler)
    assert scaler.get_scale() == reference_scaler.get_scale() < init
    assert any(bool(u.abs().sum() > 0) for u in reference.values())  # a later step applied
    for key in reference:
        torch.testing.assert_close(mixed[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_tp_inner_feedback_steps_under_a_scaler_are_fp32():
    # the k - 1 inner steps take torch.autograd.grad of the fp32 reconstruction loss and step
    # the plain optimizer: the loss scale never enters them
    settings = dict(feedback_steps=3)
    mixed, _ = _train("dtp-noisy", _scaler(), **settings)
    assert _within_backprops_error(_update_error(mixed, _fp32_updates("dtp-noisy", **settings)))


def test_tp_feedback_pretraining_under_a_scaler_is_fp32():
    settings = dict(feedback_steps=2, feedback_pretrain_epochs=1)
    mixed, _ = _train("dtp-noisy", _scaler(), epochs=2, **settings)
    exact = _fp32_updates("dtp-noisy", epochs=2, **settings)
    assert _within_backprops_error(_update_error(mixed, exact))
