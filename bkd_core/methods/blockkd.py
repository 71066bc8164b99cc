"""``blockkd``: the student, its stepping stones through the frozen teacher, and the Block-KD loss."""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..blocknet import BlockNet
from ..connectors import build_connector
from ..losses import make_logit_distance, warmup_factor
from ..token_losses import per_token, task_loss
from .base import Distiller, DistillOutput
from .registry import register

BlockKDOutput = DistillOutput  # the name Block-KD's output had before every method shared it


def default_stone_weights(cuts: Sequence[int], num_blocks: int) -> list[float]:
    """``w_i = 2^-(n-i)``: stones closer to the student's head weigh more."""
    return [2.0 ** -(num_blocks - cut) for cut in cuts]


def validate_cuts(cuts: Optional[Sequence[int]], num_blocks: int) -> list[int]:
    """The block partition as a sorted list of distinct cuts in 1..n (default: all)."""
    if cuts is None:
        return list(range(1, num_blocks + 1))
    cuts = [int(c) for c in cuts]
    if len(cuts) == 0:
        raise ValueError(
            f"the block partition is empty: give cuts as a non-empty subset of 1..{num_blocks} "
            "(use plain KD, BlockKD with gamma=0 and no stones, through logit_loss on the student only)."
        )
    bad = [c for c in cuts if not 1 <= c <= num_blocks]
    if bad:
        raise ValueError(f"cuts {bad} lie outside 1..{num_blocks}: these models have {num_blocks} blocks.")
    if len(set(cuts)) != len(cuts):
        raise ValueError(f"cuts {cuts} repeat a cut; give each cut once.")
    return sorted(cuts)


