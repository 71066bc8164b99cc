"""Text step benchmark: bkd's text step against the plain way, same process, same device, same BERT pair.

    python bench/text_bench.py                  # CPU: BERT-mini (4 x 256) -> BERT-tiny (2 x 128), batch 32
    python bench/text_bench.py --steps 60 --max-length 256

Plain: every batch tokenized from its strings when it is drawn and padded to max_length, the Hugging Face
models called directly (teacher under no_grad), KD's loss, fp32 eager, torch.optim.AdamW.
bkd: the texts tokenized once (``bkd_core.data.tokenize``, what data=text caches as Parquet), each batch padded
to its own longest text (``TextBatchLoader``), the models as blocks (``bkd_core.models.text.from_hf``), KD
through ``bkd_core.methods``, the same AdamW. Then bkd's Block-KD step (every cut a stone) against its KD step,
beside the arithmetic bound: T + 3S + 2 x the teacher's layers after each cut, forward and input-gradient.

The texts: generated sentences of 4 to 60 words (about 6 to 120 tokens), so the padding saved is what a corpus
of short and long texts (reviews, questions) saves; the figures say which lengths they were measured on.
"""
from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bkd_core import methods, train  # noqa: E402
from bkd_core.data import TextBatchLoader, tokenize  # noqa: E402
from bkd_core.losses import kd_loss  # noqa: E402
from bkd_core.models.text import from_hf, pack  # noqa: E402
from orchestrator.config.pair_table import block_rows  # noqa: E402

WORDS = [f"w{i}" for i in range(800)]


def texts(n: int, seed: int, low: int, high: int) -> tuple[list[str], list[int]]:
    """Sentences of ``low``..``high`` words; the label is the parity of the first word's index."""
    rng = random.Random(seed)
    out, labels = [], []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))]
        out.append(" ".join(words))
        labels.append(int(words[0][1:]) % 2)
    return out, labels


def make_tokenizer(folder: Path):
    import transformers
    from tokenizers import BertWordPieceTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(texts(2000, 0, 4, 60)[0], vocab_size=1200, min_frequency=1)
    wordpiece.save_model(str(folder))
    return transformers.BertTokenizer(vocab=str(folder / "vocab.txt"))


def bert(tokenizer, hidden: int, layers: int, heads: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=4 * hidden, num_labels=2,
                                     attn_implementation="sdpa")
    return transformers.BertForSequenceClassification(config)


def plain_kd(tokenizer, corpus, labels, teacher, student, batch: int, steps: int, max_length: int) -> float:
    """Texts per second of the plain step: tokenize and pad every batch to max_length, HF models, fp32 eager."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5)
    teacher.eval()
    student.train()
    order = list(range(len(corpus)))
    random.Random(1).shuffle(order)
    start, seen = None, 0
    for step in range(steps + 3):
        if step == 3:  # after warm-up
            start, seen = time.perf_counter(), 0
        index = order[(step * batch) % (len(order) - batch):][:batch]
        enc = tokenizer([corpus[i] for i in index], padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        y = torch.tensor([labels[i] for i in index])
        with torch.no_grad():
            t_logits = teacher(**enc).logits
        s_logits = student(**enc).logits
        loss = F.cross_entropy(s_logits, y) + kd_loss(s_logits, t_logits, 4.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += batch
    return seen / (time.perf_counter() - start)


def bkd_step(dataset, teacher, student, method: str, batch: int, steps: int) -> float:
    """Texts per second of bkd's step: cached ids, per-batch padding, ``bkd_core.methods``, AdamW."""
    loader = TextBatchLoader(dataset, batch, train=True, seed=1)
    x0 = next(iter(loader))[0]
    distiller = methods.make(method, teacher, student, sample_input=x0, **({"cuts": list(range(1, student.num_blocks))}
                                                                             if method == "blockkd" else {}))
    cfg = train.TrainConfig(epochs=1, batch_size=batch, lr=5e-5, optimizer="adamw", weight_decay=0.01, channels_last=False)
    optimizer = train.make_optimizer(distiller.trainable_parameters(), cfg, torch.device("cpu"))
    distiller.train()
    batches = iter(loader)
    start, seen = None, 0
    for step in range(steps + 3):
        if step == 3:
            start, seen = time.perf_counter(), 0
        try:
            x, y = next(batches)
        except StopIteration:
            loader.set_epoch(step)
            batches = iter(loader)
            x, y = next(batches)
        train.train_step(distiller, optimizer, x, y, cfg, torch.device("cpu"))
        seen += x.shape[0]
    return seen / (time.perf_counter() - start)


def arithmetic_bound(teacher, student, sample: torch.Tensor) -> float:
    """Block-KD over KD in multiply-adds of the linear layers (as ``describe`` counts them), every cut a stone."""
    with torch.no_grad():
        t_rows, s_rows = block_rows(teacher.eval(), sample), block_rows(student.eval(), sample)
    kd = sum(r[2] for r in t_rows) + 3 * sum(r[2] for r in s_rows)
    stones = sum(2 * sum(r[2] for r in t_rows[cut:]) for cut in range(1, teacher.num_blocks))
    return (kd + stones) / kd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--texts", type=int, default=2048)
    args = parser.parse_args()
    import tempfile

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tokenizer(Path(folder))
    corpus, labels = texts(args.texts, 1, 4, 60)
    started = time.perf_counter()
    dataset = tokenize(corpus, labels, tokenizer, args.max_length, 2)
    once = time.perf_counter() - started
    lengths = dataset.lengths.float()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{args.texts} texts of {int(lengths.min())}-{int(lengths.max())} tokens (mean {lengths.mean():.0f}), "
          f"max_length {args.max_length}, batch {args.batch}; tokenized once in {once:.2f} s", flush=True)
    hf_teacher, hf_student = bert(tokenizer, 256, 4, 4, 0), bert(tokenizer, 128, 2, 2, 1)
    plain = plain_kd(tokenizer, corpus, labels, hf_teacher, hf_student, args.batch, args.steps, args.max_length)
    teacher, student = from_hf(bert(tokenizer, 256, 4, 4, 0), groups=2), from_hf(bert(tokenizer, 128, 2, 2, 1))
    ours_kd = bkd_step(dataset, teacher, student, "kd", args.batch, args.steps)
    teacher, student = from_hf(bert(tokenizer, 256, 4, 4, 0), groups=2), from_hf(bert(tokenizer, 128, 2, 2, 1))
    ours_bkd = bkd_step(dataset, teacher, student, "blockkd", args.batch, args.steps)
    plain_again = plain_kd(tokenizer, corpus, labels, hf_teacher, hf_student, args.batch, args.steps, args.max_length)
    sample = pack(*[dataset.tokens[:1, i, :int(lengths.mean())].long() for i in range(3)])
    bound = arithmetic_bound(teacher, student, sample)
    base = (plain + plain_again) / 2
    print("| step | texts/s |\n|---|---|")
    print(f"| plain KD (tokenize per batch, pad to {args.max_length}, fp32 eager), before / after | {plain:.0f} / {plain_again:.0f} |")
    print(f"| bkd KD (cached ids, per-batch padding) | {ours_kd:.0f} |")
    print(f"| bkd Block-KD (2 stones) | {ours_bkd:.0f} |")
    print(f"bkd KD / plain KD: {ours_kd / base:.2f}x; Block-KD's cost over KD: bkd {ours_kd / ours_bkd:.2f}x, "
          f"arithmetic bound {bound:.2f}x", flush=True)


if __name__ == "__main__":
    main()
