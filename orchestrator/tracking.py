"""MLflow logging: a parent run per invocation, a child run per Tune trial (via a Tune callback on
the driver, so only the driver needs to reach the tracking server), and the teacher's own run."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from .config import ConfigError
from .mlflow_extras import log_dataset, mark_model_training
from .records import RECORDED, STOPPED_EARLY, TrialRecords
from .results import DIVERGED, case_of, diverged_message

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
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        mark_model_training(client, experiment_id)
        return client, experiment_id
    except Exception as exc:  # mlflow raises many types for unreachable or unwritable stores
        raise ConfigError("mlflow.tracking_uri", f"cannot use MLflow at {tracking_uri} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:300]}); start the server or point mlflow.tracking_uri at a writable "
                          "sqlite:///PATH/mlflow.db.") from None


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


@dataclass
class Write:
    """One MLflow write of a search, kept until the tracking server has taken it.

    ``trial_id`` names the trial whose run it writes to (that run's id is known once its ``start``
    write is applied); parent-run writes carry ``run_id`` in ``args`` instead.
    """

    op: str
    args: dict[str, Any] = field(default_factory=dict)
    trial_id: Optional[str] = None


class MLflowWriter:
    """Applies a search's MLflow writes in order. While the server is unreachable it keeps them, tries
    again every ``retry_interval_s`` (the search goes on meanwhile) and mirrors them to the JSON-lines
    file ``spool``, so that neither an outage nor a driver that stops before it ends loses a write:
    ``adopt`` takes a spool back (``tune.resume=true`` does)."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: Optional[str], retry_interval_s: float = 10.0,
                 spool: Optional[Path] = None) -> None:
        """``parent_run_id``: the search whose trial runs ``start`` writes create (None: writes name their runs)."""
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.retry_interval_s = float(retry_interval_s)
        self.spool = spool
        self.run_ids: dict[str, str] = {}  # trial id -> its MLflow run id
        self.logged_epoch: dict[str, int] = {}  # trial id -> the last epoch its run has (repeats are not logged twice)
        self.pending: list[Write] = []
        self._client: Optional[MlflowClient] = None
        self._down_since: Optional[float] = None
        self._next_try = 0.0
        self._spooled = False  # ``spool`` holds writes this writer has not applied yet

    def __getstate__(self) -> dict:  # Tune pickles its callbacks; the client is rebuilt on demand
        return {**self.__dict__, "_client": None, "_next_try": 0.0}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            client = MlflowClient(self.tracking_uri)
            if self.parent_run_id:
                self.run_ids.update(child_runs(client, self.experiment_id, self.parent_run_id))
            self._client = client
        return self._client

    def submit(self, write: Write) -> None:
        self.pending.append(write)
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Apply the pending writes in order; True when none is left. Between retries during an
        outage (and unless ``force``) it returns at once."""
        if not self.pending:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        if self.down and not answers(self.tracking_uri):  # still down: no need to pay for MLflow's retries
            self._next_try = time.monotonic() + self.retry_interval_s
            self._write_spool()
            return False
        try:
            while self.pending:
                try:
                    self._apply(self.pending[0])
                except Exception as exc:
                    if is_outage(exc):
                        raise
                    write = self.pending[0]  # refused, not unreachable: retrying would not help
                    print(f"[bkd] warning: MLflow refused a write ({write.op} {write.trial_id or write.args.get('run_id')}): "
                          f"{type(exc).__name__}: {first_line(exc)}. It is left out; the search goes on.", flush=True)
                self.pending.pop(0)
        except Exception as exc:  # the server is unreachable
            if self._down_since is None:
                self._down_since = time.time()
                print(f"[bkd] warning: MLflow at {self.tracking_uri} is unreachable ({type(exc).__name__}: "
                      f"{first_line(exc)}); its writes are queued and retried every {self.retry_interval_s:g} s. "
                      "The search goes on.", flush=True)
            self._client = None
            self._next_try = time.monotonic() + self.retry_interval_s
            self._write_spool()
            return False
        if self._spooled:
            self.spool.unlink(missing_ok=True)
            self._spooled = False
        if self._down_since is not None:
            print(f"[bkd] MLflow is reachable again after {time.time() - self._down_since:.0f} s; "
                  "every queued write is logged.", flush=True)
            self._down_since = None
        return True

    @property
    def down(self) -> bool:
        """MLflow was unreachable at the last try."""
        return self._down_since is not None

    def drain(self, wait_s: float, where: str = "") -> bool:
        """Flush, retrying for up to ``wait_s`` while MLflow is unreachable; warn about what is left."""
        deadline = time.monotonic() + wait_s
        while not self.flush(force=True) and time.monotonic() < deadline:
            time.sleep(max(0.0, min(self.retry_interval_s, deadline - time.monotonic())))
        if self.pending:
            kept = f"They are kept in {self.spool}: once MLflow is back, run the same command with tune.resume=true. " if self.spool else ""
            print(f"[bkd] warning: MLflow at {self.tracking_uri} stayed unreachable for {wait_s:g} s "
                  f"(mlflow.end_wait_s): {len(self.pending)} writes were not logged there. {kept}{where}".rstrip(), flush=True)
        return not self.pending

    def _write_spool(self) -> None:
        if self.spool is None:
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        partial = self.spool.with_suffix(".partial")
        partial.write_text("".join(json.dumps(asdict(w), default=_plain) + "\n" for w in self.pending))
        partial.replace(self.spool)
        self._spooled = True

    def adopt(self, spool: Path) -> int:
        """Queue the writes another writer left in ``spool`` (an earlier run's outage) and delete it;
        they go out with this writer's next flush (or into its own spool). Returns how many."""
        if not spool.is_file():
            return 0
        writes = [Write(**json.loads(line)) for line in spool.read_text().splitlines() if line.strip()]
        self.pending.extend(writes)
        if spool == self.spool:
            self._spooled = True
        else:
            spool.unlink()
        return len(writes)

    def _apply(self, write: Write) -> None:
        client, args = self.client, write.args
        if write.op == "start":  # a trial's run: created once; a retried or resumed trial continues it
            run_id = self.run_ids.get(write.trial_id)
            if run_id is None:
                run = client.create_run(self.experiment_id, run_name=f"trial-{write.trial_id}",
                                        tags={PARENT_TAG: self.parent_run_id, TRIAL_TAG: write.trial_id, ROLE_TAG: "trial"})
                run_id = self.run_ids[write.trial_id] = run.info.run_id
                args["created"] = True  # if logging the params fails, the retry logs them, not a second run
            if args.get("created"):
                log_params(client, run_id, args["params"])
                if args.get("dataset"):
                    log_dataset(client, run_id, args["dataset"])
            else:  # a retried or resumed trial: its epochs already logged are not logged again
                reopen(client, run_id)
                steps = [m.step for m in client.get_metric_history(run_id, "val_acc")]
                self.logged_epoch[write.trial_id] = max([self.logged_epoch.get(write.trial_id, 0), *steps])
            return
        run_id = args.get("run_id") or self.run_ids.get(write.trial_id or "")
        if run_id is None:
            return  # a trial whose run was never created (its start was not seen): nothing to attach to
        if write.op == "metrics":
            if write.trial_id and args["step"] <= self.logged_epoch.get(write.trial_id, 0):
                return  # an epoch repeated after a restart from an older checkpoint: MLflow keeps the first
            log_metrics(client, run_id, args["metrics"], args["step"], args["timestamp_ms"])
            if write.trial_id:
                self.logged_epoch[write.trial_id] = args["step"]
        elif write.op == "params":
            log_params(client, run_id, args["params"])
        elif write.op == "tags":
            for key, value in args["tags"].items():
                client.set_tag(run_id, key, str(value)[:5000])
        elif write.op == "artifact":
            client.log_artifact(run_id, args["path"], artifact_path=args.get("artifact_path"))
        elif write.op == "end":
            if args.get("error"):
                client.set_tag(run_id, "bkd.error", args["error"][:5000])
            client.set_terminated(run_id, args["status"])
        else:
            raise ValueError(f"unknown MLflow write {write.op!r}")


def is_outage(exc: BaseException) -> bool:
    """True when MLflow could not be reached (connection refused or reset, timeout, 502-504, a locked
    sqlite file); False when it answered and refused (e.g. changing a logged param)."""
    import requests
    from mlflow.exceptions import MlflowException

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
            return True
        if "database is locked" in str(seen) or "unable to open database" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if isinstance(exc, MlflowException):
        text = str(exc)
        if text.startswith("API request to") and ("failed with exception" in text or "timeout exception" in text):
            return True
        return exc.get_http_status_code() in (502, 503, 504)
    return False


def _plain(value: Any) -> Any:
    """JSON for the numpy scalars a result may hold."""
    return value.item() if hasattr(value, "item") else str(value)


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


def epoch_write(result: Mapping[str, Any], trial_id: str, run_id: Optional[str] = None) -> Write:
    """The metrics write of one reported epoch (step = epoch) of a trial's run (or of ``run_id``)."""
    step = int(result.get("epoch", result.get("training_iteration", 0)))
    metrics = {k: v for k, v in result.items() if k not in SKIPPED_METRICS and isinstance(v, (int, float))}
    args = {"metrics": metrics, "step": step, "timestamp_ms": int(result.get("timestamp", 0) * 1000)}
    return Write("metrics", args | ({"run_id": run_id} if run_id else {}), trial_id)


class MLflowTrialLogger(Callback):
    """One nested MLflow run per Tune trial: its parameters, per-epoch metrics (step = epoch) and a
    final status (FINISHED, FAILED with the error, or KILLED at a driver's resume). Writes go
    through an ``MLflowWriter``: an MLflow outage delays them; the search never waits for it."""

    def __init__(self, writer: MLflowWriter, common_params: Mapping[str, Any], records: TrialRecords,
                 end_wait_s: float = 120.0, dataset: Optional[Mapping[str, Any]] = None) -> None:
        self.writer = writer
        self.dataset = dict(dataset or {})
        self.common_params = dict(common_params)
        self.records = records
        self.end_wait_s = float(end_wait_s)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = trial_params(trial.config, self.common_params)
        self.writer.submit(Write("start", {"params": params, "dataset": self.dataset}, trial.trial_id))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(RECORDED):
            return  # a resumed trial replaying its record: logged when it first ran
        self.writer.submit(epoch_write(result, trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if self.records.read(trial.trial_id) is None:  # it did not finish: the scheduler stopped it
            self.records.write(trial.trial_id, STOPPED_EARLY, last, [])
            self._end(trial, "FINISHED", reason=f"stopped early by the scheduler after epoch {last.get('epoch', '?')}")
        elif last.get(DIVERGED):
            self._end(trial, "FAILED", diverged_message(last))
        else:
            self._end(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED", trial_error(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.writer.drain(self.end_wait_s, "Every trial's results are in Tune's storage and trials.parquet.")

    def _end(self, trial: Any, status: str, error: Optional[str] = None, reason: Optional[str] = None) -> None:
        if reason:
            self.writer.submit(Write("tags", {"tags": {END_TAG: reason}}, trial.trial_id))
        self.writer.submit(Write("end", {"status": status, "error": error}, trial.trial_id))


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

