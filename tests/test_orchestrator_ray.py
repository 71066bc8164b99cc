"""End to end on a real local Ray cluster, real Optuna and a real MLflow sqlite store."""
import json
import re

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from bkd_core import models
from bkd_core.data import BatchLoader, load
from bkd_core.train import Supervised, evaluate
from conftest import migrated_mlflow_store, write_unlearnable_test_folder
from orchestrator import train as train_entry
from orchestrator import tune as tune_entry
from orchestrator.console.cli import entry_point

pytestmark = pytest.mark.ray



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bkd")
    migrated_mlflow_store(ws / "mlflow.db")
    return ws


def common(ws, name):
    return [f"mlflow.tracking_uri=sqlite:///{ws}/mlflow.db", f"ray.storage_path={ws}/ray", f"output_dir={ws}/out",
            f"tune.name={name}", "teacher.epochs=2"]


def runs(ws, role):
    client = MlflowClient(f"sqlite:///{ws}/mlflow.db")
    exp = client.get_experiment_by_name("bkd")
    return client, client.search_runs([exp.experiment_id], filter_string=f"tags.`bkd.role` = '{role}'")


def student_accuracy(path) -> float:
    """Test accuracy (%) of a saved digits student (the default pair's tiny_cnn)."""
    splits = load("digits")
    model = models.create("tiny_cnn", splits.num_classes, splits.in_channels)
    model.load_state_dict(torch.load(path, weights_only=True))
    loader = BatchLoader(splits.test, 256, train=False)
    return evaluate(Supervised(model), loader)["val_acc"]


def test_tune_end_to_end(ray_cluster, workspace, capsys):
    # ASHA off here so that every trial runs its epochs; test_asha_stops_bad_trials covers ASHA.
    argv = common(workspace, "e2e") + ["tune.num_samples=3", "tune.max_concurrent=2", "train.epochs=2", "tune.scheduler=none"]
    assert entry_point(tune_entry.run, argv) == 0
    out = capsys.readouterr().out

    client, (parent,) = runs(workspace, "search")
    _, teachers = runs(workspace, "teacher")
    _, children = runs(workspace, "trial")
    assert len(teachers) == 1 and teachers[0].info.status == "FINISHED"
    assert "teacher/teacher.pt" in {a.path for a in client.list_artifacts(teachers[0].info.run_id, "teacher")}
    assert [m.step for m in client.get_metric_history(teachers[0].info.run_id, "val_acc")] == [1, 2]
    assert (workspace / "out" / "e2e" / "teacher.pt").is_file(), "the trained teacher is kept beside the results"
    assert len(children) == 3 and parent.info.status == "FINISHED"
    final_per_child = {}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        p = child.data.params
        assert {"temperature", "alpha", "beta", "gamma", "logit_loss", "cuts", "lr", "epochs", "pair", "data"} <= set(p)
        cuts = p["cuts"].split(",")
        assert {f"w_{c}" for c in cuts} == {k for k in p if k.startswith("w_")}
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [m.step for m in history] == [1, 2]
        assert {f"val_acc_stone_{c}" for c in cuts} <= set(child.data.metrics)
        assert {"train_loss", "train_loss_task", "train_loss_distill", "throughput_img_s"} <= set(child.data.metrics)
        final_per_child[child.data.tags["bkd.trial_id"]] = history[-1].value

        assert "test_acc" in child.data.metrics and child.data.params["val_images"] == "134"
    best_trial = max(final_per_child, key=final_per_child.get)  # ranked by the final epoch: student.pt's weights
    assert parent.data.metrics["best_val_acc"] == pytest.approx(final_per_child[best_trial])
    assert parent.data.tags["bkd.selection"] == "val" and {"teacher_val_acc", "teacher_test_acc"} <= set(parent.data.metrics)
    assert {k: parent.data.params[k] for k in ("train_images", "val_images", "test_images")} == \
        {"train_images": "1214", "val_images": "134", "test_images": "449"}
    assert teachers[0].data.params["val_images"] == "134" and "test_acc" in teachers[0].data.metrics
    importances = {k: v for k, v in parent.data.metrics.items() if k.startswith("importance.")}
    assert importances and sum(importances.values()) == pytest.approx(1.0), parent.data.metrics
    assert "parameter importance for val_acc" in out
    assert parent.data.tags["best.trial_id"] == best_trial and parent.data.params["train.epochs"] == "2"
    best_row = next(r for r in pq.read_table(workspace / "out" / "e2e" / "trials.parquet").to_pylist() if r["trial_id"] == best_trial)
    assert parent.data.metrics["best_test_acc"] == pytest.approx(best_row["test_acc"])
    assert student_accuracy(workspace / "out" / "e2e" / "student.pt") == pytest.approx(best_row["test_acc"], abs=0.01)
    assert "selection on the held-out val split (134 images" in out and f"val_acc {best_row['val_acc']:.2f}, test_acc" in out
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.parquet", "config.json", "best_student", "search.png"} <= artifacts
    assert (workspace / "out" / "e2e" / "search.png").read_bytes()[:4] == b"\x89PNG"

    table = pq.read_table(workspace / "out" / "e2e" / "trials.parquet").to_pylist()
    assert len(table) == 3
    assert {"trial_id", "status", "temperature", "cuts", "best_val_acc", "val_acc", "test_acc", "wall_time_s", "started_at",
            "mlflow_run_id"} <= set(table[0])
    assert {r["trial_id"] for r in table} == set(final_per_child)
    assert all(r["status"] == "FINISHED" for r in table)
    assert all(r["wall_time_s"] is not None and r["wall_time_s"] > 0 for r in table), "Tune's time of each trial"
    pids = {json.loads(line)["pid"] for f in (workspace / "ray" / "e2e").glob("*/result.json") for line in f.read_text().splitlines()}
    assert 1 <= len(pids) <= 2, "3 trials, 2 at a time: tune.reuse_actors (default) trains the third in a finished trial's process"

    first_row = re.search(r"^1\s+(\S+)\s+FINISHED", out, flags=re.M)
    assert first_row and first_row.group(1) == best_trial
    assert "mlflow ui --backend-store-uri" in out
    assert (workspace / "out" / "e2e" / "student.pt").is_file()


