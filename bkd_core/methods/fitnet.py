"""``fitnet``: FitNets (Romero et al., 2015). A regressor maps the student's output at one block end (the
hint) into the teacher's there; the loss is their mean squared error."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..connectors import build_connector
from ..params import as_int
from .features import FeatureDistiller
from .registry import register


@register("fitnet")
class FitNet(FeatureDistiller):
    """``loss = alpha*CE + beta*MSE(r(S_h), T_h)`` at hint block h (default: the middle block); the
    regressor r is a connector (``bkd_core.connectors``), so the two outputs may differ in form."""

    summary = "a FitNet hint"
    pairs_blocks = True
    own_params = {"hint_block": as_int}
    default_beta = 100.0  # mdistiller's CIFAR-100 feature weight

    def build_modules(self, hint_block: int = 0, **_: Any) -> None:
        self.hint = self.check_block("hint_block", hint_block or (len(self.s_forms) + 1) // 2)
        s, t = self.s_forms[self.hint - 1], self.t_forms[self.hint - 1]
        self.regressor = build_connector(self.connector_kind, s.shape, t.shape, self._image)

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.hint - 1
        return F.mse_loss(self.regressor(s_feats[h]).float(), t_feats[h].float())
