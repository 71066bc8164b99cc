"""The teacher's phase of a search: a one-worker teacher trained as a one-trial Tune experiment (what
bkd does) against the same training through a Ray Train ``TorchTrainer`` (a controller and a worker
group), in one process on one Ray cluster, on this machine.

    python bench/teacher_phase.py --epochs 2 --repeats 3

Prints each way's seconds from the start of the phase to the teacher's weights in the driver, and the
time saved. The epochs are the same in both; the difference is what starting each way costs.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray

from orchestrator.config.compose import compose
from orchestrator.config.job import validate
from orchestrator.search.teacher import TEACHER, WRITERS, teacher_tuner
from orchestrator.tracking.records import TrialRecords
from orchestrator.tracking.runs import connect
from orchestrator.tracking.writer import MLflowWriter
from orchestrator.worker.runtime import init_ray, make_trainer


def as_tune_trial(job, name: str) -> float:
    """bkd's way: ``teacher_tuner`` (one Tune trial; the worker trains in the trial's process)."""
    client, experiment_id = connect(job.tracking_uri, "bench")
    run_id = client.create_run(experiment_id).info.run_id
    WRITERS[run_id] = MLflowWriter(job.tracking_uri, experiment_id, None)
    WRITERS[run_id].logged_epoch[TEACHER] = 0
    start = time.perf_counter()
    results = teacher_tuner(job, name, run_id).fit()
    trial = results._experiment_analysis.trials[0]
    assert TrialRecords(job.storage_path, name).student(trial.trial_id) is not None
    return time.perf_counter() - start


def as_train_run(job, name: str) -> float:
    """A Ray Train run of one worker (a ``TorchTrainer``: controller actor, worker group, checkpoint)."""
    start = time.perf_counter()
    result = make_trainer(job, {}, "teacher", name=name).fit()
    assert result.error is None and result.checkpoint is not None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bkd-teacher-phase-"))
    job = validate(compose([f"teacher.epochs={args.epochs}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                            f"ray.storage_path={tmp}/ray", f"output_dir={tmp}/out", "ray.address=local", "tune.name=bench"]))
    init_ray(job)
    times: dict[str, list[float]] = {"one-trial Tune experiment (bkd)": [], "Ray Train TorchTrainer, 1 worker": []}
    for i in range(args.repeats):  # alternate, so that a slow spell of the machine hits both
        times["one-trial Tune experiment (bkd)"].append(as_tune_trial(job, f"tune-{i}"))
        times["Ray Train TorchTrainer, 1 worker"].append(as_train_run(job, f"train-{i}"))
    ray.shutdown()
    print(f"\nteacher phase, {args.epochs} epochs of tiny_resnet on digits, {args.repeats} runs each (seconds):")
    for way, values in times.items():
        print(f"  {way:<36} median {statistics.median(values):6.1f}   runs {', '.join(f'{v:.1f}' for v in values)}")
    tune_s, train_s = (statistics.median(v) for v in times.values())
    print(f"time saved per search that trains its teacher: {train_s - tune_s:.1f} s ({train_s / tune_s:.2f}x faster)")


if __name__ == "__main__":
    main()
