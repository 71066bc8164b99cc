"""Every way a user stops a search, as their shell meets it: `python -m orchestrator.tune` in a subprocess at the
defaults (a local Ray cluster started by the command, Tune's own snapshot timing, the teacher trained by
the command where the test says so), a real MLflow sqlite store; the driver killed alone mid-teacher and
right after a trial finished, Ctrl-C mid-teacher and mid-trials, SIGTERM. A search ending by its own limits (a
time budget, every trial diverging) is in test_search_limits."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from bkd_core import models
from conftest import REPO, assert_console_is_bkds

pytestmark = pytest.mark.ray


class Search:
    """One named search of the default demo (digits, tiny pair) in ``tmp``: with a fixed random teacher
    file, or (``own_teacher``) training its teacher first, as the default command does. ``command``: the
    entry point."""

    def __init__(self, tmp: Path, name: str, *extra: str, own_teacher: bool = False, command: str = "orchestrator.tune") -> None:
        self.tmp, self.name, self.command = tmp, name, command
        teacher = tmp / "teacher.pt"
        if not own_teacher and not teacher.is_file():
            torch.manual_seed(0)
            torch.save(models.create("tiny_resnet", 10, 1).state_dict(), teacher)
        self.args = [f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray", f"output_dir={tmp}/out",
                     f"tune.name={name}", "ray.address=local", *([] if own_teacher else [f"teacher.checkpoint={teacher}", "teacher.allow_chance=true"]), *extra]
        self.client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
        self.proc = None

    def start(self, *more: str) -> subprocess.Popen:
        """The command in its own process group, as a shell runs it (Ctrl-C: SIGINT to the group)."""
        self.log = open(self.tmp / f"{self.name}-{int(time.time() * 1000)}.log", "w+")
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TUNE_GLOBAL_CHECKPOINT_S")}
        self.proc = subprocess.Popen([sys.executable, "-m", self.command, *self.args, *more], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        return self.proc

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def teacher_runs(self) -> list:
        exp = self.client.get_experiment_by_name("bkd")
        return self.client.search_runs([exp.experiment_id], filter_string="tags.`bkd.role` = 'teacher'") if exp else []

    def teacher_epochs_printed(self, output: str | None = None) -> list[int]:
        return [int(m) for m in re.findall(r"\[bkd\] teacher epoch (\d+)/", self.output if output is None else output)]

    def with_args(self, *more: str) -> "Search":
        """The same search with more overrides (for a command run in this process)."""
        self.args = [*self.args, *more]
        return self

    def run(self, *more: str, timeout: float = 400) -> int:
        self.start(*more)
        return self.wait(timeout)

    def wait(self, timeout: float = 400) -> int:
        code = self.proc.wait(timeout=timeout)
        self.log.flush()
        return code

    @property
    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def parent(self):
        exp = self.client.get_experiment_by_name("bkd")
        found = self.client.search_runs([exp.experiment_id], filter_string=f"tags.`bkd.role` = 'search' and "
                                        f"tags.`mlflow.runName` = '{self.name}'") if exp else []
        return found[0] if found else None

    def trials(self) -> list:
        parent = self.parent()
        if parent is None:
            return []
        return self.client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")

    def steps(self, run) -> list[int]:
        return sorted(m.step for m in self.client.get_metric_history(run.info.run_id, "val_acc"))

    def rows(self) -> list[dict]:
        return pq.read_table(self.tmp / "out" / self.name / "trials.parquet").to_pylist()

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if condition():
                return
            time.sleep(0.2)
        raise AssertionError(f"{what} did not happen:\n{self.output[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def stop_after_the_first_epoch(search: Search, sig: signal.Signals, code: int) -> None:
    """Send ``sig`` to the driver once a trial has logged an epoch: it exits with ``code`` within a
    minute, its parent run KILLED with the reason."""
    search.start()
    search.wait_for(lambda: any("val_acc" in r.data.metrics for r in search.trials()), "a logged epoch")
    sent = time.time()
    search.proc.send_signal(sig)
    assert search.wait(120) == code, search.output[-4000:]
    assert time.time() - sent < 60, "the driver took over a minute to stop"
    assert search.parent().info.status == "KILLED"
    assert search.parent().data.tags["bkd.end_reason"] == f"interrupted ({sig.name})"


def test_sigterm_ends_killed_with_exit_143(tmp):
    search = Search(tmp, "term", "tune.num_samples=2", "train.epochs=12", "tune.scheduler=none")
    try:
        stop_after_the_first_epoch(search, signal.SIGTERM, 143)
        assert all(r.info.status in ("KILLED", "FINISHED") for r in search.trials())
        assert "tune.resume=true tune.name=term" in search.output.strip().splitlines()[-1]
    finally:
        search.kill()


# --- the default path: the command trains its teacher first ---------------------------------------------


def last_line(search: Search) -> str:
    return search.output.strip().splitlines()[-1].strip()


def interrupt_the_teacher(search: Search, stop, code: int, reason: str, after_epoch: int = 3) -> list[int]:
    """Start the command, stop it (``stop(search)``) once its teacher printed ``after_epoch``: the command
    exits with ``code`` (None: killed, no exit of its own) and the teacher's one run is KILLED with ``reason``
    (RUNNING when killed). Returns the epochs the teacher's run logged, one point each, in order."""
    search.start()
    search.wait_for(lambda: f"teacher epoch {after_epoch}/" in search.output, f"teacher epoch {after_epoch}")
    stop(search)
    exit_code = search.wait(120)
    (teacher,) = search.teacher_runs()
    if code is None:
        assert teacher.info.status == "RUNNING"
    else:
        assert exit_code == code, search.output[-4000:]
        assert "the teacher's training (epoch" in search.output
        assert last_line(search).startswith("python -m orchestrator.") and "tune.resume=true tune.name=" in last_line(search)
        assert teacher.info.status == "KILLED" and teacher.data.tags["bkd.end_reason"] == reason
        assert_console_is_bkds(search.output)
    logged = search.steps(teacher)
    assert logged and logged == list(range(1, len(logged) + 1)), logged
    return logged


