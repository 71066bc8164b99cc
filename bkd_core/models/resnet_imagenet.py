"""ImageNet ResNet18/34, torchvision-style attribute names, cut into 4 blocks by BlockNet.from_module.

torchvision's definition is used when it is installed (so its pretrained weights load); otherwise
our own with the same attribute layout (conv1, bn1, relu, maxpool, layer1..4, avgpool, fc).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..blocknet import BlockNet
from .resnet_cifar import BasicBlock, make_stage

IMAGENET_DEPTHS = {"ResNet18": (2, 2, 2, 2), "ResNet34": (3, 4, 6, 3)}


class ImageNetResNet(nn.Module):
    def __init__(self, counts: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = make_stage(BasicBlock, 64, 64, counts[0], 1)
        self.layer2 = make_stage(BasicBlock, 64, 128, counts[1], 2)
        self.layer3 = make_stage(BasicBlock, 128, 256, counts[2], 2)
        self.layer4 = make_stage(BasicBlock, 256, 512, counts[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def torchvision_style_resnet(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    try:
        import torchvision.models as tvm  # optional: pretrained weights load into this definition
    except Exception:  # not installed, or a build that does not match torch
        tvm = None
    if tvm is not None and in_channels == 3:
        return getattr(tvm, name.lower())(num_classes=num_classes)
    return ImageNetResNet(IMAGENET_DEPTHS[name], num_classes, in_channels)


def imagenet_resnet(name: str, num_classes: int, in_channels: int = 3) -> BlockNet:
    model = torchvision_style_resnet(name, num_classes, in_channels)
    return BlockNet.from_module(
        model,
        stem=["conv1", "bn1", "relu", "maxpool"],
        blocks=["layer1", "layer2", "layer3", "layer4"],
        head=["avgpool", "fc"],
    )
