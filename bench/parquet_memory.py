"""Peak memory of the README's ``ParquetImages`` + DataLoader loop, small against large shards.

    python bench/parquet_memory.py --root /tmp/pmem --sizes 240 4800 20000 --workers 2 --image-size 224

Writes shards of 320x240 JPEGs of noise (what ``prepare`` stores at its default max_side; noise is the
largest such a JPEG gets, about 69 KB) for each size, then
runs one epoch of the loop per size in a fresh process and prints the peak resident memory of that
process tree (RSS and PSS summed over /proc, sampled every 50 ms) and the growth between the sizes.
Shards hold row groups of ``ROWS_PER_GROUP`` (128) images, as ``prepare`` writes them: 240 images
are two row groups, one per worker.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def write_shards(root: Path, count: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from bkd_core.data.parquet import ROWS_PER_GROUP  # what prepare writes

    if (root / "train").is_dir():
        return
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    for start in range(0, count, 1024):
        rows = range(start, min(count, start + 1024))
        images = []
        for _ in rows:  # every image its own noise: no Parquet dictionary can shrink the shards
            out = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(out, format="JPEG", quality=90)
            images.append(out.getvalue())
        table = pa.table({"image": images, "label": [i % 10 for i in rows]})
        pq.write_table(table, root / "train" / f"part-{start:06d}.parquet", row_group_size=ROWS_PER_GROUP, use_dictionary=["label"])
    (root / "classes.json").write_text(json.dumps([str(i) for i in range(10)]))


def tree_memory_mb(pid: int) -> tuple[float, float]:
    """(RSS summed, PSS summed) of ``pid`` and its children in MB (Linux /proc). RSS counts a page shared by
    the loop and its forked workers once per process; PSS splits it among them (the tree's real footprint)."""
    rss = pss = 0
    pids = {pid}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    pids.add(int(entry))
            except OSError:
                pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return rss / 1024, pss / 1024


LOOP = """
import sys, torch
from torch.utils.data import DataLoader
from bkd_core.data import ParquetImages
train = ParquetImages(sys.argv[1], "train", image_size=int(sys.argv[2]), train=True)
loader = DataLoader(train, batch_size=64, num_workers=int(sys.argv[3]))
train.set_epoch(0)
seen = sum(int(y.shape[0]) for _, y in loader)
print(seen)
"""


def measure(root: Path, image_size: int, workers: int) -> tuple[float, float, int, float]:
    """(peak RSS MB, peak PSS MB of the loop's process tree, images seen, seconds)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", LOOP, str(root), str(image_size), str(workers)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    peak = [0.0, 0.0]

    def sample() -> None:
        while proc.poll() is None:
            rss, pss = tree_memory_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    out, _ = proc.communicate()
    thread.join()
    return peak[0], peak[1], int(out.strip() or 0), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/bkd-parquet-memory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[240, 4800])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    results = {}
    for count in args.sizes:
        root = Path(args.root) / str(count)
        write_shards(root, count)
        rss, pss, seen, seconds = measure(root, args.image_size, args.workers)
        results[count] = (rss, pss)
        print(f"{count:6d} images: peak RSS {rss:7.1f} MB, PSS {pss:7.1f} MB (loop + {args.workers} workers), "
              f"{seen} seen in {seconds:.1f} s")
    first, last = args.sizes[0], args.sizes[-1]
    print(f"growth {first} -> {last} images: RSS {results[last][0] - results[first][0]:+.1f} MB, "
          f"PSS {results[last][1] - results[first][1]:+.1f} MB")

if __name__ == "__main__":
    main()
