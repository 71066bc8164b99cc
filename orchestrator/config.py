"""Compose the Hydra config, validate it before Ray starts, and resolve it into a ``Job``.

Every problem found here is a ``ConfigError`` that names the key and the fix; the entry points print
it as one paragraph and exit with code 2, before any Ray or MLflow work.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bkd_core import data as bkd_data
from bkd_core.losses import LOGIT_LOSSES
from bkd_core.train import TrainConfig
from search_spaces.space import SearchSpaceError, TrialParams, method_of, partitions

from .checks import ConfigError, check_fixed, check_number, check_values
from .mlflow_extras import dataset_spec
from .model_spec import block_names, spec_name
from .schema import BkdConfig, DataConfig, ImageFolderData, ParquetData

__all__ = ["ConfigError", "Job", "check_number", "compose", "validate"]


OPEN_MAPPINGS = ("fixed.", "compare.fixed.", "compare.from_search.")  # keys added without Hydra's `+`


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The composed config for command-line ``overrides`` (Hydra's compose API: no chdir, no outputs/),
    typed by the schema (``orchestrator.schema``).

    ``fixed.KEY=VALUE`` (and ``compare.fixed.*``, ``compare.from_search.*``) adds a key to an open
    mapping (Hydra would want ``+fixed.KEY``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    from .schema import register

    register()
    given = [f"+{o}" if o.startswith(OPEN_MAPPINGS) else o for o in overrides]
    try:
        with initialize_config_module(config_module="orchestrator.conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=given)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _override_error(str(exc), overrides, config_name) from None


def _override_error(text: str, overrides: list[str], config_name: str) -> ConfigError:
    from .checks import EVERY_KEY, unknown_key
    from .schema import BkdConfig, PrepareConfig, find_key

    missing = re.search(r"Could not find '(\w+)/([^']+)'", text)
    if missing:
        group, option = missing.groups()
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        return ConfigError(group, f"unknown {group} {option!r}; available: {', '.join(options)}. Pick one with {group}=NAME.")
    merging = re.search(r"Error merging override \+?([\w.]+)=(.*)", text)
    schema = PrepareConfig if config_name == "prepare" else BkdConfig
    if merging:  # a value of the wrong type for its key
        name, value = merging.groups()
        key = find_key(name, schema)
        if key is not None:
            return ConfigError(name, f"must be {key.wanted()}; got {value.strip()!r}.")
    found = re.search(r"override '\+?([^']+)'|Key '([^']+)'", text)
    name = next((g for g in found.groups() if g), "overrides") if found else "overrides"
    if "Could not override" in text and name != "overrides":
        others = [o for o in overrides if not o.lstrip("+").startswith(f"{name}=")]
        section = name.rpartition(".")[0]
        try:
            base = compose(others, config_name)
            node = OmegaConf.select(base, section) if section else base
        except ConfigError:
            node = None
        return unknown_key(name, node, OmegaConf.get_type(node) if isinstance(node, DictConfig) else None)
    first = " ".join(text.strip().split("\n\n")[0].splitlines())
    return ConfigError(name, f"{first} {EVERY_KEY}")


@dataclass
class DatasetInfo:
    """What the driver learnt of the dataset: the MLflow input of every run (``mlflow_input``), a model
    input's shape, images per split, the shard folder of each split (streamed data) and which split selects."""

    name: str
    digest: str
    source: str
    shape: list[int]  # [C, H, W]
    rows: dict[str, int]  # train (after the hold-out and data.train_size), val, test
    folders: Optional[dict[str, str]]
    selection: str  # "val", or "test" with data.val_fraction=0

    def mlflow_input(self) -> dict[str, str]:
        """Name, digest and source, JSON-able (it travels in queued MLflow writes)."""
        return {"name": self.name, "digest": self.digest, "source": self.source}


