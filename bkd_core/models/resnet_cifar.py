"""CIFAR ResNets (He et al., 2016) as BlockNets: 3 stages (resnet20..110, resnet8x4/32x4), and the
CIFAR variant of ResNet50 (4 stages of bottlenecks, 3x3 stem without max-pool)."""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import nn

from ..blocknet import BlockNet, Head


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn(c_in, planes, 3, stride)
        self.conv2 = conv_bn(planes, planes, 3)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = conv_bn(c_in, planes, 1, stride) if stride != 1 or c_in != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = conv_bn(c_in, planes, 1)
        self.conv2 = conv_bn(planes, planes, 3, stride)
        self.conv3 = conv_bn(planes, c_out, 1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.relu(self.conv2(out))
        return self.relu(self.conv3(out) + self.shortcut(x))


Block = Type[Union[BasicBlock, Bottleneck]]


def make_stage(block: Block, c_in: int, planes: int, count: int, stride: int) -> nn.Sequential:
    layers = []
    for i in range(count):
        layers.append(block(c_in, planes, stride if i == 0 else 1))
        c_in = planes * block.expansion
    return nn.Sequential(*layers)


def classifier_head(channels: int, num_classes: int) -> Head:
    return Head([nn.AdaptiveAvgPool2d(1), nn.Linear(channels, num_classes)])


def cifar_resnet(
    depth: int, filters: Sequence[int], num_classes: int, in_channels: int = 3, block: Block = BasicBlock
) -> BlockNet:
    """ResNet-``depth`` with ``filters = [stem, stage1, stage2, stage3]``: 3 blocks, strides 1, 2, 2."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...); got {depth}.")
    n = (depth - 2) // 6
    stem = nn.Sequential(conv_bn(in_channels, filters[0], 3), nn.ReLU(inplace=True))
    blocks = [
        nn.Sequential(stem, make_stage(block, filters[0], filters[1], n, 1)),
        make_stage(block, filters[1], filters[2], n, 2),
        make_stage(block, filters[2], filters[3], n, 2),
    ]
    return BlockNet(blocks, classifier_head(filters[3] * block.expansion, num_classes))


def resnet50_cifar(num_classes: int, in_channels: int = 3) -> BlockNet:
    """ResNet50 for 32x32 inputs: 3x3 stem, bottleneck stages [3, 4, 6, 3], 4 blocks."""
    stem = nn.Sequential(conv_bn(in_channels, 64, 3), nn.ReLU(inplace=True))
    widths, counts, strides = (64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)
    blocks, c_in = [], 64
    for width, count, stride in zip(widths, counts, strides):
        blocks.append(make_stage(Bottleneck, c_in, width, count, stride))
        c_in = width * Bottleneck.expansion
    blocks[0] = nn.Sequential(stem, blocks[0])
    return BlockNet(blocks, classifier_head(c_in, num_classes))
