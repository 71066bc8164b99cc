"""Image datasets held in memory as uint8 tensors (N, C, H, W) plus int64 labels."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation applied on tensors in batches: random crop with padding, h-flip."""

    crop_padding: int = 0
    flip: bool = False


@dataclass
class ImageDataset:
    """``images``: uint8 (N, C, H, W); ``labels``: int64 (N,); per-channel ``mean``/``std`` in [0, 1] units."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be a uint8 (N, C, H, W) tensor; got {self.images.dtype} {tuple(self.images.shape)}.")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but labels of shape {tuple(self.labels.shape)}.")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[2:])

    def subset(self, count: int, seed: int = 0) -> "ImageDataset":
        """A random subset of ``count`` samples (all when ``count`` >= len)."""
        if count >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return ImageDataset(self.images[index], self.labels[index], self.num_classes, self.mean, self.std, self.name)


@dataclass
class DataSplits:
    """A train and a test split of one dataset, with its train-time augmentation."""

    train: ImageDataset
    test: ImageDataset
    augmentation: Augmentation = field(default_factory=Augmentation)
    classes: Optional[list[str]] = None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.in_channels
