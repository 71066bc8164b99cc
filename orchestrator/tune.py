"""Search Block-KD hyper-parameters: Ray Tune + Optuna (TPE, define-by-run) over Ray Train trials,
each trial a nested MLflow run under one parent run; trials.parquet and the best student at the end.

    python -m orchestrator.tune                                   # embedded default (digits)
    python -m orchestrator.tune data=fashion_mnist data.root=PATH pair=tiny tune.num_samples=64
    ray job submit --working-dir . -- python -m orchestrator.tune <same overrides>
"""
from __future__ import annotations

import sys
from typing import Optional

from orchestrator.config.job import Job
from orchestrator.console.cli import entry_point
from orchestrator.search.search import search
from orchestrator.search.summary import first_failure


def run(job: Job) -> int:
    """``python -m orchestrator.tune``: 0 when at least one trial finished, else 1 (with the reason)."""
    rows = search(job)
    if any(r["status"] == "FINISHED" for r in rows):
        return 0
    print(f"[bkd] no trial finished all its epochs; {first_failure(rows)}", file=sys.stderr, flush=True)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(run, argv)


if __name__ == "__main__":
    sys.exit(main())
