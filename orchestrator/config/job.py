"""Validate a composed config before Ray starts and resolve it into a ``Job``; a trial's ``TrainConfig``.

Every problem found here is a ``ConfigError`` that names the key and the fix; the entry points print
it as one paragraph and exit with code 2, before any Ray or MLflow work."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bkd_core import data as bkd_data
from bkd_core import methods
from bkd_core.exactness import evaluating
from bkd_core.forms import FormError, infer_form
from bkd_core.losses import LOGIT_LOSSES
from bkd_core.methods import MethodParamError
from bkd_core.train import TrainConfig
from orchestrator.config.checks import ConfigError, check_fixed, check_number, check_values
from orchestrator.config.compose import absolute_path
from orchestrator.config.hf_models import check_lm_pair, check_text_pair, hf_source, is_hf
from orchestrator.config.models import block_names, build_model, check_pretrained, spec_name
from orchestrator.config.schema import BkdConfig, LMData, ParquetData, TextData
from orchestrator.data.datasets import (
    dataset_spec,
    describe_dataset,
    example_batch,
    image_of,
    is_text_shape,
    selects_on_test,
    val_fraction,
)
from orchestrator.data.text import default_cache_dir, load_tokenizer
from search_spaces.space import (
    SearchSpaceError,
    TrialParams,
    defaults,
    for_data,
    method_arguments,
    method_of,
    partitions,
    with_lr_range,
)


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
    classes: Optional[list[str]] = None  # class names in class-id order, where the data names them
    majority: Optional[dict[str, tuple[int, int]]] = None  # "val", "test": (the largest class's count, examples)
    token_level: bool = False  # a causal LM's data: scored per target token, selected on val_loss (lower is better)

    @property
    def unit(self) -> str:
        """What the dataset's samples are, in messages: images, texts, or a language model's examples."""
        return "examples" if self.token_level else "texts" if is_text_shape(self.shape) else "images"

    def mlflow_input(self) -> dict[str, str]:
        """Name, digest and source, JSON-able (it travels in queued MLflow writes)."""
        return {"name": self.name, "digest": self.digest, "source": self.source}


@dataclass
class Job:
    """The validated, resolved configuration that travels to Ray (plain, picklable values)."""

    cfg: BkdConfig  # the typed configuration (orchestrator.config.schema), paths made absolute
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
        channels = min(self.in_channels, 2) if self.dataset.token_level else self.in_channels  # ULD's teacher: its own ids
        classes = None if self.dataset.token_level else self.num_classes  # an LM's vocabulary: its tokenizer (below)
        spec = {"model": self.teacher_model, "classes": classes, "channels": channels,
                "data": d.name, "root": d.root, "train_size": d.train_size,
                "val": [val_fraction(d), getattr(d, "split_seed", 0)],  # a teacher never trained on the val split
                "teacher": {k: v for k, v in asdict(self.cfg.teacher).items() if k not in ("checkpoint", "allow_chance")},
                "seed": self.cfg.train.seed}
        t = self.cfg.train  # how the teacher's optimizer and schedule are made (train.*, shared with the trials)
        spec["optimizer"] = [t.optimizer, t.momentum, t.weight_decay, t.schedule, t.warmup_epochs, list(t.milestones), t.lr_base_batch]
        if isinstance(d, TextData):  # the same texts, tokenized the same way
            spec["text"] = [d.hub, d.hub_config, d.test_split, d.text_column, d.text_pair_column, d.label_column, d.max_length,
                            d.tokenizer]
        if isinstance(d, LMData):
            spec["lm"] = [d.prompt_column, d.response_column, d.chat_template, t.grad_clip, d.pack]
        return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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
    if d.name not in bkd_data.DATASETS and not isinstance(d, TextData):
        raise ConfigError("data.name", f"unknown dataset {d.name!r}; valid: {', '.join(bkd_data.DATASETS)}, text.")
    check_modality(c, command)
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
    if isinstance(d, LMData):
        check_lm_pair(c, teacher, student, load_tokenizer(d.tokenizer))
    elif isinstance(d, TextData):
        check_text_pair(c, teacher, student, load_tokenizer(d.tokenizer))
    c.search = for_data(with_lr_range(c.search, c.train.lr_range), isinstance(d, LMData))  # checked with every key (schema)
    search = c.search
    try:
        method = method_of(search)
    except ValueError as exc:
        raise ConfigError("search.method", f"{exc} (none: the student alone).") from None
    if command != "compare":
        check_method_applies(method.name, c, "search")
    if method.pairs_blocks and teacher.num_blocks != student.num_blocks:
        teacher, student = group_blocks(c, teacher, student, shape)
    if method.pairs_blocks and teacher.num_blocks != student.num_blocks:
        ends = {role: block_names(spec, net, blocks) for role, spec, net, blocks in
                (("teacher", c.pair.teacher, teacher, c.pair.teacher_blocks), ("student", c.pair.student, student, c.pair.student_blocks))}
        raise ConfigError(
            "pair", f"teacher {spec_name(c.pair.teacher)} has {teacher.num_blocks} blocks (ending at {', '.join(ends['teacher'])}) "
            f"and student {spec_name(c.pair.student)} has {student.num_blocks} (ending at {', '.join(ends['student'])}): "
            f"{method.summary} needs the same count. Name as many block ends for each with pair.teacher_blocks=[...] and "
            "pair.student_blocks=[...] (modules whose outputs end a block, in forward order), pick a pair from conf/pair, "
            "or use a logit baseline (search=kd).")
    if method.reads_blocks:
        check_forms(c, {"teacher": teacher, "student": student}, shape.image_shape)
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
    check_method_params(search, defaults(search, student.num_blocks, c.fixed),
                        lambda name: f"fixed.{name}" if name in c.fixed else f"search.params.{name}", teacher, student, shape.image_shape)

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
                          selection="test" if selects_on_test(d) else "val", classes=shape.classes, majority=shape.majority,
                          token_level=shape.token_level)
    return Job(c, shape.num_classes, shape.in_channels, student.num_blocks, options, storage,
               _tracking_uri(c.mlflow.tracking_uri), output_dir, name, dataset)


def group_blocks(c: BkdConfig, teacher: Any, student: Any, shape: Any) -> tuple[Any, Any]:
    """A model with more blocks than its partner, cut where bkd found its blocks (no ``pair.*_blocks``), is
    grouped into as many runs of consecutive blocks; the grouping is printed and kept in ``pair.*_blocks``
    (every worker cuts the same way)."""
    nets = {"teacher": teacher, "student": student}
    more, fewer = ("teacher", "student") if teacher.num_blocks > student.num_blocks else ("student", "teacher")
    net, k = nets[more], nets[fewer].num_blocks
    ends = getattr(net, "block_ends", None)
    if getattr(c.pair, f"{more}_blocks") or not ends:
        return teacher, student  # named by the user, or a zoo model built as blocks: the count error says what to do
    lead = min(getattr(net, "lead_blocks", 0), k - 1)  # a text encoder's embeddings stay a block of their own
    rest = ends[lead:]
    grouped = ends[:lead] + [rest[round((g + 1) * len(rest) / (k - lead)) - 1] for g in range(k - lead)]
    setattr(c.pair, f"{more}_blocks", grouped)
    nets[more] = build_model(c, more, shape.num_classes, shape.in_channels, shape.image_shape, check=True)
    print(f"[bkd] the {more}'s {len(ends)} blocks (ending at {', '.join(ends)}) are grouped into {k} to pair with the "
          f"{fewer}'s: they end at {', '.join(grouped)} (pair.{more}_blocks=[...] sets them)", flush=True)
    return nets["teacher"], nets["student"]


LM_METHODS = ("blockkd", "blockkd_fixed_partition", "kd", "none", "fitnet", "uld")  # what distils causal LMs (data=lm)


def check_method_applies(name: str, c: BkdConfig, key: str) -> None:
    """A method that cannot apply to the data is a ConfigError saying why: ULD outside data=lm, image feature and
    relation methods on a causal LM's tokens."""
    lm = isinstance(c.data, LMData)
    if name == "uld" and not lm:
        raise ConfigError(key, "uld distils causal language models of two tokenizers (data=lm, decoder hf: models); for "
                          f"data={c.data.name} use kd, blockkd or another method of the same vocabulary.")
    if lm and name not in LM_METHODS:
        raise ConfigError(key, f"{name} does not apply to causal LMs: it matches image-style features, attention maps or "
                          "relations between examples, where a decoder gives a sequence of next-token distributions. "
                          f"On data=lm bkd distils with {', '.join(LM_METHODS)}.")


