"""``fitnet``: FitNets (Romero et al., 2015). A regressor maps the student's output at one block end (the
hint) into the teacher's there; the loss is their mean squared error.

Between two conv maps the regressor is mdistiller's design (its ``ConvReg``): a convolution chosen by the two
grids (3x3 stride 2 where the student's grid is twice the teacher's, a 4x4 stride-2 transposed convolution
where it is half, else a valid convolution of kernel ``1 + H_s - H_t``), batch norm, and a ReLU, since the
teacher's hint there is a rectified map. A student grid smaller than the teacher's by another factor (which
mdistiller refuses) is resized by a 1x1 convolution and bilinear upsampling. Between other forms (tokens,
channels-last maps, text) the regressor is a connector (``bkd_core.connectors``), ending in a ReLU only
where the teacher's hint was non-negative on the probe batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..connectors import build_connector
from ..forms import Form
from ..params import MethodParamError, as_int
from .features import FeatureDistiller
from .registry import register


def hint_conv(source: Form, target: Form) -> nn.Module:
    """The convolution from a student map to the teacher's channels and grid (mdistiller's choice by grid)."""
    (hs, ws), (ht, wt) = source.grid, target.grid
    cs, ct = source.channels, target.channels
    if (hs, ws) == (2 * ht, 2 * wt):
        return nn.Conv2d(cs, ct, kernel_size=3, stride=2, padding=1)
    if (2 * hs, 2 * ws) == (ht, wt):
        return nn.ConvTranspose2d(cs, ct, kernel_size=4, stride=2, padding=1)
    if hs >= ht and ws >= wt:
        return nn.Conv2d(cs, ct, kernel_size=(1 + hs - ht, 1 + ws - wt))
    return nn.Sequential(nn.Conv2d(cs, ct, kernel_size=1), nn.Upsample(size=(ht, wt), mode="bilinear", align_corners=False))


@register("fitnet")
class FitNet(FeatureDistiller):
    """``loss = alpha*CE + beta*MSE(r(S_h), T_h)`` at hint block h (default: the middle block); the
    regressor r is mdistiller's conv + BN + ReLU between conv maps, a connector between other forms."""

    summary = "a FitNet hint"
    pairs_blocks = True
    own_params = {"hint_block": as_int, "regressor": str}
    default_beta = 100.0  # mdistiller's CIFAR-100 feature weight

    def build_modules(self, hint_block: int = 0, regressor: str = "convreg", **_: Any) -> None:
        """``regressor``: ``convreg`` (mdistiller's, the default) or ``connector`` (a connector alone, no ReLU: the
        design before this one, kept to measure what the difference costs)."""
        if regressor not in ("convreg", "connector"):
            raise MethodParamError("regressor", f"{regressor!r}; give convreg (mdistiller's conv + BN + ReLU) or connector.")
        self.hint = self.check_block("hint_block", hint_block or (len(self.s_forms) + 1) // 2)
        s, t = self.s_forms[self.hint - 1], self.t_forms[self.hint - 1]
        rectified = self.t_nonnegative[self.hint - 1]
        if regressor == "connector":
            self.regressor = build_connector(self.connector_kind, s.shape, t.shape, self._image)
        elif s.kind == t.kind == "map":
            self.regressor = nn.Sequential(hint_conv(s, t), nn.BatchNorm2d(t.channels), *([nn.ReLU()] if rectified else []))
        else:
            connector = build_connector(self.connector_kind, s.shape, t.shape, self._image)
            self.regressor = nn.Sequential(connector, nn.ReLU()) if rectified else connector

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.hint - 1
        return F.mse_loss(self.regressor(s_feats[h]).float(), t_feats[h].float())
