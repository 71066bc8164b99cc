"""Vision transformers in timm's layout and parameter names (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``head``), so that
``teacher.init`` loads timm's checkpoints of the same shape. Written from the ViT and DeiT papers'
descriptions (Dosovitskiy et al., 2021; Touvron et al., 2021).

In the zoo a ViT is cut into groups of consecutive transformer blocks (``blocks.N`` ends a group), as many
groups as the CNNs it pairs with have stages.
"""
from __future__ import annotations

import torch
from torch import nn

from ..blocknet import BlockNet
from .mlp import Mlp


class PatchEmbed(nn.Module):
    """Non-overlapping patches as tokens: a strided convolution, then (B, N, D)."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A ViT classifier on ``image_size`` images: patch tokens, a class token, learned position
    embeddings, ``depth`` blocks, a final norm and a linear head on the class token."""

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int = 224, patch: int = 16, dim: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}.")
        self.image_size = image_size
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def group_ends(depth: int, groups: int) -> list[str]:
    """The ``blocks.N`` that end ``groups`` runs of consecutive blocks of about equal length."""
    return [f"blocks.{round((g + 1) * depth / groups) - 1}" for g in range(groups)]


def vit(num_classes: int, in_channels: int = 3, *, image_size: int, patch: int, dim: int, depth: int, heads: int,
        groups: int = 3) -> BlockNet:
    """A ``VisionTransformer`` as a BlockNet of ``groups`` blocks (its own parameter names kept)."""
    from ..graph_split import split_model

    model = VisionTransformer(num_classes, in_channels, image_size, patch, dim, depth, heads)
    sample = torch.zeros(2, in_channels, image_size, image_size)
    return split_model(model, group_ends(depth, groups), sample, name=f"ViT-{dim}x{depth}")
