"""Data modules: MNIST-1D generation and cache, splits, standardization, local image folders."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import re
import struct
import warnings
from pathlib import Path

import mnist1d.data
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from lightning_local.data import (
    CIFAR10DataModule,
    FashionMNISTDataModule,
    MNIST1DDataModule,
    load_mnist1d,
    mnist1d_cache_path,
)
from lightning_local.errors import DatasetNotFoundError, LocalLearningError

SMALL = 500  # MNIST-1D samples in these tests: 400 train / 100 test, generated in ~0.1 s


def _reference_mnist1d(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    """What mnist1d itself generates for these arguments."""
    args = mnist1d.data.get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    return mnist1d.data.make_dataset(args)


def _forbid_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("make_dataset was called although a valid cache exists")

    monkeypatch.setattr(mnist1d.data, "make_dataset", refuse)


def _rows(x: torch.Tensor) -> list[bytes]:
    """Rows of ``x`` as sortable byte strings (to compare sets of samples)."""
    return sorted(row.numpy().tobytes() for row in x.reshape(x.shape[0], -1))


# --- MNIST-1D: generation and cache ------------------------------------------------------------


def test_load_mnist1d_matches_mnist1d_and_is_deterministic(tmp_path):
    data = load_mnist1d(tmp_path / "a", seed=3, num_samples=SMALL)
    reference = _reference_mnist1d(seed=3, num_samples=SMALL)
    assert data["x_train"].dtype == torch.float32 and data["y_train"].dtype == torch.int64
    assert data["x_train"].shape == (400, 40) and data["x_test"].shape == (100, 40)
    assert data["y_train"].shape == (400,) and data["y_test"].shape == (100,)
    np.testing.assert_array_equal(data["x_train"].numpy(), reference["x"].astype(np.float32))
    np.testing.assert_array_equal(data["x_test"].numpy(), reference["x_test"].astype(np.float32))
    np.testing.assert_array_equal(data["y_train"].numpy(), reference["y"])
    np.testing.assert_array_equal(data["y_test"].numpy(), reference["y_test"])

    again = load_mnist1d(tmp_path / "b", seed=3, num_samples=SMALL)  # fresh folder: regenerates
    other = load_mnist1d(tmp_path / "b", seed=4, num_samples=SMALL)
    for name in data:
        assert torch.equal(data[name], again[name])
    assert not torch.equal(data["x_train"], other["x_train"])


def test_generation_leaves_global_random_state_alone(tmp_path):
    random.seed(123)
    np.random.seed(123)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    load_mnist1d(tmp_path, seed=0, num_samples=SMALL)  # mnist1d reseeds both generators inside
    assert random.random() == expected_python
    assert np.random.rand() == expected_numpy


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    first = load_mnist1d(tmp_path, seed=5, num_samples=SMALL)
    path = mnist1d_cache_path(tmp_path, seed=5, num_samples=SMALL)
    assert path.is_file() and path.parent == tmp_path / "mnist1d"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    mtime = path.stat().st_mtime_ns

    _forbid_generation(monkeypatch)
    second = load_mnist1d(tmp_path, seed=5, num_samples=SMALL)
    for name in first:
        assert torch.equal(first[name], second[name])
    assert path.stat().st_mtime_ns == mtime


def test_env_var_sets_the_default_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_LOCAL_DATA", str(tmp_path / "env"))
    load_mnist1d(seed=1, num_samples=SMALL)
    assert mnist1d_cache_path(tmp_path / "env", seed=1, num_samples=SMALL).is_file()
    assert MNIST1DDataModule(num_samples=SMALL).data_dir == tmp_path / "env"
    assert MNIST1DDataModule(tmp_path / "given", num_samples=SMALL).data_dir == tmp_path / "given"


def test_different_arguments_use_different_cache_files(tmp_path):
    paths = {
        mnist1d_cache_path(tmp_path, seed=1, num_samples=SMALL),
        mnist1d_cache_path(tmp_path, seed=2, num_samples=SMALL),
        mnist1d_cache_path(tmp_path, seed=1, num_samples=2 * SMALL),
    }
    assert len(paths) == 3
    a = load_mnist1d(tmp_path, seed=1, num_samples=SMALL)
    b = load_mnist1d(tmp_path, seed=1, num_samples=2 * SMALL)
    assert a["x_train"].shape[0] == 400 and b["x_train"].shape[0] == 800
    assert len(list((tmp_path / "mnist1d").glob("*.npz"))) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_set"])
def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path, damage):
    good = load_mnist1d(tmp_path, seed=7, num_samples=SMALL)
    path = mnist1d_cache_path(tmp_path, seed=7, num_samples=SMALL)
    if damage == "garbage":
        path.write_bytes(b"not a numpy archive")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a valid archive holding another set (e.g. copied over by hand)
        load_mnist1d(tmp_path, seed=8, num_samples=SMALL)
        os.replace(mnist1d_cache_path(tmp_path, seed=8, num_samples=SMALL), path)

    with pytest.warns(RuntimeWarning, match="regenerating"):
        repaired = load_mnist1d(tmp_path, seed=7, num_samples=SMALL)
    for name in good:
        assert torch.equal(good[name], repaired[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten cache reads back cleanly
        load_mnist1d(tmp_path, seed=7, num_samples=SMALL)


def test_interrupted_cache_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupted_savez(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted_savez)
    with pytest.raises(KeyboardInterrupt):
        load_mnist1d(tmp_path, seed=9, num_samples=SMALL)
    folder = tmp_path / "mnist1d"
    assert not mnist1d_cache_path(tmp_path, seed=9, num_samples=SMALL).exists()
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs", [{"num_samples": 505}, {"num_samples": 0}, {"val_fraction": 1.0}, {"batch_size": 0}]
)
def test_bad_arguments_raise_library_errors(tmp_path, kwargs):
    with pytest.raises(LocalLearningError, match="Fix"):
        MNIST1DDataModule(tmp_path, **kwargs)


# --- MNIST-1D: the data module --------------------------------------------------------------


def _module(tmp_path, **kwargs) -> MNIST1DDataModule:
    dm = MNIST1DDataModule(tmp_path, num_samples=SMALL, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_split_sizes_and_validation_is_carved_from_train(tmp_path):
    dm = _module(tmp_path, standardize=False, val_fraction=0.1, seed=11)
    raw = load_mnist1d(tmp_path, seed=11, num_samples=SMALL)
    x_train, y_train = dm.train_set.tensors
    x_val, y_val = dm.val_set.tensors
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (360, 40, 100)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    # train + validation is exactly mnist1d's train split (with labels attached), test untouched
    joined = torch.cat([torch.cat([x_train, x_val]), torch.cat([y_train, y_val])[:, None]], 1)
    reference = torch.cat([raw["x_train"], raw["y_train"][:, None].float()], 1)
    assert _rows(joined) == _rows(reference)
    assert torch.equal(dm.test_set.tensors[0], raw["x_test"])
    assert torch.equal(dm.test_set.tensors[1], raw["y_test"])
    assert dm.in_features == x_train.shape[1] == 40
    assert dm.num_classes == 10 == len(torch.unique(raw["y_train"]))


def test_validation_split_is_seeded_not_global(tmp_path):
    torch.manual_seed(0)
    a = _module(tmp_path, standardize=False, val_fraction=0.2)
    torch.manual_seed(1)  # the global torch generator must not matter
    b = _module(tmp_path, standardize=False, val_fraction=0.2)
    assert torch.equal(a.val_set.tensors[0], b.val_set.tensors[0])
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])


def test_standardization_uses_training_statistics(tmp_path):
    plain = _module(tmp_path, standardize=False)
    scaled = _module(tmp_path, standardize=True)
    x_plain = plain.train_set.tensors[0].double()
    mean, std = x_plain.mean(0), x_plain.std(0, unbiased=False)
    x_train = scaled.train_set.tensors[0].double()
    torch.testing.assert_close(
        x_train.mean(0), torch.zeros(40, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        x_train.std(0, unbiased=False), torch.ones(40, dtype=torch.float64), atol=1e-5, rtol=0
    )
    for split in ("val_set", "test_set"):  # other splits use the training statistics, not their own
        expected = (getattr(plain, split).tensors[0].double() - mean) / std
        torch.testing.assert_close(
            getattr(scaled, split).tensors[0].double(), expected, atol=1e-5, rtol=0
        )
    assert torch.equal(scaled.train_set.tensors[1], plain.train_set.tensors[1])


def test_dataloaders_yield_batches_of_the_requested_size(tmp_path):
    dm = _module(tmp_path, batch_size=64)
    train_batches = list(dm.train_dataloader())
    assert [x.shape for x, _ in train_batches] == [(64, 40)] * 5 + [(40, 40)]
    assert all(y.dtype == torch.int64 and y.shape == (x.shape[0],) for x, y in train_batches)
    assert sum(len(y) for _, y in dm.val_dataloader()) == 40
    x_test = torch.cat([x for x, _ in dm.test_dataloader()])
    assert torch.equal(x_test, dm.test_set.tensors[0])  # test batches come in order
    x_seen = torch.cat([x for x, _ in train_batches])
    assert _rows(x_seen) == _rows(dm.train_set.tensors[0])  # one epoch sees every sample once


def test_no_validation_split_and_loaders_before_setup(tmp_path):
    dm = MNIST1DDataModule(tmp_path, num_samples=SMALL, val_fraction=0.0)
    with pytest.raises(LocalLearningError, match="setup"):
        dm.train_dataloader()
    dm.setup("fit")
    assert len(dm.train_set) == 400 and dm.val_dataloader() == []


def test_hyperparameters_are_saved(tmp_path):
    dm = MNIST1DDataModule(tmp_path, batch_size=32, seed=3, num_samples=SMALL)
    assert dm.hparams["batch_size"] == 32 and dm.hparams["seed"] == 3
    assert dm.hparams["num_samples"] == SMALL and dm.hparams["standardize"] is True


# --- FashionMNIST / CIFAR-10 from local folders -----------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed idx file: magic (0, 0, 0x08 = uint8, ndim), big-endian dims, bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(root: Path, n_train: int = 20, n_test: int = 10):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n_train + n_test, 28, 28), dtype=np.uint8)
    labels = np.arange(n_train + n_test, dtype=np.uint8) % 10
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", images[:n_train])
    _write_idx(raw / "train-labels-idx1-ubyte", labels[:n_train])
    _write_idx(raw / "t10k-images-idx3-ubyte", images[n_train:])
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[n_train:])
    return images, labels


def _fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 8):
    """CIFAR-10's python pickles: rows of 3072 bytes, channel-major (R plane, G, B)."""
    rng = np.random.default_rng(1)
    n_train = 5 * per_batch
    rows = rng.integers(0, 256, size=(n_train + n_test, 3 * 32 * 32), dtype=np.uint8)
    labels = [i % 10 for i in range(n_train + n_test)]
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        batch = {"data": rows[part], "labels": labels[part]}
        (folder / f"data_batch_{b + 1}").write_bytes(pickle.dumps(batch))
    test = {"data": rows[n_train:], "labels": labels[n_train:]}
    (folder / "test_batch").write_bytes(pickle.dumps(test))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return rows.reshape(-1, 3, 32, 32), np.array(labels)


