"""On a real two-node Ray cluster (`ray start --head` and `ray start --address=...` on this machine): `ray job submit`,
a command joining the cluster, multi-node placement, a killed trial process, a killed DDP worker, diverging trials,
MLflow outages."""
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
from test_parquet_data import prepare, write_folder

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
    port, dashboard = free_port(), free_port()
    ray_cmd = [str(BIN / "ray"), "start", "--disable-usage-stats", "--num-cpus=1"]
    subprocess.run(ray_cmd + ["--head", f"--port={port}", "--include-dashboard=true", f"--dashboard-port={dashboard}"], env=env,
                   check=True, capture_output=True, timeout=180)
    # the second node keeps its own temp folder, as on another machine: sharing the head's, its runtime-env agent
    # would delete a job's working_dir under the job's driver once its own trials are done with it
    node_dir = tempfile.mkdtemp(prefix="ray-node2-")
    subprocess.run(ray_cmd + [f"--address=127.0.0.1:{port}", f"--temp-dir={node_dir}"], env=env, check=True,
                   capture_output=True, timeout=180)
    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
    deadline = time.time() + 60
    while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
        time.sleep(1)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard}", "env": env,
           "tmp": tmp_path_factory.mktemp("rel")}
    ray.shutdown()
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(node_dir, ignore_errors=True)


def test_job_submit_succeeds(two_nodes, tmp_path):
    env = two_nodes["env"]
    overrides = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage_path={tmp_path}/ray",
                 f"output_dir={tmp_path}/out", "tune.name=job", "tune.num_samples=2", "train.epochs=1", "teacher.epochs=1"]
    submit = subprocess.run([BIN / "ray", "job", "submit", "--address", two_nodes["dashboard"], "--working-dir", str(REPO),
                             "--no-wait", "--", "python", "-m", "orchestrator.tune", *overrides],
                            env=env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)
    logs = subprocess.run([BIN / "ray", "job", "logs", "--address", two_nodes["dashboard"], "--follow", job_id],
                          env=env, capture_output=True, text=True, timeout=600)
    status = subprocess.run([BIN / "ray", "job", "status", "--address", two_nodes["dashboard"], job_id],
                            env=env, capture_output=True, text=True, timeout=60)
    assert f"Job '{job_id}' succeeded" in status.stdout, logs.stdout[-3000:] + status.stdout
    assert "mlflow ui --backend-store-uri" in logs.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("bkd")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`bkd.role` = 'trial'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert (tmp_path / "out" / "job" / "trials.parquet").is_file()


