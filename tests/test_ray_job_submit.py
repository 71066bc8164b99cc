"""`ray job submit` of `python -m orchestrator.tune` to a local `ray start --head` cluster."""
import os
import re
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from conftest import BIN, REPO, free_port

pytestmark = pytest.mark.ray


@pytest.fixture
def head_node(tmp_path):
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
