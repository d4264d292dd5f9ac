"""MNIST-1D, the embedded default data set: generated locally, cached on disk, held in memory.

MNIST-1D (Greydanus, 2020) turns ten 1-d digit templates into length-40 signals by random
padding, scaling, translation, correlated and i.i.d. noise and shear. The ``mnist1d`` package's
``make_dataset`` draws ``num_samples // 10`` signals per class with numpy's global generator
seeded by ``seed``, shuffles them, standardizes the whole set with one global mean and standard
deviation, and splits it 80 % train / 20 % test. It computes everything locally: this module
never calls the package's download helper.

A generated set is cached as ``<data_dir>/mnist1d/mnist1d_n<num_samples>_seed<seed>_<key>.npz``
where ``<key>`` hashes every generation argument and the ``mnist1d`` version, so different
arguments never share a file. The file is written atomically (temporary file, then
``os.replace``); a cache that cannot be read back is regenerated with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import mnist1d.data
import numpy as np
import torch
from torch import Tensor

from lightning_local._atomic import atomic_write
from lightning_local.data._in_memory import InMemoryDataModule, resolve_data_dir
from lightning_local.errors import LocalLearningError

__all__ = ["MNIST1DDataModule", "load_mnist1d", "mnist1d_cache_path"]

_CACHE_FORMAT = 1
_SPLITS = ("x_train", "y_train", "x_test", "y_test")


def _generation_args(seed: int, num_samples: int) -> dict[str, Any]:
    """``mnist1d``'s default generation arguments with ``seed`` and ``num_samples`` set."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise LocalLearningError(f"num_samples must be an int, got {num_samples!r}.")
    if num_samples < 10 or num_samples % 10:
        raise LocalLearningError(
            f"num_samples must be a positive multiple of 10 (mnist1d draws num_samples // 10 "
            f"signals per class), got {num_samples}. Fix: e.g. num_samples=5000."
        )
    args = mnist1d.data.get_dataset_args(as_dict=True)
    args.pop("url", None)  # only the download helper reads it; it is not a generation argument
    args.update(seed=int(seed), num_samples=num_samples)
    return args


def _cache_key(args: dict[str, Any]) -> str:
    """JSON of the generation arguments, the mnist1d version and the cache format."""
    return json.dumps(
        {"args": args, "mnist1d": metadata.version("mnist1d"), "format": _CACHE_FORMAT},
        sort_keys=True,
    )


def mnist1d_cache_path(
    data_dir: str | os.PathLike[str] | None = None, seed: int = 42, num_samples: int = 5000
) -> Path:
    """Where :func:`load_mnist1d` caches the set generated with ``seed`` and ``num_samples``."""
    args = _generation_args(seed, num_samples)
    digest = hashlib.sha256(_cache_key(args).encode()).hexdigest()[:12]
    name = f"mnist1d_n{num_samples}_seed{args['seed']}_{digest}.npz"
    return resolve_data_dir(data_dir) / "mnist1d" / name


def _generate(args: dict[str, Any]) -> dict[str, np.ndarray]:
    """Run ``mnist1d.data.make_dataset`` without disturbing the caller's random generators.

    ``make_dataset`` reseeds Python's ``random`` and numpy's global generator; their states are
    saved before and restored after, so loading data never changes a user's random stream.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        raw = mnist1d.data.make_dataset(mnist1d.data.ObjectView(dict(args)))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {
        "x_train": np.ascontiguousarray(raw["x"], dtype=np.float32),
        "y_train": np.ascontiguousarray(raw["y"], dtype=np.int64),
        "x_test": np.ascontiguousarray(raw["x_test"], dtype=np.float32),
        "y_test": np.ascontiguousarray(raw["y_test"], dtype=np.int64),
    }


def _read_cache(path: Path, key: str, args: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays in ``path``; raises ``ValueError`` when the file is not the expected set."""
    n_train = int(args["num_samples"] * args["train_split"])
    n_test = args["num_samples"] - n_train
    length = args["final_seq_length"]
    expected = {
        "x_train": ((n_train, length), np.float32),
        "y_train": ((n_train,), np.int64),
        "x_test": ((n_test, length), np.float32),
        "y_test": ((n_test,), np.int64),
    }
    with np.load(path, allow_pickle=False) as stored:
        if str(stored["key"]) != key:
            raise ValueError("generation arguments differ from the requested ones")
        arrays = {name: stored[name] for name in _SPLITS}
    for name, (shape, dtype) in expected.items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            raise ValueError(f"{name} has shape {arrays[name].shape} / {arrays[name].dtype}")
    if not all(np.isfinite(arrays[name]).all() for name in ("x_train", "x_test")):
        raise ValueError("inputs contain NaN or infinity")
    return arrays


