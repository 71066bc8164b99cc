"""Writing an image folder as Parquet shards with Ray tasks: the plan (splits, shards, a digest that lets
a rerun keep what is written whole), each shard's decode and re-encode, ``splits.json``, ``classes.json`` and
``skipped.txt``. The command, its layout and options: ``orchestrator.prepare``."""
from __future__ import annotations

import hashlib
import io
import json
import random
import sys
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.config.checks import ConfigError
from orchestrator.config.compose import absolute_path
from orchestrator.config.schema import PrepareConfig

SPLITS = ("train", "val")  # the source's folders
OUTPUT_SPLITS = ("train", "val", "test")  # the shards' folders: SRC/train minus the held-out val, the held-out val, SRC/val
PLAN_KEY = b"bkd.plan"  # the digest of a shard's planned files, in its Parquet metadata
SKIPPED_KEY = b"bkd.skipped"
ROW_GROUP = 128  # images per row group: the unit readers share (bkd_core.data.parquet.ROWS_PER_GROUP; no torch here)


@dataclass
class Shard:
    split: str
    index: int
    total: int
    items: list[tuple[str, int]]  # (source path, label)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.total:05d}.parquet"

    @property
    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.items).encode()).hexdigest()


def filesystem(uri: str, key: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri if "://" in uri else f"file://{absolute_path(uri)}")
    except Exception as exc:
        raise ConfigError(key, f"cannot open {uri} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); give a local "
                          "path or an s3:// / gs:// URI with credentials in the environment.") from None


def check_writable(fs: pafs.FileSystem, base: str, uri: str) -> None:
    """Write and delete a probe file under ``base``: an unreachable bucket fails here, before any task."""
    probe = f"{base}/.bkd-write-test"
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except Exception as exc:
        raise ConfigError("output", f"cannot write to {uri} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check "
                          "the path or bucket name, that the bucket exists, the network and the credentials "
                          "(AWS_* / GOOGLE_* variables; AWS_ENDPOINT_URL for an S3-compatible server).") from None


def plan(source: str, images_per_shard: int, val_fraction: float = 0.1, split_seed: int = 0) -> tuple[list[str], list[Shard]]:
    """(classes, shards) of an image folder: SRC/train split into ``train`` and a stratified held-out
    ``val``, SRC/val as ``test``. A wrong layout or an unreachable source is a ConfigError."""
    fs, base = filesystem(source, "source")
    try:
        top = {info.base_name: info for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))}
    except Exception as exc:
        raise ConfigError("source", f"cannot list {source} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); check "
                          "the bucket name, the network and the credentials (AWS_* / GOOGLE_* variables).") from None
    missing = [s for s in SPLITS if s not in top or top[s].type != pafs.FileType.Directory]
    if missing:
        raise ConfigError("source", f"{source} has no {' or '.join(f'{s}/' for s in missing)} folder; the layout is "
                          "SRC/train/<class>/<image> and SRC/val/<class>/<image> (one folder per class in each split).")
    files: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        found = fs.get_file_info(pafs.FileSelector(f"{base}/{split}", recursive=True))
        by_class: dict[str, list[str]] = {}
        for info in found:
            if info.type == pafs.FileType.File:
                relative = info.path[len(f"{base}/{split}/"):]
                if "/" in relative:
                    by_class.setdefault(relative.split("/", 1)[0], []).append(info.path)
        files[split] = by_class
    classes = sorted(files["train"])
    if not classes:
        raise ConfigError("source", f"{source}/train holds no class folders with files; put each class's images in "
                          "SRC/train/<class>/.")
    unknown = sorted(set(files["val"]) - set(classes))
    if unknown:
        raise ConfigError("source", f"{source}/val has classes that train/ lacks: {unknown[:5]}; every val class needs "
                          "training images.")
    import torch  # here: the shard tasks import this module, and need no torch

    from bkd_core.data import stratified_holdout

    items = {split: sorted((path, classes.index(name)) for name, paths in files[split].items() for path in paths)
             for split in SPLITS}
    held = stratified_holdout(torch.tensor([label for _, label in items["train"]], dtype=torch.long), val_fraction, split_seed)
    by_output = {"train": [item for item, h in zip(items["train"], held.tolist()) if not h],
                 "val": [item for item, h in zip(items["train"], held.tolist()) if h], "test": items["val"]}
    shards = []
    for split, items_of_split in by_output.items():
        # Rows in a seeded random order: every row group is a sample of all classes, so a reader's shuffle
        # window of a few row groups mixes classes as a global shuffle would (a sorted folder gives one class per group).
        items = list(items_of_split)
        random.Random(f"{split_seed}:{split}").shuffle(items)
        chunks = [items[i:i + images_per_shard] for i in range(0, len(items), images_per_shard)]
        shards += [Shard(split, i, len(chunks), chunk) for i, chunk in enumerate(chunks)]
    return classes, shards


