"""Text classifiers as blocks: a Hugging Face encoder (``AutoModelForSequenceClassification`` of the BERT,
RoBERTa, ELECTRA, DistilBERT or DeBERTa families) cut into its embeddings and groups of consecutive encoder layers,
with its own pooler and classifier as the head. The modules are the model's own (shared, not copied): its
parameter names are kept (``BlockNet.source_state_dict``) and ``model.save_pretrained`` saves what trained.

A batch is one tensor, ``pack(input_ids, attention_mask, token_type_ids)`` of shape (B, 3, L), so that it
moves, slices and stacks as an image batch does. Every block's output is the hidden states with the
attention mask as one more channel, (B, L, D + 1): the mask reaches every layer of the student, of the
teacher and of every stepping stone, also when stones are stacked along the batch.

``transformers`` is imported only when a model is wrapped (``pip install 'bkd[text]'``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..blocknet import BlockNet
from ..exactness import check_same_output


def pack(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
         token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, L) token ids, mask and segment ids as one (B, 3, L) long tensor (mask: 1 for tokens, 0 for padding)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
    return torch.stack([input_ids, mask, types], dim=1).long()


class PackedClassifier(nn.Module):
    """A Hugging Face sequence classifier that takes one packed (B, 3, L) batch (``pack``) and returns its logits:
    the form a bkd student is served in (an MLflow model's input is one tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask, types = x.long().unbind(1)
        uses_types = getattr(self.model.config, "type_vocab_size", 0) > 0 and not hasattr(self.model, "distilbert")
        return self.model(input_ids=ids, attention_mask=mask, **({"token_type_ids": types} if uses_types else {})).logits


def with_mask(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([hidden, mask.unsqueeze(-1).to(hidden.dtype)], dim=-1)


def split_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block output as (hidden states (B, L, D), attention mask (B, L))."""
    return x[..., :-1], x[..., -1]


class Embeddings(nn.Module):
    """Block 1: the token, position and segment embeddings of a packed batch, the mask carried along."""

    def __init__(self, embeddings: nn.Module, uses_token_types: bool, takes_mask: bool = False) -> None:
        super().__init__()
        self.embeddings, self.uses_token_types, self.takes_mask = embeddings, uses_token_types, takes_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask, types = x.unbind(1)
        if self.takes_mask:  # DeBERTa zeroes the padding's embeddings itself
            hidden = self.embeddings(input_ids=ids, token_type_ids=types, mask=mask)
        elif self.uses_token_types:
            hidden = self.embeddings(input_ids=ids, token_type_ids=types)
        else:
            hidden = self.embeddings(ids)
        return with_mask(hidden, mask)


class DebertaLayers(nn.Module):
    """Consecutive DeBERTa layers with the encoder's relative positions and embeddings. The encoder's own
    modules (relative embeddings, their norm, the first layer's convolution) are registered in the block of
    layer 0 only, and read from there by the others (so that they train and move once)."""

    def __init__(self, encoder: nn.Module, run: range) -> None:
        super().__init__()
        self.layers = nn.ModuleList([encoder.layer[i] for i in run])
        self.first = run[0] == 0
        if self.first:
            self.encoder_parts = nn.ModuleDict({k: getattr(encoder, k) for k in ("rel_embeddings", "LayerNorm", "conv")
                                                if isinstance(getattr(encoder, k, None), nn.Module)})
        self.encoder = [encoder]  # its methods (relative positions, attention mask), not registered again

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, mask = split_mask(x)
        encoder = self.encoder[0]
        attention = encoder.get_attention_mask(mask.long())
        relative = encoder.get_rel_pos(hidden)
        rel_embeddings = encoder.get_rel_embedding()
        start = hidden
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, attention, relative_pos=relative, rel_embeddings=rel_embeddings)[0]
            if self.first and i == 0 and getattr(encoder, "conv", None) is not None:
                hidden = encoder.conv(start, hidden, mask.long())
        return with_mask(hidden, mask)


class EncoderLayers(nn.Module):
    """Consecutive encoder layers; each sees the attention mask the model itself would build."""

    def __init__(self, layers: Sequence[nn.Module], config, distilbert: bool) -> None:
        from transformers.masking_utils import create_bidirectional_mask

        super().__init__()
        self.layers, self.config, self.distilbert = nn.ModuleList(layers), config, distilbert
        self.attention_mask = create_bidirectional_mask  # the model's own: eager, SDPA or flash attention's form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, mask = split_mask(x)
        extended = self.attention_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask.long())
        for layer in self.layers:
            out = layer(hidden, attention_mask=extended) if not self.distilbert else layer(hidden, extended)
            hidden = out[0] if isinstance(out, tuple) else out
        return with_mask(hidden, mask)


class ClassifierHead(nn.Module):
    """The model's own head on the last hidden states: BERT's pooler, dropout and classifier; DistilBERT's
    pre-classifier on the first token; RoBERTa's and ELECTRA's classification heads as they are."""

    def __init__(self, kind: str, classifier: nn.Module, pooler: Optional[nn.Module] = None,
                 pre_classifier: Optional[nn.Module] = None, dropout: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.kind, self.classifier = kind, classifier
        self.pooler, self.pre_classifier, self.dropout = pooler, pre_classifier, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = split_mask(x)
        if self.kind == "sequence":
            return self.classifier(hidden)
        if self.kind == "distilbert":
            return self.classifier(self.dropout(torch.relu(self.pre_classifier(hidden[:, 0]))))
        pooled = self.pooler(hidden) if self.pooler is not None else hidden[:, 0]
        return self.classifier(self.dropout(pooled))


def group_layers(count: int, groups: int) -> list[range]:
    """``count`` layers in ``groups`` runs of consecutive layers of about equal length."""
    if not 1 <= groups <= count:
        raise ValueError(f"cannot cut {count} encoder layers into {groups} groups; choose 1..{count}.")
    ends = [round((g + 1) * count / groups) for g in range(groups)]
    return [range(start, end) for start, end in zip([0] + ends[:-1], ends)]


def layer_runs(ends: Sequence[int], count: int) -> list[range]:
    """Runs of consecutive layers that end at the (0-based) layers ``ends``; the last must be the last layer."""
    ends = [int(e) for e in ends]
    if not ends or ends != sorted(set(ends)) or ends[0] < 0 or ends[-1] != count - 1:
        raise ValueError(f"block ends {ends} do not cut {count} encoder layers: give increasing layer indices ending at "
                         f"the last layer ({count - 1}).")
    return [range(start, end + 1) for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends)]


def encoder_layer_count(model: nn.Module) -> int:
    """How many encoder layers a sequence classifier has (0 for a model bkd does not cut)."""
    base = getattr(model, "distilbert", None)
    if base is not None:
        return len(base.transformer.layer)
    encoder = getattr(getattr(model, "base_model", None), "encoder", None)
    return len(encoder.layer) if hasattr(encoder, "layer") else 0


def from_hf(model: nn.Module, groups: Optional[int] = None, sample: Optional[torch.Tensor] = None,
            ends: Optional[Sequence[int]] = None) -> BlockNet:
    """A sequence classifier as a BlockNet: the embeddings, then ``groups`` runs of encoder layers (default:
    one per layer), or the runs that end at the 0-based layers ``ends``. Its ``block_ends`` name them
    (``embeddings``, ``layer.<last layer of the run>``). With ``sample`` (a packed batch), the blocks must give
    the model's own logits (a ``SplitError`` says by how much they differ)."""
    model.eval()
    kind = getattr(model.config, "model_type", "")
    if hasattr(model, "distilbert"):
        base, layers, distilbert = model.distilbert, list(model.distilbert.transformer.layer), True
        head = ClassifierHead("distilbert", model.classifier, pre_classifier=model.pre_classifier, dropout=model.dropout)
    elif hasattr(model, "base_model") and hasattr(getattr(model.base_model, "encoder", None), "layer"):
        base, layers, distilbert = model.base_model, list(model.base_model.encoder.layer), False
        if kind.startswith("deberta"):  # the context pooler on the first token, dropout, classifier
            head = ClassifierHead("pooled", model.classifier, pooler=model.pooler, dropout=model.dropout)
        elif getattr(base, "pooler", None) is not None and hasattr(model, "dropout"):  # BERT's layout
            head = ClassifierHead("pooled", model.classifier, pooler=base.pooler, dropout=model.dropout)
        else:  # RoBERTa, ELECTRA: the head reads the sequence itself
            head = ClassifierHead("sequence", model.classifier)
    else:
        raise ValueError(f"{type(model).__name__} ({kind or 'unknown type'}) is not an encoder bkd cuts into blocks: "
                         "give a sequence classifier of the BERT, RoBERTa, ELECTRA, DistilBERT or DeBERTa families.")
    uses_types = not distilbert and getattr(model.config, "type_vocab_size", 0) > 0
    deberta = kind.startswith("deberta")
    blocks: list[nn.Module] = [Embeddings(base.embeddings, uses_types, takes_mask=deberta)]
    runs = layer_runs(ends, len(layers)) if ends is not None else group_layers(len(layers), groups or len(layers))
    if deberta:
        blocks += [DebertaLayers(base.encoder, run) for run in runs]
    else:
        blocks += [EncoderLayers([layers[i] for i in run], model.config, distilbert) for run in runs]
    net = BlockNet(blocks, head)
    net.remember_source(model)
    net.block_ends = ["embeddings"] + [f"layer.{run[-1]}" for run in runs]
    net.lead_blocks = 1  # the embeddings stay a block of their own when layers are grouped to pair two encoders
    if sample is not None:  # the blocks must give the model's own logits
        def logits(x: torch.Tensor) -> torch.Tensor:
            ids, mask, types = x.unbind(1)
            return model(input_ids=ids, attention_mask=mask, **({"token_type_ids": types} if uses_types else {})).logits
        check_same_output(model, net, sample, type(model).__name__, logits)
    return net
