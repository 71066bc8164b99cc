"""Define-by-run search over Block-KD hyper-parameters and the block partition.

A space is a plain dict (a composed Hydra ``search`` group):

    method: blockkd            # a bkd_core.methods name: blockkd (stepping stones) | logit (KD/DKD/KD-LS) | none
    display: Block-KD          # how tables and plots name it
    params:                    # scalar hyper-parameters, each a range, a choice list or a constant
      temperature: {low: 1.0, high: 8.0, default: 4.0}
      lr: {low: 0.01, high: 0.3, log: true, default: 0.05}
      logit_loss: {choices: [kd, dkd, kd_ls], default: kd}
      dkd_beta: {low: 1.0, high: 8.0, default: 8.0, when: {logit_loss: dkd}}
    partition:                 # which cuts become stepping stones
      allowed: null            # cuts that may be chosen (null: 1..n)
      fixed: null              # [1, 3] or "all": no search over the partition
      min_stones: 1
      max_stones: null
    stone_weight: {low: 0.05, high: 2.0, log: true}   # one w_<cut> per chosen cut; null: 2^-(n-i)

``suggest`` names every suggestion flat (``temperature``, ``cuts`` as "1,3", ``w_3``) so that the
same names appear in Tune, MLflow and the Parquet export. It is picklable through
``functools.partial(suggest, space=..., num_blocks=..., fixed=...)``.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from bkd_core import methods
from bkd_core.params import as_int, read_params

SPACES = Path(__file__).parent / "conf" / "search"  # one YAML per space; its ``method`` names a bkd_core method


# Parameters that only Block-KD has (logit baselines refuse them); so do the stone weights w_<cut>.
BLOCKKD_ONLY = ("cuts", "gamma", "stone_temperature")


class SearchSpaceError(ValueError):
    """A search space that cannot produce a valid trial (names the key and the fix)."""


def names() -> list[str]:
    """The search spaces shipped in ``conf/search`` (what ``search=`` and ``compare.methods`` take)."""
    return sorted(p.stem for p in SPACES.glob("*.yaml"))


def load_space(name: str) -> dict[str, Any]:
    """The space ``name`` as a plain dict; a ``SearchSpaceError`` naming the known spaces otherwise."""
    import yaml

    path = SPACES / f"{name}.yaml"
    if not path.is_file():
        raise SearchSpaceError(f"unknown method {name!r}; valid: {', '.join(names())} (none: the student alone).")
    return yaml.safe_load(path.read_text())


def with_lr_range(space: dict[str, Any], lr_range: Optional[Sequence[float]]) -> dict[str, Any]:
    """``space`` with its lr searched over ``lr_range`` = [low, high, default] on a log scale (``train.lr_range``:
    one range for every method, e.g. AdamW's for text encoders); the space as it is for None."""
    if not lr_range:
        return space
    low, high, default = (float(v) for v in lr_range)
    params = {**(space.get("params") or {}), "lr": {"low": low, "high": high, "log": True, "default": default}}
    return {**space, "params": params}


def for_data(space: dict[str, Any], lm: bool) -> dict[str, Any]:
    """``space`` for the job's data: on causal LMs (``data=lm``) its ``lm.params`` replace or add to its params (the
    LLM distances for ``kd`` and ``blockkd``); the ``lm`` section itself is dropped either way."""
    section = space.get("lm") or {}
    base = {k: v for k, v in space.items() if k != "lm"}
    if not lm or not section.get("params"):
        return base
    return {**base, "params": {**(base.get("params") or {}), **section["params"]}}


def method_of(space: Mapping[str, Any]) -> type[methods.Distiller]:
    """The ``bkd_core.methods`` class a space trains (its ``method``, default blockkd)."""
    return methods.get(space.get("method", "blockkd"))


def uses_partition(space: Mapping[str, Any]) -> bool:
    """Whether the space's method searches a block partition (cuts, stone weights w_<cut>)."""
    return method_of(space).uses_partition


@functools.lru_cache(maxsize=None)
def display(name: str) -> str:
    """A space's display name (its ``display``, e.g. "Block-KD"), else its name (read once per space)."""
    path = SPACES / f"{name}.yaml"
    return (load_space(name).get("display") if path.is_file() else None) or name


def partitions(space: Mapping[str, Any], num_blocks: int) -> list[str]:
    """Every block partition the space allows, as "1,3"-style strings ([""] for methods without stones)."""
    if not uses_partition(space):
        return [""]
    part = space.get("partition") or {}
    if part.get("fixed") == "all":
        return [",".join(str(c) for c in range(1, num_blocks + 1))]
    if part.get("fixed"):
        fixed = sorted(int(c) for c in part["fixed"])
        bad = [c for c in fixed if not 1 <= c <= num_blocks]
        if bad:
            raise SearchSpaceError(
                f"search.partition.fixed holds cuts {bad} outside 1..{num_blocks} (the pair has {num_blocks} blocks); "
                f"choose cuts between 1 and {num_blocks}."
            )
        return [",".join(map(str, fixed))]
    allowed = sorted(int(c) for c in (part.get("allowed") or range(1, num_blocks + 1)) if 1 <= int(c) <= num_blocks)
    lo = int(part.get("min_stones", 1) or 1)
    hi = int(part.get("max_stones") or num_blocks)
    found = [
        ",".join(map(str, combo))
        for size in range(max(1, lo), min(hi, len(allowed)) + 1)
        for combo in itertools.combinations(allowed, size)
    ]
    if not found:
        raise SearchSpaceError(
            f"the search space allows no valid block partition for a pair with {num_blocks} blocks "
            f"(search.partition: allowed={part.get('allowed')}, min_stones={lo}, max_stones={part.get('max_stones')}); "
            f"allow at least one cut in 1..{num_blocks} and set min_stones <= max_stones."
        )
    return found


def _active(spec: Mapping[str, Any], chosen: Mapping[str, Any]) -> bool:
    when = spec.get("when") or {}
    return all(chosen.get(key) == value for key, value in when.items())


def _suggest_one(trial: Any, name: str, spec: Any) -> Any:
    if not isinstance(spec, Mapping):
        return spec  # a constant
    if "choices" in spec:
        return trial.suggest_categorical(name, list(spec["choices"]))
    low, high = spec["low"], spec["high"]
    if isinstance(low, int) and isinstance(high, int) and spec.get("type") == "int":
        return trial.suggest_int(name, low, high, log=bool(spec.get("log", False)))
    return trial.suggest_float(name, float(low), float(high), log=bool(spec.get("log", False)))


def suggest(trial: Any, space: Mapping[str, Any], num_blocks: int, fixed: Optional[Mapping[str, Any]] = None) -> Optional[dict]:
    """Define-by-run: suggest every searched parameter on ``trial``; return the constants."""
    fixed = dict(fixed or {})
    chosen: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for name, spec in (space.get("params") or {}).items():
        if not _active(spec if isinstance(spec, Mapping) else {}, {**chosen, **constants}):
            continue
        if name in fixed:
            constants[name] = fixed[name]
        elif isinstance(spec, Mapping) and ("choices" in spec or "low" in spec):
            chosen[name] = _suggest_one(trial, name, spec)
        else:
            constants[name] = spec.get("default") if isinstance(spec, Mapping) else spec
    options = partitions(space, num_blocks)
    if "cuts" in fixed:
        constants["cuts"] = _cuts_string(fixed["cuts"])
        cuts = constants["cuts"]
    elif len(options) == 1:
        constants["cuts"] = cuts = options[0]
    else:
        cuts = trial.suggest_categorical("cuts", options)
    weight = space.get("stone_weight")
    for cut in (int(c) for c in cuts.split(",") if c):
        key = f"w_{cut}"
        if key in fixed:
            constants[key] = float(fixed[key])
        elif isinstance(weight, Mapping) and "low" in weight:
            trial.suggest_float(key, float(weight["low"]), float(weight["high"]), log=bool(weight.get("log", False)))
        else:
            constants[key] = 2.0 ** -(num_blocks - cut)
    return constants or None


def defaults(space: Mapping[str, Any], num_blocks: int, fixed: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """One configuration without search: each parameter's default (or its ``fixed`` value)."""
    fixed = dict(fixed or {})
    config: dict[str, Any] = {}
    for name, spec in (space.get("params") or {}).items():
        if not _active(spec if isinstance(spec, Mapping) else {}, config):
            continue
        if name in fixed:
            config[name] = fixed[name]
        elif isinstance(spec, Mapping):
            if "default" not in spec:
                raise SearchSpaceError(f"search.params.{name} has no default; add `default:` or pass fixed.{name}=VALUE.")
            config[name] = spec["default"]
        else:
            config[name] = spec
    options = partitions(space, num_blocks)
    stones = uses_partition(space)
    config["cuts"] = _cuts_string(fixed["cuts"]) if "cuts" in fixed else options[-1] if stones else ""
    for cut in (int(c) for c in config["cuts"].split(",") if c):
        config[f"w_{cut}"] = float(fixed.get(f"w_{cut}", 2.0 ** -(num_blocks - cut)))
    return config


def _cuts_string(cuts: Any) -> str:
    if isinstance(cuts, str):
        return ",".join(str(int(c)) for c in cuts.split(",") if c.strip())
    if isinstance(cuts, int):
        return str(cuts)
    return ",".join(str(int(c)) for c in sorted(cuts))


def parse_cuts(cuts: str) -> list[int]:
    return [int(c) for c in cuts.split(",") if c]


def stone_weights(config: Mapping[str, Any], cuts: Sequence[int]) -> list[float]:
    return [float(config[f"w_{c}"]) for c in cuts]


@dataclass(frozen=True)
class TrialParams:
    """One configuration as the trainer reads it: the flat names ``suggest`` and ``defaults`` give
    (values from a search, a space's defaults, ``fixed.*`` or an MLflow run, where they are strings).
    A parameter the space does not have is None, and the distiller's own default applies: no default
    is stated here."""

    lr: Optional[float] = None  # every space declares it; the distiller alone does not need it
    method: Optional[str] = None  # compare's cases name their method
    seed: Optional[int] = None
    logit_loss: Optional[str] = None
    temperature: Optional[float] = None
    stone_temperature: Optional[float] = None
    alpha: Optional[float] = None
    beta: Optional[float] = None
    gamma: Optional[float] = None
    dkd_alpha: Optional[float] = None
    dkd_beta: Optional[float] = None
    dist_inter: Optional[float] = None
    dist_intra: Optional[float] = None
    loca_alpha: Optional[float] = None
    skew_lambda: Optional[float] = None
    jsd_beta: Optional[float] = None
    cuts: tuple[int, ...] = ()
    stone_weights: tuple[float, ...] = ()

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> "TrialParams":
        """Read from Tune, a space's defaults or MLflow's strings; an unreadable value is a ``MethodParamError``
        naming it."""
        special = {"method": str, "logit_loss": str, "seed": as_int}
        values = read_params({f.name: special.get(f.name, float) for f in fields(cls) if f.name not in ("cuts", "stone_weights")},
                             params)
        cuts = tuple(parse_cuts(str(params.get("cuts") or "")))
        return cls(**values, cuts=cuts, stone_weights=tuple(stone_weights(params, cuts)))

    def seed_or(self, default: int) -> int:
        """The trial's seed: its ``seed`` parameter (compare's seeds, confirmation runs), else ``default``."""
        return default if self.seed is None else self.seed

    def distill_kwargs(self) -> dict[str, Any]:
        """The distiller's keyword arguments the configuration sets (logit loss, temperatures, weights)."""
        names = ("logit_loss", "temperature", "alpha", "beta", "dkd_alpha", "dkd_beta", "dist_inter", "dist_intra", "loca_alpha",
                 "skew_lambda", "jsd_beta")
        kwargs = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if self.cuts:
            kwargs |= {n: getattr(self, n) for n in ("stone_temperature", "gamma") if getattr(self, n) is not None}
            kwargs |= {"cuts": list(self.cuts), "stone_weights": list(self.stone_weights)}
        return kwargs


def method_arguments(space: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name of the method ``space`` trains and its keyword arguments for the configuration
    ``params`` (the shared ones, from ``TrialParams``, and the method's own, read by its ``own_params``)."""
    method = method_of(space)
    return method.name, TrialParams.of(params).distill_kwargs() | method.read_own_params(params)
