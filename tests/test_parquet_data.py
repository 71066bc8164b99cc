"""orchestrator.prepare (Ray tasks, real JPEG/PNG files) and bkd_core.data.ParquetImages in a plain
DataLoader loop: odd sizes, grayscale, CMYK, a PNG, a truncated file, class names with spaces."""
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bkd_core.data import ParquetImages
from bkd_core.data.parquet import center_box, decode_crop
from conftest import REPO

CLASSES = ["golden retriever", "tabby cat", "zebra"]


def write_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """An ImageNet-style folder whose class is the image's dominant colour channel."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", 2)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = int(rng.integers(90, 400)), int(rng.integers(70, 300))
                pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                pixels[..., label] = 220
                image = Image.fromarray(pixels)
                if i == 1:
                    image.convert("L").save(folder / f"{i}.jpg", quality=90)
                elif i == 2:
                    image.convert("CMYK").save(folder / f"{i}.jpg", quality=90)
                elif i == 3:
                    image.save(folder / f"{i}.png")
                else:
                    image.save(folder / f"{i} copy.JPEG", format="JPEG", quality=90)
    good = io.BytesIO()
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(good, format="JPEG")
    (root / "train" / CLASSES[0] / "truncated.jpg").write_bytes(good.getvalue()[:400])
    (root / "train" / CLASSES[1] / "notes.txt").write_text("not an image")
    return root


def prepare(*args: str, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``python -m orchestrator.prepare ARGS`` as a user's shell runs it: its own process and Ray cluster."""
    return subprocess.run([sys.executable, "-m", "orchestrator.prepare", "ray.num_cpus=2", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def prepare_here(*args: str) -> subprocess.CompletedProcess:
    """The same command run in this process, on the Ray cluster this process joined (``ray_cluster``): its exit code
    and console, without a process and a cluster to start."""
    from orchestrator import prepare as prepare_entry

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = prepare_entry.main(["ray.num_cpus=2", *args])
    return subprocess.CompletedProcess(["orchestrator.prepare", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_cluster):
    """The test folder prepared once: 5 files planned per shard, images re-encoded at most 128 px."""
    tmp = tmp_path_factory.mktemp("parquet")
    src, dst = write_folder(tmp / "images"), tmp / "shards"
    done = prepare_here(f"source={src}", f"output={dst}", "images_per_shard=5", "max_side=128")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return src, dst


def test_prepare_writes_shards_skips_bad_files_and_resumes(prepared):
    src, dst = prepared
    assert json.loads((dst / "classes.json").read_text()) == CLASSES
    skipped = (dst / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and any("truncated.jpg" in s for s in skipped) and any("notes.txt" in s for s in skipped)
    train, val = (pq.read_table(dst / split).to_pylist() for split in ("train", "val"))
    # SRC/train: 7, 7 and 6 files per class (a truncated file, a text file); one of each class held out as val
    assert len(train) + len(val) == 3 * 6 and sorted({r["label"] for r in train}) == [0, 1, 2]
    assert 2 <= len(val) <= 3 and not {r["path"] for r in train} & {r["path"] for r in val}
    assert all("/train/" in r["path"] for r in val), "val is held out of SRC/train"
    assert len(list((dst / "train").glob("*.parquet"))) == 4  # 17 files planned, 5 per shard
    for row in train + val:
        image = Image.open(io.BytesIO(row["image"]))
        assert max(image.size) <= 128 and image.format == "JPEG"
        assert CLASSES[row["label"]] in row["path"]
    test = pq.read_table(dst / "test").to_pylist()
    assert len(test) == 3 * 2 and all("/val/" in r["path"] for r in test), "SRC/val is the test split"
    splits = json.loads((dst / "splits.json").read_text())
    assert splits["val_fraction"] == 0.1 and splits["rows"] == {"train": len(train), "val": len(val), "test": 6}
    shards = len(list(dst.glob("*/*.parquet")))

    first = (dst / "train" / "part-00000-of-00004.parquet").stat().st_mtime_ns
    (dst / "train" / "part-00003-of-00004.parquet").unlink()  # as if the run had been interrupted
    again = prepare_here(f"source={src}", f"output={dst}", "images_per_shard=5", "max_side=128")
    assert again.returncode == 0 and f"({shards - 1} kept from an earlier run)" in again.stdout, again.stdout[-2000:]
    assert (dst / "train" / "part-00000-of-00004.parquet").stat().st_mtime_ns == first
    assert len(pq.read_table(dst / "train")) == len(train) and len((dst / "skipped.txt").read_text().splitlines()) == 2


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.mkdir(), "has no train/ or val/ folder"),
    (lambda p: (p / "train" / "a").mkdir(parents=True) or (p / "val").mkdir() or (p / "train" / "a" / "x.jpg").write_text("no"),
     "no readable image"),
])
def test_prepare_refuses_bad_sources(tmp_path, make, fragment, ray_cluster):
    src = tmp_path / "src"
    make(src)
    done = prepare_here(f"source={src}", f"output={tmp_path}/out")
    assert done.returncode == 2 and "configuration error in `source`" in done.stderr and fragment in done.stderr, done.stderr


def test_parquet_images_in_a_dataloader_loop_see_every_image_once(prepared):
    _, dst = prepared
    dataset = ParquetImages(str(dst), "train", image_size=32, train=True, shuffle_buffer=5)
    expected = len(dataset)
    seen = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=4, num_workers=2)
        labels, right = [], 0
        for images, batch_labels in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            right += int((images.float().mean((2, 3)).argmax(1) == batch_labels).sum())
            labels += batch_labels.tolist()
        assert right >= 0.7 * len(labels)  # the class is the dominant channel (not in the grayscale files)
        seen.append(labels)
        assert len(labels) == expected  # every image once per epoch across the 2 workers
        assert sorted(labels) == sorted(pq.read_table(dst / "train").column("label").to_pylist())  # not the bad files
    assert seen[0] != seen[1], "a new order each epoch"
    ranks = [ParquetImages(str(dst), "train", 32, train=False, rank=r, world_size=2) for r in (0, 1)]
    counts = [sum(1 for _ in r) for r in ranks]
    assert sum(counts) == expected and min(counts) > 0  # DDP ranks split the shards


