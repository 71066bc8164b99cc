"""The trial's module and training settings as the orchestrator builds them from a config (no Ray run)."""
import pytest
import torch

from bkd_core import BlockKD, LogitKD
from orchestrator.config.compose import compose
from orchestrator.config.job import train_config, validate
from orchestrator.worker.loop import build_module
from orchestrator.worker.runtime import TRIAL_DRIVER_CPU, make_trainer, trial_resources
from search_spaces.space import defaults


def trial_parts(overrides):
    job = validate(compose(overrides))
    params = defaults(job.cfg.search, job.num_blocks, job.cfg.fixed)
    teacher = build_module(job, params, "teacher", None, None).student
    sample = torch.zeros(2, job.in_channels, 8, 8)
    return job, params, build_module(job, params, "distill", teacher.state_dict(), sample)


def test_config_reaches_the_distiller_and_the_trainer():
    job, params, module = trial_parts(["fixed.cuts=[1,3]", "train.distill_warmup_epochs=2", "train.batch_size=256",
                                       "fixed.lr=0.1", "train.compile_mode=reduce-overhead"])
    assert isinstance(module, BlockKD) and module.cuts == [1, 3] and module.warmup_epochs == 2.0
    cfg = train_config(job.cfg, params, "distill")
    assert cfg.effective_lr == pytest.approx(0.1 * 256 / 64) and cfg.compile_mode == "reduce-overhead"


def test_logit_baseline_from_the_kd_space():
    _, _, module = trial_parts(["search=kd"])
    assert isinstance(module, LogitKD) and module.cuts == []


@pytest.mark.parametrize("space, method, own", [
    ("fitnet", "fitnet", {"hint_block": 1}), ("at", "at", {}), ("rkd", "rkd", {}), ("crd", "crd", {"nce_k": 64}),
    ("reviewkd", "reviewkd", {}), ("ofa", "ofa", {"ofa_eps": 1.5}), ("dist", "dist", {}), ("loca", "loca", {})])
def test_every_baselines_space_builds_its_method_as_a_trial_does(space, method, own):
    """``search=<space>`` (what ``tune`` and ``compare`` run): the trial's module is the space's method with
    the space's defaults and ``fixed.*``, and it trains a step."""
    _, params, module = trial_parts([f"search={space}", *(f"fixed.{k}={v}" for k, v in own.items())])
    assert module.name == method
    for key, value in own.items():
        assert module.params[key] == value
    if space in ("dist", "loca"):
        assert module.logit_loss == space
    module.train()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    out = module(x, y)
    out.loss.backward()
    assert out.parts["loss_distill"] > 0 and all(p.grad is not None for p in module.student.parameters())


def test_trial_resources_follow_the_worker_count():
    one_gpu_quarter = validate(compose(["resources.use_gpu=true", "resources.gpus_per_worker=0.25"]))
    assert trial_resources(one_gpu_quarter) == {"cpu": 1.0, "gpu": 0.25}  # the trial process trains: it holds the GPU share
    ddp = validate(compose(["resources.workers_per_trial=2"]))
    assert trial_resources(ddp) == {"cpu": TRIAL_DRIVER_CPU}  # it only drives a Train run; the workers hold the rest


def test_train_runs_fail_instead_of_waiting_forever_for_their_workers():
    job = validate(compose(["resources.workers_per_trial=2", "resources.max_worker_group_start_failures=3"]))
    failure = make_trainer(job, {}, "distill", name="t").run_config.failure_config
    assert failure.controller_failure_limit == 3 and failure.max_failures == 1
