"""Search Block-KD hyper-parameters: Ray Tune + Optuna (TPE, define-by-run) over Ray Train trials,
each trial a nested MLflow run under one parent run; trials.parquet and the best student at the end.

    python -m orchestrator.tune                                   # embedded default (digits)
    python -m orchestrator.tune data=fashion_mnist data.root=PATH pair=tiny tune.num_samples=64
    ray job submit --working-dir . -- python -m orchestrator.tune <same overrides>
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import optuna
import torch
from mlflow.tracking import MlflowClient

from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from search_spaces.space import suggest

from .cli import entry_point
from .config import Job
from .importance import format_importances, param_importances
from .mlflow_extras import log_dataset, log_student_model
from .interrupts import STOP
from .plots import search_figure
from .progress import ProgressPrinter
from .records import TrialRecords
from .results import case_of, format_table, ranked, trial_id_of, trial_row, trial_status, val_acc_curve, write_parquet
from .stats import mean_std
from .runtime import check_cluster_resources, concurrent_trials, init_ray, trial_resources
from .teacher import obtain_teacher, score_teacher
from .tracking import (
    END_TAG, PARENT_TAG, ROLE_TAG, MLflowTrialLogger, MLflowWriter, Write, child_runs, connect, end_leftover_runs, flatten, first_line,
    log_metrics, log_params, reopen,
    require_answer,
)
from .trial import run_trial

PARENT_FILE = "bkd_parent_run.json"


def common_params(job: Job, teacher_source: str) -> dict[str, Any]:
    c = job.cfg
    return {"pair": job.pair_name, "teacher": str(job.teacher_model), "student": str(job.student_model), "data": c.data.name,
            "epochs": c.train.epochs, "batch_size": c.train.batch_size, "search": c.search.get("name"),
            "workers_per_trial": c.resources.workers_per_trial, "teacher_source": teacher_source, **job.split_sizes()}


SELECTION_TAG = "bkd.selection"  # val: the search selected on the held-out split; test: on the test split


def selection_note(job: Job) -> str:
    """Which split selects and which reports, in one sentence."""
    rows = job.dataset.rows
    if job.selects_on_test:
        return (f"selection on the TEST split ({rows['test']} images; data.val_fraction=0): the best trial's accuracy is "
                "chosen on the data it is reported on and is optimistic; hold out a val split (data.val_fraction=0.1) "
                "for a figure you can trust")
    return (f"selection on the held-out val split ({rows['val']} images of the training data); test_acc: the final "
            f"weights on the test split ({rows['test']} images), never used to select")


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
    from .describe import table

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


def make_tuner(job: Job, teacher_state: dict, callback: MLflowTrialLogger, cases: Optional[list[dict]] = None,
               name: Optional[str] = None) -> tune.Tuner:
    """The Tuner of the search (Optuna + ASHA), or of ``cases``: one trial per listed configuration,
    no search, no early stopping. ``name``: the Tune experiment (default: the job's)."""
    t = job.cfg.tune
    name = name or job.experiment_name
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job, teacher_state=teacher_state), trial_resources(job))
    total = len(cases) if cases is not None else t.num_samples
    callbacks = [callback] if t.console == "ray" else [callback, ProgressPrinter(total)]
    run_config = tune.RunConfig(name=name, storage_path=job.storage_path, callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=verbosity(job))
    path = os.path.join(job.storage_path, name)
    if t.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    if cases is not None:
        return tune.Tuner(trainable, param_space={"case": tune.grid_search(cases)}, run_config=run_config,
                          tune_config=tune.TuneConfig(num_samples=1, metric="val_acc", mode="max", reuse_actors=t.reuse_actors,
                                                      max_concurrent_trials=concurrent_trials(job)))
    sampler = optuna.samplers.RandomSampler(seed=t.seed) if t.searcher == "random" else None  # None: TPE
    searcher = OptunaSearch(
        space=functools.partial(suggest, space=job.cfg.search, num_blocks=job.num_blocks, fixed=job.cfg.fixed),
        metric="val_acc", mode="max", seed=None if sampler else t.seed, sampler=sampler)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=job.cfg.train.epochs,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    tune_config = tune.TuneConfig(metric="val_acc", mode="max", search_alg=searcher, scheduler=scheduler,
                                  num_samples=t.num_samples, max_concurrent_trials=concurrent_trials(job),
                                  time_budget_s=t.time_budget_s, reuse_actors=t.reuse_actors)
    return tune.Tuner(trainable, run_config=run_config, tune_config=tune_config)


