"""``data=text``: a folder of train and test files (CSV, JSON Lines or Parquet) or a Hugging Face dataset,
tokenized once with the teacher's fast tokenizer and cached as Parquet, one folder per (data, tokenizer,
max_length). The driver writes the cache while it validates; every trial and DDP worker reads it.

    cache_dir/<digest>/train.parquet, test.parquet   token ids and segment ids per text (unpadded), label
    cache_dir/<digest>/train.tokens.npy, ...         the same padded to the split's longest text, memory-mapped by
                                                     every trial (one copy per node)
    cache_dir/<digest>/labels.json                   the class names, in class-id order
    cache_dir/<digest>/meta.json                     sources, tokenizer, max_length, truncated texts
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from bkd_core.data import DataSplits, TextDataset, tokenize
from orchestrator.config.checks import ConfigError
from orchestrator.config.schema import TextData

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class TextColumns:
    """One split's columns: texts, second texts of pair tasks (or None), labels as given."""

    texts: list[str]
    pairs: Optional[list[str]]
    labels: list[Any]
    source: str


def split_file(root: str, split: str) -> Path:
    """``root/<split>.csv`` (or .tsv, .jsonl, .json, .parquet); a ConfigError naming what is there if none."""
    found = [Path(root) / f"{split}{suffix}" for suffix in SUFFIXES if (Path(root) / f"{split}{suffix}").is_file()]
    if len(found) != 1:
        there = sorted(p.name for p in Path(root).iterdir() if p.is_file())[:8]
        problem = f"holds {len(found)} {split} files ({', '.join(p.name for p in found)})" if found else f"has no {split} file"
        raise ConfigError("data.root", f"{root} {problem}; bkd reads one {split}.csv, {split}.tsv, {split}.jsonl or "
                          f"{split}.parquet (found: {', '.join(there) or 'nothing'}).")
    return found[0]


def read_table(path: Path) -> pa.Table:
    """A CSV / TSV, JSON Lines or Parquet file as an Arrow table (strings kept as strings)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if path.suffix in (".jsonl", ".json"):
        import pyarrow.json as pj

        return pj.read_json(path)
    import pyarrow.csv as pc

    parse = pc.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ",", newlines_in_values=True)
    return pc.read_csv(path, parse_options=parse, convert_options=pc.ConvertOptions(strings_can_be_null=False))


def columns_of(d: TextData, table: pa.Table, source: str) -> TextColumns:
    """The configured columns of a table; a missing column or an empty text is a ConfigError."""
    if table.num_rows == 0:
        raise ConfigError("data.root" if not d.hub else "data.hub", f"{source} has no rows (a header and nothing else, or an "
                          "empty file); give it one row per text and label.")
    wanted = {"data.text_column": d.text_column, "data.label_column": d.label_column}
    if d.text_pair_column:
        wanted["data.text_pair_column"] = d.text_pair_column
    for key, name in wanted.items():
        if name not in table.column_names:
            raise ConfigError(key, f"{source} has no column {name!r} (its columns: {', '.join(table.column_names)}); set "
                              f"{key}=<one of them>.")
    texts = table.column(d.text_column).to_pylist()
    pairs = table.column(d.text_pair_column).to_pylist() if d.text_pair_column else None
    for key, column in (("data.text_column", texts), ("data.text_pair_column", pairs)):
        for row, text in enumerate(column or ()):
            if text is None or not str(text).strip():
                raise ConfigError(key, f"row {row + 1} of {source} has an empty text in column {wanted[key]!r}; drop or fill "
                                  "the rows without text (every text must hold at least one token).")
    labels = table.column(d.label_column).to_pylist()
    if any(label is None for label in labels):
        row = labels.index(None)
        raise ConfigError("data.label_column", f"row {row + 1} of {source} has no label in column {d.label_column!r}; "
                          "drop the unlabelled rows.")
    return TextColumns([str(t) for t in texts], [str(p) for p in pairs] if pairs is not None else None, labels, source)


def source_table(d: TextData, split: str) -> tuple[pa.Table, str, Any]:
    """``split`` (train, or ``data.test_split``) of the folder, or of the hub through ``datasets``: its table, where it
    came from in words, and the hub's features (None for a folder)."""
    if d.hub:
        try:
            import datasets
        except ImportError:
            raise ConfigError("data.hub", "needs the `datasets` package: pip install datasets (or give data.root=FOLDER "
                              "with train and test files).") from None
        try:
            hub = datasets.load_dataset(d.hub, d.hub_config, split=split)
        except Exception as exc:
            raise ConfigError("data.hub", f"cannot load {d.hub} ({d.hub_config or 'default'}) split {split!r} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); check the "
                              "name, data.hub_config, data.test_split and the connection to the hub.") from None
        table = hub.data.table if hasattr(hub.data, "table") else pa.table(hub.to_dict())
        return table, f"{d.hub}{'/' + d.hub_config if d.hub_config else ''}:{split}", hub.features
    path = split_file(str(d.root), split)
    try:
        return read_table(path), str(path), None
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError("data.root", f"cannot read {path} ({str(exc).splitlines()[0][:200]}); give a CSV with a header "
                          "row, JSON Lines (one object per line) or Parquet.") from None


