"""The configuration reference, generated from the schema (``orchestrator.config.schema``).

    python -m orchestrator.reference            # writes docs/reference/config.md
    python -m orchestrator.reference --check    # exit 1 when the page is stale (the test suite runs this)
"""
from __future__ import annotations

import argparse
import sys

from orchestrator.config.reference import PAGE, render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page differs from the schema")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != page:
            print(f"{PAGE} is stale: run `python -m orchestrator.reference`.", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
