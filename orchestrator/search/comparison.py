"""A comparison of methods: each method's configuration (its space's defaults, a search's best, or its own
search first), the (method, seed) cases on fresh seeds, the summary (means, 95 % intervals, differences
paired by seed, verdicts), ``compare.parquet`` and ``compare.png``. The command: ``orchestrator.compare``."""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import matplotlib
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from orchestrator.config.checks import ConfigError, check_fixed
from orchestrator.config.job import Job, check_method_applies, check_method_params
from orchestrator.config.models import build_model
from orchestrator.search.chance import Chance, at_chance_line
from orchestrator.search.search import RunSearch
from orchestrator.search.summary import RunCases, collect_rows, first_failure
from orchestrator.tracking.objective import ACCURACY, Objective, objective_of
from orchestrator.tracking.results import seed_result, write_parquet
from orchestrator.tracking.stats import METHOD, SeedResult, method_interval, paired_difference, verdict
from orchestrator.tracking.writer import MLflowWriter, Write
from search_spaces.space import SearchSpaceError, defaults, for_data, uses_partition, with_lr_range
from search_spaces.space import display as space_display
from search_spaces.space import load_space as load_search_space

COLUMNS = ("method", "seed", "status", "epochs", "mlflow_run_id", "trial_id")  # first, then the objective's figures
SPACE_DEFAULTS = "its search space's defaults"


def display(method: str) -> str:
    return space_display(method)


def load_space(method: str, job: Job) -> dict[str, Any]:
    """A compared method's search space, its lr over ``train.lr_range`` where that is set (on causal LMs, with its
    ``lm`` params)."""
    try:
        return for_data(with_lr_range(load_search_space(method), job.cfg.train.lr_range), job.dataset.token_level)
    except SearchSpaceError as exc:
        raise ConfigError("compare.methods", str(exc)) from None


def best_of_search(source: str, method: str, job: Job) -> dict[str, Any]:
    """The best configuration of a finished search: a results folder (its trials.parquet) or an
    MLflow parent run id (its ``best.*`` tags); ``seed`` is the seed it was selected on."""
    key = f"compare.from_search.{method}"
    path = Path(source).expanduser()
    if path.is_dir() or path.suffix == ".parquet":
        table = path / "trials.parquet" if path.is_dir() else path
        if not table.is_file():
            raise ConfigError(key, f"{path} holds no trials.parquet; give a search's results folder (results/<experiment>) "
                              "or its MLflow parent run id.")
        rows = [r for r in pq.read_table(table).to_pylist() if r.get("status") == "FINISHED"]
        if not rows:
            raise ConfigError(key, f"{table} has no FINISHED trial to take a configuration from.")
        return {k: v for k, v in rows[0].items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
    from mlflow.tracking import MlflowClient
    try:
        data = MlflowClient(job.tracking_uri).get_run(source).data
        tags = data.tags
    except Exception as exc:
        raise ConfigError(key, f"{source!r} is neither a results folder nor an MLflow run at {job.tracking_uri} "
                          f"({type(exc).__name__}); give results/<experiment> or the search's parent run id.") from None
    best = {k[len("best."):]: v for k, v in tags.items() if k.startswith("best.") and k != "best.trial_id"}
    if not best:
        raise ConfigError(key, f"MLflow run {source} has no best.* tags: it is not a finished search's parent run.")
    found = {k: (v if k in ("cuts", "logit_loss") else _number(v)) for k, v in best.items()}
    seed = data.params.get("train.seed")  # the seed the search's trials trained with
    return found | ({"seed": int(seed)} if "seed" not in found and seed is not None else {})


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass
class MethodConfig:
    """The configuration a method trains with in a comparison, and where it came from."""

    method: str
    config: dict[str, Any]
    source: str
    selected_on: set[int] = field(default_factory=set)  # seeds the configuration was selected on

    def describe(self) -> str:
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.config.items() if k != "method")
        return f"[bkd] {display(self.method)} ({self.method}): {values or 'no parameters'}  <- {self.source}"