def read_split(d: TextData, split: str) -> TextColumns:
    """``split``'s texts and labels (a hub ClassLabel's ids as its class names)."""
    table, source, features = source_table(d, split)
    cols = columns_of(d, table, source)
    names = getattr(features.get(d.label_column), "names", None) if features is not None else None
    if names:
        cols.labels = [names[v] if isinstance(v, int) and 0 <= v < len(names) else v for v in cols.labels]
    return cols


def class_names(d: TextData, train: TextColumns, test: TextColumns) -> list[Any]:
    """The classes, sorted; every test label must be one of the training labels."""
    names = sorted(set(train.labels), key=lambda v: (isinstance(v, str), v))
    if len(names) < 2:
        raise ConfigError("data.label_column", f"column {d.label_column!r} of {train.source} holds one class ({names[0]!r}); a "
                          "classifier needs at least two: check data.label_column.")
    unknown = sorted({str(v) for v in test.labels} - {str(v) for v in names})
    if unknown:
        raise ConfigError("data.label_column", f"{test.source} has labels the training file lacks ({', '.join(unknown[:5])}); "
                          "the classes are the training file's.")
    return names


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str, key: str = "data.tokenizer") -> Any:
    """A Hugging Face fast tokenizer, padding on the right (loaded once per process: validation, the dataset, the
    teacher's score and the student's export share it)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(key, "text needs transformers and tokenizers: pip install 'bkd[text]'.") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise ConfigError(key, f"cannot load a tokenizer from {name} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); give a folder saved with "
                          "tokenizer.save_pretrained (the teacher's) or a hub name.") from None
    if not tokenizer.is_fast:
        raise ConfigError(key, f"{name} has no fast tokenizer (tokenizer.json); bkd tokenizes with the Rust tokenizers: "
                          "save the model's fast tokenizer with AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained.")
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_digest(tokenizer: Any) -> str:
    """Identifies a tokenizer by what it does: its Rust definition (vocabulary, normaliser, specials), without the
    truncation and padding that the last call left set."""
    definition = json.loads(tokenizer.backend_tokenizer.to_str())
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha1(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


def source_digest(d: TextData) -> str:
    """The files by path, size and modification time (every trial computes it: no reading of the corpus), or
    the hub dataset by name."""
    if d.hub:
        return f"hub:{d.hub}:{d.hub_config}"
    stamps = []
    for split in ("train", d.test_split):
        path = split_file(str(d.root), split).resolve()
        stat = path.stat()
        stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha1(json.dumps(stamps).encode()).hexdigest()[:16]


def cache_folder(d: TextData, tokenizer: Any) -> Path:
    """The cache folder of this data (its files as they are now), tokenizer, max_length and columns."""
    key = {"source": source_digest(d), "tokenizer": tokenizer_digest(tokenizer), "max_length": d.max_length,
           "columns": [d.text_column, d.text_pair_column, d.label_column], "test": d.test_split}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(d.cache_dir or default_cache_dir()) / digest


def default_cache_dir() -> str:
    """``data.cache_dir`` when null: $BKD_CACHE_DIR, else <cwd>/results/token-cache."""
    return os.environ.get("BKD_CACHE_DIR") or str(Path.cwd() / "results" / "token-cache")


def write_split(path: Path, data: TextDataset) -> None:
    import pyarrow.parquet as pq

    lengths = data.lengths.tolist()
    ids = [row[:n] for row, n in zip(data.tokens[:, 0].tolist(), lengths)]
    types = [row[:n] for row, n in zip(data.tokens[:, 2].tolist(), lengths)]
    table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "token_type_ids": pa.array(types, pa.list_(pa.int8())),
                      "label": pa.array(data.labels.tolist(), pa.int64())})
    pq.write_table(table, path)


def read_split_tokens(path: Path, num_classes: int, name: str) -> TextDataset:
    """A cached split as one (N, 3, L) tensor padded with 0 to its longest text."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids, types = table.column("input_ids").combine_chunks(), table.column("token_type_ids").combine_chunks()
    offsets = ids.offsets.to_numpy()
    lengths = np.diff(offsets)
    n, longest = len(lengths), int(lengths.max()) if len(lengths) else 1
    tokens = np.zeros((n, 3, longest), dtype=np.int32)
    keep = np.arange(longest)[None, :] < lengths[:, None]
    tokens[:, 0][keep] = ids.values.to_numpy()
    tokens[:, 1][keep] = 1
    tokens[:, 2][keep] = types.values.to_numpy()
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    return TextDataset(torch.from_numpy(tokens), labels, num_classes, name)


