"""``data=lm``: a folder of train and test files (CSV, TSV, JSON Lines or Parquet) or a Hugging Face dataset, as plain
texts or prompt/response pairs, tokenized once with the teacher's fast tokenizer (and, for ULD, the student's) and
cached as flat NumPy arrays, one folder per (data, tokenizers, max_length, columns, chat template). The driver writes
the cache while it validates; every trial memory-maps it, so the trials of a node share one copy of the token ids
(the page cache's) however many run at once.

    cache_dir/<digest>/<split>.ids.bin, .targets.bin, .lengths.bin   the examples back to back (int32, bool, int64)
    cache_dir/<digest>/<split>.teacher.*.bin                          ULD: the same examples in the teacher's ids
    cache_dir/<digest>/meta.json                                      sources, tokenizers, max_length, cut and skipped

The cache is written ``ROWS`` examples at a time (a Parquet file is read in as many row batches), so building it
holds one batch's token lists, not the corpus's; reading it maps the files, so a corpus larger than memory trains
from the page cache.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from bkd_core.data import DataSplits, LMDataset, tokenize_lm
from orchestrator.config.checks import ConfigError
from orchestrator.config.schema import LMData
from orchestrator.data.text import (default_cache_dir, load_tokenizer, source_digest, source_table, split_file,
                                    tokenizer_digest, written_whole)

ARRAYS = ("ids", "targets", "lengths")


def columns(d: LMData) -> dict[str, str]:
    """The configured columns by key: the prompt and response columns, else the text column."""
    if d.prompt_column or d.response_column:
        if not (d.prompt_column and d.response_column):
            given, other = ("data.prompt_column", "data.response_column") if d.prompt_column else ("data.response_column", "data.prompt_column")
            raise ConfigError(other, f"is not set, and {given} is: prompt/response examples need both columns (or neither, "
                              "and data.text_column for plain texts).")
        return {"data.prompt_column": d.prompt_column, "data.response_column": d.response_column}
    if not d.text_column:
        raise ConfigError("data.text_column", "is not set: give the column of plain texts, or data.prompt_column and "
                          "data.response_column.")
    return {"data.text_column": d.text_column}


ROWS = 8192  # examples tokenized at a time while the cache is written
CACHE_FORMAT = "flat-bin-1"  # part of the cache's key: a folder written in another layout is never read as this one


def lm_batches(d: LMData, split: str) -> Iterator[tuple[dict[str, list[str]], str]]:
    """The configured columns of a split, ``ROWS`` rows at a time, as strings (a Parquet file read batch by batch);
    an empty split or a missing column is a ConfigError naming the columns there."""
    path = None if d.hub else split_file(str(d.root), split)
    if path is not None and path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet, source = pq.ParquetFile(path), str(path)
        names, rows = parquet.schema_arrow.names, parquet.metadata.num_rows
        batches: Iterator[Any] = parquet.iter_batches(batch_size=ROWS, columns=[n for n in columns(d).values() if n in names])
    else:
        table, source, _ = source_table(d, split)
        names, rows = table.column_names, table.num_rows
        batches = iter(table.to_batches(max_chunksize=ROWS))
    if rows == 0:
        raise ConfigError("data.root" if not d.hub else "data.hub", f"{source} has no rows (a header and nothing else, or an "
                          "empty file); give it one row per example.")
    for key, name in columns(d).items():
        if name not in names:
            raise ConfigError(key, f"{source} has no column {name!r} (its columns: {', '.join(names)}); set {key}=<one of them>.")
    for batch in batches:
        yield {key: ["" if v is None else str(v) for v in batch.column(name).to_pylist()]
               for key, name in columns(d).items()}, source


def chat_template_used(d: LMData, tokenizer: Any) -> bool:
    return bool(d.chat_template and d.prompt_column and getattr(tokenizer, "chat_template", None))


def cache_folder(d: LMData, tokenizer: Any, student_tokenizer: Any = None) -> Path:
    """The cache folder of this data (its files as they are now), tokenizers, max_length, columns and template."""
    key = {"source": source_digest(d), "tokenizer": tokenizer_digest(tokenizer), "max_length": d.max_length,
           "columns": columns(d), "chat": chat_template_used(d, tokenizer), "test": d.test_split,
           "student": tokenizer_digest(student_tokenizer) if student_tokenizer is not None else None,
           "format": CACHE_FORMAT}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(d.cache_dir or default_cache_dir()) / f"lm-{digest}"


def tokenize_split(d: LMData, tokenizer: Any, found: dict[str, list[str]], name: str) -> tuple[LMDataset, dict[str, int]]:
    if "data.text_column" in found:
        texts = found["data.text_column"]
        blank = sum(not t.strip() for t in texts)
        data, counts = tokenize_lm(tokenizer, texts=[t for t in texts if t.strip()], max_length=d.max_length, name=name)
        return data, counts | {"empty": blank}
    return tokenize_lm(tokenizer, prompts=found["data.prompt_column"], responses=found["data.response_column"],
                       max_length=d.max_length, name=name, chat_template=chat_template_used(d, tokenizer))


class SplitWriter:
    """Appends tokenized batches of one split to its three flat files."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.files = {a: open(folder / f"{prefix}.{a}.bin", "wb") for a in ARRAYS}
        self.examples = self.tokens = 0

    def add(self, data: LMDataset) -> None:
        self.files["ids"].write(data.ids.numpy().astype(np.int32).tobytes())
        self.files["targets"].write(data.targets.numpy().astype(np.bool_).tobytes())
        self.files["lengths"].write(data.lengths.numpy().astype(np.int64).tobytes())
        self.examples, self.tokens = self.examples + len(data), self.tokens + data.token_count

    def close(self) -> None:
        for fh in self.files.values():
            fh.close()


