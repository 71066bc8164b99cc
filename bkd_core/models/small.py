"""Small 3-block models that train in seconds on a CPU: the embedded default pair and the tests."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..blocknet import BlockNet, Head
from .resnet_cifar import cifar_resnet


def plain_cnn(widths: Sequence[int], num_classes: int, in_channels: int = 3) -> BlockNet:
    """One conv-BN-ReLU per block, strides 1, 2, 2."""
    blocks, c_in = [], in_channels
    for width, stride in zip(widths, (1, 2, 2)):
        blocks.append(nn.Sequential(nn.Conv2d(c_in, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)))
        c_in = width
    return BlockNet(blocks, Head([nn.AdaptiveAvgPool2d(1), nn.Linear(c_in, num_classes)]))


def tiny_cnn(num_classes: int, in_channels: int = 3) -> BlockNet:
    """About 6k parameters (10 classes)."""
    return plain_cnn((8, 16, 32), num_classes, in_channels)


def small_cnn(num_classes: int, in_channels: int = 3) -> BlockNet:
    """About 24k parameters (10 classes)."""
    return plain_cnn((16, 32, 64), num_classes, in_channels)


def tiny_resnet(num_classes: int, in_channels: int = 3) -> BlockNet:
    """ResNet-8 with filters 16-32-64-128: about 0.3M parameters, the default teacher."""
    return cifar_resnet(8, (16, 32, 64, 128), num_classes, in_channels)
