"""``reviewkd``: knowledge review (Chen et al., 2021). Attention-based fusion (ABF) runs from the
student's deepest block end to its first, each step fusing a block's output with the fused result of the
deeper ones; every fused output is matched to the teacher's output at the same block end by the
hierarchical context loss (HCL: mean squared error on the map and on its 4x4, 2x2 and 1x1 poolings,
halving weights). Shapes and channels come from the probed block forms, for any pair."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..forms import Form, as_map
from ..params import MethodParamError, as_int
from .features import FeatureDistiller
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
    """One ABF step: the block's output reduced to ``mid`` channels, fused with the deeper result by two
    per-position attention weights, then expanded to the teacher's channels at the teacher map's grid (given
    per batch: a text batch's length is its own)."""

    def __init__(self, source: Form, target: Form, mid: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(source.channels, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.expand = nn.Sequential(nn.Conv2d(mid, target.channels, 3, padding=1, bias=False), nn.BatchNorm2d(target.channels))
        self.attend = nn.Sequential(nn.Conv2d(2 * mid, 2, 1), nn.Sigmoid()) if fuse else None

    def forward(self, x: torch.Tensor, deeper: Optional[torch.Tensor], grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.attend is not None and deeper is not None:
            deeper = F.interpolate(deeper, size=x.shape[2:], mode="nearest")
            a = self.attend(torch.cat([x, deeper], dim=1))
            x = x * a[:, :1] + deeper * a[:, 1:]
        out = self.expand(x)
        if tuple(out.shape[2:]) != tuple(grid):
            out = F.interpolate(out, size=tuple(grid), mode="bilinear", align_corners=False)
        return out, x


@register("reviewkd")
class ReviewKD(FeatureDistiller):
    """``loss = alpha*CE + beta*sum_i HCL(ABF_i, T_i)`` over the block ends."""

    summary = "reviewed features at the block ends"
    pairs_blocks = True
    own_params = {"max_mid_channels": as_int}
    defaults = {"max_mid_channels": 512}  # mdistiller's

    def build_modules(self, max_mid_channels: int = 512, **_: Any) -> None:
        if max_mid_channels < 1:
            raise MethodParamError("max_mid_channels", f"{max_mid_channels} channels; give at least 1 (the paper's 512).")
        mid = min(max_mid_channels, self.s_forms[-1].channels)
        last = len(self.s_forms) - 1
        self.fusions = nn.ModuleList(AttentionFusion(s, t, mid, fuse=i < last)
                                     for i, (s, t) in enumerate(zip(self.s_forms, self.t_forms)))

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        deeper, loss = None, torch.zeros((), device=s_logits.device)
        for i in reversed(range(len(s_feats))):
            target = as_map(t_feats[i], self.t_forms[i])
            out, deeper = self.fusions[i](as_map(s_feats[i], self.s_forms[i]), deeper, target.shape[2:])
            loss = loss + hcl_loss(out, target)
        return loss
