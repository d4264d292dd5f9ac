"""W&B (:mod:`lightning_local.diagnostics.loggers`): an offline run holds the per-layer
metrics, the config with base shapes and figures.

The offline run is read back from its ``.wandb`` file (``_wandb_run.read_run``).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import matplotlib
import pytest
import torch
import wandb
from _wandb_run import offline_wandb, read_run
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.diagnostics.callbacks import LocalUpdateAlignment, LogRunConfig
from lightning_local.diagnostics.loggers import log_figure, log_table, make_wandb_logger
from lightning_local.models import MLP
from lightning_local.modules import PredictiveCodingModule

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WIDTH, BASE_WIDTH, DEPTH, STEPS, INFERENCE_STEPS = 32, 16, 3, 3, 3


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offline_wandb(tmp_path, monkeypatch)


def _trainer(logger, callbacks) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_steps=STEPS, logger=logger, callbacks=callbacks,
        log_every_n_steps=1, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False,
    )


def _data() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(8 * STEPS, 40, generator=generator)
    return DataLoader(TensorDataset(inputs, torch.randint(0, 10, (8 * STEPS,),
                                                         generator=generator)), batch_size=8)


def test_offline_run_holds_per_layer_metrics_config_with_base_shapes_and_figures(offline):
    module = PredictiveCodingModule(
        MLP(width=WIDTH, depth=DEPTH), parametrization="mup", base_width=BASE_WIDTH,
        inference="simultaneous", inference_steps=INFERENCE_STEPS, inference_lr=0.2,
    )
    logger = make_wandb_logger(project="test", save_dir=offline)
    trainer = _trainer(logger, [LogRunConfig(), LocalUpdateAlignment(every_n_steps=1)])
    trainer.fit(module, _data())
    figure, axes = plt.subplots()
    axes.plot([1, 2, 3])
    assert log_figure(trainer.loggers, "figures/coord_check", figure) == 1
    plt.close(figure)
    logger.experiment.finish()
    wandb.teardown()  # stops the wandb service, which writes the run file to its end

    config, history = read_run(offline)
    # config: the rule's settings and one base-shape row per parameter
    assert config["rule"] == json.loads(json.dumps(module.rule.hparams()))
    assert config["parametrization"] == "mup" and config["base_width"] == BASE_WIDTH
    optimizer = trainer.optimizers[0]
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    table = config["base_shape_table"]
    network = module.network_for_rule()
    assert set(table) == {name for name, _ in network.named_parameters()}
    for name, p in network.named_parameters():
        row = table[name]
        assert row["shape"] == list(p.shape)
        # the width dims (size WIDTH here) are at the base width; the others are unchanged
        assert row["base_shape"] == [BASE_WIDTH if n == WIDTH else n for n in p.shape]
        assert row["width_mult"] == (WIDTH / BASE_WIDTH if WIDTH in p.shape else 1.0)
        assert row["lr"] == pytest.approx(lrs[id(p)])
    assert table["0.0.weight"]["role"] == "input" and table["2.weight"]["role"] == "output"

    # history: one row per step with every layer's energy and state update, and the cosines
    steps = [row for row in history if "train/loss" in row]
    assert len(steps) == STEPS
    for row in steps:
        energies = [row[f"train/energy_per_layer/layer_{l}"] for l in range(DEPTH)]
        assert sum(energies) == pytest.approx(row["train/energy_after"], rel=1e-5)
        assert all(f"train/state_update_rms/layer_{l}" in row for l in range(DEPTH - 1))
        assert row["train/inference_steps"] == INFERENCE_STEPS
    cosines = [row for row in history if "train/bp_cosine/layer_0" in row]
    assert [row["trainer/global_step"] for row in cosines] == list(range(STEPS))
    for row in cosines:
        assert all(abs(row[f"train/bp_cosine/layer_{l}"]) <= 1 + 1e-6 for l in range(DEPTH))
    assert not any(f"train/energy_per_layer/layer_{DEPTH}" in row for row in history)
    assert any("train/loss_epoch" in row for row in history)
    figures = [row for row in history if "figures/coord_check/_type" in row]
    assert len(figures) == 1 and figures[0]["figures/coord_check/count"] == 1
    (image,) = figures[0]["figures/coord_check/filenames"]
    assert next(offline.glob("wandb/offline-run-*/files")).joinpath(image).is_file()


def test_make_wandb_logger_is_offline_by_default_and_disabled_writes_nothing(tmp_path, offline):
    assert make_wandb_logger(save_dir=tmp_path / "a")._offline
    logger = make_wandb_logger(save_dir=tmp_path / "b", mode="disabled")
    assert isinstance(logger, WandbLogger)
    module = PredictiveCodingModule(MLP(width=16, depth=DEPTH))
    _trainer(logger, [LogRunConfig()]).fit(module, _data())
    logger.experiment.finish()  # a run left open would be reused by later loggers
    assert not (tmp_path / "b" / "wandb").exists()


def test_log_figure_skips_loggers_without_images(tmp_path):
    figure = plt.figure()
    assert log_figure(None, "figures/x", figure) == 0
    assert log_figure([CSVLogger(tmp_path)], "figures/x", figure) == 0
    plt.close(figure)
    assert log_table([CSVLogger(tmp_path)], "tables/x", [{"a": 1}]) == 0
