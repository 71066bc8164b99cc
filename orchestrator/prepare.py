"""An image folder -> Parquet shards of encoded images and integer labels, written in parallel by Ray
tasks: what ``bkd_core.data.ParquetImages`` streams.

    python -m orchestrator.prepare source=/data/imagenet output=/data/imagenet-parquet
    python -m orchestrator.prepare source=s3://bucket/imagenet output=s3://bucket/imagenet-parquet max_side=null

Layout: ``SRC/train/<class>/<image>`` and ``SRC/val/<class>/<image>`` (any format PIL reads: JPEG,
PNG, grayscale, CMYK, ...). Output: three splits of Parquet shards (columns ``image``: bytes,
``label``: int32, ``path``: string): ``DST/train/`` (what trials learn from), ``DST/val/`` (a
stratified ``val_fraction`` of SRC/train, chosen by ``split_seed``: what a search selects on) and
``DST/test/`` (SRC/val, scored once at the end); ``DST/splits.json`` (the hold-out and row counts),
``DST/classes.json`` and ``DST/skipped.txt`` (every file that could not be read or decoded, and why). Images whose longest
side exceeds ``max_side`` (320) are re-encoded at that size as JPEG (quality 90): decoding then costs
a fraction of the original's, at the price of detail beyond 320 px (README: what it costs). Run again
after an interruption, it keeps every shard already written whole (its plan digest matches).
"""
from __future__ import annotations

import sys
import textwrap
from typing import Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from orchestrator.config.checks import ConfigError, check_values
from orchestrator.config.compose import compose
from orchestrator.config.schema import PrepareConfig
from orchestrator.data.prepare import prepare


def usage() -> str:
    """prepare's own help: the command line and every key of its schema."""
    from orchestrator.config.schema import keys

    lines = ["usage: python -m orchestrator.prepare source=SRC output=DST [KEY=VALUE ...] [--help]", "",
             "Writes an image folder (SRC/train/<class>/<image>, SRC/val/<class>/<image>) as Parquet shards that "
             "data=parquet streams.", "Example: python -m orchestrator.prepare source=/data/imagenet "
             "output=s3://BUCKET/imagenet-parquet val_fraction=0.008", "", "Keys:"]
    for key in keys(PrepareConfig):
        text = f"(required) {key.doc}" if key.default == MISSING else f"{key.doc} (default {key.default!r})"
        lines.append(f"  {key.name:<18} {textwrap.shorten(text, 100, placeholder=' ...')}")
    lines += ["", "Exit codes: 0 done, 2 configuration error."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    try:
        cfg = compose(argv, config_name="prepare")
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(missing[0], "is required; e.g. python -m orchestrator.prepare source=/data/images output=/data/shards.")
        check_values(cfg)  # every key against the schema (orchestrator.config.schema.PrepareConfig)
        c: PrepareConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        summary = prepare(c)
    except (ConfigError, OmegaConfBaseException) as exc:
        key = getattr(exc, "key", "config")
        print(f"\nbkd: configuration error in `{key}`:\n  {str(exc).split(': ', 1)[-1]}\n", file=sys.stderr)
        return 2
    print(f"[bkd] prepared {cfg.output}: {summary['train']} training, {summary['val']} held-out val "
          f"(val_fraction={cfg.val_fraction} of SRC/train) and {summary['test']} test images (SRC/val) of "
          f"{summary['classes']} classes in {summary['shards']} shards ({summary['reused_shards']} kept from an earlier run), "
          f"{summary['skipped']} files skipped (skipped.txt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
