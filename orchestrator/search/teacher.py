"""Get the teacher: a given checkpoint, an MLflow URI, an earlier run with the same teacher config,
or a new training through the same Tune trial path as the search's trials (logged as its own MLflow
run; interrupted, it continues after its last finished epoch with ``tune.resume=true``).

    python -m orchestrator.teacher data=fashion_mnist data.root=PATH pair=tiny
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import Callback

from bkd_core.train import load_state_checked
from orchestrator.config.checks import ConfigError
from orchestrator.config.job import Job
from orchestrator.config.models import build_model, spec_name
from orchestrator.console.interrupts import STOP, Interrupted, OutOfTime, PhaseFailed
from orchestrator.data.datasets import is_streamed, load_dataset, teacher_view
from orchestrator.search.chance import check_teacher
from orchestrator.search.tuner import time_budget, verbosity
from orchestrator.tracking.objective import ACCURACY, Objective, objective_of
from orchestrator.tracking.records import DIVERGED, RECORDED, TrialRecords
from orchestrator.tracking.results import trial_id_of
from orchestrator.tracking.runs import END_TAG, ROLE_TAG, first_line, flatten, log_params, reopen
from orchestrator.tracking.trial_logger import epoch_writes, trial_error
from orchestrator.tracking.writer import MLflowWriter, Write
from orchestrator.worker.runtime import trial_resources
from orchestrator.worker.trial import run_trial

KEY_TAG = "bkd.teacher_key"
EXPERIMENT_TAG = "bkd.teacher_experiment"  # the teacher's Tune experiment under ray.storage_path
ARTIFACT = "teacher/teacher.pt"


def _empty_teacher(job: Job) -> torch.nn.Module:
    return build_model(job.cfg, "teacher", job.num_classes, job.in_channels, job.dataset.shape)


def load_uri(job: Job, uri: str) -> dict[str, torch.Tensor]:
    """A teacher state_dict from a local path or an MLflow artifact URI (runs:/..., models:/...)."""
    path = uri
    if uri.startswith(("runs:", "models:", "mlflow-artifacts:")) or "://" in uri:
        import mlflow.artifacts
        try:
            path = mlflow.artifacts.download_artifacts(uri, tracking_uri=job.tracking_uri)
        except Exception as exc:
            raise ConfigError("teacher.checkpoint", f"cannot download {uri} from MLflow ({exc}); give a run artifact URI "
                              f"such as runs:/<run_id>/{ARTIFACT} or a local state_dict path.") from None
    model = _empty_teacher(job)
    try:
        load_state_checked(model, path, what=f"teacher checkpoint (teacher.checkpoint={uri})")
    except ValueError as exc:
        raise ConfigError("teacher.checkpoint", str(exc)) from None
    return model.state_dict()


def find_trained(client: MlflowClient, experiment_id: str, key: str) -> str | None:
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


TEACHER = "teacher"  # the teacher's trial in its writer (repeated epochs are not logged twice)
WRITERS: dict[str, MLflowWriter] = {}  # teacher run id -> this driver's writer for it


class TeacherLogger(Callback):
    """Prints the teacher's epochs and logs them to its MLflow run as Tune reports them (in the driver, so the
    teacher's last line follows its last epoch). An epoch a resumed teacher restored that this driver never
    showed (a stop came between its end and its report) is shown and logged with the first new one."""

    def __init__(self, run_id: str, epochs: int, shown: int = 0, objective: Objective = ACCURACY) -> None:
        self.run_id, self.epochs, self.shown, self.objective = run_id, epochs, shown, objective

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(RECORDED):
            return
        writes = epoch_writes(result, TEACHER, self.run_id)
        o = self.objective
        for write in writes:
            metrics, epoch = write.args["metrics"], int(write.args["step"])
            if epoch > self.shown and o.val in metrics and "train_loss" in metrics:
                test = f", {o.test} {o.fmt(metrics[o.test])}" if o.test in metrics else ""
                print(f"[bkd] teacher epoch {epoch}/{self.epochs}: loss {metrics['train_loss']:.4f}, "
                      f"{o.val} {o.fmt(metrics[o.val])}{test}", flush=True)
                self.shown = epoch
        writer = WRITERS.get(self.run_id)
        for write in writes if writer is not None else []:
            writer.submit(write)


def teacher_tuner(job: Job, name: str, run_id: str, logged: int = 0) -> tune.Tuner:
    """The teacher's training as a Tune experiment of one trial (``name``): one worker trains in the
    trial's process, several as a Ray Train run inside it, like the search's trials. An interrupted teacher
    (a stop, the time budget, a killed driver) continues in a new trial of the same experiment, from the
    progress its last finished epoch left (``TrialRecords.save_progress``, key ``teacher``)."""
    t = job.cfg.tune
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job, teacher_state=None, mode="teacher"),
                                    trial_resources(job))
    run_config = tune.RunConfig(name=name, storage_path=job.storage_path, callbacks=[TeacherLogger(run_id, job.cfg.teacher.epochs, logged, objective_of(job))],
                                stop=time_budget(job),
                                failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=verbosity(job))
    return tune.Tuner(trainable, run_config=run_config, tune_config=tune.TuneConfig(num_samples=1))


def find_unfinished(client: MlflowClient, experiment_id: str, key: str) -> Optional[Run]:
    """The newest teacher run of this teacher config that did not finish and whose Tune experiment is named."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}' and attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    return next((r for r in runs if EXPERIMENT_TAG in r.data.tags), None)


