"""Does Block-KD pay here? Train every (method, seed) pair once at the same budget, as Tune trials
under one MLflow parent run, and report means, 95 % intervals and differences paired by seed.

    python -m orchestrator.compare                                              # digits, none/kd/blockkd x 5 seeds
    python -m orchestrator.compare recipe=fashion_mnist data.root=PATH compare.seeds=5
    python -m orchestrator.compare compare.methods=[kd,dkd,blockkd] compare.fixed.blockkd.gamma=0
    python -m orchestrator.compare compare.from_search.blockkd=results/<search>   # its best configuration
    python -m orchestrator.compare compare.tune_trials=16                         # every method tuned first

Seed s gives every method the same student initialisation and the same data order. The seeds are
train.seed+1, +2, ...: never a seed a configuration was selected on. Statistics and verdicts use each
run's final weights on the test split (``test_acc``); configurations come from the held-out val split.
"""
from __future__ import annotations

import sys
from typing import Optional

from orchestrator.config.job import Job
from orchestrator.console.cli import entry_point
from orchestrator.search.comparison import NoConfiguration, cases, checked_configs, report, tuned_cases
from orchestrator.search.search import search
from orchestrator.search.summary import first_failure


def run(job: Job) -> int:
    """0 when every method finished at least one seed, else 1 (with the reason)."""
    if job.cfg.compare.tune_trials:
        checked_configs(job)  # every method's compare.fixed checked before Ray starts
        try:
            rows = search(job, lambda run_search: tuned_cases(job, run_search), report)
        except NoConfiguration as exc:  # the parent run is FAILED with this reason; one line, exit 1
            print(f"[bkd] {exc}", file=sys.stderr, flush=True)
            return 1
    else:
        rows = search(job, cases(job), report)
    missing = [m for m in job.cfg.compare.methods if not any(r["method"] == m and r["status"] == "FINISHED" for r in rows)]
    if not missing:
        return 0
    print(f"[bkd] no finished run for {', '.join(missing)}; {first_failure(rows)}", file=sys.stderr, flush=True)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(run, argv, command="compare")


if __name__ == "__main__":
    sys.exit(main())
