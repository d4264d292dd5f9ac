"""Data modules: MNIST-1D (generated locally, the default) and FashionMNIST / CIFAR-10 (read
from a local folder through torchvision). Nothing is ever downloaded."""

from lightning_local.data._in_memory import DATA_DIR_ENV, InMemoryDataModule, resolve_data_dir
from lightning_local.data.mnist1d import MNIST1DDataModule, load_mnist1d, mnist1d_cache_path
from lightning_local.data.resumable import ResumableDataLoader, ResumableSampler
from lightning_local.data.vision import CIFAR10DataModule, FashionMNISTDataModule

__all__ = [
    "DATA_DIR_ENV",
    "CIFAR10DataModule",
    "FashionMNISTDataModule",
    "InMemoryDataModule",
    "MNIST1DDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "load_mnist1d",
    "mnist1d_cache_path",
    "resolve_data_dir",
]