def method_config(job: Job, method: str, searched: Optional[tuple[dict[str, Any], str]] = None) -> MethodConfig:
    """A method's configuration: its space's defaults, overridden by a search's best (``searched``: the
    best row of a ``compare.tune_trials`` search and its run id, else compare.from_search), then by
    compare.fixed."""
    space = load_space(method, job)
    c = job.cfg.compare
    names = set(space.get("params") or {}) | ({"cuts"} if uses_partition(space) else set())
    chosen: dict[str, Any] = {}
    sources, selected_on = [], set()
    found, where = (searched if searched else (None, ""))
    if found is None and (c.from_search or {}).get(method):
        found, where = best_of_search(str(c.from_search[method]), method, job), f"compare.from_search.{method}={c.from_search[method]}"
        if not uses_partition(space) and found.get("cuts"):
            raise ConfigError(f"compare.from_search.{method}", f"that search trained stepping stones (cuts={found['cuts']}); "
                              f"{method} has none. Give a {method} search.")
    if found is not None:
        chosen = {k: v for k, v in found.items() if k in names or (k.startswith("w_") and "cuts" in names)}
        selected_on = {int(found["seed"])} if found.get("seed") is not None else set()
        sources.append(f"the best of {where}")
    fixed = dict((c.fixed or {}).get(method) or {})
    check_fixed({**chosen, **fixed}, space, job.num_blocks, prefix=f"compare.fixed.{method}.")
    if fixed:
        sources.append(f"compare.fixed.{method}: {', '.join(sorted(fixed))}")
    try:
        config = defaults(space, job.num_blocks, {**chosen, **fixed})
    except SearchSpaceError as exc:
        raise ConfigError(f"compare.fixed.{method}", str(exc)) from None
    sources.append(f"{SPACE_DEFAULTS} for the rest" if sources else SPACE_DEFAULTS)
    return MethodConfig(method, {"method": method, **config}, "; ".join(sources), selected_on)


def fresh_seeds(job: Job, count: int, used: set[int]) -> list[int]:
    """``count`` seeds from train.seed+1 on, none of them ``used`` (a seed a configuration was selected on,
    and train.seed, the seed searches train their trials with)."""
    used = used | {job.cfg.train.seed}
    seeds, seed = [], job.cfg.train.seed + 1
    while len(seeds) < count:
        if seed not in used:
            seeds.append(seed)
        seed += 1
    return seeds


def method_search_job(job: Job, method: str) -> Job:
    """The job of a method's own search (``compare.tune_trials``): its space, compare.fixed.<method> as
    its fixed values, tune.num_samples trials, the comparison's teacher, data and val split."""
    cfg = copy.deepcopy(job.cfg)
    cfg.search = load_space(method, job)
    cfg.fixed = dict((job.cfg.compare.fixed or {}).get(method) or {})
    cfg.tune.num_samples = job.cfg.compare.tune_trials
    cfg.tune.confirm_seeds = 0
    return dataclasses.replace(job, cfg=cfg, experiment_name=f"{job.experiment_name}-search-{method}")


def check_methods(job: Job) -> list[str]:
    """compare.methods, baseline, fixed and from_search against each other."""
    c = job.cfg.compare
    methods = list(c.methods or [])
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError("compare.methods", f"must list distinct methods, e.g. [none,kd,blockkd]; got {methods}.")
    if c.baseline is not None and c.baseline not in methods:
        raise ConfigError("compare.baseline", f"{c.baseline!r} is not among compare.methods={methods}; add it, or "
                          "set compare.baseline=null for no paired differences.")
    unknown = set(c.fixed or {}) - set(methods) | set(c.from_search or {}) - set(methods)
    if unknown:
        raise ConfigError("compare.fixed", f"names methods {sorted(unknown)} that are not in compare.methods={methods}.")
    for method in methods:
        check_method_applies(method, job.cfg, "compare.methods")
    if c.tune_trials and c.from_search:
        raise ConfigError("compare.tune_trials", "searches every method itself; drop compare.from_search (or "
                          "compare.tune_trials=null to take those searches' best configurations).")
    return methods


