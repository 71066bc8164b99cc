"""Does the search pay? TPE + ASHA (bkd's default), random search and a grid over the same space, at
equal compute, on this machine: best-so-far val_acc against cumulative training epochs.

    python bench/hpo_efficiency.py --out bench/results/hpo          # digits, tiny pair, 2 cores

The space (all three methods): lr (log, 0.01-0.3), temperature (1-8) and the block partition
(7 choices for 3 blocks); the other Block-KD parameters at their defaults. The grid is
3 lr x 3 temperatures x 7 partitions = 63 trials of ``--epochs`` epochs; TPE + ASHA and random search
run ``--seeds`` search seeds each with a budget of ``--budget-share`` of the grid's epochs (random:
no early stopping, as it is usually run). Prints, per method and seed, the best val_acc found within
the budget and the epochs it took to come within 0.5 points of the grid's best; writes
``hpo.json`` and ``hpo.png``. Every finished search is kept as ``<out>/<name>.parquet`` (its trial rows);
a rerun reads those back and runs only the searches missing, so an interrupted benchmark continues
(``--seeds 3`` after a run with ``--seeds 1`` adds seeds 1 and 2).
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

FIXED = ["fixed.alpha=1.0", "fixed.beta=1.0", "fixed.gamma=1.0", "fixed.stone_temperature=4.0", "fixed.logit_loss=kd",
         "search.stone_weight=null"]
LRS, TEMPERATURES, PARTITIONS = (0.02, 0.06, 0.18), (2.0, 4.0, 8.0), ("1", "2", "3", "1,2", "1,3", "2,3", "1,2,3")


def job_for(tmp: Path, name: str, *overrides: str, teacher: bool = True):
    """The job of one run; ``teacher=False`` before the teacher exists (it is trained first)."""
    from orchestrator.config.compose import compose
    from orchestrator.config.job import validate
    given = [f"teacher.checkpoint={tmp}/teacher.pt"] if teacher else []
    return validate(compose([f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray",
                             f"output_dir={tmp}/out", f"tune.name={name}", *given, *FIXED, *overrides]))


class Searches:
    """Runs each named search once: its rows are kept in ``<out>/<name>.parquet`` and read back on a rerun.
    The teacher is trained only when a search has to run (training is seeded, so a rerun gets the same one)."""

    def __init__(self, out: Path, tmp: Path, common: list[str]):
        self.out, self.tmp, self.common = out, tmp, common
        self.teacher_ready = False

    def rows(self, name: str, *overrides: str, cases: list[dict] | None = None) -> list[dict]:
        import pyarrow.parquet as pq

        from orchestrator.search.search import search
        from orchestrator.tracking.results import write_parquet
        kept = self.out / f"{name}.parquet"
        if kept.exists():
            print(f"[hpo] {name}: read from {kept}")
            return pq.read_table(kept).to_pylist()
        self.ensure_teacher()
        rows = search(job_for(self.tmp, name, *self.common, *overrides), cases)
        write_parquet(rows, str(kept))
        return rows

    def ensure_teacher(self) -> None:
        from orchestrator import teacher as teacher_entry
        if not self.teacher_ready:  # trained once, then given to every run
            teacher_entry.run(job_for(self.tmp, "teacher", *self.common, teacher=False))
            (self.tmp / "teacher.pt").write_bytes((self.tmp / "out" / "teacher" / "teacher.pt").read_bytes())
            self.teacher_ready = True


def curve(rows: list[dict]) -> list[tuple[int, float]]:
    """(cumulative epochs, best val_acc so far) in the order trials started."""
    points, spent, best = [], 0, 0.0
    for r in sorted(rows, key=lambda r: r.get("started_at") or 0.0):
        spent += int(r.get("epochs") or 0)
        if r["status"] == "FINISHED" and r.get("val_acc") is not None:  # a stopped trial found no configuration
            best = max(best, float(r["val_acc"]))
        points.append((spent, best))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/hpo")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-share", type=float, default=0.25)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bkd-hpo-"))
    from search_spaces.space import defaults

    common = [f"train.epochs={args.epochs}", "tune.max_concurrent=2"]
    searches = Searches(out, tmp, common)
    job = job_for(tmp, "grid", *common, teacher=False)  # only its space, for the cases
    cases = [defaults(job.cfg.search, job.num_blocks, {**job.cfg.fixed, "lr": lr, "temperature": t, "cuts": cuts})
             for lr, t, cuts in itertools.product(LRS, TEMPERATURES, PARTITIONS)]
    grid_rows = searches.rows("grid", cases=cases)
    grid_epochs = sum(int(r["epochs"] or 0) for r in grid_rows)
    grid_best = max(float(r["val_acc"]) for r in grid_rows if r["status"] == "FINISHED")
    budget = int(args.budget_share * grid_epochs)
    results: dict = {"grid": {"epochs": grid_epochs, "best_val_acc": grid_best, "trials": len(grid_rows),
                              "curve": curve(grid_rows)}, "budget_epochs": budget}
    for method, extra in (("tpe_asha", ["tune.scheduler=asha", "tune.searcher=tpe"]),
                          ("random", ["tune.scheduler=none", "tune.searcher=random"])):
        per_trial = args.epochs if method == "random" else max(1, args.epochs // 3)  # ASHA's rungs stop most trials early
        samples = max(2, budget // per_trial)
        results[method] = []
        for seed in range(args.seeds):
            rows = searches.rows(f"{method}-{seed}", *extra, f"tune.seed={seed}", f"tune.num_samples={samples}")
            points = [p for p in curve(rows) if p[0] <= budget]
            reach = next((e for e, b in curve(rows) if b >= grid_best - 0.5), None)
            results[method].append({"seed": seed, "trials": len(rows), "epochs": sum(int(r["epochs"] or 0) for r in rows),
                                    "best_within_budget": points[-1][1] if points else None,
                                    "epochs_to_within_0.5_of_grid_best": reach, "curve": curve(rows)})
    (out / "hpo.json").write_text(json.dumps(results, indent=1))
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.step(*zip(*results["grid"]["curve"]), where="post", color="black", label=f"grid ({len(grid_rows)} trials)")
    for method, color in (("tpe_asha", "tab:blue"), ("random", "tab:orange")):
        for k, run_ in enumerate(results[method]):
            ax.step(*zip(*run_["curve"]), where="post", color=color, alpha=0.8, label=method if k == 0 else None)
    ax.axvline(budget, color="gray", linestyle="--", label=f"{args.budget_share:.0%} of the grid's epochs")
    ax.axhline(grid_best - 0.5, color="gray", linestyle=":", label="grid best - 0.5")
    ax.set(xlabel="cumulative training epochs", ylabel="best val_acc so far (%)", title="search efficiency (digits, tiny pair)")
    ax.legend(loc="lower right")
    fig.savefig(out / "hpo.png", dpi=110)
    print(f"grid: {len(grid_rows)} trials, {grid_epochs} epochs, best {grid_best:.2f}; budget {budget} epochs")
    for method in ("tpe_asha", "random"):
        for r in results[method]:
            print(f"{method:9s} seed {r['seed']}: {r['trials']} trials, {r['epochs']} epochs, best within budget "
                  f"{r['best_within_budget']}, epochs to within 0.5 of the grid's best: {r['epochs_to_within_0.5_of_grid_best']}")


if __name__ == "__main__":
    main()
