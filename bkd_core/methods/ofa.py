"""``ofa``: one-for-all KD (Hao et al., NeurIPS 2023), the baseline for pairs of different architectures.
A small branch at every block end of the student projects its output into logit space; each branch's
logits and the student's own are pulled toward the teacher's by OFA's loss

    L(s, t, y) = -sum_c ((p_t + 1_y)^eps - 1_y)_c * log p_s,c   (p = softmax(logits / T))

which for ``eps`` > 1 sharpens the target class of the teacher's distribution. A branch reads the block's
output as a map (``bkd_core.forms.as_map``: tokens over their patch grid), so any form works."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..forms import as_map
from ..params import MethodParamError
from .features import FeatureDistiller
from .registry import register


def ofa_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor, eps: float, temperature: float = 1.0) -> torch.Tensor:
    """The OFA loss above, mean over the batch."""
    onehot = F.one_hot(y, s_logits.shape[1]).float()
    p_t = F.softmax(t_logits.float() / temperature, dim=1)
    weight = (p_t + onehot).pow(eps) - onehot
    return -(weight * F.log_softmax(s_logits.float() / temperature, dim=1)).sum(1).mean()


@register("ofa")
class OneForAll(FeatureDistiller):
    """``loss = alpha*CE + beta*(L(S) + sum_i L(branch_i(S_i)))``; the branches train with the student
    and are dropped with it (student.pt holds the student alone)."""

    summary = "block ends projected to logits"
    own_params = {"ofa_eps": float, "temperature": float}
    defaults = {"ofa_eps": 1.0, "temperature": 1.0}  # OFA's CIFAR-100 defaults

    def build_modules(self, ofa_eps: float = 1.0, temperature: float = 1.0, **_: Any) -> None:
        if not ofa_eps > 0:
            raise MethodParamError("ofa_eps", f"{ofa_eps} is not an exponent OFA uses; give ofa_eps > 0 (1 is plain KD's target).")
        if not temperature > 0:
            raise MethodParamError("temperature", f"{temperature}; give a temperature > 0.")
        self.branches = nn.ModuleList(self._branch(form.channels) for form in self.s_forms[:-1])

    def _branch(self, channels: int) -> nn.Module:
        hidden = max(64, min(256, 2 * channels))
        return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, self.num_classes))

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps, temperature = self.params["ofa_eps"], self.params["temperature"]
        loss = ofa_loss(s_logits, t_logits, y, eps, temperature)
        for branch, feature, form in zip(self.branches, s_feats, self.s_forms):
            loss = loss + ofa_loss(branch(as_map(feature, form)), t_logits, y, eps, temperature)
        return loss
