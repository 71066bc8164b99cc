"""A plain training loop for teachers and distillers: SGD + momentum (or AdamW), cosine, step or linear
schedule with linear warm-up, bf16 autocast on CUDA, metrics kept on the device and read once per epoch.

The orchestrator's Ray Train workers call ``train_epoch``/``evaluate`` per epoch; ``fit`` runs the
whole loop without Ray.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from .blocknet import BlockNet
from .data import BatchLoader, DataSplits, ImageDataset
from .data.lm import LMBatchLoader, LMDataset
from .data.text import TextBatchLoader, TextDataset
from .methods.base import Distiller, DistillOutput
from .methods.none import Supervised  # noqa: F401  (train.Supervised: the teacher's own training)
from .token_losses import IGNORE

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SCHEDULES = ("cosine", "step", "linear")
OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    lr_base_batch: Optional[int] = None  # lr is for this batch; scaled linearly to batch_size (Goyal et al., 2017)
    optimizer: str = "sgd"  # "sgd" (with momentum) | "adamw" (momentum is its beta1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"  # "cosine" | "step" | "linear" (to 0 at the last step)
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs, for "step"
    lr_decay: float = 0.1
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = None  # clip the gradients' global norm to this (language models: 1.0); None: no clipping
    bf16: Optional[bool] = None  # None: on for CUDA
    channels_last: bool = True  # CUDA and CPU; off for a model that .view()s its feature maps
    compile: Optional[bool] = None  # None: on for CUDA (on CPU it pays off only for long runs)
    cudnn_benchmark: Optional[bool] = None  # None: on for CUDA (cuDNN times its algorithms per shape once)
    compile_mode: Optional[str] = None  # torch.compile mode; None: "reduce-overhead" (CUDA graphs) on CUDA, else "default"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}.")
        if any(not isinstance(m, (int, float)) or not 0 < m < 1 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"train.milestones must be increasing fractions of the epochs in (0, 1); got {list(self.milestones)}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"train.grad_clip must be a gradient norm > 0, or null for no clipping; got {self.grad_clip}.")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("train.epochs and train.batch_size must be >= 1 and train.lr > 0.")
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}; got {self.compile_mode!r}.")
        base = self.lr_base_batch
        if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base < 1):
            raise ValueError(f"train.lr_base_batch must be the batch size the lr is given for (an integer >= 1), "
                             f"or null for no scaling; got {base!r}.")

    @property
    def effective_lr(self) -> float:
        """``lr``, scaled by ``batch_size / lr_base_batch`` when a base batch is given."""
        if self.lr_base_batch is None:
            return self.lr
        return self.lr * self.batch_size / self.lr_base_batch

    def resolved(self, device: torch.device) -> "TrainConfig":
        """A copy with the device-dependent defaults (bf16, compile, compile_mode, cudnn_benchmark) filled in.
        CUDA compiles with "reduce-overhead": CUDA graphs cut the host time of a step (Block-KD on an H200,
        ResNet34 -> ResNet18 at b512: 15.75x the reference step, against 8.4x in the default mode)."""
        cuda = device.type == "cuda"
        pick = lambda v, default: default if v is None else bool(v)  # noqa: E731
        mode = self.compile_mode or ("reduce-overhead" if cuda else "default")
        return TrainConfig(**{**self.__dict__, "bf16": pick(self.bf16, cuda), "compile": pick(self.compile, cuda),
                              "compile_mode": mode, "cudnn_benchmark": pick(self.cudnn_benchmark, cuda)})


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum, or AdamW (``momentum`` as its beta1); the fused kernel on CUDA, foreach elsewhere."""
    fused = device.type == "cuda"
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(list(params), lr=cfg.effective_lr, betas=(cfg.momentum, 0.999), eps=1e-8,
                                 weight_decay=cfg.weight_decay, fused=fused or None, foreach=None if fused else True)
    return torch.optim.SGD(
        list(params), lr=cfg.effective_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov, fused=fused or None, foreach=None if fused else True,
    )


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at an optimizer step: linear warm-up, then cosine, step or linear decay."""
    epoch = step / max(1, steps_per_epoch)
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        span = max(1e-8, cfg.epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - cfg.warmup_epochs) / span)))
    if cfg.schedule == "linear":  # to 0 at the last step (BERT's fine-tuning schedule)
        span = max(1e-8, cfg.epochs - cfg.warmup_epochs)
        return max(0.0, 1.0 - (epoch - cfg.warmup_epochs) / span)
    return cfg.lr_decay ** sum(epoch >= m * cfg.epochs for m in cfg.milestones)


def step_module(module: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """Set ``cfg``'s backend switches and return what the loop calls: ``module``, compiled if asked.

    Call it once per run (a trial): each call to ``torch.compile`` compiles again.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    if not cfg.compile:
        return module
    return torch.compile(module, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def uses_cuda_graphs(cfg: TrainConfig) -> bool:
    return bool(cfg.compile) and cfg.compile_mode in ("reduce-overhead", "max-autotune")


def train_step(step: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               cfg: TrainConfig, device: torch.device) -> DistillOutput:
    """One optimisation step of ``step`` (from ``step_module``) on a batch; no host sync.

    Under CUDA graphs a replay overwrites the previous step's outputs: read or copy them before
    the next call.
    """
    if uses_cuda_graphs(cfg):
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(device, bool(cfg.bf16)):
        out = step(x, y)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], cfg.grad_clip)
    optimizer.step()
    return out


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, cfg))


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf: the run diverged (often a learning rate too high)."""


def train_epoch(
    module: nn.Module,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler],
    cfg: TrainConfig,
    epoch: int,
) -> dict[str, float]:
    """One pass over ``loader``. Returns ``train_loss``, each loss part, ``lr`` and ``throughput_img_s``.

    Sums stay on the device; the host reads them once at the end of the epoch.
    """
    device = loader.device
    inner = unwrap(module)
    if isinstance(inner, Distiller):
        inner.epoch = float(epoch)
    module.train()
    loader.set_epoch(epoch)
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    start = time.perf_counter()
    for x, y in loader:
        out = train_step(module, optimizer, x, y, cfg, device)
        if scheduler is not None:
            scheduler.step()
        for key, value in out.parts.items():
            sums[key] = sums[key] + value if key in sums else value.clone()
        seen += x.shape[0]
    values = mean_over_ranks(sums, len(loader))  # one sync per epoch
    elapsed = time.perf_counter() - start
    loss = values.pop("loss", float("nan"))
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"training loss is {loss} at epoch {epoch}: the run diverged; lower the learning rate.")
    metrics = {"train_loss": loss, **{f"train_{k}": v for k, v in values.items()}}
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["throughput_img_s"] = seen / elapsed if elapsed > 0 else 0.0
    return metrics


def mean_over_ranks(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """Per-step means of summed scalars, averaged over the ranks of a DDP run (all ranks agree, so a
    diverged loss stops every rank at the same epoch)."""
    keys = sorted(sums)
    if not keys:
        return {}
    stacked = torch.stack([sums[k].float() for k in keys])
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(stacked)  # sum: gloo has no average
        world = torch.distributed.get_world_size()
    return dict(zip(keys, (stacked / (max(1, steps) * world)).tolist()))


@torch.no_grad()
def evaluate(module: nn.Module, loader: BatchLoader, bf16: bool = False,
             student_hits: Optional[list[torch.Tensor]] = None) -> dict[str, float]:
    """Top-1 accuracy in percent of the student (``val_acc``) and of each stepping stone.

    Runs only the student and the stones (``module.logits``): no teacher forward, no loss. ``student_hits``:
    a list that receives the student's per-example correctness (bool, CPU), batch by batch in the loader's order.
    """
    module.eval()
    inner = unwrap(module)
    if getattr(loader, "token_level", False):
        return evaluate_tokens(inner, loader, bf16, student_hits)
    correct: dict[str, torch.Tensor] = {}
    total = 0
    for x, y in loader:
        with autocast(loader.device, bf16):
            student_logits, stones = inner.logits(x)
        heads = {"val_acc": student_logits, **{f"val_acc_stone_{c}": l for c, l in stones.items()}}
        for key, logits in heads.items():
            hits = (logits.argmax(dim=1) == y).sum()
            correct[key] = correct[key] + hits if key in correct else hits
        if student_hits is not None:
            student_hits.append((student_logits.argmax(dim=1) == y).cpu())
        total += y.shape[0]
    return {k: 100.0 * v.item() / max(1, total) for k, v in correct.items()}


@torch.no_grad()
def evaluate_tokens(inner: nn.Module, loader: BatchLoader, bf16: bool = False,
                    per_example: Optional[list[torch.Tensor]] = None) -> dict[str, float]:
    """A language model's held-out scores over the target tokens: ``val_loss`` (mean negative log-likelihood per
    target token, nats), ``val_ppl`` (its exponential) and ``val_token_acc`` (next-token top-1, percent), for the
    student and each stepping stone (``val_loss_stone_<cut>``, ...). ``per_example``: a list that receives the
    student's (summed negative log-likelihood, target tokens) of each example, (B, 2) per batch, in order."""
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    for x, y in loader:
        with autocast(loader.device, bf16):
            student_logits, stones = inner.logits(x)
        target = y != IGNORE
        labels = y[target]
        for suffix, logits in {"": student_logits, **{f"_stone_{c}": l for c, l in stones.items()}}.items():
            rows = logits[target].float()  # the target tokens only: no float32 copy of the whole logits
            nll_rows = torch.nn.functional.cross_entropy(rows, labels, reduction="none")
            hits = (rows.argmax(-1) == labels).sum()
            for key, value in ((f"nll{suffix}", nll_rows.sum()), (f"hits{suffix}", hits)):
                sums[key] = sums[key] + value if key in sums else value
            if suffix == "" and per_example is not None:  # each example's summed loss over its target tokens
                example = target.nonzero()[:, 0]
                nll = torch.zeros(y.shape[0], device=y.device).index_add_(0, example, nll_rows)
                per_example.append(torch.stack([nll, target.sum(1).float()], 1).cpu())
        tokens += int(target.sum())
    metrics: dict[str, float] = {}
    for key, value in sums.items():
        if key.startswith("nll"):
            loss = value.item() / max(1, tokens)
            suffix = key[3:]
            metrics[f"val_loss{suffix}"] = loss
            metrics[f"val_ppl{suffix}"] = math.exp(min(loss, 700.0))
        else:
            metrics[f"val_token_acc{key[4:]}"] = 100.0 * value.item() / max(1, tokens)
    metrics["val_tokens"] = float(tokens)
    return metrics


