"""Converting a plain Lightning classifier, as the README says, for each rule.

The plain classifier is written the way users write one: a flat ``nn.Sequential`` with
stand-alone activations, a loss module as a child (``self.criterion``), its own macro-averaged
``self.val_acc`` metric, ``training_step`` and ``configure_optimizers``. The references: the
original classifier's own backprop step, and each rule run directly on the same network
without Lightning.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from _module_fixtures import trainer as _trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_local.errors import LocalLearningError
from lightning_local.modules import (
    BackpropModule,
    PredictiveCodingModule,
    TargetPropagationModule,
)
from lightning_local.rules import Backprop, PredictiveCoding, TargetPropagation

IN, WIDTH, CLASSES = 12, 24, 4


def make_net(width: int = WIDTH) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, CLASSES),
    )


def _dataset(n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(n, IN, generator=generator)
    return TensorDataset(x, (x @ torch.randn(IN, CLASSES, generator=generator)).argmax(1))


class PlainClassifier(L.LightningModule):
    """Before: a backprop classifier as a user writes it."""

    def __init__(self, width: int = WIDTH, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(width)
        self.criterion = nn.CrossEntropyLoss()
        self.val_acc = MulticlassAccuracy(num_classes=CLASSES, average="macro")

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc.update(self(x), y)
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _converted(base: type, **settings):
    """After: the base class changed, settings to super().__init__, the two methods deleted."""

    class Converted(base):
        def __init__(self, width: int = WIDTH, lr: float = 0.1) -> None:
            super().__init__(lr=lr, loss="cross_entropy", **settings)
            self.net = make_net(width)
            self.criterion = nn.CrossEntropyLoss()
            self.val_acc = MulticlassAccuracy(num_classes=CLASSES, average="macro")

        def forward(self, x):
            return self.net(x)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_acc.update(self(x), y)
            self.log("val_acc", self.val_acc)

    return Converted


RULES = {
    "bp": (BackpropModule, Backprop, {}),
    "pc": (PredictiveCodingModule, PredictiveCoding,
           dict(inference="simultaneous", inference_steps=6, inference_lr=0.3,
                fixed_prediction=False)),
    "dtp": (TargetPropagationModule, TargetPropagation, dict(variant="dtp", beta=0.5)),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_converted_classifier_trains_as_its_rule_does_without_lightning(name):
    """Each rule's converted module ends with the weights of the rule run by hand on the same
    network (same seed, same batches), keeps the user's metric and ignores the criterion."""
    module_class, rule_class, settings = RULES[name]
    dataset = _dataset()
    torch.manual_seed(0)
    model = _converted(module_class, **settings)(lr=0.1)
    user_metric = model.val_acc
    trainer = _trainer(max_epochs=2, limit_val_batches=1.0)
    trainer.fit(model, DataLoader(dataset, batch_size=16), DataLoader(dataset, batch_size=64))
    assert model.network_for_rule() is model.net
    assert model.val_acc is user_metric  # the user's attribute is never replaced

    torch.manual_seed(0)
    net = make_net()
    rule = rule_class("cross_entropy", **settings)
    trained = rule.prepare_network(net)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(2):
        for x, y in DataLoader(dataset, batch_size=16):
            rule.step(trained, x, y, optimizer)
    for (key, p), q in zip(model.net.named_parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=key)

    x, y = dataset.tensors
    with torch.no_grad():
        predicted = net(x).argmax(1)
    recalls = [float((predicted[y == c] == c).float().mean()) for c in y.unique()]
    macro = sum(recalls) / len(recalls)  # the user's macro accuracy, not a micro one
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(macro, abs=1e-6)


