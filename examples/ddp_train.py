"""Train local rules on several processes (DDP) exactly as one process would.

Each process takes batch B; gradients are averaged by one all-reduce per step, so N processes
at batch B take the same steps as one process at batch N*B (see docs/distributed.md).

    # 2 CPU processes (gloo), predictive coding, MNIST-1D generated locally
    python examples/ddp_train.py --rules pc --devices 2
    # one node with 8 GPUs (nccl)
    python examples/ddp_train.py --rules pc --accelerator gpu --devices 8
    # two nodes with 8 GPUs each: torchrun on every node, or srun under SLURM
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/ddp_train.py --accelerator gpu --devices 8 --num-nodes 2
    srun python examples/ddp_train.py --accelerator gpu --devices 8 --num-nodes 2

With ``--out DIR`` every process writes ``DIR/<rule>_rank<r>.pt``: its network weights, the
gradient all-reduces DDP made in each step (counted by a communication hook) and the epoch mean
of the training loss. The test suite runs this script to compare 2 processes at batch B with
1 process at batch 2B.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.callbacks import LocalUpdateAlignment, LogRunConfig
from lightning_local.distributed import AllReduceCounter, LocalDDPStrategy, global_batch_sampler
from lightning_local.models import MLP
from lightning_local.modules import BackpropModule, LocalLearningModule, PredictiveCodingModule

RULES = ("bp", "pc", "tp")


def build_module(
    rule: str, width: int, depth: int, lr: float, accumulate_grad_batches: int = 1
) -> LocalLearningModule:
    """The rule's Lightning module on a tanh MLP for 40-d inputs and 10 classes, with muP."""
    network = MLP(in_features=40, width=width, num_classes=10, depth=depth)
    common = dict(parametrization="mup", base_width=16, lr=lr,
                  accumulate_grad_batches=accumulate_grad_batches)
    if rule == "bp":
        return BackpropModule(network, **common)
    if rule == "pc":
        return PredictiveCodingModule(
            network, inference="simultaneous", inference_steps=4, inference_lr=0.2, **common
        )
    from lightning_local.modules.target_propagation import TargetPropagationModule

    return TargetPropagationModule(network, variant="dtp", feedback_training="ridge", **common)


class GlobalBatchData(L.LightningDataModule):
    """A tensor data set served so that N processes at batch B see one process's batch N*B."""

    def __init__(self, dataset: TensorDataset, batch_size: int, seed: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        sampler = global_batch_sampler(self.dataset, self.trainer, seed=self.seed)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)


class SaveRankResults(L.Callback):
    """At the end of training, write this process's weights and counts to ``out/<tag>_rank<r>``."""

    def __init__(self, out: Path, tag: str, counter: AllReduceCounter | None) -> None:
        self.out, self.tag, self.counter = out, tag, counter

    def results(self, trainer: L.Trainer, pl_module: LocalLearningModule) -> dict:
        """What the file holds: rank, weights, all-reduces per step and the epoch loss."""
        network = pl_module.network_for_rule()
        loss = trainer.callback_metrics.get("train/loss_epoch")
        return {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "state_dict": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "all_reduces": [vars(s) for s in self.counter.steps] if self.counter else [],
            "loss_epoch": None if loss is None else float(loss),
        }

    def on_train_end(self, trainer: L.Trainer, pl_module: LocalLearningModule) -> None:
        torch.save(self.results(trainer, pl_module),
                   self.out / f"{self.tag}_rank{trainer.global_rank}.pt")


def load_data(name: str, samples: int, seed: int) -> TensorDataset:
    """MNIST-1D's training split (generated locally), or Gaussian inputs with random labels."""
    if name == "mnist1d":
        from lightning_local.data import load_mnist1d

        data = load_mnist1d(seed=seed)
        return TensorDataset(data["x_train"][:samples], data["y_train"][:samples])
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, 40, generator=generator)
    return TensorDataset(inputs, torch.randint(0, 10, (samples,), generator=generator))


def train(args: argparse.Namespace, rule: str) -> None:
    L.seed_everything(args.seed, verbose=False)
    module = build_module(rule, args.width, args.depth, args.lr, args.accumulate_grad_batches)
    distributed = args.devices * args.num_nodes > 1
    counter = AllReduceCounter() if distributed and args.strategy.startswith("local") else None
    if not distributed:
        strategy = "auto"
    elif counter is not None:
        start = "spawn" if args.strategy.endswith("spawn") else "popen"
        strategy = LocalDDPStrategy(start_method=start, ddp_comm_hook=counter)
    else:
        strategy = args.strategy
    callbacks: list[L.Callback] = [] if counter is None else [counter]
    if args.out is not None:
        callbacks.append(SaveRankResults(args.out, rule, counter))
    if args.alignment_every:
        callbacks.append(LocalUpdateAlignment(every_n_steps=args.alignment_every))
    logger = False
    if args.wandb:
        from lightning_local.loggers import make_wandb_logger

        logger = make_wandb_logger(project="lightning-local-ddp", name=f"{rule}-ddp")
        callbacks.append(LogRunConfig())
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=args.progress_bar,
        use_distributed_sampler=False,
        log_every_n_steps=1,
    )
    dataset = load_data(args.data, args.samples, args.seed)
    trainer.fit(module, datamodule=GlobalBatchData(dataset, args.batch_size, args.seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", nargs="+", choices=RULES, default=["pc"])
    parser.add_argument("--strategy", default="local_ddp",
                        choices=["local_ddp", "local_ddp_spawn", "ddp", "ddp_spawn"])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--accumulate-grad-batches", type=int, default=1,
                        help="optimizer step every k batches (the module's setting)")
    parser.add_argument("--data", choices=["mnist1d", "gaussian"], default="mnist1d")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for per-rank results")
    parser.add_argument("--alignment-every", type=int, default=0,
                        help="log the local-update/backprop cosine every N steps (0: never)")
    parser.add_argument("--wandb", action="store_true", help="log to W&B (offline)")
    parser.add_argument("--progress-bar", action="store_true")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    for rule in args.rules:
        train(args, rule)


if __name__ == "__main__":
    main()