EpochCallback = Callable[[int, dict[str, float]], None]


def make_loaders(data: DataSplits, cfg: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1) -> tuple[BatchLoader, BatchLoader]:
    """Training loader (sharded, augmented) and the selection split's loader (``data.val``, else the test split);
    text datasets get a ``TextBatchLoader`` (each batch padded to its own longest text)."""
    if isinstance(data.train, LMDataset):
        train = LMBatchLoader(data.train, cfg.batch_size, train=True, device=device, seed=cfg.seed, rank=rank,
                              world_size=world_size)
        return train, eval_loader(data.selection, cfg, device)
    if isinstance(data.train, TextDataset):
        train = TextBatchLoader(data.train, cfg.batch_size, train=True, device=device, seed=cfg.seed, rank=rank,
                                world_size=world_size)
        return train, eval_loader(data.selection, cfg, device)
    train = BatchLoader(data.train, cfg.batch_size, train=True, augmentation=data.augmentation, device=device,
                        seed=cfg.seed, rank=rank, world_size=world_size, channels_last=bool(cfg.channels_last))
    return train, eval_loader(data.selection, cfg, device)


def eval_loader(dataset: ImageDataset, cfg: TrainConfig, device: torch.device) -> BatchLoader:
    """An evaluation loader over a whole split (no shuffle, no augmentation)."""
    if isinstance(dataset, LMDataset):
        return LMBatchLoader(dataset, cfg.batch_size, train=False, device=device)
    if isinstance(dataset, TextDataset):
        return TextBatchLoader(dataset, max(cfg.batch_size, 256), train=False, device=device)
    return BatchLoader(dataset, max(cfg.batch_size, 256), train=False, device=device, channels_last=bool(cfg.channels_last))


