"""What every distillation method is: an ``nn.Module`` whose ``forward(x, y)`` returns a ``DistillOutput``
(the loss, the student's logits, the named loss parts to log), with the student at ``.student``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional

import torch
from torch import nn

from ..params import read_params


@dataclass
class DistillOutput:
    """What one training step of a method produces. ``parts`` holds detached scalar terms for logging;
    ``teacher_logits`` and ``stone_logits`` are there for the methods that compute them."""

    loss: torch.Tensor
    student_logits: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    stone_logits: dict[int, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class Distiller(nn.Module):
    """The base of every method in ``bkd_core.methods``: ``student`` trains, a teacher (if any) stays frozen.

    Subclasses implement ``forward(x, y) -> DistillOutput``, ``logits(x)`` (the student's logits and any
    extra heads', for evaluation) and ``trainable_parameters()`` (what the optimizer updates).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # what it trains, in a few words ("Block-KD's stepping stones", "the student alone")
    uses_partition: ClassVar[bool] = False  # searches a block partition (cuts, w_<cut>): teacher and student blocks pair up
    reads_blocks: ClassVar[bool] = False  # reads the models' block outputs: each must have a form bkd_core.forms reads
    pairs_blocks: ClassVar[bool] = False  # reads block i of both models together: the pair is cut into as many blocks
    # the method's own parameters (beyond alpha, beta, temperature, ...) and how to read each, also from strings
    own_params: ClassVar[dict[str, Callable[[Any], Any]]] = {}
    student: nn.Module
    epoch: Optional[float] = None  # set by the trainer every epoch (warm-ups)

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module, *, sample_input: Optional[torch.Tensor] = None,
              connector: str = "conv1x1", **params: Any) -> "Distiller":
        """The method from the registry's arguments: the pair, the context every method may use (a sample
        batch, the connector kind) and the method's own parameters."""
        return cls(teacher, student, **params)

    @classmethod
    def read_own_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The method's own parameters that ``params`` sets, each read by its cast (``MethodParamError`` names
        a value that cannot be read)."""
        return read_params(cls.own_params, params)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.student.parameters()

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return self.student(x), {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> DistillOutput:  # pragma: no cover - abstract
        raise NotImplementedError