def _write_cache_atomically(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then ``os.replace``
    (:func:`lightning_local._atomic.atomic_write`).

    An interrupted write leaves at most a stray temporary file (removed when possible), never
    a partial file under ``path``.
    """
    atomic_write(path, lambda file: np.savez(file, key=np.array(key), **arrays))


def load_mnist1d(
    data_dir: str | os.PathLike[str] | None = None, seed: int = 42, num_samples: int = 5000
) -> dict[str, Tensor]:
    """MNIST-1D generated with ``seed`` and ``num_samples``, from the cache when present.

    Args:
        data_dir: data folder; None means ``$LIGHTNING_LOCAL_DATA``, else ``./data``.
        seed: generation seed (mnist1d's default is 42).
        num_samples: total number of signals, a multiple of 10; mnist1d keeps the first 80 %
            (after its shuffle) for training and the rest for testing.

    Returns:
        ``{"x_train", "y_train", "x_test", "y_test"}``: inputs float32 of shape ``(n, 40)``,
        labels int64 in ``0..9``. Inputs are as mnist1d makes them (the whole set centered and
        scaled to standard deviation 1 with one global mean and scale), not per-feature
        standardized. Tensors are CPU tensors that own their memory.
    """
    args = _generation_args(seed, num_samples)
    key = _cache_key(args)
    path = mnist1d_cache_path(data_dir, seed, num_samples)
    arrays = None
    if path.exists():
        try:
            arrays = _read_cache(path, key, args)
        except Exception as error:  # any unreadable file is regenerated, never trusted
            warnings.warn(
                f"MNIST-1D cache {path} is unreadable or does not match ({error}); "
                "regenerating it.",
                RuntimeWarning,
                stacklevel=2,
            )
    if arrays is None:
        arrays = _generate(args)
        try:
            _write_cache_atomically(path, key, arrays)
        except OSError as error:
            warnings.warn(
                f"could not cache MNIST-1D at {path} ({error}); using the generated set without "
                "caching. Fix: point data_dir (or $LIGHTNING_LOCAL_DATA) at a writable folder.",
                RuntimeWarning,
                stacklevel=2,
            )
    return {name: torch.from_numpy(np.array(arrays[name])) for name in _SPLITS}


class MNIST1DDataModule(InMemoryDataModule):
    """MNIST-1D as a ``LightningDataModule``: 40 input features, 10 classes.

    ``prepare_data`` generates and caches the set (once, on one process per node); ``setup``
    reads the cache, carves a validation split of ``val_fraction`` of the training signals with
    a permutation seeded by ``seed``, and standardizes every input coordinate with the
    training split's statistics, ``x_i <- (x_i - mu_i) / sigma_i`` (when ``standardize``).
    The test split is mnist1d's own test split.

    Args:
        data_dir: data folder; None means ``$LIGHTNING_LOCAL_DATA``, else ``./data``.
        batch_size: batch size of every loader.
        num_workers: loader worker processes (0 loads in the main process; the data set is in
            memory, so 0 is usually fastest).
        seed: generation seed, also seeds the validation split.
        num_samples: total number of signals (train + test), a multiple of 10.
        val_fraction: fraction of mnist1d's training split held out for validation, in [0, 1).
        standardize: standardize inputs per coordinate with training-split statistics.
    """

    in_features = 40
    num_classes = 10

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 42,
        num_samples: int = 5000,
        val_fraction: float = 0.1,
        standardize: bool = True,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, seed, standardize)
        _generation_args(seed, num_samples)  # fail on bad arguments now, not inside a Trainer
        self.num_samples = num_samples
        self.save_hyperparameters()

    def prepare_data(self) -> None:
        """Generate and cache the set if no valid cache exists."""
        load_mnist1d(self.data_dir, self.seed, self.num_samples)

    def _load_splits(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        data = load_mnist1d(self.data_dir, self.seed, self.num_samples)
        return (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
