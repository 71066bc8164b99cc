"""Dataset readers: scikit-learn digits (embedded), MNIST/Fashion-MNIST IDX gz, CIFAR python
pickles, and an image folder. Each returns ``DataSplits``; a missing or malformed file raises a
``ValueError`` that names the file and the layout expected."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .datasets import Augmentation, DataSplits, ImageDataset
from .download import IDX_FILES, fetch_files

PathLike = Union[str, Path]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_LAYOUT = (
    "expected the four IDX gz files of MNIST/Fashion-MNIST directly in the directory: "
    + ", ".join(IDX_FILES)
)


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DataSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes): the embedded default, no download."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:  # scikit-learn is an optional dependency of bkd_core
        raise ImportError("the digits dataset needs scikit-learn: pip install scikit-learn") from exc
    bunch = sk_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_images = images[train_idx].float()  # normalisation statistics of the training images only
    mean, std = (float(train_images.mean() / 255),), (float(train_images.std() / 255),)
    make = lambda idx, split: ImageDataset(images[idx], labels[idx], 10, mean, std, f"digits/{split}")  # noqa: E731
    return DataSplits(make(train_idx, "train"), make(test_idx, "test"), Augmentation(crop_padding=1, flip=False), [str(i) for i in range(10)])


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX gz file (big-endian header: magic, count, then rows and columns for images)."""
    if not path.is_file():
        raise ValueError(f"missing file {path}; {IDX_LAYOUT}.")
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path} is not a readable gzip file ({exc}); {IDX_LAYOUT}.") from exc
    dims = 3 if expected_magic == 2051 else 1
    header = 4 * (1 + dims)
    if len(raw) < header:
        raise ValueError(f"{path} is too short for an IDX header; {IDX_LAYOUT}.")
    magic, *shape = struct.unpack(">" + "I" * (1 + dims), raw[:header])
    if magic != expected_magic:
        raise ValueError(f"{path} has IDX magic {magic}, expected {expected_magic}; {IDX_LAYOUT}.")
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path} holds {len(raw) - header} bytes of data, its header promises {expected}; the file is truncated or corrupt.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_idx_dataset(
    root: PathLike,
    name: str = "fashion_mnist",
    download: bool = False,
    base_url: Optional[str] = None,
    checksums: Optional[dict[str, str]] = None,
) -> DataSplits:
    """MNIST or Fashion-MNIST from the four IDX gz files in ``root`` (downloaded first if asked)."""
    root = Path(root)
    if download:
        fetch_files(name, root, base_url=base_url, checksums=checksums)
    if not root.is_dir():
        raise ValueError(f"data root {root} does not exist; {IDX_LAYOUT} (or pass download=True).")
    stats = {"fashion_mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}[name]
    splits = []
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 2051)
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 2049)
        if len(images) != len(labels):
            raise ValueError(f"{root}: {split} has {len(images)} images but {len(labels)} labels.")
        splits.append(
            ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)), 10, (stats[0],), (stats[1],), f"{name}/{split}")
        )
    classes = FASHION_MNIST_CLASSES if name == "fashion_mnist" else [str(i) for i in range(10)]
    return DataSplits(splits[0], splits[1], Augmentation(crop_padding=2, flip=name == "fashion_mnist"), classes)


CIFAR_LAYOUT = {
    10: ("cifar-10-batches-py", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"], ["test_batch"], b"labels"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
CIFAR_STATS = {10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), 100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


def load_cifar(root: PathLike, num_classes: int = 100) -> DataSplits:
    """CIFAR-10/100 in the standard python pickle layout (``root/cifar-100-python/{train,test}``)."""
    if num_classes not in CIFAR_LAYOUT:
        raise ValueError(f"CIFAR has 10 or 100 classes; got num_classes={num_classes}.")
    folder, train_files, test_files, label_key = CIFAR_LAYOUT[num_classes]
    base = Path(root) / folder if (Path(root) / folder).is_dir() else Path(root)
    layout = f"expected {Path(root) / folder}/ holding {', '.join(train_files + test_files)} (the python version of CIFAR-{num_classes})"

    def read(files: list[str], split: str) -> ImageDataset:
        images, labels = [], []
        for name in files:
            path = base / name
            if not path.is_file():
                raise ValueError(f"missing file {path}; {layout}.")
            try:
                with open(path, "rb") as fh:
                    entry = pickle.load(fh, encoding="bytes")
                images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(entry[label_key], dtype=np.int64))
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as exc:
                raise ValueError(f"{path} is not a CIFAR-{num_classes} pickle batch ({exc!r}); {layout}.") from exc
        mean, std = CIFAR_STATS[num_classes]
        return ImageDataset(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)), num_classes, mean, std, f"cifar{num_classes}/{split}")

    return DataSplits(read(train_files, "train"), read(test_files, "test"), Augmentation(crop_padding=4, flip=True))


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_image_folder(root: PathLike, image_size: int = 64, splits: tuple[str, str] = ("train", "val")) -> DataSplits:
    """``root/<split>/<class>/<image>`` decoded once and kept as uint8 ``image_size`` squares: the short
    side resized to ``image_size``, then the centre cropped (torchvision's Resize + CenterCrop; the
    aspect ratio is kept)."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("the image-folder reader needs Pillow: pip install pillow") from exc
    root = Path(root)
    layout = f"expected {root}/{splits[0]}/<class>/<image> and {root}/{splits[1]}/<class>/<image>"
    train_dir = root / splits[0]
    if not train_dir.is_dir():
        raise ValueError(f"missing directory {train_dir}; {layout}.")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{train_dir} has no class directories; {layout}.")

    def read(split: str) -> ImageDataset:
        images, labels = [], []
        for label, cls in enumerate(classes):
            folder = root / split / cls
            if not folder.is_dir():
                raise ValueError(f"missing directory {folder}; {layout} with the same classes in both.")
            for path in sorted(folder.iterdir()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    img = Image.open(path).convert("RGB")
                    side = min(img.size)  # the central square, resized once
                    box = ((img.size[0] - side) / 2, (img.size[1] - side) / 2, (img.size[0] + side) / 2, (img.size[1] + side) / 2)
                    img = img.resize((image_size, image_size), Image.BILINEAR, box=box)
                except OSError as exc:
                    raise ValueError(f"cannot decode image {path}: {exc}.") from exc
                images.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
                labels.append(label)
        if not images:
            raise ValueError(f"no images under {root / split}; {layout}.")
        data = torch.from_numpy(np.stack(images))
        mean = tuple(float(m) for m in data.float().mean(dim=(0, 2, 3)) / 255)
        std = tuple(float(s) for s in data.float().std(dim=(0, 2, 3)) / 255)
        return ImageDataset(data, torch.tensor(labels), len(classes), mean, std, f"{root.name}/{split}")

    train = read(splits[0])  # the evaluation split is normalised with the training images' statistics
    return DataSplits(train, read(splits[1]).normalised_as(train), Augmentation(crop_padding=image_size // 8, flip=True), classes)
