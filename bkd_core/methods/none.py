"""``none``: the student alone, trained on the labels (no teacher): what distillation has to beat. The
same class trains a teacher (``Supervised(teacher)``)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..token_losses import task_loss
from .base import Distiller, DistillOutput
from .registry import register


@register("none")
class Supervised(Distiller):
    """Wraps a plain classifier so that it trains through the same loop: ``forward(x, y)`` -> output."""

    summary = "the student alone"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.student = model

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module, *, sample_input: Optional[torch.Tensor] = None,
              connector: str = "conv1x1", warmup_epochs: float = 0.0, **params: Any) -> "Supervised":
        if params:  # warmup_epochs: a distillation warm-up, nothing to warm up here
            raise ValueError(f"the method none (the student alone) takes no parameters; drop {sorted(params)}.")
        return cls(student)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> DistillOutput:
        logits = self.student(x)
        loss = task_loss(logits, y)
        return DistillOutput(loss, logits, logits.detach(), {}, {"loss": loss.detach()})
