"""VGG with batch norm for 32x32 inputs (Simonyan & Zisserman, 2015): 5 conv groups, 4 blocks."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..blocknet import BlockNet, Head

VGG_GROUPS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def conv_group(c_in: int, widths: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(c_in, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c_in = width
    return nn.Sequential(*layers)


def vgg(name: str, num_classes: int, in_channels: int = 3) -> BlockNet:
    """Blocks: group1+pool, group2+pool, group3+pool, group4+pool+group5; head = pool + FC."""
    groups, c_in, built = VGG_GROUPS[name], in_channels, []
    for widths in groups:
        built.append(conv_group(c_in, widths))
        c_in = widths[-1]
    pool = lambda: nn.MaxPool2d(2)  # noqa: E731
    blocks = [
        nn.Sequential(built[0], pool()),
        nn.Sequential(built[1], pool()),
        nn.Sequential(built[2], pool()),
        nn.Sequential(built[3], pool(), built[4]),
    ]
    return BlockNet(blocks, Head([nn.AdaptiveAvgPool2d(1), nn.Linear(c_in, num_classes)]))
