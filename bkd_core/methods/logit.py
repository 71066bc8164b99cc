"""``logit``: plain logit distillation of the student (KD, DKD, logit-standardised KD), no stepping stones."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..blocknet import BlockNet
from .blockkd import BlockKD
from .registry import register


@register("logit")
class LogitKD(BlockKD):
    """Plain logit distillation of the student (no stepping stones): the KD/DKD/KD-LS baselines.

    ``loss = alpha*CE(S, y) + beta*d(S, T)``; with ``beta=0`` it trains the student without KD.
    """

    def __init__(self, teacher: BlockNet, student: BlockNet, **kwargs) -> None:
        stone_args = sorted({"cuts", "stone_weights", "stone_temperature", "connector", "gamma"} & set(kwargs))
        if stone_args:
            raise ValueError(f"LogitKD has no stepping stones; drop {stone_args} or use BlockKD.")
        super().__init__(teacher, student, **kwargs)

    uses_partition = reads_blocks = pairs_blocks = False
    summary = "a logit-only baseline"

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module, *, sample_input: Optional[torch.Tensor] = None,
              connector: str = "conv1x1", **params: Any) -> "LogitKD":
        return cls(teacher, student, **params)

    def _partition(self, cuts: Optional[Sequence[int]]) -> list[int]:
        return []
