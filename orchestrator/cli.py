"""Shared command-line handling: compose, validate, run; configuration errors exit with code 2."""
from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from .config import ConfigError, Job, apply_env_defaults, compose, validate
from .interrupts import STOP

USAGE = """usage: python -m orchestrator.{tune,train,teacher,compare} [KEY=VALUE | GROUP=OPTION ...] [--cfg] [--help]

Hydra overrides, e.g. data=fashion_mnist data.root=PATH pair=resnet32x4_resnet8x4 search=kd tune.num_samples=64.
Groups: data, pair, search. --cfg prints the composed config and exits. See README.md."""


def entry_point(run: Callable[[Job], Any], argv: Optional[list[str]] = None, command: str = "tune") -> int:
    """Parse ``argv``, validate before Ray starts, and call ``run(job)``; returns the exit code
    (``run``'s own when it returns an int)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(USAGE)
        return 0
    apply_env_defaults()
    try:
        cfg = compose([a for a in argv if a != "--cfg"])
        if "--cfg" in argv:
            print(OmegaConf.to_yaml(cfg))
            return 0
        job = validate(cfg, command=command)
        if job.cfg["tune"].get("console") != "ray":
            from .runtime import quiet_driver

            quiet_driver()
        with STOP.installed():
            try:
                code = run(job)
            except KeyboardInterrupt:
                print(f"\n[bkd] {STOP.name or 'SIGINT'}: {job.experiment_name} was interrupted; finished trials are kept. "
                      f"To continue it:\n  {resume_command(run, argv, job.experiment_name)}", file=sys.stderr, flush=True)
                return STOP.exit_code
    except ConfigError as exc:
        print(f"\nbkd: configuration error in `{exc.key}`:\n  {str(exc).split(': ', 1)[1]}\n", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def resume_command(run: Callable[..., Any], argv: list[str], name: str) -> str:
    """The command that continues an interrupted one: the same overrides plus tune.resume=true tune.name=NAME."""
    kept = [a for a in argv if not a.startswith(("tune.resume=", "tune.name="))]
    module = run.__module__
    if module == "__main__":  # python -m orchestrator.X: the module's real name is on its spec
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else "orchestrator.tune"
    return " ".join(["python -m", module, *kept, "tune.resume=true", f"tune.name={name}"])