def test_asha_stops_bad_trials_and_the_search_finishes(ray_cluster, workspace, capsys):
    """The default scheduler: a trial ASHA stops ends cleanly (no leaked resources) and the search finishes.

    One trial at a time and a seeded search, so that the rungs fill in a fixed order: three good
    trials, then a bad one that ASHA stops after epoch 1 (chance-level trials tie, and ties go on).
    """
    argv = common(workspace, "asha") + ["search=kd", "+search.params.lr.choices=[1.0e-5,0.1]", "tune.num_samples=4",
                                        "tune.max_concurrent=1", "train.epochs=3", "tune.seed=1"]
    assert entry_point(tune_entry.run, argv) == 0
    rows = pq.read_table(workspace / "out" / "asha" / "trials.parquet").to_pylist()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"FINISHED", "STOPPED_EARLY"}, rows
    assert all(r["epochs"] < 3 for r in rows if r["status"] == "STOPPED_EARLY")
    assert all(r["test_acc"] is not None for r in rows), "a stopped trial scored the weights it ended with on test"
    assert all(r["epochs"] == 3 for r in rows if r["status"] == "FINISHED")
    client, children = runs(workspace, "trial")
    stopped = [c for c in children if c.data.tags["bkd.trial_id"] in {r["trial_id"] for r in rows if r["status"] == "STOPPED_EARLY"}]
    assert stopped and all("stopped early by the scheduler" in c.data.tags["bkd.end_reason"] for c in stopped)


