"""The logit baselines: plain logit distillation of the student, no stepping stones. One name per method, as
search spaces, ``compare.methods`` and ``describe`` name them: ``kd`` (Hinton et al., 2015), ``dkd`` (Zhao et
al., 2022), ``kd_ls`` (KD on standardised logits, Sun et al., 2024), ``dist`` (Huang et al., 2022) and ``loca``
(KD on LoCa-calibrated teacher logits); ``kd`` also takes the LLM distances ``rkl``, ``skl`` and ``jsd``. One class underneath (``LogitKD``); each name fixes its logit loss."""
from __future__ import annotations

from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import nn

from ..blocknet import BlockNet
from .blockkd import BlockKD
from .registry import register


class LogitKD(BlockKD):
    """Plain logit distillation of the student (no stepping stones): ``loss = alpha*CE(S, y) + beta*d(S, T)``
    with ``d`` any of ``bkd_core.losses.LOGIT_LOSSES`` (``logit_loss``); with ``beta=0`` it trains the student
    without KD. The registered names (``kd``, ``dkd``, ...) are this class with ``logit_loss`` fixed."""

    uses_partition = reads_blocks = pairs_blocks = False
    summary = "a logit-only baseline"
    fixed_logit_loss: ClassVar[Optional[str]] = None  # each registered name fixes it (its default) ...
    also_takes: ClassVar[tuple[str, ...]] = ()  # ... or allows these as well

    def __init__(self, teacher: BlockNet, student: BlockNet, **kwargs) -> None:
        stone_args = sorted({"cuts", "stone_weights", "stone_temperature", "connector", "gamma"} & set(kwargs))
        if stone_args:
            raise ValueError(f"{type(self).__name__} has no stepping stones; drop {stone_args} or use BlockKD.")
        fixed = type(self).fixed_logit_loss
        if fixed is not None:
            given = kwargs.setdefault("logit_loss", fixed)
            if given != fixed and given not in type(self).also_takes:
                raise ValueError(f"the method {self.name!r} is logit loss {fixed!r}; drop logit_loss={given!r} or make "
                                 f"the method {given!r} instead.")
        super().__init__(teacher, student, **kwargs)

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module, *, sample_input: Optional[torch.Tensor] = None,
              connector: str = "conv1x1", **params: Any) -> "LogitKD":
        return cls(teacher, student, **params)

    def _partition(self, cuts: Optional[Sequence[int]]) -> list[int]:
        return []


@register("kd")
class KD(LogitKD):
    """Hinton KD on the logits (``LogitKD`` with ``logit_loss="kd"``, forward KL), or one of its LLM variants:
    ``rkl`` (reverse KL, MiniLLM's objective), ``skl`` (skew KL, DistiLLM) or ``jsd`` (generalised JSD, GKD)."""

    fixed_logit_loss = "kd"
    also_takes = ("rkl", "skl", "jsd")


@register("dkd")
class DKD(LogitKD):
    """Decoupled KD: target and non-target classes weighed apart (``dkd_alpha``, ``dkd_beta``)."""

    fixed_logit_loss = "dkd"


@register("kd_ls")
class KDLS(LogitKD):
    """KD on per-sample standardised logits."""

    fixed_logit_loss = "kd_ls"


@register("dist")
class DIST(LogitKD):
    """DIST: inter- and intra-class correlations of the softened logits (``dist_inter``, ``dist_intra``)."""

    fixed_logit_loss = "dist"


@register("loca")
class LoCa(LogitKD):
    """KD on LoCa-calibrated teacher logits (``loca_alpha``)."""

    fixed_logit_loss = "loca"