def verbosity(job: Job) -> int:
    """Ray Tune's console output: none by default (bkd prints its own progress), all with tune.console=ray."""
    return 2 if job.cfg.tune.console == "ray" else 0


RunCases = Callable[[list[dict], str], Any]  # (cases, Tune experiment name) -> ResultGrid
Report = Callable[[Job, MLflowWriter, Any, bool, RunCases], list[dict[str, Any]]]


@dataclass
class NestedSearch:
    """A search run as a nested MLflow run of another job's parent (``compare.tune_trials``)."""

    run_id: str
    rows: list[dict[str, Any]]  # best first
    param_names: list[str]


RunSearch = Callable[[Job, str], NestedSearch]  # (the search's job, its label) -> its result
Plan = Callable[[RunSearch], list[dict]]  # runs searches first, then returns the cases to train


def search(job: Job, cases: Optional[list[dict] | Plan] = None, report: Optional[Report] = None) -> list[dict[str, Any]]:
    """The whole job: teacher, parent run, the Tune experiment (a search, or ``cases``), then
    ``report`` (default ``summarize``), which may run more cases under the same parent run.
    ``cases`` may be a plan: called with a function that runs a search as a nested run of this
    job's parent, it returns the cases. Returns the rows ``report`` returns, best first."""
    client, experiment_id = connect(job.tracking_uri, job.cfg.mlflow.experiment)
    if job.selects_on_test:
        print(f"[bkd] warning: {selection_note(job)}.", flush=True)
    init_ray(job)
    check_cluster_resources(job)
    teacher_state, teacher_source, trained_now = obtain_teacher(job, client, experiment_id)
    teacher_scores = score_teacher(job, teacher_state, announce=not trained_now)
    parent_id = parent_run(client, experiment_id, job, resume=job.cfg.tune.resume)
    if teacher_scores:
        log_metrics(client, parent_id, teacher_scores, 0, int(time.time() * 1000))
    m, out = job.cfg.mlflow, Path(job.output_dir) / job.experiment_name
    trial_writer = MLflowWriter(job.tracking_uri, experiment_id, parent_id, m.retry_interval_s,
                                spool=out / "mlflow_pending_trials.jsonl")
    parent = MLflowWriter(job.tracking_uri, experiment_id, parent_id, m.retry_interval_s, spool=out / "mlflow_pending_search.jsonl")
    spools = sorted(out.glob("mlflow_pending_*.jsonl"))
    if spools and job.cfg.tune.resume:
        left = sum(parent.adopt(spool) for spool in spools)
        print(f"[bkd] logging {left} MLflow writes that an earlier MLflow outage left in {out}", flush=True)
        parent.flush(force=True)
    elif spools:
        print(f"[bkd] warning: {out} holds MLflow writes an earlier run of {job.experiment_name} could not log "
              f"({', '.join(p.name for p in spools)}); tune.resume=true logs them.", flush=True)
    start = time.time()

    def run_cases(more: Optional[list[dict]], name: str) -> Any:
        """One Tune experiment (the search, or listed cases) under this search's parent run."""
        callback = MLflowTrialLogger(trial_writer, common_params(job, teacher_source), TrialRecords(job.storage_path, name),
                                     m.end_wait_s, job.dataset.mlflow_input())
        with STOP.graceful():
            return make_tuner(job, teacher_state, callback, more, name).fit()

    def run_search(variant: Job, label: str) -> NestedSearch:
        """``variant``'s search (its Tune experiment ``variant.experiment_name``) as a nested run of this parent."""
        resume = job.cfg.tune.resume
        run_id = parent_run(client, experiment_id, variant, resume=resume, parent_id=parent_id)
        writer = MLflowWriter(job.tracking_uri, experiment_id, run_id, m.retry_interval_s, spool=out / f"mlflow_pending_{label}.jsonl")
        callback = MLflowTrialLogger(writer, common_params(variant, teacher_source), TrialRecords(job.storage_path, variant.experiment_name),
                                     m.end_wait_s, job.dataset.mlflow_input())
        print(f"\n[bkd] {label}: a search of {variant.cfg.tune.num_samples} trials (MLflow run {run_id})", flush=True)
        with STOP.graceful():
            results = make_tuner(variant, teacher_state, callback).fit()
        interrupted = STOP.received is not None
        rows, _, names = collect_rows(variant, writer, results, interrupted)
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        write_parquet(rows, str(folder / "trials.parquet"))  # kept when interrupted too: tune.resume=true continues
        if interrupted:  # its run and its running trials end KILLED here (the comparison's parent ends them one level up)
            end_runs_left(client, experiment_id, run_id, f"interrupted ({STOP.name or 'SIGINT'})")
            writer.submit(Write("end", {"run_id": run_id, "status": "KILLED", "error": None}))
            writer.drain(0.0)
            raise KeyboardInterrupt
        best = rows[0] if rows and rows[0]["status"] == "FINISHED" else None
        if best is not None:
            writer.submit(Write("tags", {"run_id": run_id, "tags": {f"best.{k}": best[k] for k in names if k in best}}))
            writer.submit(Write("metrics", {"run_id": run_id, "metrics": {"best_val_acc": float(best["val_acc"])}, "step": 0,
                                            "timestamp_ms": int(time.time() * 1000)}))
        writer.submit(Write("artifact", {"run_id": run_id, "path": str(folder / "trials.parquet")}))
        writer.submit(Write("end", {"run_id": run_id, "status": "FINISHED" if best is not None else "FAILED",
                                    "error": None if best is not None else first_failure(rows)}))
        writer.drain(float(m.end_wait_s), f"The search's results are in {folder}.")
        return NestedSearch(run_id, rows, names)

    try:
        if callable(cases):
            cases = cases(run_search)
        results = run_cases(cases, job.experiment_name)
        rows = (report or summarize)(job, parent, results, STOP.received is not None, run_cases)
        if STOP.received is not None:
            raise KeyboardInterrupt  # rows and trials.parquet say which trials were interrupted
        budget = job.cfg.tune.time_budget_s
        end_runs_left(client, experiment_id, parent_id, "stopped by tune.time_budget_s" if budget and
                      time.time() - start >= float(budget) else "the search ended before the trial reported an epoch")
        failed = bool(rows) and all(r["status"] in ("FAILED", "DIVERGED") for r in rows)  # every trial failed
        parent.submit(Write("end", {"run_id": parent_id, "status": "FAILED" if failed else "FINISHED",
                                    "error": first_failure(rows) if failed else None}))
        parent.drain(float(m.end_wait_s), f"The search's results are in {out}.")
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        reason = f"interrupted ({STOP.name or 'SIGINT'})" if interrupted else f"the search failed: {type(exc).__name__}"
        parent.submit(Write("end", {"run_id": parent_id, "status": "KILLED" if interrupted else "FAILED",
                                    "error": None if interrupted else f"{type(exc).__name__}: {exc}"}))
        parent.submit(Write("tags", {"run_id": parent_id, "tags": {END_TAG: reason}}))
        end_runs_left(client, experiment_id, parent_id, reason)
        parent.drain(0.0)  # one last try: a failed or interrupted search does not wait for MLflow
        raise
    print(f"\n[bkd] {len(rows)} trials in {time.time() - start:.0f} s; MLflow parent run {parent_id}")
    return rows


