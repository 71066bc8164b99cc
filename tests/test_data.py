"""Data readers (real files written here, and the real Fashion-MNIST when present), loader, download."""
import functools
import gzip
import hashlib
import http.server
import pickle
import threading

import numpy as np
import pytest
import torch
from conftest import fashion_root

from bkd_core import data
from bkd_core.data import Augmentation, BatchLoader, ImageDataset


def test_digits_embedded():
    splits = data.load("digits")
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape[1:] == (1, 8, 8)
    assert len(splits.train) + len(splits.test) == 1797 and splits.num_classes == 10


def test_real_fashion_mnist():
    splits = data.load("fashion_mnist", str(fashion_root()))
    assert len(splits.train) == 60000 and len(splits.test) == 10000
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(splits.test.labels).tolist() == [1000] * 10
    mean = splits.train.images.float().mean().item() / 255
    assert mean == pytest.approx(0.2860, abs=0.01)


def test_idx_missing_root_and_files(tmp_path, idx_root):
    with pytest.raises(ValueError, match="does not exist"):
        data.load("fashion_mnist", str(tmp_path / "nope"))
    (idx_root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("fashion_mnist", str(idx_root))


def test_idx_malformed(idx_root):
    (idx_root / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*gzip"):
        data.load("mnist", str(idx_root))
    with gzip.open(idx_root / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\x00\x00\x08\x01" + b"\x00" * 12)
    with pytest.raises(ValueError, match="magic 2049, expected 2051"):
        data.load("mnist", str(idx_root))


def write_cifar(root, classes=100, n=20):
    folder = root / ("cifar-100-python" if classes == 100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    key = b"fine_labels" if classes == 100 else b"labels"
    names = ["train", "test"] if classes == 100 else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        entry = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, classes, n))}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    return folder


def test_cifar_pickle_layout(tmp_path):
    write_cifar(tmp_path, 100)
    splits = data.load("cifar100", str(tmp_path))
    assert splits.train.images.shape == (20, 3, 32, 32) and splits.num_classes == 100
    write_cifar(tmp_path / "c10", 10)
    assert len(data.load("cifar10", str(tmp_path / "c10")).train) == 100


def test_cifar_errors(tmp_path):
    with pytest.raises(ValueError, match="cifar-100-python.*train"):
        data.load("cifar100", str(tmp_path))
    folder = write_cifar(tmp_path, 100)
    (folder / "test").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="test is not a CIFAR-100 pickle"):
        data.load("cifar100", str(tmp_path))


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for split in ("train", "val"):
        for cls, color in (("cat", 30), ("dog", 220)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 12), (color, i, 0)).save(tmp_path / split / cls / f"{i}.png")
    splits = data.load("image_folder", str(tmp_path), image_size=16)
    assert splits.classes == ["cat", "dog"] and splits.train.images.shape == (6, 3, 16, 16)
    assert splits.test.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_unknown_dataset_and_missing_root():
    with pytest.raises(ValueError, match="digits, fashion_mnist"):
        data.load("imagenet22k", "/x")
    with pytest.raises(ValueError, match="data.root"):
        data.load("cifar100")


@pytest.fixture
def http_server(idx_root):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(idx_root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", idx_root
    server.shutdown()


def sha(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_from_local_server_with_checksums(tmp_path, http_server):
    url, served = http_server
    sums = {p.name: sha(p) for p in served.iterdir()}
    splits = data.load("mnist", str(tmp_path / "dl"), download=True, base_url=url, checksums=sums)
    assert len(splits.train) == 80 and sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(sums)


def test_download_checksum_mismatch_keeps_nothing(tmp_path, http_server):
    url, served = http_server
    sums = {p.name: "sha256:" + "0" * 64 for p in served.iterdir()}
    with pytest.raises(ValueError, match="did not match its checksum"):
        data.load("mnist", str(tmp_path / "dl"), download=True, base_url=url, checksums=sums)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_unreachable(tmp_path):
    with pytest.raises(ValueError, match="download of .* failed"):
        data.load("mnist", str(tmp_path), download=True, base_url="http://127.0.0.1:9/", checksums={})


def make_dataset(n=40):
    images = torch.arange(n * 16, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 1, 4, 4)
    return ImageDataset(images, torch.arange(n) % 10, 10, (0.0,), (1 / 255,), "toy")


def test_random_crop_flip_is_a_shifted_window():
    ds = make_dataset(8)
    g = torch.Generator().manual_seed(0)
    out = data.random_crop_flip(ds.images, Augmentation(crop_padding=2, flip=False), g)
    padded = torch.nn.functional.pad(ds.images, (2, 2, 2, 2))
    for i in range(8):
        windows = [padded[i, :, dy : dy + 4, dx : dx + 4] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    flipped = data.random_crop_flip(ds.images, Augmentation(flip=True), torch.Generator().manual_seed(3))
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, ds.images))
    assert any(not torch.equal(f, o) for f, o in zip(flipped, ds.images))


def test_loader_normalises_shards_and_reshuffles():
    ds = make_dataset(40)
    a = BatchLoader(ds, 5, train=True, seed=1, rank=0, world_size=2)
    b = BatchLoader(ds, 5, train=True, seed=1, rank=1, world_size=2)
    ya = torch.cat([y for _, y in a])
    yb = torch.cat([y for _, y in b])
    assert len(a) == 4 and ya.numel() == yb.numel() == 20
    x, _ = next(iter(BatchLoader(ds, 40, train=False)))
    assert torch.allclose(x, ds.images.float())  # mean 0, std 1/255 -> raw values
    first = torch.cat([y for _, y in a])
    a.set_epoch(1)
    assert not torch.equal(first, torch.cat([y for _, y in a]))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchLoader(ds, 64, train=True)


def test_image_folder_keeps_the_aspect_ratio(tmp_path):
    """A wide image: its central square is kept (a circle stays a circle), not the whole image squashed."""
    from PIL import Image, ImageDraw

    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        image = Image.new("L", (90, 30), 0)
        ImageDraw.Draw(image).rectangle((0, 0, 29, 29), fill=255)  # the left third white: outside the central square
        ImageDraw.Draw(image).ellipse((30, 0, 59, 29), fill=128)
        image.save(tmp_path / split / "a" / "wide.png")
    (x,) = data.load("image_folder", str(tmp_path), image_size=16).train.images
    # squashed, the white left third would fill columns 0-5 with 255; cropped, only the filter's edge reaches column 0
    assert x.shape == (3, 16, 16) and int(x[0, 0, 0]) < 100 and int(x[0, 15, 0]) < 100 and int(x.max()) < 160
    assert int(x[0, 8, 8]) == 128 and int(x[0, 0, 15]) == 0  # the circle's centre, a corner outside it
