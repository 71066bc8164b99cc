"""The configuration schema: every key of ``tune``, ``train``, ``teacher``, ``student``, ``compare``,
``resources``, ``ray``, ``mlflow``, ``pair``, each ``data`` group and ``prepare``, with its type, default,
allowed values and a one-line doc. The single source for Hydra (structured configs in its ConfigStore),
for validation before Ray starts (``orchestrator.config.checks``), for the typed object the code reads, and
for the reference page (``python -m orchestrator.reference``).

The YAML files under ``conf/`` keep only what differs per group (a dataset, a pair, a recipe).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union, get_args, get_origin, get_type_hints

MISSING = "???"  # a key that must be given on the command line


@dataclass(frozen=True)
class Check:
    """What a value must be beyond its type: ``ok(value)`` for numbers, else one of ``choices``;
    ``wanted`` says it in words (after "must be")."""

    wanted: str
    ok: Optional[Callable[[Any], bool]] = None
    choices: tuple[str, ...] = ()


def setting(default: Any, doc: str, check: Optional[Check] = None, applies: str = "") -> Any:
    """A schema field: its default, its doc, its check; ``applies``: when the key is read (for the docs)."""
    meta = {"doc": doc, "check": check, "applies": applies}
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low: float, what: str = "", integer: bool = True) -> Check:
    noun = "an integer" if integer else "a number"
    return Check(f"{noun} >= {low:g}{what}", lambda v: v >= low)


def above(low: float, what: str = "") -> Check:
    return Check(f"a number > {low:g}{what}", lambda v: v > low)


def one_of(*options: str) -> Check:
    return Check(f"one of {', '.join(options)}", choices=options)


SECONDS_POSITIVE = Check("a number of seconds > 0", lambda v: v > 0)
SECONDS = Check("a number of seconds >= 0", lambda v: v >= 0)
COMPILE_MODES = ("reduce-overhead", "default", "max-autotune-no-cudagraphs")


# --- data groups: one schema per kind of dataset -------------------------------------------------------

def train_size_setting(unit: str) -> Any:
    return setting(None, f"use at most this many training {unit}, after the hold-out (null: all)",
                   at_least(1, f" (a number of training {unit}), or null for all"))


def val_fraction_setting(unit: str) -> Any:
    return setting(0.1, f"held out of the training {unit} (stratified by class) for selection; 0: select on the test split",
                   Check(f"a fraction of the training {unit} in [0, 0.5] to hold out for selection (0: select on the test "
                         "split)", lambda v: 0 <= v <= 0.5))


def split_seed_setting(unit: str) -> Any:
    return setting(0, f"which {unit} are held out: the same for every trial, method, teacher and seed")


@dataclass
class BuiltinData:
    """A dataset read into memory: digits (embedded), mnist, fashion_mnist, cifar10, cifar100."""

    name: str = setting("digits", "the dataset's loader")
    root: Optional[str] = setting(None, "the directory holding the dataset's files (digits: none)")
    train_size: Optional[int] = train_size_setting("images")
    in_memory: bool = setting(True, "decoded once into RAM, augmented on the device (the fast path for data that fits)")
    val_fraction: Optional[float] = val_fraction_setting("images")
    split_seed: int = split_seed_setting("images")


@dataclass
class ImageFolderData(BuiltinData):
    """root/train/<class>/<image> and root/val/<class>/<image> (the test split), decoded once."""

    name: str = setting("image_folder", "the dataset's loader")
    root: str = setting(MISSING, "root/train/<class>/<image> and root/val/<class>/<image>")
    image_size: int = setting(64, "pixels: the short side resized to this, the centre cropped (aspect ratio kept)",
                              at_least(8, " (pixels)"))


@dataclass
class ParquetData:
    """Parquet shards written by ``python -m orchestrator.prepare`` (a local folder, s3://... or gs://...)."""

    name: str = setting("parquet", "the dataset's loader")
    root: str = setting(MISSING, "DST of `python -m orchestrator.prepare source=SRC output=DST`")
    train_size: Optional[int] = setting(None, "use at most this many training images (null: all)",
                                        at_least(1, " (a number of training images), or null for all"))
    image_size: int = setting(224, "pixels; train: RandomResizedCrop (scale 0.08-1) + flip; val/test: resize to "
                              "image_size*8/7, centre crop", at_least(8, " (pixels)"))
    in_memory: bool = setting(False, "false: streamed by Ray Data (memory flat in the dataset's size); true: decoded "
                              "once into each trial's RAM at image_size")
    cpus_per_trial: float = setting(1.0, "CPUs kept free beside every running trial for its decode tasks (a GPU trial "
                                    "at 224 px wants 8 or more)", Check("a number of CPUs > 0 for each trial's decode tasks (fractions "
                                    "are fine)", lambda v: v > 0), "streamed")
    shuffle_buffer: int = setting(0, "rows of an extra shuffle buffer in the trial, in decoded images (0: none; every "
                                  "epoch has a new file order and decode batches in random order)",
                                  at_least(0, " (rows; 0: no extra shuffle buffer)"), "streamed")
    val_fraction: Optional[float] = setting(
        None, "null: the shards' held-out val/ (prepare's val_fraction); 0: select on the test split",
        Check("a fraction in [0, 0.5] (the shards' own; 0: select on the test split), or null for the shards' split",
              lambda v: 0 <= v <= 0.5))


@dataclass
class TextData:
    """Text classification: root/train.* and root/test.* (CSV, JSON Lines or Parquet), or a Hugging Face dataset;
    tokenized once with the teacher's tokenizer and cached as Parquet."""

    name: str = setting("text", "the dataset's loader")
    root: Optional[str] = setting(None, "a folder with train and test files (train.csv / train.jsonl / train.parquet, "
                                  "test.* likewise); null with data.hub")
    hub: Optional[str] = setting(None, "a Hugging Face dataset instead of a folder, e.g. glue (needs `datasets` and the hub)")
    hub_config: Optional[str] = setting(None, "its configuration, e.g. sst2")
    test_split: str = setting("test", "the file (test.*) or hub split scored as the test split (GLUE: validation, its "
                              "test labels are hidden)")
    text_column: str = setting("text", "the column holding each text (GLUE SST-2: sentence)")
    text_pair_column: Optional[str] = setting(None, "a second text column for pair tasks (MNLI: hypothesis); null: none")
    label_column: str = setting("label", "the class column: strings or integers, mapped to class ids 0..K-1 in sorted "
                                "order (saved as labels.json beside the cached tokens)")
    max_length: int = setting(128, "tokens per text at most: longer texts are truncated (the number is printed); at most "
                              "the models' position limit", at_least(8, " (tokens)"))
    tokenizer: Optional[str] = setting(None, "a Hugging Face tokenizer (folder or hub name); null: the teacher's "
                                       "(pair.teacher=hf:...)")
    cache_dir: Optional[str] = setting(None, "where token ids are cached as Parquet, one folder per (data, tokenizer, "
                                       "max_length); null: $BKD_CACHE_DIR, else <cwd>/results/token-cache")
    train_size: Optional[int] = train_size_setting("texts")
    in_memory: bool = setting(True, "token ids are held in RAM (the text path has no streaming of its own)")
    val_fraction: Optional[float] = val_fraction_setting("texts")
    split_seed: int = split_seed_setting("texts")


@dataclass
class LMData(TextData):
    """Causal language modelling: root/train.* and root/test.* (CSV, TSV, JSON Lines or Parquet), or a Hugging Face
    dataset; plain texts (every token a target) or prompt/response pairs (the response's tokens the targets), tokenized
    once with the teacher's tokenizer and cached."""

    name: str = setting("lm", "the dataset's loader")
    text_column: Optional[str] = setting("text", "plain texts: every token (but each text's first) is a target; unused "
                                         "with data.prompt_column and data.response_column")
    prompt_column: Optional[str] = setting(None, "the context of each example: read by the models, never scored (with "
                                           "data.response_column)")
    response_column: Optional[str] = setting(None, "what the models learn to answer: its tokens are the targets")
    chat_template: bool = setting(True, "prompt/response pairs are written in the tokenizer's chat template where it has "
                                  "one (the prompt as the user's turn); false: the prompt's text, then the response's")
    label_column: Optional[str] = setting(None, "unused: a language model's targets are its text's next tokens")
    max_length: int = setting(512, "tokens per example at most: longer examples are cut (the number is printed); at most "
                              "the models' positions", at_least(8, " (tokens)"))
    student_tokenizer: Optional[str] = setting(None, "search=uld: the student's own tokenizer (null: the student's folder's); "
                                               "every other method reads the teacher's ids")
    pack: bool = setting(False, "pack each training batch's examples into rows of up to data.max_length tokens (less "
                         "padding; each example attends to itself alone, its positions from 0); evaluation is not packed")


DataConfig = Union[BuiltinData, ImageFolderData, ParquetData, TextData, LMData]  # the typed ``data`` of a composed config
DATA_SCHEMAS: dict[str, type] = {"builtin": BuiltinData, "image_folder": ImageFolderData, "parquet": ParquetData,
                                 "text": TextData, "lm": LMData}


# --- the sections of `python -m orchestrator.{tune,train,teacher,compare}` ---------------------------------

@dataclass
class PairSettings:
    teacher: Any = setting(MISSING, "a zoo name, module:factory (called with num_classes=, in_channels=), or a Hydra "
                           "node {_target_: module.Class, ...}")
    student: Any = setting(MISSING, "as pair.teacher")
    teacher_blocks: Optional[list[str]] = setting(None, "the modules whose outputs end the teacher's blocks, e.g. "
                                                  "[layer1,layer2,layer3]; null: found from the model")
    student_blocks: Optional[list[str]] = setting(None, "as pair.teacher_blocks, for the student")
    student_config: dict[str, Any] = setting({}, "hf: students: Hugging Face config values that make a new, freshly "
                                             "initialised student from pair.student's config, e.g. {num_hidden_layers: 4, "
                                             "hidden_size: 312, intermediate_size: 1200} (TinyBERT's shape)")
    student_from_teacher: bool = setting(False, "hf: students: start from the teacher's embeddings and layers (DistilBERT's "
                                         "way): student layer j takes the last teacher layer of group j; the hidden "
                                         "sizes must match")


@dataclass
class TrainSettings:
    epochs: int = setting(4, "epochs of every trial", at_least(1))
    batch_size: int = setting(64, "global batch, split across a trial's workers", at_least(1))
    lr_base_batch: Optional[int] = setting(
        64, "the (searched) lr is for this batch; scaled linearly to batch_size. null: no scaling",
        at_least(1, " (the batch size the lr is given for), or null for no scaling"))
    optimizer: str = setting("sgd", "sgd: SGD with momentum (images) | adamw: AdamW (text encoders; train.schedule=linear "
                             "with a warm-up is the usual recipe)", one_of("sgd", "adamw"))
    lr_range: Optional[list[float]] = setting(
        None, "[low, high, default]: the searched lr of every method's space (log scale), e.g. AdamW's [1e-5, 2e-4, 5e-5] "
        "for text encoders; null: each space's own (SGD's)",
        Check("[low, high, default] with 0 < low <= default <= high, e.g. [1.0e-5, 2.0e-4, 5.0e-5]",
              lambda v: len(v) == 3 and 0 < v[0] <= v[2] <= v[1]))
    momentum: float = setting(0.9, "SGD momentum; AdamW's beta1", Check("a number in [0, 1)", lambda v: 0 <= v < 1))
    weight_decay: float = setting(5.0e-4, "weight decay (AdamW: decoupled; 0.01 is usual)", at_least(0, integer=False))
    schedule: str = setting("cosine", "learning-rate schedule after the warm-up: cosine | step | linear (to 0)",
                            one_of("cosine", "step", "linear"))
    milestones: list[float] = setting([0.5, 0.75], "step: multiply the lr by 0.1 at these fractions of the epochs")
    warmup_epochs: float = setting(0.0, "linear lr warm-up, in epochs (at most train.epochs)")
    grad_clip: Optional[float] = setting(None, "clip the gradients' global norm to this every step (data=lm: 1.0); null: "
                                         "no clipping", Check("a gradient norm > 0, or null for no clipping", lambda v: v > 0))
    distill_warmup_epochs: float = setting(0.0, "ramp the distillation terms from 0 to 1 over these epochs (DKD's "
                                           "recipe: 20 of 240)")
    bf16: Optional[bool] = setting(None, "bfloat16 autocast; null: on for CUDA")
    channels_last: bool = setting(True, "channels_last memory format (CUDA and CPU); false for a model that .view()s "
                                  "its feature maps")
    compile: Optional[bool] = setting(None, "torch.compile each trial's step once; null: on for CUDA")
    compile_mode: Optional[str] = setting(None, "null: reduce-overhead on CUDA (CUDA graphs: less host time per step)",
                                          one_of(*COMPILE_MODES))
    cudnn_benchmark: Optional[bool] = setting(None, "cuDNN picks its fastest algorithm per shape; null: on for CUDA")
    checkpoint_every_epochs: int = setting(1, "Tune checkpoints every this many epochs; the last epoch always saves one (a "
                                           "stopped or retried trial continues after its last finished epoch either way)",
                                           at_least(1, " (1: every epoch)"))
    checkpoint_min_interval_s: float = setting(30.0, "at most one Tune checkpoint per this many seconds (0: every due epoch); "
                                               "every epoch's state is kept apart from them",
                                               Check("a number of seconds >= 0 (0: no minimum)", lambda v: v >= 0))
    connector: str = setting("conv1x1", "the stepping stones' connectors: conv1x1 (+BN), or auto (resize as well "
                             "where the spatial sizes differ)", one_of("conv1x1", "auto"))
    seed: int = setting(0, "model init and data order of a trial")


@dataclass
class TeacherSettings:
    checkpoint: Optional[str] = setting(None, "a trained teacher: a state_dict file, or an MLflow URI "
                                        "(runs:/<id>/teacher/teacher.pt); null: trained first")
    init: Optional[str] = setting(None, "pretrained weights to fine-tune from for teacher.epochs (a classifier that "
                                  "does not fit is replaced)")
    epochs: int = setting(6, "epochs of the teacher's own training; 0: the teacher as given (its pretrained weights, "
                          "e.g. an hf: folder), scored and checked but not trained", at_least(0, " (0: the teacher as given)"))
    lr: float = setting(0.1, "the teacher's learning rate", Check("a learning rate > 0", lambda v: v > 0))
    batch_size: int = setting(64, "global batch, split across a trial's workers", at_least(1))
    allow_chance: bool = setting(False, "distil from a teacher whose val accuracy is not clearly above chance (the "
                                 "largest class's share); false: the search stops before its trials, exit 1")


@dataclass
class StudentSettings:
    init: Optional[str] = setting(None, "pretrained weights every trial's student starts from (a classifier that "
                                  "does not fit is replaced)")


@dataclass
class TuneSettings:
    name: Optional[str] = setting(None, "experiment directory name (null: bkd-<search>-<pair>-<data>-<time>)")
    num_samples: int = setting(4, "trials of the search", at_least(1, " (the number of trials)"))
    max_concurrent: int = setting(2, "trials at once (fewer where the cluster or the data's CPUs allow fewer)",
                                  at_least(1, " (trials at once)"))
    time_budget_s: Optional[float] = setting(None, "stop the search after this many seconds of this command, its running trials "
                                             "resumable (tune.resume=true, the budget afresh); a teacher trained first gets the "
                                             "same budget for its own training (null: no budget)",
                                             Check("a number of seconds > 0, or null for no budget", lambda v: v > 0))
    scheduler: Optional[str] = setting("asha", "asha: ASHA stops weak trials early; none: every trial runs its epochs",
                                       one_of("asha", "none"))
    searcher: str = setting("tpe", "tpe (Optuna's TPE) | random (Optuna's random sampler: a baseline)",
                            one_of("tpe", "random"))
    grace_period: int = setting(1, "epochs before ASHA may stop a trial",
                                at_least(1, " (epochs before ASHA may stop a trial)"))
    reduction_factor: float = setting(2.0, "ASHA keeps 1/reduction_factor of the trials per rung",
                                      above(1, " (ASHA keeps 1/reduction_factor of the trials per rung)"))
    seed: int = setting(0, "the searcher's seed")
    max_failures: int = setting(1, "Tune's retries of a failed trial (-1: no limit)",
                                Check("an integer >= 0 (retries of a failed trial), or -1 for no limit", lambda v: v >= -1))
    reuse_actors: bool = setting(True, "a trial's process trains the next trial (saves a process start); false: a "
                                 "fresh process each")
    resume: bool = setting(False, "continue the experiment tune.name after the driver died or was interrupted")
    confirm_seeds: int = setting(0, "after a search, train the best configuration again on this many fresh seeds",
                                 at_least(0, " (0: no confirmation runs)"))
    console: str = setting("bkd", "bkd: one progress line per trial event, Ray's output in its log files | ray: "
                           "Ray's console", one_of("bkd", "ray"))


@dataclass
class CompareSettings:
    methods: list[str] = setting(["none", "kd", "blockkd"], "none: the student alone; any search space (kd, dkd, dist, "
                                 "loca, fitnet, at, rkd, crd, reviewkd, ofa, blockkd, ...)")
    seeds: int = setting(5, "seeds train.seed+1 .. train.seed+seeds per method; statistics on test_acc",
                         at_least(1, " (seeds per method; 5 give useful intervals)"))
    tune_trials: Optional[int] = setting(
        None, "N: first search each method's own space with N trials, then train each method's best on the seeds; "
        "null: space defaults / from_search",
        at_least(1, " (trials of each method's own search), or null for none"))
    baseline: Optional[str] = setting("kd", "differences are paired by seed against this method (null: none)")
    fixed: dict[str, Any] = setting({}, "compare.fixed.<method>.<param>=VALUE: a method's parameters (else its "
                                    "space's defaults)")
    from_search: dict[str, Any] = setting({}, "compare.from_search.<method>=<MLflow parent run id or results folder>: "
                                          "its best configuration")


@dataclass
class ResourcesSettings:
    workers_per_trial: int = setting(1, "DDP workers per trial (Ray Train)", at_least(1, " (DDP workers per trial)"))
    use_gpu: bool = setting(False, "one GPU (or gpus_per_worker) per worker")
    gpus_per_worker: float = setting(1.0, "< 1 packs several trials on one GPU",
                                     Check("a number of GPUs in (0, 8] (fractions share a GPU)", lambda v: 0 < v <= 8),
                                     "use_gpu")
    cpus_per_worker: float = setting(1.0, "CPUs per worker", Check("a number of CPUs > 0 (fractions such as 0.9 are fine)",
                                                                   lambda v: v > 0))
    max_worker_failures: int = setting(1, "Ray Train restarts of a trial's worker group (from its last checkpoint)",
                                       Check("an integer >= 0, or -1 for no limit", lambda v: v >= -1))
    max_worker_group_start_failures: int = setting(
        10, "60-s start timeouts before a Train run fails (-1: wait forever, e.g. slow autoscaling)",
        Check("an integer >= 0, or -1 to wait forever", lambda v: v >= -1))
    placement_strategy: str = setting("PACK", "Ray placement strategy of a trial's workers",
                                      one_of("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


@dataclass
class RaySettings:
    address: Optional[str] = setting(None, "null: join RAY_ADDRESS / a running cluster, or start a local one")
    num_cpus: Optional[int] = setting(None, "CPUs of a local cluster started here (null: all)",
                                      at_least(1, " (CPUs of a local cluster), or null for all"))
    train_poll_interval_s: float = setting(0.1, "how often Ray Train collects reports (its default, 2 s, slows short "
                                           "epochs)", SECONDS_POSITIVE)
    dashboard: bool = setting(False, "start Ray's dashboard with a local cluster this command starts (2 s more to start, "
                              "and a process polling the nodes; a cluster from `ray start` keeps its own)")
    storage_path: Optional[str] = setting(None, "null: $BKD_STORAGE_PATH, else <cwd>/results/ray; s3://, gs:// or NFS "
                                          "on clusters")


@dataclass
class MlflowSettings:
    tracking_uri: Optional[str] = setting(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    experiment: str = setting("bkd", "the MLflow experiment of every run")
    retry_interval_s: float = setting(10.0, "while MLflow is unreachable, its writes are queued and retried this often",
                                      SECONDS_POSITIVE)
    end_wait_s: float = setting(120.0, "at the end of a search, how long to wait for an unreachable MLflow",
                                SECONDS)
    registered_model: Optional[str] = setting(None, "a name: the best student is registered in MLflow's Model "
                                              "Registry under it")


@dataclass
class BkdConfig:
    """The composed configuration of ``python -m orchestrator.{tune,train,teacher,compare}``."""

    data: Any = setting(None, "the dataset: data=<group> (conf/data), then its keys")
    pair: PairSettings = setting(PairSettings(), "teacher and student")
    search: Any = setting(None, "the search space: search=<name> (search_spaces/conf/search)")
    fixed: dict[str, Any] = setting({}, "one configuration's values, not searched: e.g. fixed.temperature=4 "
                                    "fixed.cuts=[1,3] fixed.w_3=1.0 (orchestrator.train uses these, and each "
                                    "parameter's default for the rest)")
    train: TrainSettings = setting(TrainSettings(), "")
    teacher: TeacherSettings = setting(TeacherSettings(), "")
    student: StudentSettings = setting(StudentSettings(), "")
    tune: TuneSettings = setting(TuneSettings(), "")
    compare: CompareSettings = setting(CompareSettings(), "")
    resources: ResourcesSettings = setting(ResourcesSettings(), "")
    ray: RaySettings = setting(RaySettings(), "")
    mlflow: MlflowSettings = setting(MlflowSettings(), "")
    output_dir: str = setting("results", "trials.parquet and the best student, besides MLflow")


@dataclass
class PrepareRay:
    address: Optional[str] = setting(None, "null: join a running cluster, or start a local one")
    num_cpus: Optional[int] = setting(None, "CPUs of a local cluster started here (null: all)",
                                      at_least(1, " (CPUs of a local cluster), or null for all"))


@dataclass
class PrepareConfig:
    """``python -m orchestrator.prepare source=SRC output=DST``: an image folder -> Parquet shards."""

    source: str = setting(MISSING, "SRC/train/<class>/<image>, SRC/val/<class>/<image>; a local path, s3://... or gs://...")
    output: str = setting(MISSING, "DST/{train,val,test}/*.parquet, DST/splits.json, DST/classes.json, DST/skipped.txt")
    val_fraction: float = setting(0.1, "held out of SRC/train (stratified by class) as DST/val/, what searches select "
                                  "on; 0: none. ImageNet: 0.008 (about 10,000 images)",
                                  Check("a fraction in [0, 0.5]", lambda v: 0 <= v <= 0.5))
    split_seed: int = setting(0, "which images are held out")
    max_side: Optional[int] = setting(320, "re-encode images larger than this (longest side, px) as JPEG; null keeps "
                                      "every file as it is", at_least(32, " (pixels), or null to keep the files"))
    quality: int = setting(90, "JPEG quality of re-encoded images", Check("an integer in [1, 100]", lambda v: 1 <= v <= 100))
    images_per_shard: int = setting(8192, "about 250 MB per shard for ImageNet-like images at max_side 320", at_least(1))
    ray: PrepareRay = setting(PrepareRay(), "")


OPEN_MAPS = ("fixed", "compare.fixed", "compare.from_search", "search")  # keys the schema does not list


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (``conf/*.yaml`` name them in their defaults lists)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="bkd_schema", node=BkdConfig)
    store.store(name="prepare_schema", node=PrepareConfig)
    for name, node in DATA_SCHEMAS.items():
        store.store(group="schema/data", name=name, node=node)


# --- reading the schema --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """One key of the schema: dotted name, Python type, default, doc, check."""

    name: str
    type: Any
    default: Any
    doc: str
    check: Optional[Check]
    applies: str

    @property
    def nullable(self) -> bool:
        return get_origin(self.type) is Union and type(None) in get_args(self.type)

    @property
    def base(self) -> Any:
        """The type without Optional."""
        if self.nullable:
            return next(a for a in get_args(self.type) if a is not type(None))
        return self.type

    def wanted(self) -> str:
        """What the value must be, in words (after "must be")."""
        if self.check is not None:
            text = self.check.wanted
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(self.base, "a value")
            if get_origin(self.base) is list:
                text = "a list, e.g. [a,b]"
        if self.nullable and "null" not in text:
            text += ", or null" + (" (automatic)" if self.base is bool else "")
        return text


def fields_of(schema: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(schema)}


def keys(schema: type, prefix: str = "") -> list[Key]:
    """Every leaf key of ``schema`` (nested sections flattened, ``prefix`` before each name)."""
    hints = get_type_hints(schema)
    out: list[Key] = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += keys(kind, f"{prefix}{f.name}.")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append(Key(prefix + f.name, kind, default, f.metadata.get("doc", ""), f.metadata.get("check"),
                       f.metadata.get("applies", "")))
    return out


def find_key(name: str, schema: type = BkdConfig) -> Optional[Key]:
    """The schema's entry of a dotted key (``data.*`` looked up in every data schema), or None."""
    if name.startswith("data."):
        for data in DATA_SCHEMAS.values():
            found = find_key(name[len("data."):], data)
            if found is not None:
                return dataclasses.replace(found, name=name)
        return None
    return next((k for k in keys(schema) if k.name == name), None)