def check_modality(c: BkdConfig, command: str = "tune") -> None:
    """Text data with ``hf:`` text models, images with image models; ``data=text``'s source, tokenizer and cache
    made absolute (every worker reads the same); ``data=lm`` with ULD among the methods: the student's tokenizer too."""
    d, text = c.data, isinstance(c.data, TextData)
    for role in ("teacher", "student"):
        spec = getattr(c.pair, role)
        if text and not is_hf(spec):
            raise ConfigError(f"pair.{role}", f"{spec_name(spec)} is an image model, and data=text feeds token ids: give a "
                              f"Hugging Face sequence classifier, pair.{role}=hf:FOLDER_OR_HUB_NAME.")
        if is_hf(spec) and not text:
            raise ConfigError(f"pair.{role}", f"{spec} is a text classifier, and data={d.name} holds images: use data=text "
                              "(data.root=FOLDER with train and test files), or an image model.")
    if not text:
        return
    if bool(d.root) == bool(d.hub):
        raise ConfigError("data.root", "data=text reads either a folder (data.root=FOLDER with train.csv/.jsonl/.parquet and "
                          "test.*) or a Hugging Face dataset (data.hub=NAME data.hub_config=CONFIG); give exactly one.")
    d.tokenizer = hf_source(d.tokenizer or c.pair.teacher)
    methods_run = list(c.compare.methods or []) if command == "compare" else [(c.search or {}).get("method")]
    if isinstance(d, LMData) and "uld" in methods_run:  # ULD's student reads its own ids, the teacher the teacher's
        d.student_tokenizer = hf_source(d.student_tokenizer or c.pair.student)
    d.cache_dir = absolute_path(d.cache_dir or default_cache_dir())
    check_writable("data.cache_dir", d.cache_dir)


