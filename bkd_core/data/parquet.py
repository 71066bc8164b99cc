"""Images streamed from Parquet shards (``python -m orchestrator.prepare`` writes them): decoded per
sample with PIL, the JPEG decoded at reduced size when the crop allows it (``Image.draft``), cropped
and resized in one step, uint8 out. torch only; pyarrow is imported when a dataset is iterated.

    from torch.utils.data import DataLoader
    from bkd_core.data import ParquetImages

    train = ParquetImages("/data/imagenet-parquet", "train", image_size=224, train=True)
    loader = DataLoader(train, batch_size=256, num_workers=8)
    for epoch in range(epochs):
        train.set_epoch(epoch)            # a new file order and new crops each epoch
        for images, labels in loader:     # uint8 [B, 3, 224, 224], int64 [B]
            ...

A shard layout: ``root/<split>/*.parquet`` with columns ``image`` (encoded bytes) and ``label``
(int), ``root/classes.json`` and ``root/splits.json``; the splits are ``train``, ``val`` (held out of
the training images, for selection) and ``test`` (``ShardLayout`` reads which folder holds which). Each DataLoader worker of each DDP rank reads its own row groups
(piece ``i`` of the epoch's order goes to reader ``i mod (world_size x num_workers)``), so an epoch
yields every sample exactly once across all readers.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from .datasets import DataSplits

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the usual normalisation of natural RGB images (ImageNet's statistics)
IMAGENET_STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)  # RandomResizedCrop's area range and aspect range, as in the ImageNet recipes
RATIO = (3 / 4, 4 / 3)
VAL_RESIZE = 8 / 7  # val: resize the short side to image_size * 8/7 (256 for 224), then centre-crop


SPLITS_FILE = "splits.json"  # written by `python -m orchestrator.prepare`: how val was held out, rows per split


@dataclass(frozen=True)
class ShardLayout:
    """Which folder of a shard root holds each split. Shards written before held-out validation
    (no splits.json) have ``train/`` and ``val/``, the latter the test split, and no held-out val."""

    train: str
    val: Optional[str]
    test: str
    val_fraction: float
    split_seed: int

    @classmethod
    def of(cls, root: str) -> "ShardLayout":
        import pyarrow.fs as pafs

        root = str(root).rstrip("/")
        fs, base = pafs.FileSystem.from_uri(root if "://" in root else f"file://{os.path.abspath(root)}")
        try:
            with fs.open_input_stream(f"{base}/{SPLITS_FILE}") as src:
                info = json.loads(src.read().decode())
        except (FileNotFoundError, OSError):
            return cls("train", None, "val", 0.0, 0)
        held = float(info.get("val_fraction", 0.0))
        return cls("train", "val" if held > 0 else None, "test", held, int(info.get("split_seed", 0)))


def random_resized_box(width: int, height: int, rng: random.Random) -> tuple[float, float, float, float]:
    """A crop box (left, top, right, bottom) of RandomResizedCrop: area in SCALE, aspect in RATIO."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = math.sqrt(target * aspect), math.sqrt(target / aspect)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: the central square
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def center_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The box that 'resize the short side to size*8/7, centre-crop size' keeps, in original pixels."""
    side = min(width, height) * size / round(size * VAL_RESIZE)
    return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2


def decode_crop(data: bytes, size: int, train: bool, rng: random.Random) -> torch.Tensor:
    """Encoded image -> uint8 [3, size, size]: crop box chosen on the full image, the JPEG decoded
    at the smallest DCT scale that still gives the box at >= size pixels, then one resize."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    width, height = image.size
    box = random_resized_box(width, height, rng) if train else center_box(width, height, size)
    if image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 of the size when the crop allows
        need = (math.ceil(width * size / (box[2] - box[0])), math.ceil(height * size / (box[3] - box[1])))
        image.draft("RGB", need)
    # the draft decode rounds each side on its own: map the box into the decoded image's coordinates per axis
    sx, sy = image.size[0] / width, image.size[1] / height
    left, top = max(0.0, box[0] * sx), max(0.0, box[1] * sy)
    right, bottom = min(float(image.size[0]), box[2] * sx), min(float(image.size[1]), box[3] * sy)
    image = image.convert("RGB")
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, max(right, left + 1e-3), max(bottom, top + 1e-3)))
    if train and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_or_warn(data: bytes, size: int, train: bool, rng: random.Random, where: Callable[[], str]) -> Optional[torch.Tensor]:
    """``decode_crop``, or None with one warning naming the image (``where()``) when it does not decode."""
    try:
        return decode_crop(data, size, train, rng)
    except Exception as exc:  # PIL raises several types for corrupt data
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        print(f"[bkd] warning: skipped an image that does not decode ({where()}: {type(exc).__name__}: {text})", flush=True)
        return None