def assert_the_teacher_continued(search: Search, logged: list[int], epochs: int) -> None:
    """The resume printed the teacher's epochs from the one after the last it logged (never from 1, whatever
    train.checkpoint_min_interval_s) to the end, and its one MLflow run FINISHED with one point per epoch."""
    printed = search.teacher_epochs_printed()
    assert printed and printed[0] == len(logged) + 1 and printed[-1] == epochs, printed
    (teacher,) = search.teacher_runs()
    assert teacher.info.status == "FINISHED" and "bkd.end_reason" not in teacher.data.tags
    assert search.steps(teacher) == list(range(1, epochs + 1)), "one point per teacher epoch, in the same run"


def trial_steps(search: Search) -> dict[str, int]:
    """How many epochs each trial's run has logged so far, by trial id."""
    return {r.data.tags["bkd.trial_id"]: len(search.steps(r)) for r in search.trials()}


def test_the_default_path_killed_and_interrupted_every_way_resumes_without_training_anything_finished_again(tmp):
    """The default command (it trains its teacher first), stopped every way a user stops it, each time resumed
    with the command it printed:
    1. SIGKILL to the driver alone mid-teacher: the teacher's run stays RUNNING;
    2. the resume continues the teacher (its first epoch > 1, the same run); Ctrl-C (SIGINT to the process group)
       while it trains: exit 130, the teacher's run KILLED, the resume command last;
    3. the resume continues the teacher again, to its end, then the trials; SIGKILL at once after the first trial's
       run is FINISHED (Tune's snapshot is then older than that end);
    4. the resume reuses the finished teacher and does not train that trial again; Ctrl-C once the other trial
       logs an epoch stops it within a minute (exit 130, trial INTERRUPTED, run KILLED);
    5. the last resume finishes the search with the true best, one point per epoch in every run."""
    epochs = 20
    search = Search(tmp, "stops", f"teacher.epochs={epochs}", "tune.num_samples=2", "tune.max_concurrent=1",
                    "tune.scheduler=none", "train.epochs=8", own_teacher=True)  # epochs far shorter than the 30-s checkpoints
    try:
        logged = interrupt_the_teacher(search, lambda s: s.proc.send_signal(signal.SIGKILL), None, "", after_epoch=3)

        search.start("tune.resume=true")
        search.wait_for(lambda: len(search.teacher_epochs_printed()) >= 2, "two teacher epochs after the resume")
        search.ctrl_c()
        assert search.wait(120) == 130, search.output[-4000:]
        printed = search.teacher_epochs_printed()
        assert printed[0] == len(logged) + 1 and printed[-1] < epochs, printed  # continued after the last logged, then stopped
        (teacher,) = search.teacher_runs()
        assert teacher.info.status == "KILLED" and teacher.data.tags["bkd.end_reason"] == "interrupted (SIGINT)"
        assert "the teacher's training (epoch" in search.output
        assert last_line(search).startswith("python -m orchestrator.tune") and "tune.resume=true tune.name=stops" in last_line(search)
        assert_console_is_bkds(search.output)
        logged = search.steps(teacher)
        assert logged == list(range(1, len(logged) + 1)), logged

        search.start("tune.resume=true")
        search.wait_for(lambda: any(r.info.status == "FINISHED" for r in search.trials()), "a finished trial")
        search.proc.send_signal(signal.SIGKILL)
        search.wait(60)
        assert_the_teacher_continued(search, logged, epochs)
        finished_before = {r.data.tags["bkd.trial_id"] for r in search.trials() if r.info.status == "FINISHED"}
        assert finished_before

        before = trial_steps(search)
        before_runs = {r.info.run_id: len(search.steps(r)) for r in search.trials()}
        search.start("tune.resume=true")
        search.wait_for(lambda: any(n > before.get(t, 0) for t, n in trial_steps(search).items() if t not in finished_before),
                        "an epoch of the unfinished trial")
        sent = time.time()
        search.ctrl_c()
        assert search.wait(120) == 130, search.output[-4000:]
        assert time.time() - sent < 60, "the driver took over a minute to stop"
        assert "reusing teacher from MLflow run" in search.output and not search.teacher_epochs_printed()
        assert search.parent().info.status == "KILLED"
        assert search.parent().data.tags["bkd.end_reason"] == "interrupted (SIGINT)"
        interrupted = [r for r in search.trials() if r.info.status != "FINISHED"]
        assert interrupted and all(r.info.status == "KILLED" for r in interrupted)
        stopped_runs = {r.info.run_id for r in interrupted if len(search.steps(r)) > before_runs.get(r.info.run_id, 0)}
        assert stopped_runs, "the Ctrl-C stopped no trial that was training"
        rows = search.rows()
        assert rows and {r["status"] for r in rows} <= {"FINISHED", "INTERRUPTED"} and "INTERRUPTED" in {r["status"] for r in rows}
        assert "tune.resume=true tune.name=stops" in last_line(search) and last_line(search).startswith("python -m orchestrator.tune")
        assert_console_is_bkds(search.output)  # Tune's own `Tuner.restore(...)` hint included

        assert search.run("tune.resume=true") == 0, search.output[-4000:]
        assert "reusing teacher from MLflow run" in search.output and not search.teacher_epochs_printed()
        assert len(search.teacher_runs()) == 1
        parent = search.parent()
        assert parent.info.status == "FINISHED" and "bkd.end_reason" not in parent.data.tags
        rows = search.rows()
        assert len(rows) == 2 and all(r["status"] == "FINISHED" and r["epochs"] == 8 for r in rows), rows
        assert finished_before <= {r["trial_id"] for r in rows}
        best = rows[0]
        assert parent.data.tags["best.trial_id"] == best["trial_id"]
        assert parent.data.metrics["best_val_acc"] == pytest.approx(best["val_acc"])
        runs = search.trials()
        done = {r.data.tags["bkd.trial_id"]: r for r in runs if r.info.status == "FINISHED"}
        assert set(done) == {r["trial_id"] for r in rows}, "every trial ends FINISHED in one run"
        for trial, run in done.items():  # a finished trial was not trained again; an interrupted one continued
            assert search.steps(run) == list(range(1, 9)), (trial, search.steps(run))
        assert stopped_runs <= {r.info.run_id for r in done.values()}, "Ctrl-C'd trials continue in their own runs"
        for run in runs:  # a run the SIGKILL left behind ends KILLED, never RUNNING, never two points a step
            assert run.info.status in ("FINISHED", "KILLED")
            assert len(search.steps(run)) == len(set(search.steps(run))), run.data.tags["bkd.trial_id"]
        assert not list((tmp / "out" / "stops").glob("mlflow_pending_*")), "a refused write was taken for an outage"
    finally:
        search.kill()


def test_sigterm_mid_teacher_of_the_teacher_command_exits_143(tmp):
    search = Search(tmp, "term-teacher", "teacher.epochs=400", own_teacher=True, command="orchestrator.teacher")
    try:
        interrupt_the_teacher(search, lambda s: s.proc.send_signal(signal.SIGTERM), 143, "interrupted (SIGTERM)", after_epoch=2)
        assert last_line(search).startswith("python -m orchestrator.teacher")
    finally:
        search.kill()
