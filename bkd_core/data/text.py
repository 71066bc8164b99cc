"""Text classification data: texts tokenized once into one tensor, and a loader that pads each batch to its
own longest text (not to ``max_length``).

    dataset = tokenize(texts, labels, tokenizer, max_length=128, num_classes=2)   # any Hugging Face fast tokenizer
    loader = TextBatchLoader(dataset, 32, train=True)
    for x, y in loader: ...                        # x: (B, 3, L_batch) as bkd_core.models.text.pack gives it

A ``TextDataset`` holds what the training loop needs of a dataset (``labels``, ``num_classes``, ``take``), so
``DataSplits`` holds its splits and holds val out as for images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from .loader import EpochSampler


@dataclass
class TextDataset:
    """``tokens``: int32 (N, 3, L) token ids, attention mask and segment ids, padded to the longest text;
    ``labels``: int64 (N,)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str = "text"

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3 or self.tokens.shape[1] != 3:
            raise ValueError(f"{self.name}: tokens must be (N, 3, L) ids, mask and segments; got {tuple(self.tokens.shape)}.")
        if self.labels.shape != (self.tokens.shape[0],):
            raise ValueError(f"{self.name}: {self.tokens.shape[0]} texts but labels of shape {tuple(self.labels.shape)}.")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def in_channels(self) -> int:
        """Rows of a packed batch: token ids, attention mask, segment ids."""
        return 3

    def sample(self, count: int = 2) -> torch.Tensor:
        """The first ``count`` texts as a packed model input (shape probes, input examples)."""
        return self.tokens[:count].long()

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens of every text (its attention mask's sum)."""
        return self.tokens[:, 1].sum(1)

    def take(self, index: torch.Tensor, name: Optional[str] = None) -> "TextDataset":
        """The texts at ``index``, trimmed to their own longest."""
        tokens = self.tokens[index]
        longest = int(tokens[:, 1].sum(1).max()) if len(tokens) else 1
        return TextDataset(tokens[:, :, :longest].contiguous(), self.labels[index], self.num_classes, name or self.name)

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
    return TextDataset(tokens, torch.as_tensor(list(labels), dtype=torch.long), num_classes, name).take(torch.arange(len(tokens)), name)


class TextBatchLoader(EpochSampler):
    """(x, y) batches of a ``TextDataset``: x is (B, 3, L) int64 with L the batch's own longest text.
    ``set_epoch`` reshuffles deterministically; ``rank``/``world_size`` shard each epoch as ``BatchLoader`` does;
    ``train=True`` shuffles and drops the last partial batch."""

    def __init__(self, dataset: TextDataset, batch_size: int, *, train: bool, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, rank: int = 0, world_size: int = 1, **_: Any) -> None:
        super().__init__(len(dataset), batch_size, train=train, device=torch.device(device), seed=seed, rank=rank,
                         world_size=world_size, name=dataset.name, what="texts")
        self.tokens, self.labels = dataset.tokens.to(self.device), dataset.labels.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            batch = index[start:start + self.batch_size]
            tokens = self.tokens[batch]
            longest = int(tokens[:, 1].sum(1).max())  # padding is on the right: the batch's longest text ends here
            yield tokens[:, :, :longest].long(), self.labels[batch]