def mapped_split(folder: Path, split: str, num_classes: int, name: str) -> TextDataset:
    """A cached split whose padded token store is memory-mapped (``<split>.tokens.npy``), shared by the trials of a
    node; a cache written without it is read from its Parquet file (a copy per process)."""
    import warnings

    import pyarrow.parquet as pq

    path = folder / f"{split}.tokens.npy"
    if not path.is_file():
        return read_split_tokens(folder / f"{split}.parquet", num_classes, name)
    with warnings.catch_warnings():  # a read-only view: nothing writes to the token ids
        warnings.simplefilter("ignore", UserWarning)
        store = torch.from_numpy(np.load(path, mmap_mode="r"))
    labels = torch.from_numpy(pq.read_table(folder / f"{split}.parquet", columns=["label"]).column("label").to_numpy().astype(np.int64))
    return TextDataset(store, labels, num_classes, name)


@contextlib.contextmanager
def written_whole(folder: Path) -> Iterator[Path]:
    """A scratch folder beside ``folder`` that becomes ``folder`` when the block ends without an error: a cache is
    read whole or not at all (one another process wrote meanwhile is kept: theirs is the same)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield scratch
        try:
            scratch.rename(folder)
        except OSError:
            pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def build_cache(d: TextData, tokenizer: Any, folder: Path) -> None:
    """Read, check, map labels and tokenize both splits into ``folder`` (written whole or not at all)."""
    train, test = read_split(d, "train"), read_split(d, d.test_split)
    names = class_names(d, train, test)
    index = {str(v): i for i, v in enumerate(names)}
    meta: dict[str, Any] = {"sources": [train.source, test.source], "max_length": d.max_length,
                            "tokenizer": d.tokenizer, "classes": len(names), "truncated": {}}
    with written_whole(folder) as scratch:
        for split, cols in (("train", train), ("test", test)):
            labels = [index[str(v)] for v in cols.labels]
            data = tokenize(cols.texts, labels, tokenizer, d.max_length, len(names), pairs=cols.pairs, name=f"text/{split}")
            meta["truncated"][split] = int((data.lengths >= d.max_length).sum())
            if split == "train":
                meta["unknown_share"] = check_unknown_tokens(d, tokenizer, data, train.source)
            write_split(scratch / f"{split}.parquet", data)
            np.save(scratch / f"{split}.tokens.npy", data.tokens.numpy())
        (scratch / "labels.json").write_text(json.dumps([v if isinstance(v, (int, str)) else str(v) for v in names]))
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
    reach = meta["truncated"]
    print(f"[bkd] data: tokenized {len(train.texts):,} training and {len(test.texts):,} test texts with {d.tokenizer} "
          f"into {folder}" + (f"; {reach['train']:,} training and {reach['test']:,} test texts reach max_length="
                              f"{d.max_length} tokens and are cut there (data.max_length sets it)"
                              if reach["train"] or reach["test"] else ""), flush=True)


UNKNOWN_WARN, UNKNOWN_REFUSE = 0.05, 0.50  # shares of the training tokens the tokenizer does not know


def unknown_share(tokenizer: Any, data: TextDataset) -> Optional[float]:
    """The share of the texts' own tokens (special tokens and padding left out) that are the tokenizer's unknown
    token; None for a tokenizer without one (byte-level BPE knows every text)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or len(data) == 0:
        return None
    ids, mask = data.tokens[:, 0].long(), data.tokens[:, 1].bool()
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", [])) - {unk}), dtype=torch.long)
    real = mask & ~torch.isin(ids, special)
    return float(((ids == unk) & real).sum()) / max(1, int(real.sum()))


def check_unknown_tokens(d: TextData, tokenizer: Any, data: TextDataset, source: str) -> Optional[float]:
    """Warn when over 5 % of the training tokens are unknown to the tokenizer; refuse (exit 2) over 50 %: the
    models would read little but the unknown token, and train at chance."""
    share = unknown_share(tokenizer, data)
    if share is None or share <= UNKNOWN_WARN:
        return share
    what = (f"{100 * share:.1f} % of the tokens of {source} are the tokenizer's unknown token "
            f"{getattr(tokenizer, 'unk_token', '[UNK]')!r} (tokenizer: {d.tokenizer})")
    if share > UNKNOWN_REFUSE:
        raise ConfigError("data.tokenizer", f"{what}: it does not know the data's words, and the models would train at "
                          "chance. Give the tokenizer the teacher was trained with (data.tokenizer=FOLDER, or the teacher's "
                          "folder), or check the text column (data.text_column).")
    print(f"[bkd] warning: {what}; the models do not see those words. Check that it is the teacher's own tokenizer "
          "(data.tokenizer).", flush=True)
    return share


def load_text(d: TextData) -> DataSplits:
    """The train and test splits as token ids, from the cache (made first if missing); class names kept."""
    if not d.tokenizer:
        raise ConfigError("data.tokenizer", "is not set: give pair.teacher=hf:FOLDER (its tokenizer is used) or "
                          "data.tokenizer=FOLDER.")
    tokenizer = load_tokenizer(d.tokenizer)
    folder = cache_folder(d, tokenizer)
    if not (folder / "meta.json").is_file():
        build_cache(d, tokenizer, folder)
    names = json.loads((folder / "labels.json").read_text())
    train = mapped_split(folder, "train", len(names), "text/train")
    test = mapped_split(folder, "test", len(names), "text/test")
    return DataSplits(train, test, classes=[str(n) for n in names])  # type: ignore[arg-type]
