"""The node's memory for the token ids of data=lm and data=text with 1 and with 4 concurrent trials: memory-mapped
from the cache (what ``orchestrator.data.lm`` and ``orchestrator.data.text`` do: one copy in the page cache, shared)
against a copy per trial (what an in-memory tensor per process costs).

    python bench/lm_shared_memory.py                 # 40 M tokens (200 MB of ids and target flags)
    python bench/lm_shared_memory.py --tokens 100000000

Each trial is a process that reads the cache as a trial does (``orchestrator.data.lm.read_arrays``; for text,
``orchestrator.data.text.mapped_split`` over texts of 128 tokens), holds the val split out, and pads every batch of an
epoch (``LMBatchLoader``, ``TextBatchLoader``), touching every token; the node's memory is the
sum of the processes' proportional set sizes (``Pss`` of /proc/<pid>/smaps_rollup: a shared page counts once
across them), read while all of them hold their data.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bkd_core.data import DataSplits, LMBatchLoader, TextBatchLoader  # noqa: E402
from orchestrator.data.lm import read_arrays  # noqa: E402
from orchestrator.data.text import mapped_split  # noqa: E402


def write_cache(folder: Path, tokens: int, length: int = 512) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    texts = tokens // 128  # data=text: padded (N, 3, 128) ids, mask, segments; labels beside
    store = np.zeros((texts, 3, 128), dtype=np.int32)
    store[:, 0], store[:, 1] = rng.integers(1, 30_000, (texts, 128), dtype=np.int32), 1
    np.save(folder / "train.tokens.npy", store)
    pq.write_table(pa.table({"label": (np.arange(texts) % 2).astype(np.int64)}), folder / "train.parquet")
    (folder / "train.ids.bin").write_bytes(rng.integers(0, 32_000, tokens, dtype=np.int32).tobytes())
    (folder / "train.targets.bin").write_bytes(np.ones(tokens, dtype=bool).tobytes())
    (folder / "train.lengths.bin").write_bytes(np.full(tokens // length, length, dtype=np.int64).tobytes())


def trial(folder: str, kind: str, copy: bool, ready, done) -> None:
    if kind == "lm":
        data = read_arrays(Path(folder), "train", 32_000, "lm/train")
        if copy:
            data.ids, data.targets = data.ids.clone(), data.targets.clone()
    else:
        data = mapped_split(Path(folder), "train", 2, "text/train")
        if copy:
            data.store = data.store.clone()
    splits = DataSplits(data, data.take(torch.arange(8))).hold_out(0.1)
    loader = (LMBatchLoader if kind == "lm" else TextBatchLoader)(splits.train, 64, train=True)
    seen = sum(int(x[:, 1].sum()) for x, _ in loader)  # one epoch: every token read
    ready.put(seen)
    done.wait()


def pss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def node_memory(folder: str, kind: str, trials: int, copy: bool) -> float:
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=trial, args=(folder, kind, copy, ready, done)) for _ in range(trials)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=600)
    total = sum(pss_mb(p.pid) for p in procs)
    done.set()
    for p in procs:
        p.join()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=40_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        write_cache(Path(folder), args.tokens)
        size = {kind: sum(f.stat().st_size for f in Path(folder).glob(pattern)) / 2**20
                for kind, pattern in (("lm", "*.bin"), ("text", "*.npy"))}
        print(f"{args.tokens:,} tokens: data=lm {size['lm']:.0f} MB of ids and target flags, data=text {size['text']:.0f} MB "
              f"of padded ids, masks and segments; {time.strftime('%Y-%m-%d')}", flush=True)
        print("| data | trials at once | memory-mapped (bkd) | a copy per trial | copy / mapped |\n|---|---|---|---|---|")
        for kind in ("lm", "text"):
            for k in (1, 4):
                mapped, copied = node_memory(folder, kind, k, False), node_memory(folder, kind, k, True)
                print(f"| {kind} | {k} | {mapped:.0f} MB | {copied:.0f} MB | {copied / mapped:.2f}x |", flush=True)
    print("(node memory: the sum of the trial processes' Pss, the interpreter and torch included)")


if __name__ == "__main__":
    main()
