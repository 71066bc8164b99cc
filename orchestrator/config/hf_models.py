"""``pair.teacher=hf:NAME_OR_PATH`` / ``pair.student=hf:...``: a Hugging Face sequence classifier (BERT,
RoBERTa, ELECTRA, DistilBERT, DeBERTa) from a local folder or the hub, with ``num_labels`` from the data, cut into its
embeddings and runs of encoder layers (``bkd_core.models.text``); with ``data=lm``, a causal LM (Llama, Qwen2/Qwen3,
Mistral, Phi-3, GPT-2) cut into its embeddings, runs of decoder layers and its LM head (``bkd_core.models.causal``).

A student comes from its folder's weights; from its config alone (a folder without weights, or
``pair.student_config`` values that reshape it: a new, freshly initialised student); or, with
``pair.student_from_teacher``, from the teacher's embeddings and layers (DistilBERT's way). Block ends are
named ``embeddings`` and ``layer.<i>`` (``pair.teacher_blocks=[embeddings,layer.2,layer.5]``).
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from bkd_core import BlockNet
from orchestrator.config.checks import ConfigError

PREFIX = "hf:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def is_hf(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def hf_source(spec: str) -> str:
    """The folder (made absolute where it exists here) or hub name of an ``hf:`` spec (or of a bare name)."""
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    return str(Path(name).resolve()) if Path(name).expanduser().exists() else name


def quietly():
    """transformers' own notices (newly initialised heads, ...) go nowhere: bkd prints what it loads."""
    return contextlib.redirect_stderr(io.StringIO())


def has_weights(source: str) -> bool:
    return not Path(source).is_dir() or any((Path(source) / name).is_file() for name in WEIGHT_FILES)


def load_classifier(spec: str, num_classes: int, key: str, overrides: Optional[dict] = None) -> nn.Module:
    """The sequence classifier an ``hf:`` spec names, with ``num_classes`` labels (a head of another size is
    made fresh); from its config alone when it has no weights or ``overrides`` reshape it."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForSequenceClassification
    except ImportError:
        raise ConfigError(key, "hf: models need transformers and tokenizers: pip install 'bkd[text]'.") from None
    source = hf_source(spec)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars
    try:
        with quietly():
            config = AutoConfig.from_pretrained(source, num_labels=num_classes, **(overrides or {}))
            if overrides or not has_weights(source):
                return AutoModelForSequenceClassification.from_config(config)
            return AutoModelForSequenceClassification.from_pretrained(source, config=config, ignore_mismatched_sizes=True)
    except ValueError as exc:  # a config no sequence classifier exists for (an image or a decoder-only model)
        raise ConfigError(key, f"{spec} is not a sequence classifier bkd can train ({str(exc).splitlines()[0][:160]}); give "
                          "a BERT, RoBERTa, ELECTRA, DistilBERT or DeBERTa encoder (AutoModelForSequenceClassification).") from None
    except (OSError, TypeError) as exc:
        raise ConfigError(key, f"cannot load {spec} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); give a folder "
                          "saved with save_pretrained (config.json and weights) or a hub name this machine can reach.") from None


def load_causal_lm(spec: str, key: str, overrides: Optional[dict] = None) -> nn.Module:
    """The causal LM an ``hf:`` spec names; from its config alone when it has no weights or ``overrides`` reshape it.
    An encoder or encoder-decoder is a ConfigError that says what data=lm takes."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise ConfigError(key, "hf: models need transformers and tokenizers: pip install 'bkd[text]'.") from None
    from bkd_core.models.causal import FAMILIES, is_causal_lm

    source = hf_source(spec)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    decoders = f"an AutoModelForCausalLM decoder of the {', '.join(FAMILIES)} families"
    try:
        with quietly():
            config = AutoConfig.from_pretrained(source, **(overrides or {}))
            if getattr(config, "is_encoder_decoder", False) or getattr(config, "model_type", "") in ENCODERS:
                raise ConfigError(key, f"{spec} is {'an encoder-decoder' if getattr(config, 'is_encoder_decoder', False) else 'an encoder'} "
                                  f"({config.model_type}), and data=lm distils decoder-only language models: give {decoders}, "
                                  "or use data=text for a sequence classifier.")
            if overrides or not has_weights(source):
                model = AutoModelForCausalLM.from_config(config)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, config=config)
    except ValueError as exc:  # no causal LM exists for this config
        raise ConfigError(key, f"{spec} is not a causal language model bkd can train ({str(exc).splitlines()[0][:160]}); give "
                          f"{decoders}.") from None
    except (OSError, TypeError) as exc:
        raise ConfigError(key, f"cannot load {spec} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); give a folder "
                          "saved with save_pretrained (config.json and weights) or a hub name this machine can reach.") from None
    if not is_causal_lm(model):
        raise ConfigError(key, f"{spec} ({type(model).__name__}) is not laid out as a decoder bkd cuts: give {decoders}.")
    return model


