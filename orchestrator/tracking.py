"""MLflow logging: a parent run per invocation, a child run per Tune trial (via a Tune callback on
the driver, so only the driver needs to reach the tracking server), and the teacher's own run."""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .config import ConfigError
from .results import DIVERGED, diverged_message

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "bkd.trial_id"
ROLE_TAG = "bkd.role"
# Tune's own bookkeeping, not worth a metric each.
SKIPPED_METRICS = {"epoch", "workers", "training_iteration", "timestamp", "time_this_iter_s", "time_since_restore",
                   "iterations_since_restore", "pid", "done", "time_total_s"}


def connect(tracking_uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """A client and the experiment id (created if needed), with a clear error when unreachable."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail in seconds, not minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        return client, found.experiment_id if found else client.create_experiment(experiment)
    except Exception as exc:  # mlflow raises many types for unreachable or unwritable stores
        raise ConfigError("mlflow.tracking_uri", f"cannot use MLflow at {tracking_uri} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]}); start the server or point mlflow.tracking_uri at a writable "
                          "sqlite:///PATH/mlflow.db.") from None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
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
    return {**common, **{k: v for k, v in config.items() if not isinstance(v, Mapping)}}


def tolerant(method):
    """An MLflow outage must not stop the search: warn and go on (Tune keeps every result)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:  # mlflow raises many types when the server is down
            print(f"[bkd] warning: MLflow logging failed in {method.__name__} ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the search goes on, results stay in Tune's storage.",
                  flush=True)
            self._client = None

    return wrapper


class MLflowTrialLogger(Callback):
    """One nested MLflow run per Tune trial: its parameters, per-epoch metrics (step = epoch) and a
    final status (FINISHED, FAILED with the error, or KILLED at a driver's resume)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, common_params: Mapping[str, Any]) -> None:
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.common_params = dict(common_params)
        self.run_ids: dict[str, str] = {}
        self._client: Optional[MlflowClient] = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
            self.run_ids.update(child_runs(self._client, self.experiment_id, self.parent_run_id))
        return self._client

    def __getstate__(self) -> dict:  # Tune checkpoints callbacks; the client is rebuilt on demand
        return {**self.__dict__, "_client": None}

    @tolerant
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        client = self.client
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            run = client.create_run(self.experiment_id, run_name=f"trial-{trial.trial_id}",
                                    tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: trial.trial_id, ROLE_TAG: "trial"})
            run_id = self.run_ids[trial.trial_id] = run.info.run_id
            log_params(client, run_id, trial_params(trial.config, self.common_params))
        else:  # a retried or resumed trial continues its own run
            client.update_run(run_id, status="RUNNING")

    @tolerant
    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is not None:
            step = int(result.get("epoch", result.get("training_iteration", 0)))
            log_metrics(self.client, run_id, result, step, int(result.get("timestamp", 0) * 1000))

    @tolerant
    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get(DIVERGED):
            self._end(trial, "FAILED", diverged_message(last))
        else:
            self._end(trial, "FINISHED")

    @tolerant
    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def _end(self, trial: Any, status: str, error: Optional[str] = None) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        if status == "FAILED":
            self.client.set_tag(run_id, "bkd.error", (error or trial_error(trial))[:5000])
        self.client.set_terminated(run_id, status)


def trial_error(trial: Any) -> str:
    path = getattr(trial, "error_file", None) or ""
    text = Path(path).read_text(errors="replace") if path and Path(path).is_file() else ""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    useful = [l for l in lines if "Error" in l or "error" in l]
    return (useful[-1] if useful else lines[-1] if lines else "trial failed").strip()


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, str]:
    """trial id -> run id of the children of a parent run."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000)
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def end_leftover_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str = "KILLED") -> int:
    """Mark children left RUNNING by a killed driver as ``status``; returns how many."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    return len(runs)

