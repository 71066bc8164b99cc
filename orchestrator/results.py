"""The trials of a search as a table: Parquet export (pyarrow) and the printed summary."""
from __future__ import annotations

import math
import os
import re
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

FINAL_METRICS = ("val_acc", "train_loss", "throughput_img_s")
DIVERGED = "diverged"  # a trial's last result has diverged=1 when its training loss became NaN/inf


def diverged_message(metrics: Mapping[str, Any]) -> str:
    return (f"the training loss became NaN/inf in epoch {int(metrics.get('epoch', 0))}: the run diverged "
            "(the trial ends; its val_acc is that of the diverged student); lower the learning rate.")


TRIAL_ID = re.compile(r"_([0-9a-f]{5,}_\d{5})_")


def trial_id_of(result: Any) -> str:
    """Tune's trial id, read from the trial directory name (``<trainable>_<id>_<index>_...``)."""
    found = TRIAL_ID.search(os.path.basename(str(result.path)))
    return found.group(1) if found else (result.metrics or {}).get("trial_id", "?")


def trial_row(result: Any, params: Mapping[str, Any], run_id: str | None, max_epochs: int) -> dict[str, Any]:
    """One row: parameters, final and best metrics, status, epochs, wall time."""
    metrics = dict(result.metrics or {})
    history = result.metrics_dataframe
    accs = [acc for _, acc in val_acc_curve(result)]
    epochs = int(metrics.get("epoch", 0) or 0)
    diverged = not result.error and bool(metrics.get(DIVERGED))
    row: dict[str, Any] = {
        "trial_id": trial_id_of(result),
        "status": "FAILED" if result.error else "DIVERGED" if diverged else "FINISHED",
        "stopped_early": bool(not result.error and not diverged and epochs < max_epochs),
        "epochs": epochs,
        **{k: v for k, v in params.items()},
        "best_val_acc": max(accs) if accs else float("nan"),
        "wall_time_s": float(metrics.get("time_total_s", float("nan")) or float("nan")),
        "started_at": float(history["timestamp"].min()) if history is not None and "timestamp" in history else float("nan"),
        "mlflow_run_id": run_id,
        "error": str(result.error).strip().splitlines()[-1][:500] if result.error else diverged_message(metrics) if diverged else None,
    }
    for key in FINAL_METRICS:
        row[key] = float(metrics[key]) if key in metrics else float("nan")
    for key, value in metrics.items():
        if key.startswith(("val_acc_stone_", "train_loss_")):
            row[key] = float(value)
    return row


def val_acc_curve(result: Any) -> list[tuple[int, float]]:
    """(epoch, val_acc) of every epoch a trial reported; a repeated epoch (a retried trial) keeps its last value."""
    history = result.metrics_dataframe
    if history is None or "val_acc" not in history or "epoch" not in history:
        return []
    points = {int(e): float(a) for e, a in zip(history["epoch"], history["val_acc"]) if e == e and a == a}
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


def ranked(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: highest best_val_acc; failed trials last."""
    def key(row: dict[str, Any]) -> tuple[bool, float]:
        acc = row["best_val_acc"]
        return row["status"] != "FINISHED", -(acc if not math.isnan(acc) else -1.0)

    return sorted(rows, key=key)


def format_table(rows: list[dict[str, Any]], param_names: list[str]) -> str:
    """A plain-text table of the trials, best first."""
    head = ["rank", "trial_id", "status", "epochs", "best_val_acc", "val_acc"] + param_names
    lines = [head]
    for i, r in enumerate(ranked(rows), 1):
        cells = [str(i), str(r["trial_id"]), r["status"] + ("*" if r["stopped_early"] else ""), str(r["epochs"]),
                 _fmt(r["best_val_acc"]), _fmt(r["val_acc"])] + [_fmt(r.get(p)) for p in param_names]
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) + "\n(* stopped early by the scheduler)"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.4g}"
    return str(value)
