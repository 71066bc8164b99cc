"""The model zoo: ``create(name, num_classes, in_channels=3) -> BlockNet`` and ``names()``.

CIFAR-100 community models (written from their published descriptions) with standard stage cuts:
3 blocks for ResNet/WRN/ShuffleNet, 4 for VGG/MobileNetV2/ResNet50 and ImageNet ResNets, so that the
standard teacher/student pairs share their block count.
"""
from __future__ import annotations

import functools
from typing import Callable

from ..blocknet import BlockNet
from .convnext import convnext
from .mobilenetv2 import mobilenetv2
from .mobilenetv2_imagenet import mobilenetv2_imagenet
from .resnet_cifar import cifar_resnet, resnet50_cifar
from .resnet_imagenet import imagenet_resnet
from .shufflenet import shufflenet_v1, shufflenet_v2
from .small import small_cnn, tiny_cnn, tiny_resnet
from .swin import swin
from .vgg import vgg
from .vit import vit
from .wrn import wide_resnet

_P = functools.partial
_REGISTRY: dict[str, Callable[..., BlockNet]] = {
    "resnet8": _P(cifar_resnet, 8, (16, 16, 32, 64)),  # one basic block per stage: the usual small student
    "resnet20": _P(cifar_resnet, 20, (16, 16, 32, 64)),
    "resnet32": _P(cifar_resnet, 32, (16, 16, 32, 64)),
    "resnet56": _P(cifar_resnet, 56, (16, 16, 32, 64)),
    "resnet110": _P(cifar_resnet, 110, (16, 16, 32, 64)),
    "resnet8x4": _P(cifar_resnet, 8, (32, 64, 128, 256)),
    "resnet32x4": _P(cifar_resnet, 32, (32, 64, 128, 256)),
    "wrn_16_2": _P(wide_resnet, 16, 2),
    "wrn_40_1": _P(wide_resnet, 40, 1),
    "wrn_40_2": _P(wide_resnet, 40, 2),
    "vgg8": _P(vgg, "vgg8"),
    "vgg13": _P(vgg, "vgg13"),
    "ResNet50": resnet50_cifar,
    "MobileNetV2": mobilenetv2,
    "ShuffleV1": shufflenet_v1,
    "ShuffleV2": shufflenet_v2,
    "ResNet18": _P(imagenet_resnet, "ResNet18"),
    "ResNet34": _P(imagenet_resnet, "ResNet34"),
    "ResNet50_imagenet": _P(imagenet_resnet, "ResNet50_imagenet"),  # torchvision's layout; "ResNet50" is the CIFAR one
    "MobileNetV2_imagenet": mobilenetv2_imagenet,  # torchvision's layout, width 1.0; "MobileNetV2" is the CIFAR one
    "tiny_cnn": tiny_cnn,
    "small_cnn": small_cnn,
    "tiny_resnet": tiny_resnet,
    # vision transformers in timm's layout, cut into groups of blocks: 3 to pair with the CIFAR models, 4 with ImageNet's
    "vit_tiny_p2_8": _P(vit, image_size=8, patch=2, dim=32, depth=6, heads=2),  # digits-sized (8x8), 16 patches
    "vit_tiny_p4_32": _P(vit, image_size=32, patch=4, dim=192, depth=12, heads=3),  # DeiT-Tiny's width on 32-px images
    "vit_small_p4_32": _P(vit, image_size=32, patch=4, dim=384, depth=12, heads=6),  # ViT-S's width on 32-px images
    "deit_tiny_patch16_224": _P(vit, image_size=224, patch=16, dim=192, depth=12, heads=3, groups=4),
    "vit_small_patch16_224": _P(vit, image_size=224, patch=16, dim=384, depth=12, heads=6, groups=4),
    # Swin-T (channels-last stages) and ConvNeXt-T in timm's layout, cut at their four stages, for 224-px images
    "swin_tiny_patch4_window7_224": swin,
    "convnext_tiny": convnext,
}


def names() -> list[str]:
    """Every model name ``create`` accepts."""
    return list(_REGISTRY)


def create(name: str, num_classes: int, in_channels: int = 3) -> BlockNet:
    """Build a zoo model as a BlockNet."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(names())}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2; got {num_classes}.")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels)
