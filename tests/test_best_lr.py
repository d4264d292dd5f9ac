"""Best lr per width: the seed-mean score, divergence as infinitely bad, the grid's edge.

References: scores averaged by hand over two seeds; a lr where one seed diverged scores
``inf``; ``test_acc`` is maximized.
"""

from __future__ import annotations

import math

import pytest

from lightning_local.diagnostics.best_lr import METRICS, best_learning_rates
from lightning_local.errors import LocalLearningError


def _record(width: int, lr: float, seed: int, loss: float | None, acc: float | None = None,
            rule: str = "pc") -> dict:
    return dict(rule=rule, parametrization="mup", width=width, lr=lr, seed=seed,
                train_loss=loss, test_acc=acc, diverged=loss is None)


def test_best_lr_is_the_seed_mean_optimum_and_divergence_is_worst():
    records = [
        _record(16, 0.1, 0, 1.0), _record(16, 0.1, 1, 3.0),   # mean 2.0
        _record(16, 0.2, 0, 1.5), _record(16, 0.2, 1, 1.7),   # mean 1.6: best, inside the grid
        _record(16, 0.4, 0, 0.1), _record(16, 0.4, 1, None),  # one seed diverged: inf
        _record(8, 0.1, 0, None), _record(8, 0.2, 0, None),   # every lr diverged
    ]
    narrow, wide = best_learning_rates(records)
    assert (narrow.width, narrow.lr, narrow.score) == (8, None, math.inf)
    assert wide.lr == 0.2 and wide.score == pytest.approx(1.6) and not wide.at_edge
    assert wide.scores[0.1] == pytest.approx(2.0) and wide.scores[0.4] == math.inf
    assert wide.log2_lr == pytest.approx(math.log2(0.2)) and narrow.log2_lr is None


def test_accuracy_is_maximized_and_the_edge_is_flagged():
    records = [_record(16, lr, 0, 1.0, acc) for lr, acc in ((0.1, 0.5), (0.2, 0.7), (0.4, 0.9))]
    (best,) = best_learning_rates(records, "test_acc")
    assert METRICS["test_acc"] == "max"
    assert best.lr == 0.4 and best.at_edge and best.score == pytest.approx(0.9)


def test_unknown_metric_is_a_library_error():
    with pytest.raises(LocalLearningError, match="Fix"):
        best_learning_rates([], "accuracy")
