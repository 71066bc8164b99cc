"""Run one Block-KD configuration (no search) through the same path as a tune trial.

    python -m orchestrator.train fixed.temperature=4 fixed.cuts=[1,3] fixed.gamma=1

Parameters not given in ``fixed`` take their search space's defaults.
"""
from __future__ import annotations

import sys
from typing import Optional

from orchestrator.config.checks import ConfigError
from orchestrator.config.job import Job
from orchestrator.console.cli import entry_point
from orchestrator.search.search import search
from search_spaces.space import SearchSpaceError, defaults


def run(job: Job) -> int:
    """Train the one configuration; the exit code: 0 when its trial finished, 1 when it failed or diverged."""
    try:
        params = defaults(job.cfg.search, job.num_blocks, job.cfg.fixed)
    except SearchSpaceError as exc:
        raise ConfigError("fixed", str(exc)) from None
    print("[bkd] configuration: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    rows = search(job, [params])
    if rows and rows[0]["status"] == "FINISHED":
        return 0
    reason = f"ended {rows[0]['status']}: {rows[0]['error']}" if rows else "never started"
    print(f"[bkd] the trial {reason}", file=sys.stderr)
    return 1


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(run, argv)


if __name__ == "__main__":
    sys.exit(main())