def start_run(job: Job, client: MlflowClient, experiment_id: str) -> tuple[str, str, int]:
    """(run id, Tune experiment name, epochs already logged): on ``tune.resume``, the run of an interrupted
    teacher of the same config, reopened; else a new run."""
    key = job.teacher_key()
    unfinished = find_unfinished(client, experiment_id, key) if job.cfg.tune.resume else None
    if unfinished is not None:
        run_id, name = unfinished.info.run_id, unfinished.data.tags[EXPERIMENT_TAG]
        if tune.Tuner.can_restore(os.path.join(job.storage_path, name)):
            reopen(client, run_id)
            logged = max([m.step for m in client.get_metric_history(run_id, objective_of(job).val)], default=0)
            print(f"[bkd] continuing the teacher's training after its last finished epoch ({logged}/{job.cfg.teacher.epochs} "
                  f"logged; MLflow run {run_id})", flush=True)
            return run_id, name, logged
    run = client.create_run(experiment_id, run_name=f"teacher-{spec_name(job.teacher_model)}-{job.cfg.data.name}",
                            tags={ROLE_TAG: "teacher", KEY_TAG: key})
    run_id = run.info.run_id
    name = f"teacher-{key}-{run_id[:8]}"
    client.set_tag(run_id, EXPERIMENT_TAG, name)
    log_params(client, run_id, {"model": str(job.teacher_model), "data": job.cfg.data.name,
                                **flatten(job.cfg.teacher, "teacher."), **flatten(job.cfg.data, "data."), **job.split_sizes()})
    print(f"[bkd] training teacher {spec_name(job.teacher_model)} on {job.cfg.data.name} (MLflow run {run_id})", flush=True)
    return run_id, name, 0


def train_teacher(job: Job, client: MlflowClient, experiment_id: str) -> tuple[dict[str, torch.Tensor], str]:
    """Train the teacher (a Tune experiment of one trial; see ``teacher_tuner``), save it as
    ``<output_dir>/<experiment>/teacher.pt`` and log it as its own MLflow run; returns (state, run id).
    A stop signal or the time budget ends the run KILLED (``tune.resume=true`` continues it from its
    last checkpoint); a failure ends it FAILED. An MLflow outage delays the logging (up to
    ``mlflow.end_wait_s``), never the search."""
    run_id, name, logged = start_run(job, client, experiment_id)
    out = Path(job.output_dir) / job.experiment_name
    writer = MLflowWriter(job.tracking_uri, experiment_id, None, job.cfg.mlflow.retry_interval_s,
                          spool=out / "mlflow_pending_teacher.jsonl")
    writer.logged_epoch[TEACHER] = logged
    WRITERS[run_id] = writer
    try:
        with STOP.graceful("the teacher's training and saving it"):
            results = teacher_tuner(job, name, run_id, logged).fit()
        result = results[0]
        records = TrialRecords(job.storage_path, name)
        record = records.read(trial_id_of(result))
        epoch = int((result.metrics or {}).get("epoch", logged))
        progress = f"the teacher's training (epoch {epoch}/{job.cfg.teacher.epochs}, MLflow run {run_id})"
        kept = f"every finished epoch is kept ({epoch} reported here), and the resume continues after the last one"
        if STOP.received is not None:
            raise Interrupted(progress, kept)
        if result.error is not None:  # the traceback stays in Tune's error.txt of the trial
            raise PhaseFailed(f"the teacher's training failed: {trial_error(results._experiment_analysis.trials[0])} "
                              f"(MLflow run {run_id}; its traceback: {result.path}/error.txt)")
        if record is not None and record.status == DIVERGED:
            raise PhaseFailed(f"the teacher's training loss became NaN/inf in epoch {int(record.metrics.get('epoch', 0))}: it "
                              f"diverged; lower teacher.lr (MLflow run {run_id}).")
        if record is None:
            raise OutOfTime(progress, kept)
        state = records.student(trial_id_of(result))
    except BaseException as exc:
        status, reason, error = "FAILED", None, str(exc) if isinstance(exc, PhaseFailed) else f"{type(exc).__name__}: {first_line(exc)}"
        if isinstance(exc, KeyboardInterrupt):
            status, reason, error = "KILLED", f"interrupted ({STOP.name or 'SIGINT'})", None
        elif isinstance(exc, OutOfTime):
            status, reason, error = "KILLED", "stopped by tune.time_budget_s", None
        if reason:
            writer.submit(Write("tags", {"run_id": run_id, "tags": {END_TAG: reason}}))
        writer.submit(Write("end", {"run_id": run_id, "status": status, "error": error}))
        writer.drain(0.0)
        raise
    finally:
        WRITERS.pop(run_id, None)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "teacher.pt"
    torch.save(state, path)
    o = objective_of(job)
    test = f", {o.test} {o.fmt(result.metrics[o.test])}" if o.test in result.metrics else ""
    print(f"[bkd] teacher {o.val} {o.fmt(result.metrics[o.val])}{test}, saved to {path}", flush=True)
    writer.submit(Write("artifact", {"run_id": run_id, "path": str(path), "artifact_path": "teacher"}))
    writer.submit(Write("end", {"run_id": run_id, "status": "FINISHED"}))
    writer.drain(job.cfg.mlflow.end_wait_s, f"The teacher is at {path} (teacher.checkpoint={path} reuses it).")
    return state, run_id


