"""ConvNeXt in timm's layout and parameter names (``stem.{0,1}``, ``stages.N.downsample.{0,1}``,
``stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}``, ``head.{norm,fc}``), so that ``teacher.init``
loads timm's ConvNeXt checkpoints of the same shape. Written from the paper's description (Liu et al.,
"A ConvNet for the 2020s", 2022). The zoo cuts it at the end of each of its four stages (conv maps).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..blocknet import BlockNet
from .mlp import Mlp


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + gamma * mlp(norm(dwconv7x7(x))), the norm and MLP channels-last."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int) -> None:
        super().__init__()
        self.downsample = (nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
                           if in_dim != dim else nn.Identity())
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    """Global average pooling, LayerNorm, the linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean((2, 3))))


class ConvNeXt(nn.Module):
    """A ConvNeXt classifier: a 4x4 patchify stem, four stages of ``depths`` blocks at ``dims`` channels
    (each after the first halves the resolution), pooling, norm and a linear head."""

    def __init__(self, num_classes: int, in_channels: int = 3, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(*[ConvNeXtStage(dims[max(0, i - 1)], dims[i], depths[i]) for i in range(len(depths))])
        self.head = Head(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def convnext(num_classes: int, in_channels: int = 3, *, depths: Sequence[int] = (3, 3, 9, 3),
             dims: Sequence[int] = (96, 192, 384, 768), image_size: int = 224) -> BlockNet:
    """A ``ConvNeXt`` as a BlockNet cut at the end of each stage (its own parameter names kept)."""
    from ..graph_split import split_model

    model = ConvNeXt(num_classes, in_channels, depths, dims)
    sample = torch.zeros(2, in_channels, image_size, image_size)
    return split_model(model, [f"stages.{i}" for i in range(len(depths))], sample, name=f"ConvNeXt-{dims[0]}")
