"""A small text world for tests: a generated corpus whose labels depend on its words, a WordPiece vocabulary
trained on it, tiny BERT-family classifiers made from configs and saved to local folders, and text folders in
the layouts data=text reads. Nothing comes from the hub."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Optional

import torch

WORDS = {0: ["good", "great", "fine", "happy"], 1: ["bad", "awful", "poor", "sad"], 2: ["blue", "green", "red", "grey"]}
FILLER = ["the", "a", "movie", "was", "quite", "very", "and", "it", "plot", "music"]
NAMES = {0: "positive", 1: "negative", 2: "colour"}


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Sentences whose label is the class of the one class word they hold, among filler words."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(3)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 9))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[label]))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def make_tokenizer(folder: Path):
    """A BERT fast tokenizer with a WordPiece vocabulary trained on the corpus, saved in ``folder``."""
    import transformers
    from tokenizers import BertWordPieceTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(corpus(200)[0], vocab_size=120, min_frequency=1)
    wordpiece.save_model(str(folder))
    tokenizer = transformers.BertTokenizer(vocab=str(folder / "vocab.txt"))  # transformers 5: the fast one
    tokenizer.save_pretrained(folder)
    return tokenizer


def encoder(kind: str, tokenizer, hidden: int, layers: int, folder: Optional[Path] = None, num_labels: int = 3,
            positions: int = 64, initializer_range: float = 0.5):
    """A tiny sequence classifier (bert, roberta, electra, deberta or distilbert), saved with the tokenizer to ``folder``."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                  intermediate_size=2 * hidden, max_position_embeddings=positions, num_labels=num_labels,
                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, initializer_range=initializer_range)
    if kind == "bert":
        model = transformers.BertForSequenceClassification(transformers.BertConfig(**common))
    elif kind == "roberta":
        model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**common, pad_token_id=0))
    elif kind == "deberta":  # v2 with relative positions in buckets, normed relative embeddings and the first layer's conv
        model = transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
            **common, relative_attention=True, position_buckets=8, norm_rel_ebd="layer_norm", conv_kernel_size=3,
            pos_att_type=["p2c", "c2p"], share_att_key=True))
    elif kind == "electra":
        model = transformers.ElectraForSequenceClassification(transformers.ElectraConfig(**common, embedding_size=hidden))
    else:
        model = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=tokenizer.vocab_size, dim=hidden, n_layers=layers, n_heads=2, hidden_dim=2 * hidden,
            max_position_embeddings=positions, num_labels=num_labels, initializer_range=initializer_range))
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    return model


def write_text_folder(root: Path, train: int = 240, test: int = 90, fmt: str = "csv", named: bool = True,
                      pairs: bool = False) -> Path:
    """root/train.<fmt> and root/test.<fmt> with columns text (and text_b), label (class names or ids)."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train, 0), ("test", test, 1)):
        texts, labels = corpus(n, seed)
        rows = [{"text": t, "label": NAMES[y] if named else y} | ({"text_b": corpus(1, seed + i)[0][0]} if pairs else {})
                for i, (t, y) in enumerate(zip(texts, labels))]
        path = root / f"{split}.{fmt}"
        if fmt == "csv":
            with open(path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        elif fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
    return root
