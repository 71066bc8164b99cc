"""Streamed data for trials (``data=parquet`` / ``data=imagenet`` with ``data.in_memory=false``).

Ray Data reads the Parquet shards of ``python -m orchestrator.prepare`` (a local folder or a bucket),
and CPU tasks decode and augment them (``bkd_core.data.parquet.decode_crop``: RandomResizedCrop + flip
for training, resize + centre crop for validation) into uint8 batches; the trial turns them into
normalised floats on its own device. No process holds more than a few blocks of the dataset.

Where the tasks run: on any node with a free CPU (CPU-only nodes included). A search runs at most as
many trials at once as leave ``data.cpus_per_trial`` CPUs free per running trial
(``orchestrator.worker.runtime.concurrent_trials``), so trials never hold every CPU while their data waits.
(Pinning the tasks into each trial's placement group was tried: Ray Data 2.60 then ran an 18-image
epoch in 25-30 s instead of 1.5-5 s.)

One-worker trials iterate their dataset in the trial process; a multi-worker trial hands the
datasets to its TorchTrainer, and each Ray Train worker reads a disjoint, equal share of every epoch
(``ray.train.get_dataset_shard``).
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import ray
import ray.data
import ray.train
import torch
from ray.data.collate_fn import DefaultCollateFn

from bkd_core.data import IMAGENET_MEAN, IMAGENET_STD
from bkd_core.data.loader import normalise
from bkd_core.data.parquet import decode_or_warn, skip_budget, too_many_skipped
from orchestrator.config.schema import DataConfig, ParquetData
from orchestrator.data.datasets import is_streamed

DECODE_BATCH = 128  # images per decode task: fewer task starts per epoch; 19 MB blocks at 224 px
PREFETCH = 2  # batches the iterator prepares ahead of the trial


def data_cpus(data_cfg: DataConfig) -> float:
    """The CPUs a trial reserves for its data tasks (0 for in-memory data)."""
    return float(data_cfg.cpus_per_trial or 0.0) if is_streamed(data_cfg) else 0.0


class Decode:
    """A batch of encoded images -> uint8 [B, 3, S, S], int64 labels and ``bad`` (1 for an image that
    does not decode: zeros in its place, one warning naming it; the trial drops and counts it). For
    training the batch's rows come out in a random order. A Ray Data map function."""

    def __init__(self, image_size: int, train: bool) -> None:
        self.image_size, self.train = image_size, train
        self.rng = random.Random()  # fresh crops every epoch (tasks run again per epoch)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        count = len(batch["image"])
        order = np.arange(count)
        if self.train:
            self.rng.shuffle(order)  # type: ignore[arg-type]
        images = np.zeros((count, 3, self.image_size, self.image_size), dtype=np.uint8)
        bad = np.zeros(count, dtype=np.uint8)
        for out, i in enumerate(order):
            name = lambda: str(batch["path"][i]) if "path" in batch else f"an image of label {batch['label'][i]}"  # noqa: E731
            image = decode_or_warn(batch["image"][i], self.image_size, self.train, self.rng, name)
            if image is None:
                bad[out] = 1
            else:
                images[out] = image.numpy()
        return {"image": images, "label": batch["label"][order].astype(np.int64), "bad": bad}


def make_dataset(data_cfg: ParquetData, folders: dict[str, str], split: str, seed: int = 0) -> ray.data.Dataset:
    """The decoded images of one split (train, val or test; ``folders``: ``Job.dataset.folders``)
    as a Ray Dataset (lazy: it runs when iterated)."""
    import pyarrow.fs as pafs

    root = str(data_cfg.root).rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(root if "://" in root else f"file://{root}")
    train = split == "train"
    # Ray 2.60's V2 reader starts actors that read the Parquet footers; each asks for a CPU, and on a
    # cluster whose CPUs the trials hold they wait about 10 s per epoch. The V1 reader reads them in its tasks.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    columns = ["image", "label"] + (["path"] if has_source_paths(filesystem, f"{path}/{folders[split]}") else [])
    # Training order: a new file order every epoch (FileShuffleConfig reseeds per execution), then each decode
    # batch's rows permuted (prepare writes rows in random order, so every block mixes the classes). No rows
    # wait in a shuffle buffer in the trial unless data.shuffle_buffer asks for one. (randomize_block_order
    # would be an all-to-all step: the whole split read into the object store before the first decode.)
    dataset = ray.data.read_parquet(f"{path}/{folders[split]}", filesystem=filesystem,
                                    shuffle=ray.data.FileShuffleConfig(seed=seed) if train else None).select_columns(columns)
    if train and data_cfg.train_size:
        dataset = dataset.limit(int(data_cfg.train_size))
    return dataset.map_batches(Decode(int(data_cfg.image_size), train), batch_size=DECODE_BATCH, num_cpus=1)


