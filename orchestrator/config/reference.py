"""The configuration reference, generated from the schema (``orchestrator.config.schema``).

    python -m orchestrator.reference            # writes docs/reference/config.md
    python -m orchestrator.reference --check    # exit 1 when the page is stale (the test suite runs this)
"""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from orchestrator.config.checks import data_groups
from orchestrator.config.schema import DATA_SCHEMAS, BkdConfig, Key, PrepareConfig, keys

PAGE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "config.md"

SECTIONS = {  # section -> what it is for
    "pair": "The teacher and the student (`pair=<name>` picks a pair from `orchestrator/conf/pair`).",
    "fixed": "One configuration's values instead of a search (`orchestrator.train`, `fixed.<param>=VALUE`).",
    "train": "How every trial (and `orchestrator.train`) trains the student.",
    "teacher": "The teacher: given, fine-tuned from pretrained weights, or trained first.",
    "student": "The student's starting weights.",
    "tune": "The search: Ray Tune with Optuna's searcher and ASHA.",
    "compare": "`python -m orchestrator.compare`: methods x seeds at one budget.",
    "resources": "What each trial asks of the cluster.",
    "ray": "Which Ray cluster, and where Ray keeps its files.",
    "mlflow": "Where runs are recorded.",
    "output_dir": "Where results are written besides MLflow.",
}

DATA_TITLES = {
    "builtin": "In-memory datasets",
    "image_folder": "An image folder",
    "parquet": "Parquet shards",
    "text": "Text files or a Hugging Face dataset",
    "lm": "Language-model text: plain texts or prompt/response pairs",
}


def type_name(kind: Any) -> str:
    """``int``, ``float | null``, ``list[str]``, ``any``."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and type(None) in args:
        return type_name(next(a for a in args if a is not type(None))) + " \\| null"
    if typing.get_origin(kind) in (list, dict):
        return f"{typing.get_origin(kind).__name__}[{', '.join(type_name(a) for a in args)}]"
    return {int: "int", float: "float", bool: "bool", str: "string"}.get(kind, "any")


def shown(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "???":
        return "required"
    if isinstance(value, (list, dict)):
        return f"`{value}`".replace("'", "") if value else ("`{}`" if isinstance(value, dict) else "`[]`")
    return f"`{value}`"


def allowed(key: Key) -> str:
    if key.check is None:
        return ""
    text = key.check.wanted
    return text[0].upper() + text[1:] if text else ""


def escaped(text: str) -> str:
    """Markdown table text: pipes and angle brackets escaped."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def table(entries: list[Key]) -> list[str]:
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key in entries:
        lines.append(f"| `{key.name}` | {type_name(key.type)} | {shown(key.default)} | {escaped(allowed(key))} | "
                     f"{escaped(key.doc)} |")
    return lines


def render() -> str:
    """The whole reference page (Markdown)."""
    out = ["# Configuration reference", "",
           "Every key of `python -m orchestrator.{tune,train,teacher,compare}` and of `python -m orchestrator.prepare`, "
           "generated from `orchestrator/config/schema.py` by `python -m orchestrator.reference` (a test fails when this page "
           "is stale). Set any key on the command line as `KEY=VALUE`; a key the schema does not list is refused, "
           "except inside the open maps (`fixed.*`, `compare.fixed.*`, `compare.from_search.*`, `search.*` and a "
           "model's own `_target_` arguments). `--cfg job` prints the composed configuration.", ""]
    groups = data_groups()
    out += ["## data", "", "The dataset: `data=<group>` picks a file of `orchestrator/conf/data`, which extends one of these "
            "schemas; a key of another kind of dataset is refused with the groups that have it. A group may set other "
            "defaults than the schema's (e.g. `data=imagenet`: `cpus_per_trial: 8`).", ""]
    for kind, schema in DATA_SCHEMAS.items():
        names = ", ".join(f"`data={g}`" for g, k in groups.items() if k == kind)
        out += [f"### {DATA_TITLES[kind]} ({names})", "", escaped((schema.__doc__ or "").strip()), ""]
        out += table(keys(schema, "data.")) + [""]
    entries = keys(BkdConfig)
    for section, about in SECTIONS.items():
        rows = [k for k in entries if k.name == section or k.name.startswith(section + ".")]
        out += [f"## {section}", "", about, ""] + table(rows) + [""]
    out += ["## search", "", "The search space: `search=<name>` picks a file of `search_spaces/conf/search` "
            "(`blockkd`, `kd`, `dkd`, `none`, ...); each parameter is a range (`low`, `high`, `log`, `default`), "
            "a choice list or a constant, and `search.partition` says which block partitions are searched.", ""]
    out += ["## prepare", "", (PrepareConfig.__doc__ or "").strip(), ""] + table(keys(PrepareConfig)) + [""]
    return "\n".join(out)


def undocumented() -> list[str]:
    """Keys of the schema without a doc line."""
    every = keys(BkdConfig) + keys(PrepareConfig) + [k for s in DATA_SCHEMAS.values() for k in keys(s, "data.")]
    return [k.name for k in every if not k.doc.strip()]
