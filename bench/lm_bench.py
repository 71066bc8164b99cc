"""Causal-LM benchmark: Block-KD's step against KD's on a Llama-shaped pair, and the chunked token loss's peak memory
against the whole one, in one run.

    python bench/lm_bench.py                       # 8 layers of 512 -> 4 layers of 256, V = 32,000, batch 4 x 128 tokens
    python bench/lm_bench.py --steps 10 --length 256
    python bench/lm_bench.py --memory-only

Step: bkd's KD step (teacher forward, student forward and backward, forward KL over the target tokens) and its
Block-KD step (the teacher's 8 layers grouped into 4 to pair with the student's, a stone at every cut, forward KL),
both through ``bkd_core.methods``, AdamW, fp32 on the CPU (bf16 autocast on a GPU). Tokens/s counts every token of
the batch. Block-KD's cost over KD is set beside the arithmetic bound: T + 3S + 2 x the teacher's blocks after each
cut and its head (forward, and the input gradient), in the multiply-adds ``describe`` counts.

Memory: the distillation loss's extra peak (resident set sampled every 0.2 ms, each case in a fresh process whose
freed buffers leave the resident set at once) over logits that already exist, whole (``kd_loss`` on every target row at once: float32 softmaxes of both models and their gradient) against
chunked (``per_token``: 256 target tokens at a time, forward and backward), at V = 32,000 and 152,064 (Qwen2.5).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bkd_core import methods, train  # noqa: E402
from bkd_core.losses import kd_loss  # noqa: E402
from bkd_core.models.causal import from_hf_causal, pack_lm  # noqa: E402
from bkd_core.token_losses import IGNORE, per_token  # noqa: E402
from orchestrator.config.pair_table import block_rows  # noqa: E402


def llama(hidden: int, layers: int, vocab: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=max(1, hidden // 128), intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def batch(vocab: int, size: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids; the last three quarters of each row are targets (a prompt, then its response)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, length), generator=g)
    y = torch.full_like(ids, IGNORE)
    y[:, length // 4:-1] = ids[:, length // 4 + 1:]
    return pack_lm(ids), y


def step_rate(method: str, vocab: int, size: int, length: int, steps: int, device: torch.device) -> float:
    """Tokens per second of bkd's ``method`` step on the pair (fresh models: the same start for both methods)."""
    teacher = from_hf_causal(llama(512, 8, vocab, 0), groups=4).to(device)
    student = from_hf_causal(llama(256, 4, vocab, 1)).to(device)
    x, y = (t.to(device) for t in batch(vocab, size, length))
    params = {"temperature": 1.0} | ({"gamma": 0.0} if method == "blockkd" else {})
    distiller = methods.make(method, teacher, student, sample_input=x, **params).to(device)
    cfg = train.TrainConfig(epochs=1, batch_size=size, lr=1e-4, optimizer="adamw", channels_last=False).resolved(device)
    cfg.compile = False
    optimizer = train.make_optimizer(distiller.trainable_parameters(), cfg, device)
    distiller.train()
    for _ in range(2):  # warm-up
        train.train_step(distiller, optimizer, x, y, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        train.train_step(distiller, optimizer, x, y, cfg, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * size * length / (time.perf_counter() - start)


def arithmetic_bound(vocab: int, length: int) -> float:
    """Block-KD over KD in multiply-adds: T + 3S, plus 2 x (the teacher's blocks after each cut and its head)."""
    teacher = from_hf_causal(llama(512, 8, vocab, 0), groups=4).eval()
    student = from_hf_causal(llama(256, 4, vocab, 1)).eval()
    sample = batch(vocab, 1, length)[0]
    with torch.no_grad():
        t_rows, s_rows = block_rows(teacher, sample), block_rows(student, sample)
    kd = sum(r[2] for r in t_rows) + 3 * sum(r[2] for r in s_rows)
    stones = sum(2 * sum(r[2] for r in t_rows[cut:]) for cut in range(1, teacher.num_blocks + 1))
    return (kd + stones) / kd


def resident_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def loss_peak(vocab: int, tokens: int, chunked: bool) -> dict[str, float]:
    """The loss's forward and backward peak resident memory over the logits' own (MB), sampled every 0.2 ms in this
    process (run with MALLOC_MMAP_THRESHOLD_ fixed, so that freed buffers leave the resident set at once)."""
    import threading

    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, tokens, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(1, tokens, vocab, generator=g)
    y = torch.randint(0, vocab, (1, tokens), generator=g)
    student.grad = torch.zeros_like(student)  # the gradient buffer exists in both cases: not the loss's cost
    base, peak, running = resident_mb(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], resident_mb())
            time.sleep(0.0002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    if chunked:
        loss = per_token(lambda s, t, _, temperature: kd_loss(s, t, temperature))(student, teacher, y, 1.0)
    else:
        loss = kd_loss(student.reshape(-1, vocab), teacher.reshape(-1, vocab), 1.0)
    loss.backward()
    running[0] = False
    sampler.join()
    peak[0] = max(peak[0], resident_mb())
    return {"extra_mb": peak[0] - base, "logits_mb": 4 * tokens * vocab / 2**20, "loss": float(loss)}


def memory_table(tokens: int) -> list[str]:
    lines = ["| V | logits (one model, fp32) | whole loss: extra peak | chunked: extra peak | whole / chunked |", "|---|---|---|---|---|"]
    for vocab in (32_000, 152_064):
        found = {}
        for chunked in (False, True):
            out = subprocess.run([sys.executable, __file__, "--peak", str(vocab), str(tokens), str(int(chunked))],
                                 capture_output=True, text=True, check=True,
                                 env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
            found[chunked] = json.loads(out.stdout.strip().splitlines()[-1])
        assert abs(found[True]["loss"] - found[False]["loss"]) < 1e-3 * max(1.0, abs(found[False]["loss"]))
        whole, chunk = found[False]["extra_mb"], found[True]["extra_mb"]
        lines.append(f"| {vocab:,} | {found[False]['logits_mb']:.0f} MB | {whole:.0f} MB | {chunk:.0f} MB | "
                     f"{whole / max(chunk, 1.0):.1f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--loss-tokens", type=int, default=4096)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--peak", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(loss_peak(args.peak[0], args.peak[1], bool(args.peak[2]))))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{device}; {time.strftime('%Y-%m-%d')}", flush=True)
    if not args.memory_only:
        kd = step_rate("kd", args.vocab, args.batch, args.length, args.steps, device)
        bkd = step_rate("blockkd", args.vocab, args.batch, args.length, args.steps, device)
        kd_again = step_rate("kd", args.vocab, args.batch, args.length, args.steps, device)
        bound = arithmetic_bound(args.vocab, args.length)
        base = (kd + kd_again) / 2
        print(f"\nLlama 8 x 512 -> 4 x 256, V = {args.vocab:,}, batch {args.batch} x {args.length} tokens, {args.steps} steps")
        print("| step | tokens/s |\n|---|---|")
        print(f"| KD (forward KL), before / after | {kd:.0f} / {kd_again:.0f} |")
        print(f"| Block-KD (a stone at each of 5 cuts) | {bkd:.0f} |")
        print(f"Block-KD's cost over KD: {base / bkd:.2f}x; arithmetic bound {bound:.2f}x", flush=True)
    print(f"\nthe distillation loss over {args.loss_tokens:,} target tokens (forward and backward)")
    print("\n".join(memory_table(args.loss_tokens)), flush=True)


if __name__ == "__main__":
    main()
