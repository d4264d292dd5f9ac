"""Bad input gets a clear error naming the problem and the fix, for every rule.

Each case is first run as torch would see it (the reference): it either fails obscurely or
trains silently wrongly, so the library's check is what makes the difference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_local.errors import LocalLearningError, ShapeMismatchError, UnsupportedNetworkError
from lightning_local.rules import Backprop, PredictiveCoding, TargetPropagation
from lightning_local.wiring import wire

RULES = {
    "bp": Backprop,
    "pc": lambda: PredictiveCoding(inference="simultaneous", inference_steps=3),
    "dtp": TargetPropagation,
}


def _net(*middle: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), *middle), nn.Linear(8, 3))


def _run(name: str, network: nn.Module, x, y):
    rule = RULES[name]()
    if name == "dtp":
        network = rule.build_network(network)
    return rule.training_loss(network, x, y)


X, Y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("x, y, error, match", [
    (torch.randn(4, 2, 3), Y, ShapeMismatchError, "flatten"),
    (torch.randn(6), Y, ShapeMismatchError, "batch dimension"),
    (X.double(), Y, LocalLearningError, "float64"),
    (X.long(), Y, LocalLearningError, "x.float"),
    (X[:0], Y[:0], LocalLearningError, "empty"),
    (X, Y[:3], ShapeMismatchError, "one target per sample"),
], ids=["3d", "1d", "float64", "int64", "empty", "targets"])
def test_bad_batches_are_refused_with_the_fix(name, x, y, error, match):
    with pytest.raises(error, match=match):
        _run(name, _net(), x, y)


@pytest.mark.parametrize("name", ["pc", "dtp"])
@pytest.mark.parametrize("make", [lambda: nn.Dropout(0.5), lambda: nn.BatchNorm1d(8)],
                         ids=["dropout", "bn"])
def test_resampling_layers_in_training_mode_are_refused_under_local_rules(name, make):
    network = _net(make())
    # the reference: two identical calls disagree (dropout) or move the statistics (bn)
    torch.manual_seed(1)
    before = [b.clone() for b in network.buffers()]
    first, second = network(X), network(X)
    assert not torch.equal(first, second) or any(
        not torch.equal(a, b) for a, b in zip(before, network.buffers()))
    with pytest.raises(UnsupportedNetworkError, match="eval mode"):
        _run(name, network, X, Y)
    network.eval()  # a fixed function: accepted
    _run(name, network, X, Y)


def test_backprop_keeps_dropout_and_batchnorm():
    _run("bp", _net(nn.Dropout(0.5), nn.BatchNorm1d(8)), X, Y)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)

    def forward(self, x):
        return self.lstm(x.unsqueeze(1))  # a tuple, as nn.LSTM returns


@pytest.mark.parametrize("name", ["bp", "pc"])
def test_a_block_returning_a_tuple_is_refused_with_the_fix(name):
    network = nn.Sequential(_Recurrent(), nn.Linear(8, 3))
    with pytest.raises(UnsupportedNetworkError, match="returned a tuple"):
        _run(name, network, X, Y)


def test_zero_inference_steps_is_refused():
    # the reference: with 0 steps only the readout would learn (hidden errors stay 0)
    with pytest.raises(LocalLearningError, match=">= 1"):
        PredictiveCoding(inference_steps=0)


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("make, x, block", [
    (lambda: nn.Sequential(nn.LSTM(6, 8, batch_first=True), nn.Linear(8, 3)),
     torch.randn(4, 5, 6), "block 0 is an nn.LSTM"),
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.MultiheadAttention(8, 2),
                           nn.Linear(8, 3)), X, "block 1 is an nn.MultiheadAttention"),
    (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Embedding(8, 8), nn.Linear(8, 3)),
     X, "block 1 is an nn.Embedding"),
], ids=["lstm", "attention", "embedding-after-a-layer"])
def test_blocks_the_rules_cannot_call_are_refused_naming_block_and_fix(name, make, x, block):
    network = make()
    with pytest.raises((TypeError, RuntimeError, AttributeError)):
        network(x)  # the reference: torch's error names neither the block nor a fix
    with pytest.raises(UnsupportedNetworkError, match="Fix:") as info:
        _run(name, network, x, Y)
    assert block in str(info.value)


@pytest.mark.parametrize("rule", [Backprop(), PredictiveCoding(),
                                  PredictiveCoding(inference="simultaneous", inference_steps=4),
                                  TargetPropagation(variant="dtp")],
                         ids=["bp", "pc-si", "pc-sim", "dtp"])
def test_an_embedding_at_the_input_trains_under_every_rule(rule):
    """Token indices into an embedding as the first layer: the data are fixed, so no rule
    needs a gradient with respect to them [the loss falls, the embedding moves]."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Tanh()),
                            nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3))
    run = wire(network, rule, "sp", input_shape=(5,))
    tokens = torch.randint(0, 10, (8, 5))
    labels = torch.randint(0, 3, (8,))
    optimizer = run.build_optimizer(lr=0.5)
    before = network[0][0].weight.detach().clone()
    losses = [float(run.rule.step(run.network, tokens, labels, optimizer).loss)
              for _ in range(8)]
    assert losses[-1] < losses[0] and not torch.equal(network[0][0].weight, before)


@pytest.mark.parametrize("settings, match", [
    (dict(weight_decay=-1.0), r"weight_decay must be a finite number >= 0, got -1.0\. Fix:"),
    (dict(momentum=float("nan")), r"momentum must be a finite number >= 0, got nan\. Fix:"),
    (dict(lr=float("nan")), r"lr must be a finite positive number, got nan\. Fix:"),
    (dict(base_width=0), r"base_width must be a whole number >= 1, got 0\. Fix:"),
    (dict(base_width=2.5), r"got 2.5\. Fix:"),
    (dict(accumulate_grad_batches=0), r"accumulate_grad_batches .* got 0\. Fix:"),
    (dict(gradient_clip_val=-1.0), r"gradient_clip_val .* got -1.0\. Fix:"),
    (dict(gradient_clip_algorithm="max"), r"got 'max'\. Fix:"),
], ids=["weight_decay", "momentum", "lr", "base_width", "base_width-float", "accumulate",
        "clip", "clip-algorithm"])
def test_bad_training_settings_name_the_value_and_the_fix(settings, match):
    from lightning_local.wiring import TrainingSettings

    with pytest.raises(LocalLearningError, match=match):
        TrainingSettings(**settings)
    assert TrainingSettings(base_width=32.0).base_width == 32  # a whole float is a width
