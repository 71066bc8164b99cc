"""MLflowTrialLogger: the Tune callback that gives each trial its nested MLflow run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional

from ray.tune import Callback

from orchestrator.tracking.records import RECORDED, STOPPED_EARLY, TrialRecords
from orchestrator.tracking.results import DIVERGED, diverged_message
from orchestrator.tracking.runs import END_TAG, SKIPPED_METRICS, trial_params
from orchestrator.tracking.writer import MLflowWriter, Write


def epoch_write(result: Mapping[str, Any], trial_id: str, run_id: Optional[str] = None) -> Write:
    """The metrics write of one reported epoch (step = epoch) of a trial's run (or of ``run_id``)."""
    step = int(result.get("epoch", result.get("training_iteration", 0)))
    metrics = {k: v for k, v in result.items() if k not in SKIPPED_METRICS and isinstance(v, (int, float))}
    args = {"metrics": metrics, "step": step, "timestamp_ms": int(result.get("timestamp", 0) * 1000)}
    return Write("metrics", args | ({"run_id": run_id} if run_id else {}), trial_id)


RESTORED_EPOCHS = "bkd_restored_epochs"  # a resumed trial's first result: the epochs it restored (JSON), for runs missing some


def epoch_writes(result: Mapping[str, Any], trial_id: str, run_id: Optional[str] = None) -> list[Write]:
    """The writes of a reported epoch, preceded by those of the epochs a resumed trial restored (a run that has
    them already skips them: a step is never logged twice; one a stop kept from the driver is logged now)."""
    restored = json.loads(result[RESTORED_EPOCHS]) if isinstance(result.get(RESTORED_EPOCHS), str) else []
    return [epoch_write(earlier, trial_id, run_id) for earlier in restored] + [epoch_write(result, trial_id, run_id)]


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
        for write in epoch_writes(result, trial.trial_id):
            self.writer.submit(write)

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
