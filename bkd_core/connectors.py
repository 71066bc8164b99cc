"""Connectors C_i: map a student feature map into the teacher's feature shape at a cut."""
from __future__ import annotations

from typing import Sequence

from torch import nn

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


def build_connector(kind: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> nn.Module:
    """``conv1x1``: always a learned 1x1 conv + BN; ``auto``: identity where shapes already match."""
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector {kind!r}; valid: {', '.join(CONNECTORS)}.")
    if kind == "auto" and tuple(in_shape) == tuple(out_shape):
        return nn.Identity()
    return Connector(in_shape, out_shape, identity_if_equal=(kind == "auto"))
