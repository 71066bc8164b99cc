"""ImageNet ResNets (18/34/50) for 224-px inputs, cut into 4 blocks (stem + layer1, layer2, layer3, layer4).

The attribute layout is torchvision's (``conv1, bn1, layer1.0.conv1, ... layer4.2.downsample.1, fc``),
so a torchvision ``state_dict`` file (e.g. ``resnet34-b627a593.pth``) loads with
``bkd_core.train.load_state_checked`` whether or not torchvision is installed: ``BlockNet.from_module``
records each tensor's original name. ResNet50 uses the "v1.5" bottleneck (stride on the 3x3 conv).
"""
from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import torch
from torch import nn

from ..blocknet import BlockNet


def downsample(c_in: int, c_out: int, stride: int) -> Optional[nn.Sequential]:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


Block = Union[Type[BasicBlock], Type[Bottleneck]]
ARCHITECTURES: dict[str, tuple[Block, tuple[int, int, int, int]]] = {
    "ResNet18": (BasicBlock, (2, 2, 2, 2)),
    "ResNet34": (BasicBlock, (3, 4, 6, 3)),
    "ResNet50_imagenet": (Bottleneck, (3, 4, 6, 3)),
}


class ImageNetResNet(nn.Module):
    def __init__(self, block: Block, counts: Sequence[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c_in = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), counts)):
            layers = []
            for i in range(count):
                layers.append(block(c_in, planes, (1 if index == 0 else 2) if i == 0 else 1))
                c_in = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def imagenet_resnet(name: str, num_classes: int, in_channels: int = 3) -> BlockNet:
    block, counts = ARCHITECTURES[name]
    return BlockNet.from_module(
        ImageNetResNet(block, counts, num_classes, in_channels),
        stem=["conv1", "bn1", "relu", "maxpool"],
        blocks=["layer1", "layer2", "layer3", "layer4"],
        head=["avgpool", "fc"],
        sample_input=torch.zeros(1, in_channels, 32, 32),
    )
