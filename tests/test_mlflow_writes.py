"""MLflowWriter against real stores: a write MLflow refuses is reported at once and left out (not
taken for an outage); an unreachable server is an outage; a trial's repeated epochs are logged once; a run
created by a try whose answer was lost gets its params."""
import json
import socket
import time

from mlflow.tracking import MlflowClient

from conftest import free_port, migrated_mlflow_store
from orchestrator.tracking.runs import answers
from orchestrator.tracking.writer import MLflowWriter, Write, is_outage


def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("bkd")


def test_a_refused_write_is_reported_and_left_out_not_queued(tmp_path, capsys):
    uri, client, exp = store(tmp_path)
    run_id = client.create_run(exp).info.run_id
    client.log_param(run_id, "best.lr", "0.1")
    writer = MLflowWriter(uri, exp, None, retry_interval_s=60, spool=tmp_path / "spool.jsonl")
    writer.submit(Write("params", {"run_id": run_id, "params": {"best.lr": "0.2"}}))  # MLflow refuses changing a param
    writer.submit(Write("tags", {"run_id": run_id, "tags": {"best.lr": "0.2"}}))
    writer.submit(Write("end", {"run_id": run_id, "status": "FINISHED"}))
    out = capsys.readouterr().out
    assert "MLflow refused a write (params" in out and "unreachable" not in out, out
    assert not writer.pending and not (tmp_path / "spool.jsonl").exists()
    run = client.get_run(run_id)
    assert run.data.params["best.lr"] == "0.1" and run.data.tags["best.lr"] == "0.2" and run.info.status == "FINISHED"


def test_an_unreachable_server_is_an_outage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    try:
        MlflowClient(f"http://127.0.0.1:{free_port()}").get_experiment_by_name("bkd")
    except Exception as exc:
        assert is_outage(exc), exc
    else:
        raise AssertionError("nothing listens on that port")


def test_a_writer_waiting_out_an_outage_probes_instead_of_retrying_and_keeps_every_write(tmp_path, monkeypatch):
    """While nothing listens, a try costs a TCP probe, not MLflow's HTTP retries, and every write
    submitted meanwhile is in the spool file (a resume replays that file)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # as orchestrator.tracking.runs.connect sets it
    uri = f"http://127.0.0.1:{free_port()}"
    assert not answers(uri) and answers(f"sqlite:///{tmp_path}/x.db")
    with socket.create_server(("127.0.0.1", 0)) as listening:
        assert answers(f"http://127.0.0.1:{listening.getsockname()[1]}")
    spool = tmp_path / "spool.jsonl"
    writer = MLflowWriter(uri, "0", None, retry_interval_s=0.01, spool=spool)
    writer.submit(Write("tags", {"run_id": "r", "tags": {"a": 1}}))  # the first try meets the outage
    assert writer.down
    start = time.monotonic()
    for step in range(1, 21):
        time.sleep(0.01)  # past retry_interval_s: every submit tries again
        writer.submit(Write("metrics", {"metrics": {"val_acc": step}, "step": step, "timestamp_ms": 0}, None))
    assert time.monotonic() - start < 3, "a try during the outage paid MLflow's HTTP retries"
    kept = [json.loads(line) for line in spool.read_text().splitlines()]
    assert len(kept) == 21 and kept[-1]["args"]["step"] == 20


def test_a_trial_restarted_from_an_older_checkpoint_logs_each_epoch_once(tmp_path):
    uri, client, exp = store(tmp_path)
    parent = client.create_run(exp).info.run_id
    writer = MLflowWriter(uri, exp, parent)
    metrics = lambda step, acc: Write("metrics", {"metrics": {"val_acc": acc}, "step": step, "timestamp_ms": 0}, "t1")  # noqa: E731
    writer.submit(Write("start", {"params": {"lr": 0.1}}, "t1"))
    for step in (1, 2, 3):
        writer.submit(metrics(step, 10.0 * step))
    resumed = MLflowWriter(uri, exp, parent)  # a new driver: it learns what the run has from MLflow
    resumed.submit(Write("start", {"params": {"lr": 0.1}}, "t1"))
    for step in (2, 3, 4):  # the last checkpoint was epoch 1
        resumed.submit(metrics(step, 99.0))
    history = client.get_metric_history(writer.run_ids["t1"], "val_acc")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 99.0)]


def test_commands_starting_together_on_a_new_store_share_one_experiment(tmp_path):
    """Six clients look for the experiment at the same moment and all find it missing: one makes it, the others use
    it (MLflow refuses their own creates), none fails."""
    import threading

    from orchestrator.tracking.runs import connect

    for attempt in range(3):  # the race is lost in most rounds: three catch a regression
        uri = f"sqlite:///{migrated_mlflow_store(tmp_path / f'race{attempt}.db')}"
        MlflowClient(uri).search_experiments()  # the store opened: the clients then meet at the experiment
        barrier, got, errors = threading.Barrier(6), [], []

        def start() -> None:
            barrier.wait()
            try:
                got.append(connect(uri, "bkd")[1])
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=start) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and len(got) == 6 and len(set(got)) == 1, errors


def test_a_trials_run_created_by_a_try_whose_answer_was_lost_still_gets_its_params(tmp_path):
    """The server created the trial's run, then the connection dropped before its answer: the retry (or a resumed
    driver) finds the run by its trial tag, logs its params once and makes no second run."""
    uri, client, exp = store(tmp_path)
    parent = client.create_run(exp).info.run_id
    lost = client.create_run(exp, tags={"mlflow.parentRunId": parent, "bkd.trial_id": "t1", "bkd.role": "trial"})
    writer = MLflowWriter(uri, exp, parent)
    writer.submit(Write("start", {"params": {"lr": 0.1, "temperature": 4}}, "t1"))
    writer.submit(Write("metrics", {"metrics": {"val_acc": 50.0}, "step": 1, "timestamp_ms": 0}, "t1"))
    (run,) = client.search_runs([exp], filter_string="tags.`bkd.trial_id` = 't1'")
    assert run.info.run_id == lost.info.run_id and run.data.params == {"lr": "0.1", "temperature": "4"}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]


def test_the_logged_student_serves_any_batch_size_through_pyfunc(tmp_path):
    """The best student is logged from a one-image example as a search logs it; pyfunc predicts batches
    of 3 and 1 with the model's own logits."""
    import mlflow.pyfunc
    import numpy as np
    import torch

    from bkd_core import models
    from orchestrator.tracking.mlflow_models import log_student_model

    uri, client, exp = store(tmp_path)
    run_id = client.create_run(exp).info.run_id
    torch.manual_seed(0)
    student = models.create("tiny_cnn", 10, 1).eval()
    model_uri = log_student_model(uri, run_id, student, torch.zeros(1, 1, 8, 8), None)
    served = mlflow.pyfunc.load_model(model_uri)
    for n in (3, 1):
        x = torch.randn(n, 1, 8, 8)
        with torch.no_grad():
            expected = student(x).numpy()
        got = np.asarray(served.predict(x.numpy()))
        assert got.shape == (n, 10) and np.allclose(got, expected, atol=1e-5)
