"""Shared command-line handling: compose, validate, run; configuration errors exit with code 2."""
from __future__ import annotations

import sys
import textwrap
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from orchestrator.config.checks import ConfigError
from orchestrator.config.compose import apply_env_defaults, compose
from orchestrator.config.job import Job, validate
from orchestrator.console.filters import close_worker_output
from orchestrator.console.interrupts import STOP, Interrupted, OutOfTime, PhaseFailed


def usage(command: str) -> str:
    """bkd's own help: the command line, the groups, the main keys (from the schema), where the rest is."""
    from orchestrator.config.schema import find_key

    main = ["data.root", "pair.teacher", "pair.student", "tune.num_samples", "tune.max_concurrent", "train.epochs",
            "train.batch_size", "teacher.checkpoint", "resources.use_gpu", "resources.workers_per_trial",
            "compare.methods", "compare.seeds", "mlflow.tracking_uri"]
    lines = [f"usage: python -m orchestrator.{command} [GROUP=OPTION | KEY=VALUE ...] [--cfg job] [--help]", "",
             "Groups: data=<digits|mnist|fashion_mnist|cifar10|cifar100|image_folder|parquet|imagenet|text>, pair=<name>",
             "        (orchestrator/conf/pair; text: pair.teacher=hf:FOLDER), search=<blockkd|kd|dkd|none|...>,",
             "        recipe=<fashion_mnist|imagenet|cifar100_baselines|text_bert|...> (orchestrator/conf/recipe).",
             "Example: python -m orchestrator.tune data=image_folder data.root=/data/pets pair.teacher=mymodels:teacher "
             "tune.num_samples=32", "", "Main keys:"]
    for name in main:
        key = find_key(name)
        if key is not None:
            lines.append(f"  {name:<30} {textwrap.shorten(key.doc, 88, placeholder=' ...')}")
    lines += ["", "Every key, its type, default and allowed values: docs/reference/config.md (generated from",
              "orchestrator/config/schema.py). --cfg job prints the composed configuration and exits.",
              "Exit codes: 0 done, 1 no trial finished, 2 configuration error (before Ray starts), 130 / 143 interrupted (SIGINT / SIGTERM)."]
    return "\n".join(lines)


def entry_point(run: Callable[[Job], Any], argv: Optional[list[str]] = None, command: str = "tune") -> int:
    """Parse ``argv``, validate before Ray starts, and call ``run(job)``; returns the exit code
    (``run``'s own when it returns an int)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(usage(module_of(run).rpartition(".")[2]))
        return 0
    apply_env_defaults()
    try:
        cfg = compose([a for a in argv if a not in ("--cfg", "job")])
        if "--cfg" in argv:
            print(OmegaConf.to_yaml(cfg))
            return 0
        job = validate(cfg, command=command)
        if job.cfg.tune.console != "ray":
            from orchestrator.console.filters import quiet_driver

            quiet_driver()
        with STOP.installed():
            try:
                code = run(job)
            except KeyboardInterrupt as exc:
                close_worker_output()  # a line a worker printed before the stop must not follow the command below
                what, kept = (exc.what, exc.kept) if isinstance(exc, Interrupted) else (job.experiment_name, "finished trials are kept")
                print(f"\n[bkd] {STOP.name or 'SIGINT'}: {what} was interrupted; {kept}. "
                      f"To continue it:\n  {resume_command(run, argv, job.experiment_name)}", file=sys.stderr, flush=True)
                return STOP.exit_code
            except OutOfTime as exc:
                close_worker_output()
                print(f"\n[bkd] tune.time_budget_s ran out: {exc.what} was stopped; {exc.kept}. "
                      f"To continue it:\n  {resume_command(run, argv, job.experiment_name)}", file=sys.stderr, flush=True)
                return 1
            except PhaseFailed as exc:
                close_worker_output()
                print(f"\n[bkd] {exc}", file=sys.stderr, flush=True)
                return 1
    except ConfigError as exc:
        print(f"\nbkd: configuration error in `{exc.key}`:\n  {str(exc).split(': ', 1)[1]}\n", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def resume_command(run: Callable[..., Any], argv: list[str], name: str) -> str:
    """The command that continues an interrupted one: the same overrides plus tune.resume=true tune.name=NAME."""
    kept = [a for a in argv if not a.startswith(("tune.resume=", "tune.name="))]
    return " ".join(["python -m", module_of(run), *kept, "tune.resume=true", f"tune.name={name}"])


def module_of(run: Callable[..., Any]) -> str:
    """The module an entry point runs as (``python -m orchestrator.X``: the real name is on ``__main__``'s spec)."""
    module = run.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec else "orchestrator.tune"
    return module
