"""A small language-model world for tests: a generated corpus with learnable structure (a subject names its
colour, numbers count up), byte-level BPE tokenizers trained on it, tiny Llama, Qwen2 and GPT-2 decoders made from
configs and saved to local folders, and LM folders in the layouts data=lm reads. Nothing comes from the hub."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Optional

import torch

SUBJECTS = {"sky": "blue", "grass": "green", "sun": "yellow", "snow": "white", "coal": "black"}
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven"]


def sentence(rng: random.Random) -> tuple[str, str]:
    """A (prompt, response) pair: the subject's colour, or the numbers after a number."""
    if rng.random() < 0.5:
        subject = rng.choice(sorted(SUBJECTS))
        return f"the {subject} is", f" {SUBJECTS[subject]} and the {subject} is {SUBJECTS[subject]}"
    start = rng.randrange(len(NUMBERS) - 3)
    return f"count {NUMBERS[start]}", " " + " ".join(NUMBERS[start + 1:start + 4])


def corpus(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def make_tokenizer(folder: Path, vocab_size: int = 320, seed: int = 0):
    """A byte-level BPE fast tokenizer (with an end-of-text token) trained on the corpus, saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([p + r for p, r in corpus(300, seed)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def decoder(kind: str, tokenizer, hidden: int, layers: int, folder: Optional[Path] = None, positions: int = 64,
            vocab_size: Optional[int] = None):
    """A tiny causal LM (llama, qwen2, qwen3, mistral, phi3 or gpt2), saved with the tokenizer to ``folder``; mistral
    and phi3 with a sliding window of 4 tokens, qwen3 with sliding-window layers after the first."""
    import transformers

    torch.manual_seed(0)
    vocab = vocab_size or len(tokenizer)
    eos = tokenizer.eos_token_id
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=2, n_positions=positions,
                                         bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
        model = transformers.GPT2LMHeadModel(config)
    else:
        common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=2 * hidden, max_position_embeddings=positions,
                      bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
        if kind == "llama":
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
        elif kind == "mistral":
            model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=4))
        elif kind == "phi3":
            model = transformers.Phi3ForCausalLM(transformers.Phi3Config(**common, sliding_window=4))
        elif kind == "qwen3":
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, use_sliding_window=True, sliding_window=4,
                                                                           max_window_layers=1))
        else:
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    return model


def write_lm_folder(root: Path, train: int = 200, test: int = 60, fmt: str = "jsonl", prompts: bool = False) -> Path:
    """root/train.<fmt> and root/test.<fmt>: a ``text`` column, or ``prompt`` and ``response`` columns."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        rows = [{"prompt": p, "response": r} if prompts else {"text": p + r} for p, r in corpus(n, seed)]
        path = root / f"{split}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "csv":
            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
    return root