def encode(data: bytes, max_side: Optional[int], quality: int) -> bytes:
    """The bytes to store: the original file, or a JPEG re-encoded at ``max_side``; raises on bad images."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()  # decodes fully: truncated or corrupt files raise here, not in training
    if max_side is None or (max(image.size) <= max_side and image.format == "JPEG" and image.mode in ("RGB", "L")):
        return data
    if image.format == "JPEG":
        image.draft("RGB", (max_side, max_side))
    image = image.convert("RGB")
    image.thumbnail((max_side, max_side), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def shard_is_whole(fs: pafs.FileSystem, path: str, shard: Shard) -> Optional[list[list[str]]]:
    """The skipped list of a shard written by an earlier run with the same plan, or None."""
    try:
        meta = pq.read_schema(fs.open_input_file(path)).metadata or {}
    except Exception:
        return None
    if meta.get(PLAN_KEY, b"").decode() != shard.digest:
        return None
    return json.loads(meta.get(SKIPPED_KEY, b"[]").decode())


def write_shard(source: str, output: str, shard: Shard, max_side: Optional[int], quality: int) -> tuple[int, list[list[str]], bool]:
    """(images written, [path, reason] skipped, reused) for one shard; a whole earlier shard is kept."""
    src_fs, _ = filesystem(source, "source")
    dst_fs, dst = filesystem(output, "output")
    path = f"{dst}/{shard.split}/{shard.name}"
    earlier = shard_is_whole(dst_fs, path, shard)
    if earlier is not None:
        return len(shard.items) - len(earlier), earlier, True
    images, labels, paths, skipped = [], [], [], []
    for file, label in shard.items:
        try:
            with src_fs.open_input_stream(file) as fh:
                images.append(encode(fh.read(), max_side, quality))
            labels.append(label)
            paths.append(file)
        except Exception as exc:  # unreadable or not an image: skipped, the rest goes on
            skipped.append([file, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"])
    table = pa.table({"image": pa.array(images, pa.binary()), "label": pa.array(labels, pa.int32()),
                      "path": pa.array(paths, pa.string())})
    table = table.replace_schema_metadata({PLAN_KEY: shard.digest.encode(), SKIPPED_KEY: json.dumps(skipped).encode()})
    dst_fs.create_dir(f"{dst}/{shard.split}", recursive=True)
    partial = f"{path}.partial"
    with dst_fs.open_output_stream(partial) as out:
        pq.write_table(table, out, row_group_size=ROW_GROUP)
    dst_fs.move(partial, path)
    return len(images), skipped, False


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Plan, write every shard as a Ray task (progress bar), then classes.json and skipped.txt."""
    import ray
    from tqdm import tqdm

    classes, shards = plan(str(cfg.source), int(cfg.images_per_shard), float(cfg.val_fraction), int(cfg.split_seed))
    dst_fs, dst = filesystem(str(cfg.output), "output")
    check_writable(dst_fs, dst, str(cfg.output))
    if not ray.is_initialized():
        from orchestrator.worker.runtime import join_or_start

        join_or_start(cfg.ray.address, cfg.ray.num_cpus, log_to_driver=False, include_dashboard=False)
    task = ray.remote(num_cpus=1)(write_shard)
    pending = [task.remote(str(cfg.source), str(cfg.output), s, cfg.max_side, int(cfg.quality)) for s in shards]
    written = {split: 0 for split in OUTPUT_SPLITS}
    skipped: list[list[str]] = []
    reused = 0
    total = sum(len(s.items) for s in shards)
    with tqdm(total=total, unit="img", desc="prepare", file=sys.stdout) as bar:
        by_ref = dict(zip(pending, shards))
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            count, bad, kept = ray.get(done[0])
            shard = by_ref[done[0]]
            written[shard.split] += count
            skipped += bad
            reused += kept
            bar.update(len(shard.items))
    if written["train"] == 0:
        raise ConfigError("source", f"no readable image in {cfg.source}/train ({len(skipped)} files skipped, e.g. "
                          f"{skipped[0][0] if skipped else '-'}: {skipped[0][1] if skipped else '-'}); see {cfg.output}/skipped.txt.")
    with dst_fs.open_output_stream(f"{dst}/classes.json") as out:
        out.write(json.dumps(classes).encode())
    from bkd_core.data.parquet import SPLITS_FILE

    with dst_fs.open_output_stream(f"{dst}/{SPLITS_FILE}") as out:  # what readers check data.val_fraction against
        out.write(json.dumps({"val_fraction": float(cfg.val_fraction), "split_seed": int(cfg.split_seed),
                              "val_from": "train", "test_from": "val", "rows": written}).encode())
    with dst_fs.open_output_stream(f"{dst}/skipped.txt") as out:
        out.write("".join(f"{path}\t{reason}\n" for path, reason in sorted(skipped)).encode())
    return {"classes": len(classes), "shards": len(shards), "reused_shards": reused, **written, "skipped": len(skipped)}
