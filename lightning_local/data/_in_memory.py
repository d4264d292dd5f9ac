"""What the data modules share: the data folder, a seeded validation split, standardization
with training statistics, and in-memory tensor data sets with their loaders.

Every data set here fits in memory, so a split is a :class:`~torch.utils.data.TensorDataset`.
The training loader is a :class:`~lightning_local.data.resumable.ResumableDataLoader` (seeded
order, position saved in checkpoints: a resumed run continues exactly); the others are plain
:class:`~torch.utils.data.DataLoader` s in order. No loader draws from torch's global random
state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_local.data.resumable import ResumableDataLoader
from lightning_local.errors import LocalLearningError

DATA_DIR_ENV = "LIGHTNING_LOCAL_DATA"
"""Environment variable naming the default data folder (used when ``data_dir`` is None)."""

_DEFAULT_DATA_DIR = "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The data folder: ``data_dir`` if given, else ``$LIGHTNING_LOCAL_DATA``, else ``./data``."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or _DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def _split_train_val(
    x: Tensor, y: Tensor, val_fraction: float, seed: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split ``(x, y)`` into train and validation parts by a permutation seeded with ``seed``.

    The validation part has ``round(val_fraction * n)`` samples (at least one when
    ``val_fraction > 0``); the rest, in permuted order, is the training part.
    """
    n = x.shape[0]
    n_val = round(val_fraction * n)
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_val >= n:
        raise LocalLearningError(
            f"val_fraction={val_fraction} leaves no training samples out of {n}. "
            "Fix: use a smaller val_fraction (e.g. 0.1)."
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:n_val], order[n_val:]
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


def _standardization(x_train: Tensor, reduce_dims: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation of the training inputs over ``reduce_dims``.

    ``mu = mean(x)``, ``sigma = sqrt(mean((x - mu)^2))`` (population statistics, so the
    standardized training set has exactly mean 0 and standard deviation 1); a constant
    coordinate gets ``sigma = 1`` so it maps to 0 instead of NaN.
    """
    mean = x_train.mean(dim=tuple(reduce_dims), keepdim=True)
    std = x_train.std(dim=tuple(reduce_dims), correction=0, keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean, std


def _check_loader_hparams(batch_size: int, num_workers: int, val_fraction: float) -> None:
    if batch_size < 1:
        raise LocalLearningError(f"batch_size must be >= 1, got {batch_size}. Fix: e.g. 128.")
    if num_workers < 0:
        raise LocalLearningError(f"num_workers must be >= 0, got {num_workers}. Fix: 0 or more.")
    if not 0 <= val_fraction < 1:
        raise LocalLearningError(
            f"val_fraction must be in [0, 1), got {val_fraction}. Fix: e.g. 0.1, or 0 for no "
            "validation set."
        )


class InMemoryDataModule(L.LightningDataModule):
    """Base of the library's data modules: train/validation/test tensors held in memory.

    Subclasses implement :meth:`_load_splits` (the raw train and test tensors, already in
    float32 / int64) and say which dimensions the standardization statistics reduce over.
    ``setup`` carves the validation split from the training data with a seeded permutation,
    then standardizes every split with the *training* split's statistics
    ``x <- (x - mu_train) / sigma_train`` (when ``standardize``). After ``setup`` the
    statistics are in ``self.mean`` / ``self.std`` (None without standardization).
    """

    _standardize_dims: tuple[int, ...] = (0,)

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None,
        batch_size: int,
        num_workers: int,
        val_fraction: float,
        seed: int,
        standardize: bool,
    ) -> None:
        super().__init__()
        _check_loader_hparams(batch_size, num_workers, val_fraction)
        self.data_dir = resolve_data_dir(data_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.standardize = standardize
        self.mean: Tensor | None = None
        self.std: Tensor | None = None
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _load_splits(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """``((x_train, y_train), (x_test, y_test))`` as stored on disk, in fresh tensors that
        the module owns (``setup`` standardizes them in place)."""
        raise NotImplementedError

    def _finish(self, x: Tensor) -> Tensor:
        """Last per-split transform after standardization (e.g. flattening); identity here."""
        return x

    def setup(self, stage: str | None = None) -> None:
        """Load, split and standardize once; later calls (fit, then test) reuse the tensors."""
        if self.train_set is not None:
            return
        (x_train, y_train), (x_test, y_test) = self._load_splits()
        (x_train, y_train), (x_val, y_val) = _split_train_val(
            x_train, y_train, self.val_fraction, self.seed
        )
        if self.standardize:
            self.mean, self.std = _standardization(x_train, self._standardize_dims)
            for x in (x_train, x_val, x_test):
                x.sub_(self.mean).div_(self.std)  # in place: image sets are hundreds of MB
        self.train_set = TensorDataset(self._finish(x_train), y_train)
        self.val_set = TensorDataset(self._finish(x_val), y_val)
        self.test_set = TensorDataset(self._finish(x_test), y_test)

    def _loader(self, dataset: TensorDataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise LocalLearningError(
                f"{type(self).__name__} has no data yet. Fix: call .prepare_data() and "
                ".setup() first (a Trainer does this for you)."
            )
        workers = dict(num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if shuffle:
            trainer = self.trainer
            replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
            return ResumableDataLoader(
                dataset, self.batch_size, shuffle=True, seed=self.seed,
                num_replicas=replicas, rank=rank, **workers,
            )
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False,
            generator=torch.Generator().manual_seed(self.seed), **workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Batches of the training split, reshuffled every epoch by a permutation seeded with
        ``seed + epoch``; under DDP the ranks share each global batch (``N`` processes at
        ``batch_size`` see one process's batches of ``N * batch_size``). Checkpoints store the
        position, so a resumed run continues with the next batch."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Batches of the validation split, in order; ``[]`` when ``val_fraction == 0``."""
        if self.val_set is not None and len(self.val_set) == 0:
            return []
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of the test split, in order."""
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Batches of the test split, in order (for ``trainer.predict``)."""
        return self._loader(self.test_set, shuffle=False)
