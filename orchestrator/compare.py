"""Does Block-KD pay here? Train every (method, seed) pair once at the same budget, as Tune trials
under one MLflow parent run, and report means, 95 % intervals and differences paired by seed.

    python -m orchestrator.compare                                              # digits, none/kd/blockkd x 5 seeds
    python -m orchestrator.compare recipe=fashion_mnist data.root=PATH compare.seeds=5
    python -m orchestrator.compare compare.methods=[kd,dkd,blockkd] compare.fixed.blockkd.gamma=0
    python -m orchestrator.compare compare.from_search.blockkd=results/<search>   # its best configuration

Seed s gives every method the same student initialisation and the same data order.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import pyarrow.parquet as pq
from matplotlib.figure import Figure
from omegaconf import OmegaConf

import search_spaces
from search_spaces.space import SearchSpaceError, defaults

from .checks import ConfigError, check_fixed
from .cli import entry_point
from .config import Job
from .results import write_parquet
from .stats import Interval, paired_difference, verdict
from .tune import RunCases, collect_rows, first_failure, search
from .tracking import MLflowWriter, Write

SPACES = Path(search_spaces.__file__).parent / "conf" / "search"
DISPLAY = {"none": "The student alone", "kd": "KD", "dkd": "DKD", "blockkd": "Block-KD"}
COLUMNS = ("method", "seed", "val_acc", "best_val_acc", "status", "epochs", "mlflow_run_id", "trial_id")


def display(method: str) -> str:
    return DISPLAY.get(method, method)


def load_space(method: str) -> dict[str, Any]:
    path = SPACES / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SPACES.glob("*.yaml"))
        raise ConfigError("compare.methods", f"unknown method {method!r}; valid: {', '.join(known)} (none: the student alone).")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def best_of_search(source: str, method: str, job: Job) -> dict[str, Any]:
    """The best configuration of a finished search: a results folder (its trials.parquet) or an
    MLflow parent run id (its ``best.*`` tags)."""
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
        tags = MlflowClient(job.tracking_uri).get_run(source).data.tags
    except Exception as exc:
        raise ConfigError(key, f"{source!r} is neither a results folder nor an MLflow run at {job.tracking_uri} "
                          f"({type(exc).__name__}); give results/<experiment> or the search's parent run id.") from None
    best = {k[len("best."):]: v for k, v in tags.items() if k.startswith("best.") and k != "best.trial_id"}
    if not best:
        raise ConfigError(key, f"MLflow run {source} has no best.* tags: it is not a finished search's parent run.")
    return {k: (v if k in ("cuts", "logit_loss") else _number(v)) for k, v in best.items()}


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def method_config(job: Job, method: str) -> dict[str, Any]:
    """A method's configuration: its space's defaults, overridden by a search's best, then by compare.fixed."""
    space = load_space(method)
    c = job.cfg["compare"]
    names = set(space.get("params") or {}) | ({"cuts"} if space.get("method", "blockkd") == "blockkd" else set())
    chosen: dict[str, Any] = {}
    if (c.get("from_search") or {}).get(method):
        found = best_of_search(str(c["from_search"][method]), method, job)
        if space.get("method") != "blockkd" and found.get("cuts"):
            raise ConfigError(f"compare.from_search.{method}", f"that search trained stepping stones (cuts={found['cuts']}); "
                              f"{method} has none. Give a {method} search.")
        chosen = {k: v for k, v in found.items() if k in names or (k.startswith("w_") and "cuts" in names)}
    fixed = dict((c.get("fixed") or {}).get(method) or {})
    check_fixed({**chosen, **fixed}, space, job.num_blocks, prefix=f"compare.fixed.{method}.")
    try:
        config = defaults(space, job.num_blocks, {**chosen, **fixed})
    except SearchSpaceError as exc:
        raise ConfigError(f"compare.fixed.{method}", str(exc)) from None
    return {"method": method, **config}


def cases(job: Job) -> list[dict[str, Any]]:
    """One case per (method, seed), seeds first so that early results cover every method."""
    c = job.cfg["compare"]
    methods = list(c.get("methods") or [])
    if not methods or len(set(methods)) != len(methods):
        raise ConfigError("compare.methods", f"must list distinct methods, e.g. [none,kd,blockkd]; got {methods}.")
    if c.get("baseline") is not None and c["baseline"] not in methods:
        raise ConfigError("compare.baseline", f"{c['baseline']!r} is not among compare.methods={methods}; add it, or "
                          "set compare.baseline=null for no paired differences.")
    unknown = set(c.get("fixed") or {}) - set(methods) | set(c.get("from_search") or {}) - set(methods)
    if unknown:
        raise ConfigError("compare.fixed", f"names methods {sorted(unknown)} that are not in compare.methods={methods}.")
    configs = {m: method_config(job, m) for m in methods}
    base = int(job.cfg["train"]["seed"])
    return [{**configs[m], "seed": base + s} for s in range(int(c["seeds"])) for m in methods]


