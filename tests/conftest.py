import gzip
import os
import socket
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

# Ray 2.60 local clusters use token authentication; a driver joining a `ray start` cluster must say so
# before ray is imported (the mode is read once per process).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")  # as orchestrator.worker.runtime.init_ray sets it

REPO = Path(__file__).resolve().parents[1]
FASHION = REPO.parent / "shared" / "data" / "fashion-mnist"
BIN = Path(sys.executable).parent  # the environment's `ray` and `python`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_idx(root: Path, n_train: int = 80, n_test: int = 32, seed: int = 0) -> Path:
    """Write a small MNIST-layout IDX gz dataset whose class is the brightest quadrant."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, (y % 4) * 7 : (y % 4) * 7 + 7, (y // 4) * 9 : (y // 4) * 9 + 9] = 250
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
            fh.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return root


@pytest.fixture
def idx_root(tmp_path):
    return write_idx(tmp_path / "idx")


def fashion_root() -> Path:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not found at {FASHION} (a fresh clone has no ../shared)")
    return FASHION


def write_unlearnable_test_folder(root: Path, classes: int = 3, train_per_class: int = 24, test_per_class: int = 30,
                                  seed: int = 0) -> Path:
    """An image folder whose class is the image's dominant colour channel in train/, and whose val/
    (the test split) has the same kind of images under shuffled labels: a model can learn train/ and
    score high on any split held out of it, and can only score chance on the test split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", test_per_class)):
        for label in range(classes):
            (root / split / f"class{label}").mkdir(parents=True, exist_ok=True)
        for label in range(classes):
            for i in range(per_class):
                pixels = rng.integers(0, 70, (20, 20, 3), dtype=np.uint8)
                pixels[..., label] = 230
                folder = label if split == "train" else int(rng.integers(0, classes))
                Image.fromarray(pixels).save(root / split / f"class{folder}" / f"{label}-{i}.png")
    return root


RAY_OWN_LINES = ("Reporting training result", "TrainingReport(", "core_worker.cc", "Progress bars disabled",
                 "Token authentication is enabled", "Exception ignored in", "Tuner.restore(", "TensorBoard",
                 "requirements_utils", "Running Dataset", "PlacementGroupCleaner", "State API", "Stop signal received",
                 "snapshotting has been triggered", "Traceback")


def assert_console_is_bkds(console: str) -> None:
    """What a search printed: bkd's own lines, none of Ray's, Tune's, MLflow's or torch's own."""
    for fragment in RAY_OWN_LINES:
        assert fragment not in console, f"{fragment!r} in the console:\n{console[-3000:]}"



_TEMPLATE: list[Path] = []


def migrated_mlflow_store(target: Path) -> Path:
    """``target`` made an empty MLflow sqlite store with its schema, as MLflow makes one on first use, copied
    from one made once per session (MLflow's migrations take 1-2 s a store, in every command that meets a
    new one). Returns ``target``."""
    import shutil
    import tempfile

    if not _TEMPLATE:
        import atexit

        from mlflow.tracking import MlflowClient

        folder = tempfile.mkdtemp(prefix="bkd-mlflow-template-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = Path(folder) / "mlflow.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()
        _TEMPLATE.append(path)
    if not target.exists():
        shutil.copyfile(_TEMPLATE[0], target)
    return target


@pytest.fixture(autouse=True)
def _migrated_mlflow_store(request) -> None:
    """Every test's ``tmp_path/mlflow.db`` starts as the migrated empty store (``migrated_mlflow_store``)."""
    if "tmp_path" in request.fixturenames:
        migrated_mlflow_store(request.getfixturevalue("tmp_path") / "mlflow.db")


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process local Ray cluster (2 CPUs, no dashboard: nothing reads it) for every module that trains in
    this process; those modules run last, together (``pytest_collection_modifyitems``), so it starts once."""
    import ray

    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


def pytest_collection_modifyitems(config, items) -> None:
    """Whole modules that use the shared ``ray_cluster`` move to the end, in their order: the modules before them
    (their own `ray start` clusters and subprocess commands) run with no Ray in this process, as they expect."""
    shared = {item.module.__name__ for item in items if "ray_cluster" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: item.module.__name__ in shared)