def score_on_test(module: nn.Module, loader: BatchLoader, bf16: bool = False,
                  student_hits: Optional[list[torch.Tensor]] = None) -> dict[str, float]:
    """``evaluate`` on the test split, its keys renamed ``test_acc`` (student) and ``test_acc_stone_<cut>``."""
    return as_test(evaluate(module, loader, bf16, student_hits))


def as_test(scores: dict[str, float]) -> dict[str, float]:
    """``evaluate``'s ``val_*`` scores (``val_acc*``; a language model's ``val_loss*``, ``val_ppl*``,
    ``val_token_acc*``, ``val_tokens``) as ``test_*``: the same numbers when they come from the test split."""
    return {"test_" + key[4:]: value for key, value in scores.items() if key.startswith(SCORES)}


SCORES = ("val_acc", "val_loss", "val_ppl", "val_token_acc", "val_tokens")


def fit(
    module: nn.Module,
    data: DataSplits,
    cfg: TrainConfig,
    device: Union[str, torch.device] = "cpu",
    on_epoch: Optional[EpochCallback] = None,
) -> dict[str, float]:
    """Train ``module`` (any ``bkd_core.methods`` distiller, or a ``Supervised`` classifier) for ``cfg.epochs``.

    Every epoch reports ``val_acc`` on ``data.val`` (``data.hold_out(0.1)`` makes one; without it, on
    the test split). Calls ``on_epoch(epoch, metrics)`` after every epoch and returns the last epoch's
    metrics, with ``test_acc`` (the final weights on the test split) when ``data.val`` is held out.
    """
    device = torch.device(device)
    cfg = cfg.resolved(device)
    torch.manual_seed(cfg.seed)
    module.to(device)
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    train_loader, val_loader = make_loaders(data, cfg, device)
    optimizer = make_optimizer(unwrap(module).trainable_parameters(), cfg, device)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    step = step_module(module, cfg, device)
    metrics: dict[str, float] = {}
    for epoch in range(1, cfg.epochs + 1):
        metrics = {"epoch": epoch, **train_epoch(step, train_loader, optimizer, scheduler, cfg, epoch)}
        metrics.update(evaluate(module, val_loader, bool(cfg.bf16)))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    if data.val is not None and data.val is not data.test:
        metrics.update(score_on_test(module, eval_loader(data.test, cfg, device), bool(cfg.bf16)))
    return metrics