ENCODERS = ("bert", "roberta", "electra", "distilbert", "deberta", "deberta-v2", "xlm-roberta", "camembert", "albert")


def layer_ends(blocks: Sequence[str], key: str) -> list[int]:
    """``[embeddings, layer.2, layer.5]`` as the 0-based last layers of the runs ([2, 5])."""
    ends = []
    for name in blocks:
        if name == "embeddings":
            continue
        match = re.fullmatch(r"(?:encoder\.)?layer\.(\d+)", str(name))
        if not match:
            raise ConfigError(key, f"{name!r} names no block end of a text encoder; give embeddings and layer.<i> "
                              "(the last encoder layer of each block, 0-based), e.g. [embeddings,layer.5,layer.11].")
        ends.append(int(match.group(1)))
    return ends


def example_tokens(model: nn.Module, count: int = 3, length: int = 12) -> torch.Tensor:
    """A packed batch of random token ids below the vocabulary size, the later rows padded."""
    from bkd_core.models.text import pack

    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(5, max(6, vocab), (count, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, count):
        mask[row, length - 2 * row:] = 0
    return pack(ids * mask, mask)


def example_lm_tokens(model: nn.Module, count: int = 3, length: int = 12) -> torch.Tensor:
    """A ``pack_lm`` batch of random token ids below the vocabulary size: the second row padded on the left, the third
    on the right (the exactness check of a decoder's cut)."""
    from bkd_core.models.causal import pack_lm

    g = torch.Generator().manual_seed(0)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(1, max(2, vocab), (count, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1 % count, :3] = 0
    mask[2 % count, length - 4:] = 0
    return pack_lm(ids * mask, mask)


def position_limit(model: nn.Module) -> int:
    """The longest sequence the model's position embeddings take (RoBERTa's start after the padding index)."""
    limit = int(getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or 512)
    embeddings = getattr(getattr(model, "base_model", None), "embeddings", None)
    padding = getattr(embeddings, "padding_idx", None)
    return limit - padding - 1 if isinstance(padding, int) and getattr(model.config, "model_type", "") != "bert" else limit


def init_from_teacher(student: nn.Module, teacher: nn.Module, key: str) -> str:
    """The teacher's embeddings and, for student layer j, the last teacher layer of group j (of the student's
    layer count). Returns what was copied, in words."""
    from bkd_core.models.causal import decoder_layer_count
    from bkd_core.models.text import encoder_layer_count, group_layers

    s_count = encoder_layer_count(student) or decoder_layer_count(student)
    t_count = encoder_layer_count(teacher) or decoder_layer_count(teacher)
    runs = group_layers(t_count, s_count)
    source = {j: run[-1] for j, run in enumerate(runs)}
    teacher_state = teacher.state_dict()
    copied = 0
    state = student.state_dict()
    for name, value in state.items():
        match = re.search(r"\.(layer|layers|h)\.(\d+)\.", name)  # encoders' layer.<i>, Llama's layers.<i>, GPT-2's h.<i>
        origin = name if match is None else name.replace(f".{match.group(1)}.{match.group(2)}.",
                                                         f".{match.group(1)}.{source[int(match.group(2))]}.", 1)
        if "classifier" in name or "pooler" in name or origin not in teacher_state:
            continue
        if teacher_state[origin].shape != value.shape:
            raise ConfigError(key, f"the teacher's {origin} is {tuple(teacher_state[origin].shape)} and the student's {name} "
                              f"{tuple(value.shape)}: starting from the teacher's layers needs the same hidden sizes. Drop "
                              "pair.student_from_teacher, or keep hidden_size in pair.student_config.")
        state[name] = teacher_state[origin].clone()
        copied += 1
    student.load_state_dict(state)
    return f"{copied} tensors from the teacher (embeddings, layers {[source[j] for j in range(s_count)]})"


def build_hf(c: Any, role: str, num_classes: int, blocks: Optional[Sequence[str]], check: bool) -> BlockNet:
    """``pair.<role>`` as a BlockNet of its embeddings and runs of encoder layers (``check``: prove the blocks
    give the model's logits on a padded sample)."""
    from bkd_core.models.text import from_hf

    from bkd_core.models.causal import from_hf_causal

    key = f"pair.{role}"
    spec = getattr(c.pair, role)
    overrides = dict(c.pair.student_config or {}) if role == "student" else {}
    lm = getattr(c.data, "name", "") == "lm"
    load = (lambda s, k, o=None: load_causal_lm(s, k, o)) if lm else (lambda s, k, o=None: load_classifier(s, num_classes, k, o))
    model = load(spec, key, overrides)
    if role == "student" and c.pair.student_from_teacher:
        if not is_hf(c.pair.teacher):
            raise ConfigError("pair.student_from_teacher", "needs an hf: teacher to take the layers from.")
        note = init_from_teacher(model, load(c.pair.teacher, "pair.teacher"), "pair.student_from_teacher")
        if check:
            print(f"[bkd] pair.student_from_teacher: {note}", flush=True)
    try:
        ends = layer_ends(blocks, f"{key}_blocks") if blocks else None
        sample = (example_lm_tokens(model) if lm else example_tokens(model)) if check else None
        net = from_hf_causal(model, sample=sample, ends=ends) if lm else from_hf(model, sample=sample, ends=ends)
    except ValueError as exc:  # SplitError too
        raise ConfigError(f"{key}_blocks" if blocks else key, str(exc)) from None
    net.hf_model = [model]  # the model itself, outside the module tree (save_pretrained; a list keeps it unregistered)
    return net


def check_text_pair(c: Any, teacher: BlockNet, student: BlockNet, tokenizer: Any) -> None:
    """Both models read the tokenizer's ids and fit ``data.max_length`` tokens; a student tokenizer that differs
    from the teacher's is refused."""
    for role, net in (("teacher", teacher), ("student", student)):
        model = net.hf_model[0]
        vocab = int(getattr(model.config, "vocab_size", 0))
        if vocab < len(tokenizer):
            raise ConfigError(f"pair.{role}", f"has {vocab} token embeddings and the tokenizer ({c.data.tokenizer}) "
                              f"{len(tokenizer)} tokens: the models must share the teacher's vocabulary.")
        limit = position_limit(model)
        if c.data.max_length > limit:
            raise ConfigError("data.max_length", f"{c.data.max_length} tokens is more than the {role} "
                              f"{getattr(c.pair, role)} takes ({limit} positions); set data.max_length={limit} or less "
                              "(longer texts are truncated, and bkd says how many).")
    source = hf_source(c.pair.student)
    if Path(source).is_dir() and any((Path(source) / f).is_file() for f in ("tokenizer.json", "vocab.txt", "vocab.json")):
        from orchestrator.data.text import load_tokenizer

        own = load_tokenizer(source, "pair.student")
        theirs, mine = tokenizer.get_vocab(), own.get_vocab()
        if theirs != mine:
            differ = len(set(theirs.items()) ^ set(mine.items())) // 2 or abs(len(theirs) - len(mine))
            raise ConfigError("pair.student", f"its tokenizer ({source}) differs from the teacher's ({c.data.tokenizer}): "
                              f"about {differ} of {len(theirs)} entries differ. Both models read the same token ids: "
                              "distil into a student built on the teacher's vocabulary (pair.student_config reshapes "
                              "the teacher's config; pair.student_from_teacher also takes its layers).")


def check_lm_pair(c: Any, teacher: BlockNet, student: BlockNet, tokenizer: Any) -> None:
    """A student tokenizer that differs from the teacher's is refused (naming both and ULD) unless ULD reads each
    model's own ids (``data.student_tokenizer``); each decoder covers its tokenizer's ids and ``data.max_length``
    positions."""
    from orchestrator.data.text import load_tokenizer

    d = c.data
    own = load_tokenizer(d.student_tokenizer, "data.student_tokenizer") if d.student_tokenizer else None
    source = hf_source(c.pair.student)
    if own is None and Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file():
        mine = load_tokenizer(source, "pair.student")
        if mine.get_vocab() != tokenizer.get_vocab():
            differ = len(set(mine.get_vocab().items()) ^ set(tokenizer.get_vocab().items())) // 2
            raise ConfigError("pair.student", f"its tokenizer ({source}, {len(mine)} tokens) differs from the teacher's "
                              f"({d.tokenizer}, {len(tokenizer)} tokens; about {differ} entries differ), and every method but "
                              "ULD feeds both models the teacher's ids. Distil across the two tokenizers with search=uld "
                              "(each model reads its own ids), or give a student built on the teacher's tokenizer.")
    for role, net, reads in (("teacher", teacher, tokenizer), ("student", student, own or tokenizer)):
        model = net.hf_model[0]
        vocab = int(getattr(model.config, "vocab_size", 0))
        if vocab < len(reads):
            raise ConfigError(f"pair.{role}", f"has {vocab} token embeddings and its tokenizer "
                              f"({d.student_tokenizer if reads is own else d.tokenizer}) {len(reads)} tokens: the model must "
                              "cover every id its tokenizer gives.")
        limit = position_limit(model)
        if d.max_length > limit:
            raise ConfigError("data.max_length", f"{d.max_length} tokens is more than the {role} {getattr(c.pair, role)} "
                              f"takes ({limit} positions); set data.max_length={limit} or less (longer examples are cut, "
                              "and bkd says how many).")
