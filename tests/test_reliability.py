"""Multi-node placement, a killed trial process, a killed driver, a diverging trial: on a real
two-node Ray cluster (`ray start --head` and `ray start --address=...` on this machine)."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from ray.util.state import list_actors

from bkd_core import models
from conftest import BIN, REPO, free_port, migrated_mlflow_store, write_idx
from orchestrator import train as train_entry
from orchestrator import tune as tune_entry
from orchestrator.console.cli import entry_point
from orchestrator.tracking.runs import connect

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    port = free_port()
    ray_cmd = [str(BIN / "ray"), "start", "--disable-usage-stats", "--num-cpus=1"]
    subprocess.run(ray_cmd + ["--head", f"--port={port}", f"--dashboard-port={free_port()}"], env=env, check=True,
                   capture_output=True, timeout=180)
    subprocess.run(ray_cmd + [f"--address=127.0.0.1:{port}"], env=env, check=True, capture_output=True, timeout=180)
    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
    deadline = time.time() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
        time.sleep(1)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield {"address": f"127.0.0.1:{port}", "env": env, "tmp": tmp_path_factory.mktemp("rel")}
    ray.shutdown()
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def base(tmp, name, teacher=None):
    migrated_mlflow_store(tmp / "mlflow.db")
    args = [f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray", f"output_dir={tmp}/out",
            f"tune.name={name}", "resources.cpus_per_worker=0.9", "teacher.epochs=1",
            "train.checkpoint_min_interval_s=0"]  # a checkpoint each epoch: the tests kill after epoch 1
    return args + ([f"teacher.checkpoint={teacher}"] if teacher else [])


def client_and_exp(tmp):
    return connect(f"sqlite:///{tmp}/mlflow.db", "bkd")  # creates the experiment if no run made it yet


def trial_runs(tmp, parent_id=None):
    client, exp = client_and_exp(tmp)
    runs = client.search_runs([exp], filter_string="tags.`bkd.role` = 'trial'")
    return [r for r in runs if parent_id is None or r.data.tags["mlflow.parentRunId"] == parent_id]


def random_teacher(tmp, name, classes=10, channels=1) -> Path:
    path = tmp / f"{name}.pt"
    torch.manual_seed(0)
    torch.save(models.create("tiny_resnet", classes, channels).state_dict(), path)
    return path


def test_trial_spread_over_two_nodes(two_nodes):
    tmp = two_nodes["tmp"]
    argv = base(tmp, "spread") + ["resources.workers_per_trial=2", "resources.placement_strategy=STRICT_SPREAD",
                                  "train.epochs=2", "fixed.cuts=[2,3]"]
    assert entry_point(train_entry.run, argv) == 0
    (row,) = pq.read_table(tmp / "out" / "spread" / "trials.parquet").to_pylist()
    assert row["status"] == "FINISHED" and row["epochs"] == 2 and row["val_acc"] > 20
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    nodes = {a["node_id"] for a in workers}
    assert len(nodes) == 2, "the two DDP workers of a STRICT_SPREAD trial must sit on two nodes"


def run_and_kill_after_epoch_1(tmp, argv, params: dict, actor_class: str, actors_alive: int) -> tuple[int, object]:
    """Run ``orchestrator.train`` with ``argv``; once its trial (the MLflow run with these ``params``)
    has logged epoch 1 (reported and checkpointed), kill -9 one ``actor_class`` actor.
    Returns the exit code and the trial's MLflow run."""

    def this_trial() -> list:
        return [r for r in trial_runs(tmp) if params.items() <= r.data.params.items()]

    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("rc", entry_point(train_entry.run, argv)))
    thread.start()
    victim, killed = None, False
    deadline = time.time() + 300
    while not killed and time.time() < deadline and thread.is_alive():
        if victim is None or not pid_exists(victim):  # found before epoch 1 ends: the state API is slow to ask
            alive = [a["pid"] for a in list_actors(filters=[("class_name", "=", actor_class), ("state", "=", "ALIVE")],
                                                   detail=True) if pid_exists(a["pid"])]  # the state API lags deaths
            victim = alive[-1] if len(alive) >= actors_alive else None
        runs = this_trial()
        if victim is not None and runs and "val_acc" in runs[0].data.metrics:
            try:
                os.kill(victim, signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                victim = None
        time.sleep(0.3)
    thread.join(timeout=600)
    assert not thread.is_alive(), "the trial did not finish within 10 minutes of the kill"
    assert killed, f"no {actor_class} was killed after the first epoch"
    (run,) = this_trial()
    return outcome.get("rc"), run


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def trial_failures(tmp, name) -> list[str]:
    """The errors Tune recorded for the trials of experiment ``name`` (a retried trial has one)."""
    return [p.read_text() for p in (tmp / "ray" / name).glob("*/error.txt")]


def logged_epochs(tmp, run) -> list[int]:
    client, _ = client_and_exp(tmp)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_acc"))


def test_killed_trial_resumes_from_its_last_checkpoint(two_nodes):
    """A one-worker trial trains in its Tune trial process (ImplicitFunc); kill -9 it after epoch 1."""
    tmp = two_nodes["tmp"]
    root = write_idx(tmp / "mnist-like", n_train=2000, n_test=500)
    teacher = random_teacher(tmp, "mnist-teacher")
    # 12 epochs of ~3 s: the kill lands within seconds of epoch 1 reaching MLflow (the state API that finds the
    # victim is slow on 2 busy cores; 8 epochs were once not enough), while the trial still runs
    argv = base(tmp, "killworker", teacher) + ["data=mnist", f"data.root={root}", "train.epochs=12", "fixed.cuts=[3]"]
    rc, run = run_and_kill_after_epoch_1(tmp, argv, {"data": "mnist"}, "ImplicitFunc", actors_alive=1)
    assert rc == 0 and run.info.status == "FINISHED"
    assert trial_failures(tmp, "killworker"), "the kill landed after the trial had ended: nothing was retried"
    assert logged_epochs(tmp, run) == list(range(1, 13)), "a restart from epoch 0 would log epoch 1 twice"


def test_killed_ddp_worker_restarts_the_worker_group_from_its_checkpoint(two_nodes):
    """A two-worker trial (Ray Train, one worker per node): kill -9 one DDP worker after epoch 1."""
    tmp = two_nodes["tmp"]
    argv = base(tmp, "killddp") + ["resources.workers_per_trial=2", "train.epochs=4", "fixed.cuts=[1,2]"]
    rc, run = run_and_kill_after_epoch_1(tmp, argv, {"cuts": "1,2"}, "RayTrainWorker", actors_alive=2)
    assert rc == 0 and run.info.status == "FINISHED"
    (row,) = pq.read_table(tmp / "out" / "killddp" / "trials.parquet").to_pylist()
    assert row["status"] == "FINISHED" and row["epochs"] == 4
    assert logged_epochs(tmp, run) == [1, 2, 3, 4], "a restart from epoch 0 would log epoch 1 twice"


def test_diverging_trial_ends_with_its_chance_accuracy_and_the_search_goes_on(two_nodes):
    """A NaN loss ends the trial at once (no retry: tune.max_failures=1 here) as DIVERGED, reporting
    the diverged student's val_acc so that the searcher learns the region is bad."""
    tmp = two_nodes["tmp"]
    argv = base(tmp, "diverge") + ["search=kd", "+search.params.lr.choices=[0.05,1.0e+9]", "tune.num_samples=4",
                                   "tune.scheduler=none", "train.epochs=2", "tune.seed=3"]
    assert entry_point(tune_entry.run, argv) == 0
    rows = pq.read_table(tmp / "out" / "diverge" / "trials.parquet").to_pylist()
    diverged = [r for r in rows if r["status"] == "DIVERGED"]
    finished = [r for r in rows if r["status"] == "FINISHED"]
    assert len(rows) == 4 and len(diverged) + len(finished) == 4 and diverged and finished
    assert all(r["lr"] > 1e8 for r in diverged) and all(r["lr"] < 1 for r in finished)
    assert all(r["epochs"] == 1 and r["val_acc"] < 30 and "diverged" in r["error"] for r in diverged), diverged
    client, _ = client_and_exp(tmp)
    for row in diverged:
        run = client.get_run(row["mlflow_run_id"])
        assert run.info.status == "FAILED" and "diverged" in run.data.tags["bkd.error"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1], "retried or went on"


def test_diverging_ddp_trial_stops_on_every_rank(two_nodes):
    """Both ranks see the same (all-reduced) loss, so both stop at the same epoch: no rank waits forever."""
    tmp = two_nodes["tmp"]
    argv = base(tmp, "diverge-ddp") + ["resources.workers_per_trial=2", "train.epochs=3", "search.params.lr.high=1.0e+10", "fixed.lr=1.0e+9",
                                       "fixed.cuts=[3]"]
    assert entry_point(train_entry.run, argv) == 1  # the one configuration did not give a student
    (row,) = pq.read_table(tmp / "out" / "diverge-ddp" / "trials.parquet").to_pylist()
    assert row["status"] == "DIVERGED" and row["epochs"] == 1, row


def start_mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (sqlite store, proxied artifacts) in its own process group; waits until it answers."""
    migrated_mlflow_store(tmp / "server.db")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--artifacts-destination",
         str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            time.sleep(0.3)
    stop_server(server)
    raise AssertionError("mlflow server did not start within 90 s")


def stop_server(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


class OutageSearch:
    """A search (2 trials of 3 epochs, digits) as a driver subprocess logging to a real `mlflow server`
    that the test stops and starts; the server's store survives restarts."""

    def __init__(self, two_nodes: dict, name: str, extra: list[str]) -> None:
        self.tmp = two_nodes["tmp"] / name
        self.tmp.mkdir()
        self.port = free_port()
        self.client = MlflowClient(f"http://127.0.0.1:{self.port}")
        self.env = two_nodes["env"]
        self.args = [f"mlflow.tracking_uri=http://127.0.0.1:{self.port}", f"ray.storage_path={self.tmp}/ray",
                     f"output_dir={self.tmp}/out", f"tune.name={name}", f"ray.address={two_nodes['address']}",
                     "resources.cpus_per_worker=0.9", f"teacher.checkpoint={random_teacher(self.tmp, 'teacher')}",
                     "tune.num_samples=2", "tune.max_concurrent=1", "tune.scheduler=none", "train.epochs=3",
                     "mlflow.retry_interval_s=1", *extra]
        self.server = start_mlflow_server(self.tmp, self.port)
        self.lines: list[str] = []

    def start_driver(self, *more: str) -> None:
        self.lines = []
        self.driver = subprocess.Popen([sys.executable, "-m", "orchestrator.tune", *self.args, *more], cwd=REPO, env=self.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.driver.stdout), daemon=True)
        self.reader.start()

    def stop_server_after_the_first_epoch(self) -> None:
        deadline = time.time() + 300
        while time.time() < deadline and self.driver.poll() is None:
            experiments = [e.experiment_id for e in self.client.search_experiments()]
            runs = self.client.search_runs(experiments, filter_string="tags.`bkd.role` = 'trial'") if experiments else []
            if any("val_acc" in r.data.metrics for r in runs):
                break
            time.sleep(0.3)
        stop_server(self.server)
        while time.time() < deadline and not self.said("is unreachable"):
            time.sleep(0.3)
        assert self.said("is unreachable"), "the driver never met the outage:\n" + self.output[-4000:]

    def wait_driver(self) -> str:
        self.driver.wait(timeout=600)
        self.reader.join(timeout=30)
        print("".join(line for line in self.lines if line.startswith("[bkd]")))  # shown with pytest -s
        assert self.driver.returncode == 0, self.output[-4000:]
        return self.output

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def close(self) -> None:
        if getattr(self, "driver", None) is not None and self.driver.poll() is None:
            self.driver.kill()
        stop_server(self.server)

    def assert_everything_logged(self) -> None:
        """Every epoch of both trials, their ends, and the parent's results are in the store."""
        (exp,) = [e for e in self.client.search_experiments() if e.name == "bkd"]
        (parent,) = self.client.search_runs([exp.experiment_id], filter_string="tags.`bkd.role` = 'search'")
        trials = self.client.search_runs([exp.experiment_id], filter_string="tags.`bkd.role` = 'trial'")
        assert parent.info.status == "FINISHED" and "best_val_acc" in parent.data.metrics
        assert {"trials.parquet", "search.png"} <= {a.path for a in self.client.list_artifacts(parent.info.run_id)}
        assert len(trials) == 2
        for run in trials:
            assert run.info.status == "FINISHED" and run.data.params["temperature"]
            steps = {m.step for m in self.client.get_metric_history(run.info.run_id, "val_acc")}
            assert steps == {1, 2, 3}, (run.info.run_id, sorted(steps))


