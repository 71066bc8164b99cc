"""MLflowWriter: a search's MLflow writes in order, queued and spooled through outages."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from mlflow.tracking import MlflowClient

from orchestrator.tracking.mlflow_models import log_dataset
from orchestrator.tracking.runs import (
    PARENT_TAG,
    ROLE_TAG,
    TRIAL_TAG,
    answers,
    child_runs,
    first_line,
    log_metrics,
    log_params,
    reopen,
)


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
            elif not args.get("created") and not client.get_run(run_id).data.params:
                args["created"] = True  # created by a try whose answer an outage lost: its params are still to log
            if args.get("created"):
                log_params(client, run_id, args["params"])
                if args.get("dataset"):
                    log_dataset(client, run_id, args["dataset"])
            else:  # a retried or resumed trial: its epochs already logged are not logged again
                reopen(client, run_id)
                steps = [m.step for key in ("val_acc", "val_loss") for m in client.get_metric_history(run_id, key)]
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
            if os.path.isdir(args["path"]):  # a folder's files under artifact_path
                client.log_artifacts(run_id, args["path"], artifact_path=args.get("artifact_path"))
            else:
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
