"""The trials of a search as a table: Parquet export (pyarrow) and the printed summary."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Mapping, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.tracking.objective import ACCURACY, Objective
from orchestrator.tracking.stats import SeedResult, decode_correct


def case_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's parameters: a search's suggestion, or one listed case (``{"case": {...}}``) of
    ``orchestrator.train``, ``compare`` and confirmation runs."""
    return dict(config["case"]) if isinstance(config.get("case"), Mapping) else dict(config)


TEST_CORRECT = "test_correct"  # the final student's per-example correctness on the test split (stats.encode_correct)
DIVERGED = "diverged"  # a trial's last result has diverged=1 when its training loss became NaN/inf


def diverged_message(metrics: Mapping[str, Any]) -> str:
    return (f"the training loss became NaN/inf in epoch {int(metrics.get('epoch', 0))}: the run diverged "
            "(the trial ends; its val score is that of the diverged student); lower the learning rate.")


TRIAL_ID = re.compile(r"_([0-9a-f]{5,}_\d{5})_")


def trial_id_of(result: Any) -> str:
    """Tune's trial id, read from the trial directory name (``<trainable>_<id>_<index>_...``)."""
    found = TRIAL_ID.search(os.path.basename(str(result.path)))
    return found.group(1) if found else (result.metrics or {}).get("trial_id", "?")


# How a trial ended, as trials.parquet and the printed table say it.
STATUSES = {
    "FINISHED": "trained every epoch",
    "STOPPED_EARLY": "stopped early by the scheduler (ASHA)",
    "DIVERGED": "its loss became NaN/inf",
    "OUT_OF_TIME": "stopped by tune.time_budget_s; tune.resume=true continues it",
    "INTERRUPTED": "interrupted (SIGINT/SIGTERM); tune.resume=true continues it",
    "FAILED": "raised an error (after tune.max_failures retries)",
}


def trial_status(tune_status: str, record: Any, has_results: bool, interrupted: bool, has_budget: bool) -> Optional[str]:
    """A trial's status from Tune's state and its record (``orchestrator.tracking.records``); None for a trial
    that never reported anything (not a row)."""
    if record is not None:
        return record.status
    if tune_status == "ERROR":
        return "FAILED"
    if not has_results:
        return None
    if interrupted:
        return "INTERRUPTED"
    if has_budget:  # the budget stopped the search, as Ctrl-C does: its trials left resumable (or TERMINATED by Tune's)
        return "OUT_OF_TIME"
    if tune_status == "TERMINATED":
        return "STOPPED_EARLY"
    return "INTERRUPTED"  # RUNNING, PENDING or PAUSED after Tune returned


def seed_result(row: Mapping[str, Any], metric: str, test_count: int) -> SeedResult:
    """A finished run's test figure for the statistics: its ``metric`` and, where it kept them, its per-example
    results (``test_correct``)."""
    correct = decode_correct(row[TEST_CORRECT]) if isinstance(row.get(TEST_CORRECT), str) else None
    return SeedResult(float(row[metric]), correct, test_count)


def trial_row(result: Any, params: Mapping[str, Any], run_id: str | None, status: str, record: Any = None,
              objective: Objective = ACCURACY) -> dict[str, Any]:
    """One row: parameters, final and best metrics, status, epochs, wall time. A recorded trial's own
    record is its truth (a resumed driver may hold only part of its history)."""
    metrics = dict(record.metrics if record is not None else result.metrics or {})
    curve = val_curve(result, record, objective.val)
    history = result.metrics_dataframe
    started = [h["timestamp"] for h in record.history if "timestamp" in h] if record is not None else []
    if not started and history is not None and "timestamp" in history:
        started = [float(history["timestamp"].min())]
    error = str(result.error).strip().splitlines()[-1][:500] if result.error else diverged_message(metrics) if status == "DIVERGED" else None
    row: dict[str, Any] = {
        "trial_id": trial_id_of(result),
        "status": status,
        "epochs": int(metrics.get("epoch", 0) or 0),
        **{k: v for k, v in params.items()},
        objective.best_val: objective.best(value for _, value in curve),
        # Tune's time_total_s: a record holds the trial's own metrics only, Tune's last result has it
        "wall_time_s": float(metrics.get("time_total_s") or (result.metrics or {}).get("time_total_s") or float("nan")),
        "started_at": min(started) if started else float("nan"),
        "mlflow_run_id": run_id,
        "error": error,
    }
    for key in objective.final_metrics():
        row[key] = float(metrics[key]) if key in metrics else float("nan")
    for key, value in metrics.items():
        if key.startswith((f"{objective.val}_stone_", f"{objective.test}_stone_", "train_loss_")):
            row[key] = float(value)
    if isinstance(metrics.get(TEST_CORRECT), str):
        row[TEST_CORRECT] = metrics[TEST_CORRECT]
    return row


def val_curve(result: Any, record: Any = None, metric: str = "val_acc") -> list[tuple[int, float]]:
    """(epoch, ``metric``) of every epoch a trial reported; a repeated epoch (a retried trial) keeps its last value."""
    if record is not None and record.history:
        pairs = [(h.get("epoch"), h.get(metric)) for h in record.history]
    else:
        history = result.metrics_dataframe
        if history is None or metric not in history or "epoch" not in history:
            return []
        pairs = list(zip(history["epoch"], history[metric]))
    points = {int(e): float(a) for e, a in pairs if e is not None and a is not None and e == e and a == a}
    return sorted(points.items())


def write_parquet(rows: list[dict[str, Any]], path: str) -> None:
    """One row per trial; columns are the union of every row's keys (missing -> null)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    table = pa.table({c: [_clean(r.get(c)) for r in rows] for c in columns})
    pq.write_table(table, path)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def ranked(rows: Iterable[dict[str, Any]], objective: Objective = ACCURACY) -> list[dict[str, Any]]:
    """Best first: trials that trained every epoch, by their final val score (that of the weights they end with,
    which student.pt holds); the others after them, by the same."""
    return sorted(rows, key=lambda row: (row["status"] != "FINISHED", objective.sort_key(row.get(objective.val))))


def format_table(rows: list[dict[str, Any]], param_names: list[str], objective: Objective = ACCURACY) -> str:
    """A plain-text table of the trials, best first, and what each status means."""
    o = objective
    head = ["rank", "trial_id", "status", "epochs", o.val, o.best_val, o.test] + param_names
    lines = [head]
    for i, r in enumerate(ranked(rows, o), 1):
        cells = [str(i), str(r["trial_id"]), r["status"], str(r["epochs"]), _fmt(r.get(o.val)), _fmt(r.get(o.best_val)),
                 _fmt(r.get(o.test))]
        lines.append(cells + [_fmt(r.get(p)) for p in param_names])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    seen = [s for s in STATUSES if any(r["status"] == s for r in rows)]
    legend = "; ".join(f"{s}: {STATUSES[s]}" for s in seen)
    return ("\n".join(text) + f"\n({o.val}: {o.meaning}, {o.direction}, on the selection split (held-out val; test with "
            f"data.val_fraction=0), final epoch, the weights kept, what ranks; {o.best_val}: best epoch; {o.test}: the same "
            "weights on the test split)"
            + (f"\n({legend})" if legend else ""))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value)