def test_converted_backprop_equals_the_plain_classifier():
    dataset = _dataset()
    torch.manual_seed(0)
    plain = PlainClassifier()
    torch.manual_seed(0)
    converted = _converted(BackpropModule)()
    for model in (plain, converted):
        _trainer(max_epochs=1, limit_val_batches=0).fit(
            model, DataLoader(dataset, batch_size=16)
        )
    for p, q in zip(plain.net.parameters(), converted.net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_a_kept_training_step_is_refused():
    class KeptStep(_converted(PredictiveCodingModule)):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

    with pytest.raises(LocalLearningError, match="did not run the rule"):
        _trainer(max_steps=1).fit(KeptStep(), DataLoader(_dataset(), batch_size=16))


def test_a_kept_training_step_calling_super_is_fine():
    class LoggingStep(_converted(PredictiveCodingModule)):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    trainer = _trainer(max_steps=2)
    trainer.fit(LoggingStep(), DataLoader(_dataset(), batch_size=16))
    assert "train_loss" in trainer.callback_metrics


def test_a_kept_configure_optimizers_gets_mups_groups():
    """A kept `Adam(self.parameters(), lr=...)` under muP becomes muP's Adam (per-role lrs of
    the Adam table) instead of a silent SP run; it trains as the library's own optimizer."""

    class KeptOptimizer(_converted(PredictiveCodingModule, parametrization="mup",
                                   base_width=8)):
        def width_factory(self):
            return make_net

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01, betas=(0.8, 0.95))

    class Library(_converted(PredictiveCodingModule, parametrization="mup", base_width=8,
                             optimizer="adam")):
        def width_factory(self):
            return make_net

        def configure_optimizers(self):
            return self.local_run.make_optimizer(torch.optim.Adam, lr=0.01, betas=(0.8, 0.95))

    torch.manual_seed(0)
    kept = KeptOptimizer()
    optimizer = kept.configure_optimizers()
    torch.manual_seed(0)
    reference = Library()
    expected = reference.configure_optimizers()
    assert [(g["role"], g["lr"]) for g in optimizer.param_groups] == [
        (g["role"], g["lr"]) for g in expected.param_groups]
    assert len({g["lr"] for g in optimizer.param_groups}) > 1  # per-role, not one SP group
    for model in (kept, reference):
        _trainer(max_steps=3).fit(model, DataLoader(_dataset(), batch_size=16))
    for p, q in zip(kept.net.parameters(), reference.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_a_scheduler_on_an_ungrouped_optimizer_is_refused_under_mup():
    class KeptScheduler(_converted(PredictiveCodingModule, parametrization="mup")):
        def width_factory(self):
            return make_net

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": optimizer,
                    "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}

    with pytest.raises(LocalLearningError, match="make_optimizer"):
        _trainer(max_steps=1).fit(KeptScheduler(), DataLoader(_dataset(), batch_size=16))


def test_an_optimizer_missing_the_feedback_is_refused():
    """DTP with trainable feedback: an optimizer over the user's network alone would never
    train the feedback maps."""

    class NetOnly(_converted(TargetPropagationModule, feedback_training="noisy")):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    with pytest.raises(LocalLearningError, match="does not hold"):
        _trainer(max_steps=1).fit(NetOnly(), DataLoader(_dataset(), batch_size=16))


def test_dtp_subclass_stores_each_weight_once_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = _converted(TargetPropagationModule)()
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=True, limit_val_batches=0)
    trainer.fit(model, DataLoader(_dataset(), batch_size=16))
    state = model.state_dict()
    ids = [id(t) for t in state.values()]
    assert len(ids) == len(set(ids))
    assert {k.split(".")[0] for k in state} == {"net", "_lightning_local_extra"}
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = type(model).load_from_checkpoint(path)
    for (key, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=key)


def test_mup_converted_classifier_with_a_width_factory_needs_no_other_line():
    class MuPClassifier(_converted(TargetPropagationModule, parametrization="mup",
                                   base_width=8)):
        def width_factory(self):
            return make_net

    model = MuPClassifier(width=32)
    model.apply_parametrization()
    for _, p in model.trained_network.named_parameters():
        assert hasattr(p, "infshape")
    readout = model.net[-1].weight.infshape
    assert (readout[1].base_dim, readout[1].dim) == (8, 32)