# What prepare writes per row group: the unit DDP ranks x DataLoader workers share. 128 rows keep 64 readers
# busy from ~8,000 images on, and a reader's window holds a few groups of at most ~9 MB (69-KB JPEGs).
ROWS_PER_GROUP = 128
MAX_SKIPPED = 0.01  # share of an epoch's images that may fail to decode before the epoch fails


class UndecodableImages(RuntimeError):
    """More than ``MAX_SKIPPED`` of an epoch's images could not be decoded: the shards are corrupt."""


def skip_budget(rows: int) -> int:
    """How many undecodable images an epoch of ``rows`` images tolerates (at least one)."""
    return max(1, int(MAX_SKIPPED * rows))


def too_many_skipped(skipped: int, rows: int, where: str, first: str) -> UndecodableImages:
    return UndecodableImages(
        f"{skipped} of {rows} images of this epoch could not be decoded (more than {MAX_SKIPPED:.0%}; first: {first}); "
        f"the shards in {where} look corrupt. Write them again with `python -m orchestrator.prepare` (it decodes every "
        "image once and lists the files it skips in skipped.txt).")


class ParquetImages(IterableDataset):
    """``(uint8 [3, S, S], label)`` from the shards of ``root/split``; ``root`` is a local folder or
    a URI pyarrow opens (``s3://bucket/prefix``, ``gs://...``). A row whose image does not decode is
    skipped with one warning naming its shard and row (``skipped`` counts them per epoch and reader);
    more than 1 % of a reader's epoch raises ``UndecodableImages``.

    Training order: a new row-group order every epoch (the same on every reader), then rows shuffled
    within windows of ``shuffle_buffer`` rows, capped at ``shuffle_bytes`` of encoded images per reader
    (memory stays flat whatever the data's size; ``prepare`` writes rows in random order, so each row
    group already mixes the classes)."""

    def __init__(self, root: str, split: str, image_size: int = 224, train: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, shuffle_bytes: int = 32 << 20, rank: Optional[int] = None,
                 world_size: Optional[int] = None) -> None:
        super().__init__()
        root = str(root).rstrip("/")
        self.root = root if "://" in root else os.path.abspath(root)
        self.split, self.image_size, self.train = split, int(image_size), train
        self.seed, self.shuffle_buffer = seed, shuffle_buffer if train else 0
        self.shuffle_bytes = int(shuffle_bytes)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._shards: Optional[list[str]] = None
        self._units: Optional[list[tuple[str, int]]] = None
        self.skipped, self.first_skip = 0, ""  # undecodable images of the last epoch (this reader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _filesystem(self) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        fs, base = pafs.FileSystem.from_uri(self.root if "://" in self.root else f"file://{self.root}")
        return fs, base

    @property
    def shards(self) -> list[str]:
        if self._shards is None:
            import pyarrow.fs as pafs

            fs, base = self._filesystem()
            found = fs.get_file_info(pafs.FileSelector(f"{base}/{self.split}", allow_not_found=True))
            self._shards = sorted(f.path for f in found if f.path.endswith(".parquet"))
            if not self._shards:
                raise FileNotFoundError(f"no Parquet shards in {self.root}/{self.split}; write them with "
                                        f"`python -m orchestrator.prepare source=IMAGE_FOLDER output={self.root}`.")
        return self._shards

    @property
    def classes(self) -> list[str]:
        fs, base = self._filesystem()
        with fs.open_input_stream(f"{base}/classes.json") as src:
            return json.loads(src.read().decode())

    def __len__(self) -> int:
        import pyarrow.parquet as pq

        fs, _ = self._filesystem()
        return sum(pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows for path in self.shards)

    def _reader(self) -> tuple[int, int]:
        """(index, count) of this reader among all DDP ranks x DataLoader workers."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + worker, world * workers

    def units(self) -> list[tuple[str, int]]:
        """(shard, row group): the pieces readers share (prepare writes row groups of 256 images)."""
        import pyarrow.parquet as pq

        if self._units is None:
            fs, _ = self._filesystem()
            self._units = [(path, group) for path in self.shards
                           for group in range(pq.ParquetFile(fs.open_input_file(path)).metadata.num_row_groups)]
        return self._units

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        import pyarrow.parquet as pq

        index, count = self._reader()
        order = list(self.units())
        if self.train:  # row-group order per epoch, the same on every reader, then shuffled windows of row groups
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 4099 + index)
        fs, _ = self._filesystem()
        mine = order[index::count]
        metas: dict[str, Any] = {}
        rows = self._rows_of(mine, metas, fs)  # this reader's epoch, from the shards' footers
        budget, where = skip_budget(rows), f"{self.root}/{self.split}"
        self.skipped, self.first_skip = 0, ""
        # Shuffle within windows of consecutive row groups (in the epoch's order): at least shuffle_buffer rows, or
        # fewer where they would hold more than shuffle_bytes of encoded images. The window stays in Arrow buffers;
        # each image becomes Python bytes only to be decoded as it leaves.
        for window_units in self._windows(mine, metas):
            window = []
            for path, group in window_units:
                # A reader per read: an open ParquetFile keeps its last row group's buffers alive.
                with fs.open_input_file(path) as handle:
                    table = pq.ParquetFile(handle, metadata=metas[path]).read_row_group(
                        group, columns=["image", "label"], use_threads=False)
                offset = sum(metas[path].row_group(g).num_rows for g in range(group))  # the group's first row
                window.append((table.column(0), table.column(1), path, offset))
            picks = [(w, r) for w, (_, labels, _, _) in enumerate(window) for r in range(len(labels))]
            if self.shuffle_buffer:
                rng.shuffle(picks)
            for w, r in picks:
                images, labels, path, offset = window[w]
                name = lambda: f"{path} row {offset + r}"  # noqa: E731  (formatted only for a warning)
                image = decode_or_warn(images[r].as_py(), self.image_size, self.train, rng, name)
                if image is not None:
                    yield image, int(labels[r].as_py())
                    continue
                self.skipped += 1
                self.first_skip = self.first_skip or name()
                if self.skipped > budget:
                    raise too_many_skipped(self.skipped, rows, where, self.first_skip)
            window = picks = images = labels = None  # release this window's buffers before the next is read

    def _windows(self, units: list[tuple[str, int]], metas: dict[str, Any]) -> Iterator[list[tuple[str, int]]]:
        """Consecutive runs of ``units`` that one shuffle window reads together (one unit each without shuffling)."""
        window: list[tuple[str, int]] = []
        rows = size = 0
        for unit in units:
            meta = metas[unit[0]].row_group(unit[1])
            if window and (not self.shuffle_buffer or rows >= self.shuffle_buffer
                           or size + meta.total_byte_size > self.shuffle_bytes):
                yield window
                window, rows, size = [], 0, 0
            window.append(unit)
            rows, size = rows + meta.num_rows, size + meta.total_byte_size
        if window:
            yield window

    def _rows_of(self, units: list[tuple[str, int]], metas: dict[str, Any], fs: Any) -> int:
        import pyarrow.parquet as pq

        for path, _ in units:
            if path not in metas:
                with fs.open_input_file(path) as handle:
                    metas[path] = pq.ParquetFile(handle).metadata
        return sum(metas[path].row_group(group).num_rows for path, group in units)


def load_parquet_in_memory(root: str, image_size: int, train_size: Optional[int] = None) -> "DataSplits":
    """The shards decoded once into RAM (``data.in_memory=true``: data that fits): every image
    resized and centre-cropped to ``image_size`` (the val transform), trained with the in-memory
    path's device-side crop (padding image_size/8) and flip. ``val`` is the shards' held-out split
    (None for shards without one)."""
    from .datasets import Augmentation, DataSplits, ImageDataset

    def read(split: str, limit: Optional[int]) -> ImageDataset:
        source = ParquetImages(root, split, image_size, train=False)
        images, labels = [], []
        for image, label in source:
            images.append(image)
            labels.append(label)
            if limit and len(images) >= limit:
                break
        return ImageDataset(torch.stack(images), torch.tensor(labels), len(source.classes), IMAGENET_MEAN, IMAGENET_STD,
                            f"{os.path.basename(source.root)}/{split}")

    classes = ParquetImages(root, "train").classes
    layout = ShardLayout.of(root)
    return DataSplits(read(layout.train, train_size), read(layout.test, None), Augmentation(crop_padding=image_size // 8, flip=True),
                      classes, read(layout.val, None) if layout.val else None)