DTYPES = {"ids": np.int32, "targets": np.bool_, "lengths": np.int64}


def read_arrays(folder: Path, prefix: str, vocab_size: int, name: str) -> LMDataset:
    """A cached split, memory-mapped: the token arrays are views of the files (one copy per node, in the page cache)."""
    def mapped(array: str) -> np.ndarray:
        path = folder / f"{prefix}.{array}.bin"
        return np.memmap(path, dtype=DTYPES[array], mode="r") if path.stat().st_size else np.zeros(0, DTYPES[array])
    with warnings.catch_warnings():  # read-only views: nothing writes to the token ids
        warnings.simplefilter("ignore", UserWarning)
        ids, targets = torch.from_numpy(mapped("ids")), torch.from_numpy(mapped("targets"))
    lengths = torch.from_numpy(np.array(mapped("lengths"))).long()
    return LMDataset(ids, targets, torch.cumsum(lengths, 0) - lengths, lengths, vocab_size, name)


def build_cache(d: LMData, tokenizer: Any, folder: Path, student_tokenizer: Any = None) -> None:
    """Read, check and tokenize both splits into ``folder`` (written whole or not at all); prints what was cut and
    skipped. With ``student_tokenizer`` (ULD), the student's ids are the main ones and the teacher's the partner."""
    meta: dict[str, Any] = {"sources": [], "max_length": d.max_length, "tokenizer": d.tokenizer, "columns": columns(d),
                            "student_tokenizer": d.student_tokenizer, "chat_template": chat_template_used(d, tokenizer)}
    main = student_tokenizer if student_tokenizer is not None else tokenizer
    with written_whole(folder) as scratch:
        for split in ("train", d.test_split):
            writers = [SplitWriter(scratch, split)] + ([SplitWriter(scratch, f"{split}.teacher")] if student_tokenizer is not None else [])
            counts = {"truncated": 0, "empty": 0}
            for found, source in lm_batches(d, split):
                data, found_counts = tokenize_split(d, main, found, f"lm/{split}")
                writers[0].add(data)
                counts = {k: counts[k] + found_counts[k] for k in counts}
                if student_tokenizer is not None:
                    writers[1].add(tokenize_split(d, tokenizer, found, f"lm/{split}")[0])
            for writer in writers:
                writer.close()
            meta["sources"].append(source)
            if writers[0].examples == 0:
                raise ConfigError(next(iter(columns(d))), f"{source} holds no example with text in "
                                  f"{', '.join(columns(d).values())}; check the columns.")
            meta[split] = counts | {"examples": writers[0].examples, "tokens": writers[0].tokens}
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
    train, test = meta["train"], meta[d.test_split]
    print(f"[bkd] data: tokenized {train['examples']:,} training and {test['examples']:,} test examples "
          f"({train['tokens']:,} and {test['tokens']:,} tokens) with {d.student_tokenizer or d.tokenizer} into {folder}", flush=True)
    for what, key in (("reach max_length={} tokens and are cut there (data.max_length sets it)".format(d.max_length), "truncated"),
                      ("have an empty text or response and are skipped", "empty")):
        if train[key] or test[key]:
            print(f"[bkd] data: {train[key]:,} training and {test[key]:,} test examples {what}", flush=True)


def load_lm(d: LMData) -> DataSplits:
    """The train and test splits as token arrays, from the cache (made first if missing)."""
    if not d.tokenizer:
        raise ConfigError("data.tokenizer", "is not set: give pair.teacher=hf:FOLDER (its tokenizer is used) or "
                          "data.tokenizer=FOLDER.")
    tokenizer = load_tokenizer(d.tokenizer)
    student = load_tokenizer(d.student_tokenizer, "data.student_tokenizer") if d.student_tokenizer else None
    folder = cache_folder(d, tokenizer, student)
    if not (folder / "meta.json").is_file():
        build_cache(d, tokenizer, folder, student)
    vocab = len(student if student is not None else tokenizer)
    splits = []
    for split in ("train", d.test_split):
        data = read_arrays(folder, split, vocab, f"lm/{split}")
        if student is not None:
            data.partner = read_arrays(folder, f"{split}.teacher", len(tokenizer), f"lm/{split}")
        splits.append(data)
    return DataSplits(splits[0], splits[1])  # type: ignore[arg-type]
