"""A search's life in the driver: the teacher, the parent MLflow run, its Tune experiments, an honest end."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from mlflow.tracking import MlflowClient

from orchestrator.config.job import Job
from orchestrator.console.interrupts import STOP
from orchestrator.search.summary import SELECTION_TAG, RunCases, collect_rows, first_failure, selection_note, summarize
from orchestrator.search.teacher import ready_teacher
from orchestrator.search.tuner import make_tuner
from orchestrator.tracking.mlflow_models import log_dataset
from orchestrator.tracking.objective import objective_of
from orchestrator.tracking.records import TrialRecords
from orchestrator.tracking.results import write_parquet
from orchestrator.tracking.runs import (
    END_TAG,
    PARENT_TAG,
    ROLE_TAG,
    connect,
    end_leftover_runs,
    first_line,
    flatten,
    log_metrics,
    log_params,
    reopen,
    require_answer,
)
from orchestrator.tracking.trial_logger import MLflowTrialLogger
from orchestrator.tracking.writer import MLflowWriter, Write
from orchestrator.worker.runtime import check_cluster_resources, init_ray

PARENT_FILE = "bkd_parent_run.json"


def common_params(job: Job, teacher_source: str) -> dict[str, Any]:
    c = job.cfg
    return {"pair": job.pair_name, "teacher": str(job.teacher_model), "student": str(job.student_model), "data": c.data.name,
            "epochs": c.train.epochs, "batch_size": c.train.batch_size, "search": c.search.get("name"),
            "workers_per_trial": c.resources.workers_per_trial, "teacher_source": teacher_source, **job.split_sizes()}


def parent_run(client: MlflowClient, experiment_id: str, job: Job, resume: bool, parent_id: Optional[str] = None) -> str:
    """The search's parent MLflow run: new, or on resume the one recorded in the experiment folder;
    ``parent_id``: nested under that run (a search inside a comparison)."""
    marker = Path(job.storage_path) / job.experiment_name / PARENT_FILE
    if resume and marker.is_file():
        run_id = json.loads(marker.read_text())["run_id"]
        ended = end_leftover_runs(client, experiment_id, run_id)
        reopen(client, run_id)
        print(f"[bkd] resuming {job.experiment_name}: parent MLflow run {run_id} ({ended} runs an earlier attempt left RUNNING marked KILLED)")
        return run_id
    tags = {ROLE_TAG: "search", SELECTION_TAG: job.dataset.selection} | ({PARENT_TAG: parent_id} if parent_id else {})
    run = client.create_run(experiment_id, run_name=job.experiment_name, tags=tags)
    log_params(client, run.info.run_id, flatten(job.cfg) | job.split_sizes())
    log_dataset(client, run.info.run_id, job.dataset.mlflow_input())
    from orchestrator.config.pair_table import table

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.json")
        Path(path).write_text(json.dumps(dataclasses.asdict(job.cfg), indent=2))
        client.log_artifact(run.info.run_id, path)
        path = os.path.join(tmp, "describe.txt")  # the pair as blocks: shapes, parameters, multiply-adds, connectors
        Path(path).write_text(table(job) + "\n")
        client.log_artifact(run.info.run_id, path)
    if "://" not in job.storage_path:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"run_id": run.info.run_id}))
    return run.info.run_id


Report = Callable[[Job, MLflowWriter, Any, bool, RunCases], list[dict[str, Any]]]


@dataclass
class NestedSearch:
    """A search run as a nested MLflow run of another job's parent (``compare.tune_trials``)."""

    run_id: str
    rows: list[dict[str, Any]]  # best first
    param_names: list[str]


RunSearch = Callable[[Job, str], NestedSearch]  # (the search's job, its label) -> its result
Plan = Callable[[RunSearch], list[dict]]  # runs searches first, then returns the cases to train


