"""Causal language models as blocks: a Hugging Face decoder (``AutoModelForCausalLM`` of the Llama, Qwen2/Qwen3,
Mistral, Phi-3 or GPT-2 families) cut into its embeddings, groups of consecutive decoder layers, and a head of the
final norm and the LM head. The modules are the model's own (shared, not copied): ``save_pretrained`` on the
model saves what trained.

A batch is one tensor, ``pack_lm(input_ids, attention_mask)`` of shape (B, 2, L). Every block's output is the hidden
states with the attention mask as one more channel, (B, L, D + 1), as for text encoders (``bkd_core.models.text``):
each decoder block rebuilds, from that mask, what its layers need: the causal and padding mask, position ids
(counted over the real tokens, so that left and right padding give the same logits) and rotary embeddings. No KV
cache is used. The head returns (B, L, V) next-token logits.

A packed row holds several examples: its mask numbers them 1, 2, 3, ... (0: padding). Each example's positions
start at 0 and its tokens attend to its own tokens only, so a packed row gives every example the logits it gets
alone (``bkd_core.data.lm.pack_rows`` makes such rows).

``transformers`` is imported only when a model is wrapped (``pip install 'bkd[text]'``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..blocknet import BlockNet
from ..exactness import SplitError
from .text import group_layers, layer_runs, split_mask, with_mask

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gpt2")


def pack_lm(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, L) token ids and mask (1 for tokens, 0 for padding, on either side) as one (B, 2, L) long tensor."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return torch.stack([input_ids, mask], dim=1).long()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over the real tokens: 0 at each example's first token, whichever side pads; in a packed
    row (the mask numbers the examples 1, 2, ...) each example counts from 0 again."""
    mask = mask.long()
    steps = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    starts = torch.ones_like(mask, dtype=torch.bool)
    starts[..., 1:] = mask[..., 1:] != mask[..., :-1]  # a new example (or the padding) begins here
    first = torch.cummax(torch.where(starts, steps, torch.zeros_like(steps)), dim=-1).values
    return torch.where(mask > 0, steps - first, torch.zeros_like(steps))


def is_causal_lm(model: nn.Module) -> bool:
    """Whether bkd cuts ``model`` as a decoder: a Llama-layout (``model.layers``) or GPT-2 (``transformer.h``) LM."""
    return _layout(model) is not None


def _layout(model: nn.Module) -> Optional[str]:
    base = getattr(model, "model", None)
    if hasattr(model, "lm_head") and hasattr(base, "layers") and hasattr(base, "embed_tokens") and hasattr(base, "norm"):
        return "llama"
    base = getattr(model, "transformer", None)
    if hasattr(model, "lm_head") and hasattr(base, "h") and hasattr(base, "wte") and hasattr(base, "wpe"):
        return "gpt2"
    return None


def decoder_layer_count(model: nn.Module) -> int:
    """How many decoder layers a causal LM has (0 for a model bkd does not cut as a decoder)."""
    layout = _layout(model)
    if layout == "llama":
        return len(model.model.layers)
    return len(model.transformer.h) if layout == "gpt2" else 0