def test_a_command_run_on_the_head_joins_its_cluster_without_ray_num_cpus(two_nodes, tmp_path):
    """A cluster started by `ray start` is joined by a later command on the same machine (Ray's rule for a null
    ray.address); Ray refuses num_cpus when it joins, so the setting is left out with a line that says so."""
    env = {k: v for k, v in two_nodes["env"].items() if k != "RAY_ADDRESS"}
    done = prepare(f"source={write_folder(tmp_path / 'images', per_class=2)}", f"output={tmp_path}/shards", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray.num_cpus=2 is left out: joining the Ray cluster already running" in done.stderr
    assert "Connecting to existing Ray cluster" in done.stderr and (tmp_path / "shards" / "classes.json").is_file()


def base(tmp, name, teacher=None):
    migrated_mlflow_store(tmp / "mlflow.db")
    args = [f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray", f"output_dir={tmp}/out",
            f"tune.name={name}", "resources.cpus_per_worker=0.9", "teacher.epochs=1",
            "train.checkpoint_min_interval_s=0"]  # a checkpoint each epoch: the tests kill after epoch 1
    return args + ([f"teacher.checkpoint={teacher}", "teacher.allow_chance=true"] if teacher else [])


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
        if victim is None or not pid_exists(victim):
            alive = actor_processes(actor_class)
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


def actor_processes(actor_class: str) -> list[int]:
    """The pids of this machine's live Ray actors of ``actor_class`` (Ray titles an actor's process
    ``ray::<class>.<method>``): found at once, where Ray's state API takes seconds on 2 busy cores."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
        except OSError:
            continue
        if title.startswith(f"ray::{actor_class}".encode()):
            pids.append(int(proc.name))
    return sorted(pids)


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


def test_killed_trial_resumes_from_its_last_checkpoint(two_nodes, capsys):
    """A one-worker trial trains in its Tune trial process (ImplicitFunc); kill -9 it after epoch 1."""
    tmp = two_nodes["tmp"]
    root = write_idx(tmp / "mnist-like", n_train=800, n_test=200)
    teacher = random_teacher(tmp, "mnist-teacher")
    # 12 epochs of about 1 s: the kill lands within a second of epoch 1 reaching MLflow, while the trial still runs
    argv = base(tmp, "killworker", teacher) + ["data=mnist", f"data.root={root}", "train.epochs=12", "fixed.cuts=[3]"]
    rc, run = run_and_kill_after_epoch_1(tmp, argv, {"data": "mnist"}, "ImplicitFunc", actors_alive=1)
    assert rc == 0 and run.info.status == "FINISHED"
    assert trial_failures(tmp, "killworker"), "the kill landed after the trial had ended: nothing was retried"
    assert logged_epochs(tmp, run) == list(range(1, 13)), "a restart from epoch 0 would log epoch 1 twice"
    out = capsys.readouterr().out
    assert "failed (its process died: killed, or out of memory); it continues from its last checkpoint" in out, out[-3000:]


def test_killed_ddp_worker_restarts_the_worker_group_from_its_checkpoint_and_spreads_over_two_nodes(two_nodes):
    """A two-worker trial (Ray Train, STRICT_SPREAD: one worker per node): kill -9 one DDP worker after epoch 1.
    The restarted group is spread again and the trial learns."""
    tmp = two_nodes["tmp"]
    argv = base(tmp, "killddp", random_teacher(tmp, "digits-teacher")) + ["resources.workers_per_trial=2", "resources.placement_strategy=STRICT_SPREAD",
                                   "train.epochs=4", "fixed.cuts=[1,2]"]
    rc, run = run_and_kill_after_epoch_1(tmp, argv, {"cuts": "1,2"}, "RayTrainWorker", actors_alive=2)
    assert rc == 0 and run.info.status == "FINISHED"
    (row,) = pq.read_table(tmp / "out" / "killddp" / "trials.parquet").to_pylist()
    assert row["status"] == "FINISHED" and row["epochs"] == 4 and row["val_acc"] > 20
    assert logged_epochs(tmp, run) == [1, 2, 3, 4], "a restart from epoch 0 would log epoch 1 twice"
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    assert len(workers) >= 4, "the killed worker group and the restarted one"
    assert len({a["node_id"] for a in workers}) == 2, "the DDP workers of a STRICT_SPREAD trial must sit on two nodes"


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


class Relay:
    """The network between the driver and a real server: a TCP relay from ``port`` to ``target`` that the test
    cuts (new connections refused, open ones reset: what a client meets when the server goes down) and restores
    at once, where restarting `mlflow server` takes 7-12 s on this machine."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the port is free again at once
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        with self.lock:
            sockets = [self.listener, *self.connections]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes the accept and the pumps; the port stops listening
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return
            with self.lock:
                self.connections |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self.lock:
            self.connections -= {src, dst}


class OutageSearch:
    """A search (2 trials of 3 epochs, digits) as a driver subprocess logging to a real `mlflow server` through a
    ``Relay`` that the test cuts and restores; ``client`` reads the server directly."""

    def __init__(self, two_nodes: dict, name: str, extra: list[str]) -> None:
        self.tmp = two_nodes["tmp"] / name
        self.tmp.mkdir()
        server_port = free_port()
        self.server = start_mlflow_server(self.tmp, server_port)
        self.relay = Relay(server_port)
        self.client = MlflowClient(f"http://127.0.0.1:{server_port}")
        self.env = two_nodes["env"]
        self.args = [f"mlflow.tracking_uri=http://127.0.0.1:{self.relay.port}", f"ray.storage_path={self.tmp}/ray",
                     f"output_dir={self.tmp}/out", f"tune.name={name}", f"ray.address={two_nodes['address']}",
                     "resources.cpus_per_worker=0.9", f"teacher.checkpoint={random_teacher(self.tmp, 'teacher')}", "teacher.allow_chance=true",
                     "tune.num_samples=2", "tune.max_concurrent=1", "tune.scheduler=none", "train.epochs=3",
                     "mlflow.retry_interval_s=1", *extra]
        self.lines: list[str] = []

    def start_driver(self, *more: str) -> None:
        self.lines = []
        self.driver = subprocess.Popen([sys.executable, "-m", "orchestrator.tune", *self.args, *more], cwd=REPO, env=self.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.driver.stdout), daemon=True)
        self.reader.start()

    def trial_runs(self) -> list:
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        return self.client.search_runs(experiments, filter_string="tags.`bkd.role` = 'trial'") if experiments else []

    def epochs_logged(self) -> int:
        return sum(len(self.client.get_metric_history(r.info.run_id, "val_acc")) for r in self.trial_runs())

    def wait_until(self, condition, what: str) -> None:
        deadline = time.time() + 300
        while time.time() < deadline and self.driver.poll() is None and not condition():
            time.sleep(0.2)
        assert condition(), f"{what} did not happen while the driver ran:\n" + self.output[-4000:]

    def cut_after_the_first_epoch(self) -> int:
        """Cut the relay once a trial has logged an epoch; returns the epochs logged then."""
        self.wait_until(lambda: self.epochs_logged() > 0, "a logged epoch")
        logged = self.epochs_logged()
        self.relay.cut()
        self.wait_until(lambda: self.said("is unreachable"), "the driver meeting the outage")
        return logged

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
        self.relay.cut()
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


