"""The training loop of one trial (or the teacher), on one DDP rank of a Ray Train run or directly
inside a single-worker Tune trial.

Every rank trains its shard and evaluates the whole held-out val split every epoch (``val_acc``: what
selects), and the test split only at the epochs where the trial may end (``test_acc``: the epochs
where ASHA may stop it, ``config["test_epochs"]``, and the last); rank 0 saves a checkpoint (model +
connectors + optimizer + scheduler + epoch) every ``train.checkpoint_every_epochs`` epochs, at most one
per ``train.checkpoint_min_interval_s`` and always after the last, so that a restarted worker group
or a retried trial resumes there. After every epoch but the last it also writes that state as the trial's
progress (``TrialRecords.save_progress``: one file, no Tune bookkeeping): a stop (Ctrl-C, SIGTERM, the time
budget) or a killed process loses at most the epoch in progress, and the resume continues after the later of
the two.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import ray.train
import ray.train.torch
import torch
from ray import tune

from bkd_core import methods
from bkd_core.train import (
    NonFiniteLossError,
    Supervised,
    as_test,
    eval_loader,
    evaluate,
    load_pretrained,
    make_loaders,
    make_optimizer,
    make_scheduler,
    score_on_test,
    step_module,
    train_epoch,
)
from orchestrator.config.job import Job, train_config
from orchestrator.config.models import build_model
from orchestrator.data.datasets import example_batch, is_streamed, load_dataset, teacher_view
from orchestrator.tracking.records import DIVERGED as DIVERGED_STATUS
from orchestrator.tracking.records import FINISHED, TrialRecords
from orchestrator.tracking.results import DIVERGED, TEST_CORRECT
from orchestrator.tracking.stats import encode_correct
from orchestrator.tracking.trial_logger import RESTORED_EPOCHS
from search_spaces.space import TrialParams, load_space, method_arguments

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
HISTORY_FILE = "history.json"  # every epoch's metrics so far (Train V2 results keep only checkpointed ones)


def build_module(job: Job, params: Mapping[str, Any], mode: str, teacher_state: Any, sample: torch.Tensor) -> torch.nn.Module:
    """``Supervised(teacher)`` for teacher training, else the method of the trial's search space (from the
    ``bkd_core.methods`` registry) with the frozen teacher."""
    c, trial = job.cfg, TrialParams.of(params) if mode != "teacher" else None
    n, channels, shape = job.num_classes, job.in_channels, job.dataset.shape
    torch.manual_seed(trial.seed_or(c.train.seed) if trial else c.train.seed)  # the same student init in every method
    teacher = build_model(c, "teacher", n, channels, shape)
    if trial is None:
        if c.teacher.init:  # fine-tune from pretrained weights (checked and reported by validation)
            load_pretrained(teacher, c.teacher.init, "teacher.init")
        return Supervised(teacher)
    teacher.load_state_dict(teacher.from_source_names(teacher_state))  # teacher.pt holds the model's own names
    student = build_model(c, "student", n, channels, shape)
    if c.student.init:
        load_pretrained(student, c.student.init, "student.init")
    space = load_space(trial.method) if trial.method else c.search  # compare's cases name their method's space
    name, kwargs = method_arguments(space, params)
    return methods.make(name, teacher, student, connector=c.train.connector, sample_input=sample,
                        **kwargs | {"warmup_epochs": c.train.distill_warmup_epochs})


@dataclass
class Session:
    """Where the loop runs: its rank, device, and how it reads and reports checkpoints."""

    rank: int
    world: int
    device: torch.device
    get_checkpoint: Callable[[], Any]  # a ray.train or ray.tune Checkpoint, or None
    checkpoint_from: Callable[[str], Any]  # Checkpoint.from_directory of the same kind
    report: Callable[[dict[str, Any], Any], None]
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module]
    # records how the trial ended (status, metrics, history, final student weights) before its last report
    finish: Optional[Callable[[str, dict[str, Any], list, Optional[dict]], None]] = None
    # streamed data (data.in_memory=false): this rank's train, val and test iterators, or None to make them here
    streams: Callable[[], Optional[dict[str, Any]]] = lambda: None
    # the trial's progress after its last finished epoch (TrialRecords.save_progress / progress), where it has records
    save_progress: Optional[Callable[[dict[str, Any]], None]] = None
    read_progress: Optional[Callable[[torch.device], Optional[dict[str, Any]]]] = None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry (multi-worker DDP trials and the teacher): ``config`` holds ``job``
    (the ``Job``), ``params``, ``mode``, ``teacher_state`` and ``record_as`` (where rank 0 records the
    trial's end, or None)."""
    ctx = ray.train.get_context()
    session = Session(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device(), ray.train.get_checkpoint,
                      ray.train.Checkpoint.from_directory, lambda metrics, checkpoint: ray.train.report(metrics, checkpoint=checkpoint),
                      lambda module: ray.train.torch.prepare_model(module, move_to_device=False))
    if config.get("record_as"):
        storage, experiment, trial_id = config["record_as"]
        keep_records(session, TrialRecords(storage, experiment), trial_id, config.get("progress_key"))
    if is_streamed(config["job"].cfg.data):  # the trainer's datasets: a disjoint share of "train" per worker
        session.streams = lambda: {split: ray.train.get_dataset_shard(split) for split in ("train", "val", "test")}
    train_loop(config, session)


