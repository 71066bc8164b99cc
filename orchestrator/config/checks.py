"""Value checks of the composed config, run before Ray starts: every key against the schema
(``orchestrator.config.schema``: unknown keys, ranges, choices), every ``fixed.*`` value against its search
space, and "did you mean" for misspelled keys.

Each problem is a ``ConfigError`` naming the full key, the value and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, get_origin

from omegaconf import DictConfig, OmegaConf

from orchestrator.config.schema import DATA_SCHEMAS, OPEN_MAPS, Key, fields_of, keys
from search_spaces.space import BLOCKKD_ONLY, method_of, parse_cuts


class ConfigError(ValueError):
    """A bad configuration value: ``key`` names it, the message says what is wrong and how to fix it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


def check_number(key: str, value: Any, ok: Callable[[float], bool], wanted: str, integer: bool = False) -> None:
    """Refuse ``value`` unless it is a number (an integer if ``integer``; never a bool) for which ``ok`` holds."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not ok(value):
        raise ConfigError(key, f"must be {wanted}; got {value!r}.")


EVERY_KEY = "Every key and its meaning: docs/reference/config.md; `--cfg job` prints the composed configuration."


def check_values(cfg: DictConfig) -> None:
    """Every key of the composed config against the schema (``orchestrator.config.schema``): unknown keys are
    refused (outside the open maps), every value meets its check (range or choices; types were checked
    as Hydra merged it)."""
    check_node(cfg, "")


def check_node(node: DictConfig, prefix: str) -> None:
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return
    known = fields_of(schema)
    for name in node.keys():
        if name not in known:
            raise unknown_key(f"{prefix}{name}", node, schema)
    entries = {key.name: key for key in keys(schema, prefix)}
    for name in known:
        full = f"{prefix}{name}"
        if full in OPEN_MAPS:
            continue
        value = node[name]
        if isinstance(value, DictConfig):
            check_node(value, f"{full}.")
        elif full in entries:
            check_key(entries[full], value, node)


def check_key(key: Key, value: Any, section: DictConfig) -> None:
    """One value against its schema entry, whether or not the key is read in this run (a bad
    ``resources.gpus_per_worker`` is refused on a CPU run too)."""
    if key.check is None or (value is None and key.nullable):
        return
    if key.check.choices:
        if value not in key.check.choices:
            raise ConfigError(key.name, f"must be {key.wanted()}; got {value!r}.")
        return
    if key.check.ok is not None and get_origin(key.base) is list:  # a list checked whole, e.g. [low, high, default]
        if not key.check.ok(list(value)):
            raise ConfigError(key.name, f"must be {key.wanted()}; got {list(value)}.")
    elif key.check.ok is not None:
        check_number(key.name, value, key.check.ok, key.wanted(), integer=key.base is int)


def unknown_key(full: str, node: Optional[DictConfig] = None, schema: Optional[type] = None) -> ConfigError:
    """"No such key", the closest key of its section, and for a dataset key the datasets that have it."""
    section, _, name = full.rpartition(".")
    options = list(fields_of(schema)) if schema is not None and dataclasses.is_dataclass(schema) else []
    if section == "data":
        having = [group for group, kind in data_groups().items() if name in fields_of(DATA_SCHEMAS[kind])]
        dataset = node.get("name") if node is not None else None
        if having:
            return ConfigError(full, f"does not apply to this dataset (data.name={dataset}): {name} is a key of "
                               f"{', '.join(f'data={g}' for g in having)}. The keys of this dataset: {', '.join(options)}.")
    hint = suggestion(full, [f"{section}.{o}" if section else o for o in options])
    listed = f" The keys of {section or 'the configuration'}: {', '.join(options)}." if options else ""
    return ConfigError(full, f"no such key{hint or '.'}{listed} {EVERY_KEY}")


def data_groups() -> dict[str, str]:
    """conf/data option -> the schema it extends (``builtin``, ``image_folder``, ``parquet``)."""
    import re

    folder = Path(__file__).parents[1] / "conf" / "data"
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        match = re.search(r"/schema/data@_here_:\s*(\w+)", path.read_text())
        if match:
            found[path.stem] = match.group(1)
    return found


def check_fixed(fixed: Mapping[str, Any], space: Mapping[str, Any], num_blocks: int, prefix: str = "fixed.") -> None:
    """``fixed.*`` values against the search space: known names, types, ranges, choices, cuts in 1..n."""
    params = space.get("params") or {}
    method = method_of(space)
    name = space.get("name")
    for key, value in fixed.items():
        full = f"{prefix}{key}"
        if not method.uses_partition and (key in BLOCKKD_ONLY or key.startswith("w_")):
            raise ConfigError(full, f"is a Block-KD parameter, but search={name} trains {method.summary} (no stepping stones); "
                              "drop it, or use search=blockkd to train stepping stones.")
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
            valid = list(params) + (["cuts", "w_<cut>"] if method.uses_partition else [])
            raise ConfigError(full, f"is not a parameter of search space {name!r}{suggestion(key, valid) or '.'} Valid: "
                              f"{', '.join(valid)}.")
    if method.uses_partition and "cuts" in fixed:
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
