"""The Lightning surface: modules, muP wiring, logging, checkpoints, both ways of use."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _module_fixtures import BASE, CLASSES, IN, WIDTH
from _module_fixtures import data as _data
from _module_fixtures import loader as _loader
from _module_fixtures import mlp as _mlp
from _module_fixtures import mse as _mse
from _module_fixtures import trainer as _trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.errors import (
    CheckpointError,
    LocalLearningError,
    MissingBaseShapesError,
    UnsupportedNetworkError,
)
from lightning_local.models import MLP
from lightning_local.modules import (
    BackpropModule,
    LocalLearningModule,
    PredictiveCodingModule,
    TargetPropagationModule,
)
from lightning_local.modules.checkpoint import AtomicCheckpointIO, save_atomically
from lightning_local.parametrization import set_base_shapes

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "convert_existing_project.py"


def _infshape(p: torch.Tensor) -> list[tuple[int | None, int]]:
    """``p.infshape`` as (base dim or None for a finite dim, dim) pairs."""
    return [(d.base_dim, d.dim) for d in p.infshape]


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


# ------------------------------------------------------------------------ training
@pytest.mark.parametrize("cls", [BackpropModule, PredictiveCodingModule])
def test_training_lowers_the_loss(cls):
    model = cls(network=_mlp(), lr=0.2)
    dataset = _data()
    before = _mse(model, dataset)
    _trainer(max_epochs=8).fit(model, _loader())
    assert _mse(model, dataset) < 0.7 * before


def test_global_step_counts_batches():
    model = PredictiveCodingModule(network=_mlp(), inference="simultaneous", inference_steps=3)
    trainer = _trainer(max_epochs=2)
    trainer.fit(model, _loader(n=40, batch_size=8))  # 5 batches per epoch
    assert trainer.global_step == 10


@pytest.mark.parametrize(
    ("parametrization", "exponent", "width", "gamma"),
    [("sp", 0.0, WIDTH, 0.5), ("mup", 0.0, 2 * BASE, 1.0), ("mup", 0.5, 4 * BASE, 0.7),
     ("mup", -1.0, 4 * BASE, 2.0)],
)
def test_pc_update_is_gamma_times_backprop(parametrization, exponent, width, gamma):
    """F-ini + one SI sweep + FPA + unit hidden weights/step sizes: Delta W_PC = gamma_L'
    Delta W_BP after one SGD step through the Trainer, also under muP at any g, where the
    output weight gamma_L = gamma_L' m^{-g} and the lr exponents shifted by -g cancel."""
    common = dict(parametrization=parametrization, base_width=BASE, lr=0.05)
    bp = BackpropModule(network=_mlp(width), **common)
    pc = PredictiveCodingModule(
        network=_mlp(width), output_weight=gamma, output_weight_exponent=exponent,
        inference="sequential", inference_steps=1, fixed_prediction=True,
        inference_lr=1.0, hidden_weights=1.0, **common,
    )
    start = _weights(bp.network)
    assert all(torch.equal(start[k], v) for k, v in _weights(pc.network).items())
    for model in (bp, pc):
        _trainer(max_steps=1).fit(model, _loader(n=16, batch_size=16))
    m = width / BASE if parametrization == "mup" else 1.0
    assert pc.rule.output_weight == pytest.approx(gamma * m ** (-exponent))
    for name, w0 in start.items():
        bp_update = bp.network.get_parameter(name) - w0
        pc_update = pc.network.get_parameter(name) - w0
        assert bp_update.abs().max() > 0
        torch.testing.assert_close(pc_update, gamma * bp_update, rtol=1e-4, atol=1e-7)