class Search:
    """One search's life in the driver, in the order it happens: ``start`` (Ray, the teacher, the parent
    MLflow run, writes an MLflow outage left), ``run_cases`` (a Tune experiment under the parent run),
    ``run_nested`` (another job's search as a nested run, for comparisons), then ``finish`` or ``abandon``
    (the parent run ends FINISHED, FAILED or KILLED, and no trial run is left RUNNING)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.client, self.experiment_id = connect(job.tracking_uri, job.cfg.mlflow.experiment)
        self.out = Path(job.output_dir) / job.experiment_name
        self.teacher_state: dict[str, Any] = {}
        self.teacher_source = ""
        self.parent_id = ""
        self.started = time.time()

    def start(self) -> None:
        job, m = self.job, self.job.cfg.mlflow
        if job.selects_on_test:
            print(f"[bkd] warning: {selection_note(job)}.", flush=True)
        init_ray(job)
        check_cluster_resources(job)
        self.teacher_state, self.teacher_source, teacher_scores = ready_teacher(job, self.client, self.experiment_id)
        self.parent_id = parent_run(self.client, self.experiment_id, job, resume=job.cfg.tune.resume)
        if teacher_scores:
            log_metrics(self.client, self.parent_id, teacher_scores, 0, int(time.time() * 1000))
        self.trial_writer = MLflowWriter(job.tracking_uri, self.experiment_id, self.parent_id, m.retry_interval_s,
                                         spool=self.out / "mlflow_pending_trials.jsonl")
        self.parent = MLflowWriter(job.tracking_uri, self.experiment_id, self.parent_id, m.retry_interval_s,
                                   spool=self.out / "mlflow_pending_search.jsonl")
        self.adopt_spools()
        self.started = time.time()

    def adopt_spools(self) -> None:
        """Writes an earlier run's MLflow outage left in the output folder: logged on resume, else pointed out."""
        job, out = self.job, self.out
        spools = sorted(out.glob("mlflow_pending_*.jsonl"))
        if spools and job.cfg.tune.resume:
            left = sum(self.parent.adopt(spool) for spool in spools)
            print(f"[bkd] logging {left} MLflow writes that an earlier MLflow outage left in {out}", flush=True)
            self.parent.flush(force=True)
        elif spools:
            print(f"[bkd] warning: {out} holds MLflow writes an earlier run of {job.experiment_name} could not log "
                  f"({', '.join(p.name for p in spools)}); tune.resume=true logs them.", flush=True)

    def trial_logger(self, variant: Job, writer: MLflowWriter, experiment: str) -> MLflowTrialLogger:
        return MLflowTrialLogger(writer, common_params(variant, self.teacher_source), TrialRecords(self.job.storage_path, experiment),
                                 self.job.cfg.mlflow.end_wait_s, self.job.dataset.mlflow_input())

    def run_cases(self, cases: Optional[list[dict]], name: str) -> Any:
        """One Tune experiment (the search, or listed ``cases``) under this search's parent run."""
        callback = self.trial_logger(self.job, self.trial_writer, name)
        with STOP.graceful():
            return make_tuner(self.job, self.teacher_state, callback, cases, name).fit()

    def run_nested(self, variant: Job, label: str) -> NestedSearch:
        """``variant``'s search (its Tune experiment ``variant.experiment_name``) as a nested run of this parent."""
        job, m = self.job, self.job.cfg.mlflow
        run_id = parent_run(self.client, self.experiment_id, variant, resume=job.cfg.tune.resume, parent_id=self.parent_id)
        writer = MLflowWriter(job.tracking_uri, self.experiment_id, run_id, m.retry_interval_s,
                              spool=self.out / f"mlflow_pending_{label}.jsonl")
        print(f"\n[bkd] {label}: a search of {variant.cfg.tune.num_samples} trials (MLflow run {run_id})", flush=True)
        with STOP.graceful():
            results = make_tuner(variant, self.teacher_state, self.trial_logger(variant, writer, variant.experiment_name)).fit()
        interrupted = STOP.received is not None
        rows, _, names = collect_rows(variant, writer, results, interrupted)
        folder = self.out / label
        folder.mkdir(parents=True, exist_ok=True)
        write_parquet(rows, str(folder / "trials.parquet"))  # kept when interrupted too: tune.resume=true continues
        if interrupted:  # its run and its running trials end KILLED here (the comparison's parent ends them one level up)
            end_runs_left(self.client, self.experiment_id, run_id, f"interrupted ({STOP.name or 'SIGINT'})")
            writer.submit(Write("end", {"run_id": run_id, "status": "KILLED", "error": None}))
            writer.drain(0.0)
            raise KeyboardInterrupt
        best = rows[0] if rows and rows[0]["status"] == "FINISHED" else None
        if best is not None:
            writer.submit(Write("tags", {"run_id": run_id, "tags": {f"best.{k}": best[k] for k in names if k in best}}))
            o = objective_of(self.job)
            writer.submit(Write("metrics", {"run_id": run_id, "metrics": {f"best_{o.val}": float(best[o.val])}, "step": 0,
                                            "timestamp_ms": int(time.time() * 1000)}))
        writer.submit(Write("artifact", {"run_id": run_id, "path": str(folder / "trials.parquet")}))
        writer.submit(Write("end", {"run_id": run_id, "status": "FINISHED" if best is not None else "FAILED",
                                    "error": None if best is not None else first_failure(rows)}))
        writer.drain(float(m.end_wait_s), f"The search's results are in {folder}.")
        return NestedSearch(run_id, rows, names)

    def finish(self, rows: list[dict[str, Any]]) -> None:
        """The search ran to its end: runs the time budget stopped end KILLED, the parent FINISHED (FAILED
        when every trial failed), waiting up to ``mlflow.end_wait_s`` for MLflow."""
        budget = self.job.cfg.tune.time_budget_s
        out_of_time = bool(budget) and time.time() - self.started >= float(budget)
        end_runs_left(self.client, self.experiment_id, self.parent_id, "stopped by tune.time_budget_s" if out_of_time
                      else "the search ended before the trial reported an epoch")
        failed = bool(rows) and all(r["status"] in ("FAILED", "DIVERGED") for r in rows)  # every trial failed
        self.parent.submit(Write("end", {"run_id": self.parent_id, "status": "FAILED" if failed else "FINISHED",
                                         "error": first_failure(rows) if failed else None}))
        self.parent.drain(float(self.job.cfg.mlflow.end_wait_s), f"The search's results are in {self.out}.")

    def abandon(self, exc: BaseException) -> None:
        """Interrupted (KILLED) or failed (FAILED, with the error): the parent and its running trials end,
        tagged with why; one last try to reach MLflow, no waiting."""
        if not self.parent_id:
            return  # stopped before the parent run existed (starting Ray, the teacher's phase)
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = f"interrupted ({STOP.name or 'SIGINT'})" if interrupted else f"the search failed: {type(exc).__name__}"
        self.parent.submit(Write("end", {"run_id": self.parent_id, "status": "KILLED" if interrupted else "FAILED",
                                         "error": None if interrupted else f"{type(exc).__name__}: {exc}"}))
        self.parent.submit(Write("tags", {"run_id": self.parent_id, "tags": {END_TAG: reason}}))
        end_runs_left(self.client, self.experiment_id, self.parent_id, reason)
        self.parent.drain(0.0)