def tune_trial_loop(config: dict[str, Any], records: Optional[TrialRecords] = None) -> None:
    """A single-worker trial trains inside its Tune trial process: no Train controller or worker
    group to start (seconds per trial), and Tune retries it from its last checkpoint. With ``records``,
    the trial records its end (``orchestrator.tracking.records``) before its last report."""
    use_gpu = config["job"].cfg.resources.use_gpu and torch.cuda.is_available()
    session = Session(0, 1, torch.device("cuda", 0) if use_gpu else torch.device("cpu"), tune.get_checkpoint,
                      tune.Checkpoint.from_directory, lambda metrics, checkpoint: tune.report(metrics, checkpoint=checkpoint),
                      lambda module: module)
    if records is not None:
        keep_records(session, records, tune.get_context().get_trial_id(), config.get("progress_key"))
    train_loop(config, session)


def keep_records(session: Session, records: TrialRecords, trial_id: str, progress_key: Optional[str] = None) -> None:
    """The session records the trial's end and its progress (rank 0 writes; every rank reads the progress), the
    progress under ``progress_key`` where a later Tune trial continues it (the teacher's), else the trial id."""
    key = progress_key or trial_id
    session.read_progress = lambda device: records.progress(key, device)
    if session.rank == 0:
        def finish(status: str, metrics: dict[str, Any], history: list, student: Optional[dict]) -> None:
            records.write(trial_id, status, metrics, history, student)
            records.clear_progress(key)

        session.finish = finish
        session.save_progress = lambda state: records.save_progress(key, state)


def train_loop(config: dict[str, Any], session: Session) -> None:
    job: Job = config["job"]
    params, mode = config["params"], config["mode"]
    rank, world, device = session.rank, session.world, session.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, job.cfg.resources.cpus_per_worker))
    cfg = train_config(job.cfg, params, mode).resolved(device)
    cfg.batch_size = max(1, cfg.batch_size // world)  # train.batch_size is the global batch: same steps for any worker count
    if world > 1 and job.cfg.train.compile_mode is None:
        cfg.compile_mode = "default"  # CUDA graphs are measured for one process per GPU, not under DDP's gradient hooks
    data = job.cfg.data
    # the test split scores the weights a trial may end with, never selects: with data.val_fraction=0 val_acc is the test's
    on_test = not job.selects_on_test
    test_epochs = {int(e) for e in config.get("test_epochs") or ()} | {cfg.epochs}
    if is_streamed(data):
        from orchestrator.data.streaming import stream_loaders

        train_loader, val_loader, test_loader = stream_loaders(data, job.dataset.rows, job.dataset.folders, cfg.batch_size, device, cfg.seed,
                                                               bool(cfg.channels_last), world, session.streams())
        sample = example_batch(job.dataset.shape)
    else:
        splits = load_dataset(data) if mode != "teacher" else teacher_view(load_dataset(data))
        train_loader, val_loader = make_loaders(splits, cfg, device, rank, world)
        test_loader = eval_loader(splits.test, cfg, device) if on_test else val_loader
        sample = splits.train.sample(2)
    module = build_module(job, params, mode, config.get("teacher_state"), sample).to(device)
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(module.trainable_parameters(), cfg, device)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))

    start, history = resume(session, module, optimizer, scheduler, device)
    restored = {RESTORED_EPOCHS: json.dumps(history)} if history else {}  # sent once: the loggers log those MLflow lacks

    def report(metrics: dict[str, Any], checkpoint: Any) -> None:
        nonlocal restored
        session.report(metrics | restored, checkpoint)
        restored = {}
    every, min_interval = job.cfg.train.checkpoint_every_epochs, job.cfg.train.checkpoint_min_interval_s
    last_saved = time.monotonic()
    ddp = session.wrap_model(module) if world > 1 else module
    step = step_module(ddp, cfg, device)
    for epoch in range(start, cfg.epochs + 1):
        try:
            metrics = train_epoch(step, train_loader, optimizer, scheduler, cfg, epoch)
            metrics["throughput_img_s"] *= world
            if hasattr(train_loader, "skipped"):  # streamed: images of this epoch that did not decode (this rank)
                metrics["data_skipped"] = train_loader.skipped
        except NonFiniteLossError:
            metrics = {DIVERGED: 1}
        metrics.update(evaluate(module, val_loader, bool(cfg.bf16)))
        if epoch in test_epochs and DIVERGED not in metrics:
            # the last epoch keeps the student's per-example correctness (a few KB): compare's intervals count the
            # test split's sampling noise, paired by example (in-memory splits, whose order is fixed)
            hits: Optional[list[torch.Tensor]] = [] if epoch == cfg.epochs and not is_streamed(data) else None
            metrics.update(score_on_test(module, test_loader, bool(cfg.bf16), hits) if on_test else as_test(metrics))
            if hits:
                metrics[TEST_CORRECT] = encode_correct(per_example_results(torch.cat(hits)))
        metrics.update(epoch=epoch, workers=world)
        history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)} | {"timestamp": time.time()})
        if DIVERGED in metrics:
            # The trial ends here, not as an error: no retry would converge, and the searcher
            # learns from the diverged student's (chance-level) val_acc to avoid this region.
            if session.finish and rank == 0:
                session.finish(DIVERGED_STATUS, metrics, history, None)
            report(metrics, None)
            return
        if epoch == cfg.epochs and session.finish and rank == 0:  # the student under its own class's names
            session.finish(FINISHED, metrics, history, module.student.source_state_dict())
        if session.save_progress is not None and epoch < cfg.epochs:  # what a stop keeps, whatever the checkpoints (rank 0)
            session.save_progress(trainer_state(module, optimizer, scheduler, epoch) | {"history": history})
        due = epoch % every == 0 and time.monotonic() - last_saved >= min_interval
        if rank != 0 or not (due or epoch == cfg.epochs):
            report(metrics, None)
            continue
        last_saved = time.monotonic()
        with tempfile.TemporaryDirectory() as folder:  # the report copies it into the run's storage
            save_state(folder, module, optimizer, scheduler, epoch, history)
            report(metrics, session.checkpoint_from(folder))


