"""Swin Transformer in timm's layout and parameter names (``patch_embed.{proj,norm}``,
``layers.N.downsample.{norm,reduction}``, ``layers.N.blocks.M.{norm1,attn.qkv,attn.relative_position_bias_table,
attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head.fc``), so that ``teacher.init`` loads timm's Swin
checkpoints of the same shape. Written from the paper's description (Liu et al., "Swin Transformer", 2021).

Every stage writes channels-last maps (B, H, W, C); the zoo cuts it at the end of each of its four stages.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..blocknet import BlockNet
from .mlp import Mlp


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, window * window, C)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """(B * windows, window * window, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.reshape(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """For every pair of positions in a window, the row of the bias table of their offset."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offsets = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return offsets[..., 0] * (2 * window - 1) + offsets[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """-100 where two positions of a shifted window come from different regions of the map, else 0."""
    regions = torch.zeros(1, h, w, 1)
    label = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            regions[:, rows, cols, :] = label
            label += 1
    ids = window_partition(regions, window).squeeze(-1)
    mask = ids[:, None, :] - ids[:, :, None]
    return mask.masked_fill(mask != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a learned bias per relative position."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.flatten()].reshape(n, n, -1).permute(2, 0, 1)
        attn = q * self.scale @ k.transpose(-2, -1) + bias.unsqueeze(0)
        if mask is not None:
            windows = mask.shape[0]
            attn = (attn.reshape(-1, windows, self.heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).reshape(-1, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))


class SwinBlock(nn.Module):
    """Window attention (shifted by half a window in every second block) and an MLP, both pre-norm
    residual, on a (B, H, W, C) map."""

    def __init__(self, dim: int, heads: int, resolution: tuple[int, int], window: int, shifted: bool) -> None:
        super().__init__()
        self.window = min(window, *resolution)
        self.shift = self.window // 2 if shifted and min(resolution) > window else 0
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads, self.window)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, 4 * dim)
        mask = shifted_window_mask(*resolution, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = window_reverse(self.attn(window_partition(y, self.window), self.attn_mask), self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood's channels concatenated, normalised and projected to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, resolution: tuple[int, int], depth: int, heads: int, window: int,
                 downsample: bool) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim) if downsample else nn.Identity()
        if downsample:
            resolution = (resolution[0] // 2, resolution[1] // 2)
        self.blocks = nn.Sequential(*[SwinBlock(out_dim, heads, resolution, window, shifted=i % 2 == 1) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class ClassifierHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((1, 2)))


class SwinTransformer(nn.Module):
    """A Swin classifier: 4x4 patches, four stages of shifted-window blocks (each after the first merges
    2x2 patches and doubles the channels), a final norm, average pooling and a linear head."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 224, patch: int = 4, dim: int = 96,
                 depths: Sequence[int] = (2, 2, 6, 2), heads: Sequence[int] = (3, 6, 12, 24), window: int = 7) -> None:
        super().__init__()
        side = image_size // patch
        if image_size % patch or side % (2 ** (len(depths) - 1)):
            raise ValueError(f"image_size {image_size} must be the patch size {patch} times a multiple of "
                             f"{2 ** (len(depths) - 1)} (every stage after the first halves the grid).")
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        dims = [dim * 2**i for i in range(len(depths))]
        stages, resolution = [], (side, side)
        for i, depth in enumerate(depths):
            stages.append(SwinStage(dims[max(0, i - 1)], dims[i], resolution, depth, heads[i], window, downsample=i > 0))
            if i > 0:
                resolution = (resolution[0] // 2, resolution[1] // 2)
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = ClassifierHead(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.layers(self.patch_embed(x))))


def swin(num_classes: int, in_channels: int = 3, *, image_size: int = 224, patch: int = 4, dim: int = 96,
         depths: Sequence[int] = (2, 2, 6, 2), heads: Sequence[int] = (3, 6, 12, 24), window: int = 7) -> BlockNet:
    """A ``SwinTransformer`` as a BlockNet cut at the end of each stage (its own parameter names kept)."""
    from ..graph_split import split_model

    model = SwinTransformer(num_classes, in_channels, image_size, patch, dim, depths, heads, window)
    sample = torch.zeros(2, in_channels, image_size, image_size)
    return split_model(model, [f"layers.{i}" for i in range(len(depths))], sample, name=f"Swin-{dim}")