def check_forms(c: BkdConfig, nets: dict[str, Any], image_shape: list[int]) -> None:
    """Every block output has a form a connector bridges (``bkd_core.forms``), before Ray starts."""
    sample = example_batch(image_shape)
    for role, net in nets.items():
        spec, blocks = getattr(c.pair, role), getattr(c.pair, f"{role}_blocks")
        names = block_names(spec, net, blocks)
        try:
            with evaluating(net):
                outputs = net.features(sample)
        except Exception as exc:  # e.g. a zoo model built for larger images
            raise ConfigError(f"pair.{role}", f"{spec_name(spec)} does not run on {'x'.join(map(str, image_shape))} images "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); pick a model for this image size "
                              "(data.image_size sets it for image folders and shards).") from None
        for i, out in enumerate(outputs):
            try:
                infer_form(out.shape[1:], image_of(image_shape), where=f"block {i + 1} of the {role} {spec_name(spec)} (ending at "
                           f"{names[i]})")
            except FormError as exc:
                raise ConfigError(f"pair.{role}_blocks" if blocks else "pair", str(exc)) from None


def check_method_params(space: Mapping[str, Any], params: Mapping[str, Any], key_of: Callable[[str], str], teacher: Any,
                        student: Any, image_shape: Sequence[int]) -> None:
    """The space's method built once on the pair, as a trial builds it, with a configuration's values
    (``params``): a value it cannot use (``fitnet``'s hint_block beyond the blocks, a negative weight,
    ``loca_alpha`` outside (0, 1)) exits 2 here, before Ray; ``key_of`` names its key."""
    try:
        name, kwargs = method_arguments(space, params)
        with evaluating(student):
            methods.make(name, teacher, student, sample_input=example_batch(list(image_shape)), **kwargs)
    except MethodParamError as exc:
        raise ConfigError(key_of(exc.key), str(exc).split(": ", 1)[1]) from None


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
    return TrainConfig(epochs=epochs, batch_size=batch, lr=lr, lr_base_batch=t.lr_base_batch, optimizer=t.optimizer, momentum=t.momentum,
                       weight_decay=t.weight_decay, schedule=t.schedule, warmup_epochs=t.warmup_epochs, grad_clip=t.grad_clip,
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