def end_runs_left(client: MlflowClient, experiment_id: str, parent_id: str, reason: str) -> None:
    """Trial runs still RUNNING (interrupted or out of time) end KILLED, tagged with why."""
    try:
        require_answer(client.tracking_uri)
        end_leftover_runs(client, experiment_id, parent_id, "KILLED", reason)
    except Exception as mlflow_exc:  # MLflow down as well: tune.resume=true ends them later
        print(f"[bkd] warning: could not mark this search's running trials KILLED in MLflow ({first_line(mlflow_exc)}).", flush=True)


def collect_rows(job: Job, parent: MLflowWriter, results: Any, interrupted: bool,
                 name: Optional[str] = None) -> tuple[list[dict[str, Any]], dict[str, list], list[str]]:
    """(rows best first, val_acc curves by trial id, parameter names) of a finished Tuner.fit.
    Trials that never reported anything are not rows."""
    try:
        require_answer(parent.tracking_uri)
        run_ids = child_runs(parent.client, parent.experiment_id, parent.parent_run_id)
    except Exception as exc:  # MLflow down past mlflow.end_wait_s: the table goes without run ids
        print(f"[bkd] warning: MLflow unreachable ({first_line(exc)}); the table lacks the MLflow run ids.", flush=True)
        run_ids = {}
    records = TrialRecords(job.storage_path, name or job.experiment_name)
    has_budget = job.cfg.tune.time_budget_s is not None
    rows, curves, param_names = [], {}, []
    # ResultGrid's results follow its trials in order; Tune's trial states live on the trials
    for trial, result in zip(results._experiment_analysis.trials, results):
        record = records.read(trial.trial_id)
        status = trial_status(trial.status, record, bool(result.metrics and "epoch" in result.metrics), interrupted, has_budget)
        if status is None:
            continue  # never started
        params = case_of(result.config or {})
        param_names += [k for k in params if k not in param_names]
        row = trial_row(result, params, run_ids.get(trial.trial_id), status, record)
        row.setdefault("seed", job.cfg.train.seed)  # the seed it trained with: compare never reuses it
        rows.append(row)
        curves[trial.trial_id] = val_acc_curve(result, record)
    return ranked(rows), curves, param_names


