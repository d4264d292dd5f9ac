"""The resumable data order: seeded per-epoch permutations, rank slices, the saved position.

References: ``torch.randperm`` with the documented seed; the batches of an uninterrupted
iteration; one process's global batches.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_local.data.resumable import ResumableDataLoader
from lightning_local.errors import LocalLearningError

N, BATCH = 22, 4


def _dataset(n: int = N) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def _epoch(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch[0].tolist() for batch in loader]


def test_each_epoch_is_the_permutation_seeded_with_seed_plus_epoch():
    loader = ResumableDataLoader(_dataset(), BATCH, seed=3)
    for epoch in (0, 1, 5):
        expected = torch.randperm(N, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert sum(_epoch(loader, epoch), []) == expected
    assert _epoch(loader, 0) != _epoch(loader, 1)


def test_ranks_share_each_global_batch_of_one_process():
    single = ResumableDataLoader(_dataset(24), 2 * BATCH, seed=1)
    ranks = [ResumableDataLoader(_dataset(24), BATCH, seed=1, num_replicas=2, rank=r)
             for r in (0, 1)]
    for epoch in (0, 1):
        per_rank = [_epoch(loader, epoch) for loader in ranks]
        for index, batch in enumerate(_epoch(single, epoch)):
            assert sorted(per_rank[0][index] + per_rank[1][index]) == sorted(batch)


@pytest.mark.parametrize("consumed", [0, 1, 3, 6])
def test_a_loader_restored_from_its_state_continues_with_the_next_batch(consumed):
    """After ``consumed`` batches of epoch 2 (6 batches: the last one short), a fresh loader
    loaded with the state hands out the rest of epoch 2, then epoch 3 as usual."""
    uninterrupted = ResumableDataLoader(_dataset(), BATCH, seed=7)
    expected = _epoch(uninterrupted, 2) + _epoch(uninterrupted, 3)
    interrupted = ResumableDataLoader(_dataset(), BATCH, seed=7)
    interrupted.sampler.set_epoch(2)
    iterator = iter(interrupted)
    seen = [next(iterator)[0].tolist() for _ in range(consumed)]
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches"]) == ((3, 0) if consumed == 6 else (2, consumed))
    restored = ResumableDataLoader(_dataset(), BATCH, seed=7)
    restored.load_state_dict(state)
    rest = []
    for epoch in (2, 3):
        if epoch >= state["epoch"]:
            restored.sampler.set_epoch(epoch)
            rest += [batch[0].tolist() for batch in restored]
    assert seen + rest == expected
    assert len(restored) == len(uninterrupted) == 6  # Lightning counts the full epoch


@pytest.mark.parametrize("change", [dict(batch_size=5), dict(seed=8), dict(n=23)])
def test_a_state_of_other_data_is_refused(change):
    loader = ResumableDataLoader(_dataset(), BATCH, seed=7)
    state = loader.state_dict()
    other = ResumableDataLoader(_dataset(change.get("n", N)), change.get("batch_size", BATCH),
                                seed=change.get("seed", 7))
    with pytest.raises(LocalLearningError, match="does not fit this data loader"):
        other.load_state_dict(state)


def test_iterating_leaves_the_global_random_state_alone():
    loader = ResumableDataLoader(_dataset(), BATCH, seed=0)
    before = torch.get_rng_state()
    _epoch(loader, 0)
    assert torch.equal(torch.get_rng_state(), before)


def test_lightning_may_put_its_own_sampler_in_place_and_the_loader_still_works():
    """``Trainer(overfit_batches=2)`` rebuilds the loader with a sequential sampler: it trains
    on the first two batches in order [the data set's order], and its state says it has no
    seeded position (nothing to restore on resume)."""
    import lightning as L

    from lightning_local.models import MLP
    from lightning_local.modules import BackpropModule

    x = torch.randn(N, 6)
    dataset = TensorDataset(x, torch.randint(0, 3, (N,)))
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(batch[0].clone())

    trainer = L.Trainer(overfit_batches=2, max_epochs=1, logger=False, callbacks=[Record()],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(BackpropModule(network=MLP(in_features=6, width=8, num_classes=3)),
                ResumableDataLoader(dataset, BATCH, seed=1))
    assert len(seen) == 2
    torch.testing.assert_close(torch.cat(seen), x[: 2 * BATCH], rtol=0, atol=0)
    loader = trainer.train_dataloader
    assert not loader.resumable and loader.state_dict() == {"resumable": False}
