"""The user's model and data in sweeps and coordinate checks (``sweeps.components``).

References: a sweep trial against ``Trainer.fit`` of the Lightning module of the same rule,
seed and batch order (the final weights must agree); the coordinate check's sizes against a
network built and stepped by hand from the same factory and seed; ``DataSpec.load`` against
the data module's own data sets; the built-in MLP's run keys against keys of dicts built by
hand from the 0.1.0 record fields.
"""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_local.data import MNIST1DDataModule
from lightning_local.diagnostics.coord_check import coord_check
from lightning_local.errors import LocalLearningError
from lightning_local.modules import (
    BackpropModule,
    PredictiveCodingModule,
    TargetPropagationModule,
)
from lightning_local.network import as_blocks, feedforward
from lightning_local.sweeps import SweepConfig, read_results, sweep
from lightning_local.sweeps.components import DataSpec, ModelSpec
from lightning_local.sweeps.experiment import parse_variant
from lightning_local.sweeps.results import run_key
from lightning_local.sweeps.runner import train_run
from lightning_local.wiring import make_rule

IN, CLASSES = 10, 4


def flat_net(width: int) -> nn.Module:
    """A network factory of the test's own (not a library builder): a flat Sequential."""
    return nn.Sequential(
        nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
        nn.Linear(width, CLASSES),
    )


class UserNet(nn.Module):
    """A width-parametrized network defined here: two hidden layers exposing ``blocks``."""

    def __init__(self, width: int, in_features: int = 40, num_classes: int = 10,
                 activation: str = "tanh") -> None:
        super().__init__()
        act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Linear(in_features, width), act()),
            nn.Sequential(nn.Linear(width, width), act()),
            nn.Linear(width, num_classes),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _tensors(n_train: int = 40, n_test: int = 20):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n_train, IN, generator=g), torch.randint(0, CLASSES, (n_train,), generator=g),
        torch.randn(n_test, IN, generator=g), torch.randint(0, CLASSES, (n_test,), generator=g),
    )


class SweepOrder(Sampler):
    """The sweep's batch order: one generator seeded once, a fresh permutation per epoch."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


MODULES = {"bp": BackpropModule, "pc": PredictiveCodingModule, "tp": TargetPropagationModule}


def _module(variant: str) -> L.LightningModule:
    """The Lightning module of the variant's rule with its settings (seed torch first)."""
    rule = parse_variant(variant)

    class Module(MODULES[rule.family]):
        def width_factory(self):  # base shapes of a network that is not a width builder
            return flat_net

    return Module(network=flat_net(32), parametrization="mup", base_width=16, lr=0.1,
                  **rule.kwargs)


def _lightning_fit(variant: str, data, seed: int, order_seed: int) -> nn.Module:
    """The same run as a sweep trial, with ``Trainer.fit`` of the rule's Lightning module."""
    x_train, y_train = data[0], data[1]
    torch.manual_seed(seed)
    module = _module(variant)
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=16,
                        sampler=SweepOrder(len(x_train), order_seed), drop_last=False)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, deterministic=True,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 2 * math.ceil(len(x_train) / 16)
    return module.trained_network


