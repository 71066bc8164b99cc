"""``crd``: contrastive representation distillation (Tian et al., 2020). Student and teacher embeddings
(the last block's pooled outputs through a linear map to ``feat_dim``, L2-normalised) are pulled
together for the same image and apart for others, in both directions.

Negatives are the other images of the batch and a memory of the ``nce_k`` most recent embeddings of
each model (a first-in first-out queue), read with a softmax over the positive and the negatives at
temperature ``nce_t``. The paper's memory instead holds one momentum-updated entry per training image,
found by sample index; the queue needs no indices, so it works on streamed data as on data in memory.
Its memory: ``2 * nce_k * feat_dim * 4`` bytes (16 MiB at the defaults).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..forms import pooled
from ..params import MethodParamError, as_int
from .features import FeatureDistiller
from .registry import register


def contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, memory: torch.Tensor, temperature: float) -> torch.Tensor:
    """Row i of ``anchor`` against row i of ``positive`` (its positive), the batch's other rows and
    ``memory`` (negatives): cross-entropy of the softmax over those similarities / temperature."""
    logits = torch.cat([anchor @ positive.t(), anchor @ memory.t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.arange(len(anchor), device=anchor.device))


@register("crd")
class ContrastiveKD(FeatureDistiller):
    """``loss = alpha*CE + beta*(L(s -> t) + L(t -> s))`` over the embeddings (see the module)."""

    summary = "contrastive embeddings"
    own_params = {"feat_dim": as_int, "nce_k": as_int, "nce_t": float}
    defaults = {"feat_dim": 128, "nce_k": 16384, "nce_t": 0.07}  # the paper's and mdistiller's
    default_beta = 0.8  # mdistiller's CIFAR-100 feature weight

    def build_modules(self, feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, **_: Any) -> None:
        for key, value, rule in (("feat_dim", feat_dim, feat_dim >= 1), ("nce_k", nce_k, nce_k >= 0), ("nce_t", nce_t, nce_t > 0)):
            if not rule:
                raise MethodParamError(key, f"{value} is out of range; feat_dim >= 1, nce_k >= 0 and nce_t > 0.")
        self.embed_student = nn.Linear(self.s_forms[-1].channels, feat_dim)
        self.embed_teacher = nn.Linear(self.t_forms[-1].channels, feat_dim)
        self.register_buffer("memory_student", torch.zeros(nce_k, feat_dim))
        self.register_buffer("memory_teacher", torch.zeros(nce_k, feat_dim))
        self.register_buffer("stored", torch.zeros((), dtype=torch.long))  # embeddings written so far
        self._pending: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def memory_bytes(self) -> int:
        return self.memory_student.numel() * 4 * 2

    def embeddings(self, s_last: torch.Tensor, t_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = F.normalize(self.embed_student(pooled(s_last, self.s_forms[-1]).float()), dim=1)
        t = F.normalize(self.embed_teacher(pooled(t_last, self.t_forms[-1]).float()), dim=1)
        return s, t

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s, t = self.embeddings(s_feats[-1], t_feats[-1])
        k = len(self.memory_student)
        if self._pending is not None:  # the last step's embeddings, written now: its backward has read the memory
            self._remember(*self._pending)
            self._pending = None
        filled = min(int(self.stored), k)
        temperature = self.params["nce_t"]
        loss = (contrastive_loss(s, t, self.memory_teacher[:filled], temperature)
                + contrastive_loss(t, s, self.memory_student[:filled], temperature))
        if self.training and k:
            self._pending = (s.detach(), t.detach())
        return loss

    @torch.no_grad()
    def _remember(self, s: torch.Tensor, t: torch.Tensor) -> None:
        k = len(self.memory_student)
        self.stored += len(s)
        s, t = s[-k:], t[-k:]  # a batch larger than the memory keeps its last k
        rows = (int(self.stored) - len(s) + torch.arange(len(s), device=s.device)) % k
        self.memory_student[rows] = s
        self.memory_teacher[rows] = t
