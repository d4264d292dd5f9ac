"""One training run on MNIST-1D for the resume tests, in its own process.

``python tests/_resumable_run.py FOLDER RULE [--kill-at STEP] [--resume CKPT]``: trains three
epochs with a checkpoint (and ``last.ckpt``) after every step; with ``--kill-at`` the process
sends itself SIGKILL when step STEP starts; at the end it writes ``FOLDER/final.pt`` with the
weights, the optimizer state and every logged metric.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_local.data import MNIST1DDataModule  # noqa: E402
from lightning_local.models import MLP  # noqa: E402
from lightning_local.modules import PredictiveCodingModule, TargetPropagationModule  # noqa: E402
from tests._capture_logger import CaptureLogger  # noqa: E402

RULES = {
    "pc-tolerance": (PredictiveCodingModule, dict(inference="tolerance", inference_steps=20,
                                                  inference_lr=0.1, tolerance=1e-3)),
    "dtp-noisy": (TargetPropagationModule, dict(variant="dtp", feedback_training="noisy",
                                                noise_std=0.1)),
}
SAMPLES, BATCH = 400, 64  # 288 training samples: 5 batches per epoch, the last one short


def data(data_dir: str) -> MNIST1DDataModule:
    return MNIST1DDataModule(data_dir=data_dir, batch_size=BATCH, num_samples=SAMPLES,
                             val_fraction=0.1)


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("rule", choices=sorted(RULES))
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    L.seed_everything(3, verbose=False)
    module_class, settings = RULES[args.rule]
    model = module_class(network=MLP(in_features=40, width=32, num_classes=10, depth=3),
                         lr=0.05, momentum=0.9, parametrization="mup", base_width=16,
                         **settings)
    if args.resume:  # nothing of the killed process's random state is left
        torch.manual_seed(12345)
    logger = CaptureLogger()
    callbacks = [ModelCheckpoint(dirpath=args.folder, filename="{step}", every_n_train_steps=1,
                                 save_top_k=-1, save_last=True)]
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=3, logger=logger,
                        callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(model, datamodule=data(args.data_dir), ckpt_path=args.resume)
    torch.save({"weights": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
                "metrics": logger.metrics, "steps": trainer.global_step},
               args.folder / "final.pt")


if __name__ == "__main__":
    main()