@pytest.mark.parametrize("variant", ["bp", "pc-sim", "dtp"])
def test_sweep_trial_equals_trainer_fit(variant):
    data = _tensors()
    spec = SweepConfig(
        rules=[variant], parametrizations=["mup"], widths=[32], lrs=[0.1], seeds=[3], epochs=2,
        batch_size=16, base_width=16, model=flat_net, data=data,
    ).run_specs()[0]
    kept: list = []
    record = train_run(spec, keep=kept)
    assert not record["diverged"] and record["steps_done"] == 2 * math.ceil(40 / 16)
    swept = dict(kept[0].network.named_parameters())
    assert all(hasattr(p, "infshape") for p in swept.values())  # muP wired the user's net

    torch.manual_seed(3)
    untrained = dict(_module(variant).trained_network.named_parameters())
    fitted = dict(_lightning_fit(variant, data, seed=3, order_seed=3).named_parameters())
    assert sorted(fitted) == sorted(swept)
    if variant == "dtp":
        assert any(name.startswith("feedback") for name in swept)
    for name, weight in swept.items():
        torch.testing.assert_close(fitted[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    # the comparison has teeth: training moved the weights, and another batch order differs
    assert any((swept[n] - untrained[n]).abs().max() > 1e-3 for n in swept)
    other = dict(_lightning_fit(variant, data, seed=3, order_seed=4).named_parameters())
    assert any((other[n] - swept[n]).abs().max() > 1e-4 for n in swept)


def test_sweep_of_a_network_defined_here_from_python(tmp_path, data_dir):
    config = SweepConfig(
        rules=["bp"], parametrizations=["sp", "mup"], widths=[16, 32], lrs=[0.05], seeds=[0],
        steps=3, num_samples=200, batch_size=32, base_width=16, data_dir=data_dir, model=UserNet,
    )
    result = sweep(config, tmp_path / "out", log=None, plot=False)
    records = read_results(tmp_path / "out" / "results.jsonl")
    assert result.executed == 4 == len(records)
    assert {(r["parametrization"], r["width"]) for r in records} == {
        (p, w) for p in ("sp", "mup") for w in (16, 32)
    }
    for record in records:
        assert record["diverged"] is False and record["steps_done"] == 3
        assert math.isfinite(record["train_loss"])
        assert record["model"] == {"class_path": f"{__name__}.UserNet", "init_args": {},
                                   "width_argument": "width"}
        assert "depth" not in record and "activation" not in record
    assert len({r["key"] for r in records}) == 4
    again = sweep(config, tmp_path / "out", log=None, plot=False)
    assert (again.executed, again.skipped) == (0, 4)
    relu = ModelSpec(f"{__name__}.UserNet", {"activation": "relu"}, target=UserNet)
    changed = SweepConfig(**{**vars(config), "model": relu}).run_specs()
    assert not {s["key"] for s in changed} & {r["key"] for r in records}
    assert changed[0]["model"]["init_args"] == {"activation": "relu"}


def test_coord_check_of_a_network_defined_here_from_python(data_dir):
    widths, steps, lr, batch, probe_size, seed = [16, 32], 2, 0.05, 32, 24, 0
    result = coord_check(
        ["bp", "pc-si"], ["sp", "mup"], widths, steps=steps, lr=lr, batch_size=batch,
        probe_size=probe_size, num_samples=200, data_dir=data_dir, model=UserNet, seeds=[seed],
    )
    assert result.settings["model"]["class_path"] == f"{__name__}.UserNet"
    assert {r["width"] for r in result.records} == set(widths)
    assert {r["step"] for r in result.records} == set(range(1, steps + 1))
    for rule in ("bp", "pc-si"):
        for param in ("sp", "mup"):
            for layer in (1, 2, 3):
                for quantity in ("activation", "activation_change", "weight_update"):
                    assert result.slope(rule, param, quantity, layer) is not None

    # reference: the factory's network with the same seed, stepped by hand (SP, plain SGD)
    from lightning_local.sweeps.experiment import load_dataset

    x_train, y_train, x_test, _ = load_dataset("mnist1d", data_dir, 200)
    probe = x_test[:probe_size]
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
    for width in widths:
        torch.manual_seed(seed)
        network = UserNet(width)
        blocks = as_blocks(network)
        with torch.no_grad():
            initial = feedforward(blocks, probe)
        index = order[torch.arange(batch) % len(order)]
        make_rule("bp").step(network, x_train[index], y_train[index],
                              torch.optim.SGD(network.parameters(), lr=lr))
        with torch.no_grad():
            after = feedforward(blocks, probe)
        for quantity, expected in (
            ("activation", [h.pow(2).mean().sqrt() for h in after[1:]]),
            ("activation_change",
             [(h - h0).pow(2).mean().sqrt() for h, h0 in zip(after[1:], initial[1:])]),
        ):
            measured = sorted(
                (r["layer"], r["value"]) for r in result.records
                if (r["rule"], r["parametrization"], r["width"], r["step"], r["quantity"])
                == ("bp", "sp", width, 1, quantity)
            )
            assert [layer for layer, _ in measured] == [1, 2, 3]
            torch.testing.assert_close(
                torch.tensor([v for _, v in measured]), torch.stack(expected).float(),
                rtol=1e-5, atol=1e-7, msg=f"{quantity} at width {width}",
            )


class _TrainOnly(L.LightningDataModule):
    def train_dataloader(self):
        x, y = _tensors()[:2]
        return DataLoader(TensorDataset(x, y), batch_size=8)


class _ValOnly(_TrainOnly):
    def val_dataloader(self):
        x, y = _tensors()[2:]
        return DataLoader(TensorDataset(x, y), batch_size=8)


def test_model_spec_errors():
    with pytest.raises(LocalLearningError, match="'size'"):
        ModelSpec.of({"class_path": f"{__name__}.UserNet", "width_argument": "size"}).factory()
    with pytest.raises(LocalLearningError, match="'size'"):
        ModelSpec(f"{__name__}.UserNet", width_argument="size", target=UserNet).factory()
    with pytest.raises(LocalLearningError, match="no_such_package_xyz"):
        ModelSpec.of("no_such_package_xyz.Net").factory()
    with pytest.raises(LocalLearningError, match="NoSuchNet"):
        ModelSpec.of("lightning_local.models.NoSuchNet").factory()
    with pytest.raises(LocalLearningError, match="widht"):
        ModelSpec.of({"class_path": "x.Net", "widht": 3})
    with pytest.raises(LocalLearningError, match="not an nn.Module"):
        ModelSpec.of(lambda width: width).factory()(8)
    with pytest.raises(LocalLearningError, match="test_dataloader or val_dataloader"):
        DataSpec.of(_TrainOnly()).load()
    with pytest.raises(LocalLearningError, match="cannot read data"):
        DataSpec.of(42)
    # a data module with only a validation loader is evaluated on it
    x_train, y_train, x_eval, y_eval = DataSpec.of(_ValOnly).load()
    for got, want in zip((x_train, y_train, x_eval, y_eval), _tensors()):
        assert torch.equal(got, want)


def test_data_spec_from_datamodule_matches_its_loaders(data_dir):
    module = MNIST1DDataModule(data_dir, num_samples=200, batch_size=16)
    loaded = DataSpec.of(module).load()
    reference = MNIST1DDataModule(data_dir, num_samples=200, batch_size=16)
    reference.prepare_data()
    reference.setup("fit")
    reference.setup("test")
    expected = []
    for dataset in (reference.train_dataloader().dataset, reference.test_dataloader().dataset):
        pairs = [dataset[i] for i in range(len(dataset))]
        expected += [torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])]
    assert len(loaded[0]) == len(reference.train_dataloader().dataset) > 0
    for got, want in zip(loaded, expected):
        assert torch.equal(got, want)
    spec = DataSpec.of(module).to_dict()
    assert spec["class_path"] == "lightning_local.data.mnist1d.MNIST1DDataModule"
    assert spec["init_args"]["num_samples"] == 200
    json.dumps(spec)  # plain JSON for the run key