@dataclass
class Job:
    """The validated, resolved configuration that travels to Ray (plain, picklable values)."""

    cfg: BkdConfig  # the typed configuration (orchestrator.schema), paths made absolute
    num_classes: int
    in_channels: int
    num_blocks: int
    partitions: list[str]
    storage_path: str
    tracking_uri: str
    output_dir: str
    experiment_name: str
    dataset: DatasetInfo

    @property
    def teacher_model(self) -> Any:
        return self.cfg.pair.teacher

    @property
    def student_model(self) -> Any:
        return self.cfg.pair.student

    @property
    def selects_on_test(self) -> bool:
        return self.dataset.selection == "test"

    def split_sizes(self) -> dict[str, int]:
        """``train_images``, ``val_images``, ``test_images``: the params every run logs."""
        rows = self.dataset.rows
        return {"train_images": rows["train"], "val_images": 0 if self.selects_on_test else rows["val"],
                "test_images": rows["test"]}

    @property
    def pair_name(self) -> str:
        return f"{spec_name(self.teacher_model)}->{spec_name(self.student_model)}"

    def teacher_key(self) -> str:
        """Identifies a teacher training: same key, same teacher (reused instead of retrained)."""
        d = self.cfg.data
        spec = {"model": self.teacher_model, "classes": self.num_classes, "channels": self.in_channels,
                "data": d.name, "root": d.root, "train_size": d.train_size,
                "val": [val_fraction(d), getattr(d, "split_seed", 0)],  # a teacher never trained on the val split
                "teacher": {k: v for k, v in asdict(self.cfg.teacher).items() if k != "checkpoint"}, "seed": self.cfg.train.seed}
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

DEFAULT_VAL_FRACTION = 0.1


def val_fraction(data_cfg: DataConfig) -> float:
    """The share of the training data held out for selection: ``data.val_fraction``; null: 0.1, or for
    Parquet shards the split their ``prepare`` held out."""
    if data_cfg.val_fraction is not None:
        return float(data_cfg.val_fraction)
    if isinstance(data_cfg, ParquetData):
        return bkd_data.ShardLayout.of(data_cfg.root).val_fraction
    return DEFAULT_VAL_FRACTION


def selects_on_test(data_cfg: DataConfig) -> bool:
    """``data.val_fraction=0``: nothing held out, the search selects on the test split."""
    return val_fraction(data_cfg) == 0


def load_dataset(data_cfg: DataConfig) -> bkd_data.DataSplits:
    """The dataset a config names: ``val`` held out of the training data (``data.val_fraction``,
    ``data.split_seed``; Parquet shards bring their own), then ``train_size`` applied to what is left
    (used by validation and workers)."""
    extra: dict[str, Any] = {"image_size": data_cfg.image_size} if isinstance(data_cfg, (ImageFolderData, ParquetData)) else {}
    if isinstance(data_cfg, ParquetData):  # the shards hold val apart: decode no more training images than used
        extra["train_size"] = data_cfg.train_size
    splits = bkd_data.load(data_cfg.name, data_cfg.root, **extra)
    if isinstance(data_cfg, ParquetData):
        if selects_on_test(data_cfg):
            splits.val = None
    else:
        splits = splits.hold_out(val_fraction(data_cfg), data_cfg.split_seed)
    if data_cfg.train_size:
        splits.train = splits.train.subset(data_cfg.train_size)
    return splits


def shard_folders(data_cfg: ParquetData) -> dict[str, str]:
    """The shard folder of each split a streamed trial reads: train, val (the test folder when the
    search selects on test) and test; a ConfigError when data.val_fraction does not match the shards."""
    layout = bkd_data.ShardLayout.of(data_cfg.root)
    wanted = data_cfg.val_fraction
    if wanted is not None and float(wanted) > 0 and abs(float(wanted) - layout.val_fraction) > 1e-9:
        had = (f"were prepared with val_fraction={layout.val_fraction:g}" if layout.val else
               "hold no validation split (they were written before prepare held one out, or with val_fraction=0)")
        raise ConfigError("data.val_fraction", f"{wanted} does not match the shards in {data_cfg.root}, which {had}. "
                          "Drop data.val_fraction to use the shards' split, set data.val_fraction=0 to select on the test "
                          f"split, or write the shards again: python -m orchestrator.prepare source=SRC output={data_cfg.root} "
                          f"val_fraction={wanted}.")
    val = layout.val if layout.val and not (wanted is not None and float(wanted) == 0) else layout.test
    return {"train": layout.train, "val": val, "test": layout.test}


def is_streamed(data_cfg: DataConfig) -> bool:
    """Parquet shards streamed by Ray Data (``data.in_memory=false``), not decoded into RAM."""
    return isinstance(data_cfg, ParquetData) and not data_cfg.in_memory


