"""Tune overhead: the same Block-KD training run directly (bkd_core.train.fit) and as one
one-worker Ray Tune trial (python -m orchestrator.train), on this machine.

    python bench/overhead_bench.py --epochs 100          # about a 1-minute run on 2 CPU cores
    python bench/overhead_bench.py --epochs 100 --checkpointing default,1:0,10:0

Each ``--checkpointing`` entry is a trial run: ``default`` (the config's checkpoint settings: each
epoch, at most one per 30 s) or ``E:S`` (``train.checkpoint_every_epochs=E``,
``train.checkpoint_min_interval_s=S``).

Prints the direct time, the trial's time as Tune measured it, the whole command's time (Ray start,
trial scheduling, checkpoints, MLflow logging) and the overheads.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import torch

from bkd_core import BlockKD, data, models, train
from orchestrator import train as train_entry
from orchestrator.config.compose import compose
from orchestrator.config.job import validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--checkpointing", default="default,1:0",
                        help="comma-separated trial runs: default, or EPOCHS:SECONDS (checkpoint every EPOCHS, at most one per SECONDS)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bkd-overhead-"))
    splits = data.load("digits")
    torch.manual_seed(0)
    teacher = models.create("tiny_resnet", 10, 1)
    train.fit(train.Supervised(teacher), splits, train.TrainConfig(epochs=3, batch_size=64, lr=0.1))
    torch.save(teacher.state_dict(), tmp / "teacher.pt")

    # Direct: what one Train worker does, in this process (1 thread, as a 1-CPU worker).
    torch.set_num_threads(1)
    student = models.create("tiny_cnn", 10, 1)
    kd = BlockKD(teacher, student, cuts=[1, 2, 3], gamma=1.0, stone_temperature=4.0,
                 sample_input=splits.train.images[:2].float())
    start = time.perf_counter()
    train.fit(kd, splits, train.TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05))
    direct = time.perf_counter() - start

    rows = []
    for setting in args.checkpointing.split(","):
        name = "overhead-" + setting.replace(":", "-")
        overrides = [f"teacher.checkpoint={tmp / 'teacher.pt'}", f"train.epochs={args.epochs}", f"tune.name={name}",
                     f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray", f"output_dir={tmp}/out",
                     "fixed.cuts=[1,2,3]", "fixed.lr=0.05", "ray.address=local"]
        label = "default checkpoints (each epoch, at most one per 30 s)"
        if setting != "default":
            every, seconds = setting.split(":")
            overrides += [f"train.checkpoint_every_epochs={every}", f"train.checkpoint_min_interval_s={seconds}"]
            label = f"checkpoint every {every} epochs, at most one per {seconds} s"
        job = validate(compose(overrides))
        start = time.perf_counter()
        train_entry.run(job)
        whole = time.perf_counter() - start
        (row,) = pq.read_table(tmp / "out" / name / "trials.parquet").to_pylist()
        rows.append((label, row["wall_time_s"], whole))
    print(f"\nBlock-KD tiny_resnet -> tiny_cnn on digits, {args.epochs} epochs, 1 worker")
    print("| run | seconds | overhead vs direct |\n|---|---|---|")
    print(f"| direct bkd_core.train.fit | {direct:.1f} | - |")
    for label, trial, whole in rows:
        print(f"| Tune trial, {label} (Tune's time_total_s) | {trial:.1f} | {100 * (trial / direct - 1):+.1f} % |")
        print(f"| whole orchestrator.train, {label} (Ray start included) | {whole:.1f} | "
              f"{100 * (whole / direct - 1):+.1f} % |")
    ray.shutdown()


if __name__ == "__main__":
    main()
