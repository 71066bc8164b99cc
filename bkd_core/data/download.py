"""Opt-in downloads to a given root, verified by checksum (only when a loader is asked to)."""
from __future__ import annotations

import hashlib
import shutil
import urllib.request
from pathlib import Path
from typing import Optional

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MIRRORS = {
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
# MD5 sums of the original distributions' files.
CHECKSUMS = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
    },
}


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, checksum: str) -> bool:
    """``checksum`` is ``"sha256:<hex>"`` or ``"md5:<hex>"``."""
    algorithm, _, expected = checksum.partition(":")
    return file_digest(path, algorithm) == expected.lower()


def download(url: str, dest: Path, checksum: Optional[str], timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via a temporary file) and verify its checksum."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (checksum is None or verify(dest, checksum)):
        return dest
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ValueError(f"download of {url} failed ({exc}); place the file at {dest} by hand instead.") from exc
    if checksum is not None and not verify(partial, checksum):
        partial.unlink()
        raise ValueError(f"{url} did not match its checksum {checksum}; the mirror is wrong or the transfer broke.")
    partial.replace(dest)
    return dest


def fetch_files(name: str, root: Path, base_url: Optional[str] = None, checksums: Optional[dict[str, str]] = None) -> None:
    """Download the IDX files of ``name`` (``mnist`` or ``fashion_mnist``) into ``root``."""
    base_url = base_url or MIRRORS[name]
    checksums = CHECKSUMS[name] if checksums is None else checksums
    for filename in IDX_FILES:
        download(base_url.rstrip("/") + "/" + filename, Path(root) / filename, checksums.get(filename))