@dataclass(frozen=True)
class DataShape:
    """What the driver needs to know of a dataset: classes, channels, sizes of the splits."""

    num_classes: int
    in_channels: int
    train: int  # training images (after the hold-out and data.train_size)
    val: int  # images of the split that selects (the test split's when data.val_fraction=0)
    test: int
    image_shape: list[int]  # [C, H, W] of a model input
    folders: Optional[dict[str, str]] = None  # streamed shards: the folder of each split


def describe_dataset(d: DataConfig) -> DataShape:
    """The dataset's shape: streamed shards from their metadata alone (nothing decoded here), other
    datasets by loading them."""
    try:
        if is_streamed(d):
            folders = shard_folders(d)
            train, val, test = (bkd_data.ParquetImages(d.root, folders[split]) for split in ("train", "val", "test"))
            rows = min(len(train), d.train_size) if d.train_size else len(train)
            size = d.image_size
            return DataShape(len(train.classes), 3, rows, len(val), len(test), [3, size, size], folders)
        if isinstance(d, ParquetData):
            shard_folders(d)  # data.val_fraction against the shards
        splits = load_dataset(d)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError("data.root", f"{exc}") from None
    except OSError as exc:  # a bucket that cannot be reached or read
        raise ConfigError("data.root", f"cannot read {d.root}: {exc}. Check the URI and the credentials "
                          "(AWS_* / GOOGLE_APPLICATION_CREDENTIALS, AWS_ENDPOINT_URL for an S3-compatible server).") from None
    return DataShape(splits.num_classes, splits.in_channels, len(splits.train), len(splits.selection), len(splits.test),
                     list(splits.test.images.shape[1:]))


