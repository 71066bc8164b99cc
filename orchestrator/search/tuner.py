"""The Tune experiment of a search (OptunaSearch + ASHA) or of listed cases."""
from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Any, Optional

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from orchestrator.config.job import Job
from orchestrator.console.progress import ProgressPrinter
from orchestrator.tracking.objective import objective_of
from orchestrator.tracking.trial_logger import MLflowTrialLogger
from orchestrator.worker.runtime import concurrent_trials, trial_resources
from orchestrator.worker.trial import run_trial
from search_spaces.space import suggest


class TimeBudget(Stopper):
    """``tune.time_budget_s``: stops the experiment once this command has run that long, the way Ctrl-C does
    (Tune's own interrupt, SIGUSR1): Tune saves the experiment with its running trials unfinished, so
    ``tune.resume=true`` continues them after their last finished epoch. Tune's own budget
    (``TuneConfig.time_budget_s``) ends them for good instead, and is restored spent; this one starts afresh in
    the command that restores the experiment. Where Tune could not install its interrupt (not the main
    thread), the budget ends the trials as Tune's does."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.started, self.signalled = float(seconds), time.time(), False

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        if time.time() - self.started < self.seconds:
            return False
        interrupt = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
        if threading.current_thread() is not threading.main_thread() or interrupt in (None, signal.SIG_DFL, signal.SIG_IGN):
            return True
        if not self.signalled:
            self.signalled = True
            os.kill(os.getpid(), signal.SIGUSR1)
        return False

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, started=time.time(), signalled=False)


def time_budget(job: Job) -> Optional[TimeBudget]:
    seconds = job.cfg.tune.time_budget_s
    return TimeBudget(seconds) if seconds else None


def make_tuner(job: Job, teacher_state: dict, callback: MLflowTrialLogger, cases: Optional[list[dict]] = None,
               name: Optional[str] = None) -> tune.Tuner:
    """The Tuner of the search (Optuna + ASHA), or of ``cases``: one trial per listed configuration,
    no search, no early stopping. ``name``: the Tune experiment (default: the job's)."""
    t = job.cfg.tune
    o = objective_of(job)  # val_acc (max), or an LM's val_loss (min)
    name = name or job.experiment_name
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job, teacher_state=teacher_state), trial_resources(job))
    total = len(cases) if cases is not None else t.num_samples
    callbacks = [callback] if t.console == "ray" else [callback, ProgressPrinter(total, o)]
    run_config = tune.RunConfig(name=name, storage_path=job.storage_path, callbacks=callbacks,
                                stop=time_budget(job) if cases is None else None,
                                failure_config=tune.FailureConfig(max_failures=t.max_failures),
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=verbosity(job))
    path = os.path.join(job.storage_path, name)
    if t.resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    if cases is not None:
        return tune.Tuner(trainable, param_space={"case": tune.grid_search(cases)}, run_config=run_config,
                          tune_config=tune.TuneConfig(num_samples=1, metric=o.val, mode=o.mode, reuse_actors=t.reuse_actors,
                                                      max_concurrent_trials=concurrent_trials(job)))
    sampler = optuna.samplers.RandomSampler(seed=t.seed) if t.searcher == "random" else None  # None: TPE
    searcher = OptunaSearch(
        space=functools.partial(suggest, space=job.cfg.search, num_blocks=job.num_blocks, fixed=job.cfg.fixed),
        metric=o.val, mode=o.mode, seed=None if sampler else t.seed, sampler=sampler)
    scheduler = None
    if t.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=job.cfg.train.epochs,
                                  grace_period=t.grace_period, reduction_factor=t.reduction_factor)
    tune_config = tune.TuneConfig(metric=o.val, mode=o.mode, search_alg=searcher, scheduler=scheduler,
                                  num_samples=t.num_samples, max_concurrent_trials=concurrent_trials(job),
                                  reuse_actors=t.reuse_actors)
    return tune.Tuner(trainable, run_config=run_config, tune_config=tune_config)


def verbosity(job: Job) -> int:
    """Ray Tune's console output: none by default (bkd prints its own progress), all with tune.console=ray."""
    return 2 if job.cfg.tune.console == "ray" else 0
