"""Streamed data (data=parquet): `orchestrator.prepare` -> Parquet shards -> `orchestrator.tune` trials
fed by Ray Data on a real local Ray cluster; a two-worker Train run whose workers share every epoch;
memory flat in the dataset's size; bad input refused before Ray starts."""
import io
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.train
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.train.torch import TorchTrainer
from test_parquet_data import CLASSES, prepare, prepare_here, write_folder, write_with_corrupt_rows

from bkd_core import models
from bkd_core.data import ParquetImages
from conftest import BIN, free_port, write_unlearnable_test_folder
from orchestrator import tune as tune_entry
from orchestrator.config.schema import ParquetData
from orchestrator.console.cli import entry_point
from orchestrator.data.streaming import StreamLoader, make_dataset, stream_loaders, trainer_datasets

pytestmark = pytest.mark.ray


FOLDERS = {"train": "train", "val": "val", "test": "val"}  # write_shards' layout: no held-out val, val/ is the test split


def write_shards(root, count: int, classes: int, size=(400, 300), per_shard: int = 256) -> None:
    """Shards in the layout of prepare before held-out validation (train/ and val/, no splits.json),
    made directly: ``count`` JPEGs whose label is their row index mod ``classes`` (with classes ==
    count, a label names its image)."""
    rng = np.random.default_rng(0)
    pool = []
    for i in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
        pool.append(buffer.getvalue())
    for split, n in (("train", count), ("val", max(8, count // 10))):
        (root / split).mkdir(parents=True)
        for start in range(0, n, per_shard):
            rows = range(start, min(n, start + per_shard))
            table = pa.table({"image": [pool[i % len(pool)] for i in rows], "label": [i % classes for i in rows]})
            pq.write_table(table, root / split / f"part-{start:06d}.parquet", row_group_size=64)
    (root / "classes.json").write_text(json.dumps([f"class {i}" for i in range(classes)]))


@pytest.fixture(scope="module")
def shards(tmp_path_factory, bucket_ray):
    """The test folder of test_parquet_data (odd sizes, grayscale, CMYK, PNG, a truncated file) through prepare."""
    tmp = tmp_path_factory.mktemp("stream")
    done = prepare_here(f"source={write_folder(tmp / 'images')}", f"output={tmp / 'shards'}", "max_side=96")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "shards"


@pytest.fixture(scope="module")
def bucket_ray(bucket):
    """Started after the S3 server: its workers inherit AWS_*, as a cluster's nodes have their credentials."""
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)  # nothing here reads it
    yield
    ray.shutdown()


def test_tune_streams_shards_into_trials_and_keeps_cpus_free_for_their_data(shards, bucket_ray, tmp_path, capsys):
    torch.manual_seed(0)
    torch.save(models.create("tiny_resnet", len(CLASSES), 3).state_dict(), tmp_path / "teacher.pt")  # no teacher run
    argv = [f"teacher.checkpoint={tmp_path / 'teacher.pt'}", "teacher.allow_chance=true", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out",
            "tune.name=stream", "data=parquet", f"data.root={shards}", "data.image_size=32", "tune.num_samples=2",
            "train.epochs=2", "teacher.epochs=1", "train.batch_size=6", "teacher.batch_size=6",
            "tune.scheduler=none"]  # every trial trains both epochs: ASHA's cut at epoch 1 would depend on the draw
    assert entry_point(tune_entry.run, argv) == 0
    # 2 CPUs: a trial's own CPU and its data's CPU; tune.max_concurrent=2 is lowered so the data is never starved
    assert "[bkd] at most 1 trials at once (tune.max_concurrent=2)" in capsys.readouterr().out
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("bkd")
    trials = client.search_runs([exp.experiment_id], filter_string="tags.`bkd.role` = 'trial'")
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    for run in trials:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
        assert run.data.metrics["val_acc"] >= 0 and run.data.params["data"] == "parquet"
    rows = pq.read_table(tmp_path / "out" / "stream" / "trials.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "FINISHED" and r["epochs"] == 2 for r in rows)
    assert all(r["test_acc"] is not None for r in rows), "every trial scores its final weights on the test split"


def test_a_streamed_search_selects_on_the_held_out_split_not_on_the_test_split(bucket_ray, tmp_path):
    """Test labels shuffled: a search that selects on data held out of training sees its trials learn
    (val_acc far above chance) and reports test_acc at chance; on the old protocol both were the test's."""
    folder = write_unlearnable_test_folder(tmp_path / "images", train_per_class=30)
    done = prepare_here(f"source={folder}", f"output={tmp_path / 'shards'}", "val_fraction=0.2")
    assert done.returncode == 0, done.stderr[-3000:]
    teacher = tmp_path / "teacher.pt"  # the student alone trains (search=none): no teacher run is needed
    torch.save(models.create("tiny_resnet", 3, 3).state_dict(), teacher)
    argv = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out",
            "tune.name=honest", "data=parquet", f"data.root={tmp_path / 'shards'}", "data.image_size=16", "tune.num_samples=1",
            "train.epochs=3", "train.batch_size=8", "fixed.lr=0.1", "search=none", f"teacher.checkpoint={teacher}", "teacher.allow_chance=true"]
    assert entry_point(tune_entry.run, argv) == 0
    (row,) = pq.read_table(tmp_path / "out" / "honest" / "trials.parquet").to_pylist()
    assert row["val_acc"] > 70 and row["test_acc"] < 60, row  # chance: 33 %


def test_two_workers_share_every_training_image_exactly_once_per_epoch(bucket_ray, tmp_path):
    write_shards(tmp_path / "shards", count=48, classes=48, size=(64, 48), per_shard=16)
    data_cfg = ParquetData(root=str(tmp_path / "shards"), image_size=16, shuffle_buffer=8)

    def loop(config):  # the worker side of a multi-worker trial: its share of the trainer's datasets
        rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
        train, _, _ = stream_loaders(config["data"], {"train": 48, "val": 8, "test": 8}, FOLDERS, 4, torch.device("cpu"), 0, False, world,
                                     {split: ray.train.get_dataset_shard(split) for split in ("train", "val", "test")})
        for epoch in (1, 2):
            train.set_epoch(epoch)
            labels = [int(v) for _, y in train for v in y]
            (Path(config["out"]) / f"{epoch}-{rank}.json").write_text(json.dumps(labels))

    trainer = TorchTrainer(loop, train_loop_config={"data": data_cfg, "out": str(tmp_path)},
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),  # 1 CPU left for the data
                           run_config=ray.train.RunConfig(storage_path=str(tmp_path / "ray")), **trainer_datasets(data_cfg, FOLDERS, 0))
    assert trainer.fit().error is None
    for epoch in (1, 2):
        rank0, rank1 = (json.loads((tmp_path / f"{epoch}-{rank}.json").read_text()) for rank in (0, 1))
        assert len(rank0) == len(rank1) == 24 and sorted(rank0 + rank1) == list(range(48)), (rank0, rank1)


def test_the_ray_data_feed_drops_and_counts_a_corrupt_row(bucket_ray, tmp_path):
    write_with_corrupt_rows(tmp_path / "shards", good=120, corrupt=1)
    data_cfg = ParquetData(root=str(tmp_path / "shards"), image_size=16, shuffle_buffer=0)
    loader = StreamLoader(make_dataset(data_cfg, FOLDERS, "train"), 121, 16, False, torch.device("cpu"))
    assert sum(y.shape[0] for _, y in loader) == 120 and loader.skipped == 1


def test_undecodable_rows_are_all_counted_when_ray_collates_in_threads():
    """Ray collates a stream's batches in a pool of threads: every dropped row is counted (an unlocked count lost
    more than half of them here, and a trial on corrupt shards could train on past the 1 % budget)."""
    import threading

    from orchestrator.data.streaming import DropUndecodable

    dropped = DropUndecodable(combine_chunks=True)
    batch = pa.table({"image": pa.array(np.zeros((8, 12), dtype=np.uint8).tolist()), "label": pa.array(np.arange(8)),
                      "bad": pa.array([1, 0, 0, 0, 0, 0, 0, 1], pa.uint8())})
    start = threading.Barrier(8)

    def collate() -> None:
        start.wait()
        for _ in range(300):
            dropped(batch)

    threads = [threading.Thread(target=collate) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert dropped.skipped == 8 * 300 * 2


def test_a_trial_on_corrupt_shards_fails_with_one_line_naming_the_cause(bucket_ray, tmp_path, capsys):
    write_with_corrupt_rows(tmp_path / "shards", good=60, corrupt=6)
    torch.manual_seed(0)
    torch.save(models.create("tiny_resnet", len(CLASSES), 3).state_dict(), tmp_path / "teacher.pt")
    argv = [f"teacher.checkpoint={tmp_path / 'teacher.pt'}", "teacher.allow_chance=true", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
            f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out", "data=parquet", f"data.root={tmp_path / 'shards'}",
            "data.image_size=16", "tune.num_samples=1", "train.epochs=1", "train.batch_size=8", "tune.max_failures=0", "search=kd"]
    code = entry_point(tune_entry.run, argv)
    captured = capsys.readouterr()
    if code != 1:  # what the trial saw of the corrupt rows
        client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
        metrics = [r.data.metrics for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
        raise AssertionError(f"exit {code}: the trial trained on; its runs' metrics: {metrics}\n{captured.out[-3000:]}")
    failed = [line for line in captured.out.splitlines() if " FAILED: " in line]
    assert len(failed) == 1 and "could not be decoded" in failed[0] and "error.txt" in failed[0], captured.out[-3000:]
    assert "Trial task failed for trial" not in captured.out + captured.err


def rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory now (Linux): all of it (VmRSS), its own heap (RssAnon), or the
    shared memory it has touched (RssShmem: the object store's pages it read)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(f"{kind}:"))
    return int(line.split()[1]) / 1024


def test_memory_stays_flat_while_an_epoch_streams(bucket_ray, tmp_path):
    """3,000 images at 160 px (220 MB decoded as uint8): the consumer's own memory (RssAnon) in the last
    quarter of the epoch exceeds the second quarter's by less than half of that (measured: a streaming
    epoch 0-60 MB, malloc keeping a few 20-MB batches; a loader that kept its batches ~750 MB), and the
    object store does not spill. VmRSS would also count the object store's shared pages the process
    has read (~130 MB by an epoch's end, bounded by the store), which is not a leak."""
    write_shards(tmp_path / "large", count=3000, classes=10)
    data_cfg = ParquetData(root=str(tmp_path / "large"), image_size=160, shuffle_buffer=256)
    loader = StreamLoader(make_dataset(data_cfg, FOLDERS, "train"), 3000, 64, True, torch.device("cpu"), 256)
    samples = []
    for x, _ in loader:
        samples.append(rss_mb("RssAnon"))
    decoded_mb = 3000 * 3 * 160 * 160 / 2**20
    quarter = len(samples) // 4
    assert len(samples) == 3000 // 64
    # medians of the 2nd and the 4th quarter (batches come and go: single samples vary by ~60 MB)
    growth = statistics.median(samples[3 * quarter:]) - statistics.median(samples[quarter:2 * quarter])
    assert growth < 0.5 * decoded_mb, f"RssAnon by batch (MB): {[round(s) for s in samples]}"
    summary = ray._private.internal_api.memory_summary(stats_only=True)
    assert "Spilled" not in summary or "Spilled 0 MiB" in summary, summary


@pytest.mark.parametrize("override, key, fragment", [
    (["data.root={missing}"], "data.root", "does not exist"),
    (["data.root={empty}"], "data.root", "no Parquet shards"),
    (["data=fashion_mnist", "data.root={empty}", "data.in_memory=false"], "data.in_memory", "orchestrator.prepare"),
    (["data.root={empty}", "data.cpus_per_trial=0"], "data.cpus_per_trial", "CPUs > 0"),
])
def test_bad_streaming_input_is_refused_before_ray(override, key, fragment, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out",
            "data=parquet"] + [o.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for o in override]
    before = ray.is_initialized()
    assert entry_point(tune_entry.run, argv) == 2
    err = capsys.readouterr().err
    assert f"configuration error in `{key}`" in err and fragment in err, err
    assert ray.is_initialized() == before


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A local S3-compatible server (moto) with a bucket; AWS_* point this process and its children at it."""
    moto = BIN / "moto_server"
    if not moto.exists():
        pytest.skip("moto[server] is not installed (pip install -e '.[test]')")
    port = free_port()
    server = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import boto3

        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3").create_bucket(Bucket="bkd-data")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield "s3://bkd-data"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_prepare_writes_to_a_bucket_and_trials_stream_from_it(bucket, bucket_ray, tmp_path):
    uri = f"{bucket}/shards"
    done = prepare(f"source={write_folder(tmp_path / 'images')}", f"output={uri}", "max_side=64", env=dict(os.environ))  # a real command
    assert done.returncode == 0, done.stderr[-3000:]
    assert ParquetImages(uri, "train").classes == CLASSES
    data_cfg = ParquetData(root=uri, image_size=24, shuffle_buffer=4)
    rows = {split: len(ParquetImages(uri, split)) for split in ("train", "val", "test")}
    assert rows["train"] + rows["val"] == 18 and rows["test"] == 6
    train, val, test = stream_loaders(data_cfg, rows, {s: s for s in rows}, 4, torch.device("cpu"), 0, False)
    assert sum(y.shape[0] for _, y in train) == rows["train"] // 4 * 4 and sum(y.shape[0] for _, y in test) == 6
    assert sum(y.shape[0] for _, y in val) == rows["val"]
    x, _ = next(iter(test))
    assert x.shape == (6, 3, 24, 24) and x.dtype == torch.float32  # evaluation batches: max(batch, 256)
    argv = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out",
            "data=parquet", f"data.root={bucket}/nothing-here"]
    assert entry_point(tune_entry.run, argv) == 2


def test_a_val_fraction_the_shards_were_not_prepared_with_is_refused(shards, tmp_path, capsys):
    argv = [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", f"ray.storage_path={tmp_path}/ray", f"output_dir={tmp_path}/out",
            "data=parquet", f"data.root={shards}", "data.val_fraction=0.2"]
    assert entry_point(tune_entry.run, argv) == 2
    err = capsys.readouterr().err
    assert "configuration error in `data.val_fraction`" in err and "prepared with val_fraction=0.1" in err, err
    assert "val_fraction=0.2" in err and "orchestrator.prepare" in err


def test_an_unreachable_bucket_is_one_paragraph_and_exit_2(tmp_path):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_EC2_METADATA_DISABLED": "true"}
    done = prepare(f"source={write_folder(tmp_path / 'images', per_class=1)}", "output=s3://bkd-nowhere/shards", env=env)
    assert done.returncode == 2 and "configuration error in `output`" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_imagenet_recipe_composes_over_shards_without_decoding_them(tmp_path):
    from orchestrator.config.compose import compose
    from orchestrator.config.job import validate

    write_shards(tmp_path / "shards", count=1100, classes=4, size=(80, 60))  # more than one batch of 512
    job = validate(compose(["recipe=imagenet", f"data.root={tmp_path / 'shards'}", f"ray.storage_path={tmp_path}/ray",
                            f"output_dir={tmp_path}/out"]))
    assert (job.teacher_model, job.student_model, job.num_classes) == ("ResNet34", "ResNet18", 4)
    # shards written before held-out validation: val/ is the test split, and the search selects on it (with a warning)
    assert job.dataset.rows == {"train": 1100, "val": 110, "test": 110} and job.dataset.shape == [3, 224, 224]
    assert job.selects_on_test and job.dataset.folders == {"train": "train", "val": "val", "test": "val"}
    t = job.cfg.train
    assert (t.epochs, t.batch_size, t.milestones, t.weight_decay, job.cfg.fixed["lr"]) == (100, 512, [0.3, 0.6, 0.9], 1e-4, 0.2)