def test_mlflow_outage_delays_what_a_search_logs_but_loses_none_of_it(two_nodes):
    """Stop the MLflow server once the first epoch is logged, start it again once the driver has
    noticed: the queued writes go out when it is back, during the search."""
    search = OutageSearch(two_nodes, "outage", [])
    try:
        search.start_driver()
        search.stop_server_after_the_first_epoch()
        search.server = start_mlflow_server(search.tmp, search.port)
        output = search.wait_driver()
        assert "reachable again" in output and "were not logged" not in output, output[-4000:]
        search.assert_everything_logged()
    finally:
        search.close()


def test_mlflow_down_past_the_end_of_a_search_keeps_its_writes_for_resume(two_nodes):
    """MLflow stays down until the search has ended (mlflow.end_wait_s=1): the search still succeeds,
    its unlogged writes wait in files beside trials.parquet, and `tune.resume=true` logs them."""
    search = OutageSearch(two_nodes, "outage-end", ["mlflow.end_wait_s=1"])
    out = search.tmp / "out" / "outage-end"
    try:
        search.start_driver()
        search.stop_server_after_the_first_epoch()
        output = search.wait_driver()
        assert "were not logged" in output and "tune.resume=true" in output, output[-4000:]
        assert (out / "trials.parquet").is_file() and (out / "student.pt").is_file()
        spools = sorted(p.name for p in out.glob("mlflow_pending_*.jsonl"))
        assert spools == ["mlflow_pending_search.jsonl", "mlflow_pending_trials.jsonl"], spools
        search.server = start_mlflow_server(search.tmp, search.port)
        search.start_driver("tune.resume=true")
        output = search.wait_driver()
        assert "that an earlier MLflow outage left" in output, output[-4000:]
        assert not list(out.glob("mlflow_pending_*")), "the replayed writes' files are removed"
        search.assert_everything_logged()
    finally:
        search.close()
