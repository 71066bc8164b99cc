"""The held-out validation split: disjoint from what trains, stratified by class, chosen by its own
seed alone (the same split in every process, for every trial seed), normalised with training statistics."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, write_idx
from hypothesis import given, settings
from hypothesis import strategies as st

from bkd_core import data
from bkd_core.data import stratified_holdout
from orchestrator.config.compose import compose
from orchestrator.config.job import validate
from orchestrator.config.schema import BuiltinData
from orchestrator.data.datasets import load_dataset


@settings(max_examples=200, deadline=None)
@given(counts=st.lists(st.integers(1, 60), min_size=1, max_size=12), fraction=st.floats(0.0, 0.5), seed=st.integers(0, 2**31))
def test_holdout_takes_the_fraction_of_every_class_and_leaves_each_class_some_training(counts, fraction, seed):
    labels = torch.tensor([c for c, n in enumerate(counts) for _ in range(n)])[torch.randperm(sum(counts))]
    held = stratified_holdout(labels, fraction, seed)
    for c, n in enumerate(counts):
        got = int(held[labels == c].sum())
        assert got == min(round(fraction * n), n - 1), (c, n, fraction)
    assert torch.equal(held, stratified_holdout(labels, fraction, seed))  # a function of (labels, fraction, seed)


def test_holdout_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        stratified_holdout(torch.zeros(4, dtype=torch.long), 1.0)


def keys(dataset):
    """One identity per image: its bytes."""
    return {bytes(image.numpy().tobytes()) for image in dataset.images}


def test_digits_val_is_disjoint_stratified_and_the_test_split_untouched():
    base = data.load("digits")
    splits = base.hold_out(0.1, seed=0)
    assert len(splits.train) + len(splits.val) == len(base.train) and splits.test is base.test
    assert not keys(splits.train) & keys(splits.val)
    train_share = torch.bincount(base.train.labels, minlength=10).float() * 0.1
    assert torch.all((torch.bincount(splits.val.labels, minlength=10) - train_share).abs() <= 0.5 + 1e-6)
    other = base.hold_out(0.1, seed=1)
    assert keys(other.val) != keys(splits.val), "data.split_seed chooses the split"
    same = base.hold_out(0.0)
    assert same.val is base.test and same.selection is base.test


def job_for(*overrides):
    return validate(compose(["mlflow.tracking_uri=sqlite:////tmp/bkd-holdout.db", *overrides]))


def test_every_trial_seed_and_method_sees_the_same_val_split_and_train_size_never_eats_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_for("train.seed=3")
    a = load_dataset(job.cfg.data)
    b = load_dataset(job_for("train.seed=11", "search=kd").cfg.data)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    small = load_dataset(job_for("data.train_size=300").cfg.data)
    assert torch.equal(small.val.images, a.val.images) and len(small.train) == 300
    assert not keys(small.train) & keys(small.val)
    assert job.dataset.rows == {"train": len(a.train), "val": len(a.val), "test": len(a.test)}
    assert job.split_sizes() == {"train_images": 1214, "val_images": 134, "test_images": 449}


def test_the_split_is_the_same_in_another_process():
    """Every DDP worker and Ray worker loads the dataset itself: the split must not depend on the process."""
    code = ("import hashlib; from orchestrator.data.datasets import load_dataset; from orchestrator.config.schema import BuiltinData; "
            "s = load_dataset(BuiltinData(name='digits', val_fraction=0.1, split_seed=0)); "
            "print(hashlib.sha1(s.val.images.numpy().tobytes() + s.val.labels.numpy().tobytes()).hexdigest())")
    here = load_dataset(BuiltinData(name="digits", val_fraction=0.1, split_seed=0))
    import hashlib
    expected = hashlib.sha1(here.val.images.numpy().tobytes() + here.val.labels.numpy().tobytes()).hexdigest()
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == expected, out.stderr[-2000:]


def test_idx_holdout_and_val_fraction_zero_selects_on_test(tmp_path):
    root = write_idx(tmp_path / "fm", n_train=200, n_test=40)
    splits = load_dataset(BuiltinData(name="fashion_mnist", root=str(root), val_fraction=0.2))
    assert len(splits.train) + len(splits.val) == 200 and abs(len(splits.val) - 40) <= 5 and len(splits.test) == 40
    on_test = load_dataset(BuiltinData(name="fashion_mnist", root=str(root), val_fraction=0))
    assert on_test.selection is on_test.test and len(on_test.train) == 200


def test_image_folder_test_split_uses_the_training_statistics(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, brightness in (("train", 60), ("val", 200)):  # a test split much brighter than training
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, brightness, (12, 12, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    splits = data.load("image_folder", str(tmp_path), image_size=8)
    assert splits.test.mean == splits.train.mean and splits.test.std == splits.train.std
    assert splits.train.mean[0] == pytest.approx(float(splits.train.images.float().mean() / 255), abs=0.02)


def test_bad_val_fraction_is_named_before_ray(tmp_path, monkeypatch):
    from orchestrator.config.checks import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"data.val_fraction: must be a fraction of the training images in \[0, 0.5\]"):
        job_for("data.val_fraction=0.7")
    assert job_for("data.val_fraction=0").selects_on_test
