"""``rkd``: relational KD (Park et al., 2019). The student's penultimate embeddings keep the teacher's
pairwise distances (normalised by their mean) and the angles of every triplet, in smooth-L1."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..forms import pooled
from ..params import MethodParamError
from .features import FeatureDistiller
from .registry import register


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``e`` (zero on the diagonal)."""
    square = e.pow(2).sum(1)
    d = (square.unsqueeze(0) + square.unsqueeze(1) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=d.dtype))


def distance_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def normalised(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e)
        return d / d[d > 0].mean()
    with torch.no_grad():
        t_d = normalised(t)
    return F.smooth_l1_loss(normalised(s), t_d)


def angle_term(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    def angles(e: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), dim=2)  # unit[i, j] = (e_j - e_i)/|.|
        return (unit @ unit.transpose(1, 2)).flatten()  # cos of the angle at i between j and k
    with torch.no_grad():
        t_a = angles(t)
    return F.smooth_l1_loss(angles(s), t_a)


@register("rkd")
class RelationalKD(FeatureDistiller):
    """``loss = alpha*CE + beta*(distance_weight*L_dist + angle_weight*L_angle)`` on the last block's
    pooled outputs (``bkd_core.forms.pooled``); the two embeddings may differ in width."""

    summary = "distances and angles of the embeddings"
    own_params = {"distance_weight": float, "angle_weight": float}
    defaults = {"distance_weight": 25.0, "angle_weight": 50.0}  # the paper's and mdistiller's

    def build_modules(self, distance_weight: float = 25.0, angle_weight: float = 50.0, **_: Any) -> None:
        for key, value in (("distance_weight", distance_weight), ("angle_weight", angle_weight)):
            if value < 0:
                raise MethodParamError(key, f"{value} is negative; give a weight >= 0.")

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = pooled(s_feats[-1], self.s_forms[-1]).float()
        t = pooled(t_feats[-1], self.t_forms[-1]).float()
        p = self.params
        return p["distance_weight"] * distance_term(s, t) + p["angle_weight"] * angle_term(s, t)
