"""ShuffleNet V1 (Zhang et al., 2018; groups=3) and V2 (Ma et al., 2018; 1.0x) for 32x32 inputs, 3 blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..blocknet import BlockNet, Head


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)
    )


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1; stride 2 concatenates a pooled shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        first_groups = 1 if c_in == 24 else groups  # the stem's 24 channels are not grouped
        self.groups = first_groups
        self.reduce = conv_bn(c_in, mid, 1, groups=first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid)
        self.expand = conv_bn(mid, c_out, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.reduce(x)), self.groups)
        out = self.expand(F.relu(self.depthwise(out)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], dim=1))
        return F.relu(out + x)


def shufflenet_v1(num_classes: int, in_channels: int = 3, groups: int = 3) -> BlockNet:
    widths, repeats = (240, 480, 960), (4, 8, 4)
    stem = nn.Sequential(conv_bn(in_channels, 24, 1), nn.ReLU(inplace=True))
    blocks, c_in = [], 24
    for width, count in zip(widths, repeats):
        units = [ShuffleV1Unit(c_in, width - c_in, 2, groups)]
        units += [ShuffleV1Unit(width, width, 1, groups) for _ in range(count - 1)]
        blocks.append(nn.Sequential(*units))
        c_in = width
    blocks[0] = nn.Sequential(stem, blocks[0])
    return BlockNet(blocks, Head([nn.AdaptiveAvgPool2d(1), nn.Linear(c_in, num_classes)]))


class ShuffleV2Unit(nn.Module):
    """Channel split; one half through 1x1 -> dw 3x3 -> 1x1; concat; shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1), nn.ReLU(inplace=True), conv_bn(half, half, 3, groups=half),
            conv_bn(half, half, 1), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(work)], dim=1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: both branches downsample, outputs concatenated to ``c_out`` channels."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.left = nn.Sequential(conv_bn(c_in, c_in, 3, 2, groups=c_in), conv_bn(c_in, mid, 1), nn.ReLU(inplace=True))
        self.right = nn.Sequential(
            conv_bn(c_in, mid, 1), nn.ReLU(inplace=True), conv_bn(mid, mid, 3, 2, groups=mid),
            conv_bn(mid, mid, 1), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], dim=1), 2)


def shufflenet_v2(num_classes: int, in_channels: int = 3) -> BlockNet:
    widths, repeats, last = (116, 232, 464), (3, 7, 3), 1024
    stem = nn.Sequential(conv_bn(in_channels, 24, 1), nn.ReLU(inplace=True))
    blocks, c_in = [], 24
    for width, count in zip(widths, repeats):
        blocks.append(nn.Sequential(ShuffleV2Down(c_in, width), *[ShuffleV2Unit(width) for _ in range(count)]))
        c_in = width
    blocks[0] = nn.Sequential(stem, blocks[0])
    head = Head([conv_bn(c_in, last, 1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Linear(last, num_classes)])
    return BlockNet(blocks, head)
