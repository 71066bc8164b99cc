"""Batches from an in-memory dataset, augmented and normalised on the batch's device.

The uint8 images move to the device once; each batch is gathered by index, randomly cropped
(with zero padding) and flipped per sample with tensor ops, then normalised: no per-image Python,
so on a GPU the augmentation runs on the GPU.
"""
from __future__ import annotations

from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F

from .datasets import Augmentation, ImageDataset


def random_crop_flip(images: torch.Tensor, aug: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (after zero padding) and horizontal flip of a (B, C, H, W) batch."""
    b, _, h, w = images.shape
    device = images.device
    if aug.crop_padding > 0:
        p = aug.crop_padding
        padded = F.pad(images, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=device)
        dx = torch.randint(0, 2 * p + 1, (b, 1), generator=generator, device=device)
        rows = (dy + torch.arange(h, device=device)).view(b, 1, h, 1).expand(b, images.shape[1], h, w + 2 * p)
        padded = padded.gather(2, rows)
        cols = (dx + torch.arange(w, device=device)).view(b, 1, 1, w).expand(b, images.shape[1], h, w)
        images = padded.gather(3, cols)
    if aug.flip:
        flip = torch.rand(b, generator=generator, device=device) < 0.5
        images = torch.where(flip.view(b, 1, 1, 1), images.flip(3), images)
    return images


def normalise(images: torch.Tensor, mean: torch.Tensor, inv_std: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float ``(x - mean) * inv_std`` (``mean``/``inv_std`` in 0-255 units, (1, C, 1, 1))."""
    x = (images.float() - mean) * inv_std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


class EpochSampler:
    """Which samples a rank reads each epoch: ``train=True``: a permutation seeded by (seed, epoch), shared out
    evenly across ``world_size`` ranks, the last partial batch dropped; else every ``world_size``-th sample in
    order from ``rank``. ``set_epoch`` picks the epoch. Subclasses gather the batches (``__iter__``)."""

    def __init__(self, count: int, batch_size: int, *, train: bool, device: torch.device, seed: int, rank: int,
                 world_size: int, name: str, what: str = "samples") -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
        self.count, self.batch_size, self.train, self.device = count, batch_size, train, device
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.samples_per_rank = count // world_size if train else len(range(rank, count, world_size))
        if train and self.samples_per_rank < batch_size:
            raise ValueError(
                f"{name}: {self.samples_per_rank} training {what} per worker is fewer than batch_size={batch_size}; "
                "lower train.batch_size or use fewer workers."
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.train:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def _indices(self) -> torch.Tensor:
        if not self.train:
            return torch.arange(self.rank, self.count, self.world_size, device=self.device)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.count, generator=g)[: self.samples_per_rank * self.world_size]
        return perm[self.rank :: self.world_size].to(self.device)


class BatchLoader(EpochSampler):
    """Iterate (x, y) batches over a dataset shard. ``set_epoch`` reshuffles deterministically.

    ``rank``/``world_size`` shard each epoch's permutation evenly (for DDP); ``train=True`` shuffles,
    augments and drops the last partial batch.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        train: bool,
        augmentation: Optional[Augmentation] = None,
        device: Union[str, torch.device] = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        super().__init__(len(dataset), batch_size, train=train, device=torch.device(device), seed=seed, rank=rank,
                         world_size=world_size, name=dataset.name)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(dataset.mean, device=self.device, dtype=torch.float32).view(shape) * 255
        self.inv_std = 1.0 / (torch.tensor(dataset.std, device=self.device, dtype=torch.float32).view(shape) * 255)
        self.augmentation = augmentation if train else None
        self.channels_last = channels_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self._indices()
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = index[start : start + self.batch_size]
            images = self.images[batch]
            if self.augmentation is not None:
                images = random_crop_flip(images, self.augmentation, gen)
            yield normalise(images, self.mean, self.inv_std, self.channels_last), self.labels[batch]
