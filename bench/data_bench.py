"""Image decoding throughput: bkd's Parquet path against the usual per-image DataLoader, same cores.

    python bench/data_bench.py --make 2000 --root /tmp/imagenet-like      # writes 500x375 JPEGs (q90), then measures
    python bench/data_bench.py --root DIR --image-size 224 --json-out bench/results/data_bench.json

(a) bkd: ``python -m orchestrator.prepare`` with its defaults (max_side 320), then
    ``bkd_core.data.ParquetImages(train=True)``: read shards, draft-mode JPEG decode, RandomResizedCrop
    + flip in one resize, uint8 out.
(b) the distillation codebases' pipeline: a ``torch.utils.data.DataLoader`` over the original files,
    per image ``PIL.Image.open(...).convert("RGB")``, RandomResizedCrop (crop, then resize) + flip, uint8.
Both run as DataLoaders with ``--workers`` processes (default: every core), so images/s per core is
images/s / workers. Prints both, the ratio and the peak RSS; ``--json-out`` writes them.
(c) what Ray Data adds: a one-worker trial's feed (``orchestrator.streaming``: Ray Data reads the same
shards, decodes in tasks, uint8 batches into the consumer) on a local Ray cluster of ``--workers`` CPUs,
against (a)'s bare pipeline (also uint8) on the same cores, then what a shuffle buffer in the trial and
a CPU trial's normalisation cost, and Ray Data's per-operator stats (``--no-ray`` skips it).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bkd_core.data import ParquetImages  # noqa: E402
from bkd_core.data.parquet import random_resized_box  # noqa: E402


def make_folder(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    """ImageNet-like JPEGs: 500x375, quality 90, smooth shapes and texture (compress like photos)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):  # every 10th image to val; classes in turn within each split
        split, label = ("val" if i % 10 == 0 else "train"), (i // 10) % classes
        folder = root / split / f"class {label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        cx, cy, r = rng.uniform(0, 500), rng.uniform(0, 375), rng.uniform(40, 200)
        base = rng.uniform(0, 255, 3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        pixels = base * (1 - blob) + rng.uniform(0, 255, 3) * blob
        pixels += 12 * np.sin(x / rng.uniform(3, 15))[..., None] + rng.normal(0, 6, (375, 500, 1))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG", quality=90)


class FolderImages(Dataset):
    """The usual pipeline: one file per sample, full decode, crop then resize, flip."""

    def __init__(self, root: Path, size: int) -> None:
        self.files = sorted(p for p in (root / "train").rglob("*") if p.is_file())
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        rng = random.Random(index)
        image = Image.open(self.files[index]).convert("RGB")
        box = random_resized_box(*image.size, rng)
        image = image.crop(tuple(round(c) for c in box)).resize((self.size, self.size), Image.BILINEAR)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def throughput(dataset, workers: int, batch: int = 64) -> tuple[float, int]:
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers)
    start, count = time.perf_counter(), 0
    for item in loader:
        count += len(item[0]) if isinstance(item, (list, tuple)) else len(item)
    return count / (time.perf_counter() - start), count


def ray_data_throughput(shards: Path, size: int, cpus: int, batch: int = 64) -> dict[str, float]:
    """Images/s of a one-worker trial's streamed feed (Ray Data tasks decode, uint8 batches reach the
    trial) at the default settings, with a 1,000-row shuffle buffer in the trial, and with the trial's
    normalisation; the driver's CPU seconds per 1,000 images for each; Ray Data's own stats."""
    import ray

    from orchestrator.config.schema import ParquetData
    from orchestrator.data.streaming import StreamLoader, make_dataset

    ray.init(address="local", num_cpus=cpus, log_to_driver=False, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        cfg = ParquetData(root=str(shards), image_size=size)
        rows = len(ParquetImages(str(shards), "train"))
        dataset = make_dataset(cfg, {"train": "train"}, "train")
        out: dict[str, float] = {}
        for name, buffer, normalised in (("feed", 0, False), ("feed_buffer1000", 1000, False), ("feed_normalised", 0, True)):
            rates, cpu = [], []
            for epoch in range(3):  # the first epoch starts the worker processes; the other two are measured
                loader = StreamLoader(dataset, rows, batch, True, torch.device("cpu"), buffer)
                loader.set_epoch(epoch)
                start, busy, count = time.perf_counter(), time.process_time(), 0
                for x, _ in (loader if normalised else loader.raw_batches()):
                    count += x.shape[0]
                rates.append(count / (time.perf_counter() - start))
                cpu.append((time.process_time() - busy) / count * 1000)
            out[name], out[name + "_driver_cpu_s_per_1k"] = sum(rates[1:]) / 2, sum(cpu[1:]) / 2
        out["stats"] = dataset.stats()
        return out
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="an image folder (root/train/<class>/*, root/val/<class>/*)")
    parser.add_argument("--make", type=int, default=0, help="first write this many ImageNet-like JPEGs under --root")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json-out")
    parser.add_argument("--no-ray", action="store_true", help="skip (c), the Ray Data feed")
    args = parser.parse_args()
    root = Path(args.root)
    if args.make:
        make_folder(root, args.make)
    torch.set_num_threads(1)
    shards = Path(str(root).rstrip("/") + "-parquet")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.prepare", f"source={root}", f"output={shards}"], cwd=REPO, check=True)
    prepare_s = time.perf_counter() - start
    baseline, n = throughput(FolderImages(root, args.image_size), args.workers)
    bkd, m = throughput(ParquetImages(str(shards), "train", args.image_size, train=True), args.workers)
    # prepare holds val out of SRC/train, so the shards' train split has fewer images than the folder: rates compare
    result = {"images": m, "baseline_images": n, "image_size": args.image_size, "workers": args.workers, "prepare_s": round(prepare_s, 1),
              "bkd_img_s_per_core": round(bkd / args.workers, 1), "baseline_img_s_per_core": round(baseline / args.workers, 1),
              "ratio": round(bkd / baseline, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                                                                        + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
    print(f"{m} shard / {n} folder images at {args.image_size} px, {args.workers} DataLoader workers (one per core):")
    print(f"  baseline (per-image PIL, full decode, crop+resize): {result['baseline_img_s_per_core']} img/s per core")
    print(f"  bkd (Parquet shards, draft decode, one resize):     {result['bkd_img_s_per_core']} img/s per core")
    print(f"  ratio {result['ratio']}x; prepare took {prepare_s:.1f} s (once); peak RSS {result['peak_rss_mb']} MB (driver + its largest child)")
    if not args.no_ray:
        fed = ray_data_throughput(shards, args.image_size, args.workers)
        stats = fed.pop("stats")
        print("  where a Ray Data epoch's time goes (Ray Data's stats of the last one):")
        print("\n".join("    " + line for line in stats.splitlines() if line.startswith(("Operator", "* Remote cpu", "Dataset"))))
        result |= {"ray_data_img_s_per_core": round(fed["feed"] / args.workers, 1), "ray_data_vs_bare": round(fed["feed"] / bkd, 2),
                   "ray_data_buffer1000_vs_bare": round(fed["feed_buffer1000"] / bkd, 2),
                   "ray_data_normalised_img_s": round(fed["feed_normalised"], 1)}
        result |= {k: round(v, 2) for k, v in fed.items() if k.endswith("_per_1k")}
        print(f"  bkd through Ray Data (a one-worker trial's uint8 feed): {result['ray_data_img_s_per_core']} img/s per core "
              f"({result['ray_data_vs_bare']}x the bare pipeline); driver {result['feed_driver_cpu_s_per_1k']} CPU s per 1k images")
        print(f"    with data.shuffle_buffer=1000: {result['ray_data_buffer1000_vs_bare']}x; driver "
              f"{result['feed_buffer1000_driver_cpu_s_per_1k']} CPU s per 1k images")
        print(f"    normalised to float in the trial (CPU trials): {result['ray_data_normalised_img_s']} img/s; driver "
              f"{result['feed_normalised_driver_cpu_s_per_1k']} CPU s per 1k images")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
