"""A Tune trial: the function trainable every Tune experiment of bkd runs (the search's trials, listed
cases, and the teacher's training)."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from ray import tune

from orchestrator.config.job import Job
from orchestrator.tracking.records import RECORDED, TEACHER_PROGRESS, TrialRecords
from orchestrator.tracking.results import case_of
from orchestrator.worker.loop import tune_trial_loop
from orchestrator.worker.runtime import make_trainer


def run_trial(config: dict[str, Any], job: Job, teacher_state: Optional[dict], mode: str = "distill") -> None:
    """Tune function trainable. One worker: the trial trains in its own process. Several: one Ray
    Train run (DDP over the workers), named after the Tune trial id so that a retried trial resumes
    from its last checkpoint. A trial that already ended (its record exists: a resumed experiment whose
    snapshot predates the end) reports its recorded result and returns. ``mode``: ``distill`` (a
    student with the frozen teacher) or ``teacher`` (the teacher's own training)."""
    context = tune.get_context()
    records = TrialRecords(job.storage_path, context.get_experiment_name())  # the search's, or its -confirm runs'
    trial_id = context.get_trial_id()
    record = records.read(trial_id)
    if record is not None:
        tune.report({**record.metrics, RECORDED: 1})
        return
    params = case_of(config)
    # listed cases run every epoch (no scheduler), and so does the teacher
    test_epochs = [] if "case" in config or mode == "teacher" else rung_epochs(job)
    # the teacher's progress outlives its Tune trial: a resumed teacher is a new trial that continues it
    progress_key = TEACHER_PROGRESS if mode == "teacher" else None
    if job.cfg.resources.workers_per_trial == 1:  # trains here: a reused process (tune.reuse_actors)
        torch._dynamo.reset()  # compiles this trial's model afresh, as a new process would
        tune_trial_loop({"job": job, "params": params, "mode": mode, "teacher_state": teacher_state,
                         "test_epochs": test_epochs, "progress_key": progress_key}, records)
        return
    # rank 0 records the trial's end before its last report (Train's result keeps only checkpointed reports)
    make_trainer(job, params, mode, name=f"{context.get_experiment_name()}-train-{trial_id}", teacher_state=teacher_state,
                 report_to_tune=True, record_as=(job.storage_path, context.get_experiment_name(), trial_id),
                 test_epochs=test_epochs, progress_key=progress_key).fit()


def rung_epochs(job: Job) -> list[int]:
    """The epochs after which ASHA may stop a trial (its rungs, as Ray's ``AsyncHyperBandScheduler``
    places them for one bracket): a trial scores its weights on the test split there and at its last
    epoch, so that a trial stopped early has the test accuracy of the weights it ended with."""
    t, epochs = job.cfg.tune, job.cfg.train.epochs
    if t.scheduler != "asha":
        return []
    grace, factor = t.grace_period, t.reduction_factor
    if grace >= epochs:
        return []
    rungs = int(math.log(epochs / grace) / math.log(factor) + 1)
    return sorted({min(epochs, math.ceil(grace * factor ** k - 1e-9)) for k in range(rungs)})
