"""A data order that a resumed run continues exactly: a seeded sampler and a loader that
remembers how far into the epoch it got.

Epoch ``e``'s order is one permutation of the data set drawn from a generator seeded with
``seed + e`` (the same for every process count), padded to a multiple of the world size
``N`` and dealt to the ranks in turn, as :class:`torch.utils.data.DistributedSampler` does:
``N`` processes at batch ``B`` see the same global batches as one process at ``NB``.

:class:`ResumableDataLoader` counts the batches its iterator has handed out in the current
epoch. Lightning stores that count in every checkpoint (the loader has ``state_dict`` /
``load_state_dict``); a run resumed from it skips exactly those batches of the same epoch's
permutation, so the remaining batches, and every later epoch, are those of an uninterrupted
run. The loader draws its workers' base seed from its own generator, never from torch's global
random state, so iterating it does not perturb the random numbers a rule draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_local.errors import LocalLearningError


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` whose next iteration can start part-way into an epoch.

    Lightning keeps a ``DistributedSampler`` it is given (it does not replace it under DDP) and
    calls :meth:`set_epoch` at the start of every epoch.

    Args:
        dataset: the data set (only its length is used).
        shuffle: permute each epoch (seeded by ``seed + epoch``) or keep the data set's order.
        seed: seed of the permutations; the same on every rank.
        num_replicas: number of processes ``N`` (1 without DDP).
        rank: this process's rank in ``[0, N)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
            drop_last=False,
        )
        self._skip: tuple[int, int] | None = None  # (epoch, samples of this rank to skip)

    def skip_next(self, epoch: int, samples: int) -> None:
        """Make the next iteration of ``epoch`` start after its first ``samples`` (this rank's)."""
        self.epoch = epoch
        self._skip = (epoch, samples) if samples else None

    def set_epoch(self, epoch: int) -> None:
        """Order of ``epoch``; a pending skip for another epoch is dropped."""
        if self._skip is not None and self._skip[0] != epoch:
            self._skip = None
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self._skip is not None:
            indices = indices[self._skip[1]:]
            self._skip = None
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position is checkpointed.

    Args:
        dataset: the data set.
        batch_size: samples per batch on this rank.
        shuffle: reshuffle every epoch with the seeded permutation.
        seed: seed of the permutations and of the workers' base seed.
        num_replicas: number of processes (1 without DDP).
        rank: this process's rank.
        **kwargs: further ``DataLoader`` arguments (``num_workers``, ``persistent_workers``, ...).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        sampler: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if sampler is None:  # a sampler given is Lightning's (e.g. overfit_batches): kept
            sampler = ResumableSampler(
                dataset, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank
            )
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, generator=generator, **kwargs
        )
        self.seed = seed
        self._epoch_started = getattr(sampler, "epoch", 0)
        self._batches_handed_out = 0

    @property
    def resumable(self) -> bool:
        """Whether the order is the seeded one (not a sampler Lightning put in its place)."""
        return isinstance(self.sampler, ResumableSampler)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            yield from super().__iter__()
            return
        skipped = sampler._skip[1] if sampler._skip is not None else 0
        self._epoch_started = getattr(sampler, "epoch", 0)
        self._batches_handed_out = skipped // self.batch_size if self.batch_size else 0
        for batch in super().__iter__():
            self._batches_handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The epoch and how many of its batches were handed out (an epoch that was handed out
        entirely is stored as the start of the next)."""
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            return {"resumable": False}
        epoch, batches = self._epoch_started, self._batches_handed_out
        if batches == 0:  # not iterated yet in this epoch
            epoch = sampler.epoch
        elif batches >= len(self):
            epoch, batches = epoch + 1, 0
        return {
            "epoch": epoch,
            "batches": batches,
            "seed": self.seed,
            "num_samples": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": self.batch_size,
            "num_replicas": sampler.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration of its epoch skips its batches.

        Raises:
            LocalLearningError: when the data set size, batch size, seed or process count differ
                from the checkpoint's (the position would point elsewhere in the data).
        """
        if not self.resumable or not state.get("resumable", True):
            return  # another sampler's order (Lightning's): there is no position to restore
        current = {
            "seed": self.seed,
            "num_samples": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": self.batch_size,
            "num_replicas": self.sampler.num_replicas,  # type: ignore[attr-defined]
        }
        differing = {
            key: (state.get(key), value) for key, value in current.items()
            if state.get(key) != value
        }
        if differing:
            described = ", ".join(
                f"{key} {saved!r} in the checkpoint vs {now!r} now"
                for key, (saved, now) in differing.items()
            )
            raise LocalLearningError(
                f"the checkpoint's data position does not fit this data loader ({described}): "
                "resuming would continue elsewhere in the data. Fix: resume with the data "
                "settings of the checkpointed run (same data set, batch_size, seed and number "
                "of processes)."
            )
        sampler = self.sampler
        assert isinstance(sampler, ResumableSampler)
        batches = min(int(state["batches"]), math.ceil(sampler.num_samples / self.batch_size))
        sampler.skip_next(int(state["epoch"]), batches * self.batch_size)
        self._epoch_started = int(state["epoch"])
        self._batches_handed_out = batches
