"""MLflow runs: connect, tags, parameters and metrics, children of a parent, reopen and end."""
from __future__ import annotations

import dataclasses
import math
import os
import socket
from typing import Any, Mapping
from urllib.parse import urlsplit

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from orchestrator.config.checks import ConfigError
from orchestrator.tracking.mlflow_models import mark_model_training
from orchestrator.tracking.results import case_of

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "bkd.trial_id"
ROLE_TAG = "bkd.role"
END_TAG = "bkd.end_reason"  # why a run ended KILLED (interrupted, out of time, its driver died)
# Tune's own bookkeeping, not worth a metric each.
SKIPPED_METRICS = {"epoch", "workers", "training_iteration", "timestamp", "time_this_iter_s", "time_since_restore",
                   "iterations_since_restore", "pid", "done", "time_total_s"}


def connect(tracking_uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client and the experiment id (created if needed), with a clear error when unreachable."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        client = MlflowClient(tracking_uri)
        return client, ensure_experiment(client, experiment)
    except Exception as exc:  # mlflow raises many types for unreachable or unwritable stores
        raise ConfigError("mlflow.tracking_uri", f"cannot use MLflow at {tracking_uri} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]}); start the server or point mlflow.tracking_uri at a writable "
                          "sqlite:///PATH/mlflow.db.") from None


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id, made (and marked) if it is new; another command making it at the same moment is fine."""
    tries = 0
    while True:
        try:
            found = client.get_experiment_by_name(name)
            experiment_id = found.experiment_id if found else client.create_experiment(name)
            mark_model_training(client, experiment_id)
            return experiment_id
        except Exception as exc:
            tries += 1
            if tries == 3 or not made_meanwhile(exc):
                raise


def made_meanwhile(exc: BaseException) -> bool:
    """True when MLflow refused to create what another client created between our look and our write."""
    text = str(exc)
    return "already exists" in text or "UNIQUE constraint failed" in text or "RESOURCE_ALREADY_EXISTS" in text


def answers(tracking_uri: str, timeout_s: float = 1.0) -> bool:
    """False when an http(s) tracking server does not even accept a connection: a check that costs at
    most ``timeout_s`` instead of MLflow's HTTP retries (seconds each call). Other stores: True."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return True
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


def require_answer(tracking_uri: str) -> None:
    """Raise ConnectionError at once when ``answers`` is False (before a call MLflow would retry)."""
    if not answers(tracking_uri):
        raise ConnectionError(f"MLflow at {tracking_uri} does not accept connections")


def flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": 1}`` from nested mappings or dataclasses (a typed configuration section)."""
    if dataclasses.is_dataclass(values):
        values = dataclasses.asdict(values)
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, Any], step: int, timestamp_ms: int) -> None:
    items = [Metric(k, float(v), timestamp_ms, step) for k, v in metrics.items()
             if k not in SKIPPED_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if items:
        client.log_batch(run_id, metrics=items)


def trial_params(config: Mapping[str, Any], common: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's searched and constant parameters, flat (``temperature``, ``cuts``, ``w_3``, ...)."""
    return {**common, **{k: v for k, v in case_of(config).items() if not isinstance(v, Mapping)}}


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> run id of the children of a parent run."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000)
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def reopen(client: MlflowClient, run_id: str) -> None:
    """A run that goes on (a resumed search or trial): RUNNING again, without an earlier end's reason."""
    if END_TAG in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, END_TAG)
    client.update_run(run_id, status="RUNNING")


def end_leftover_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str = "KILLED",
                      reason: str = "its driver stopped before the trial ended") -> int:
    """Mark children left RUNNING as ``status``, tagged with ``reason``; returns how many."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, END_TAG, reason)
        client.set_terminated(run.info.run_id, status)
    return len(runs)