def obtain_teacher(job: Job, client: MlflowClient, experiment_id: str) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(teacher state_dict, where it came from, whether it was trained just now)."""
    checkpoint = job.cfg.teacher.checkpoint
    if checkpoint:
        return load_uri(job, str(checkpoint)), str(checkpoint), False
    if job.cfg.teacher.epochs == 0:  # as given: its pretrained weights (an hf: folder) or teacher.init
        model = _empty_teacher(job)
        if job.cfg.teacher.init:
            from bkd_core.train import load_pretrained

            load_pretrained(model, job.cfg.teacher.init, "teacher.init")
        print(f"[bkd] teacher {spec_name(job.teacher_model)} as given (teacher.epochs=0)", flush=True)
        return model.state_dict(), f"{job.teacher_model} as given", False
    run_id = find_trained(client, experiment_id, job.teacher_key())
    if run_id:
        print(f"[bkd] reusing teacher from MLflow run {run_id} (same teacher config)", flush=True)
        return load_uri(job, f"runs:/{run_id}/{ARTIFACT}"), f"runs:/{run_id}/{ARTIFACT}", False
    state, run_id = train_teacher(job, client, experiment_id)
    return state, f"runs:/{run_id}/{ARTIFACT}", True


def ready_teacher(job: Job, client: MlflowClient, experiment_id: str) -> tuple[dict[str, torch.Tensor], str, dict[str, float]]:
    """The teacher the trials distil from (``obtain_teacher``), scored (``score_teacher``) and checked against
    chance (``chance.check_teacher``: exit 1 for a teacher that learned nothing): (state, source, scores)."""
    state, source, trained_now = obtain_teacher(job, client, experiment_id)
    scores = score_teacher(job, state, announce=not trained_now)
    check_teacher(job, scores, "trained just now" if trained_now else source)
    return state, source, scores


def score_teacher(job: Job, state: dict[str, torch.Tensor], announce: bool = True) -> dict[str, float]:
    """A teacher's ``teacher_val_acc`` and ``teacher_test_acc``, scored once in the driver before any trial
    (in-memory data; {} for streamed data): a checkpoint trained with other preprocessing or another class
    order shows here, not after the search. ``announce``: print them (a teacher trained just now has printed
    its own)."""
    if is_streamed(job.cfg.data):
        return {}
    from bkd_core.train import Supervised, TrainConfig, eval_loader, evaluate, score_on_test

    splits = teacher_view(load_dataset(job.cfg.data))
    model = _empty_teacher(job)
    model.load_state_dict(model.from_source_names(state))
    o = objective_of(job)
    gpu = job.cfg.resources.use_gpu and torch.cuda.is_available()  # a driver with a GPU scores a language model there
    device = torch.device("cuda" if gpu else "cpu")
    cfg = TrainConfig(batch_size=256 if o is ACCURACY else 16, channels_last=False)
    model.to(device)
    val = evaluate(Supervised(model), eval_loader(splits.selection, cfg, device))
    test = score_on_test(Supervised(model), eval_loader(splits.test, cfg, device))
    scores = {f"teacher_{o.val}": val[o.val], f"teacher_{o.test}": test[o.test]}
    scores |= {f"teacher_{k}": v for k, v in (val | test).items() if k in o.also}
    if announce:
        print(f"[bkd] teacher: {o.val} {o.fmt(scores[f'teacher_{o.val}'])}, {o.test} {o.fmt(scores[f'teacher_{o.test}'])}", flush=True)
    return scores
