"""What the feature- and relation-based baselines share: the frozen teacher and the student both read at
their block ends (the graph split's features), ``loss = alpha*CE(S, y) + beta*L_method``.

A method subclasses ``FeatureDistiller``: it builds its own modules from the probed block forms in
``build_modules`` and computes its term in ``distill_loss``. Block outputs come in any form
(``bkd_core.forms``); ``as_map`` and ``pooled`` read them as maps or embeddings.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator, Optional, Sequence

import torch
from torch import nn

from ..blocknet import BlockNet
from ..forms import Form, infer_form
from ..losses import warmup_factor
from ..params import MethodParamError
from ..token_losses import task_loss
from .base import Distiller, DistillOutput


class FeatureDistiller(Distiller):
    """A student trained on the labels and on a term that reads both models' block outputs.

    Subclasses set ``own_params`` (their parameters and how to read them), ``defaults`` (their paper's),
    and implement ``build_modules`` and ``distill_loss``.
    """

    defaults: ClassVar[dict[str, Any]] = {}
    default_beta: ClassVar[float] = 1.0

    reads_blocks = True

    def __init__(self, teacher: BlockNet, student: BlockNet, *, sample_input: torch.Tensor, alpha: float = 1.0,
                 beta: Optional[float] = None, warmup_epochs: float = 0.0, connector: str = "conv1x1", **params: Any) -> None:
        super().__init__()
        if not isinstance(teacher, BlockNet) or not isinstance(student, BlockNet):
            raise ValueError("teacher and student must be BlockNet instances (see BlockNet.from_module).")
        if sample_input is None:
            raise ValueError(f"the method {self.name} builds its modules from the block shapes: pass sample_input=a batch.")
        unknown = sorted(set(params) - set(self.own_params))
        if unknown:
            raise ValueError(f"the method {self.name} takes alpha, beta, warmup_epochs"
                             f"{''.join(', ' + p for p in self.own_params)}; drop {unknown}.")
        self.teacher, self.student = teacher, student
        self.alpha = float(alpha)
        self.beta = self.default_beta if beta is None else float(beta)
        self.warmup_epochs = float(warmup_epochs)
        self.connector_kind = connector
        self.params = {**self.defaults, **self.read_own_params(params)}
        teacher.requires_grad_(False)
        teacher.eval()
        self.s_forms, self.t_forms, self.num_classes = self._probe(sample_input)
        if self.pairs_blocks and len(self.s_forms) != len(self.t_forms):
            raise ValueError(f"{self.name} pairs block i of both models: the teacher has {len(self.t_forms)} blocks and the "
                             f"student {len(self.s_forms)}; cut both into the same number.")
        self.build_modules(**self.params)

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module, *, sample_input: Optional[torch.Tensor] = None,
              connector: str = "conv1x1", **params: Any) -> "FeatureDistiller":
        return cls(teacher, student, sample_input=sample_input, connector=connector, **params)

    @torch.no_grad()
    def _probe(self, sample: torch.Tensor) -> tuple[list[Form], list[Form], int]:
        was_training = self.student.training
        self.student.eval()
        probe = sample[:2].to(next(self.student.parameters()).device)
        s_feats, t_feats = self.student.features(probe), self.teacher.features(probe)
        num_classes = self.teacher.head(t_feats[-1]).shape[1]
        self.student.train(was_training)
        # where the teacher's output is a rectified map (after a ReLU), as a CNN's block ends are
        self.t_nonnegative = [bool((f >= 0).all()) for f in t_feats]
        image = self._image = tuple(probe.shape[-2:]) if probe.dim() == 4 else None  # None: text
        forms = [[infer_form(f.shape[1:], image, f"block {i + 1} of the {role}") for i, f in enumerate(feats)]
                 for role, feats in (("student", s_feats), ("teacher", t_feats))]
        return forms[0], forms[1], num_classes

    def build_modules(self, **params: Any) -> None:
        """The method's own trainable modules (regressors, embeddings), from ``self.s_forms``/``t_forms``."""

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_block(self, key: str, block: int) -> int:
        """A 1-based block index valid on both models."""
        n = min(len(self.s_forms), len(self.t_forms))
        if not 1 <= block <= n:
            raise MethodParamError(key, f"{block} names no block: this pair has blocks 1..{n}; choose one in that range.")
        return block

    def train(self, mode: bool = True) -> "FeatureDistiller":
        super().train(mode)
        self.teacher.eval()  # the teacher's BN statistics and dropout never change
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's and the method's own modules' parameters (never the teacher's)."""
        teacher = {id(p) for p in self.teacher.parameters()}
        yield from (p for p in self.parameters() if id(p) not in teacher)

    def teacher_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's block outputs the method matches, and the last block's output (what its head reads)."""
        feats = self.teacher.features(x)
        return feats, feats[-1]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> DistillOutput:
        with torch.no_grad():
            t_feats, t_last = self.teacher_features(x)
            t_logits = self.teacher.head(t_last)
        s_feats = self.student.features(x)
        s_logits = self.student.head(s_feats[-1])
        task = task_loss(s_logits, y)
        distill = warmup_factor(self.epoch, self.warmup_epochs) * self.distill_loss(s_feats, t_feats, s_logits, t_logits, y)
        loss = self.alpha * task + self.beta * distill
        parts = {"loss_task": task.detach(), "loss_distill": distill.detach(), "loss": loss.detach()}
        return DistillOutput(loss, s_logits, t_logits, {}, parts)
