"""Losses over the target tokens of language-model logits, in chunks.

Token logits are (B, L, V); the targets ``y`` are (B, L) next-token ids with ``IGNORE`` (-100) where a position is
not a target (the prompt, padding, the last token). Every loss here runs over the target tokens only, ``chunk``
tokens at a time, forward and backward (the backward recomputes each chunk): no (B, L, V) float32 softmax is made
for either model, only one chunk's at a time, and the logits' gradient is written into one buffer. Vocabularies padded to
different sizes (Qwen2.5: 151,936 against 152,064) are compared over their first ``vocab`` columns, the
tokenizer's real vocabulary (default: the smaller of the two).

    d = per_token(make_logit_distance("jsd", jsd_beta=0.5))
    loss = task_loss(student_logits, y) + d(student_logits, teacher_logits, y, 1.0)
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .losses import LogitDistance

IGNORE = -100  # not a target: the label Hugging Face's causal LMs ignore as well
CHUNK = 256  # target tokens per chunk: at V = 152k, one float32 softmax of a chunk is 156 MB


def target_rows(y: torch.Tensor) -> torch.Tensor:
    """The flat (B * L) indices of the target tokens, in order."""
    return (y.reshape(-1) != IGNORE).nonzero().squeeze(1)


class _ChunkedRows(torch.autograd.Function):
    """The mean over N rows of ``fn(*row_logits, targets)``, computed ``chunk`` rows at a time, forward and backward.
    ``rows`` (k, N): which row of each of the k flat logits tensors (and, by its first line, of ``y``) enters. The
    backward recomputes each chunk and writes its gradient into one buffer per input: no chunk keeps its softmaxes,
    and no per-chunk full-size gradient is made (as indexing under autograd would)."""

    @staticmethod
    def forward(ctx, fn, rows, vocab, chunk, y, *logits):  # type: ignore[override]
        ctx.fn, ctx.vocab, ctx.chunk = fn, vocab, chunk
        ctx.save_for_backward(rows, y, *logits)
        total = logits[0].new_zeros((), dtype=torch.float32)
        for start in range(0, rows.shape[1], chunk):
            index = rows[:, start:start + chunk]
            parts = [flat[at, :vocab] for flat, at in zip(logits, index)]
            total += fn(*parts, y[index[0]]).float() * index.shape[1]
        return total / rows.shape[1]

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        rows, y, *logits = ctx.saved_tensors
        needs = ctx.needs_input_grad[5:]
        grads = [torch.zeros_like(flat) if need else None for flat, need in zip(logits, needs)]
        count = rows.shape[1]
        for start in range(0, count, ctx.chunk):
            index = rows[:, start:start + ctx.chunk]
            with torch.enable_grad():
                pieces = [flat[at, :ctx.vocab].detach().requires_grad_(need) for flat, at, need in zip(logits, index, needs)]
                value = ctx.fn(*pieces, y[index[0]]).float() * (index.shape[1] / count)
                found = iter(torch.autograd.grad(value, [p for p in pieces if p.requires_grad], grad_out))
            for grad, at, need in zip(grads, index, needs):
                if need:
                    grad[at, :ctx.vocab] = next(found).to(grad.dtype)
        return (None, None, None, None, None, *grads)


def chunked_mean(fn: Callable[..., torch.Tensor], logits: Sequence[torch.Tensor], y: torch.Tensor,
                 vocab: Optional[int] = None, chunk: int = CHUNK, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mean over the target tokens of ``fn(*rows_of_each_logits, targets)`` (``fn`` returns the mean over its
    rows), computed ``chunk`` tokens at a time, forward and backward. ``rows``: the flat target indices (default:
    ``target_rows(y)``), or (k, N) indices, one line per logits tensor."""
    flat = [l.reshape(-1, l.shape[-1]) for l in logits]
    rows = target_rows(y) if rows is None else rows
    if rows.numel() == 0:  # no target in the batch: a zero that keeps the graph
        return sum(l.sum() for l in flat) * 0.0
    rows = rows.expand(len(flat), -1) if rows.dim() == 1 else rows
    return _ChunkedRows.apply(fn, rows, vocab, chunk, y.reshape(-1), *flat)


def shared_vocab(*logits: torch.Tensor, vocab: Optional[int] = None) -> int:
    """The columns two models' logits are compared over: ``vocab`` (the tokenizer's size), else the smaller width."""
    width = min(l.shape[-1] for l in logits)
    if vocab is not None and vocab > width:
        raise ValueError(f"vocab_size={vocab} is more than the logits' width {width}: give the tokenizer's size "
                         "(len(tokenizer)), which both models' embeddings must cover.")
    return width if vocab is None else int(vocab)


def task_loss(logits: torch.Tensor, y: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Cross-entropy with the labels: class logits (B, C) against (B,) labels, or token logits (B, L, V) against the
    target tokens (the mean negative log-likelihood per target token)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), y)
    return chunked_mean(lambda rows, targets: F.cross_entropy(rows.float(), targets), [logits], y, chunk=chunk)


def per_token(distance: LogitDistance, vocab: Optional[int] = None, chunk: int = CHUNK) -> LogitDistance:
    """``distance`` for class logits as it is, and for token logits over the target tokens, in chunks, over the
    shared vocabulary (the mean over target tokens of the distance of each token's distributions)."""
    def d(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
        if s.dim() == 2:
            return distance(s, t, y, temperature)
        columns = shared_vocab(s, t, vocab=vocab)
        return chunked_mean(lambda s_rows, t_rows, targets: distance(s_rows, t_rows, targets, temperature), [s, t], y,
                            vocab=columns, chunk=chunk)
    return d


def sorted_probability_l1(student_rows: torch.Tensor, teacher_rows: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD's distance between two rows of logits over different vocabularies (Boizard et al., 2024): each softmax
    sorted in decreasing order, the shorter zero-padded, the L1 distance (a Wasserstein-1 distance between the two
    distributions' sorted probabilities), mean over the rows."""
    p_s = F.softmax(student_rows.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = F.softmax(teacher_rows.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s, p_t = F.pad(p_s, (0, width - p_s.shape[-1])), F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1).mean()


def aligned_targets(y_student: torch.Tensor, y_teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ULD's alignment of two tokenizations of the same texts: in each example, the j-th target token of the student
    with the j-th of the teacher, the longer truncated to the shorter. The flat indices of both, in pair order."""
    def ranked(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        is_target = y != IGNORE
        return is_target, is_target.long().cumsum(1) - 1
    t_s, rank_s = ranked(y_student)
    t_t, rank_t = ranked(y_teacher)
    keep = torch.minimum(t_s.sum(1), t_t.sum(1)).unsqueeze(1)
    rows_s = (t_s & (rank_s < keep)).reshape(-1).nonzero().squeeze(1)
    rows_t = (t_t & (rank_t < keep)).reshape(-1).nonzero().squeeze(1)
    return rows_s, rows_t


def uld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y_student: torch.Tensor, y_teacher: torch.Tensor,
             temperature: float = 1.0, chunk: int = CHUNK) -> torch.Tensor:
    """ULD over token logits of two tokenizers: ``sorted_probability_l1`` of each aligned pair of target tokens
    (``aligned_targets``), the mean over the pairs, in chunks."""
    rows_s, rows_t = aligned_targets(y_student, y_teacher)
    return chunked_mean(lambda s_rows, t_rows, _: sorted_probability_l1(s_rows, t_rows, temperature),
                        [student_logits, teacher_logits.detach()], y_student, chunk=chunk, rows=torch.stack([rows_s, rows_t]))
