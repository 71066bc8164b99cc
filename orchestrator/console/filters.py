"""What the console shows with ``tune.console=bkd`` (the default): bkd's own lines. Ray's, Optuna's,
MLflow's and torch's own lines stay in their log files (``/tmp/ray/session_latest/logs``);
``tune.console=ray`` shows them as Ray would."""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

RAY_DATA_LOGGING = str(Path(__file__).parents[1] / "conf" / "ray_data_logging.yaml")  # Ray Data's console at WARNING

# Environment of every Ray worker process.
WORKER_ENV = {
    "RAY_DATA_LOGGING_CONFIG": RAY_DATA_LOGGING,
    # a Train worker's print() as itself, once (Train's print patch would log it again through its own handlers)
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # a deprecation inside Ray Data's own Train integration, said by every DatasetManager actor
    "PYTHONWARNINGS": "ignore:`ExecutionOptions.exclude_resources` is deprecated",
}

QUIET_LOGGERS = {
    "mlflow": logging.WARNING, "ray.tune": logging.WARNING, "ray.train": logging.WARNING,
    "ray._private.authentication": logging.ERROR,  # "Token authentication is enabled": Ray's default, said at every start
    "ray.data._internal.progress": logging.ERROR,  # "Progress bars disabled ..."
    "mlflow.utils.requirements_utils": logging.ERROR,  # a CPU torch's "+cpu" version label, said when the model is logged
    "torch._export": logging.ERROR,  # "dimension ... specialized" while MLflow exports the best student
    "transformers": logging.ERROR,  # notices while MLflow loads a language model's folder to check its input example
}


def quiet_loggers() -> None:
    os.environ["RAY_DATA_LOGGING_CONFIG"] = RAY_DATA_LOGGING  # read again whenever a dataset runs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # "Downloading artifacts" bars
    from ray.data import DataContext
    from ray.data._internal.logging import configure_logging

    configure_logging()
    DataContext.get_current().enable_progress_bars = False  # datasets made here carry it into trials and Train workers
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    try:  # Ray Train logs every report ("Reporting training result 1: TrainingReport(...)") under its file's path
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def quiet_driver() -> None:
    """In the driver: Tune's start-of-experiment table and TensorBoard hint, Optuna's and MLflow's INFO lines,
    Ray Data's progress bars go unprinted (bkd prints its own progress and where the results are)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's legacy reporter, silent at verbose=0 (the new one prints a table)
    # "Experiment state snapshotting has been triggered multiple times": said when epochs are short and checkpointed
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # a trial resumed after its last finished epoch reports Tune iterations Optuna has seen (Tune counts them from
    # its last checkpoint): Optuna keeps the first value of each and says so, which a user need not read
    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step`", category=UserWarning)
    quiet_loggers()
    # a failed trial: bkd prints its cause in one line; the traceback stays in the trial's error.txt and MLflow (bkd.error);
    # after Ctrl-C bkd prints the command that continues the search, not Tune's `Tuner.restore(...)`
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).addFilter(drop_tune_records)


def quiet_worker() -> None:
    """Run at the start of every Ray worker (its ``worker_process_setup_hook``): Ray Train/Tune/Data's
    per-report and per-dataset lines stay in the log files; bkd's own lines still print."""
    quiet_loggers()


def drop_tune_records(record: logging.LogRecord) -> bool:
    """A logging filter: Tune's "Trial task failed" record (pages of traceback), its "Stop signal received"
    line (bkd says what it stops), its "Resume experiment with: Tuner.restore(...)" hint, and its traceback when a
    resumed trial cannot delete an old checkpoint that a killed driver's run had deleted already (Tune has
    recorded the new checkpoint before it tries) are not printed."""
    text = str(record.msg)
    if text.startswith("Trial %s: Error handling checkpoint") and record.exc_info and record.exc_info[0] is FileNotFoundError:
        return False  # a resumed trial's old checkpoint that the interrupted process had already deleted: nothing lost
    return not (text.startswith(("Trial task failed for trial", "Stop signal received", "Trials did not complete"))
                or "Tuner.restore(" in text
                or "Resume training with" in text)


# Ray's C++ log lines that a worker also writes to stderr, e.g.
# "[2026-12-01 19:49:37,678 E 17232 17277] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' ..."
RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] [\w/.-]+\.(cc|h):\d+:")


def keep_lines(lines: list[str]) -> list[str]:
    """A worker's output lines less Ray's own: its C++ log lines, and the traceback an actor prints when
    Ray ends it with SIGTERM ("Exception ignored in ... sigterm_handler ... SystemExit: 1")."""
    kept: list[str] = []
    held: list[str] = []  # an "Exception ignored" block, kept unless it ends as Ray's SIGTERM exit
    for line in lines:
        if RAY_CORE_LINE.match(line):
            continue
        if held or line.startswith("Exception ignored in:"):
            held.append(line)
            if line.startswith("SystemExit"):
                if not any("sigterm_handler" in h for h in held):
                    kept += held
                held = []
            continue
        kept.append(line)
    return kept + held


WORKER_OUTPUT = {"closed": False}


def close_worker_output() -> None:
    """Print no more worker output (a command's last lines follow; Ray's log files keep the rest)."""
    WORKER_OUTPUT["closed"] = True


def filter_worker_logs() -> None:
    """Print the workers' output through ``keep_lines`` (the driver's copy only: the log files keep all).
    Uses Ray's worker-log dispatcher; where this Ray has none, the output is printed as it is."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        ignore_prefix = ray_worker._should_ignore_worker_log_prefix(ray_worker.global_worker)
        printer = functools.partial(ray_worker.print_to_stdstream, ignore_prefix=ignore_prefix)
    except (ImportError, AttributeError):
        return

    def print_kept(data: dict[str, Any]) -> None:
        if WORKER_OUTPUT["closed"]:
            return
        lines = keep_lines(list(data.get("lines") or []))
        own = [line for line in lines if line.startswith("[bkd]")]  # bkd's own lines, as the driver prints them
        if own:
            print("\n".join(own), file=sys.stderr if data.get("is_err") else sys.stdout, flush=True)
        others = [line for line in lines if not line.startswith("[bkd]")]
        if others:
            printer({**data, "lines": others})

    if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", print_kept)
    ray_worker.print_to_stdstream = functools.partial(print_unless_a_worker_died, ray_worker.print_to_stdstream)


def print_unless_a_worker_died(print_to_stdstream: Any, data: dict[str, Any], **kwargs: Any) -> None:
    """Ray's own error messages to the driver, less its paragraph on a worker process that died: bkd's progress
    says which trial failed and that it continues (the trial's error.txt and Ray's log files keep the paragraph)."""
    if data.get("pid") == "raylet" and any(str(line).startswith("A worker died or was killed") for line in data.get("lines") or []):
        return
    print_to_stdstream(data, **kwargs)
