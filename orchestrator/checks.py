"""Value checks of the composed config, run before Ray starts: every number (type and range), every
switch, every ``fixed.*`` value against its search space, and "did you mean" for misspelled keys.

Each problem is a ``ConfigError`` naming the full key, the value and the fix.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from search_spaces.space import BLOCKKD_ONLY, parse_cuts


class ConfigError(ValueError):
    """A bad configuration value: ``key`` names it, the message says what is wrong and how to fix it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def check_number(key: str, value: Any, ok: Callable[[float], bool], wanted: str, integer: bool = False) -> None:
    """Refuse ``value`` unless it is a number (an integer if ``integer``; never a bool) for which ``ok`` holds."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not ok(value):
        raise ConfigError(key, f"must be {wanted}; got {value!r}.")


@dataclass(frozen=True)
class Number:
    """A numeric key: integer or real, the condition it must meet, and how to say it."""

    integer: bool
    ok: Callable[[float], bool]
    wanted: str
    nullable: bool = False


def _int(ok: Callable[[float], bool], wanted: str, nullable: bool = False) -> Number:
    return Number(True, ok, wanted, nullable)


def _real(ok: Callable[[float], bool], wanted: str, nullable: bool = False) -> Number:
    return Number(False, ok, wanted, nullable)


POSITIVE_INT = _int(lambda v: v >= 1, "an integer >= 1")
ANY_INT = _int(lambda v: True, "an integer")
SECONDS_POSITIVE = _real(lambda v: v > 0, "a number of seconds > 0")
SECONDS = _real(lambda v: v >= 0, "a number of seconds >= 0")

NUMBERS: dict[str, Number] = {
    "data.train_size": _int(lambda v: v >= 1, "an integer >= 1 (a number of training images), or null for all", nullable=True),
    "data.val_fraction": _real(lambda v: 0 <= v <= 0.5, "a fraction of the training images in [0, 0.5] to hold out for "
                               "selection (0: select on the test split)", nullable=True),
    "data.split_seed": ANY_INT,
    "data.image_size": _int(lambda v: v >= 8, "an integer >= 8 (pixels)"),
    "data.cpus_per_trial": _real(lambda v: v > 0, "a number of CPUs > 0 for each trial's decode tasks (fractions are fine)"),
    "data.shuffle_buffer": _int(lambda v: v >= 0, "an integer >= 0 (rows; 0: no local shuffle)"),
    "train.epochs": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.lr_base_batch": _int(lambda v: v >= 1, "the batch size the lr is given for (an integer >= 1), or null for no scaling",
                                nullable=True),
    "train.momentum": _real(lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "train.weight_decay": _real(lambda v: v >= 0, "a number >= 0"),
    "train.checkpoint_every_epochs": _int(lambda v: v >= 1, "an integer >= 1 (1: every epoch)"),
    "train.checkpoint_min_interval_s": _real(lambda v: v >= 0, "a number of seconds >= 0 (0: no minimum)"),
    "train.seed": ANY_INT,
    "teacher.epochs": POSITIVE_INT,
    "teacher.lr": _real(lambda v: v > 0, "a learning rate > 0"),
    "teacher.batch_size": POSITIVE_INT,
    "tune.num_samples": _int(lambda v: v >= 1, "an integer >= 1 (the number of trials)"),
    "tune.max_concurrent": _int(lambda v: v >= 1, "an integer >= 1 (trials at once)"),
    "tune.time_budget_s": _real(lambda v: v > 0, "a number of seconds > 0, or null for no budget", nullable=True),
    "tune.grace_period": _int(lambda v: v >= 1, "an integer >= 1 (epochs before ASHA may stop a trial)"),
    "tune.reduction_factor": _real(lambda v: v > 1, "a number > 1 (ASHA keeps 1/reduction_factor of the trials per rung)"),
    "tune.seed": ANY_INT,
    "tune.max_failures": _int(lambda v: v >= -1, "an integer >= 0 (retries of a failed trial), or -1 for no limit"),
    "tune.confirm_seeds": _int(lambda v: v >= 0, "an integer >= 0 (0: no confirmation runs)"),
    "compare.tune_trials": _int(lambda v: v >= 1, "an integer >= 1 (trials of each method's own search), or null for none",
                                nullable=True),
    "compare.seeds": _int(lambda v: v >= 1, "an integer >= 1 (seeds per method; 5 give useful intervals)"),
    "resources.workers_per_trial": _int(lambda v: v >= 1, "an integer >= 1 (DDP workers per trial)"),
    "resources.cpus_per_worker": _real(lambda v: v > 0, "a number of CPUs > 0 (fractions such as 0.9 are fine)"),
    "resources.gpus_per_worker": _real(lambda v: 0 < v <= 8, "a number of GPUs in (0, 8] (fractions share a GPU)"),
    "resources.max_worker_failures": _int(lambda v: v >= -1, "an integer >= 0, or -1 for no limit"),
    "resources.max_worker_group_start_failures": _int(lambda v: v >= -1, "an integer >= 0, or -1 to wait forever"),
    "ray.num_cpus": _int(lambda v: v >= 1, "an integer >= 1 (CPUs of a local cluster), or null for all", nullable=True),
    "ray.train_poll_interval_s": SECONDS_POSITIVE,
    "mlflow.retry_interval_s": SECONDS_POSITIVE,
    "mlflow.end_wait_s": SECONDS,
}

SWITCHES: dict[str, bool] = {  # key -> may be null ("null: on for CUDA")
    "train.bf16": True, "train.compile": True, "train.cudnn_benchmark": True, "train.channels_last": False,
    "tune.resume": False, "tune.reuse_actors": False, "resources.use_gpu": False, "data.in_memory": False,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "tune.console": ("bkd", "ray"),
    "tune.searcher": ("tpe", "random"),
    "train.schedule": ("cosine", "step"),
    "train.connector": ("conv1x1", "auto"),
    "tune.scheduler": ("asha", "none"),
    "resources.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def lookup(c: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    """(present, value) of a dotted key."""
    node: Any = c
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_values(c: Mapping[str, Any]) -> None:
    """Every number, switch and choice of the config (``resources.gpus_per_worker`` only with a GPU)."""
    for key, spec in NUMBERS.items():
        present, value = lookup(c, key)
        if not present or (value is None and spec.nullable):
            continue
        if key == "resources.gpus_per_worker" and not lookup(c, "resources.use_gpu")[1]:
            continue
        check_number(key, value, spec.ok, spec.wanted, integer=spec.integer)
    for key, nullable in SWITCHES.items():
        present, value = lookup(c, key)
        if present and not (isinstance(value, bool) or (value is None and nullable)):
            raise ConfigError(key, f"must be true or false{' or null (automatic)' if nullable else ''}; got {value!r}.")
    for key, options in CHOICES.items():
        present, value = lookup(c, key)
        if present and value not in options and not (key == "tune.scheduler" and value is None):
            raise ConfigError(key, f"must be one of {', '.join(options)}; got {value!r}.")


def check_fixed(fixed: Mapping[str, Any], space: Mapping[str, Any], num_blocks: int, prefix: str = "fixed.") -> None:
    """``fixed.*`` values against the search space: known names, types, ranges, choices, cuts in 1..n."""
    params = space.get("params") or {}
    blockkd = space.get("method", "blockkd") == "blockkd"
    name = space.get("name")
    for key, value in fixed.items():
        full = f"{prefix}{key}"
        if not blockkd and (key in BLOCKKD_ONLY or key.startswith("w_")):
            what = "trains a logit-only baseline" if space.get("method") == "logit" else "trains the student alone"
            raise ConfigError(full, f"is a Block-KD parameter, but search={name} {what} (no stepping stones); drop it, "
                              "or use search=blockkd to train stepping stones.")
        if key == "cuts":
            check_cuts(full, value, num_blocks)
        elif key.startswith("w_"):
            cut = key[2:]
            if not cut.isdigit() or not 1 <= int(cut) <= num_blocks:
                raise ConfigError(full, f"names no cut: stone weights are w_1 .. w_{num_blocks} for this pair.")
            check_number(full, value, lambda v: v > 0, "a stone weight > 0")
        elif key in params:
            check_param(full, value, params[key])
        else:
            valid = list(params) + (["cuts", "w_<cut>"] if blockkd else [])
            raise ConfigError(full, f"is not a parameter of search space {name!r}{suggestion(key, valid) or '.'} Valid: "
                              f"{', '.join(valid)}.")
    if blockkd and "cuts" in fixed:
        cuts = parse_cuts(",".join(str(c) for c in _as_list(fixed["cuts"])))
        stray = [k for k in fixed if k.startswith("w_") and int(k[2:]) not in cuts]
        if stray:
            raise ConfigError(f"{prefix}{stray[0]}", f"weights cut {stray[0][2:]}, which is not in {prefix}cuts={cuts}; "
                              "add the cut or drop the weight.")


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [v for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_cuts(key: str, value: Any, num_blocks: int) -> None:
    items = _as_list(value)
    ok = items and all(isinstance(c, int) and not isinstance(c, bool) or (isinstance(c, str) and c.strip().isdigit())
                       for c in items)
    cuts = [int(c) for c in items] if ok else []
    if not ok or not all(1 <= c <= num_blocks for c in cuts) or len(set(cuts)) != len(cuts):
        raise ConfigError(key, f"must be a list of distinct cuts in 1..{num_blocks} (this pair has {num_blocks} blocks), "
                          f"e.g. {key}=[1,{num_blocks}]; got {value!r}.")


def check_param(key: str, value: Any, spec: Any) -> None:
    """One fixed value against its search-space entry (a range, a choice list or a constant)."""
    if not isinstance(spec, Mapping):
        if value != spec:
            raise ConfigError(key, f"is a constant of this search space ({spec!r}); got {value!r}. Drop it, or edit the space.")
        return
    if "choices" in spec:
        if value not in spec["choices"]:
            raise ConfigError(key, f"must be one of {', '.join(map(str, spec['choices']))}; got {value!r}.")
        return
    low, high = spec.get("low"), spec.get("high")
    if low is None or high is None:
        return
    integer = spec.get("type") == "int"
    check_number(key, value, lambda v: low <= v <= high, f"{'an integer' if integer else 'a number'} in the search range "
                 f"[{low:g}, {high:g}]", integer=integer)


def suggestion(word: str, options: Iterable[str]) -> str:
    """'; did you mean `x`?' for the closest option, or ''."""
    found = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean `{found[0]}`?" if found else ""


def all_keys(c: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in c.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, Mapping):
            keys += all_keys(value, full + ".")
    return keys


def did_you_mean(key: str, c: Mapping[str, Any]) -> str:
    """A hint for a misspelled dotted key: the closest key of the same section (else of any)."""
    keys = all_keys(c)
    section = key.rsplit(".", 1)[0] + "." if "." in key else ""
    same = [k for k in keys if k.startswith(section) and k.count(".") == key.count(".")]
    return suggestion(key, same) or suggestion(key, keys)