def test_mlflow_outages_during_and_past_the_end_of_a_search_lose_no_write(two_nodes):
    """1. MLflow goes away once the first epoch is logged and comes back once the driver has noticed: the queued
    writes go out then, during the search. 2. It goes away again at once and stays away past the search's end
    (mlflow.end_wait_s=1): the search still succeeds, its unlogged writes wait in files beside trials.parquet, and
    `tune.resume=true` logs them."""
    # batches of 8: epochs of about 2 s, so that the second trial has yet to end when MLflow goes away again
    search = OutageSearch(two_nodes, "outages", ["mlflow.end_wait_s=1", "train.batch_size=8"])
    out = search.tmp / "out" / "outages"
    try:
        search.start_driver()
        before = search.cut_after_the_first_epoch()
        search.relay.restore()
        search.wait_until(lambda: search.said("reachable again"), "the queued writes going out")
        assert search.epochs_logged() > before, "the epochs trained during the outage reach MLflow when it is back"
        search.relay.cut()
        assert not search.said("trials 2/2 done"), "the trials ended before the second outage:\n" + search.output
        output = search.wait_driver()
        assert "were not logged" in output and "tune.resume=true" in output, output[-4000:]
        assert (out / "trials.parquet").is_file() and (out / "student.pt").is_file()
        spools = sorted(p.name for p in out.glob("mlflow_pending_*.jsonl"))
        assert spools == ["mlflow_pending_search.jsonl", "mlflow_pending_trials.jsonl"], spools
        search.relay.restore()
        search.start_driver("tune.resume=true")
        output = search.wait_driver()
        assert "that an earlier MLflow outage left" in output, output[-4000:]
        assert not list(out.glob("mlflow_pending_*")), "the replayed writes' files are removed"
        search.assert_everything_logged()
    finally:
        search.close()