def has_source_paths(filesystem: Any, folder: str) -> bool:
    """Whether the shards name each image's source file (prepare writes a ``path`` column)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    found = sorted(f.path for f in filesystem.get_file_info(pafs.FileSelector(folder)) if f.path.endswith(".parquet"))
    return bool(found) and "path" in pq.read_schema(filesystem.open_input_file(found[0])).names


def trainer_datasets(data_cfg: ParquetData, folders: dict[str, str], seed: int) -> dict[str, Any]:
    """A multi-worker TorchTrainer's ``datasets`` and ``dataset_config``: each worker gets an equal,
    disjoint share of "train" every epoch, and all of "val" and "test" (every rank evaluates the whole split)."""
    datasets = {split: make_dataset(data_cfg, folders, split, seed if split == "train" else 0) for split in ("train", "val", "test")}
    return {"datasets": datasets, "dataset_config": ray.train.DataConfig(datasets_to_split=["train"])}


class DropUndecodable(DefaultCollateFn):
    """Ray Data's own collation, first leaving out (and counting) the rows ``Decode`` could not decode:
    on the host, in Ray's prefetch thread, so the trial never reads a flag back from its device."""

    def __init__(self, combine_chunks: bool) -> None:
        super().__init__(combine_chunks=combine_chunks)
        self.skipped = 0
        self._lock = threading.Lock()  # Ray collates in a pool of threads

    def __call__(self, batch: Any) -> Any:
        import pyarrow.compute as pc

        bad = batch["bad"]
        if pc.any(pc.not_equal(bad, 0)).as_py():
            keep = pc.equal(bad, 0)
            with self._lock:
                self.skipped += len(bad) - pc.sum(keep.cast("int64")).as_py()
            batch = batch.filter(keep)
        return super().__call__(batch.drop_columns(["bad"]))


@dataclass
class StreamLoader:
    """``BatchLoader``'s interface over a Ray Data stream: ``len``, ``set_epoch``, and (x, y) batches,
    normalised (ImageNet statistics) and in ``channels_last`` on ``device``. ``source`` is a Dataset
    or a worker's DataIterator; ``rows`` the rows it yields per epoch."""

    source: Any
    rows: int
    batch_size: int
    train: bool
    device: torch.device
    shuffle_buffer: int = 0
    channels_last: bool = False
    seed: int = 0
    epoch: int = 0
    skipped: int = 0  # images of the last epoch that did not decode

    def __post_init__(self) -> None:
        shape = (1, 3, 1, 1)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape) * 255
        self.inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=self.device).view(shape) * 255)
        if self.train and self.rows < self.batch_size:
            raise ValueError(f"{self.rows} training images per worker is fewer than batch_size={self.batch_size}; "
                             "lower train.batch_size or use fewer workers.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.rows // self.batch_size if self.train else -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.raw_batches():
            yield normalise(images, self.mean, self.inv_std, self.channels_last), labels

    def raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's uint8 [B, 3, S, S] images and labels on ``device``, before normalisation."""
        shuffle = self.shuffle_buffer if self.train else 0
        dropped = DropUndecodable(combine_chunks=self.device.type == "cpu")  # as Ray's default collation chooses
        batches = self.source.iter_torch_batches(
            batch_size=self.batch_size, drop_last=self.train, device=self.device, collate_fn=dropped, prefetch_batches=PREFETCH,
            local_shuffle_buffer_size=shuffle or None, local_shuffle_seed=self.seed * 1_000_003 + self.epoch if shuffle else None)
        for count, batch in enumerate(batches):
            if self.train and count >= len(self):  # equal step counts on every DDP rank
                break
            self.check(dropped.skipped)
            if batch["label"].shape[0]:
                yield batch["image"], batch["label"]
        self.check(dropped.skipped)  # the epoch's last batches included

    def check(self, skipped: int) -> None:
        """Record the images of this epoch that did not decode (left out of their batches); too many fail it."""
        self.skipped = skipped
        if skipped > skip_budget(self.rows):
            raise too_many_skipped(skipped, self.rows, "this trial's shards", "named in the warnings above")


def stream_loaders(data_cfg: ParquetData, counts: dict[str, int], folders: dict[str, str], batch_size: int,
                   device: torch.device, seed: int, channels_last: bool, world: int = 1,
                   sources: Optional[dict[str, Any]] = None) -> tuple[StreamLoader, StreamLoader, StreamLoader]:
    """Training, selection (val) and test loaders of a trial (``counts``: rows per split after
    data.train_size; ``folders``: the shard folder of each split, ``Job.dataset``'s); without ``sources``
    (a one-worker trial) the datasets are made here, in the trial."""
    sources = sources or {split: make_dataset(data_cfg, folders, split, seed if split == "train" else 0)
                          for split in ("train", "val", "test")}
    buffer = int(data_cfg.shuffle_buffer or 0)
    train = StreamLoader(sources["train"], counts["train"] // world, batch_size, True, device, buffer, channels_last, seed)
    val, test = (StreamLoader(sources[split], counts[split], max(batch_size, 256), False, device, 0, channels_last)
                 for split in ("val", "test"))
    return train, val, test
