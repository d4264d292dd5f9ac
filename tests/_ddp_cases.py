"""Train the DDP parity cases on N processes or one; every process saves its results.

The cases: the example's three rules (``examples/ddp_train.py``'s ``build_module``: bp, PC with
4 simultaneous steps, DTP with ridge feedback, on a tanh MLP with the MSE loss), the rules
whose computation before the surrogate needs the global batch (PC with the tolerance schedule:
the stop decision; DTP with noisy-reconstruction feedback: the noise), and backprop, PC and DTP
(ridge and noisy) on a depth-4 ReLU MLP with the cross-entropy loss. Data, sampler and result
files are the example's (``<case>_rank<r>.pt``: weights, gradient all-reduces per step, epoch
loss), plus the inference steps PC took in each training step. Lightning's ``ddp`` strategy
relaunches this script once per process, so it must run as a script::

    python tests/_ddp_cases.py --cases pc pc_tolerance dtp_noisy --devices 2 --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import lightning as L
from _module_fixtures import module_class  # this folder is on the path: a script, or pytest

from lightning_local.callbacks import LocalUpdateAlignment
from lightning_local.distributed import AllReduceCounter, LocalDDPStrategy
from lightning_local.models import MLP
from lightning_local.modules import (
    LocalLearningModule,
)
from lightning_local.rules import RULES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
EXAMPLE_RULES = ("bp", "pc", "tp")

# on these batches the tolerance schedule stops well before the cap, at a step that differs
# between the whole batch and a half of it (so each rank stopping on its own half would show)
PC_TOLERANCE: dict[str, Any] = dict(
    inference="tolerance", inference_steps=40, inference_lr=0.1, tolerance=5e-3,
    fixed_prediction=False,
)
DTP_NOISY: dict[str, Any] = dict(
    variant="dtp", feedback_training="noisy", feedback_steps=2, noise_std=0.5
)
RELU4: dict[str, Any] = dict(depth=4, activation="relu")
CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # name: (rule, network settings, module settings)
    "pc_si_fpa": ("pc", {}, dict(inference="sequential", fixed_prediction=True)),
    "pc_si": ("pc", {}, dict(inference="sequential", inference_steps=2,
                             fixed_prediction=False)),
    "pc_tolerance": ("pc", {}, PC_TOLERANCE),
    "dtp_noisy": ("tp", {}, DTP_NOISY),
    "relu4_ce_bp": ("bp", RELU4, {"loss": "cross_entropy"}),
    "relu4_ce_pc_tolerance": (
        "pc", RELU4,
        {"loss": "cross_entropy", **PC_TOLERANCE, "inference_lr": 0.2, "tolerance": 1e-3},
    ),
    "relu4_ce_dtp_ridge": (
        "tp", RELU4, {"loss": "cross_entropy", "variant": "dtp", "feedback_training": "ridge"}
    ),
    "relu4_ce_dtp_noisy": ("tp", RELU4, {"loss": "cross_entropy", **DTP_NOISY}),
}
# every registered rule with its default settings: a new rule gets the DDP parity check too
for _family in RULES:
    CASES[f"registered_{_family}"] = (_family, {}, {})
ALL_CASES = (*EXAMPLE_RULES, *CASES)


def example() -> Any:
    """``examples/ddp_train.py`` as a module."""
    spec = importlib.util.spec_from_file_location("ddp_train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_module(case: str, width: int, lr: float) -> LocalLearningModule:
    """The case's Lightning module on an MLP for 40-d inputs and 10 classes, with muP."""
    if case in EXAMPLE_RULES:
        return example().build_module(case, width, 3, lr)
    rule, network_settings, settings = CASES[case]
    network = MLP(in_features=40, width=width, num_classes=10, **network_settings)
    return module_class(RULES[rule])(network, parametrization="mup", base_width=16, lr=lr,
                                     **settings)


def saving_callback(out: Path, case: str, counter: AllReduceCounter | None) -> L.Callback:
    """The example's ``SaveRankResults`` for ``out/<case>_rank<r>.pt``, which also records
    PC's inference steps per training step."""

    class SaveResults(example().SaveRankResults):
        def __init__(self) -> None:
            super().__init__(out, case, counter)
            self.inference_steps: list[int] = []

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            value = trainer.callback_metrics.get("train/inference_steps")
            if value is not None:
                self.inference_steps.append(int(value))

        def results(self, trainer: L.Trainer, pl_module: LocalLearningModule) -> dict:
            return {**super().results(trainer, pl_module),
                    "inference_steps": self.inference_steps}

    return SaveResults()


def train(args: argparse.Namespace, case: str, data: Any) -> None:
    L.seed_everything(args.seed, verbose=False)
    module = build_module(case, args.width, args.lr)
    # Lightning's DDP strategies re-seed every process at setup (seed_everything's seed); one
    # process is not re-seeded: seeding again here makes both start training from the same
    # random state, which the noise of noisy DTP is drawn from
    L.seed_everything(args.seed, verbose=False)
    counter = AllReduceCounter() if args.devices > 1 else None
    strategy = "auto" if counter is None else LocalDDPStrategy(ddp_comm_hook=counter)
    callbacks: list[L.Callback] = [] if counter is None else [counter]
    callbacks.append(saving_callback(args.out, case, counter))
    if args.alignment_every:
        callbacks.append(LocalUpdateAlignment(every_n_steps=args.alignment_every))
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_epochs=args.epochs,
        logger=False, callbacks=callbacks, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    dataset = data.load_data("gaussian", args.samples, args.seed)
    trainer.fit(module, datamodule=data.GlobalBatchData(dataset, args.batch_size, args.seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=ALL_CASES, default=list(ALL_CASES))
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alignment-every", type=int, default=0,
                        help="log the local-update/backprop cosine every N steps (0: never)")
    parser.add_argument("--out", type=Path, required=True, help="folder for per-rank results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = example()
    for case in args.cases:
        train(args, case, data)


if __name__ == "__main__":
    main()