def print_progress(epoch: int, metrics: dict[str, float]) -> None:
    """An ``on_epoch`` callback that prints one line per epoch."""
    stones = " ".join(f"s{k.rsplit('_', 1)[1]}={v:.1f}" for k, v in metrics.items() if k.startswith("val_acc_stone_"))
    print(f"  epoch {epoch:3d}  loss {metrics['train_loss']:.4f}  val_acc {metrics['val_acc']:.2f}%  {stones}  "
          f"({metrics['throughput_img_s']:.0f} img/s)", flush=True)


@dataclass
class PretrainedLoad:
    """What ``load_pretrained`` did: keys loaded, replaced (their shape differs, e.g. a classifier for
    other classes: left at their fresh initialisation), left (not in the checkpoint) and unused."""

    loaded: list[str]
    replaced: list[str]
    left: list[str]
    unused: list[str]

    def summary(self) -> str:
        part = lambda keys: f"{len(keys)}" + (f" ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})" if keys else "")  # noqa: E731
        return (f"{len(self.loaded)} tensors loaded, {part(self.replaced)} replaced (another shape: fresh), "
                f"{part(self.left)} left at their initialisation (not in the checkpoint), {part(self.unused)} unused")


def read_state(path: Union[str, Path], what: str) -> dict:
    """A state_dict file, as saved (see ``unwrap_state`` for the usual wrappers), or a Hugging Face folder's
    weights (``model.safetensors`` / ``pytorch_model.bin``, e.g. a text teacher fine-tuned elsewhere)."""
    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        from safetensors.torch import load_file  # installed with transformers

        return load_file(str(path / "model.safetensors"))
    if path.is_dir() and (path / "pytorch_model.bin").is_file():
        path = path / "pytorch_model.bin"
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist; give the path of a state_dict saved with torch.save.")
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{what} {path} is not a readable torch state_dict ({type(exc).__name__}: {first}); give a "
                         "file saved with torch.save(model.state_dict(), PATH).") from exc
    if not isinstance(source, dict):
        raise ValueError(f"{what} holds a {type(source).__name__}, not a state_dict (save model.state_dict()).")
    return source