OLD_FIELDS = (
    "rule", "rule_family", "rule_hparams", "parametrization", "width", "lr", "seed", "epochs",
    "steps", "dataset", "num_samples", "data_seed", "batch_size", "base_width", "depth",
    "activation", "bias", "loss", "momentum", "output_weight_exponent", "divergence_factor",
)


def test_builtin_mlp_keys_unchanged():
    config = SweepConfig()
    specs = config.run_specs()
    assert len(specs) == len(config.parametrizations) * len(config.widths) * len(config.lrs)
    for spec in specs:
        public = {k for k in spec if not k.startswith("_")}
        assert public == set(OLD_FIELDS) | {"key"}
        variant = parse_variant(spec["rule"])
        by_hand = dict(
            rule=variant.name, rule_family=variant.family,
            rule_hparams=variant.hparams(config.loss), parametrization=spec["parametrization"],
            width=spec["width"], lr=spec["lr"], seed=spec["seed"], epochs=config.epochs,
            steps=None, dataset=config.dataset, num_samples=config.num_samples,
            data_seed=config.data_seed, batch_size=config.batch_size,
            base_width=config.base_width, depth=config.depth, activation=config.activation,
            bias=config.bias, loss=config.loss, momentum=config.momentum,
            output_weight_exponent=config.output_weight_exponent,
            divergence_factor=config.divergence_factor,
        )
        assert spec["key"] == run_key(by_hand)
    # the same sweep of a user's network has other keys (and no MLP fields)
    user = SweepConfig(model=UserNet).run_specs()
    assert not {s["key"] for s in user} & {s["key"] for s in specs}
    assert "model" in user[0] and "depth" not in user[0]


class _Unsaved(L.LightningDataModule):
    """A data module that does not save its arguments, with an empty validation list."""

    def __init__(self, n: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = (self.x[:, 0] > 0).long()

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=8)

    def val_dataloader(self):
        return []

    def test_dataloader(self):
        return DataLoader(TensorDataset(self.x[:8], self.y[:8]), batch_size=8)


def test_data_module_without_saved_arguments_is_keyed_by_content_and_empty_loaders_refused():
    small, large = DataSpec.of(_Unsaved(20)), DataSpec.of(_Unsaved(40))
    assert small.to_dict() != large.to_dict()
    assert DataSpec.of(_Unsaved(20)).to_dict() == small.to_dict()


def test_an_empty_evaluation_loader_list_is_a_clear_error():
    class NoEvaluation(_Unsaved):
        def __init__(self) -> None:
            super().__init__(16)
            self.save_hyperparameters()

        def test_dataloader(self):
            return []

    with pytest.raises(LocalLearningError, match="test_dataloader or val_dataloader"):
        DataSpec.of(NoEvaluation()).load()