def cases_of(job: Job, configs: dict[str, MethodConfig]) -> list[dict[str, Any]]:
    """One case per (method, seed), seeds first so that early results cover every method; printed first."""
    for m in configs.values():
        print(m.describe(), flush=True)
    seeds = fresh_seeds(job, job.cfg.compare.seeds, set().union(*(m.selected_on for m in configs.values())))
    print(f"[bkd] seeds {', '.join(map(str, seeds))}: the same student initialisation and data order for every method", flush=True)
    return [{**configs[m].config, "seed": seed} for seed in seeds for m in configs]


def checked_configs(job: Job) -> dict[str, MethodConfig]:
    """Every method's configuration (``method_config``), each method built once on the pair with it, as its
    trials will build it: a value a method cannot use (compare.fixed.fitnet.hint_block beyond the pair's
    blocks) exits 2 here, before Ray. The pair is built once for all methods."""
    configs = {m: method_config(job, m) for m in check_methods(job)}
    teacher, student = (build_model(job.cfg, role, job.num_classes, job.in_channels, job.dataset.shape)
                        for role in ("teacher", "student"))
    for method, config in configs.items():
        fixed = (job.cfg.compare.fixed or {}).get(method) or {}
        check_method_params(load_space(method, job), config.config, lambda name: f"compare.fixed.{method}.{name}" if name in fixed
                            else f"search space {method}: params.{name}", teacher, student, job.dataset.shape)
    return configs


def cases(job: Job) -> list[dict[str, Any]]:
    """The cases of a comparison without searches: every method's configuration checked and printed."""
    return cases_of(job, checked_configs(job))


class NoConfiguration(RuntimeError):
    """A method's own search (compare.tune_trials) finished no trial: there is nothing to compare."""


def tuned_cases(job: Job, run_search: RunSearch) -> list[dict[str, Any]]:
    """compare.tune_trials: every method's own search (same trial budget, teacher and val split), then
    its best configuration on fresh seeds."""
    configs = {}
    for method in check_methods(job):
        if not (load_space(method, job).get("params") or {}):
            configs[method] = method_config(job, method)  # nothing to search
            continue
        found = run_search(method_search_job(job, method), f"search-{method}")
        best = next((r for r in found.rows if r["status"] == "FINISHED"), None)
        if best is None:
            raise NoConfiguration(f"no trial of {method}'s search finished ({first_failure(found.rows)}); the comparison "
                                  f"stops before its seeds. Its trials are in {Path(job.output_dir) / job.experiment_name / f'search-{method}'}.")
        o = objective_of(job)
        print(f"[bkd] {method}: best of {len(found.rows)} trials, {o.val} {o.fmt(best[o.val])} (trial {best['trial_id']})", flush=True)
        configs[method] = method_config(job, method, (best, f"{method}'s search of {len(found.rows)} trials (MLflow run {found.run_id})"))
    return cases_of(job, configs)


def seed_results(rows: list[dict[str, Any]], method: str, test_count: int, objective: Objective = ACCURACY) -> dict[int, SeedResult]:
    """A method's finished seeds: the test figure (``objective.test``: each run's final weights on the test split) and,
    where the run kept it, its per-example correctness."""
    metric = objective.test
    count = test_count if objective is ACCURACY else 0  # a loss has no binomial term (its per-example terms stand in)
    return {r["seed"]: seed_result(r, metric, count) for r in rows
            if r["method"] == method and r["status"] == "FINISHED" and r.get(metric) is not None and r[metric] == r[metric]}