def summarize(job: Job, parent: MLflowWriter, results: Any, interrupted: bool, run_cases: RunCases) -> list[dict[str, Any]]:
    """Write trials.parquet, search.png and the best student (after ``tune.confirm_seeds`` fresh-seed
    runs of its configuration), then log them and the best trial to the parent run. An interrupted
    search logs no summary (its resume does)."""
    rows, curves, param_names = collect_rows(job, parent, results, interrupted)
    out = Path(job.output_dir) / job.experiment_name
    out.mkdir(parents=True, exist_ok=True)
    best = rows[0] if rows and rows[0]["status"] == "FINISHED" and not interrupted else None
    confirm = confirm_best(job, parent, best, param_names, run_cases) if best is not None else None
    write_parquet(rows, str(out / "trials.parquet"))
    print("\n" + format_table(rows, param_names))
    print(f"\n[bkd] {selection_note(job)}.")
    if best is not None:
        print(f"[bkd] best trial {best['trial_id']}: val_acc {best['val_acc']:.2f}, test_acc {best.get('test_acc', float('nan')):.2f}")
    if confirm:
        print(confirm)
    if interrupted or STOP.received is not None:
        print(f"\nresults so far: {out}/trials.parquet", flush=True)
        return rows
    importances = param_importances(rows, job.cfg.search, job.num_blocks, job.cfg.fixed, job.cfg.tune.seed)
    figure = search_figure(rows, curves, job.experiment_name, importances)
    figure.savefig(out / "search.png", dpi=110)
    student = export_student(TrialRecords(job.storage_path, job.experiment_name), best["trial_id"], out) if best else None
    if importances:
        print("\n" + format_importances(importances, len(rows)))
    print(f"\nresults: {out}/trials.parquet, plots: {out}/search.png" + (f", best student: {student}" if student else ""))
    print(f"MLflow UI: mlflow ui --backend-store-uri {job.tracking_uri}   (then open "
          f"http://127.0.0.1:5000/#/experiments/{parent.experiment_id}?workflowType=machine_learning)")
    parent_id = parent.parent_run_id
    parent.submit(Write("artifact", {"run_id": parent_id, "path": str(out / "trials.parquet")}))
    parent.submit(Write("artifact", {"run_id": parent_id, "path": str(out / "search.png")}))
    summary = {f"importance.{name}": share for name, share in importances.items()}
    if best is not None:  # tags and metrics, not params: a resumed search may find another best
        best_config = {f"best.{k}": v for k, v in best.items() if k in param_names} | {"best.trial_id": best["trial_id"]}
        parent.submit(Write("tags", {"run_id": parent_id, "tags": best_config}))
        if student:
            parent.submit(Write("artifact", {"run_id": parent_id, "path": student, "artifact_path": "best_student"}))
            log_best_model(job, parent, student)
        summary["best_val_acc"] = float(best["val_acc"])
        if best.get("test_acc") is not None and best["test_acc"] == best["test_acc"]:
            summary["best_test_acc"] = float(best["test_acc"])  # the test accuracy of the best-on-val trial
        summary.update({k: best[k] for k in CONFIRM_COLUMNS if best.get(k) is not None})
    summary["trials_finished"] = sum(r["status"] == "FINISHED" for r in rows)
    parent.submit(Write("metrics", {"run_id": parent_id, "metrics": summary, "step": 0, "timestamp_ms": int(time.time() * 1000)}))
    return rows


