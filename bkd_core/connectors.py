"""Connectors C_i: map a student block's output into the teacher's feature space at a cut.

Between two conv maps: ``Connector`` (1x1 conv + BN, pooling or resizing the grid). Between any other
two forms (``bkd_core.forms``: conv maps, channels-last maps, token sequences, pooled vectors):
``FormConnector``, which reads the student's output as a map, projects its channels, resamples it to the
teacher's grid and writes it in the teacher's form (supplying the teacher's prefix tokens), normalised.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .forms import Form, as_map, infer_form

CONNECTORS = ("conv1x1", "auto")


class Connector(nn.Module):
    """1x1 conv + BN for channels, adaptive average pooling down or bilinear resize up for space."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], identity_if_equal: bool = False) -> None:
        super().__init__()
        if len(in_shape) != 3 or len(out_shape) != 3:
            raise ValueError(
                f"connectors bridge (C, H, W) feature maps; got student {tuple(in_shape)} and teacher "
                f"{tuple(out_shape)}: cut the models where blocks output 4-D feature maps."
            )
        (c_in, h_in, w_in), (c_out, h_out, w_out) = in_shape, out_shape
        layers: list[nn.Module] = []
        if (h_in, w_in) != (h_out, w_out) and h_in >= h_out and w_in >= w_out:
            layers.append(nn.AdaptiveAvgPool2d((h_out, w_out)))
        if not (identity_if_equal and c_in == c_out):
            layers += [nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out)]
        if (h_in, w_in) != (h_out, w_out) and not (h_in >= h_out and w_in >= w_out):
            layers.append(nn.Upsample(size=(h_out, w_out), mode="bilinear", align_corners=False))
        self.layers = nn.Sequential(*layers)
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)

    def forward(self, x):
        return self.layers(x)

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_shape}"


class FormConnector(nn.Module):
    """Any form to any form: the student's output as a (B, C, H, W) map (a channels-last map permuted,
    tokens without their prefix folded into their grid, a vector as a 1x1 map), a learned per-position
    projection to the teacher's channels, the grid pooled down or resized up to the teacher's, then
    written in the teacher's form and normalised (BatchNorm for maps, LayerNorm over channels otherwise).
    The teacher's prefix tokens are the student's own, projected, when both have as many; else learned
    tokens plus the mean of the projected patches."""

    def __init__(self, source: Form, target: Form) -> None:
        super().__init__()
        self.source, self.target = source, target
        c_in, c_out = source.channels, target.channels
        self.project = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(c_out) if target.kind == "map" else nn.LayerNorm(c_out)
        self.own_prefix = target.kind == "tokens" and source.kind == "tokens" and source.prefix == target.prefix > 0
        if self.own_prefix:
            self.prefix = nn.Linear(c_in, c_out, bias=False)
        elif target.kind == "tokens" and target.prefix:
            self.prefix_tokens = nn.Parameter(torch.zeros(1, target.prefix, c_out))

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        return as_map(x, self.source)

    def resample(self, m: torch.Tensor) -> torch.Tensor:
        (h, w), (th, tw) = m.shape[2:], self.target.grid
        if (h, w) == (th, tw):
            return m
        if h >= th and w >= tw:
            return F.adaptive_avg_pool2d(m, (th, tw))
        return F.interpolate(m, size=(th, tw), mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.target
        m = self.resample(self.project(self.to_map(x)))
        if t.kind == "map":
            return self.norm(m)
        if t.kind == "vector":
            return self.norm(m.mean((2, 3)))
        if t.kind == "channels_last":
            return self.norm(m.permute(0, 2, 3, 1).contiguous())
        patches = m.flatten(2).transpose(1, 2)
        if self.own_prefix:
            patches = torch.cat([self.prefix(x[:, :t.prefix]), patches], dim=1)
        elif t.prefix:
            patches = torch.cat([self.prefix_tokens + patches.mean(1, keepdim=True), patches], dim=1)
        return self.norm(patches)

    def extra_repr(self) -> str:
        return f"{self.source} -> {self.target}"


class SequenceConnector(nn.Module):
    """A text encoder's hidden states to another's, token by token: Linear D_s -> D_t and LayerNorm; the
    attention mask (the last channel) passes through."""

    def __init__(self, source: Form, target: Form) -> None:
        super().__init__()
        self.source, self.target = source, target
        self.project = nn.Linear(source.channels, target.channels)
        self.norm = nn.LayerNorm(target.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.norm(self.project(x[..., :-1])), x[..., -1:]], dim=-1)

    def extra_repr(self) -> str:
        return f"{self.source} -> {self.target}"


def build_connector(kind: str, in_shape: Sequence[int], out_shape: Sequence[int],
                    image: Optional[Sequence[int]] = None) -> nn.Module:
    """The connector from a student output of per-sample ``in_shape`` to a teacher output of
    ``out_shape``; ``image`` (H, W): the input's size, which tells the forms apart (without it, both are
    conv maps). ``conv1x1``: always learned; ``auto``: identity where the forms already match."""
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector {kind!r}; valid: {', '.join(CONNECTORS)}.")
    if kind == "auto" and tuple(in_shape) == tuple(out_shape):
        return nn.Identity()
    if image is None and len(in_shape) == 2 == len(out_shape):  # text encoders' hidden states (bkd_core.models.text)
        return SequenceConnector(infer_form(in_shape, None), infer_form(out_shape, None))
    if image is None:
        return Connector(in_shape, out_shape, identity_if_equal=(kind == "auto"))
    source, target = infer_form(in_shape, image, "the student's block"), infer_form(out_shape, image, "the teacher's block")
    if source.kind == target.kind == "map":
        return Connector(in_shape, out_shape, identity_if_equal=(kind == "auto"))
    return FormConnector(source, target)
