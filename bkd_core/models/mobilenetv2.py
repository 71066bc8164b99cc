"""MobileNetV2 for 32x32 inputs (Sandler et al., 2018), width 0.5 by default, 4 blocks."""
from __future__ import annotations

import torch
from torch import nn

from ..blocknet import BlockNet, Head

# (expansion, channels, repeats, stride) per group, as in the paper's Table 2 with a CIFAR stem.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
# groups of SETTINGS that make each block (cuts after spatial stages).
BLOCK_GROUPS = [(0, 1), (2,), (3, 4), (5, 6)]


def conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.body = nn.Sequential(
            *conv_bn_relu(c_in, hidden, 1),
            *conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


def mobilenetv2(num_classes: int, in_channels: int = 3, width: float = 0.5, last_channel: int = 1280) -> BlockNet:
    c_in = int(32 * width)
    groups = []
    for expansion, channels, repeats, stride in SETTINGS:
        c_out = int(channels * width)
        layers = []
        for i in range(repeats):
            layers.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
            c_in = c_out
        groups.append(nn.Sequential(*layers))
    stem = nn.Sequential(*conv_bn_relu(in_channels, int(32 * width), 3, stride=2))
    blocks = [nn.Sequential(*[groups[g] for g in idx]) for idx in BLOCK_GROUPS]
    blocks[0] = nn.Sequential(stem, blocks[0])
    head = Head([*conv_bn_relu(c_in, last_channel, 1), nn.AdaptiveAvgPool2d(1), nn.Linear(last_channel, num_classes)])
    return BlockNet(blocks, head)