def log_best_model(job: Job, parent: MLflowWriter, student_file: str) -> None:
    """The best student as an MLflow model on the parent run (registered as mlflow.registered_model if set).
    Not queued: during an outage it is skipped with a warning (student.pt and its artifact stay)."""
    from .model_spec import instantiate

    model = instantiate(job.student_model, job.num_classes, job.in_channels, "pair.student")  # the user's own class
    state = torch.load(student_file, map_location="cpu", weights_only=True)
    model.load_state_dict(model.from_source_names(state) if hasattr(model, "from_source_names") else state, strict=True)
    example = torch.zeros(2, *job.dataset.shape)  # a batch of 2: the logged model serves any batch size
    try:
        require_answer(job.tracking_uri)
        uri = log_student_model(job.tracking_uri, parent.parent_run_id, model, example, job.cfg.mlflow.registered_model)
        print(f"MLflow model: {uri}" + (f" (registered as {job.cfg.mlflow.registered_model})"
                                        if job.cfg.mlflow.registered_model else ""))
    except Exception as exc:
        print(f"[bkd] warning: could not log the best student as an MLflow model ({type(exc).__name__}: {first_line(exc)}); "
              f"it is at {student_file}.", flush=True)


CONFIRM_COLUMNS = ("confirm_val_acc_mean", "confirm_val_acc_std", "confirm_test_acc_mean", "confirm_test_acc_std")


def confirm_best(job: Job, parent: MLflowWriter, best: dict[str, Any], param_names: list[str], run_cases: RunCases) -> str:
    """Train the best configuration again with ``tune.confirm_seeds`` seeds the search never used (under
    the same parent run); put their val and test means and stds on ``best``; return the lines that say
    how optimistic the search's own figure was."""
    k = int(job.cfg.tune.confirm_seeds or 0)
    if k < 1:
        return ""
    config = {p: best[p] for p in param_names if p in best and best[p] is not None and p != "seed"}
    base = job.cfg.train.seed
    print(f"\n[bkd] confirming the best configuration (trial {best['trial_id']}) on {k} fresh seeds", flush=True)
    name = f"{job.experiment_name}-confirm"
    results = run_cases([{**config, "seed": base + i} for i in range(1, k + 1)], name)
    if STOP.received is not None:
        return ""
    rows, _, _ = collect_rows(job, parent, results, False, name)
    done = [r for r in rows if r["status"] == "FINISHED"]
    if not done:
        return f"[bkd] no confirmation run finished ({', '.join(r['status'] for r in rows)})"
    best["confirm_val_acc_mean"], best["confirm_val_acc_std"] = mean_std([r["val_acc"] for r in done])
    tests = [r["test_acc"] for r in done if r.get("test_acc") is not None and r["test_acc"] == r["test_acc"]]
    line = (f"\nbest configuration on {len(done)} fresh seeds: val_acc {best['confirm_val_acc_mean']:.2f} +- "
            f"{best['confirm_val_acc_std']:.2f}")
    if tests:
        best["confirm_test_acc_mean"], best["confirm_test_acc_std"] = mean_std(tests)
        line += f", test_acc {best['confirm_test_acc_mean']:.2f} +- {best['confirm_test_acc_std']:.2f}"
    reference = best.get("confirm_test_acc_mean", best["confirm_val_acc_mean"])
    gap = best["val_acc"] - reference
    return (line + f"\n(the search reported val_acc {best['val_acc']:.2f} for it: {'optimistic' if gap > 0 else 'pessimistic'} "
            f"by {abs(gap):.2f} points against the fresh seeds' {'test' if 'confirm_test_acc_mean' in best else 'val'} mean)")


def export_student(records: TrialRecords, trial_id: str, out: Path) -> Optional[str]:
    """The best trial's final student weights (its record) as ``out/student.pt``."""
    state = records.student(trial_id)
    if state is None:
        return None
    target = out / "student.pt"
    torch.save(state, target)
    return str(target)


def first_failure(rows: list[dict[str, Any]]) -> str:
    """Why no trial finished, in one line: the first trial error, else the statuses."""
    errors = [r["error"] for r in sorted(rows, key=lambda r: r.get("started_at") or 0) if r.get("error")]
    if errors:
        return f"the first trial error: {errors[0]}"
    counts = {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}
    return "trial statuses: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trial started")


def run(job: Job) -> int:
    """``python -m orchestrator.tune``: 0 when at least one trial finished, else 1 (with the reason)."""
    rows = search(job)
    if any(r["status"] == "FINISHED" for r in rows):
        return 0
    print(f"[bkd] no trial finished all its epochs; {first_failure(rows)}", file=sys.stderr, flush=True)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(run, argv)


if __name__ == "__main__":
    sys.exit(main())