@register("blockkd")
class BlockKD(Distiller):
    """Block-wise logit distillation (Yu et al., 2024).

    ``loss = alpha*L_task + beta*L_distill + gamma*L_cross`` over the student S and the stepping
    stones N_i = T_head . T_n..T_{i+1} . C_i . S_i..S_1 for every cut i. The teacher is frozen and
    always in eval mode (its BN statistics never change); gradients reach the student's blocks and
    the connectors through the teacher's blocks.

    ``stack_stones`` (default) runs the stones through each teacher block together, stacked along
    the batch: the same logits and gradients with fewer, larger kernels. It needs teacher blocks
    that compute each sample on its own in eval mode (convolutions, eval BN, pooling, linear
    layers: every usual classifier; decoder blocks too); ``stack_stones=False`` runs the stones one by one.

    On causal LMs (``bkd_core.models.causal``) the logits are per token and every term runs over the target
    tokens (``bkd_core.token_losses``); ``vocab_size``: the tokenizer's, when the two models pad it differently.
    """

    def __init__(
        self,
        teacher: BlockNet,
        student: BlockNet,
        *,
        cuts: Optional[Sequence[int]] = None,
        logit_loss: str = "kd",
        temperature: float = 4.0,
        stone_temperature: Union[None, float, Mapping[int, float]] = None,
        stone_weights: Optional[Sequence[float]] = None,
        alpha: float = 1.0,
        beta: float = 1.0,
        gamma: float = 0.0,
        connector: str = "conv1x1",
        sample_input: Optional[torch.Tensor] = None,
        warmup_epochs: float = 0.0,
        stack_stones: bool = True,
        vocab_size: Optional[int] = None,
        **loss_kwargs: float,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, BlockNet) or not isinstance(student, BlockNet):
            raise ValueError("teacher and student must be BlockNet instances (see BlockNet.from_module).")
        self.teacher, self.student = teacher, student
        self.num_blocks = student.num_blocks
        self.cuts = self._partition(cuts)
        if stone_weights is None:
            stone_weights = default_stone_weights(self.cuts, self.num_blocks)
        if len(stone_weights) != len(self.cuts):
            raise ValueError(
                f"{len(stone_weights)} stone weights for {len(self.cuts)} cuts {self.cuts}: give one weight per cut."
            )
        self.stone_weights = {cut: float(w) for cut, w in zip(self.cuts, stone_weights)}
        self.stone_temperatures = self._stone_temperatures(temperature, stone_temperature)
        self.logit_loss = logit_loss
        self.distance = per_token(make_logit_distance(logit_loss, **loss_kwargs), vocab=vocab_size)
        self.temperature = float(temperature)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.warmup_epochs = float(warmup_epochs)
        self.stack_stones = bool(stack_stones)
        self.epoch: Optional[float] = None  # set by the trainer for DKD's warm-up
        self.connector_kind = connector
        self.connectors = nn.ModuleDict()
        teacher.requires_grad_(False)
        teacher.eval()
        if sample_input is not None:
            self.build_connectors(sample_input)

    uses_partition = True
    reads_blocks = pairs_blocks = True
    summary = "the student with Block-KD's stepping stones"

    @classmethod
    def build(cls, teacher: nn.Module, student: nn.Module, *, sample_input: Optional[torch.Tensor] = None,
              connector: str = "conv1x1", **params: Any) -> "BlockKD":
        return cls(teacher, student, sample_input=sample_input, connector=connector, **params)

    def _partition(self, cuts: Optional[Sequence[int]]) -> list[int]:
        if self.teacher.num_blocks != self.student.num_blocks:
            raise ValueError(
                f"teacher has {self.teacher.num_blocks} blocks and student has {self.student.num_blocks}: "
                "Block-KD pairs block i of one with block i of the other, so cut both into the same number of blocks."
            )
        return validate_cuts(cuts, self.num_blocks)

    def _stone_temperatures(self, temperature: float, stone: Union[None, float, Mapping[int, float]]) -> dict[int, float]:
        if stone is None:
            return {cut: float(temperature) for cut in self.cuts}
        if isinstance(stone, Mapping):
            missing = [c for c in self.cuts if c not in stone]
            if missing:
                raise ValueError(f"stone_temperature has no entry for cuts {missing}; give one per cut.")
            return {cut: float(stone[cut]) for cut in self.cuts}
        return {cut: float(stone) for cut in self.cuts}

    @property
    def connectors_built(self) -> bool:
        return len(self.connectors) == len(self.cuts)

    @torch.no_grad()
    def build_connectors(self, sample_input: torch.Tensor) -> None:
        """One probe forward of both models gives the feature shapes each connector bridges."""
        was_training = self.student.training
        self.student.eval()
        probe = sample_input[:2]
        device = next(self.student.parameters()).device
        s_feats = self.student.features(probe.to(device))
        t_feats = self.teacher.features(probe.to(next(self.teacher.parameters()).device))
        self.student.train(was_training)
        image = tuple(probe.shape[-2:]) if probe.dim() == 4 else None  # tells conv maps, channels-last maps and tokens apart
        for cut in self.cuts:
            s_shape, t_shape = s_feats[cut - 1].shape[1:], t_feats[cut - 1].shape[1:]
            self.connectors[str(cut)] = build_connector(self.connector_kind, s_shape, t_shape, image).to(device)
            self.connectors[str(cut)].train(self.training)

    def train(self, mode: bool = True) -> "BlockKD":
        super().train(mode)
        self.teacher.eval()  # teacher BN statistics never change
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student and connector parameters: what the optimizer updates."""
        if not self.connectors_built:
            raise RuntimeError("connectors are not built yet: pass sample_input= to BlockKD or call build_connectors(x).")
        yield from self.student.parameters()
        yield from self.connectors.parameters()

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's own forward, without autograd (the losses read it as a target).

        ``no_grad``, not ``inference_mode``: under ``torch.compile`` a teacher that views a parameter
        (a vision transformer's ``cls_token.expand(...)``) fails with inference tensors.
        """
        with torch.no_grad():
            return self.teacher(x)

    def stone_forward(self, student_features: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Logits of every stepping stone N_i from the student's block outputs."""
        if not self.cuts:
            return {}
        if not self.stack_stones:
            return {cut: self.teacher.forward_from(cut, self.connect(cut, student_features)) for cut in self.cuts}
        # Before teacher block j, the stones with cut < j are stacked along the batch: block j and the
        # head run once for all of them (cut 1 runs blocks 2..n, cut 2 joins it at block 3, ...).
        stacked: Optional[torch.Tensor] = None
        for ran, block in enumerate(self.teacher.blocks):  # ``ran`` teacher blocks come before this one
            if ran in self.cuts:
                stacked = self._join(stacked, self.connect(ran, student_features))
            if stacked is not None:
                stacked = block(stacked)
        if self.num_blocks in self.cuts:
            stacked = self._join(stacked, self.connect(self.num_blocks, student_features))
        logits = self.teacher.head(stacked).split(student_features[0].shape[0])
        return dict(zip(self.cuts, logits))

    def connect(self, cut: int, student_features: Sequence[torch.Tensor]) -> torch.Tensor:
        """C_i: the student's output at ``cut`` mapped into the teacher's feature space there."""
        return self.connectors[str(cut)](student_features[cut - 1])

    @staticmethod
    def _join(stacked: Optional[torch.Tensor], entering: torch.Tensor) -> torch.Tensor:
        return entering if stacked is None else torch.cat([stacked, entering])

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The student's logits and every stone's: what evaluation needs (no teacher forward, no loss)."""
        if not self.connectors_built:
            self.build_connectors(x)
        feats = self.student.features(x)
        return self.student.head(feats[-1]), self.stone_forward(feats)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> DistillOutput:
        teacher_logits = self.teacher_logits(x)  # first: on CPU, 10-15 % faster than last (bench/step_bench.py)
        student_logits, stones = self.logits(x)
        loss, parts = self.loss(student_logits, stones, teacher_logits, y)
        return DistillOutput(loss, student_logits, teacher_logits, stones, parts)

    def loss(
        self,
        student_logits: torch.Tensor,
        stones: Mapping[int, torch.Tensor],
        teacher_logits: torch.Tensor,
        y: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The Block-KD objective and its parts (task, distill, cross)."""
        d, T = self.distance, self.temperature
        ramp = warmup_factor(self.epoch, self.warmup_epochs)
        task = task_loss(student_logits, y)
        distill = d(student_logits, teacher_logits, y, T)
        for cut, logits in stones.items():
            w = self.stone_weights[cut]
            task = task + w * task_loss(logits, y)
            distill = distill + w * d(logits, teacher_logits, y, self.stone_temperatures[cut])
        distill = ramp * distill
        loss = self.alpha * task + self.beta * distill
        parts = {"loss_task": task.detach(), "loss_distill": distill.detach()}
        if self.gamma != 0.0 and stones:
            per_class = student_logits.dim() == 2  # token logits stay in their dtype: the distance upcasts per chunk
            ensemble = torch.stack([s.float() if per_class else s for s in stones.values()]).mean(0).detach()
            cross = d(student_logits, ensemble, y, T)
            for cut, logits in stones.items():
                cross = cross + d(logits, ensemble, y, self.stone_temperatures[cut])
            loss = loss + self.gamma * cross
            parts["loss_cross"] = cross.detach()
        else:
            parts["loss_cross"] = torch.zeros((), device=loss.device)
        parts["loss"] = loss.detach()
        return loss, parts


@register("blockkd_fixed_partition")
class BlockKDEveryCut(BlockKD):
    """Block-KD with a stepping stone at every cut: the partition is fixed, not searched."""

    summary = "Block-KD with a stepping stone at every cut"

    def _partition(self, cuts: Optional[Sequence[int]]) -> list[int]:
        every = super()._partition(None)
        if cuts is not None and validate_cuts(cuts, self.num_blocks) != every:
            raise ValueError(f"{self.name} has a stone at every cut {every}; drop cuts={list(cuts)} or use blockkd.")
        return every