def summaries(rows: list[dict[str, Any]], methods: list[str], baseline: Optional[str], test_count: int,
              objective: Objective = ACCURACY) -> list[dict[str, Any]]:
    """Per method: its interval of the test figure over finished seeds and its paired difference to ``baseline``, each
    counting the seeds' and (where known) the test split's noise (``orchestrator.tracking.stats``)."""
    results = {m: seed_results(rows, m, test_count, objective) for m in methods}
    unit = "points" if objective is ACCURACY else "nats"
    out = []
    for m in methods:
        entry: dict[str, Any] = {"method": m, "interval": method_interval(results[m])}
        if baseline and m != baseline:
            entry["diff"] = paired_difference(results[m], results[baseline])
            entry["verdict"] = verdict(display(m), display(baseline), entry["diff"], objective.higher_is_better, unit)
        out.append(entry)
    return out


def _f(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_summary(summary: list[dict[str, Any]], baseline: Optional[str], objective: Objective = ACCURACY) -> str:
    head = ["method", "n", "mean", "std", "95% CI"] + ([f"diff vs {baseline} (paired)", "95% CI"] if baseline else [])
    lines = [head]
    for s in summary:
        i, d = s["interval"], s.get("diff")
        cells = [s["method"], str(i.n if i else 0), _f(i and i.mean), _f(i and i.std),
                 f"{_f(i.low)} to {_f(i.high)}" if i and i.n > 1 else "-"]
        if baseline:
            cells += [_f(d and d.mean, 2) if d else "-", f"{_f(d.low)} to {_f(d.high)}" if d and d.n > 1 else "-"]
        lines.append(cells)
    widths = [max(len(line[k]) for line in lines) for k in range(len(head))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    sentences = [s["verdict"] for s in summary if s.get("verdict")]
    counted = all(s["interval"] is None or s["interval"].counts_examples for s in summary)
    how = METHOD if counted else "Student t over seeds (the test split's sampling variance is not counted for a loss); paired by seed"
    return ("\n".join(text) + f"\n({objective.test}: {objective.meaning} of the final weights on the test split, "
            f"{objective.direction}; 95 % intervals: {how})\n\n" + "\n".join(sentences))


def compare_figure(rows: list[dict[str, Any]], summary: list[dict[str, Any]], title: str, objective: Objective = ACCURACY) -> Figure:
    """Every seed as a dot, each method's mean with its 95 % interval; Block-KD's stepping stones beside it.
    Eleven methods and more stay readable: one colour each (tab20), slanted names, the axis kept to 0-100 %."""
    finished = {s["method"]: [r for r in rows if r["method"] == s["method"] and r["status"] == "FINISHED"] for s in summary}
    metric = objective.test
    stones = {m: sorted({k for r in done for k in r if k.startswith(f"{metric}_stone_") and r[k] is not None})
              for m, done in finished.items()}  # stepping stones N_i: the student's first i blocks + connector + teacher's rest
    columns = len(summary) + sum(map(len, stones.values()))
    many = columns > 8
    fig = Figure(figsize=(max(6.0, (0.95 if many else 1.6) * (columns + 1)), 4.8 if many else 4.5), layout="constrained")
    ax = fig.subplots()
    tab20 = matplotlib.colormaps["tab20"].colors
    colours = tab20[0::2] + tab20[1::2]  # ten strong colours, then their light shades
    labels: list[str] = []
    for k, s in enumerate(summary):
        x = len(labels)
        labels.append(display(s["method"]))
        done = finished[s["method"]]
        ax.scatter([x + 0.08 * ((j % 5) - 2) for j in range(len(done))], [r[metric] for r in done], s=22, alpha=0.7,
                   color=colours[k % len(colours)])
        i = s["interval"]
        if i is not None:
            err = [[i.mean - i.low], [i.high - i.mean]] if i.n > 1 else None
            ax.errorbar([x + 0.3], [i.mean], yerr=err, fmt="D", color="black", capsize=5,
                        label="mean, 95 % CI" if x == 0 else None)
        for key in stones[s["method"]]:
            x = len(labels)
            labels.append(f"{display(s['method'])}\nstone {key.rsplit('_', 1)[1]}")
            ax.scatter([x] * len(done), [r[key] for r in done], s=22, alpha=0.4, color="gray")
    ax.set_xticks(range(len(labels)), labels, rotation=30 if many else 0, ha="right" if many else "center")
    if objective is ACCURACY:
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, -2.0), min(high, 102.0))  # intervals of few seeds can reach past 0 and 100 %: the table has them
    ax.set(ylabel=f"{metric}, final weights ({objective.direction})", title=title)
    ax.grid(axis="y", alpha=0.3)
    if summary and summary[0]["interval"] is not None:
        ax.legend(loc="lower right")
    return fig


