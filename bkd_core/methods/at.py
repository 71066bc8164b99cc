"""``at``: attention transfer (Zagoruyko & Komodakis, 2017). At every block end, the spatial attention map
of each model (the channel mean of |f|^p, flattened and L2-normalised) is matched in mean squared error."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..forms import as_map
from ..params import MethodParamError
from .features import FeatureDistiller
from .registry import register


def attention_map(feature: torch.Tensor, p: float) -> torch.Tensor:
    """``normalize(mean_c(f^p))`` of a (B, C, H, W) map, as (B, H*W)."""
    return F.normalize(feature.float().pow(p).mean(1).flatten(1), dim=1)


def at_loss(s_map: torch.Tensor, t_map: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One block end's term: the larger grid is average-pooled to the smaller one first."""
    (hs, ws), (ht, wt) = s_map.shape[2:], t_map.shape[2:]
    if hs * ws > ht * wt:
        s_map = F.adaptive_avg_pool2d(s_map, (ht, wt))
    elif ht * wt > hs * ws:
        t_map = F.adaptive_avg_pool2d(t_map, (hs, ws))
    return (attention_map(s_map, p) - attention_map(t_map, p)).pow(2).mean()


@register("at")
class AttentionTransfer(FeatureDistiller):
    """``loss = alpha*CE + beta*sum_i AT(S_i, T_i)`` over the block ends. Tokens and channels-last outputs
    are read as maps over their patch grid (``bkd_core.forms.as_map``). No trainable modules."""

    summary = "attention maps at the block ends"
    pairs_blocks = True
    own_params = {"at_p": float}
    defaults = {"at_p": 2.0}
    default_beta = 1000.0  # mdistiller's CIFAR-100 feature weight

    def build_modules(self, at_p: float = 2.0, **_: Any) -> None:
        if not at_p > 0:
            raise MethodParamError("at_p", f"{at_p} is not a power of the attention map; give at_p > 0 (the paper's 2).")

    def distill_loss(self, s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], s_logits: torch.Tensor,
                     t_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = self.params["at_p"]
        return sum(at_loss(as_map(s, sf), as_map(t, tf), p)
                   for s, t, sf, tf in zip(s_feats, t_feats, self.s_forms, self.t_forms))
