"""What a teacher/student pair looks like as blocks, before any training: per block, where it ends,
its output shape, parameters and multiply-adds per image for teacher and student, the connector at
each cut, and the exactness check of each model's split.

    python -m orchestrator.describe pair.teacher=mymodels:teacher pair.student=mymodels:student
"""
from __future__ import annotations

import sys
from typing import Optional

from orchestrator.config.job import Job
from orchestrator.config.pair_table import table
from orchestrator.console.cli import entry_point


def run(job: Job) -> int:
    print(table(job))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(run, argv)


if __name__ == "__main__":
    sys.exit(main())
