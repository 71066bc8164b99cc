"""``reviewkd``: knowledge review (Chen et al., 2021), laid out as mdistiller lays it out. Attention-based
fusion (ABF) runs from the student's deepest level to its first, each step fusing a level with the fused
result of the deeper ones. The levels are the block ends and, deepest, the pooled feature the head reads (a
1x1 map). Each fused output is matched to the teacher's at the same level: its block outputs *before* their
last ReLU (``preact``; a block without a final ``nn.ReLU`` gives its output) and its pooled feature, by the
hierarchical context loss (HCL: mean squared error on the map and on its 4x4, 2x2 and 1x1 poolings, halving
weights). Shapes and channels come from the probed block forms, for any pair."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..forms import Form, as_map, pooled
from ..params import MethodParamError, as_int
from .features import FeatureDistiller
from .preact import preactivation_features
from .registry import register


def hcl_loss(s: torch.Tensor, t: torch.Tensor, levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """MSE on two (B, C, H, W) maps and on their poolings to the levels below their grid, each level
    weighing half the one before; normalised by the weights' sum."""
    s, t = s.float(), t.float()
    loss, weight, total = F.mse_loss(s, t), 1.0, 1.0
    for level in levels:
        if level >= min(s.shape[2:]):
            continue
        weight /= 2
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level))
        total += weight
    return loss / total


class AttentionFusion(nn.Module):
    """One ABF step: the level's student output reduced to ``mid`` channels (1x1 conv + BN), fused with the
    deeper result by two per-position attention weights, brought to the teacher map's grid (nearest, given per
    batch: a text batch's length is its own), then expanded to the teacher's channels (3x3 conv + BN)."""

    def __init__(self, source: Form, target: Form, mid: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(source.channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.expand = nn.Sequential(nn.Conv2d(mid, target.channels, 3, padding=1, bias=False), nn.BatchNorm2d(target.channels))
        self.attend = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None
        for conv in (self.reduce[0], self.expand[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the authors' initialisation

    def forward(self, x: torch.Tensor, deeper: Optional[torch.Tensor], grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attend is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            a = self.attend(torch.cat([x, deeper], dim=1))
            x = x * a[:, :1] + deeper * a[:, 1:]
        if tuple(x.shape[2:]) != tuple(grid):
            x = F.interpolate(x, size=tuple(grid), mode="nearest")
        return self.expand(x), x


@register("reviewkd")
class ReviewKD(FeatureDistiller):
    """``loss = alpha*CE + beta*(sum_i HCL(ABF_i, T_i^pre) + HCL(ABF_pool, T_pool))`` over the block ends and the
    pooled feature."""

    summary = "reviewed features at the block ends and the pooled feature"
    pairs_blocks = True
    own_params = {"max_mid_channels": as_int, "levels": str}
    defaults = {"max_mid_channels": 512, "levels": "preact_pooled"}  # mdistiller's

    def build_modules(self, max_mid_channels: int = 512, levels: str = "preact_pooled", **_: Any) -> None:
        """``levels``: ``preact_pooled`` (mdistiller's: the teacher's stages before their ReLU, and the pooled
        feature) or ``block_ends`` (the block outputs as they are, no pooled level: the design before this one,
        kept to measure what the difference costs)."""
        if max_mid_channels < 1:
            raise MethodParamError("max_mid_channels", f"{max_mid_channels} channels; give at least 1 (the paper's 512).")
        if levels not in ("preact_pooled", "block_ends"):
            raise MethodParamError("levels", f"{levels!r}; give preact_pooled (mdistiller's) or block_ends.")
        self.mdistiller_levels = levels == "preact_pooled"
        mid = min(max_mid_channels, self.s_forms[-1].channels)
        pairs = list(zip(self.s_forms, self.t_forms))
        if self.mdistiller_levels:  # the pooled feature, deepest
            pairs.append((Form("vector", self.s_forms[-1].channels), Form("vector", self.t_forms[-1].channels)))
        self.fusions = nn.ModuleList(AttentionFusion(s, t, mid, fuse=i < len(pairs) - 1) for i, (s, t) in enumerate(pairs))

    def teacher_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The teacher's block outputs before their last ReLU, then its pooled feature (as a 1x1 map)."""
        if not self.mdistiller_levels:
            return super().teacher_features(x)
        preact, last = preactivation_features(self.teacher, x)
        return preact + [pooled(last, self.t_forms[-1])[:, :, None, None]], last

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        student = [as_map(f, form) for f, form in zip(s_feats, self.s_forms)]
        teacher = [as_map(f, form) for f, form in zip(t_feats, self.t_forms)]
        if self.mdistiller_levels:
            student.append(pooled(s_feats[-1], self.s_forms[-1])[:, :, None, None])
            teacher.append(t_feats[-1])
        deeper, loss = None, torch.zeros((), device=s_logits.device)
        for i in reversed(range(len(student))):
            out, deeper = self.fusions[i](student[i], deeper, teacher[i].shape[2:])
            loss = loss + hcl_loss(out, teacher[i])
        return loss
