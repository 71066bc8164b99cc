"""Ray set-up shared by the entry points: start or join a cluster, and the Train configs of a trial."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional

import ray
import ray.train
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.config.checks import ConfigError
from orchestrator.config.job import Job
from orchestrator.console.filters import WORKER_ENV, filter_worker_logs
from orchestrator.console.interrupts import STOP
from orchestrator.data.datasets import is_streamed
from orchestrator.data.streaming import data_cpus, trainer_datasets
from orchestrator.worker.loop import train_loop_per_worker
from search_spaces.space import TrialParams

# The Tune function that drives a trial's Train run holds this much CPU (Tune refuses 0).
TRIAL_DRIVER_CPU = 0.01


def init_ray(job: Job) -> None:
    """Join ``ray.address`` (or RAY_ADDRESS / a running cluster), else start a local one."""
    if ray.is_initialized():
        return
    address = job.cfg.ray.address
    # Ray Train's controller takes one report per poll (2 s by default), which would cost every
    # short epoch up to 2 s; poll faster (bench/overhead_bench.py: 1.2 s -> 6 ms per report).
    poll = str(job.cfg.ray.train_poll_interval_s)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", poll)  # a local cluster started here
    runtime_env: dict[str, Any] = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll}}
    quiet = job.cfg.tune.console != "ray"
    if quiet:  # workers keep Ray's own INFO lines in its log files
        runtime_env["worker_process_setup_hook"] = "orchestrator.console.filters.quiet_worker"
        runtime_env["env_vars"] |= WORKER_ENV
    join_or_start(address, job.cfg.ray.num_cpus, log_to_driver=True, runtime_env=runtime_env, include_dashboard=job.cfg.ray.dashboard,
                  logging_level=logging.WARNING if quiet else logging.INFO)
    if quiet:
        filter_worker_logs()
    STOP.claim()  # ray.init replaced our SIGTERM handler with its own


def join_or_start(address: Optional[str], num_cpus: Optional[int], **kwargs: Any) -> None:
    """``ray.init``: join ``address`` (null: $RAY_ADDRESS or a cluster ``ray start`` began on this machine),
    else start a local cluster of ``num_cpus`` CPUs. A running cluster found for a null address keeps its own
    CPUs (Ray refuses ``num_cpus`` when it joins), so the setting is dropped with a line that says so. Ray
    reads ``include_dashboard`` only when it starts a cluster."""
    if num_cpus and address in (None, "local"):
        try:
            ray.init(address=address, num_cpus=int(num_cpus), **kwargs)
            return
        except ValueError as err:
            if address == "local" or "must not be provided" not in str(err):
                raise
            print(f"[bkd] ray.num_cpus={num_cpus} is left out: joining the Ray cluster already running on this machine "
                  "(ray.address=local starts a separate one)", file=sys.stderr)
    ray.init(address=address, **kwargs)


def trial_resources(job: Job) -> dict[str, float]:
    """What a Tune trial holds: a single-worker trial trains in its own process and holds the
    worker's CPUs/GPUs; a multi-worker trial only drives a Ray Train run, whose workers hold theirs."""
    res = job.cfg.resources
    if res.workers_per_trial > 1:
        return {"cpu": TRIAL_DRIVER_CPU}
    need = {"cpu": res.cpus_per_worker}
    if res.use_gpu:
        need["gpu"] = res.gpus_per_worker
    return need


def trial_cpus(job: Job) -> float:
    """CPUs one running trial occupies: its workers (and a multi-worker trial's driver), and its data."""
    res = job.cfg.resources
    driver = TRIAL_DRIVER_CPU if res.workers_per_trial > 1 else 0.0
    return res.cpus_per_worker * res.workers_per_trial + driver + data_cpus(job.cfg.data)


