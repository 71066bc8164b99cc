"""MobileNetV2 (width 1.0) for 224-px inputs, in torchvision's state-dict layout (``features.0`` ...
``features.18``, ``classifier.1``), so torchvision's published weights load as they are. Cut into 4
blocks at the spatial stages that match an ImageNet ResNet's layer1..layer4 outputs (56, 28, 14, 7 px
for 224-px inputs), the student of the ResNet50 -> MobileNetV2 ImageNet pair.
"""
from __future__ import annotations

import torch
from torch import nn

from ..blocknet import BlockNet

# (expansion t, channels c, repeats n, stride s) of the paper's Table 2 (Sandler et al., 2018).
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
# features indices of each block: up to 56 px, 28 px, 14 px, 7 px (with the last 1x1 conv)
BLOCKS = [range(0, 4), range(4, 7), range(7, 14), range(14, 19)]


class ConvBNReLU(nn.Sequential):  # keys <i>.0 (conv), <i>.1 (bn), as torchvision's Conv2dNormActivation
    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_residual = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNReLU(c_in, hidden, 1)] if expansion != 1 else []
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, c_out, 1, bias=False),
                   nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2ImageNet(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, last_channel: int = 1280) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(in_channels, 32, 3, 2)]
        c_in = 32
        for t, c, n, s in SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c_in, c, s if i == 0 else 1, t))
                c_in = c
        layers.append(ConvBNReLU(c_in, last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv2_imagenet(num_classes: int, in_channels: int = 3) -> BlockNet:
    return BlockNet.from_module(MobileNetV2ImageNet(num_classes, in_channels),
                                blocks=[[f"features.{i}" for i in block] for block in BLOCKS], head=["pool", "classifier.0", "classifier.1"],
                                sample_input=torch.zeros(1, in_channels, 32, 32))
