"""Durable records of ended trials, kept beside Tune's experiment in its storage (a local folder, NFS or
a bucket: pyarrow filesystems), so that a resumed search never trains a finished trial again.

A trial writes its record (final metrics, every epoch's metrics, the final student weights) the moment it
finishes, before its last report reaches the driver. When a driver dies, Tune's experiment snapshot can be
seconds older than that and still list the trial as running; on resume the trial finds its record,
reports it and returns at once. The driver adds a record for a trial the scheduler stopped early.

    <storage>/<experiment>/bkd_trials/<trial_id>/result.json   {"status", "metrics", "history"}
    <storage>/<experiment>/bkd_trials/<trial_id>/student.pt    the student of the last epoch (finished trials)
    <storage>/<experiment>/bkd_trials/<trial_id>/progress.pt   a running trial's state after its last finished
                                                               epoch (removed when the trial ends; the teacher's
                                                               is under bkd_trials/teacher/)

``progress.pt`` is what a stop keeps: Tune stops a trial's process without waiting for its epoch to end, and
saves Tune checkpoints at most once per ``train.checkpoint_min_interval_s``; the trial writes its state here
after every epoch, so a resumed or retried trial continues after its last finished epoch.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import pyarrow.fs as pafs
import torch

FINISHED, DIVERGED, STOPPED_EARLY = "FINISHED", "DIVERGED", "STOPPED_EARLY"
RECORDS_DIR = "bkd_trials"
RECORDED = "bkd_recorded"  # set in a result that replays a record (not logged again)
PROGRESS = "progress.pt"
TEACHER_PROGRESS = "teacher"  # the key of the teacher's progress (each resume of the teacher is a new Tune trial)


@dataclass
class TrialRecord:
    status: str
    metrics: dict[str, Any]
    history: list[dict[str, float]]


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able, finite numbers and strings of a result."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, bool) or isinstance(value, str) or (isinstance(value, (int, float)) and math.isfinite(value)):
            out[key] = value
    return out


class TrialRecords:
    """The records of one experiment (picklable: a storage URI or path and a name)."""

    def __init__(self, storage_path: str, experiment: str) -> None:
        self.storage_path, self.experiment = storage_path, experiment

    def _folder(self, trial_id: str) -> tuple[pafs.FileSystem, str]:
        fs, base = pafs.FileSystem.from_uri(self.storage_path)
        return fs, f"{base.rstrip('/')}/{self.experiment}/{RECORDS_DIR}/{trial_id}"

    def write(self, trial_id: str, status: str, metrics: Mapping[str, Any], history: list[dict[str, float]],
              student_state: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """Record an ended trial; result.json is written last, so a record is whole or absent."""
        fs, folder = self._folder(trial_id)
        fs.create_dir(folder, recursive=True)
        if student_state is not None:
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in student_state.items()}, buffer)
            with fs.open_output_stream(f"{folder}/student.pt") as out:
                out.write(buffer.getvalue())
        text = json.dumps({"status": status, "metrics": plain_metrics(metrics), "history": history})
        with fs.open_output_stream(f"{folder}/result.json.partial") as out:
            out.write(text.encode())
        fs.move(f"{folder}/result.json.partial", f"{folder}/result.json")
        self.clear_progress(trial_id)  # the trial ended: its progress is no longer needed

    def clear_progress(self, key: str) -> None:
        fs, folder = self._folder(key)
        try:
            fs.delete_file(f"{folder}/{PROGRESS}")
        except (FileNotFoundError, OSError):
            pass

    def save_progress(self, key: str, state: Mapping[str, Any]) -> None:
        """A running trial's state after a finished epoch (``state["epoch"]``), replacing the one before;
        written whole or not at all. ``key``: the trial id, or a name a later trial continues (the teacher's)."""
        fs, folder = self._folder(key)
        fs.create_dir(folder, recursive=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with fs.open_output_stream(f"{folder}/{PROGRESS}.partial") as out:
            out.write(buffer.getvalue())
        fs.move(f"{folder}/{PROGRESS}.partial", f"{folder}/{PROGRESS}")

    def progress(self, key: str, device: Any = "cpu") -> Optional[dict[str, Any]]:
        """The state ``save_progress`` wrote last under ``key``, or None."""
        fs, folder = self._folder(key)
        try:
            with fs.open_input_stream(f"{folder}/{PROGRESS}") as src:
                return torch.load(io.BytesIO(src.read()), map_location=device, weights_only=False)
        except (FileNotFoundError, OSError):
            return None

    def read(self, trial_id: str) -> Optional[TrialRecord]:
        fs, folder = self._folder(trial_id)
        try:
            with fs.open_input_stream(f"{folder}/result.json") as src:
                data = json.loads(src.read().decode())
        except (FileNotFoundError, OSError):
            return None
        return TrialRecord(data["status"], data["metrics"], data.get("history") or [])

    def student(self, trial_id: str) -> Optional[dict[str, torch.Tensor]]:
        """The recorded final student weights, or None."""
        fs, folder = self._folder(trial_id)
        try:
            with fs.open_input_stream(f"{folder}/student.pt") as src:
                return torch.load(io.BytesIO(src.read()), map_location="cpu", weights_only=True)
        except (FileNotFoundError, OSError):
            return None
