"""Data: in-memory uint8 datasets, readers for common layouts, a device-side batch loader, and
``ParquetImages``, an IterableDataset that streams images from Parquet shards."""
from .datasets import Augmentation, DataSplits, ImageDataset, stratified_holdout
from .download import download, fetch_files
from .loader import BatchLoader, random_crop_flip
from .parquet import IMAGENET_MEAN, IMAGENET_STD, ParquetImages, ShardLayout, load_parquet_in_memory
from .sources import load_cifar, load_digits, load_idx_dataset, load_image_folder
from .lm import LMBatchLoader, LMDataset, tokenize_lm  # noqa: F401  (bkd_core.data.LMDataset, ...)
from .text import TextBatchLoader, TextDataset, tokenize  # noqa: F401  (bkd_core.data.TextDataset, ...)

DATASETS = ("digits", "fashion_mnist", "mnist", "cifar10", "cifar100", "image_folder", "parquet")


def load(name: str, root: str | None = None, **kwargs) -> DataSplits:
    """Load a dataset by name: ``digits`` needs no root; the others read from ``root``."""
    if name == "digits":
        return load_digits(**kwargs)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}.")
    if not root:
        raise ValueError(f"dataset {name!r} needs a root directory (data.root=PATH).")
    if name in ("fashion_mnist", "mnist"):
        return load_idx_dataset(root, name, **kwargs)
    if name == "parquet":
        return load_parquet_in_memory(root, **kwargs)
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, 10 if name == "cifar10" else 100)
    return load_image_folder(root, **kwargs)


__all__ = [
    "Augmentation", "BatchLoader", "IMAGENET_MEAN", "IMAGENET_STD", "load_parquet_in_memory", "DataSplits", "ImageDataset", "DATASETS", "ParquetImages", "ShardLayout", "load", "load_digits",
    "load_idx_dataset", "load_cifar", "stratified_holdout", "load_image_folder", "download", "fetch_files", "random_crop_flip",
]
