"""``uld``: Universal Logit Distillation (Boizard et al., 2024), logits only, for a teacher and a student with any two
tokenizers. Each model reads its own tokenizer's ids of the same texts (``LMDataset.partner``: the batch's rows 2-4
hold the teacher's ids, mask and targets); ``loss = alpha * CE(S, y) + beta * ULD(S, T)`` with ULD's sorted-probability
L1 distance between the j-th target token of each tokenization (``bkd_core.token_losses.uld_loss``)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..losses import warmup_factor
from ..token_losses import CHUNK, task_loss, uld_loss
from .base import Distiller, DistillOutput
from .registry import register

TEACHER_ROWS = slice(2, 4)  # the teacher's ids and mask in a ULD batch
TEACHER_TARGETS = 4


@register("uld")
class UniversalLogitDistillation(Distiller):
    """ULD between causal LMs of different tokenizers: the student on rows 0-1 of the batch, the frozen teacher on its
    own ids (rows 2-3), the distance over their aligned target tokens (row 4 holds the teacher's)."""

    summary = "ULD's cross-tokenizer logit distillation"

    def __init__(self, teacher: nn.Module, student: nn.Module, *, alpha: float = 1.0, beta: float = 1.0,
                 temperature: float = 1.0, warmup_epochs: float = 0.0, chunk: int = CHUNK, **_: Any) -> None:
        super().__init__()
        self.teacher, self.student = teacher, student
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)
        self.warmup_epochs, self.chunk = float(warmup_epochs), int(chunk)
        teacher.requires_grad_(False)
        teacher.eval()

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module, *, sample_input: Optional[torch.Tensor] = None,
              connector: str = "conv1x1", **params: Any) -> "UniversalLogitDistillation":
        if sample_input is not None and (sample_input.dim() != 3 or sample_input.shape[1] != 5):
            raise ValueError("uld reads batches of two tokenizations, (B, 5, L): the student's ids and mask, the teacher's "
                             "ids, mask and targets (bkd_core.data.LMDataset with a partner); it distils causal LMs.")
        return cls(teacher, student, **params)

    def train(self, mode: bool = True) -> "UniversalLogitDistillation":
        super().train(mode)
        self.teacher.eval()
        return self

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return self.student(x[:, :2]), {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> DistillOutput:
        with torch.no_grad():
            teacher_logits = self.teacher(x[:, TEACHER_ROWS])
        student_logits = self.student(x[:, :2])
        task = task_loss(student_logits, y, self.chunk)
        distill = warmup_factor(self.epoch, self.warmup_epochs) * uld_loss(
            student_logits, teacher_logits, y, x[:, TEACHER_TARGETS], self.temperature, self.chunk)
        loss = self.alpha * task + self.beta * distill
        parts = {"loss_task": task.detach(), "loss_distill": distill.detach(), "loss": loss.detach()}
        return DistillOutput(loss, student_logits, teacher_logits, {}, parts)