def summaries(rows: list[dict[str, Any]], methods: list[str], baseline: Optional[str]) -> list[dict[str, Any]]:
    """Per method: its interval over finished seeds and its paired difference to ``baseline``."""
    acc = {m: {r["seed"]: r["val_acc"] for r in rows if r["method"] == m and r["status"] == "FINISHED"} for m in methods}
    out = []
    for m in methods:
        values = list(acc[m].values())
        entry: dict[str, Any] = {"method": m, "interval": Interval.of(values) if values else None}
        if baseline and m != baseline:
            entry["diff"] = paired_difference(acc[m], acc[baseline])
            entry["verdict"] = verdict(display(m), display(baseline), entry["diff"])
        out.append(entry)
    return out


def _f(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def format_summary(summary: list[dict[str, Any]], baseline: Optional[str]) -> str:
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
    return "\n".join(text) + "\n(val_acc of the final epoch, %; intervals: Student t, 95 %)\n\n" + "\n".join(sentences)


def compare_figure(rows: list[dict[str, Any]], summary: list[dict[str, Any]], title: str) -> Figure:
    """Every seed as a dot, each method's mean with its 95 % interval; Block-KD's stepping stones beside it."""
    fig = Figure(figsize=(max(6.0, 1.6 * (len(summary) + 2)), 4.5), layout="constrained")
    ax = fig.subplots()
    labels: list[str] = []
    for s in summary:
        x = len(labels)
        labels.append(display(s["method"]))
        done = [r for r in rows if r["method"] == s["method"] and r["status"] == "FINISHED"]
        ax.scatter([x + 0.08 * ((k % 5) - 2) for k in range(len(done))], [r["val_acc"] for r in done], s=22, alpha=0.7)
        i = s["interval"]
        if i is not None:
            err = [[i.mean - i.low], [i.high - i.mean]] if i.n > 1 else None
            ax.errorbar([x + 0.3], [i.mean], yerr=err, fmt="D", color="black", capsize=5,
                        label="mean, 95 % CI" if x == 0 else None)
        stones = sorted({k for r in done for k in r if k.startswith("val_acc_stone_") and r[k] is not None})
        for key in stones:  # stepping stones N_i: the student's first i blocks + connector + teacher's rest
            x = len(labels)
            labels.append(f"{display(s['method'])}\nstone {key.rsplit('_', 1)[1]}")
            ax.scatter([x] * len(done), [r[key] for r in done], s=22, alpha=0.4, color="gray")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="final val_acc (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    if summary and summary[0]["interval"] is not None:
        ax.legend(loc="lower right")
    return fig


def report(job: Job, parent: MLflowWriter, results: Any, interrupted: bool, run_cases: RunCases) -> list[dict[str, Any]]:
    """compare.parquet, compare.png, the printed table and verdicts, and the parent run's metrics."""
    found, _, _ = collect_rows(job, parent, results, interrupted)
    rows = sorted(found, key=lambda r: (r.get("method") or "", r.get("seed") or 0))
    for r in rows:  # fixed names first, for readers of compare.parquet
        for key in COLUMNS:
            r.setdefault(key, None)
    out = Path(job.output_dir) / job.experiment_name
    out.mkdir(parents=True, exist_ok=True)
    write_parquet([{k: r[k] for k in COLUMNS} | r for r in rows], str(out / "compare.parquet"))
    c = job.cfg["compare"]
    methods, baseline = list(c["methods"]), c.get("baseline")
    summary = summaries(rows, methods, baseline)
    print("\n" + format_summary(summary, baseline))
    if interrupted:
        print(f"\nresults so far: {out}/compare.parquet", flush=True)
        return rows
    compare_figure(rows, summary, job.experiment_name).savefig(out / "compare.png", dpi=110)
    print(f"\nresults: {out}/compare.parquet, plot: {out}/compare.png")
    print(f"MLflow UI: mlflow ui --backend-store-uri {job.tracking_uri}   (then open "
          f"http://127.0.0.1:5000/#/experiments/{parent.experiment_id}?workflowType=machine_learning)")
    metrics: dict[str, float] = {}
    for s in summary:
        i, d, m = s["interval"], s.get("diff"), s["method"]
        if i is not None:
            metrics[f"mean_val_acc.{m}"] = i.mean
            if i.n > 1:
                metrics[f"std_val_acc.{m}"] = i.std
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


def run(job: Job) -> int:
    """0 when every method finished at least one seed, else 1 (with the reason)."""
    rows = search(job, cases(job), report)
    missing = [m for m in job.cfg["compare"]["methods"] if not any(r["method"] == m and r["status"] == "FINISHED" for r in rows)]
    if not missing:
        return 0
    print(f"[bkd] no finished run for {', '.join(missing)}; {first_failure(rows)}", file=sys.stderr, flush=True)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(run, argv, command="compare")


if __name__ == "__main__":
    sys.exit(main())
