"""Get the teacher: a given checkpoint, an MLflow URI, an earlier run with the same teacher config,
or a new training through the same Tune trial path as the search's trials (logged as its own MLflow
run; interrupted, it continues after its last finished epoch with ``tune.resume=true``); exit 1 when it
learned nothing (its val accuracy not clearly above chance, ``orchestrator.search.chance``).

    python -m orchestrator.teacher data=fashion_mnist data.root=PATH pair=tiny
"""
from __future__ import annotations

import sys

from orchestrator.config.job import Job
from orchestrator.console.cli import entry_point
from orchestrator.search.teacher import ready_teacher
from orchestrator.tracking.runs import connect
from orchestrator.worker.runtime import check_cluster_resources, init_ray


def run(job: Job) -> str:
    client, experiment_id = connect(job.tracking_uri, job.cfg.mlflow.experiment)
    init_ray(job)
    check_cluster_resources(job)
    # a teacher that learned nothing is said here too (exit 1), not first by the search that would use it
    _, source, _ = ready_teacher(job, client, experiment_id)
    print(f"[bkd] teacher: {source}")
    return source


def main(argv: list[str] | None = None) -> int:
    return entry_point(run, argv)


if __name__ == "__main__":
    sys.exit(main())