def test_logged_metrics(tmp_path):
    """Step metrics of the rule (per-layer ones as name/layer_i), epoch loss, validation loss
    and accuracy equal to a direct computation, and the progress bar's loss and energy."""
    dataset = _data(32)
    model = PredictiveCodingModule(network=_mlp(), inference="simultaneous", inference_steps=4,
                                   inference_lr=0.2)
    trainer = _trainer(max_epochs=1, log_every_n_steps=1)
    loader = DataLoader(dataset, batch_size=16)
    trainer.fit(model, loader, loader)
    logged = trainer.callback_metrics
    layers = len(model.network)
    expected = {"train/loss", "train/loss_epoch", "train/energy_before", "train/energy_after",
                "train/inference_steps", "val/loss", "val/acc"}
    expected |= {f"train/energy_per_layer/layer_{i}" for i in range(layers)}
    expected |= {f"train/state_update_rms/layer_{i}" for i in range(layers - 1)}
    assert expected <= set(logged)
    per_layer = sum(float(logged[f"train/energy_per_layer/layer_{i}"]) for i in range(layers))
    assert per_layer == pytest.approx(float(logged["train/energy_after"]), rel=1e-5)
    assert float(logged["train/energy_after"]) < float(logged["train/energy_before"])
    assert float(logged["train/inference_steps"]) == 4
    x, y = dataset.tensors
    with torch.no_grad():
        accuracy = float((model.network(x).argmax(1) == y).float().mean())
    assert float(logged["val/acc"]) == pytest.approx(accuracy)
    assert float(logged["val/loss"]) == pytest.approx(_mse(model.network, dataset), rel=1e-5)
    assert {"train/loss", "train/energy_after"} <= set(trainer.progress_bar_metrics)


def test_test_and_predict_use_the_forward_pass():
    dataset = _data(32)
    model = BackpropModule(network=_mlp(), loss="cross_entropy")
    loader = DataLoader(dataset, batch_size=8)
    trainer = _trainer()
    tested = trainer.test(model, loader, verbose=False)[0]
    x, y = dataset.tensors
    with torch.no_grad():
        logits = model.network(x)
    assert tested["test/loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert tested["test/acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    predictions = torch.cat(trainer.predict(model, DataLoader(x, batch_size=8)))
    torch.testing.assert_close(predictions, logits)


def test_scheduler_from_configure_optimizers_is_stepped():
    class Decaying(BackpropModule):
        def configure_optimizers(self):
            optimizer = super().configure_optimizers()
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": scheduler}

    model = Decaying(network=_mlp(), lr=0.1)
    _trainer(max_epochs=3).fit(model, _loader())
    assert model.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


# ------------------------------------------------------------------------ muP wiring
def test_mup_attaches_base_shapes_and_rescales_once():
    model = BackpropModule(network=_mlp(4 * BASE), parametrization="mup", base_width=BASE, lr=0.1)
    m = 4.0
    for name, p in model.network.named_parameters():
        width_dims = [dim for dim in p.infshape if dim.isinf()]
        assert [dim.width_mult() for dim in width_dims] == [m] * len(width_dims), name
        assert width_dims or name == "2.bias"  # only the readout bias has no width dim
    fresh = _mlp(4 * BASE)
    # muP's readout init is SP's times m^{-1/2} (b_L = 1 vs 1/2); other layers are SP's
    torch.testing.assert_close(model.network[-1].weight, fresh[-1].weight * m**-0.5)
    torch.testing.assert_close(model.network[0][0].weight, fresh[0][0].weight)
    model.apply_parametrization()  # idempotent
    torch.testing.assert_close(model.network[-1].weight, fresh[-1].weight * m**-0.5)
    # BP muP with SGD: lr_l = lr * m^{-c_l}, c = (-1, 0, 1) for input, hidden, output
    groups = {g["role"]: g["lr"] for g in model.configure_optimizers().param_groups}
    assert groups["input"] == pytest.approx(0.1 * m)
    assert groups["hidden"] == pytest.approx(0.1)
    assert groups["output"] == pytest.approx(0.1 / m)


def _plain_net(width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Linear(IN, width), nn.Tanh()), nn.Linear(width, CLASSES)
    )


def test_mup_without_base_shapes_raises_a_clear_error():
    with pytest.raises(MissingBaseShapesError, match="base_shapes"):
        PredictiveCodingModule(network=_plain_net(32), parametrization="mup")
    PredictiveCodingModule(network=_plain_net(32), parametrization="sp")  # SP needs none


def test_mup_with_a_base_shape_file_or_attached_shapes(tmp_path):
    path = tmp_path / "net.bsh"
    set_base_shapes(_plain_net(32), _plain_net(16), _plain_net(8), savefile=path)
    from_file = PredictiveCodingModule(
        network=_plain_net(64), parametrization="mup", base_shapes=str(path)
    )
    assert _infshape(from_file.network[0][0].weight) == [(16, 64), (None, IN)]
    attached = set_base_shapes(_plain_net(64), _plain_net(16), _plain_net(8))
    model = BackpropModule(network=attached, parametrization="mup")
    assert _infshape(model.network[-1].weight) == [(None, CLASSES), (16, 64)]


