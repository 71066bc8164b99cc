"""Compose the Hydra config (no chdir, no outputs/) typed by the schema; override errors as ``ConfigError``."""
from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.checks import ConfigError

OPEN_MAPPINGS = ("fixed.", "compare.fixed.", "compare.from_search.")  # keys added without Hydra's `+`
WHOLE_MAPPINGS = ("pair.student_config=", "pair.student_config.")  # a mapping given whole or by key, empty or not


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    """The composed config for command-line ``overrides`` (Hydra's compose API: no chdir, no outputs/),
    typed by the schema (``orchestrator.config.schema``).

    ``fixed.KEY=VALUE`` (and ``compare.fixed.*``, ``compare.from_search.*``) adds a key to an open
    mapping (Hydra would want ``+fixed.KEY``).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException

    from orchestrator.config.schema import register

    register()
    given = [f"+{o}" if o.startswith(OPEN_MAPPINGS) else f"++{o}" if o.startswith(WHOLE_MAPPINGS) else o for o in overrides]
    try:
        with initialize_config_module(config_module="orchestrator.conf", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=given)
    except (HydraException, OmegaConfBaseException) as exc:
        raise _override_error(str(exc), overrides, config_name) from None


def _override_error(text: str, overrides: list[str], config_name: str) -> ConfigError:
    from orchestrator.config.checks import EVERY_KEY, unknown_key
    from orchestrator.config.schema import BkdConfig, PrepareConfig, find_key

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


def absolute_path(path: str) -> str:
    """A local path made absolute (workers run elsewhere); URIs as they are."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def apply_env_defaults() -> None:
    """Environment that every entry point wants before Ray starts."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
