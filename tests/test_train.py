"""The plain trainer: a real (small) training run, schedules, checkpoint checks, divergence."""
import copy

import pytest
import torch

from bkd_core import BlockKD, models, train
from bkd_core.data import BatchLoader, load_digits


def test_distillation_run_learns_and_keeps_teacher_frozen():
    splits = load_digits()
    teacher, student = models.create("tiny_resnet", 10, 1), models.create("tiny_cnn", 10, 1)
    train.fit(train.Supervised(teacher), splits, train.TrainConfig(epochs=2, batch_size=64, lr=0.1))
    frozen = copy.deepcopy(teacher.state_dict())
    kd = BlockKD(teacher, student, sample_input=splits.train.images[:2].float(), gamma=0.5)
    seen = []
    metrics = train.fit(kd, splits, train.TrainConfig(epochs=3, batch_size=64, lr=0.1), on_epoch=lambda e, m: seen.append(m))
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert metrics["val_acc"] > 50 and {"val_acc_stone_1", "val_acc_stone_3", "train_loss_cross"} <= set(metrics)
    assert all(torch.equal(frozen[k], v) for k, v in teacher.state_dict().items())


def test_lr_schedules():
    cfg = train.TrainConfig(epochs=10, warmup_epochs=1, schedule="cosine")
    assert train.lr_factor(0, 10, cfg) == pytest.approx(0.1)
    assert train.lr_factor(10, 10, cfg) == pytest.approx(1.0)
    assert train.lr_factor(100, 10, cfg) == pytest.approx(0.0, abs=1e-9)
    step = train.TrainConfig(epochs=10, schedule="step", milestones=(0.5, 0.8), lr_decay=0.1)
    assert [train.lr_factor(e * 10, 10, step) for e in (0, 5, 8)] == pytest.approx([1.0, 0.1, 0.01])
    linear = train.TrainConfig(epochs=10, warmup_epochs=1, schedule="linear")  # BERT's: warm-up, then to 0
    assert [train.lr_factor(s, 10, linear) for s in (0, 9, 10, 55, 100, 120)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="schedule"):
        train.TrainConfig(schedule="exponential")


def test_adamw_takes_the_lr_weight_decay_and_momentum_as_beta1():
    params = [torch.nn.Parameter(torch.ones(3))]
    cfg = train.TrainConfig(optimizer="adamw", lr=3e-4, momentum=0.8, weight_decay=0.01)
    optimizer = train.make_optimizer(params, cfg, torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert isinstance(optimizer, torch.optim.AdamW) and group["lr"] == 3e-4 and group["betas"] == (0.8, 0.999)
    assert group["weight_decay"] == 0.01
    assert isinstance(train.make_optimizer(params, train.TrainConfig(), torch.device("cpu")), torch.optim.SGD)
    with pytest.raises(ValueError, match="train.optimizer must be one of sgd, adamw"):
        train.TrainConfig(optimizer="adam")


def test_diverging_run_raises():
    splits = load_digits()
    kd = BlockKD(models.create("tiny_resnet", 10, 1), models.create("tiny_cnn", 10, 1), sample_input=splits.train.images[:2].float())
    with pytest.raises(train.NonFiniteLossError, match="lower the learning rate"):
        train.fit(kd, splits, train.TrainConfig(epochs=1, batch_size=64, lr=1e9, weight_decay=0))


def test_load_state_checked(tmp_path):
    model = models.create("tiny_resnet", 10, 1)
    good = tmp_path / "t.pt"
    torch.save(model.state_dict(), good)
    train.load_state_checked(models.create("tiny_resnet", 10, 1), good)
    with pytest.raises(ValueError, match="does not exist"):
        train.load_state_checked(model, tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"corrupt")
    with pytest.raises(ValueError, match="not a readable torch state_dict"):
        train.load_state_checked(model, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="shape mismatches"):
        train.load_state_checked(models.create("tiny_resnet", 100, 1), good)
    with pytest.raises(ValueError, match="missing keys"):
        train.load_state_checked(models.create("resnet20", 10, 1), good)


def test_lr_scales_linearly_with_batch():
    cfg = train.TrainConfig(batch_size=512, lr=0.05, lr_base_batch=64)
    assert cfg.effective_lr == pytest.approx(0.4)
    assert train.TrainConfig(batch_size=512, lr=0.05).effective_lr == 0.05  # no base batch: lr as given
    opt = train.make_optimizer(models.create("tiny_cnn", 10, 1).parameters(), cfg, torch.device("cpu"))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="lr_base_batch"):
        train.TrainConfig(lr_base_batch=0)


