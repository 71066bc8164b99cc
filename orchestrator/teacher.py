"""Get the teacher: a given checkpoint, an MLflow URI, an earlier run with the same teacher config,
or a new training through the same Ray Train path (logged as its own MLflow run).

    python -m orchestrator.teacher data=fashion_mnist data.root=PATH pair=tiny
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from bkd_core.train import load_state_checked

from .cli import entry_point
from .config import ConfigError, Job, build_model, is_streamed, load_dataset
from .model_spec import spec_name
from .runtime import check_cluster_resources, init_ray, make_trainer
from .tracking import ROLE_TAG, MLflowWriter, Write, connect, flatten, log_params
from .worker import MODEL_FILE, read_history

KEY_TAG = "bkd.teacher_key"
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


def train_teacher(job: Job, client: MlflowClient, experiment_id: str) -> tuple[dict[str, torch.Tensor], str]:
    """Train the teacher with Ray Train, save it as ``<output_dir>/<experiment>/teacher.pt`` and log it
    as its own MLflow run; returns (state, run id). An MLflow outage after training delays the
    logging (up to ``mlflow.end_wait_s``), never the search."""
    key = job.teacher_key()
    run = client.create_run(experiment_id, run_name=f"teacher-{spec_name(job.teacher_model)}-{job.cfg.data.name}",
                            tags={ROLE_TAG: "teacher", KEY_TAG: key})
    run_id = run.info.run_id
    log_params(client, run_id, {"model": str(job.teacher_model), "data": job.cfg.data.name,
                                **flatten(job.cfg.teacher, "teacher."), **flatten(job.cfg.data, "data."), **job.split_sizes()})
    print(f"[bkd] training teacher {spec_name(job.teacher_model)} on {job.cfg.data.name} (MLflow run {run_id})", flush=True)
    out = Path(job.output_dir) / job.experiment_name
    writer = MLflowWriter(job.tracking_uri, experiment_id, None, job.cfg.mlflow.retry_interval_s,
                          spool=out / "mlflow_pending_teacher.jsonl")
    try:
        result = make_trainer(job, {}, "teacher", name=f"teacher-{key}-{run_id[:8]}").fit()
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
            history = read_history(folder)
    except BaseException as exc:
        writer.submit(Write("end", {"run_id": run_id, "status": "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED",
                                    "error": str(exc)}))
        writer.drain(0.0)
        raise
    out.mkdir(parents=True, exist_ok=True)
    path = out / "teacher.pt"
    torch.save(state, path)
    test = f", test_acc {result.metrics['test_acc']:.2f}%" if "test_acc" in result.metrics else ""
    print(f"[bkd] teacher val_acc {result.metrics['val_acc']:.2f}%{test}, saved to {path}", flush=True)
    for row in history:
        writer.submit(Write("metrics", {"run_id": run_id, "metrics": row, "step": int(row["epoch"]),
                                        "timestamp_ms": int(row["timestamp"] * 1000)}))
    writer.submit(Write("artifact", {"run_id": run_id, "path": str(path), "artifact_path": "teacher"}))
    writer.submit(Write("end", {"run_id": run_id, "status": "FINISHED"}))
    writer.drain(job.cfg.mlflow.end_wait_s, f"The teacher is at {path} (teacher.checkpoint={path} reuses it).")
    return state, run_id


def obtain_teacher(job: Job, client: MlflowClient, experiment_id: str) -> tuple[dict[str, torch.Tensor], str, bool]:
    """(teacher state_dict, where it came from, whether it was trained just now)."""
    checkpoint = job.cfg.teacher.checkpoint
    if checkpoint:
        return load_uri(job, str(checkpoint)), str(checkpoint), False
    run_id = find_trained(client, experiment_id, job.teacher_key())
    if run_id:
        print(f"[bkd] reusing teacher from MLflow run {run_id} (same teacher config)", flush=True)
        return load_uri(job, f"runs:/{run_id}/{ARTIFACT}"), f"runs:/{run_id}/{ARTIFACT}", False
    state, run_id = train_teacher(job, client, experiment_id)
    return state, f"runs:/{run_id}/{ARTIFACT}", True


def score_teacher(job: Job, state: dict[str, torch.Tensor], announce: bool = True) -> dict[str, float]:
    """A teacher's ``teacher_val_acc`` and ``teacher_test_acc``, scored once in the driver before any
    trial (in-memory data; {} for streamed data): a checkpoint trained with other preprocessing or
    another class order shows here, not after the search. ``announce``: print them (a teacher trained
    just now has printed its own)."""
    if is_streamed(job.cfg.data):
        return {}
    from bkd_core.train import Supervised, TrainConfig, eval_loader, evaluate, score_on_test

    splits = load_dataset(job.cfg.data)
    model = _empty_teacher(job)
    model.load_state_dict(model.from_source_names(state))
    cfg, cpu = TrainConfig(batch_size=256, channels_last=False), torch.device("cpu")
    scores = {"teacher_val_acc": evaluate(Supervised(model), eval_loader(splits.selection, cfg, cpu))["val_acc"],
              "teacher_test_acc": score_on_test(Supervised(model), eval_loader(splits.test, cfg, cpu))["test_acc"]}
    if announce:
        print(f"[bkd] teacher: val_acc {scores['teacher_val_acc']:.2f}%, test_acc {scores['teacher_test_acc']:.2f}%", flush=True)
    return scores


def run(job: Job) -> str:
    client, experiment_id = connect(job.tracking_uri, job.cfg.mlflow.experiment)
    init_ray(job)
    check_cluster_resources(job)
    _, source, _ = obtain_teacher(job, client, experiment_id)
    print(f"[bkd] teacher: {source}")
    return source


def main(argv: list[str] | None = None) -> int:
    return entry_point(run, argv)


if __name__ == "__main__":
    sys.exit(main())
