"""One battery that every rule and schedule runs, each check against its reference.

In the spirit of torchmetrics' tester: the cases are built from the rule registry
(:data:`lightning_local.rules.RULES`), so a new rule that registers itself gets its default
settings run through every check; the schedules below add the variants of the existing rules.
Checks (reference in brackets):

- ``Trainer.fit`` of the rule's module  [the rule's own ``step`` loop in plain PyTorch];
- checkpoint round trip: weights, settings and the next update  [the module before saving];
- bf16-mixed autocast  [the fp32 update, within twice backprop's own bf16 error];
- ``Trainer(precision="bf16-mixed")``  [the fp32 run, within twice backprop's own error];
- resume from a mid-epoch, a last-batch and an epoch-end checkpoint  [the uninterrupted run,
  0 difference];
- gradient accumulation over 2 micro-batches  [the surrogates' gradients summed by hand];
- gradient clipping by norm and by value  [``clip_grad_norm_`` / ``clip_grad_value_`` on the
  hand-run step];
- compiled blocks  [the uncompiled network].

Two-process DDP parity per rule lives in ``tests/test_distributed.py`` (it launches processes).
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.data import InMemoryDataModule
from lightning_local.models import MLP
from lightning_local.modules import LocalLearningModule
from lightning_local.rules import RULES, Backprop, LocalRule
from lightning_local.wiring import wire
from tests._capture_logger import CaptureLogger
from tests._module_fixtures import module_class

IN, WIDTH, CLASSES, BATCH = 12, 24, 4, 8

SCHEDULES: dict[str, tuple[str, dict]] = {
    "pc-si-fpa": ("pc", dict(inference="sequential", fixed_prediction=True)),
    "pc-si": ("pc", dict(inference="sequential", fixed_prediction=False)),
    "pc-sim": ("pc", dict(inference="simultaneous", inference_steps=6, inference_lr=0.2,
                          fixed_prediction=False)),
    "pc-tolerance": ("pc", dict(inference="tolerance", inference_steps=30, inference_lr=0.2,
                                tolerance=1e-3, fixed_prediction=False)),
    "tp": ("tp", dict(variant="tp")),
    "dtp-ridge": ("tp", dict(variant="dtp", feedback_training="ridge")),
    "dtp-noisy": ("tp", dict(variant="dtp", feedback_training="noisy", noise_std=0.1)),
}
CASES = dict(SCHEDULES)
for _family in RULES:  # a registered rule without schedules runs with its defaults
    if _family not in {family for family, _ in CASES.values()}:
        CASES[_family] = (_family, {})


def _case(name: str) -> tuple[type[LocalRule], dict, type[LocalLearningModule]]:
    family, settings = CASES[name]
    rule_class = RULES[family]
    return rule_class, settings, module_class(rule_class)


def _network(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh(),
                         nn.Linear(WIDTH, CLASSES))


def _data(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(n, IN, generator=generator)
    return TensorDataset(x, (x @ torch.randn(IN, CLASSES, generator=generator)).argmax(1))


def _loader(dataset: TensorDataset, batch_size: int = BATCH) -> DataLoader:
    # its own generator: iterating must not draw from the global stream (TP's noise uses it)
    return DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())


def _trainer(**kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0)
    return L.Trainer(**{**options, **kwargs})


def _by_hand(rule: LocalRule, network: nn.Module, batches, lr: float = 0.1, *,
             accumulate: int = 1, clip: float | None = None,
             clip_algorithm: str = "norm") -> nn.Module:
    """The rule's step in plain PyTorch on a wired ``network``: the reference every check
    compares against."""
    optimizer = torch.optim.SGD(network.parameters(), lr=lr)
    batches = list(batches)
    for start in range(0, len(batches), accumulate):
        optimizer.zero_grad(set_to_none=True)
        for x, y in batches[start:start + accumulate]:
            result = rule.training_loss(network, x, y)
            (result.surrogate / accumulate).backward()
        if clip is not None and clip_algorithm == "norm":
            torch.nn.utils.clip_grad_norm_(network.parameters(), clip)
        elif clip is not None:
            torch.nn.utils.clip_grad_value_(network.parameters(), clip)
        optimizer.step()
    return network


def _fit(name: str, dataset: TensorDataset, trainer_options: dict | None = None,
         **settings) -> LocalLearningModule:
    rule_class, rule_settings, module_class = _case(name)
    model = module_class(network=_network(), lr=0.1, loss="cross_entropy",
                         **rule_settings, **settings)
    torch.manual_seed(11)
    _trainer(max_epochs=1, **(trainer_options or {})).fit(model, _loader(dataset))
    return model


def _reference(name: str, dataset: TensorDataset, **options) -> nn.Module:
    rule_class, rule_settings, _ = _case(name)
    rule = rule_class("cross_entropy", **rule_settings)
    network = wire(_network(), rule, "sp").network  # TP: feedback drawn here, as the module
    torch.manual_seed(11)
    return _by_hand(rule, network, _loader(dataset), **options)


def _assert_same(trained: nn.Module, reference: nn.Module, rtol=1e-5, atol=1e-6) -> None:
    ours = dict(trained.named_parameters())
    theirs = dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=rtol, atol=atol, msg=key)


def test_every_registered_rule_has_a_case():
    assert {family for family, _ in CASES.values()} == set(RULES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trainer_fit_equals_the_rule_by_hand(name):
    dataset = _data()
    model = _fit(name, dataset)
    _assert_same(model.trained_network, _reference(name, dataset))
    assert any(not torch.equal(p, q) for p, q in
               zip(model.trained_network.parameters(), _network().parameters()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_checkpoint_round_trip_keeps_weights_settings_and_the_next_update(name, tmp_path):
    dataset = _data()
    model = _fit(name, dataset)
    trainer = _trainer(max_epochs=1)
    trainer.fit(model, _loader(dataset))
    path = tmp_path / "rule.ckpt"
    trainer.save_checkpoint(path)
    rule_class, rule_settings, module_class = _case(name)
    loaded = module_class.load_from_checkpoint(path, network=_network(seed=5))
    assert loaded.rule_settings == model.rule_settings
    assert loaded.training_settings == model.training_settings
    _assert_same(loaded.trained_network, model.trained_network, rtol=0, atol=0)
    x, y = dataset.tensors[0][:BATCH], dataset.tensors[1][:BATCH]
    updates = []
    for module in (model, loaded):
        torch.manual_seed(3)
        network = module.trained_network
        network.zero_grad(set_to_none=True)
        module.rule.training_loss(network, x, y).surrogate.backward()
        updates.append([p.grad for p in network.parameters() if p.requires_grad])
    for a, b in zip(*updates):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _update(rule: LocalRule, network: nn.Module, bf16: bool) -> list[torch.Tensor]:
    x, y = _data(64).tensors
    network.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        result = rule.training_loss(network, x, y)
        with rule.backward_precision(x):  # as LocalRule.step and the modules run it
            result.surrogate.float().backward()
    return [p.grad.clone() for p in network.parameters() if p.requires_grad]


def _bf16_error(rule: LocalRule) -> float:
    network = wire(_network(), rule, "sp").network
    exact, mixed = _update(rule, network, False), _update(rule, network, True)
    return max(float((m - e).norm() / e.norm()) for m, e in zip(mixed, exact) if e.norm() > 0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_autocast_is_within_twice_backprops_own_error(name):
    backprop = _bf16_error(Backprop("cross_entropy"))
    assert backprop > 1e-4  # autocast really ran backprop in bf16
    rule_class, rule_settings, _ = _case(name)
    assert _bf16_error(rule_class("cross_entropy", **rule_settings)) <= 2 * backprop


def _trainer_bf16_error(name: str) -> float:
    """``max_l ||W_l(bf16-mixed) - W_l(fp32)|| / ||W_l(fp32) - W_l(0)||`` after one epoch."""
    dataset = _data()
    initial = _fit(name, dataset, trainer_options=dict(max_steps=0))
    exact = _fit(name, dataset)
    mixed = _fit(name, dataset, trainer_options=dict(precision="bf16-mixed"))
    start = dict(initial.trained_network.named_parameters())
    ours = dict(mixed.trained_network.named_parameters())
    errors = []
    for key, w in exact.trained_network.named_parameters():
        moved = (w - start[key]).detach().norm()
        if moved > 0:
            errors.append(float((ours[key] - w).detach().norm() / moved))
    return max(errors)


@pytest.mark.parametrize("name", sorted(CASES))
def test_trainer_bf16_mixed_is_within_twice_backprops_own_error(name):
    """``Trainer(precision="bf16-mixed")``: the rule's inference stays in fp32, so its trained
    weights are as close to the fp32 run's as backprop's are (within twice) [the fp32 run]."""
    backprop = _trainer_bf16_error("bp")
    assert backprop > 1e-4  # the Trainer really ran the update in bf16
    assert _trainer_bf16_error(name) <= 2 * backprop


@pytest.mark.parametrize("name", sorted(CASES))
def test_accumulation_equals_summed_micro_batch_gradients(name):
    dataset = _data()
    model = _fit(name, dataset, accumulate_grad_batches=2)
    _assert_same(model.trained_network, _reference(name, dataset, accumulate=2))


@pytest.mark.parametrize(("algorithm", "clip"), [("norm", 0.05), ("value", 0.005)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_clipping_equals_torch_clipping(name, algorithm, clip):
    dataset = _data()
    model = _fit(name, dataset, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    reference = _reference(name, dataset, clip=clip, clip_algorithm=algorithm)
    _assert_same(model.trained_network, reference)
    unclipped = _reference(name, dataset)
    assert any(not torch.allclose(p, q) for p, q in
               zip(reference.parameters(), unclipped.parameters()))  # clipping was active


@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_blocks_equal_the_uncompiled_network(name):
    rule_class, rule_settings, _ = _case(name)
    dataset = _data()
    rule = rule_class("cross_entropy", **rule_settings)
    plain = wire(_network(), rule, "sp").network
    compiled = copy.deepcopy(plain)
    blocks = compiled.blocks if hasattr(compiled, "feedback") else compiled
    for index, block in enumerate(list(blocks)):
        blocks[index] = torch.compile(block, backend="eager")
    trained = []
    for network in (plain, compiled):
        torch.manual_seed(11)
        trained.append(_by_hand(rule, network, _loader(dataset)))
    for p, q in zip(trained[0].parameters(), trained[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


class _ShuffledData(InMemoryDataModule):
    """The library's data-module machinery (seeded, resumable shuffling) on a tiny problem:
    30 training samples in batches of 8, so an epoch is 4 batches, the last one short."""

    def __init__(self) -> None:
        super().__init__(None, batch_size=BATCH, num_workers=0, val_fraction=0.25, seed=5,
                         standardize=False)

    def _load_splits(self):
        x, y = _data(40).tensors
        return (x.clone(), y.clone()), (x[:8].clone(), y[:8].clone())


def _resumable_fit(name: str, folder, ckpt_path=None, scramble_rng: bool = False):
    """Three epochs on shuffled data with a checkpoint after every step and every epoch."""
    rule_class, rule_settings, module_class = _case(name)
    torch.manual_seed(0)
    network = MLP(in_features=IN, width=WIDTH, num_classes=CLASSES, depth=3)
    model = module_class(network=network, lr=0.1, momentum=0.9, loss="cross_entropy",
                         parametrization="mup", base_width=WIDTH // 2, **rule_settings)
    if scramble_rng:  # a new process: nothing of the killed run's random state survives
        torch.manual_seed(987654)
    logger = CaptureLogger()
    steps = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1,
                            save_top_k=-1)
    epochs = ModelCheckpoint(dirpath=folder, filename="end-{epoch}", save_top_k=-1,
                             save_on_train_epoch_end=True)
    trainer = _trainer(max_epochs=3, logger=logger, callbacks=[steps, epochs],
                       enable_checkpointing=True, limit_val_batches=None, log_every_n_steps=1)
    trainer.fit(model, datamodule=_ShuffledData(), ckpt_path=ckpt_path)
    return model, trainer, logger


def _logged_after(logger: CaptureLogger, step: int) -> list:
    return [(s, sorted(m.items())) for s, m in logger.metrics if s is not None and s >= step]


@pytest.mark.parametrize("where", ["step=6.ckpt", "step=4.ckpt", "end-epoch=0.ckpt"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_continues_exactly_as_the_uninterrupted_run(name, where, tmp_path):
    """Mid-epoch (step 6 of 12), after an epoch's last batch (step 4) and at an epoch-end
    checkpoint: the resumed run ends with the uninterrupted run's weights, optimizer state,
    and logged metrics, with 0 difference [the uninterrupted run]."""
    straight, straight_trainer, straight_log = _resumable_fit(name, tmp_path / "straight")
    resumed, resumed_trainer, resumed_log = _resumable_fit(
        name, tmp_path / "resumed", ckpt_path=tmp_path / "straight" / where, scramble_rng=True
    )
    assert resumed_trainer.global_step == straight_trainer.global_step == 12
    for (key, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), key
    ours = straight_trainer.optimizers[0].state_dict()
    theirs = resumed_trainer.optimizers[0].state_dict()
    for index, state in ours["state"].items():
        for key, value in state.items():
            assert torch.equal(value, theirs["state"][index][key]), (index, key)
    resumed_from = min(s for s, _ in resumed_log.metrics if s is not None)
    assert _logged_after(resumed_log, resumed_from) == _logged_after(straight_log, resumed_from)