def test_bad_arguments_raise_library_errors():
    with pytest.raises(LocalLearningError, match="optimizer"):
        BackpropModule(network=_mlp(), optimizer="lbfgs")
    with pytest.raises(LocalLearningError, match="inference"):
        PredictiveCodingModule(network=_mlp(), inference="backwards")
    with pytest.raises(LocalLearningError, match="WidthBuilder"):
        BackpropModule(network={"class_path": "os.system", "init_args": {}})

    class TwoNets(BackpropModule):
        def __init__(self):
            super().__init__()
            self.a, self.b = _mlp(), _mlp()

    with pytest.raises(UnsupportedNetworkError, match="network_for_rule"):
        TwoNets().rule  # noqa: B018


# ------------------------------------------------------------------------ checkpoints
class _Recorder(Callback):
    """Records the optimizer state when training (re)starts."""

    def on_train_start(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        buffers = [optimizer.state[p].get("momentum_buffer") for p in params]
        self.momentum = [None if b is None else b.clone() for b in buffers]


def _fit_with_checkpoints(
    tmp_path: Path, model: LocalLearningModule, epochs: int, loader: DataLoader | None = None,
    **kwargs,
):
    trainer = _trainer(
        tmp_path, max_epochs=epochs, enable_checkpointing=True, plugins=[AtomicCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), _Recorder()],
    )
    trainer.fit(model, loader or _loader(), **kwargs)
    return trainer


def _pc_mup(width: int = 2 * BASE) -> PredictiveCodingModule:
    return PredictiveCodingModule(
        network=_mlp(width), parametrization="mup", base_width=BASE, lr=0.05, momentum=0.9,
        output_weight_exponent=-1.0, inference="simultaneous", inference_steps=2,
        inference_lr=0.5,
    )


def test_checkpoint_round_trip_keeps_weights_and_base_shapes(tmp_path):
    model = _pc_mup()
    trainer = _fit_with_checkpoints(tmp_path, model, epochs=1)
    path = trainer.checkpoint_callback.last_model_path
    loaded = PredictiveCodingModule.load_from_checkpoint(path)  # the MLP is rebuilt from hparams
    assert isinstance(loaded.network, MLP) and loaded.network.width == 2 * BASE
    for (name, p), q in zip(model.named_parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
        assert _infshape(q) == _infshape(p)
    assert _infshape(loaded.network[1][0].weight) == [(BASE, 2 * BASE), (BASE, 2 * BASE)]
    assert loaded.rule.output_weight == pytest.approx(model.rule.output_weight)
    assert loaded.rule.output_weight == pytest.approx(2.0)  # gamma' m^{-g}, g = -1, m = 2
    assert "network" in loaded.hparams and loaded.hparams["parametrization"] == "mup"


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    """1 epoch + resume from the checkpoint for 1 more == 2 epochs straight (SGD momentum
    state, step counter and weights restored)."""
    straight = _pc_mup()
    _fit_with_checkpoints(tmp_path / "straight", straight, epochs=2)
    first = _pc_mup()
    first_trainer = _fit_with_checkpoints(tmp_path / "first", first, epochs=1)
    path = first_trainer.checkpoint_callback.last_model_path
    resumed = _pc_mup()
    trainer = _fit_with_checkpoints(tmp_path / "resumed", resumed, epochs=2, ckpt_path=path)
    assert trainer.global_step == 2 * 3
    recorder = next(c for c in trainer.callbacks if isinstance(c, _Recorder))
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]["state"]
    assert len(recorder.momentum) == len(saved) == len(list(resumed.parameters()))
    for index, buffer in enumerate(recorder.momentum):  # state_dict numbers params by group
        torch.testing.assert_close(buffer, saved[index]["momentum_buffer"], rtol=0, atol=0)
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, msg=name)
        assert _infshape(q) == _infshape(p)