def report(job: Job, parent: MLflowWriter, results: Any, interrupted: bool, run_cases: RunCases) -> list[dict[str, Any]]:
    """compare.parquet, compare.png, the printed table and verdicts, and the parent run's metrics."""
    found, _, _ = collect_rows(job, parent, results, interrupted)
    rows = sorted(found, key=lambda r: (r.get("method") or "", r.get("seed") or 0))
    o = objective_of(job)
    columns = COLUMNS[:2] + (o.test, o.val, o.best_val) + COLUMNS[2:]
    for r in rows:  # fixed names first, for readers of compare.parquet
        for key in columns:
            r.setdefault(key, None)
    out = Path(job.output_dir) / job.experiment_name
    out.mkdir(parents=True, exist_ok=True)
    write_parquet([{k: r[k] for k in columns} | r for r in rows], str(out / "compare.parquet"))
    c = job.cfg.compare
    methods, baseline = list(c.methods), c.baseline
    summary = summaries(rows, methods, baseline, job.dataset.rows["test"], o)
    print("\n" + format_summary(summary, baseline, o))
    at_chance = at_chance_line(rows, Chance.of_split(job, "test"), o.test, "run of every method and seed")
    if at_chance:
        print(at_chance)
    if interrupted:
        print(f"\nresults so far: {out}/compare.parquet", flush=True)
        return rows
    compare_figure(rows, summary, job.experiment_name, o).savefig(out / "compare.png", dpi=110)
    print(f"\nresults: {out}/compare.parquet, plot: {out}/compare.png")
    print(f"MLflow UI: mlflow ui --backend-store-uri {job.tracking_uri}   (then open "
          f"http://127.0.0.1:5000/#/experiments/{parent.experiment_id}?workflowType=machine_learning)")
    metrics: dict[str, float] = {}
    for s in summary:
        i, d, m = s["interval"], s.get("diff"), s["method"]
        if i is not None:
            metrics[f"mean_{o.test}.{m}"] = i.mean
            if i.n > 1:
                metrics[f"std_{o.test}.{m}"] = i.std
        if d is not None and d.n > 0:
            metrics[f"diff_vs_{baseline}.{m}"] = d.mean
            if d.n > 1:
                metrics[f"diff_vs_{baseline}_ci_low.{m}"], metrics[f"diff_vs_{baseline}_ci_high.{m}"] = d.low, d.high
    parent_id = parent.parent_run_id
    parent.submit(Write("metrics", {"run_id": parent_id, "metrics": metrics, "step": 0, "timestamp_ms": int(time.time() * 1000)}))
    parent.submit(Write("tags", {"run_id": parent_id, "tags": {"bkd.verdict": " ".join(s.get("verdict", "") for s in summary)}}))
    parent.submit(Write("artifact", {"run_id": parent_id, "path": str(out / "compare.parquet")}))
    parent.submit(Write("artifact", {"run_id": parent_id, "path": str(out / "compare.png")}))
    return rows
