"""The forms a block's output takes, found from its shape and the input image's shape.

- ``map``: a conv feature map (C, H, W), as CNNs write it;
- ``channels_last``: a map as (H, W, C), as Swin and ConvNeXt write theirs in timm's layout;
- ``tokens``: a sequence (N, D) of ``prefix`` tokens (class, distillation or register tokens) before a
  grid of H x W patch tokens, as vision transformers write it;
- ``vector``: a pooled (D,) vector;
- ``sequence``: a text encoder's (L, D + 1): hidden states of L tokens with the attention mask as the last
  channel (``bkd_core.models.text``), told apart by the input not being an image.

A 4-D output is a ``map`` when its last two sizes follow the image's aspect ratio, ``channels_last`` when
its first two do and its last does not (square images: H == W). Shapes are per sample (no batch size).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch

FORMS = ("map", "channels_last", "tokens", "vector", "sequence")
MAX_PREFIX = 8  # class + distillation + register tokens of the usual vision transformers


class FormError(ValueError):
    """A block output bkd cannot bridge (a 5-D tensor, tokens whose count fits no grid)."""


@dataclass(frozen=True)
class Form:
    """A block output: its kind, channels (D for tokens and vectors), grid (H, W) and prefix tokens."""

    kind: str
    channels: int
    grid: tuple[int, int] = (1, 1)
    prefix: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape this form has."""
        h, w = self.grid
        return {"map": (self.channels, h, w), "channels_last": (h, w, self.channels),
                "tokens": (self.prefix + h * w, self.channels), "vector": (self.channels,),
                "sequence": (h, self.channels + 1)}[self.kind]

    def __str__(self) -> str:
        h, w = self.grid
        if self.kind == "tokens":
            return f"tokens {self.prefix}+{h}x{w} of {self.channels}"
        if self.kind == "vector":
            return f"vector {self.channels}"
        if self.kind == "sequence":
            return f"sequence of {self.channels} (+ mask)"
        return f"{'map' if self.kind == 'map' else 'channels-last map'} {self.channels}@{h}x{w}"


def _follows(h: int, w: int, image: tuple[int, int]) -> bool:
    """Whether an (h, w) grid is the image scaled by one factor, both sides rounded down or both up (as
    strided convolutions and patch embeddings make it)."""
    ih, iw = image
    if h < 1 or w < 1:
        return False
    down = max(h / ih, w / iw) < min((h + 1) / ih, (w + 1) / iw)
    up = max((h - 1) / ih, (w - 1) / iw) < min(h / ih, w / iw)
    return down or up


def grid_of(count: int, image: tuple[int, int]) -> tuple[int, int] | None:
    """The (h, w) grid of ``count`` cells that has the image's aspect ratio, or None."""
    ih, iw = image
    h = max(1, round(math.sqrt(count * ih / iw)))
    for cand in (h, h - 1, h + 1):
        if cand > 0 and count % cand == 0 and _follows(cand, count // cand, image):
            return cand, count // cand
    return None


def infer_form(shape: Sequence[int], image: Sequence[int] | None, where: str = "a block") -> Form:
    """The form of a per-sample output ``shape`` of a model fed images of ``image`` = (H, W); ``image=None``:
    the model reads text, and a 2-D output is a ``sequence``."""
    shape = tuple(int(s) for s in shape)
    if image is None:
        if len(shape) == 2:
            return Form("sequence", shape[1] - 1, (shape[0], 1))
        if len(shape) == 1:
            return Form("vector", shape[0])
        raise FormError(f"{where} outputs a tensor of shape (B, {', '.join(map(str, shape))}) from text; bkd bridges a text "
                        "encoder's hidden states (B, L, D + 1) (bkd_core.models.text).")
    image = (int(image[0]), int(image[1]))
    if len(shape) == 3:
        a, b, c = shape
        first, last = _follows(b, c, image), _follows(a, b, image)
        if last and not first:
            return Form("channels_last", c, (a, b))
        return Form("map", a, (b, c))
    if len(shape) == 2:
        n, d = shape
        for prefix in range(0, min(MAX_PREFIX, n - 1) + 1):
            grid = grid_of(n - prefix, image)
            if grid is not None:
                return Form("tokens", d, grid, prefix)
        raise FormError(f"{where} outputs {n} tokens of {d}, and no count of up to {MAX_PREFIX} prefix tokens leaves a grid "
                        f"with the {image[0]}x{image[1]} image's aspect ratio; bkd bridges {describe_forms()}. Cut where "
                        "the tokens are patches of the image (pair.*_blocks=[...]).")
    if len(shape) == 1:
        return Form("vector", shape[0])
    raise FormError(f"{where} outputs a {len(shape) + 1}-D tensor of shape (B, {', '.join(map(str, shape))}); bkd bridges "
                    f"{describe_forms()}. Cut at modules whose outputs have one of these forms (pair.*_blocks=[...]).")


def describe_forms() -> str:
    return ("conv maps (B, C, H, W), channels-last maps (B, H, W, C), token sequences (B, N, D) with up to "
            f"{MAX_PREFIX} prefix tokens before a patch grid, and pooled vectors (B, D)")


def as_map(x: "torch.Tensor", form: Form) -> "torch.Tensor":
    """A batch of ``form`` outputs as (B, C, H, W) maps: channels-last permuted, tokens without their
    prefix folded into their grid, a vector as a 1x1 map."""
    if form.kind == "channels_last":
        return x.permute(0, 3, 1, 2)
    if form.kind == "tokens":
        return x[:, form.prefix:].transpose(1, 2).reshape(x.shape[0], form.channels, *form.grid)
    if form.kind == "vector":
        return x[:, :, None, None]
    if form.kind == "sequence":  # the hidden states as a (D, L, 1) map; the mask dropped
        return x[..., :-1].transpose(1, 2).unsqueeze(-1)
    return x


def pooled(x: "torch.Tensor", form: Form) -> "torch.Tensor":
    """A batch of ``form`` outputs as (B, C) embeddings: a map's spatial mean, the first prefix token of
    token sequences that have one (a class token), else the tokens' mean, a vector as it is."""
    if form.kind == "map":
        return x.mean((2, 3))
    if form.kind == "channels_last":
        return x.mean((1, 2))
    if form.kind == "tokens":
        return x[:, 0] if form.prefix else x.mean(1)
    if form.kind == "sequence":  # the first token ([CLS])
        return x[:, 0, :-1]
    return x
