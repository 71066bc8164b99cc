"""What a trial's process start costs a search of short trials: the same search (random search, no early
stopping) with ``tune.reuse_actors=false`` (a fresh Ray actor per trial) and ``true`` (bkd's default:
a trial's process trains the next trial), on this machine's local Ray cluster.

    python bench/reuse_bench.py --trials 12 --epochs 3      # about 2 minutes on 2 CPU cores

Ray starts before either search; prints each search's time, its time per trial and the ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from bkd_core import models
from orchestrator import tune as tune_entry
from orchestrator.config.compose import compose
from orchestrator.config.job import validate
from orchestrator.worker.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bkd-reuse-"))
    torch.manual_seed(0)
    torch.save(models.create("tiny_resnet", 10, 1).state_dict(), tmp / "teacher.pt")  # a random teacher: timing only
    jobs = {reuse: validate(compose([
        f"teacher.checkpoint={tmp / 'teacher.pt'}", f"train.epochs={args.epochs}", f"tune.name=reuse-{reuse}",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray", f"output_dir={tmp}/out",
        f"tune.num_samples={args.trials}", "tune.scheduler=none", "tune.searcher=random", f"tune.reuse_actors={reuse}"]))
        for reuse in ("false", "true")}
    init_ray(jobs["false"])  # started once, outside both timings
    times = {}
    for reuse, job in jobs.items():
        start = time.perf_counter()
        tune_entry.run(job)
        times[reuse] = time.perf_counter() - start
        assert len(pq.read_table(tmp / "out" / f"reuse-{reuse}" / "trials.parquet")) == args.trials
    ray.shutdown()
    print(f"\n{args.trials} trials of {args.epochs} epochs (digits, tiny pair, 2 at once), local Ray cluster")
    print("| tune.reuse_actors | search (s) | per trial (s) | search vs false |\n|---|---|---|---|")
    for reuse, whole in times.items():
        print(f"| {reuse} | {whole:.1f} | {whole / args.trials:.2f} | {whole / times['false']:.2f}x |")


if __name__ == "__main__":
    main()
