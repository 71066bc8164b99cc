"""Wide ResNets (Zagoruyko & Komodakis, 2016): pre-activation blocks, 3 stages, widths 16k/32k/64k."""
from __future__ import annotations

import torch
from torch import nn

from ..blocknet import BlockNet, Head


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(depth: int, widen: int, num_classes: int, in_channels: int = 3) -> BlockNet:
    """WRN-depth-widen: 3 blocks (stem folded into the first), head = BN-ReLU-pool-FC."""
    if (depth - 4) % 6 != 0:
        raise ValueError(f"WRN depth must be 6n+4 (16, 28, 40, ...); got {depth}.")
    n = (depth - 4) // 6
    widths = [16, 16 * widen, 32 * widen, 64 * widen]
    stages = []
    for stage, stride in enumerate((1, 2, 2)):
        c_in, c_out = widths[stage], widths[stage + 1]
        stages.append(nn.Sequential(*[PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)]))
    stages[0] = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), stages[0])
    head = Head([nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Linear(widths[3], num_classes)])
    return BlockNet(stages, head)
