"""`ray job submit` of `python -m orchestrator.tune` to a local `ray start --head` cluster."""
import os
import re
import subprocess

import pytest
from conftest import BIN, REPO, free_port
from mlflow.tracking import MlflowClient
from test_parquet_data import prepare, write_folder

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def head_node():
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    gcs, dashboard = free_port(), free_port()
    subprocess.run([BIN / "ray", "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
                    f"--dashboard-port={dashboard}", "--disable-usage-stats"], check=True, env=env, capture_output=True, timeout=180)
    yield f"http://127.0.0.1:{dashboard}", env
    subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_job_submit_succeeds(head_node, tmp_path):
    address, env = head_node
    overrides = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage_path={tmp_path}/ray",
                 f"output_dir={tmp_path}/out", "tune.name=job", "tune.num_samples=2", "train.epochs=1", "teacher.epochs=1"]
    submit = subprocess.run([BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--no-wait",
                             "--", "python", "-m", "orchestrator.tune", *overrides],
                            env=env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stderr
    job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)
    logs = subprocess.run([BIN / "ray", "job", "logs", "--address", address, "--follow", job_id],
                          env=env, capture_output=True, text=True, timeout=600)
    status = subprocess.run([BIN / "ray", "job", "status", "--address", address, job_id],
                            env=env, capture_output=True, text=True, timeout=60)
    assert f"Job '{job_id}' succeeded" in status.stdout, logs.stdout[-3000:] + status.stdout
    assert "mlflow ui --backend-store-uri" in logs.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("bkd")
    children = client.search_runs([exp.experiment_id], filter_string="tags.`bkd.role` = 'trial'")
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert (tmp_path / "out" / "job" / "trials.parquet").is_file()


def test_a_command_run_on_the_head_joins_its_cluster_without_ray_num_cpus(head_node, tmp_path):
    """A cluster started by `ray start` is joined by a later command on the same machine (Ray's rule for a null
    ray.address); Ray refuses num_cpus when it joins, so the setting is left out with a line that says so."""
    _, env = head_node
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    done = prepare(f"source={write_folder(tmp_path / 'images', per_class=2)}", f"output={tmp_path}/shards", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ray.num_cpus=2 is left out: joining the Ray cluster already running" in done.stderr
    assert "Connecting to existing Ray cluster" in done.stderr and (tmp_path / "shards" / "classes.json").is_file()