def test_compile_mode_and_cpu_defaults():
    cpu = train.TrainConfig().resolved(torch.device("cpu"))
    assert (cpu.bf16, cpu.channels_last, cpu.compile, cpu.cudnn_benchmark) == (False, True, False, False)
    cuda = train.TrainConfig().resolved(torch.device("cuda"))
    assert (cuda.bf16, cuda.channels_last, cuda.compile, cuda.cudnn_benchmark) == (True, True, True, True)
    assert (cpu.compile_mode, cuda.compile_mode) == ("default", "reduce-overhead")  # CUDA graphs by default on CUDA
    assert train.TrainConfig(compile_mode="default").resolved(torch.device("cuda")).compile_mode == "default"
    assert train.uses_cuda_graphs(train.TrainConfig(compile=True, compile_mode="reduce-overhead"))
    assert not train.uses_cuda_graphs(train.TrainConfig(compile=False, compile_mode="reduce-overhead"))
    with pytest.raises(ValueError, match="reduce-overhead"):
        train.TrainConfig(compile_mode="fast")
    model = models.create("tiny_cnn", 10, 1)
    assert train.step_module(model, cpu, torch.device("cpu")) is model  # eager: the module itself


def _mean_over_two_ranks(rank: int, store: str, sums: list, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        result = train.mean_over_ranks({"loss": torch.tensor(sums[rank]), "loss_task": torch.tensor(1.0)}, steps=2)
        torch.save(result, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("sums, loss", [((2.0, 4.0), 1.5), ((2.0, float("nan")), float("nan"))])
def test_epoch_means_are_averaged_over_ddp_ranks(tmp_path, sums, loss):
    """Every rank gets the same epoch loss (a NaN on one rank reaches all), so all stop together."""
    import torch.multiprocessing as mp

    out = str(tmp_path / "means")
    mp.spawn(_mean_over_two_ranks, args=(str(tmp_path / "store"), list(sums), out), nprocs=2)
    results = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    for result in results:
        assert result["loss_task"] == pytest.approx(0.5)
        assert result["loss"] == pytest.approx(loss, nan_ok=True)
    assert train.mean_over_ranks({"loss": torch.tensor(3.0)}, steps=3) == {"loss": pytest.approx(1.0)}


def test_evaluate_runs_student_and_stones_but_not_the_teacher():
    splits = load_digits()
    kd = BlockKD(models.create("tiny_resnet", 10, 1), models.create("tiny_cnn", 10, 1), cuts=[1, 3],
                 sample_input=splits.train.images[:2].float())
    teacher_calls = []
    kd.teacher.register_forward_hook(lambda *args: teacher_calls.append(1))
    loader = BatchLoader(splits.test, 128, train=False, device=torch.device("cpu"))
    accs = train.evaluate(kd, loader)
    assert teacher_calls == [] and set(accs) == {"val_acc", "val_acc_stone_1", "val_acc_stone_3"}
    with torch.no_grad():  # the same accuracy as the training forward's logits
        hits = sum(int((kd(x, y).student_logits.argmax(1) == y).sum()) for x, y in loader)
    assert len(teacher_calls) == len(loader)
    assert accs["val_acc"] == pytest.approx(100.0 * hits / len(splits.test.labels))


def test_checkpoints_in_the_usual_wrappers_load(tmp_path):
    """A DDP-saved (module.) or Lightning-style (model.) state_dict, inside {"state_dict": ...} or not."""
    model = models.create("tiny_resnet", 10, 1)
    state = model.state_dict()
    for i, saved in enumerate(({f"module.{k}": v for k, v in state.items()}, {"state_dict": {f"model.{k}": v for k, v in state.items()}})):
        torch.save(saved, tmp_path / f"{i}.pt")
        fresh = models.create("tiny_resnet", 10, 1)
        train.load_state_checked(fresh, tmp_path / f"{i}.pt")
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