@pytest.fixture
def cifar_without_md5(monkeypatch):
    """Real CIFAR-10 files carry fixed md5 sums that torchvision checks; these fake files cannot
    match them, so only for these tests the check is reduced to "the file exists"."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


def test_fashion_mnist_reads_local_files(tmp_path):
    images, labels = _fake_fashion_mnist(tmp_path)
    dm = FashionMNISTDataModule(tmp_path, batch_size=8, val_fraction=0.1, standardize=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 2, 10)
    x_test, y_test = dm.test_set.tensors
    assert x_test.shape == (10, 1, 28, 28) and x_test.dtype == torch.float32
    torch.testing.assert_close(x_test, torch.from_numpy(images[20:, None] / 255.0).float())
    assert torch.equal(y_test, torch.from_numpy(labels[20:].astype(np.int64)))
    x_all = torch.cat([dm.train_set.tensors[0], dm.val_set.tensors[0]])
    assert _rows((x_all * 255).round().to(torch.uint8)) == _rows(torch.from_numpy(images[:20]))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    other_seed = FashionMNISTDataModule(tmp_path, val_fraction=0.1, standardize=False, seed=1)
    other_seed.setup("fit")  # same files, another seeded split
    assert _rows(other_seed.val_set.tensors[0]) != _rows(dm.val_set.tensors[0])
    assert (dm.in_channels, dm.image_size, dm.num_classes, dm.in_features) == (1, 28, 10, 784)


def test_fashion_mnist_flatten_and_standardize(tmp_path):
    images, _ = _fake_fashion_mnist(tmp_path)
    plain = FashionMNISTDataModule(tmp_path, standardize=False, flatten=True)
    scaled = FashionMNISTDataModule(tmp_path, standardize=True, flatten=True)
    plain.setup("fit")
    scaled.setup("fit")
    x_plain = plain.train_set.tensors[0].double()
    assert x_plain.shape == (18, 784)
    mean, std = x_plain.mean(), x_plain.std(unbiased=False)  # one channel: one mean, one std
    x_train = scaled.train_set.tensors[0].double()
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std(unbiased=False).item() - 1) < 1e-5
    expected_test = (plain.test_set.tensors[0].double() - mean) / std
    torch.testing.assert_close(
        scaled.test_set.tensors[0].double(), expected_test, atol=1e-5, rtol=0
    )
    assert next(iter(scaled.train_dataloader()))[0].shape == (18, 784)


def test_cifar10_reads_local_files(tmp_path, cifar_without_md5):
    images, labels = _fake_cifar10(tmp_path)
    plain = CIFAR10DataModule(tmp_path, batch_size=5, standardize=False, val_fraction=0.25)
    plain.prepare_data()
    plain.setup("fit")
    assert (len(plain.train_set), len(plain.val_set), len(plain.test_set)) == (15, 5, 8)
    x_test, y_test = plain.test_set.tensors
    assert x_test.shape == (8, 3, 32, 32)
    torch.testing.assert_close(x_test, torch.from_numpy(images[20:] / 255.0).float())
    assert torch.equal(y_test, torch.from_numpy(labels[20:]))
    assert next(iter(plain.train_dataloader()))[0].shape == (5, 3, 32, 32)

    scaled = CIFAR10DataModule(tmp_path, standardize=True, flatten=True, val_fraction=0.25)
    scaled.setup("fit")
    assert scaled.train_set.tensors[0].shape == (15, 3072) and scaled.in_features == 3072
    x_train = scaled.train_set.tensors[0].double().reshape(15, 3, 32 * 32)
    per_channel = x_train.transpose(0, 1).reshape(3, -1)  # statistics are per colour channel
    torch.testing.assert_close(
        per_channel.mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        per_channel.std(1, unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0
    )
    assert (scaled.in_channels, scaled.image_size, scaled.num_classes) == (3, 32, 10)


def test_cifar10_with_wrong_checksums_is_reported(tmp_path):
    _fake_cifar10(tmp_path)  # torchvision's real md5 check rejects these files
    dm = CIFAR10DataModule(tmp_path)
    dm.prepare_data()  # the files are all there
    with pytest.raises(DatasetNotFoundError, match="checksum"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "module, expected",
    [
        (FashionMNISTDataModule, "FashionMNIST/raw/train-images-idx3-ubyte"),
        (CIFAR10DataModule, "cifar-10-batches-py/data_batch_1"),
    ],
)
def test_missing_files_give_a_clear_error(tmp_path, module, expected):
    dm = module(tmp_path)
    with pytest.raises(DatasetNotFoundError) as caught:
        dm.prepare_data()
    message = str(caught.value)
    assert expected.replace("/", os.sep) in message and "download=True" in message
    assert "never downloads" in message
    assert isinstance(caught.value, FileNotFoundError) and isinstance(
        caught.value, LocalLearningError
    )
    with pytest.raises(DatasetNotFoundError):
        dm.setup("fit")


def _idx_bytes(array: np.ndarray, ndim: int | None = None) -> bytes:
    ndim = array.ndim if ndim is None else ndim
    header = struct.pack(">BBBB", 0, 0, 0x08, ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


_IMAGES, _LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


@pytest.mark.parametrize("name, content, problem", [
    (_IMAGES, lambda data: data[: len(data) // 2], "it is truncated"),
    (_IMAGES, lambda data: data[:10], "fewer than its 16-byte idx header"),
    (_LABELS, lambda data: b"", "starts with nothing, 0 bytes"),
    (_LABELS, lambda data: b"<html>Not Found</html>", "it is not an idx file of labels"),
    (_IMAGES, lambda data: data + b"\0\0", "longer than its header says"),
    (_LABELS, lambda data: _idx_bytes(np.zeros((20, 28, 28))), "the images and labels files"),
    (_IMAGES, lambda data: _idx_bytes(np.zeros((20, 32, 32))), "of shape (32, 32)"),
    (_LABELS, lambda data: _idx_bytes(np.zeros(7)), "holds 7 labels, but"),
    (_LABELS, lambda data: _idx_bytes(np.full(20, 200)), "the label 200"),
    (_IMAGES, lambda data: gzip.compress(data), "gzip-compressed"),
], ids=["half", "header", "empty", "html", "extra-bytes", "swapped", "image-size", "counts",
        "label-range", "gzip"])
def test_corrupt_fashion_mnist_file_is_named_with_the_fix(tmp_path, name, content, problem):
    _fake_fashion_mnist(tmp_path)
    path = tmp_path / "FashionMNIST" / "raw" / name
    path.write_bytes(content(path.read_bytes()))
    dm = FashionMNISTDataModule(tmp_path)
    dm.prepare_data()  # the four files are there
    with pytest.raises(DatasetNotFoundError) as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert f"'{path}' is corrupt" in message and problem in message
    assert "never downloads" in message and "download=True" in message
    assert "delete it and put a fresh copy in its place" in message


def test_garbled_idx_file_was_a_bare_assertion_in_torchvision(tmp_path):
    """The issue's case: torchvision's reader raises AssertionError without a message."""
    import torchvision.datasets.mnist as tv_mnist

    _fake_fashion_mnist(tmp_path)
    path = tmp_path / "FashionMNIST" / "raw" / _LABELS
    path.write_bytes(b"garbled bytes, not idx")
    with pytest.raises(AssertionError):
        tv_mnist.read_label_file(str(path))
    with pytest.raises(DatasetNotFoundError, match=f"'{re.escape(str(path))}' is corrupt"):
        FashionMNISTDataModule(tmp_path).setup("fit")


def test_cifar10_checksum_failure_names_the_files(tmp_path):
    _fake_cifar10(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="md5 checksum") as caught:
        CIFAR10DataModule(tmp_path).setup("fit")
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(caught.value)
    assert "never downloads" in str(caught.value) and "delete the corrupt" in str(caught.value)


def test_gzipped_fashion_mnist_files_get_a_decompress_hint(tmp_path):
    _fake_fashion_mnist(tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    for path in raw.iterdir():
        path.rename(path.with_name(path.name + ".gz"))
    with pytest.raises(DatasetNotFoundError, match="gunzip"):
        FashionMNISTDataModule(tmp_path).prepare_data()


def test_mnist1d_module_drives_a_trainer(tmp_path):
    import lightning as L
    from torch import nn

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.readout = nn.Linear(40, 10)
            self.seen: dict[str, int] = {"train": 0, "val": 0, "test": 0}

        def _count(self, stage, batch):
            x, y = batch
            assert x.shape[1:] == (40,) and y.dtype == torch.int64
            self.seen[stage] += x.shape[0]
            return nn.functional.cross_entropy(self.readout(x), y)

        def training_step(self, batch, index):
            return self._count("train", batch)

        def validation_step(self, batch, index):
            self._count("val", batch)

        def test_step(self, batch, index):
            self._count("test", batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = MNIST1DDataModule(tmp_path, num_samples=SMALL, batch_size=100)
    probe = Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(probe, datamodule=dm)
    trainer.test(probe, datamodule=dm, verbose=False)
    assert probe.seen == {"train": 360, "val": 40, "test": 100}
    assert mnist1d_cache_path(tmp_path, seed=42, num_samples=SMALL).is_file()
