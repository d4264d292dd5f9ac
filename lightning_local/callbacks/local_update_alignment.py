"""How far a local rule's update is from backprop's, layer by layer.

For block ``l`` with parameters ``theta_l``, the rule's weight gradient
``G_l = d surrogate / d theta_l`` (its update is ``-eta_l G_l``) and the backprop gradient
``G_l^BP = dL/d theta_l`` of the batch-mean output loss, both at the current weights and on the
same batch, give

    cos_l = <G_l, G_l^BP> / (||G_l|| ||G_l^BP||)

(flattened over the block's parameters; 0 when either is zero). Predictive coding with F-ini,
one SI sweep and FPA has ``cos_l = 1`` (its update is ``gamma_L`` times backprop's); at finite
width or with other schedules it measures how far PC moves from gradient descent (spec
section 4), and for target propagation how far the targets are from the gradient.

Both gradients come from ``torch.autograd.grad`` with respect to the parameters: nothing is
accumulated in ``p.grad``, so a DDP wrapper sees no backward and no all-reduce happens.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_local.errors import LocalLearningError
from lightning_local.modules.base import LocalLearningModule
from lightning_local.network import as_blocks
from lightning_local.rules.backprop import Backprop
from lightning_local.rules.base import LocalRule

__all__ = ["LocalUpdateAlignment", "local_update_cosines"]


def _block_gradient(grads: tuple[Tensor | None, ...], params: list[nn.Parameter]) -> Tensor:
    return torch.cat([
        (torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)
    ])


def local_update_cosines(
    rule: LocalRule, network: nn.Module, inputs: Tensor, targets: Tensor
) -> Tensor:
    """``[cos_1, .., cos_L]``: per block, the cosine between the rule's and backprop's gradient.

    Runs the rule once more on the batch (its inference included) under a forked random state,
    so a rule that draws noise leaves the training run's random stream untouched. Blocks
    without trainable parameters get NaN.
    """
    blocks = as_blocks(network)
    groups = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
    params = [p for group in groups for p in group]
    if not params:
        raise LocalLearningError(
            "the network has no trainable parameters to compare. Fix: unfreeze its blocks."
        )
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        surrogate = rule.training_loss(network, inputs, targets).surrogate
        local = torch.autograd.grad(surrogate, params, allow_unused=True)
        reference = Backprop(loss=rule.loss).training_loss(network, inputs, targets).surrogate
        backprop = torch.autograd.grad(reference, params, allow_unused=True)
    cosines, start = [], 0
    for group in groups:
        if not group:
            cosines.append(inputs.new_tensor(float("nan")))
            continue
        stop = start + len(group)
        a = _block_gradient(local[start:stop], group)
        b = _block_gradient(backprop[start:stop], group)
        cosines.append(F.cosine_similarity(a, b, dim=0, eps=1e-30))
        start = stop
    return torch.stack(cosines).detach()


class LocalUpdateAlignment(L.Callback):
    """Every ``every_n_steps`` training steps, log ``train/bp_cosine/layer_<l>``.

    The values go to the trainer's loggers (rank 0 writes) at that step only, and the latest
    ones stay in :attr:`cosines`.

    Computed before the step, on the step's batch and at the weights the step starts from (see
    :func:`local_update_cosines`); it costs one more rule pass and one backprop pass, so keep
    ``every_n_steps`` large on big runs. Under DDP each process computes it on its own batch and
    rank 0's values are logged.

    Args:
        every_n_steps: how often (in optimizer steps), >= 1.
    """

    def __init__(self, every_n_steps: int = 100) -> None:
        if every_n_steps < 1:
            raise LocalLearningError(
                f"every_n_steps must be >= 1, got {every_n_steps}. Fix: e.g. every_n_steps=100."
            )
        self.every_n_steps = int(every_n_steps)
        self.cosines: torch.Tensor | None = None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if not isinstance(pl_module, LocalLearningModule):
            raise LocalLearningError(
                f"LocalUpdateAlignment needs a LocalLearningModule (a rule and a network); got "
                f"{type(pl_module).__name__}. Fix: train one of lightning_local's modules."
            )
        inputs, targets = pl_module._split_batch(batch)
        network = pl_module.network_for_rule()
        self.cosines = local_update_cosines(pl_module.rule, network, inputs, targets)
        metrics = {f"train/bp_cosine/layer_{i}": float(v) for i, v in enumerate(self.cosines)}
        # straight to the loggers: ``pl_module.log`` would repeat the last value every step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