def test_a_search_selects_on_the_held_out_split_and_reports_chance_on_an_unlearnable_test_split(ray_cluster, tmp_path, capsys):
    """Its own workspace: its teachers (another dataset) are not the shared workspace's."""
    folder, ws = write_unlearnable_test_folder(tmp_path / "images"), tmp_path / "ws"
    argv = common(ws, "honest") + ["data=image_folder", f"data.root={folder}", "data.image_size=8", "data.val_fraction=0.25",
                                          "tune.num_samples=2", "train.epochs=3", "teacher.epochs=3", "train.batch_size=16",
                                          "teacher.batch_size=16", "search=kd", "tune.scheduler=none"]
    assert entry_point(tune_entry.run, argv) == 0
    rows = pq.read_table(ws / "out" / "honest" / "trials.parquet").to_pylist()
    best = rows[0]
    assert best["val_acc"] > 70 and best["test_acc"] < 60, rows  # chance: 33 %
    # the old protocol (data.val_fraction=0) selects on the test split: warned, tagged, and its figure is the test's
    argv = common(ws, "on-test") + ["data=image_folder", f"data.root={folder}", "data.image_size=8", "data.val_fraction=0",
                                           "tune.num_samples=1", "train.epochs=1", "teacher.epochs=1", "train.batch_size=16",
                                           "teacher.batch_size=16", "search=kd", "teacher.allow_chance=true"]  # the test split is unlearnable
    assert entry_point(tune_entry.run, argv) == 0
    (row,) = pq.read_table(ws / "out" / "on-test" / "trials.parquet").to_pylist()
    assert row["val_acc"] == row["test_acc"]
    out = capsys.readouterr().out
    assert "warning: selection on the TEST split" in out and out.count("selection on the TEST split") == 2  # start, summary
    client, parents = runs(ws, "search")
    parent = next(p for p in parents if p.info.run_name == "on-test")
    assert parent.data.tags["bkd.selection"] == "test" and parent.data.params["val_images"] == "0"


def test_train_two_workers_matches_one(ray_cluster, workspace, capsys):
    """Also checkpoint throttling: 0.5-s epochs save only the last epoch's checkpoint by default
    (train.checkpoint_min_interval_s=30); with 0 every epoch saves one (the last two are kept)."""
    accs, checkpoints = {}, {}
    for workers, min_interval in ((1, 30), (2, 0)):
        argv = common(workspace, f"train-{workers}w") + [f"resources.workers_per_trial={workers}", "resources.cpus_per_worker=0.9", "train.epochs=4",
                                                          "fixed.lr=0.1", "fixed.cuts=[1,3]", f"train.checkpoint_min_interval_s={min_interval}"]
        assert entry_point(train_entry.run, argv) == 0
        table = pq.read_table(workspace / "out" / f"train-{workers}w" / "trials.parquet").to_pylist()
        assert len(table) == 1 and table[0]["cuts"] == "1,3"
        accs[workers] = table[0]["val_acc"]
        checkpoints[workers] = [p for p in (workspace / "ray").glob(f"train-{workers}w*/**/checkpoint_*") if p.is_dir()]
    assert len(checkpoints[1]) == 1 and len(checkpoints[2]) == 2, checkpoints
    out = capsys.readouterr().out
    assert "reusing teacher from MLflow run" in out  # same teacher config: trained once
    _, teachers = runs(workspace, "teacher")
    assert len(teachers) == 1
    assert accs[1] > 60 and abs(accs[1] - accs[2]) < 8, accs


def test_more_cpus_than_the_cluster_has_is_refused(ray_cluster, workspace, capsys):
    argv = common(workspace, "too-big") + ["resources.workers_per_trial=2"]
    assert entry_point(train_entry.run, argv) == 2
    assert "configuration error in `resources.cpus_per_worker`" in capsys.readouterr().err


def test_more_gpus_than_the_cluster_has_is_refused(ray_cluster, workspace, capsys):
    argv = common(workspace, "gpu") + ["resources.use_gpu=true", "resources.gpus_per_worker=0.5"]
    assert entry_point(tune_entry.run, argv) == 2
    err = capsys.readouterr().err
    assert "configuration error in `resources.use_gpu`" in err and "the cluster has 0" in err


def test_a_diverging_teacher_ends_the_command_with_one_line_and_its_run_failed(ray_cluster, tmp_path, capsys):
    """The teacher's loss becomes NaN: no retry (none would converge), exit 1 with one line naming the key to
    change, the teacher's run FAILED with that reason, no search started."""
    argv = common(tmp_path, "nan-teacher") + ["teacher.lr=1e9", "teacher.epochs=3"]
    assert entry_point(tune_entry.run, argv) == 1
    err = capsys.readouterr().err
    assert "[bkd] the teacher's training loss became NaN/inf in epoch 1: it diverged; lower teacher.lr" in err, err
    assert "Traceback" not in err
    _, (teacher,) = runs(tmp_path, "teacher")
    assert teacher.info.status == "FAILED" and "lower teacher.lr" in teacher.data.tags["bkd.error"]
    assert not runs(tmp_path, "search")[1], "no search after a failed teacher"
    assert not list((tmp_path / "ray").glob("teacher-*/*/error.txt")), "a diverged teacher was retried"