def per_example_results(hits: torch.Tensor):
    """What a run keeps of each test example: its correctness (bools), or for a language model ((nll, tokens) rows)
    its linearised loss term ``(nll_i - L * n_i) / mean(n)``, whose spread over examples is the test term of L."""
    if hits.dtype == torch.bool:
        return hits.numpy()
    nll, tokens = hits[:, 0].double(), hits[:, 1].double()
    loss = nll.sum() / tokens.sum().clamp_min(1)
    return ((nll - loss * tokens) / tokens.mean().clamp_min(1e-9)).numpy()


def resume(session: Session, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
           device: torch.device) -> tuple[int, list[dict[str, float]]]:
    """Load the later of the session's checkpoint and the trial's progress (if any) into module, optimizer
    and scheduler; the first epoch to run and the metrics of the epochs before it."""
    state, history = None, []
    checkpoint = session.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location=device, weights_only=False)
            history = read_history(folder)
    progress = session.read_progress(device) if session.read_progress else None
    if progress is not None and (state is None or int(progress["epoch"]) > int(state["epoch"])):
        state, history = progress, progress["history"]
    if state is None:
        return 1, []
    result = module.load_state_dict(state["module"], strict=False)
    if result.unexpected_keys or any(not k.startswith("teacher.") for k in result.missing_keys):
        raise RuntimeError(f"checkpoint does not fit this trial's model: {result}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1, history


def read_history(folder: str) -> list[dict[str, float]]:
    """The per-epoch metrics saved in a checkpoint folder ([] for one without them)."""
    path = os.path.join(folder, HISTORY_FILE)
    return json.loads(open(path).read()) if os.path.isfile(path) else []


def save_state(folder: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
               history: list[dict[str, float]]) -> None:
    """What ``resume`` reads (everything but the frozen teacher, and the metrics so far), and the
    student alone as MODEL_FILE."""
    with open(os.path.join(folder, HISTORY_FILE), "w") as fh:
        json.dump(history, fh)
    torch.save(trainer_state(module, optimizer, scheduler, epoch), os.path.join(folder, STATE_FILE))
    torch.save(module.student.source_state_dict(), os.path.join(folder, MODEL_FILE))  # the model's own names


def trainer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int) -> dict[str, Any]:
    """Everything but the frozen teacher: what ``resume`` loads."""
    trainable = {k: v for k, v in module.state_dict().items() if not k.startswith("teacher.")}
    return {"module": trainable, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch}