def test_val_transform_is_the_center_crop_of_the_resized_short_side():
    assert center_box(400, 300, 224) == pytest.approx((50 + 300 * (1 - 224 / 256) / 2, 300 * (1 - 224 / 256) / 2,
                                                       350 - 300 * (1 - 224 / 256) / 2, 300 - 300 * (1 - 224 / 256) / 2))
    pixels = np.zeros((300, 400, 3), np.uint8)
    pixels[:, 200:] = 255  # right half white
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    import random
    out = decode_crop(data.getvalue(), 64, False, random.Random(0))
    assert out.shape == (3, 64, 64) and out[:, :, :28].float().mean() < 10 and out[:, :, 36:].float().mean() > 245


def write_with_corrupt_rows(root: Path, good: int, corrupt: int) -> None:
    """One shard of ``good`` PNGs and ``corrupt`` rows whose bytes are no image, spread through it."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(good):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(buffer, format="PNG")
        rows.append(buffer.getvalue())
    for k in range(corrupt):
        rows.insert((k * 7 + 3) % len(rows), b"\x89PNG\r\n\x1a\n not really")
    (root / "train").mkdir(parents=True)
    import pyarrow as pa

    pq.write_table(pa.table({"image": rows, "label": [i % 3 for i in range(len(rows))]}), root / "train" / "part-0.parquet",
                   row_group_size=16)
    (root / "val").mkdir()
    good_rows = [r for r in rows if not r.endswith(b"not really")][:12]
    pq.write_table(pa.table({"image": good_rows, "label": [i % 3 for i in range(len(good_rows))]}), root / "val" / "part-0.parquet")
    (root / "classes.json").write_text(json.dumps(CLASSES))


def test_a_corrupt_row_is_skipped_counted_and_named(tmp_path, capsys):
    write_with_corrupt_rows(tmp_path, good=120, corrupt=1)
    dataset = ParquetImages(str(tmp_path), "train", image_size=16, train=True, shuffle_buffer=8)
    assert sum(1 for _ in dataset) == 120 and dataset.skipped == 1
    assert "skipped an image that does not decode" in capsys.readouterr().out and "row 3" in dataset.first_skip


def test_more_than_one_percent_corrupt_fails_the_epoch_with_one_paragraph(tmp_path):
    from bkd_core.data.parquet import UndecodableImages

    write_with_corrupt_rows(tmp_path, good=60, corrupt=3)
    with pytest.raises(UndecodableImages, match=r"could not be decoded \(more than 1%; first: .*part-0.parquet row 3.*prepare"):
        list(ParquetImages(str(tmp_path), "train", image_size=16, train=False))


def test_prepare_writes_the_row_groups_readers_share(prepared):
    from bkd_core.data.parquet import ROWS_PER_GROUP
    from orchestrator.data.prepare import ROW_GROUP

    assert ROW_GROUP == ROWS_PER_GROUP
    _, dst = prepared
    for path in (dst / "train").glob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        assert all(meta.row_group(g).num_rows <= ROW_GROUP for g in range(meta.num_row_groups))


def test_prepare_writes_rows_in_a_seeded_random_order_so_every_shard_mixes_the_classes(tmp_path):
    """A sorted folder would give shards (and row groups) of one class each, which a reader's few-row-group
    shuffle window cannot mix; the plan shuffles, the same way on every run (resume relies on it)."""
    from orchestrator.data.prepare import plan

    for split, n in (("train", 90), ("val", 9)):
        for name in CLASSES:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / name / f"{i:03d}.jpg").write_bytes(b"")
    classes, shards = plan(str(tmp_path), images_per_shard=20)
    assert plan(str(tmp_path), images_per_shard=20)[1] == shards
    train = [s for s in shards if s.split == "train"]
    assert len(train) >= 12
    for shard in train[:-1]:  # the last holds what is left over
        assert len({label for _, label in shard.items}) == len(classes), shard.name


def write_unique_images(root: Path, files: int, rows_per_file: int) -> int:
    """Shards of distinct noise JPEGs (no Parquet dictionary can share them); the bytes of one row group."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    for f in range(files):
        images = []
        for _ in range(rows_per_file):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=90)
            images.append(buffer.getvalue())
        pq.write_table(pa.table({"image": images, "label": [i % 3 for i in range(rows_per_file)]}),
                       root / "train" / f"part-{f}.parquet", row_group_size=rows_per_file, use_dictionary=["label"])
    (root / "classes.json").write_text(json.dumps(CLASSES))
    return pq.ParquetFile(root / "train" / "part-0.parquet").metadata.row_group(0).total_byte_size


@pytest.mark.parametrize("shuffle_buffer,shuffle_bytes", [(64, 32 << 20), (10_000, 1)])
def test_a_reader_holds_one_shuffle_window_of_encoded_images_whatever_the_datas_size(tmp_path, shuffle_buffer, shuffle_bytes):
    """Arrow memory alive while reading 12 shards stays at about one window (the rows cap, then the bytes cap)."""
    import pyarrow as pa

    group = write_unique_images(tmp_path, files=12, rows_per_file=64)
    dataset = ParquetImages(str(tmp_path), "train", image_size=16, train=True, shuffle_buffer=shuffle_buffer,
                            shuffle_bytes=shuffle_bytes)
    before, peak, seen = pa.total_allocated_bytes(), 0, 0
    for _ in dataset:
        peak, seen = max(peak, pa.total_allocated_bytes() - before), seen + 1
    assert seen == 12 * 64
    assert peak < 3 * group, f"{peak / group:.1f} row groups of encoded images held at once"