def test_broken_checkpoints_raise_checkpoint_error(tmp_path):
    model = _pc_mup()
    trainer = _fit_with_checkpoints(tmp_path, model, epochs=1)
    good = Path(trainer.checkpoint_callback.last_model_path)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, garbage, tmp_path / "missing.ckpt"):
        with pytest.raises(CheckpointError, match="Fix"):
            PredictiveCodingModule.load_from_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not fit"):
        PredictiveCodingModule.load_from_checkpoint(good, network=_mlp(3 * BASE))
    with pytest.raises(CheckpointError, match="truncated"):
        _fit_with_checkpoints(tmp_path / "again", _pc_mup(), epochs=2, ckpt_path=truncated)


def test_atomic_save_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "state.ckpt"
    save_atomically({"state_dict": {"w": torch.ones(3)}}, path)

    def torn_save(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomically({"state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.ckpt"]


def test_user_network_reloads_when_passed_again(tmp_path):
    model = BackpropModule(network=_plain_net(16), lr=0.1)
    trainer = _fit_with_checkpoints(tmp_path, model, epochs=1)
    path = trainer.checkpoint_callback.last_model_path
    assert "network" not in torch.load(path, weights_only=True)["hyper_parameters"]
    loaded = BackpropModule.load_from_checkpoint(path, network=_plain_net(16))
    for p, q in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


# ------------------------------------------------------------------------ subclass style
def _example():
    spec = importlib.util.spec_from_file_location("convert_existing_project", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _labels_dataset(n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 40, generator=generator)
    return TensorDataset(x, (x[:, :10]).argmax(1))


def test_converted_project_trains_validates_and_reloads(tmp_path):
    example = _example()
    dataset = _labels_dataset()
    loader = DataLoader(dataset, batch_size=16)
    torch.manual_seed(0)
    model = example.PCClassifier(width=32, lr=0.2)
    assert model.network_for_rule() is model.net
    x, y = dataset.tensors

    def ce():
        with torch.no_grad():
            return float(F.cross_entropy(model(x), y))

    before = ce()
    trainer = _fit_with_checkpoints(tmp_path, model, epochs=4, loader=loader)
    assert ce() < 0.8 * before
    assert "val_acc" not in trainer.callback_metrics  # no val loader given
    trainer.validate(model, loader, verbose=False)
    accuracy = float((model(x).argmax(1) == y).float().mean())
    assert float(trainer.callback_metrics["val_acc"]) == pytest.approx(accuracy)
    loaded = example.PCClassifier.load_from_checkpoint(trainer.checkpoint_callback.last_model_path)
    assert loaded.hparams["width"] == 32
    for p, q in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_converted_project_update_matches_backprop_times_gamma():
    """The converted class's PC step (SI + FPA) equals the original's backprop step with the
    same loss (cross-entropy), i.e. the conversion keeps the training semantics."""
    example = _example()
    batch = _labels_dataset(16)
    torch.manual_seed(0)
    original = example.LitClassifier(width=32, lr=0.1)
    torch.manual_seed(0)
    converted = example.PCClassifier(width=32, lr=0.1)
    start = _weights(original.net)
    for model in (original, converted):
        _trainer(max_steps=1).fit(model, DataLoader(batch, batch_size=16))
    for name, w0 in start.items():
        torch.testing.assert_close(
            converted.net.get_parameter(name) - w0, original.net.get_parameter(name) - w0,
            rtol=1e-4, atol=1e-7,
        )


class _StartWeights(Callback):
    def on_train_start(self, trainer, pl_module):
        self.readout = pl_module.net[-1].weight.detach().clone()


def test_converted_project_under_mup(tmp_path):
    """Subclass style under muP: the init rescale runs once, in setup (before the optimizer);
    a second fit does not rescale again; checkpoints reload with base shapes."""
    example = _example()
    model = example.MuPClassifier(width=128, lr=0.1)
    initial = model.net[-1].weight.detach().clone()
    start = _StartWeights()
    trainer = _trainer(tmp_path, max_epochs=1, callbacks=[start], enable_checkpointing=True)
    trainer.fit(model, DataLoader(_labels_dataset(), batch_size=16))
    torch.testing.assert_close(start.readout, initial * 2.0**-0.5)  # m = 128 / 64
    assert _infshape(model.net[-1].weight) == [(None, 10), (64, 128)]
    trained = model.net[-1].weight.detach().clone()
    again = _StartWeights()
    _trainer(tmp_path, max_epochs=1, callbacks=[again]).fit(
        model, DataLoader(_labels_dataset(), batch_size=16)
    )
    torch.testing.assert_close(again.readout, trained, rtol=0, atol=0)
    path = trainer.checkpoint_callback.best_model_path
    loaded = example.MuPClassifier.load_from_checkpoint(path)
    _trainer().validate(loaded, DataLoader(_labels_dataset(), batch_size=16), verbose=False)
    saved = torch.load(path, weights_only=True)["state_dict"]  # setup rescaled nothing
    for (name, q), p in zip(loaded.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, saved[name], rtol=0, atol=0)
        assert _infshape(q) == _infshape(p)


# ------------------------------------------------------------------------ accumulation, clipping
def _fit_weights(model, batch_size: int, dataset: TensorDataset, **trainer_kwargs):
    trainer = _trainer(max_epochs=1, **trainer_kwargs)
    trainer.fit(model, DataLoader(dataset, batch_size=batch_size, shuffle=False))
    return _weights(model.trained_network), trainer


@pytest.mark.parametrize("cls, settings", [
    (BackpropModule, {}),
    (PredictiveCodingModule, dict(inference="sequential", fixed_prediction=True)),
])
def test_accumulating_k_batches_equals_one_batch_of_kB(cls, settings):
    """Backprop and PC SI+FPA: k micro-batches of B give exactly the step of one batch of kB
    (the surrogate is a batch mean, divided by k); global_step counts optimizer steps."""
    dataset = _data(n=48)
    accumulated, trainer = _fit_weights(
        cls(network=_mlp(), lr=0.2, accumulate_grad_batches=3, **settings), 8, dataset)
    assert trainer.global_step == 2  # 6 micro-batches, 2 steps
    large, _ = _fit_weights(cls(network=_mlp(), lr=0.2, **settings), 24, dataset)
    small, _ = _fit_weights(cls(network=_mlp(), lr=0.2, **settings), 8, dataset)
    for name in large:
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(small[n], large[n]) for n in large)  # the test can fail


def test_accumulation_sums_per_micro_batch_updates_for_iterative_rules():
    """PC with simultaneous inference: k inferences (one per micro-batch) and one update with
    the mean of their gradients, as the rule run by hand."""
    settings = dict(inference="simultaneous", inference_steps=5, inference_lr=0.3,
                    fixed_prediction=False)
    dataset = _data(n=32)
    accumulated, trainer = _fit_weights(
        PredictiveCodingModule(network=_mlp(), lr=0.2, accumulate_grad_batches=2, **settings),
        8, dataset)
    assert trainer.global_step == 2
    network = _mlp()
    rule = PredictiveCodingModule(network=network, **settings).rule
    optimizer = torch.optim.SGD(network.parameters(), lr=0.2)
    x, y = dataset.tensors
    for group in (0, 16):
        optimizer.zero_grad()
        for start in (group, group + 8):
            (rule.training_loss(network, x[start:start + 8], y[start:start + 8]).surrogate
             / 2).backward()
        optimizer.step()
    for name, p in network.named_parameters():
        torch.testing.assert_close(accumulated[name], p.detach(), rtol=1e-5, atol=1e-7)


def test_a_short_last_group_still_steps():
    dataset = _data(n=40)  # 5 batches of 8, k = 2: steps after batches 2, 4 and 5
    _, trainer = _fit_weights(
        BackpropModule(network=_mlp(), accumulate_grad_batches=2), 8, dataset)
    assert trainer.global_step == 3


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_matches_torch_clipping(algorithm):
    dataset = _data(n=16)
    clipped, _ = _fit_weights(
        PredictiveCodingModule(network=_mlp(), lr=0.5, gradient_clip_val=0.05,
                               gradient_clip_algorithm=algorithm), 16, dataset)
    network = _mlp()
    rule = PredictiveCodingModule(network=network).rule
    optimizer = torch.optim.SGD(network.parameters(), lr=0.5)
    x, y = dataset.tensors
    rule.training_loss(network, x, y).surrogate.backward()
    if algorithm == "norm":
        norm = torch.nn.utils.clip_grad_norm_(network.parameters(), 0.05)
        assert norm > 0.05  # clipping is active in this case
    else:
        largest = max(float(p.grad.abs().max()) for p in network.parameters())
        assert largest > 0.05
        torch.nn.utils.clip_grad_value_(network.parameters(), 0.05)
    optimizer.step()
    for name, p in network.named_parameters():
        torch.testing.assert_close(clipped[name], p.detach(), rtol=1e-5, atol=1e-7)


def test_accumulation_and_clipping_settings_are_checked():
    from lightning_local.modules import TargetPropagationModule

    with pytest.raises(LocalLearningError, match="accumulate_grad_batches"):
        BackpropModule(network=_mlp(), accumulate_grad_batches=0)
    with pytest.raises(LocalLearningError, match="gradient_clip_val"):
        BackpropModule(network=_mlp(), gradient_clip_val=-1.0)
    with pytest.raises(LocalLearningError, match="feedback-only steps"):
        TargetPropagationModule(network=_mlp(), feedback_training="noisy", feedback_steps=2,
                                accumulate_grad_batches=2)


def test_checkpoint_holds_each_weight_once_and_old_checkpoints_load(tmp_path):
    """One copy of each weight (0.1.0 stored a second under `_wired.*`); a checkpoint with
    those duplicate keys still loads."""
    model = BackpropModule(network=_mlp())
    trainer = _trainer(tmp_path, max_steps=1)
    trainer.fit(model, _loader())
    path = tmp_path / "now.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert sorted(state) == sorted(f"network.{n}" for n, _ in model.network.named_parameters())
    old = torch.load(path, weights_only=True)
    old["state_dict"].update({f"_wired.{k[len('network.'):]}": v.clone()
                              for k, v in state.items()})
    torch.save(old, tmp_path / "old.ckpt")
    loaded = BackpropModule.load_from_checkpoint(tmp_path / "old.ckpt")
    for p, q in zip(model.parameters(), loaded.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


# ------------------------------------------------------------------------ divergence
class _Overflowing(torch.optim.SGD):
    """SGD whose third step overflows one weight (as a huge learning rate would)."""

    def step(self, closure=None):
        result = super().step(closure)
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(float("inf"))
        return result


@pytest.mark.parametrize("overflow", [False, True], ids=["loss", "weights"])
def test_divergence_never_reaches_disk(tmp_path, overflow):
    """Backprop at lr 1e4 (its loss turns infinite), or a step that leaves a weight infinite
    with a finite loss (which used to be checkpointed before the next step's loss raised):
    training stops before that step's checkpoint, naming the step, and every file on disk
    holds finite weights."""

    class Diverging(BackpropModule):
        def configure_optimizers(self):
            if not overflow:
                return super().configure_optimizers()
            return _Overflowing(self.parameters(), lr=0.1)

    model = Diverging(network=_mlp(), lr=0.1 if overflow else 1e4)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True,
                                  save_top_k=-1)
    trainer = _trainer(tmp_path, max_epochs=20, callbacks=[checkpoints],
                       enable_checkpointing=True)
    what = r"step 3: after the update the weight 0\.0\.weight" if overflow else r"step \d+: "
    with pytest.raises(LocalLearningError, match=what + ".*(not finite|max_weight_magnitude)"):
        trainer.fit(model, _loader())
    files = sorted(tmp_path.glob("*.ckpt"))
    assert files  # the run got past its first steps
    for path in files:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path.name


@pytest.mark.parametrize("module_class", [PredictiveCodingModule, TargetPropagationModule])
def test_exploding_but_finite_weights_stop_training_before_their_checkpoint(
        tmp_path, module_class):
    """A learning rate far too large for PC or DTP blows the weights up to huge finite values
    (1e18-1e30 in 0.1.0, all checkpointed): the update that first leaves an entry above
    max_weight_magnitude stops training, naming the step and the weight, and every checkpoint
    holds the weights before it. With the check off the same run goes past that size."""
    def run(folder, **settings):
        torch.manual_seed(0)
        model = module_class(network=_mlp(), lr=3e3, **settings)
        checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
        trainer = _trainer(folder, max_epochs=3, callbacks=[checkpoints],
                           enable_checkpointing=True)
        trainer.fit(model, _loader())
        return model

    with pytest.raises(LocalLearningError, match=r"step \d+: .*magnitude .* > "
                       r"max_weight_magnitude=1e\+06: training diverged"):
        run(tmp_path / "checked", max_weight_magnitude=1e6)
    for path in sorted((tmp_path / "checked").glob("*.ckpt")):
        state = torch.load(path, weights_only=True)["state_dict"]
        assert max(float(v.abs().max()) for v in state.values()) <= 1e6, path.name
    try:
        unchecked = run(tmp_path / "unchecked", max_weight_magnitude=None)
        largest = max(float(p.detach().abs().max()) for p in unchecked.parameters())
    except LocalLearningError:  # it went on until a value was no longer finite
        largest = float("inf")
    assert largest > 1e6


def test_skip_nonfinite_batches_equals_training_without_them():
    dataset = _data(n=48)
    x, y = dataset.tensors
    poisoned = x.clone()
    poisoned[16:32] = float("nan")  # the second batch of 16
    skipping = PredictiveCodingModule(network=_mlp(), skip_nonfinite_batches=True)
    trainer = _trainer(max_epochs=1)
    trainer.fit(skipping, DataLoader(TensorDataset(poisoned, y), batch_size=16))
    assert float(trainer.callback_metrics["train/skipped_batches"]) == 1.0
    clean = PredictiveCodingModule(network=_mlp())
    kept = torch.cat([torch.arange(0, 16), torch.arange(32, 48)])
    _trainer(max_epochs=1).fit(clean, DataLoader(TensorDataset(x[kept], y[kept]), batch_size=16))
    for p, q in zip(skipping.network.parameters(), clean.network.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    with pytest.raises(LocalLearningError, match="step 2: .*skip_nonfinite_batches"):
        _trainer(max_epochs=1).fit(PredictiveCodingModule(network=_mlp()),
                                   DataLoader(TensorDataset(poisoned, y), batch_size=16))


@pytest.mark.parametrize("flag", [dict(accumulate_grad_batches=2), dict(gradient_clip_val=1.0)])
def test_the_trainer_flags_are_refused_and_the_module_settings_replace_them(flag):
    """Lightning refuses these Trainer flags under manual optimization (every rule needs it);
    the module refuses them first, naming the module setting of the same name that does it
    (tested above and in the rule tester)."""
    (name,) = flag
    with pytest.raises(LocalLearningError, match=rf"pass {name}=.* to BackpropModule"):
        _trainer(max_steps=1, **flag).fit(BackpropModule(network=_mlp()), _loader())
    assert name in BackpropModule.setting_names()


class _CountingBackend:
    """A ``torch.compile`` backend that runs each captured graph as it is and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward


def _twenty_logged_steps(model: LocalLearningModule) -> LocalLearningModule:
    """20 steps (batches of 16, 16 and a short 8 per epoch), logging every step."""
    from _capture_logger import CaptureLogger

    torch.manual_seed(5)
    _trainer(max_steps=20, logger=CaptureLogger(), log_every_n_steps=1).fit(
        model, _loader(n=40, batch_size=16))
    return model


def _pc_sim(**settings) -> PredictiveCodingModule:
    return PredictiveCodingModule(network=_mlp(), inference="simultaneous", inference_steps=4,
                                  inference_lr=0.2, lr=0.1, **settings)


@pytest.mark.parametrize("how", ["setting", "torch.compile(module)"])
def test_compiled_inference_trains_as_written_and_logging_never_recompiles(how):
    """``compile_inference=True`` (or ``trainer.fit(torch.compile(module))``, which the module
    turns into the same: training_step as written, the inference step compiled): 20 logged
    steps with a short last batch per epoch give the uncompiled run's weights and capture at
    most a fixed number of graphs, with no graph break [the uncompiled run; the count]."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    backend = _CountingBackend()
    if how == "setting":  # a setting names its backend: register this one under a name
        name = f"lightning_local_counting_{id(backend)}"
        torch._dynamo.register_backend(compiler_fn=backend, name=name)
        model = _pc_sim(compile_inference=True, compile_backend=name)
        trained = _twenty_logged_steps(model)
    else:
        model = _pc_sim()
        trained = model
        _twenty_logged_steps(torch.compile(model, backend=backend))
    assert trained.rule.inference_compiled
    assert 1 <= backend.graphs <= 4, backend.graphs
    assert not torch._dynamo.utils.counters["graph_break"]
    reference = _twenty_logged_steps(_pc_sim())
    for (name, p), q in zip(trained.network.named_parameters(), reference.network.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()
