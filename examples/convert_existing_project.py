"""Converting an existing Lightning classifier to predictive coding (with muP).

``LitClassifier`` is a plain Lightning project as one writes it for backprop.
``PCClassifier`` is the same class after conversion; the changes are marked ``# CHANGED``:

1. the base class: ``PredictiveCodingModule`` instead of ``L.LightningModule``;
2. ``super().__init__(...)`` receives the rule's and the optimizer's settings;
3. ``training_step`` and ``configure_optimizers`` are deleted: the rule runs the step
   (inference, local updates, one optimizer step) and the parametrization builds the optimizer.

``forward``, ``validation_step`` and the network stay as they were. The network must be an
ordered list of blocks (an ``nn.Sequential`` whose children are the layers, each hidden block
ending with its activation). ``MuPClassifier`` adds muP: one more line attaches base shapes.

Run: ``python examples/convert_existing_project.py`` (a few epochs of each on MNIST-1D).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_local.modules import PredictiveCodingModule
from lightning_local.parametrization import base_shapes_from_builder, set_base_shapes


def make_net(width: int, in_features: int = 40, num_classes: int = 10) -> nn.Sequential:
    """A 3-layer tanh MLP as blocks: [Linear, Tanh], [Linear, Tanh], Linear."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(in_features, width), nn.Tanh()),
        nn.Sequential(nn.Linear(width, width), nn.Tanh()),
        nn.Linear(width, num_classes),
    )


# --------------------------------------------------------------------------- before
class LitClassifier(L.LightningModule):
    """A plain Lightning classifier trained with backprop."""

    def __init__(self, width: int = 128, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_net(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


# --------------------------------------------------------------------------- after
class PCClassifier(PredictiveCodingModule):  # CHANGED: the base class
    """The same classifier trained with predictive coding."""

    def __init__(self, width: int = 128, lr: float = 0.1) -> None:
        # CHANGED: settings go to the base class (which also saves the hyperparameters)
        super().__init__(lr=lr, loss="cross_entropy", inference="sequential")
        self.net = make_net(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # CHANGED: training_step and configure_optimizers deleted

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)


class MuPClassifier(PredictiveCodingModule):
    """The converted classifier under muP: hyperparameters found at width 64 transfer."""

    def __init__(self, width: int = 128, lr: float = 0.1) -> None:
        super().__init__(lr=lr, loss="cross_entropy", parametrization="mup")
        self.net = make_net(width)
        # the only muP line: base shapes from the same builder at the base width (meta device)
        set_base_shapes(self.net, base_shapes_from_builder(make_net, base_width=64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main(epochs: int = 3) -> None:
    from lightning_local.data import MNIST1DDataModule

    for cls in (LitClassifier, PCClassifier, MuPClassifier):
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(
            max_epochs=epochs, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False,
        )
        model = cls(width=256, lr=0.1)
        trainer.fit(model, datamodule=MNIST1DDataModule())
        acc = trainer.callback_metrics.get("val_acc", trainer.callback_metrics.get("val/acc"))
        print(f"{cls.__name__:>14}: validation accuracy {float(acc):.3f}")


if __name__ == "__main__":
    main()
