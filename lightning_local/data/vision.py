"""FashionMNIST and CIFAR-10 (the paper's image data sets) from a local folder, in memory.

Both are read by torchvision with ``download=False``: this library never downloads. When the
files are absent, :class:`~lightning_local.errors.DatasetNotFoundError` names the expected
layout and how to fetch the files on a machine with network access; when a file is corrupt
(truncated, garbled, not the expected data: FashionMNIST's idx headers, sizes and labels are
checked here, CIFAR-10's md5 sums by torchvision), the same error names the file and says to
replace it.

Pixels are scaled to ``[0, 1]`` and, with ``standardize``, normalized per channel with the
training split's statistics, ``x_c <- (x_c - mu_c) / sigma_c`` (the usual
``transforms.Normalize``, applied once to the whole tensor instead of per image). With
``flatten`` every image becomes a vector of ``in_features = C * H * W`` entries, for MLPs.
In memory the float32 inputs take about 190 MB (FashionMNIST) and 740 MB (CIFAR-10).
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from lightning_local.data._in_memory import DATA_DIR_ENV, InMemoryDataModule
from lightning_local.errors import DatasetNotFoundError

__all__ = ["FashionMNISTDataModule", "CIFAR10DataModule"]


class _VisionDataModule(InMemoryDataModule):
    """A torchvision image data set held in memory as ``(N, C, H, W)`` (or flattened) tensors."""

    in_channels: int
    image_size: int
    num_classes: int = 10
    _standardize_dims = (0, 2, 3)  # per channel: over samples, height and width

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 42,
        standardize: bool = True,
        flatten: bool = False,
    ) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_fraction, seed, standardize)
        self.flatten = flatten
        self.save_hyperparameters()

    @property
    def in_features(self) -> int:
        """Entries per image, ``C * H * W`` (the input width of an MLP on flattened images)."""
        return self.in_channels * self.image_size * self.image_size

    # --- what a subclass provides -------------------------------------------------------
    def _expected_files(self) -> list[str]:
        """Files torchvision needs, relative to ``data_dir``."""
        raise NotImplementedError

    def _how_to_get(self) -> str:
        """How to obtain the files on a machine with network access."""
        raise NotImplementedError

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        """uint8 images ``(N, C, H, W)`` and int64 labels through torchvision."""
        raise NotImplementedError

    def _check_contents(self) -> None:
        """Raise the error of :meth:`_corrupt` for a file that cannot hold the data set (checked
        before torchvision reads the files; nothing to check by default)."""

    def _corrupt_files(self) -> list[str]:
        """After torchvision failed to read the files: those it would reject, if known."""
        return []

    # --- shared ---------------------------------------------------------------------------
    def _check_files(self) -> None:
        missing = [name for name in self._expected_files() if not (self.data_dir / name).is_file()]
        if not missing:
            return
        layout = "\n".join(f"    {self.data_dir / name}" for name in self._expected_files())
        gzipped = [name for name in missing if (self.data_dir / f"{name}.gz").is_file()]
        hint = (
            f"\nThe folder holds compressed copies ({', '.join(n + '.gz' for n in gzipped)}): "
            "decompress them in place, e.g. `gunzip -k <file>.gz`."
            if gzipped
            else ""
        )
        raise DatasetNotFoundError(
            f"{type(self).__name__}: {len(missing)} file(s) missing under "
            f"'{self.data_dir}' (first: {missing[0]}). This library never downloads. "
            f"Expected layout:\n{layout}{hint}\n"
            f"Fix: {self._how_to_get()} Then pass data_dir=<folder> (or set ${DATA_DIR_ENV}) "
            "pointing at the folder that contains it."
        )

    def prepare_data(self) -> None:
        """Check that the files are present (nothing is downloaded)."""
        self._check_files()

    def _corrupt(self, name: str, problem: str, fix: str = "") -> DatasetNotFoundError:
        """The error for the corrupt file ``name`` (relative to ``data_dir``)."""
        return DatasetNotFoundError(
            f"{type(self).__name__}: the file '{self.data_dir / name}' is corrupt: {problem}. "
            f"This library never downloads. Fix: {fix}delete it and put a fresh copy in its "
            f"place: {self._how_to_get()} Then pass data_dir=<folder> (or set "
            f"${DATA_DIR_ENV}) pointing at the folder that contains it."
        )

    def _load_splits(self) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        self._check_files()
        self._check_contents()
        try:
            (x_train, y_train), (x_test, y_test) = self._read(True), self._read(False)
        except DatasetNotFoundError:
            raise
        except (
            RuntimeError, ValueError, TypeError, EOFError, OSError, AssertionError, IndexError,
        ) as error:
            corrupt = [str(self.data_dir / name) for name in self._corrupt_files()]
            if corrupt:
                problem = (
                    f"the file(s) {corrupt} fail torchvision's md5 checksum: they are corrupt "
                    "or truncated"
                )
            else:
                problem = (
                    f"torchvision could not read the files under '{self.data_dir}' "
                    f"({type(error).__name__}: {error or 'no message'}): they are corrupt or "
                    "truncated"
                )
            raise DatasetNotFoundError(
                f"{type(self).__name__}: {problem}. This library never downloads. Fix: delete "
                f"the corrupt file(s) and put fresh copies in their place: {self._how_to_get()}"
            ) from error
        return (x_train.float().div_(255), y_train), (x_test.float().div_(255), y_test)

    def _finish(self, x: Tensor) -> Tensor:
        return x.flatten(1) if self.flatten else x.contiguous()


class FashionMNISTDataModule(_VisionDataModule):
    """FashionMNIST (60 000 train / 10 000 test, 1 x 28 x 28, 10 classes) from ``data_dir``.

    Expects torchvision's layout, ``<data_dir>/FashionMNIST/raw/`` with the four uncompressed
    files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``. The validation split (``val_fraction`` of the training images,
    permutation seeded by ``seed``) comes from the training set; the test set is the official
    one. Hyperparameters as in :class:`~lightning_local.data.MNIST1DDataModule`, plus
    ``flatten`` (images -> 784-vectors for MLPs).
    """

    in_channels = 1
    image_size = 28

    def _expected_files(self) -> list[str]:
        from torchvision.datasets import FashionMNIST

        raw = Path("FashionMNIST", "raw")
        return [str(raw / os.path.splitext(name)[0]) for name, _ in FashionMNIST.resources]

    def _split_files(self, train: bool) -> tuple[str, str]:
        """The images and labels files of a split, relative to ``data_dir``."""
        prefix = "train" if train else "t10k"
        raw = Path("FashionMNIST", "raw")
        return str(raw / f"{prefix}-images-idx3-ubyte"), str(raw / f"{prefix}-labels-idx1-ubyte")

    def _idx_count(self, name: str, sample_shape: tuple[int, ...]) -> int:
        """The number of samples in the idx file ``name`` (uint8 samples of ``sample_shape``),
        after checking its header against its size; raises the error of :meth:`_corrupt`."""
        path = self.data_dir / name
        ndim = 1 + len(sample_shape)
        header_size = 4 + 4 * ndim
        size = path.stat().st_size
        with path.open("rb") as file:
            header = file.read(header_size)
        kind = "images" if sample_shape else "labels"
        if header[:2] == b"\x1f\x8b":
            raise self._corrupt(
                name, "it is gzip-compressed (a .gz download saved under the uncompressed name)",
                f"rename it to {path.name}.gz and decompress it in place (`gunzip -k "
                f"{path.name}.gz`), or ",
            )
        if len(header) < 4 or header[:3] != b"\x00\x00\x08":
            raise self._corrupt(
                name, f"it does not start with the idx magic number of unsigned-byte data "
                f"(00 00 08 0{ndim}; it starts with {header[:4].hex(' ') or 'nothing'}, "
                f"{size} bytes in all): it is not an idx file of {kind} (an HTML error page, "
                "a partial copy, ...)"
            )
        if header[3] != ndim:
            raise self._corrupt(
                name, f"it holds {header[3]}-d data, but {kind} are {ndim}-d idx data "
                "(the images and labels files may be swapped)"
            )
        if len(header) < header_size:
            raise self._corrupt(name, f"it has {size} bytes, fewer than its {header_size}-byte "
                                "idx header: it is truncated")
        dims = struct.unpack(f">{ndim}I", header[4:])
        if tuple(dims[1:]) != sample_shape:
            raise self._corrupt(
                name, f"it holds {kind} of shape {tuple(dims[1:])}, but FashionMNIST's are "
                f"{sample_shape}: it is another data set's file"
            )
        expected = header_size + math.prod(dims)
        if size != expected:
            state = "truncated" if size < expected else "longer than its header says"
            raise self._corrupt(
                name, f"its header announces {dims[0]} {kind} ({expected} bytes with the "
                f"header), but it has {size} bytes: it is {state}"
            )
        return dims[0]

    def _check_contents(self) -> None:
        shape = (self.image_size, self.image_size)
        for train in (True, False):
            images, labels = self._split_files(train)
            n_images, n_labels = self._idx_count(images, shape), self._idx_count(labels, ())
            if n_images != n_labels:
                raise self._corrupt(
                    labels, f"it holds {n_labels} labels, but '{self.data_dir / images}' "
                    f"holds {n_images} images (the files come from different downloads or "
                    "one of them is a partial copy)"
                )

    def _how_to_get(self) -> str:
        return (
            'on a machine with network access run `python -c "from torchvision.datasets '
            "import FashionMNIST; FashionMNIST('data', download=True)\"` "
            "and copy the folder data/FashionMNIST into the data folder."
        )

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import FashionMNIST

        dataset = FashionMNIST(str(self.data_dir), train=train, download=False)
        labels = dataset.targets.long()
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise self._corrupt(
                self._split_files(train)[1], f"it holds the label {int(labels.max())}, but "
                f"FashionMNIST has {self.num_classes} classes (0 to {self.num_classes - 1})"
            )
        return dataset.data.unsqueeze(1), labels


class CIFAR10DataModule(_VisionDataModule):
    """CIFAR-10 (50 000 train / 10 000 test, 3 x 32 x 32, 10 classes) from ``data_dir``.

    Expects torchvision's layout, ``<data_dir>/cifar-10-batches-py/`` with ``data_batch_1`` ...
    ``data_batch_5``, ``test_batch`` and ``batches.meta`` (the extracted
    ``cifar-10-python.tar.gz``; torchvision verifies their md5 checksums). The validation split
    comes from the training set, seeded by ``seed``. Hyperparameters as in
    :class:`~lightning_local.data.MNIST1DDataModule`, plus ``flatten`` (images -> 3072-vectors).
    """

    in_channels = 3
    image_size = 32

    def _expected_files(self) -> list[str]:
        from torchvision.datasets import CIFAR10

        names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list]
        names.append(CIFAR10.meta["filename"])
        return [str(Path(CIFAR10.base_folder, name)) for name in names]

    def _how_to_get(self) -> str:
        return (
            'on a machine with network access run `python -c "from torchvision.datasets '
            "import CIFAR10; CIFAR10('data', download=True)\"` (or extract "
            "cifar-10-python.tar.gz from the CIFAR-10 site) and copy the folder "
            "data/cifar-10-batches-py into the data folder."
        )

    def _corrupt_files(self) -> list[str]:
        from torchvision.datasets import CIFAR10, cifar

        names = CIFAR10.train_list + CIFAR10.test_list + [
            (CIFAR10.meta["filename"], CIFAR10.meta["md5"])
        ]
        folder = Path(CIFAR10.base_folder)
        return [
            str(folder / name) for name, md5 in names
            if not cifar.check_integrity(str(self.data_dir / folder / name), md5)
        ]

    def _read(self, train: bool) -> tuple[Tensor, Tensor]:
        from torchvision.datasets import CIFAR10

        dataset = CIFAR10(str(self.data_dir), train=train, download=False)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)  # HWC -> CHW
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)
