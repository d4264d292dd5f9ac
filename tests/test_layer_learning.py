"""Per-layer learning diagnostic: relative updates, weight and feature changes, depth slopes.

References: norms of the weights recorded independently from the state dict before and after
each step; a network that does not move (lr 0); power laws of known exponent.
"""

from __future__ import annotations

import pytest
import torch

from lightning_local.diagnostics.layer_learning import (
    LayerLearningCallback,
    depth_slopes,
    relative_change,
)
from lightning_local.diagnostics.plots import plot_layer_learning
from lightning_local.errors import LocalLearningError
from lightning_local.modules import PredictiveCodingModule
from tests import _module_fixtures as fx


def _block_norms(state: dict, blocks: int) -> list[torch.Tensor]:
    """Each block's parameters (``network.<l>.*`` keys of the state dict), concatenated."""
    return [torch.cat([v.flatten() for k, v in state.items() if k.startswith(f"network.{b}.")])
            for b in range(blocks)]


def test_relative_change_is_the_norm_ratio():
    before = [torch.tensor([3.0, 4.0]), torch.zeros(2)]
    now = [torch.tensor([3.0, 5.0]), torch.ones(2)]
    assert relative_change(now, before) == pytest.approx([1 / 5, 0.0])


@pytest.mark.parametrize("lr", [0.0, 0.5])
def test_the_callback_logs_each_layers_update_against_recorded_weights(lr):
    import lightning as L

    states: dict[int, dict] = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            states[trainer.global_step] = {k: v.detach().clone()
                                           for k, v in pl_module.state_dict().items()}

        def on_train_start(self, trainer, pl_module):
            states[0] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    torch.manual_seed(0)
    module = PredictiveCodingModule(network=fx.mlp(), lr=lr if lr else 1e-12)
    callback = LayerLearningCallback(every_n_steps=2, probe_size=8)
    fx.trainer(max_steps=6, callbacks=[Record(), callback]).fit(module, fx.loader())
    assert [entry["step"] for entry in callback.history] == [2, 4, 6]
    blocks = len(fx.mlp())
    for entry in callback.history:
        step = entry["step"]
        now, before = _block_norms(states[step], blocks), _block_norms(states[step - 1], blocks)
        start = _block_norms(states[0], blocks)
        expected = [float((a - b).norm() / b.norm()) for a, b in zip(now, before)]
        assert entry["relative_update"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        expected = [float((a - b).norm() / b.norm()) for a, b in zip(now, start)]
        assert entry["weight_change"] == pytest.approx(expected, rel=1e-5, abs=1e-12)
        if lr == 0.0:
            assert max(entry["feature_change"]) < 1e-9
        else:
            assert min(entry["feature_change"]) > 0 and min(entry["relative_update"]) > 0


def test_depth_slopes_recover_a_power_law():
    profiles = {depth: {"relative_update": [2.0 * depth**-0.5] * depth,
                        "weight_change": [1.0] * depth,
                        "feature_change": [0.1 * depth] * depth} for depth in (4, 8, 16, 64)}
    slopes = depth_slopes(profiles)
    assert slopes["relative_update"] == pytest.approx(-0.5)
    assert slopes["weight_change"] == pytest.approx(0.0, abs=1e-12)
    assert slopes["feature_change"] == pytest.approx(1.0)


def test_the_figure_is_written_and_an_empty_history_is_refused(tmp_path):
    history = [{"step": s, "relative_update": [0.1, 0.01], "weight_change": [0.2, 0.05],
                "feature_change": [0.3, 0.1]} for s in (1, 2, 3)]
    path = plot_layer_learning(history, tmp_path / "layers.png", title="test")
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(LocalLearningError, match="empty"):
        plot_layer_learning([], tmp_path / "none.png")
    with pytest.raises(LocalLearningError, match="every_n_steps"):
        LayerLearningCallback(every_n_steps=0)
