"""What a checkpoint carries for an exact resume, and the refusal of another run's checkpoint.

References: an uninterrupted run in another process (weights, optimizer state, logged metrics
equal with 0 difference after a real SIGKILL and a resume); the generators' own draws; the
module's settings as built.
"""

from __future__ import annotations

import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_local.errors import CheckpointError
from lightning_local.models import MLP
from lightning_local.modules import (
    BackpropModule,
    PredictiveCodingModule,
    TargetPropagationModule,
)
from lightning_local.modules.resume import base_shapes_of, random_state, restore_random_state
from tests import _module_fixtures as fx
from tests._resumable_run import data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_resumable_run.py"
MUP = dict(parametrization="mup", base_width=fx.BASE)


def _run(folder: Path, rule: str, data_dir: Path, *extra: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.run(
        [sys.executable, str(SCRIPT), str(folder), rule, "--data-dir", str(data_dir), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    if process.returncode not in (0, -9):
        raise AssertionError(process.stdout[-3000:] + process.stderr[-3000:])
    return process.returncode


# 5 batches per epoch: step 7 is mid-epoch 1; step 10 starts epoch 2 (killed at the boundary)
KILLS = {"pc-tolerance": 7, "dtp-noisy": 10}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("sigkill")
    data_dir = root / "data"
    data(str(data_dir)).prepare_data()  # generate the data set once, for every process
    with ThreadPoolExecutor(4) as pool:
        first = {
            (rule, kind): pool.submit(_run, root / rule / kind, rule, data_dir, *extra)
            for rule, step in KILLS.items()
            for kind, extra in (("straight", ()), ("killed", ("--kill-at", str(step))))
        }
        codes = {key: future.result() for key, future in first.items()}
        resumed = {
            rule: pool.submit(_run, root / rule / "resumed", rule, data_dir,
                              "--resume", str(root / rule / "killed" / "last.ckpt"))
            for rule in KILLS
        }
        codes.update({(rule, "resumed"): future.result() for rule, future in resumed.items()})
    return root, codes


@pytest.mark.parametrize("rule", sorted(KILLS))
def test_a_run_killed_with_sigkill_resumes_to_the_uninterrupted_result(killed_and_resumed, rule):
    root, codes = killed_and_resumed
    assert codes[(rule, "killed")] == -9 and codes[(rule, "resumed")] == 0
    assert not (root / rule / "killed" / "final.pt").exists()
    straight = torch.load(root / rule / "straight" / "final.pt", weights_only=False)
    resumed = torch.load(root / rule / "resumed" / "final.pt", weights_only=False)
    assert straight["steps"] == resumed["steps"] == 15
    for key, value in straight["weights"].items():
        assert torch.equal(value, resumed["weights"][key]), key
    for index, state in straight["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, resumed["optimizer"]["state"][index][key]), (index, key)
    start = min(step for step, _ in resumed["metrics"])
    assert start == KILLS[rule] - 1 or start == KILLS[rule]
    later = [entry for entry in straight["metrics"] if entry[0] >= start]
    assert resumed["metrics"] == later


def test_random_state_round_trip_gives_the_same_draws():
    state = random_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    restore_random_state(state)
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def _checkpoint(tmp_path: Path, module) -> Path:
    trainer = fx.trainer(tmp_path, max_epochs=1, enable_checkpointing=True, callbacks=[
        ModelCheckpoint(dirpath=tmp_path, filename="run")])
    trainer.fit(module, fx.loader())
    return tmp_path / "run.ckpt"


def _pc(**settings) -> PredictiveCodingModule:
    return PredictiveCodingModule(network=fx.mlp(), **{**MUP, **settings})


def test_checkpoints_store_the_runs_identity_and_load_without_pickle(tmp_path):
    module = _pc(inference_steps=3)
    path = _checkpoint(tmp_path, module)
    identity = torch.load(path, weights_only=True)["lightning_local"]["identity"]
    assert identity["module"].endswith("PredictiveCodingModule")
    assert identity["rule"]["inference_steps"] == 3
    assert identity["rule"]["output_weight"] == module.rule.output_weight  # gamma_L as trained
    assert identity["parametrization"]["parametrization"] == "mup"
    assert identity["base_width"] == fx.BASE
    shapes = base_shapes_of(module.trained_network)
    assert identity["base_shapes"] == shapes
    assert any(None in dims and any(d is not None for d in dims) for dims in shapes.values())


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (dict(inference_steps=5), "inference_steps=3"),
        (dict(base_width=8), "base_width=16"),
        (dict(parametrization="sp"), "'mup'"),
    ],
)
def test_resuming_with_another_setting_is_refused_naming_both_values(tmp_path, change, named):
    path = _checkpoint(tmp_path, _pc(inference_steps=3))
    settings = {"inference_steps": 3, **change}
    with pytest.raises(CheckpointError, match="another run") as caught:
        fx.trainer(tmp_path / "again", max_epochs=2).fit(
            PredictiveCodingModule(network=fx.mlp(), **{**MUP, **settings}),
            fx.loader(), ckpt_path=path,
        )
    assert named in str(caught.value)


def test_load_from_checkpoint_rebuilds_the_run_and_refuses_an_override(tmp_path):
    path = _checkpoint(tmp_path, _pc(inference_steps=3))
    loaded = PredictiveCodingModule.load_from_checkpoint(path, network=fx.mlp())
    assert loaded.rule_settings.inference_steps == 3
    with pytest.raises(CheckpointError, match=r"inference_steps=3 vs 7"):
        PredictiveCodingModule.load_from_checkpoint(path, network=fx.mlp(), inference_steps=7)


def test_a_checkpoint_of_another_module_class_names_the_class_to_load_it_with(tmp_path):
    path = _checkpoint(tmp_path, _pc())
    with pytest.raises(CheckpointError, match=r"PredictiveCodingModule\.load_from_checkpoint"):
        TargetPropagationModule.load_from_checkpoint(path, network=fx.mlp())
    with pytest.raises(CheckpointError, match="module class"):
        fx.trainer(tmp_path / "bp", max_epochs=2).fit(
            BackpropModule(network=fx.mlp(), **MUP), fx.loader(), ckpt_path=path)


def test_a_checkpoint_without_identity_still_loads(tmp_path):
    """Checkpoints of 0.1.0 carry no identity: nothing to check, the weights load."""
    module = _pc()
    path = _checkpoint(tmp_path, module)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["lightning_local"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = PredictiveCodingModule.load_from_checkpoint(tmp_path / "old.ckpt", network=fx.mlp())
    for key, value in module.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_resuming_with_a_new_lr_scales_every_group_and_keeps_the_ratios(tmp_path):
    module = BackpropModule(network=MLP(in_features=fx.IN, width=fx.WIDTH,
                                        num_classes=fx.CLASSES, depth=3),
                            **MUP, lr=0.1)
    path = _checkpoint(tmp_path, module)
    before = {g["role"]: g["lr"] for g in module.trainer.optimizers[0].param_groups}
    resumed = BackpropModule(network=MLP(in_features=fx.IN, width=fx.WIDTH,
                                         num_classes=fx.CLASSES, depth=3),
                             **MUP, lr=0.025)
    trainer = fx.trainer(tmp_path / "again", max_epochs=2)
    with pytest.warns(UserWarning, match="scaled by 0.25"):
        trainer.fit(resumed, fx.loader(), ckpt_path=path)
    after = {g["role"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    assert after.keys() == before.keys()
    for role, lr in before.items():
        assert after[role] == pytest.approx(lr * 0.25, rel=1e-12), role