class TokenEmbeddings(nn.Module):
    """Block 1 of a Llama-layout decoder: the token embeddings, the mask carried along."""

    def __init__(self, embed_tokens: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        return with_mask(self.embed_tokens(ids), mask)


class GPT2Embeddings(nn.Module):
    """Block 1 of GPT-2: token plus learned position embeddings (positions over the real tokens), then dropout."""

    def __init__(self, wte: nn.Module, wpe: nn.Module, drop: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.drop = wte, wpe, drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.drop(self.wte(ids) + self.wpe(positions(mask)))
        return with_mask(hidden, mask)


class DecoderLayers(nn.Module):
    """Consecutive decoder layers; each sees the causal mask (full or sliding-window, as its config says), the
    position ids and the rotary embeddings the model itself would build for the batch's attention mask."""

    def __init__(self, layers: Sequence[nn.Module], run: range, config, rotary: Optional[nn.Module], gpt2: bool,
                 kinds: Sequence[str]) -> None:
        from transformers.masking_utils import (create_causal_mask, create_sliding_window_causal_mask,
                                                packed_sequence_mask_function)

        super().__init__()
        self.within_example = packed_sequence_mask_function  # a packed row: attention stays within each example
        self.layers, self.config, self.gpt2 = nn.ModuleList(layers), config, gpt2
        self.rotary = rotary  # parameter-free (its inv_freq is not saved): registered in every block, moved with it
        self.kinds = [kinds[i] for i in run]
        self.masks = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, mask = split_mask(x)
        mask = mask.long()
        pos = positions(mask)
        packed = {"and_mask_function": self.within_example(mask)} if bool((mask > 1).any()) else {}
        made = {kind: self.masks[kind](config=self.config, inputs_embeds=hidden, attention_mask=(mask > 0).long(), cache=None,
                                       position_ids=pos, **packed) for kind in set(self.kinds)}
        rotary = self.rotary(hidden, position_ids=pos) if self.rotary is not None else None
        for layer, kind in zip(self.layers, self.kinds):
            if self.gpt2:
                out = layer(hidden, None, made[kind], position_ids=pos)
            else:
                out = layer(hidden, attention_mask=made[kind], position_embeddings=rotary, position_ids=pos)
            hidden = out[0] if isinstance(out, tuple) else out
        return with_mask(hidden, mask)


class LMHead(nn.Module):
    """The final norm and the LM head: (B, L, D + 1) hidden states to (B, L, V) next-token logits."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = split_mask(x)
        return self.lm_head(self.norm(hidden))


def attention_kinds(model: nn.Module, count: int) -> list[str]:
    """Each decoder layer's mask, as the model's own forward picks it: per layer from ``config.layer_types`` where the
    model keeps one mask per kind (Qwen2, Qwen3), sliding-window for every layer where the config sets a window and the
    model uses one mask (Mistral, Phi-3), else causal."""
    config = model.config
    base = getattr(model, "model", None)
    if hasattr(base, "has_sliding_layers") and getattr(config, "layer_types", None):
        return list(config.layer_types)[:count]
    if getattr(config, "sliding_window", None) and getattr(config, "model_type", "") in ("mistral", "phi3"):
        return ["sliding_attention"] * count
    return ["full_attention"] * count


def from_hf_causal(model: nn.Module, groups: Optional[int] = None, ends: Optional[Sequence[int]] = None,
                   sample: Optional[torch.Tensor] = None) -> BlockNet:
    """A causal LM as a BlockNet: the embeddings, then ``groups`` runs of decoder layers (default: one per layer), or
    the runs that end at the 0-based layers ``ends``, then the final norm and LM head. Its ``block_ends`` name them
    (``embeddings``, ``layer.<last layer of the run>``). With ``sample`` (a ``pack_lm`` batch, padded on either
    side), the blocks must give the model's own logits at every real token (``check_same_lm_logits``)."""
    model.eval()
    layout = _layout(model)
    kind = getattr(model.config, "model_type", "")
    if layout is None:
        raise ValueError(f"{type(model).__name__} ({kind or 'unknown type'}) is not a decoder bkd cuts into blocks: give an "
                         f"AutoModelForCausalLM of the {', '.join(FAMILIES)} families.")
    if layout == "llama":
        base = model.model
        layers, embeddings, norm = list(base.layers), TokenEmbeddings(base.embed_tokens), base.norm
        rotary = getattr(base, "rotary_emb", None)
    else:
        base = model.transformer
        layers, embeddings, norm, rotary = list(base.h), GPT2Embeddings(base.wte, base.wpe, base.drop), base.ln_f, None
    runs = layer_runs(ends, len(layers)) if ends is not None else group_layers(len(layers), groups or len(layers))
    blocks: list[nn.Module] = [embeddings]
    kinds = attention_kinds(model, len(layers))
    blocks += [DecoderLayers([layers[i] for i in run], run, model.config, rotary, layout == "gpt2", kinds) for run in runs]
    net = BlockNet(blocks, LMHead(norm, model.lm_head))
    net.remember_source(model)
    net.block_ends = ["embeddings"] + [f"layer.{run[-1]}" for run in runs]
    net.lead_blocks = 1  # the embeddings stay a block of their own when layers are grouped to pair two decoders
    net.token_level = True  # logits per token: (B, L, V)
    if sample is not None:
        check_same_lm_logits(model, net, sample)
    return net


@torch.no_grad()
def check_same_lm_logits(model: nn.Module, net: BlockNet, sample: torch.Tensor, tolerance: float = 1e-4) -> None:
    """The blocks must give the model's own logits (called with the same position ids) at every real token of a
    padded batch, in eval mode; a ``SplitError`` says by how much they differ."""
    was_training = model.training
    model.eval()
    try:
        ids, mask = sample[:, 0].long(), sample[:, 1].long()
        theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False).logits
        ours = net(sample.long())
        real = mask.bool()
        gap = (theirs[real] - ours[real]).abs().max().item() if real.any() else 0.0
        scale = max(1.0, theirs[real].abs().max().item()) if real.any() else 1.0
        if not gap <= tolerance * scale:
            raise SplitError(f"the blocks of {type(model).__name__} give logits up to {gap:.3g} away from the model's own "
                             "on a padded batch: its forward does something between its layers that bkd does not repeat.")
    finally:
        model.train(was_training)