def concurrent_trials(job: Job) -> int:
    """``tune.max_concurrent``, lowered for streamed data so that the CPUs of every running trial's
    decode tasks (``data.cpus_per_trial``) stay free: trials never hold the CPUs their data waits for.
    The decode tasks run on any node with a free CPU, CPU-only nodes included."""
    limit = job.cfg.tune.max_concurrent
    if not data_cpus(job.cfg.data):
        return limit
    fit = max(1, int(ray.cluster_resources().get("CPU", 0.0) // trial_cpus(job)))
    if fit < limit:
        print(f"[bkd] at most {fit} trials at once (tune.max_concurrent={limit}): each keeps {data_cpus(job.cfg.data):g} "
              f"CPUs free for its data (data.cpus_per_trial) beside its own; a larger cluster runs more", flush=True)
    return min(limit, fit)


def check_cluster_resources(job: Job) -> None:
    """Refuse, before any trial, a trial that the cluster can never place (instead of waiting forever)."""
    res = job.cfg.resources
    total = ray.cluster_resources()
    need_gpu = res.gpus_per_worker * res.workers_per_trial if res.use_gpu else 0.0
    driver = TRIAL_DRIVER_CPU if res.workers_per_trial > 1 else 0.0
    data = data_cpus(job.cfg.data)
    need_cpu = trial_cpus(job)
    if need_gpu > total.get("GPU", 0.0):
        raise ConfigError("resources.use_gpu", f"a trial asks for {need_gpu:g} GPUs ({res.workers_per_trial} workers x "
                          f"{res.gpus_per_worker}) but the cluster has {total.get('GPU', 0.0):g}; lower "
                          "resources.workers_per_trial or resources.gpus_per_worker, or add GPU nodes (autoscaling clusters: "
                          "check the worker group's max_workers).")
    if need_cpu > total.get("CPU", 0.0):
        raise ConfigError("resources.cpus_per_worker", f"a trial asks for {need_cpu:g} CPUs ({res.workers_per_trial} workers x "
                          f"{res.cpus_per_worker}, plus {driver:g} for the trial's driver and {data:g} for its data, "
                          "data.cpus_per_trial) but the cluster has "
                          f"{total.get('CPU', 0.0):g}; lower resources.workers_per_trial, resources.cpus_per_worker "
                          "or data.cpus_per_trial (fractions such as 0.9 are fine).")


def scaling_config(job: Job) -> ray.train.ScalingConfig:
    res = job.cfg.resources
    per_worker = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=res.workers_per_trial, use_gpu=res.use_gpu,
                                   resources_per_worker=per_worker, placement_strategy=res.placement_strategy)


def make_trainer(job: Job, params: dict[str, Any], mode: str, name: str, teacher_state: Optional[dict] = None,
                 report_to_tune: bool = False, record_as: Optional[tuple[str, str, str]] = None,
                 test_epochs: Optional[list[int]] = None, progress_key: Optional[str] = None) -> TorchTrainer:
    """A TorchTrainer running ``train_loop_per_worker``; a stable ``name`` lets a retry resume its checkpoints.
    ``record_as`` (storage path, Tune experiment, trial id): rank 0 records the trial's end there."""
    run_config = ray.train.RunConfig(
        name=name,
        storage_path=job.storage_path,
        callbacks=[TuneReportCallback()] if report_to_tune else None,
        failure_config=ray.train.FailureConfig(
            max_failures=job.cfg.resources.max_worker_failures,
            # each worker-group start that times out (60 s) counts; Train's default, -1, waits forever
            controller_failure_limit=job.cfg.resources.max_worker_group_start_failures,
        ),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        # tune.console=bkd: Ray Train's own INFO lines (worker group starts, checkpoints, reports) stay in its log files
        logging_config=ray.train.LoggingConfig(log_level="INFO" if job.cfg.tune.console == "ray" else "WARNING"),
    )
    data: dict[str, Any] = {}
    if is_streamed(job.cfg.data):  # each worker reads an equal share of "train" (see streaming.trainer_datasets)
        data = trainer_datasets(job.cfg.data, job.dataset.folders, TrialParams.of(params).seed_or(job.cfg.train.seed))
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "params": params, "mode": mode, "teacher_state": teacher_state,
                           "record_as": record_as, "test_epochs": test_epochs or [], "progress_key": progress_key},
        scaling_config=scaling_config(job),
        run_config=run_config,
        **data,
    )
