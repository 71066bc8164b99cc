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
        return self.take(index)

    def sample(self, count: int = 2) -> torch.Tensor:
        """The first ``count`` images as a float batch (shape probes, input examples)."""
        return self.images[:count].float()

    def take(self, index: torch.Tensor, name: Optional[str] = None) -> "ImageDataset":
        """The samples at ``index``, with this dataset's normalisation statistics."""
        return ImageDataset(self.images[index], self.labels[index], self.num_classes, self.mean, self.std, name or self.name)

    def normalised_as(self, other: "ImageDataset") -> "ImageDataset":
        """This dataset with ``other``'s mean and std (evaluation splits use the training statistics)."""
        return ImageDataset(self.images, self.labels, self.num_classes, other.mean, other.std, self.name)


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """A boolean mask of the held-out samples: ``round(fraction * n_c)`` of every class ``c``, chosen
    by ``seed`` alone (the same samples for any training seed); every class keeps at least one
    sample outside it."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {fraction}.")
    held = torch.zeros(len(labels), dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        count = min(int(round(fraction * len(members))), len(members) - 1)
        held[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    return held


@dataclass
class DataSplits:
    """The splits of one dataset, with its train-time augmentation: ``train`` (what a model learns
    from), ``val`` (held out from the training data: what model selection uses; None until
    ``hold_out``) and ``test`` (the dataset's own test split, scored once at the end)."""

    train: ImageDataset
    test: ImageDataset
    augmentation: Augmentation = field(default_factory=Augmentation)
    classes: Optional[list[str]] = None
    val: Optional[ImageDataset] = None

    def hold_out(self, fraction: float = 0.1, seed: int = 0) -> "DataSplits":
        """These splits with ``val`` held out of ``train``: a stratified ``fraction`` of every class,
        chosen by ``seed``. ``fraction=0`` holds nothing out: ``val`` is then the test split (selection
        on the test split, as papers report; its figures are optimistic)."""
        if fraction == 0:
            return DataSplits(self.train, self.test, self.augmentation, self.classes, self.test)
        held = stratified_holdout(self.train.labels, fraction, seed)
        base = self.train.name.rsplit("/", 1)[0]
        train = self.train.take(torch.nonzero(~held).flatten(), f"{base}/train")
        val = self.train.take(torch.nonzero(held).flatten(), f"{base}/val")
        return DataSplits(train, self.test, self.augmentation, self.classes, val)

    @property
    def selection(self) -> ImageDataset:
        """The split that selects (per-epoch accuracy, early stopping): ``val``, else ``test``."""
        return self.val if self.val is not None else self.test

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.in_channels
