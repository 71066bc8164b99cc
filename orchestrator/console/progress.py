"""The search's own console: one line per trial start and end (trials done / running / best so far),
in place of Ray Tune's tables and its workers' logs (``tune.console=ray`` brings those back)."""
from __future__ import annotations

import time
from typing import Any

from ray.tune import Callback

from orchestrator.tracking.objective import ACCURACY, Objective
from orchestrator.tracking.records import RECORDED
from orchestrator.tracking.trial_logger import trial_error

ENDED = ("TERMINATED", "ERROR")


class ProgressPrinter(Callback):
    def __init__(self, total: int, objective: Objective = ACCURACY) -> None:
        self.total, self.objective = total, objective
        self.started = time.monotonic()

    def setup(self, **info: Any) -> None:
        self.started = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trials, f"started {trial.trial_id}", starting=0 if trial.status == "RUNNING" else 1)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        how = "replayed its record" if last.get(RECORDED) else f"ended after epoch {last.get('epoch', '?')}"
        metric = self.objective.val
        self._line(trials, f"{trial.trial_id} {how}, {metric} {last.get(metric, float('nan')):.2f}", ending=trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cause = trial_error(trial)
        self._line(trials, f"{trial.trial_id} FAILED: {cause} (traceback: {getattr(trial, 'error_file', None) or 'the trial log'})",
                   ending=trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._line(trials, f"{trial.trial_id} failed ({short_cause(trial_error(trial))}); it continues from its last checkpoint "
                           f"(traceback: {getattr(trial, 'error_file', None) or 'the trial log'})")

    def _line(self, trials: list, event: str, starting: int = 0, ending: Any = None) -> None:
        """``starting``: 1 while the trial that starts is not RUNNING yet; ``ending``: the trial that
        ends, not yet TERMINATED/ERROR when Tune calls back."""
        done = sum(t.status in ENDED or t is ending for t in trials)
        running = sum(t.status == "RUNNING" and t is not ending for t in trials) + starting
        metric = self.objective.val
        scored = [(t.last_result[metric], t.trial_id) for t in trials if (t.last_result or {}).get(metric) is not None]
        top = min(scored, key=lambda pair: self.objective.sort_key(pair[0])) if scored else None
        best = f"best {metric} {top[0]:.2f} ({top[1]})" if top else "no result yet"
        elapsed = time.monotonic() - self.started
        print(f"[bkd] {elapsed:6.0f} s  trials {done}/{self.total} done, {running} running  {best}  <- {event}", flush=True)


def short_cause(cause: str) -> str:
    """A trial's error in a few words: a process that died (Ray's paragraph on it) is said as such."""
    if "worker process has died" in cause or "Worker unexpectedly exits" in cause:
        return "its process died: killed, or out of memory"
    return cause[:200]
