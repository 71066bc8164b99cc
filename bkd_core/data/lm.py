"""Language-model data: texts tokenized once into flat token arrays (no padding stored), and a loader that pads each
batch to its own longest example and makes the next-token targets.

    dataset, counts = tokenize_lm(tokenizer, texts=["the sky is blue", ...], max_length=256)
    dataset, counts = tokenize_lm(tokenizer, prompts=[...], responses=[...])  # only the responses' tokens are targets
    dataset.partner, _ = tokenize_lm(teacher_tokenizer, prompts=[...], responses=[...])  # ULD: the teacher's own ids
    loader = LMBatchLoader(dataset, 16, train=True)
    for x, y in loader: ...          # x: (B, 2, L) ids and mask (bkd_core.models.causal.pack_lm); y: (B, L) targets

A token is a *target* when a model is scored on predicting it: every token but an example's first for plain text,
the response's tokens for prompt/response pairs. ``y[b, t]`` is the token at ``t + 1`` where that token is a
target, else ``-100`` (``bkd_core.token_losses.IGNORE``). The token arrays are flat (``ids`` int32,
``targets`` bool) and never copied by selecting examples: arrays memory-mapped from a file share one copy between the
processes of a node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..token_losses import IGNORE
from .loader import EpochSampler


@dataclass
class LMDataset:
    """Examples over flat arrays: example ``i``'s tokens are ``ids[starts[i]:starts[i] + lengths[i]]`` and ``targets``
    flags the ones that are targets. Selecting examples (``take``, the val hold-out) indexes ``starts`` and ``lengths``
    alone: the token arrays are shared, never copied. ``labels`` (all 0) lets ``DataSplits.hold_out`` draw val at
    random."""

    ids: torch.Tensor
    targets: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    vocab_size: int
    name: str = "lm"
    partner: Optional["LMDataset"] = None  # the same examples in a second tokenizer's ids (ULD's teacher)
    pack: Optional[int] = None  # a training loader packs each batch into rows of up to this many tokens (pack_rows)

    def __post_init__(self) -> None:
        if self.ids.dim() != 1 or self.targets.shape != self.ids.shape:
            raise ValueError(f"{self.name}: ids and targets must be flat arrays of one length; got {tuple(self.ids.shape)} "
                             f"and {tuple(self.targets.shape)}.")
        if self.starts.shape != self.lengths.shape or self.starts.dim() != 1:
            raise ValueError(f"{self.name}: starts and lengths must give one start and one length per example.")
        if len(self.starts) and (int((self.starts + self.lengths).max()) > len(self.ids) or int(self.lengths.min()) < 1):
            raise ValueError(f"{self.name}: every example must hold at least one token within the {len(self.ids)} tokens.")
        if self.partner is not None and len(self.partner) != len(self):
            raise ValueError(f"{self.name}: {len(self)} examples but {len(self.partner)} in the second tokenization.")

    @classmethod
    def of_offsets(cls, ids: torch.Tensor, targets: torch.Tensor, offsets: torch.Tensor, vocab_size: int,
                   name: str = "lm") -> "LMDataset":
        """Examples stored back to back: example ``i`` is ``ids[offsets[i]:offsets[i+1]]``."""
        offsets = offsets.long()
        return cls(ids, targets, offsets[:-1], offsets[1:] - offsets[:-1], vocab_size, name)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def labels(self) -> torch.Tensor:
        return torch.zeros(len(self), dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def in_channels(self) -> int:
        """Rows of a packed batch: token ids and attention mask (then the partner's ids, mask and targets)."""
        return 2 if self.partner is None else 5

    @property
    def token_count(self) -> int:
        return int(self.lengths.sum())

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``index`` padded on the right to their longest: (x, y) as ``LMBatchLoader`` gives them. With a
        partner, x is (B, 5, L): this tokenization's ids and mask, then the partner's ids, mask and targets."""
        x, y = pad_batch(self.ids, self.targets, self.starts[index], self.lengths[index])
        if self.partner is None:
            return x, y
        x_p, y_p = self.partner.batch(index)
        width = max(x.shape[-1], x_p.shape[-1])
        x, y = F.pad(x, (0, width - x.shape[-1])), F.pad(y, (0, width - y.shape[-1]), value=IGNORE)
        x_p, y_p = F.pad(x_p, (0, width - x_p.shape[-1])), F.pad(y_p, (0, width - y_p.shape[-1]), value=IGNORE)
        return torch.cat([x, x_p, y_p.unsqueeze(1)], dim=1), y

    def to(self, device: Union[str, torch.device]) -> "LMDataset":
        """The arrays on ``device`` (a loader's copy; on the CPU the same arrays)."""
        partner = self.partner.to(device) if self.partner is not None else None
        return LMDataset(self.ids.to(device), self.targets.to(device), self.starts.to(device), self.lengths.to(device),
                         self.vocab_size, self.name, partner, self.pack)

    def sample(self, count: int = 2) -> torch.Tensor:
        """The first ``count`` examples as a packed model input (shape probes, input examples)."""
        return self.batch(torch.arange(min(count, len(self))))[0]

    def take(self, index: torch.Tensor, name: Optional[str] = None) -> "LMDataset":
        """The examples at ``index``, over the same token arrays."""
        index = torch.as_tensor(index, dtype=torch.long)
        partner = self.partner.take(index) if self.partner is not None else None
        return LMDataset(self.ids, self.targets, self.starts[index], self.lengths[index], self.vocab_size, name or self.name,
                         partner)

    def subset(self, count: int, seed: int = 0) -> "LMDataset":
        if count >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        return self.take(torch.randperm(len(self), generator=g)[:count].sort().values)


def pad_batch(ids: torch.Tensor, targets: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples at ``starts`` of ``lengths`` tokens in flat arrays as (x (B, 2, L) ids and mask, right-padded with
    0; y (B, L) next-token targets)."""
    longest = int(lengths.max()) if len(lengths) else 1
    steps = torch.arange(longest, device=ids.device)
    valid = steps[None, :] < lengths[:, None]
    where = (starts[:, None] + steps[None, :]).clamp_max(max(0, len(ids) - 1))
    tokens = torch.where(valid, ids[where].long(), 0)
    is_target = valid & targets[where]
    y = torch.full_like(tokens, IGNORE)
    y[:, :-1] = torch.where(is_target[:, 1:], tokens[:, 1:], IGNORE)
    return torch.stack([tokens, valid.long()], dim=1), y


def pack_rows(x: torch.Tensor, y: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch (x (B, 2, L), y (B, L)) packed into as few rows of at most ``capacity`` tokens as first-fit
    by decreasing length finds: the same examples and targets, less padding. Each row's mask numbers its examples
    1, 2, ... (0: padding), so that each example attends to itself alone and counts its positions from 0
    (``bkd_core.models.causal``)."""
    lengths = x[:, 1].sum(1).tolist()
    fill: list[int] = []
    place = [(0, 0, 0)] * len(lengths)  # (row, offset, example's number in its row)
    counts: list[int] = []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, used in enumerate(fill) if used + lengths[b] <= capacity), None)
        if row is None:
            row = len(fill)
            fill.append(0)
            counts.append(0)
        counts[row] += 1
        place[b] = (row, fill[row], counts[row])
        fill[row] += lengths[b]
    device = x.device
    rows, offsets, numbers = (torch.tensor(v, device=device) for v in zip(*place))
    steps = torch.arange(x.shape[-1], device=device)
    valid = steps[None, :] < x[:, 1].sum(1, keepdim=True)
    example, step = valid.nonzero(as_tuple=True)
    row, col = rows[example], offsets[example] + step
    width = max(fill) if fill else 1
    out = torch.zeros(len(fill), 2, width, dtype=x.dtype, device=device)
    out_y = torch.full((len(fill), width), IGNORE, dtype=y.dtype, device=device)
    out[row, 0, col] = x[example, 0, step]
    out[row, 1, col] = numbers[example].to(x.dtype)
    out_y[row, col] = y[example, step]
    return out, out_y


def tokenize_lm(tokenizer: Any, texts: Optional[Sequence[str]] = None, prompts: Optional[Sequence[str]] = None,
                responses: Optional[Sequence[str]] = None, max_length: int = 512, name: str = "lm",
                chat_template: bool = False, batch: int = 1024) -> tuple[LMDataset, dict[str, int]]:
    """Texts (every token but the first is a target) or prompt/response pairs (the response's tokens are; with
    ``chat_template``, the pair is written in the tokenizer's chat template, the response as the assistant's turn)
    through a Hugging Face fast tokenizer, ending with its end-of-text token where it has one. Examples longer than
    ``max_length`` are cut; empty responses are skipped. Returns the dataset and the counts of both."""
    eos = getattr(tokenizer, "eos_token_id", None)
    rows: list[list[int]] = []
    flags: list[list[bool]] = []
    counts = {"truncated": 0, "empty": 0}
    if texts is not None:
        for start in range(0, len(texts), batch):
            for ids in tokenizer(list(texts[start:start + batch]), add_special_tokens=True)["input_ids"]:
                ids = ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
                rows.append(ids)
                flags.append([False] + [True] * (len(ids) - 1))
    else:
        if prompts is None or responses is None or len(prompts) != len(responses):
            raise ValueError("give texts=..., or prompts=... and responses=... of one length.")
        for start in range(0, len(prompts), batch):
            chunk_p, chunk_r = list(prompts[start:start + batch]), list(responses[start:start + batch])
            heads = [chat_prefix(tokenizer, p) if chat_template else p for p in chunk_p]
            head_ids = tokenizer(heads, add_special_tokens=not chat_template)["input_ids"]
            tail_ids = tokenizer(chunk_r, add_special_tokens=False)["input_ids"]
            for head, tail, text in zip(head_ids, tail_ids, chunk_r):
                if not tail or not str(text).strip():  # blank in any tokenizer: skipped alike by a partner's
                    counts["empty"] += 1
                    continue
                tail = tail + ([eos] if eos is not None else [])
                rows.append(head + tail)
                flags.append([False] * len(head) + [True] * len(tail))
    for i, row in enumerate(rows):
        if len(row) > max_length:
            counts["truncated"] += 1
            rows[i], flags[i] = row[:max_length], flags[i][:max_length]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    ids = torch.tensor([t for r in rows for t in r], dtype=torch.int32)
    targets = torch.tensor([f for r in flags for f in r], dtype=torch.bool)
    return LMDataset(ids, targets, starts, lengths, len(tokenizer), name), counts


def chat_prefix(tokenizer: Any, prompt: str) -> str:
    """The prompt as the user's turn in the tokenizer's chat template, up to where the assistant's answer starts."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


class LMBatchLoader(EpochSampler):
    """(x, y) batches of an ``LMDataset``: x (B, 2, L) int64 with L the batch's own longest example, y (B, L) next-token
    targets. ``set_epoch`` reshuffles deterministically; ``rank``/``world_size`` shard as ``BatchLoader`` does;
    ``train=True`` shuffles and drops the last partial batch. ``pack``: a training batch's examples are packed into
    rows of up to this many tokens (``pack_rows``; each example still attends to itself alone)."""

    token_level = True  # evaluation scores tokens (train.evaluate_tokens)

    def __init__(self, dataset: LMDataset, batch_size: int, *, train: bool, device: Union[str, torch.device] = "cpu",
                 seed: int = 0, rank: int = 0, world_size: int = 1, pack: Optional[int] = None, **_: Any) -> None:
        super().__init__(len(dataset), batch_size, train=train, device=torch.device(device), seed=seed, rank=rank,
                         world_size=world_size, name=dataset.name, what="examples")
        self.dataset = dataset.to(self.device)
        pack = pack if pack is not None else dataset.pack
        self.pack = pack if train and dataset.partner is None else None  # evaluation keeps one example a row

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self._indices()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            x, y = self.dataset.batch(index[start:start + self.batch_size])
            yield pack_rows(x, y, max(self.pack, x.shape[-1])) if self.pack else (x, y)
