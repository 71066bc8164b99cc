"""Hugging Face image transformers (``ViTForImageClassification``, ``DeiTForImageClassification`` and their
kin: ``embeddings``, a list of ``layers``, ``layernorm``, a classifier on the class token) as blocks, cut by
hand: transformers 5 has no ``torch.fx`` tracer, so ``graph_split`` cannot cut their forward. The modules are
the model's own (names kept, ``save_pretrained`` saves what trained); the blocks output token sequences
(class token + patch grid), which the token connectors bridge. A model of your own returns it from its
factory: ``pair.teacher=mymodels:hf_vit``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..blocknet import BlockNet
from ..exactness import check_same_output
from .text import group_layers


class Layers(nn.Module):
    """Consecutive transformer layers (every token attends to every token: no mask)."""

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            out = layer(x)
            x = out[0] if isinstance(out, tuple) else out
        return x


class ClassTokenHead(nn.Module):
    """The final LayerNorm, then the classifier on the class token."""

    def __init__(self, layernorm: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.layernorm, self.classifier = layernorm, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layernorm(x)[:, 0])


def from_hf_image(model: nn.Module, groups: int = 3, sample: Optional[torch.Tensor] = None) -> BlockNet:
    """An image transformer classifier as a BlockNet: its embeddings and ``groups`` runs of layers (3 pair with
    the CIFAR CNNs, 4 with ImageNet's). With ``sample`` (images), the blocks must give the model's own logits (a
    ``SplitError`` says by how much they differ)."""
    model.eval()
    base = getattr(model, "base_model", None)
    if base is None or not all(hasattr(base, a) for a in ("embeddings", "layers", "layernorm")) or not hasattr(model, "classifier"):
        raise ValueError(f"{type(model).__name__} is not an image transformer bkd cuts by hand (embeddings, layers, "
                         "layernorm, a classifier on the class token, as ViT and DeiT); cut it yourself as a BlockNet, or use "
                         "the zoo's timm-layout models.")
    layers, runs = list(base.layers), group_layers(len(base.layers), groups)
    first = nn.Sequential(base.embeddings, Layers([layers[i] for i in runs[0]]))  # the embeddings open block 1
    net = BlockNet([first, *(Layers([layers[i] for i in run]) for run in runs[1:])], ClassTokenHead(base.layernorm, model.classifier))
    net.remember_source(model)
    if sample is not None:  # the blocks must give the model's own logits
        check_same_output(model, net, sample, type(model).__name__, lambda x: model(pixel_values=x).logits)
    return net