def unwrap_state(source: dict, model: nn.Module) -> dict:
    """A state_dict out of the usual wrappers: ``{"state_dict": ...}`` and a ``module.`` (DDP) or
    ``model.`` (Lightning-style holder) prefix that ``model``'s own names do not have."""
    source = source.get("state_dict", source)
    for prefix in ("module.", "model."):
        if source and all(k.startswith(prefix) for k in source) and not any(k.startswith(prefix) for k in model.state_dict()):
            source = {k[len(prefix):]: v for k, v in source.items()}
    return source


def load_pretrained(model: nn.Module, path: Union[str, Path], what: str = "pretrained weights") -> PretrainedLoad:
    """Start ``model`` from a checkpoint of (a variant of) its class: every tensor whose name and shape
    fit is loaded; the rest (e.g. a classifier for another number of classes) keeps its initialisation."""
    source = unwrap_state(read_state(path, what), model)
    if isinstance(model, BlockNet):
        source = model.from_source_names(source)
    own = model.state_dict()
    fits = {k: v for k, v in source.items() if k in own and hasattr(v, "shape") and tuple(v.shape) == tuple(own[k].shape)}
    names = getattr(model, "source_names", {})
    report = PretrainedLoad([names.get(k, k) for k in fits], [names.get(k, k) for k in own if k in source and k not in fits],
                            [names.get(k, k) for k in own if k not in source], [k for k in source if k not in own])
    if not fits:
        raise ValueError(f"{what} {path} shares no tensor (name and shape) with the model: {report.summary()}; give a "
                         "checkpoint of the same architecture.")
    model.load_state_dict(fits, strict=False)
    return report


def load_state_checked(model: nn.Module, source: Union[str, Path, dict], what: str = "teacher checkpoint") -> None:
    """Load a state_dict file into ``model``, with an error that lists missing, unexpected and mis-shaped keys."""
    source = unwrap_state(read_state(source, what) if not isinstance(source, dict) else source, model)
    if isinstance(model, BlockNet):  # a checkpoint of the wrapped model (e.g. torchvision's ResNets) loads too
        source = model.from_source_names(source)
    own = model.state_dict()
    missing = [k for k in own if k not in source]
    unexpected = [k for k in source if k not in own]
    shapes = [f"{k}: {tuple(source[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items()
              if k in source and hasattr(source[k], "shape") and tuple(source[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        detail = "; ".join(
            part for part in (
                f"{len(missing)} missing keys (e.g. {missing[:3]})" if missing else "",
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})" if unexpected else "",
                f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})" if shapes else "",
            ) if part
        )
        raise ValueError(f"{what} does not fit the model: {detail}. Check the model name and num_classes it was trained with.")
    model.load_state_dict(source)
