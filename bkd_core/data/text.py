"""Text classification data: texts tokenized once into one tensor, and a loader that pads each batch to its
own longest text (not to ``max_length``).

    dataset = tokenize(texts, labels, tokenizer, max_length=128, num_classes=2)   # any Hugging Face fast tokenizer
    loader = TextBatchLoader(dataset, 32, train=True)
    for x, y in loader: ...                        # x: (B, 3, L_batch) as bkd_core.models.text.pack gives it

A ``TextDataset`` holds what the training loop needs of a dataset (``labels``, ``num_classes``, ``take``), so
``DataSplits`` holds its splits and holds val out as for images; selecting texts shares the token store.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .loader import EpochSampler


@dataclass
class TextDataset:
    """``store``: int32 (N, 3, L) token ids, attention mask and segment ids, padded on the right; ``rows``: the texts of
    ``store`` this dataset holds, in order (None: all of them); ``labels``: int64, one per text held. Selecting texts
    (``take``, the val hold-out) indexes ``rows`` alone: the store is shared, never copied (a memory-mapped cache
    keeps one copy per node)."""

    store: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = "text"
    rows: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.store.dim() != 3 or self.store.shape[1] != 3:
            raise ValueError(f"{self.name}: tokens must be (N, 3, L) ids, mask and segments; got {tuple(self.store.shape)}.")
        if self.labels.shape != (len(self),):
            raise ValueError(f"{self.name}: {len(self)} texts but labels of shape {tuple(self.labels.shape)}.")

    def __len__(self) -> int:
        return self.store.shape[0] if self.rows is None else len(self.rows)

    @property
    def tokens(self) -> torch.Tensor:
        """The texts held, (N, 3, L), trimmed to their longest (the store itself when it holds every text)."""
        if self.rows is None:
            return self.store
        return self.batch(torch.arange(len(self)))[0].to(self.store.dtype)

    @property
    def in_channels(self) -> int:
        """Rows of a packed batch: token ids, attention mask, segment ids."""
        return 3

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts at ``index`` (positions in this dataset) as (x (B, 3, L) int64 trimmed to their longest, labels)."""
        where = index if self.rows is None else self.rows.to(index.device)[index]
        tokens = self.store[where]
        longest = max(1, int(tokens[:, 1].sum(1).max())) if len(tokens) else 1  # right padding: the longest ends here
        return tokens[:, :, :longest].long(), self.labels.to(index.device)[index]

    def sample(self, count: int = 2) -> torch.Tensor:
        """The first ``count`` texts as a packed model input (shape probes, input examples)."""
        return self.batch(torch.arange(min(count, len(self))))[0]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens of every text (its attention mask's sum)."""
        masks = self.store[:, 1]
        return (masks if self.rows is None else masks[self.rows]).sum(1)

    def take(self, index: torch.Tensor, name: Optional[str] = None) -> "TextDataset":
        """The texts at ``index``, over the same store."""
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index if self.rows is None else self.rows[index]
        return TextDataset(self.store, self.labels[index], self.num_classes, name or self.name, rows)

    def to(self, device: Union[str, torch.device]) -> "TextDataset":
        """The arrays on ``device`` (a loader's copy; on the CPU the same arrays)."""
        rows = self.rows.to(device) if self.rows is not None else None
        return TextDataset(self.store.to(device), self.labels.to(device), self.num_classes, self.name, rows)

    def subset(self, count: int, seed: int = 0) -> "TextDataset":
        """``count`` texts chosen by ``seed`` (all of them when there are fewer)."""
        if count >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        return self.take(torch.randperm(len(self), generator=g)[:count].sort().values)


def tokenize(texts: Sequence[str], labels: Sequence[int], tokenizer: Any, max_length: int, num_classes: int,
             pairs: Optional[Sequence[str]] = None, name: str = "text", batch: int = 1024) -> TextDataset:
    """``texts`` (and the second texts of pair tasks) through a Hugging Face tokenizer, in batches, truncated to
    ``max_length`` tokens: one (N, 3, L) tensor padded to the longest."""
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError(f"the tokenizer pads on the {tokenizer.padding_side}; batches are cut after their longest text, "
                         "so set tokenizer.padding_side = 'right'.")
    rows: list[torch.Tensor] = []
    for start in range(0, len(texts), batch):
        args = [list(texts[start:start + batch])] + ([list(pairs[start:start + batch])] if pairs is not None else [])
        enc = tokenizer(*args, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        types = enc.get("token_type_ids", torch.zeros_like(enc["input_ids"]))
        rows.append(torch.stack([enc["input_ids"], enc["attention_mask"], types], dim=1).to(torch.int32))
    tokens = torch.cat(rows) if rows else torch.zeros(0, 3, max_length, dtype=torch.int32)
    longest = max(1, int(tokens[:, 1].sum(1).max())) if len(tokens) else 1
    return TextDataset(tokens[:, :, :longest].contiguous(), torch.as_tensor(list(labels), dtype=torch.long), num_classes, name)


class TextBatchLoader(EpochSampler):
    """(x, y) batches of a ``TextDataset``: x is (B, 3, L) int64 with L the batch's own longest text.
    ``set_epoch`` reshuffles deterministically; ``rank``/``world_size`` shard each epoch as ``BatchLoader`` does;
    ``train=True`` shuffles and drops the last partial batch."""

    def __init__(self, dataset: TextDataset, batch_size: int, *, train: bool, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, rank: int = 0, world_size: int = 1, **_: Any) -> None:
        super().__init__(len(dataset), batch_size, train=train, device=torch.device(device), seed=seed, rank=rank,
                         world_size=world_size, name=dataset.name, what="texts")
        self.dataset = dataset.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.dataset.batch(index[start:start + self.batch_size])