def search(job: Job, cases: Optional[list[dict] | Plan] = None, report: Optional[Report] = None) -> list[dict[str, Any]]:
    """The whole job: teacher, parent run, the Tune experiment (a search, or ``cases``), then
    ``report`` (default ``summarize``), which may run more cases under the same parent run.
    ``cases`` may be a plan: called with a function that runs a search as a nested run of this
    job's parent, it returns the cases. Returns the rows ``report`` returns, best first."""
    s = Search(job)
    s.start()
    try:
        if callable(cases):
            cases = cases(s.run_nested)
        results = s.run_cases(cases, job.experiment_name)
        rows = (report or summarize)(job, s.parent, results, STOP.received is not None, s.run_cases)
        if STOP.received is not None:
            raise KeyboardInterrupt  # rows and trials.parquet say which trials were interrupted
        s.finish(rows)
    except BaseException as exc:
        s.abandon(exc)
        raise
    print(f"\n[bkd] {len(rows)} trials in {time.time() - s.started:.0f} s; MLflow parent run {s.parent_id}")
    return rows


def end_runs_left(client: MlflowClient, experiment_id: str, parent_id: str, reason: str) -> None:
    """Trial runs still RUNNING (interrupted or out of time) end KILLED, tagged with why."""
    try:
        require_answer(client.tracking_uri)
        end_leftover_runs(client, experiment_id, parent_id, "KILLED", reason)
    except Exception as mlflow_exc:  # MLflow down as well: tune.resume=true ends them later
        print(f"[bkd] warning: could not mark this search's running trials KILLED in MLflow ({first_line(mlflow_exc)}).", flush=True)