def absolute_path(path: str) -> str:
    """A local path made absolute (workers run elsewhere); URIs as they are."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _tracking_uri(value: Optional[str]) -> str:
    value = value or os.environ.get("MLFLOW_TRACKING_URI")
    if not value:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
        return f"sqlite:///{Path(value[len('sqlite:///'):]).resolve()}"  # relative -> absolute for workers
    if "://" not in value:
        raise ConfigError("mlflow.tracking_uri", f"{value!r} is not a URI; use sqlite:///PATH/mlflow.db or http://HOST:5000.")
    return value


def validate(cfg: DictConfig, need_teacher_checkpoint_check: bool = True, command: str = "tune") -> Job:
    """Check every key against the schema, then names, paths, the search space and a teacher checkpoint;
    the typed configuration, paths made absolute, in a ``Job``."""
    try:
        OmegaConf.resolve(cfg)
        missing = sorted(OmegaConf.missing_keys(cfg))
    except OmegaConfBaseException as exc:
        raise ConfigError("config", str(exc)) from None
    if missing:
        key = missing[0]
        hint = "data.root=PATH (the directory holding the dataset files)" if key == "data.root" else f"{key}=VALUE"
        raise ConfigError(key, f"is required for this configuration; pass {hint} on the command line.")
    if not isinstance(cfg.data, DictConfig) or not dataclasses.is_dataclass(OmegaConf.get_type(cfg.data)):
        raise ConfigError("data", "this data group names no schema; start its YAML with `defaults: [/schema/data@_here_: "
                          "image_folder, _self_]` (or builtin, parquet: see docs/reference/config.md).")
    check_values(cfg)  # every key against the schema, before anything uses them
    c: BkdConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]

    d = c.data
    if d.name not in bkd_data.DATASETS:
        raise ConfigError("data.name", f"unknown dataset {d.name!r}; valid: {', '.join(bkd_data.DATASETS)}.")
    if not isinstance(d, ParquetData) and d.in_memory is False:
        raise ConfigError("data.in_memory", f"false streams Parquet shards, and data={d.name} is read into memory; "
                          "for streaming, write shards with `python -m orchestrator.prepare source=FOLDER output=DST` "
                          "and train with data=parquet data.root=DST.")
    if d.root:
        d.root = absolute_path(d.root)
        if "://" not in d.root and not Path(d.root).is_dir():
            raise ConfigError("data.root", f"directory {d.root} does not exist; point data.root at the {d.name} files.")
    shape = describe_dataset(d)

    teacher, student = (build_model(c, role, shape.num_classes, shape.in_channels, shape.image_shape, check=True)
                        for role in ("teacher", "student"))
    search = c.search
    try:
        method = method_of(search)
    except ValueError as exc:
        raise ConfigError("search.method", f"{exc} (none: the student alone).") from None
    if method.uses_partition and teacher.num_blocks != student.num_blocks:
        ends = {role: block_names(spec, net, blocks) for role, spec, net, blocks in
                (("teacher", c.pair.teacher, teacher, c.pair.teacher_blocks), ("student", c.pair.student, student, c.pair.student_blocks))}
        raise ConfigError(
            "pair", f"teacher {spec_name(c.pair.teacher)} has {teacher.num_blocks} blocks (ending at {', '.join(ends['teacher'])}) "
            f"and student {spec_name(c.pair.student)} has {student.num_blocks} (ending at {', '.join(ends['student'])}): "
            "Block-KD needs the same count. Name as many block ends for each with pair.teacher_blocks=[...] and "
            "pair.student_blocks=[...] (modules whose outputs end a block, in forward order), pick a pair from conf/pair, "
            "or use a logit baseline (search=kd).")
    try:
        options = partitions(search, student.num_blocks)
    except SearchSpaceError as exc:
        raise ConfigError("search.partition", str(exc)) from None
    losses = search.get("params", {}).get("logit_loss", "kd")
    choices = losses.get("choices", [losses.get("default")]) if isinstance(losses, dict) else [losses]
    bad = [x for x in choices if x not in LOGIT_LOSSES]
    if bad:
        raise ConfigError("search.params.logit_loss", f"unknown logit loss {bad}; valid: {', '.join(LOGIT_LOSSES)}.")
    check_fixed(c.fixed, search, student.num_blocks)

    check_pretrained(c, "teacher", teacher)
    check_pretrained(c, "student", student)
    checkpoint = c.teacher.checkpoint
    if checkpoint and need_teacher_checkpoint_check and "://" not in str(checkpoint) and not str(checkpoint).startswith("runs:"):
        c.teacher.checkpoint = absolute_path(checkpoint)
        from bkd_core.train import load_state_checked
        try:
            load_state_checked(teacher, c.teacher.checkpoint, what=f"teacher checkpoint (teacher.checkpoint={checkpoint})")
        except ValueError as exc:
            raise ConfigError("teacher.checkpoint", f"{exc}") from None

    tr = c.train
    try:  # the trainer's own checks; the searched lr is the search space's
        train_config(c, {"lr": 1.0}, "distill")
    except ValueError as exc:
        key = re.match(r"train\.\w+", str(exc))
        raise ConfigError(key.group(0) if key else "train", str(exc)) from None
    for key in ("warmup_epochs", "distill_warmup_epochs"):
        check_number(f"train.{key}", getattr(tr, key), lambda v: 0 <= v <= tr.epochs,
                     f"a number of epochs in [0, train.epochs={tr.epochs}]")
    check_batch_fits(c, shape.train)

    storage = absolute_path(c.ray.storage_path or os.environ.get("BKD_STORAGE_PATH") or str(Path.cwd() / "results" / "ray"))
    output_dir = absolute_path(c.output_dir or "results")
    check_writable("ray.storage_path", storage)
    check_writable("output_dir", output_dir)
    t = c.tune
    name = str(t.name) if t.name is not None else default_experiment_name(c, storage, t.resume, command)
    rows = {"train": shape.train, "val": shape.val, "test": shape.test}
    dataset = DatasetInfo(**dataset_spec(d, rows), shape=shape.image_shape, rows=rows, folders=shape.folders,
                          selection="test" if selects_on_test(d) else "val")
    return Job(c, shape.num_classes, shape.in_channels, student.num_blocks, options, storage,
               _tracking_uri(c.mlflow.tracking_uri), output_dir, name, dataset)


def check_pretrained(c: BkdConfig, role: str, model: Any) -> None:
    """``teacher.init`` / ``student.init``: made absolute, loaded once here, and what it loads printed."""
    section = c.teacher if role == "teacher" else c.student
    path = section.init
    if not path:
        return
    if role == "teacher" and c.teacher.checkpoint:
        raise ConfigError("teacher.init", "and teacher.checkpoint are both set: teacher.checkpoint is a trained teacher (used as "
                          "it is), teacher.init a starting point fine-tuned for teacher.epochs; keep one.")
    section.init = absolute_path(str(path))
    from bkd_core.train import load_pretrained

    try:
        report = load_pretrained(model, section.init, what=f"{role}.init")
    except ValueError as exc:
        raise ConfigError(f"{role}.init", str(exc)) from None
    print(f"[bkd] {role}.init={path}: {report.summary()}", flush=True)


def build_model(c: BkdConfig, role: str, num_classes: int, in_channels: int, image_shape: list[int],
                check: bool = False) -> Any:
    """``pair.<role>`` as a BlockNet (``orchestrator.model_spec``), cut the same way in the driver and every
    worker; ``check``: prove the cut on a sample (validation does, once, before Ray starts)."""
    from .model_spec import build

    spec, blocks = (c.pair.teacher, c.pair.teacher_blocks) if role == "teacher" else (c.pair.student, c.pair.student_blocks)
    return build(spec, num_classes, in_channels, image_shape, f"pair.{role}", blocks, check)


def check_batch_fits(c: BkdConfig, train_images: int) -> None:
    """Each worker's share of a batch must fit in its share of the training set (full batches only)."""
    workers = c.resources.workers_per_trial
    per_worker = train_images // workers
    for key, batch in (("train.batch_size", c.train.batch_size), ("teacher.batch_size", c.teacher.batch_size)):
        if key == "teacher.batch_size" and c.teacher.checkpoint:
            continue
        if max(1, batch // workers) > per_worker:
            raise ConfigError(key, f"{batch} (global, {max(1, batch // workers)} per worker x {workers} workers) is more than "
                              f"the {per_worker} training images each worker has ({train_images} in all"
                              f"{', data.train_size' if c.data.train_size else ''}); lower {key} to at most "
                              f"{per_worker * workers}, or train on more images.")


def train_config(c: BkdConfig, params: Mapping[str, Any], mode: str) -> TrainConfig:
    """The trainer's settings of a trial (``mode="distill"``: lr and seed from its parameters) or of the teacher."""
    t = c.train
    if mode == "teacher":
        epochs, lr, batch, seed = c.teacher.epochs, c.teacher.lr, c.teacher.batch_size, t.seed
    else:
        trial = TrialParams.of(params)
        if trial.lr is None:
            raise SearchSpaceError("a trial's parameters have no lr; every search space declares search.params.lr.")
        epochs, lr, batch, seed = t.epochs, trial.lr, t.batch_size, trial.seed_or(t.seed)
    return TrainConfig(epochs=epochs, batch_size=batch, lr=lr, lr_base_batch=t.lr_base_batch, momentum=t.momentum,
                       weight_decay=t.weight_decay, schedule=t.schedule, warmup_epochs=t.warmup_epochs,
                       milestones=tuple(t.milestones), bf16=t.bf16, channels_last=t.channels_last, compile=t.compile,
                       cudnn_benchmark=t.cudnn_benchmark, compile_mode=t.compile_mode, seed=seed)


def check_writable(key: str, path: str) -> None:
    """A local directory we can create and write to (URIs such as s3:// are checked by Ray itself)."""
    if "://" in path:
        return
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        probe = Path(path) / ".bkd-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(key, f"cannot write to {path} ({exc.strerror or exc}); choose a writable directory with {key}=PATH.") from None


def default_experiment_name(c: BkdConfig, storage: str, resume: bool, command: str = "tune") -> str:
    """``bkd-<search>-<pair>-<data>-<time>``; on resume, the latest existing one with that prefix."""
    kind = c.search.get("name", "search") if command == "tune" else command
    prefix = f"bkd-{kind}-{spec_name(c.pair.teacher)}-{spec_name(c.pair.student)}-{c.data.name}"
    if resume and "://" not in storage and Path(storage).is_dir():
        found = sorted(p.name for p in Path(storage).iterdir() if p.name.startswith(prefix + "-"))
        if found:
            return found[-1]
        raise ConfigError("tune.resume", f"no earlier experiment {prefix}-* under {storage} to resume; pass tune.name=NAME or drop tune.resume.")
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def apply_env_defaults() -> None:
    """Environment that every entry point wants before Ray starts."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
