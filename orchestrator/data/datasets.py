"""Datasets of a config: loaded into memory with the val split held out, or described from shard metadata."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from bkd_core import data as bkd_data
from orchestrator.config.checks import ConfigError
from orchestrator.config.schema import DataConfig, ImageFolderData, LMData, ParquetData, TextData
from orchestrator.data.lm import load_lm
from orchestrator.data.text import load_text

DEFAULT_VAL_FRACTION = 0.1


def val_fraction(data_cfg: DataConfig) -> float:
    """The share of the training data held out for selection: ``data.val_fraction``; null: 0.1, or for
    Parquet shards the split their ``prepare`` held out."""
    if data_cfg.val_fraction is not None:
        return float(data_cfg.val_fraction)
    if isinstance(data_cfg, ParquetData):
        return bkd_data.ShardLayout.of(data_cfg.root).val_fraction
    return DEFAULT_VAL_FRACTION


def selects_on_test(data_cfg: DataConfig) -> bool:
    """``data.val_fraction=0``: nothing held out, the search selects on the test split."""
    return val_fraction(data_cfg) == 0


def load_dataset(data_cfg: DataConfig) -> bkd_data.DataSplits:
    """The dataset a config names: ``val`` held out of the training data (``data.val_fraction``,
    ``data.split_seed``; Parquet shards bring their own), then ``train_size`` applied to what is left
    (used by validation and workers)."""
    if isinstance(data_cfg, LMData):
        splits = load_lm(data_cfg)
    elif isinstance(data_cfg, TextData):
        splits = load_text(data_cfg)
    else:
        extra: dict[str, Any] = {"image_size": data_cfg.image_size} if isinstance(data_cfg, (ImageFolderData, ParquetData)) else {}
        if isinstance(data_cfg, ParquetData):  # the shards hold val apart: decode no more training images than used
            extra["train_size"] = data_cfg.train_size
        splits = bkd_data.load(data_cfg.name, data_cfg.root, **extra)
    if isinstance(data_cfg, ParquetData):
        if selects_on_test(data_cfg):
            splits.val = None
    else:
        splits = splits.hold_out(val_fraction(data_cfg), data_cfg.split_seed)
    if data_cfg.train_size:
        splits.train = splits.train.subset(data_cfg.train_size)
    if isinstance(data_cfg, LMData) and data_cfg.pack:
        splits.train.pack = data_cfg.max_length
    return splits


def teacher_view(splits: bkd_data.DataSplits) -> bkd_data.DataSplits:
    """The splits as the teacher reads them: a ULD dataset's partner (the teacher's own token ids of the same
    examples, held out alike); any other dataset as it is."""
    if getattr(splits.train, "partner", None) is None:
        return splits
    partner = lambda d: d.partner if d is not None else None  # noqa: E731
    return bkd_data.DataSplits(partner(splits.train), partner(splits.test), splits.augmentation, splits.classes, partner(splits.val))


def shard_folders(data_cfg: ParquetData) -> dict[str, str]:
    """The shard folder of each split a streamed trial reads: train, val (the test folder when the
    search selects on test) and test; a ConfigError when data.val_fraction does not match the shards."""
    layout = bkd_data.ShardLayout.of(data_cfg.root)
    wanted = data_cfg.val_fraction
    if wanted is not None and float(wanted) > 0 and abs(float(wanted) - layout.val_fraction) > 1e-9:
        had = (f"were prepared with val_fraction={layout.val_fraction:g}" if layout.val else
               "hold no validation split (they were written before prepare held one out, or with val_fraction=0)")
        raise ConfigError("data.val_fraction", f"{wanted} does not match the shards in {data_cfg.root}, which {had}. "
                          "Drop data.val_fraction to use the shards' split, set data.val_fraction=0 to select on the test "
                          f"split, or write the shards again: python -m orchestrator.prepare source=SRC output={data_cfg.root} "
                          f"val_fraction={wanted}.")
    val = layout.val if layout.val and not (wanted is not None and float(wanted) == 0) else layout.test
    return {"train": layout.train, "val": val, "test": layout.test}


def is_streamed(data_cfg: DataConfig) -> bool:
    """Parquet shards streamed by Ray Data (``data.in_memory=false``), not decoded into RAM."""
    return isinstance(data_cfg, ParquetData) and not data_cfg.in_memory


@dataclass(frozen=True)
class DataShape:
    """What the driver needs to know of a dataset: classes, channels, sizes of the splits."""

    num_classes: int
    in_channels: int
    train: int  # training images (after the hold-out and data.train_size)
    val: int  # images of the split that selects (the test split's when data.val_fraction=0)
    test: int
    image_shape: list[int]  # [C, H, W] of a model input; text: [3, max_length] (ids, mask, segments)
    folders: Optional[dict[str, str]] = None  # streamed shards: the folder of each split
    classes: Optional[list[str]] = None  # class names in class-id order, where the data names them
    majority: Optional[dict[str, tuple[int, int]]] = None  # "val", "test": (the largest class's count, examples)
    token_level: bool = False  # a causal LM's data: scored per target token (val_loss), not per example


def majority_of(labels: torch.Tensor) -> tuple[int, int]:
    """(examples of the largest class, examples): what always answering that class gets right."""
    return (int(torch.bincount(labels.long()).max()) if labels.numel() else 0), int(labels.numel())


def describe_dataset(d: DataConfig) -> DataShape:
    """The dataset's shape: streamed shards from their metadata alone (nothing decoded here), other
    datasets by loading them."""
    try:
        if is_streamed(d):
            folders = shard_folders(d)
            train, val, test = (bkd_data.ParquetImages(d.root, folders[split]) for split in ("train", "val", "test"))
            rows = min(len(train), d.train_size) if d.train_size else len(train)
            size = d.image_size
            return DataShape(len(train.classes), 3, rows, len(val), len(test), [3, size, size], folders)
        if isinstance(d, ParquetData):
            shard_folders(d)  # data.val_fraction against the shards
        splits = load_dataset(d)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError("data.root", f"{exc}") from None
    except OSError as exc:  # a bucket that cannot be reached or read
        raise ConfigError("data.root", f"cannot read {d.root}: {exc}. Check the URI and the credentials "
                          "(AWS_* / GOOGLE_APPLICATION_CREDENTIALS, AWS_ENDPOINT_URL for an S3-compatible server).") from None
    if isinstance(d, LMData):  # no classes: a language model's chance is not a majority class
        return DataShape(splits.num_classes, splits.in_channels, len(splits.train), len(splits.selection), len(splits.test),
                         [splits.in_channels, d.max_length], token_level=True)
    shape = [3, d.max_length] if isinstance(d, TextData) else list(splits.test.images.shape[1:])
    return DataShape(splits.num_classes, splits.in_channels, len(splits.train), len(splits.selection), len(splits.test), shape,
                     classes=[str(c) for c in splits.classes] if splits.classes else None,
                     majority={"val": majority_of(splits.selection.labels), "test": majority_of(splits.test.labels)})


def is_text_shape(shape: list[int]) -> bool:
    """A model input of packed token ids (``[3, L]``; a causal LM's ``[2, L]``, ULD's ``[5, L]``), not an image
    (``[C, H, W]``)."""
    return len(shape) == 2


def example_batch(shape: list[int], count: int = 2) -> torch.Tensor:
    """A model input for shape probes and input examples: zero images, or texts of ``L`` tokens (ids 1..4; an LM's
    batch of ``min(L, 16)`` tokens, its targets every token after the first)."""
    if is_text_shape(shape):
        length = shape[1] if shape[0] == 3 else min(shape[1], 16)
        ids = (torch.arange(length) % 4 + 1).expand(count, length)
        rows = {3: [ids, torch.ones_like(ids), torch.zeros_like(ids)], 2: [ids, torch.ones_like(ids)],
                5: [ids, torch.ones_like(ids), ids, torch.ones_like(ids), torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)]}
        return torch.stack(rows[shape[0]], dim=1).long()
    return torch.zeros(count, *shape)


def image_of(shape: list[int]) -> tuple[int, int] | None:
    """(H, W) of an image input, None for text (``bkd_core.forms`` tells block outputs apart by it)."""
    return None if is_text_shape(shape) else (int(shape[-2]), int(shape[-1]))


def dataset_spec(data_cfg: Any, rows: Mapping[str, int]) -> dict[str, str]:
    """Name, digest and source of a run's dataset (``data_cfg``: the typed ``data`` section)."""
    name = str(data_cfg.name) + (f"[:{data_cfg.train_size}]" if data_cfg.train_size else "")
    spec = {"data": data_cfg.name, "root": data_cfg.root or getattr(data_cfg, "hub", None), "train_size": data_cfg.train_size,
            "val_fraction": data_cfg.val_fraction, "split_seed": getattr(data_cfg, "split_seed", None), **rows}
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    hub = getattr(data_cfg, "hub", None)
    source = data_cfg.root or (f"hf://datasets/{hub}" if hub else f"bkd_core.data:{data_cfg.name}")
    return {"name": name, "digest": digest, "source": str(source)}
