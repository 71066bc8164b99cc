"""Distillation step benchmark: a reference step written the usual way vs bkd's step, same process,
same device, same teacher/student pair.

    python bench/step_bench.py                      # CPU: tiny_resnet -> tiny_cnn
    python bench/step_bench.py --device cuda        # GPU: resnet32x4 -> resnet8x4, 3 stones
    python bench/step_bench.py --device cuda --pack 4   # + 4 small trials packed on one GPU
    python bench/step_bench.py --device cuda --imagenet --batch-sweep 256,512 --compile-mode reduce-overhead
                                                    # ResNet34 -> ResNet18 at 224 px, 1000 classes
    python bench/step_bench.py --methods all        # every shipped method's step against KD's (its space's defaults)
    python bench/step_bench.py --pairs vit_tiny_p2_8:tiny_cnn@8,tiny_resnet:vit_tiny_p2_8@8   # mixed pairs, 8-px images

Reference: fp32, eager, batch 64, a DataLoader that crops and flips each image in Python, teacher
under no_grad, student + 3 stepping stones through the frozen teacher, KD losses, torch.optim.SGD.
bkd: bkd_core.BlockKD / LogitKD with data held on the device and augmented there in batches, bf16
autocast + channels_last + torch.compile + cudnn.benchmark on CUDA, fused SGD, larger batch with the lr scaled,
no host sync inside the loop. Prints img/s, the ratio, the Block-KD / KD cost and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bkd_core import BlockKD, LogitKD, data, methods, models, train
from bkd_core.losses import kd_loss
from orchestrator.config.pair_table import block_rows
from search_spaces.space import defaults, load_space, method_arguments
from search_spaces.space import names as space_names


@dataclass
class Result:
    name: str
    images_per_s: float
    peak_mem_mb: float


class PerImageAugmented(Dataset):
    """The usual pipeline: one image at a time, crop + flip in Python, then normalise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 4) -> None:
        self.images, self.labels, self.padding = images, labels, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = self.images[i].float().div(255)
        p = self.padding
        img = F.pad(img, (p, p, p, p))
        dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
        img = img[:, dy : dy + self.images.shape[2], dx : dx + self.images.shape[3]]
        if torch.rand(()) < 0.5:
            img = img.flip(2)
        return (img - 0.5) / 0.25, self.labels[i]


def reference_block_kd_step(teacher, student, connectors, cuts, x, y, T=4.0):
    """Hand-written Block-KD step (what KD codebases do), no bkd_core distiller."""
    with torch.no_grad():
        t_logits = teacher(x)
    feats, h = [], x
    for block in student.blocks:
        h = block(h)
        feats.append(h)
    s_logits = student.head(h)
    loss = F.cross_entropy(s_logits, y) + kd_loss(s_logits, t_logits, T)
    for cut in cuts:
        z = connectors[str(cut)](feats[cut - 1])
        for block in teacher.blocks[cut:]:
            z = block(z)
        n_logits = teacher.head(z)
        w = 2.0 ** -(len(student.blocks) - cut)
        loss = loss + w * (F.cross_entropy(n_logits, y) + kd_loss(n_logits, t_logits, T))
    return loss


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_reference(pair, dataset, device, stones: bool, steps: int, workers: int, cudnn_benchmark: bool = False) -> Result:
    torch.backends.cudnn.benchmark = cudnn_benchmark
    teacher, student = (m.to(device) for m in pair())
    teacher.eval()
    kd = BlockKD(teacher, student, sample_input=dataset.images[:2].float().to(device))  # only to build connectors
    connectors, cuts = kd.connectors, kd.cuts if stones else []
    params = list(student.parameters()) + list(connectors.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(PerImageAugmented(dataset.images, dataset.labels), batch_size=64, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    student.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done, start = 0, None
    while done < steps:
        for x, y in loader:
            if done == 3:
                sync(device)
                start, counted = time.perf_counter(), 0
            x, y = x.to(device), y.to(device)
            loss = reference_block_kd_step(teacher, student, connectors, cuts, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the usual per-step logging sync
            done += 1
            if start is not None:
                counted += x.shape[0]
            if done >= steps:
                break
    sync(device)
    extra = " + cudnn.benchmark" if cudnn_benchmark else ""
    return Result(f"reference {'Block-KD' if stones else 'KD'} fp32 b64{extra}", counted / (time.perf_counter() - start), peak_memory_mb(device))


def method_step(space_name: str):
    """A factory of the method a search space trains, with the space's defaults (as ``compare`` starts)."""
    space = load_space(space_name)

    def make(teacher, student, sample):
        name, kwargs = method_arguments(space, defaults(space, student.num_blocks))
        return methods.make(name, teacher, student, sample_input=sample, **kwargs)
    return make


def bench_bkd(pair, dataset, device, stones: bool, steps: int, batch: int, *, bf16: bool | None = None,
              channels_last: bool = True, compile: bool | None = None, cudnn_benchmark: bool | None = None,
              compile_mode: str | None = None, stack_stones: bool = True, seconds: float | None = None,
              barrier: Path | None = None, method: str | None = None) -> Result:
    """bkd's step as the trainer runs it; None picks the device's default (all on for CUDA).

    Measures ``steps`` steps, or ``seconds`` of steps; with ``barrier`` it waits there after the
    warm-up so that packed processes measure the same window.
    """
    teacher, student = (m.to(device) for m in pair())
    sample = dataset.images[:2].float().to(device)
    if method:
        module = method_step(method)(teacher, student, sample)
    else:
        module = BlockKD(teacher, student, sample_input=sample, stack_stones=stack_stones) if stones else LogitKD(teacher, student)
    cfg = train.TrainConfig(epochs=1, batch_size=batch, lr=0.05, lr_base_batch=64, bf16=bf16,
                            channels_last=channels_last, compile=compile, cudnn_benchmark=cudnn_benchmark,
                            compile_mode=compile_mode).resolved(device)
    module.to(device)
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    augmentation = data.Augmentation(crop_padding=4, flip=True)
    loader = data.BatchLoader(dataset, batch, train=True, augmentation=augmentation, device=device,
                              channels_last=bool(cfg.channels_last))
    opt = train.make_optimizer(module.trainable_parameters(), cfg, device)
    step = train.step_module(module, cfg, device)
    module.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    done, start, counted, epoch = 0, None, 0, 0
    warmup = 8 if cfg.compile else 3
    steps += warmup

    def finished() -> bool:
        if seconds is not None:
            return start is not None and time.perf_counter() - start >= seconds
        return done >= steps

    while not finished():
        loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            if done == warmup:  # after compile and warm-up
                sync(device)
                if barrier is not None:
                    wait_at_barrier(barrier)
                start, counted = time.perf_counter(), 0
            train.train_step(step, opt, x, y, cfg, device)
            done += 1
            counted += x.shape[0]
            if finished():
                break
    sync(device)
    compiled = "compile" if cfg.compile_mode == "default" else f"compile({cfg.compile_mode})"
    mode = "+".join(n for n, on in (("bf16", cfg.bf16), ("channels_last", cfg.channels_last), (compiled, cfg.compile)) if on)
    mode = f"{mode or 'fp32 eager'} b{batch}" + ("" if stack_stones or not stones else ", stones one by one")
    what = method or ("Block-KD" if stones else "KD")
    return Result(f"bkd {what} {mode}", counted / (time.perf_counter() - start), peak_memory_mb(device))


def arithmetic_bound(pair, sample: torch.Tensor) -> float:
    """Block-KD's step over KD's in multiply-adds (convolutions and linear layers, as ``describe`` counts them).
    KD: the teacher's forward and the student's forward and backward (T + 3S). Block-KD adds, for every
    stone, the teacher's blocks after its cut and its head, forward and backward to their inputs (2x)."""
    teacher, student = (m.eval() for m in pair())
    with torch.no_grad():
        t_rows, s_rows = block_rows(teacher, sample), block_rows(student, sample)
    kd = sum(r[2] for r in t_rows) + 3 * sum(r[2] for r in s_rows)
    stones = sum(2 * sum(r[2] for r in t_rows[cut:]) for cut in range(1, teacher.num_blocks + 1))
    return (kd + stones) / kd


def bench_pairs(spec: str, device: torch.device, steps: int, batch: int, workers: int, record) -> list[str]:
    """For each ``teacher:student@size``: the hand-written and bkd's KD and Block-KD steps, and Block-KD's cost
    over KD's against the pair's arithmetic bound."""
    lines = []
    for item in spec.split(","):
        names, _, size = item.partition("@")
        teacher_name, student_name = names.split(":")
        size = int(size or 32)
        dataset = random_cifar(4096, 10, size)
        pair = lambda t=teacher_name, s=student_name: (models.create(t, 10), models.create(s, 10))  # noqa: E731
        print(f"\npair {teacher_name} -> {student_name}, {size}x{size} images, every cut a stone", flush=True)
        print("| step | img/s | peak memory (MB) |\n|---|---|---|", flush=True)
        ref = {stones: record(bench_reference(pair, dataset, device, stones, steps, workers)).images_per_s for stones in (False, True)}
        ours = {stones: record(bench_bkd(pair, dataset, device, stones, steps, batch)).images_per_s for stones in (False, True)}
        bound = arithmetic_bound(pair, dataset.images[:1].float())
        line = (f"{teacher_name} -> {student_name}: bkd Block-KD / reference Block-KD {ours[True] / ref[True]:.2f}x; Block-KD "
                f"cost vs KD: reference {ref[False] / ref[True]:.2f}x, bkd {ours[False] / ours[True]:.2f}x, arithmetic bound {bound:.2f}x")
        print(line, flush=True)
        lines.append(line)
    return lines


def wait_at_barrier(folder: Path) -> None:
    (folder / f"ready-{os.getpid()}").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)


def random_cifar(n: int, classes: int, size: int = 32) -> data.ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return data.ImageDataset(images, torch.randint(0, classes, (n,), generator=g), classes, (0.5,) * 3, (0.25,) * 3, "random-cifar")


def packed(args, k: int) -> float:
    """Aggregate img/s of k processes running bkd's step at once (small trials sharing a device).

    Each process compiles and warms up, then all measure the same ``--seconds`` window.
    """
    with tempfile.TemporaryDirectory() as folder:
        cmd = [sys.executable, __file__, "--device", args.device, "--teacher", args.small_teacher,
               "--student", args.small_student, "--batch", str(args.small_batch), "--seconds", str(args.seconds),
               "--compile-mode", args.compile_mode,
               "--only-bkd", "--barrier", folder]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        while len(list(Path(folder).glob("ready-*"))) < k:
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a packed benchmark process failed; run it alone to see why: " + " ".join(cmd))
            time.sleep(0.05)
        (Path(folder) / "go").touch()
        rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs]
    return sum(rates)


def ladder(device: torch.device, batch: int) -> list[tuple[str, dict]]:
    """The settings of bkd's step to measure (one labelled default): on CUDA from fp32 eager b64 up; on CPU
    contiguous, channels_last (the default) and compiled."""
    if device.type == "cuda":
        off = dict(bf16=False, channels_last=False, compile=False, cudnn_benchmark=False)
        return [("fp32 eager b64", dict(off, batch=64)),
                (f"fp32 eager b{batch}", dict(off, batch=batch)),
                (f"bf16 + channels_last b{batch}", dict(batch=batch, compile=False, cudnn_benchmark=False)),
                (f"bf16 + channels_last + compile b{batch}", dict(batch=batch, cudnn_benchmark=False)),
                (f"bf16 + channels_last + compile + cudnn.benchmark b{batch} (default)", dict(batch=batch))]
    return [(f"eager b{batch}", dict(batch=batch, channels_last=False)), (f"channels_last b{batch} (default)", dict(batch=batch)),
            (f"channels_last + compile b{batch}", dict(batch=batch, compile=True))]


def main() -> None:
    parser = argparse.ArgumentParser(description="Block-KD step benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--student", default=None)
    parser.add_argument("--steps", type=int, default=None, help="measured steps per row")
    parser.add_argument("--batch", type=int, default=None, help="bkd's batch (default 512 on CUDA, 64 on CPU)")
    parser.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--pack", type=int, default=0, help="also measure this many packed processes")
    parser.add_argument("--small-teacher", default="resnet56")
    parser.add_argument("--small-student", default="resnet20")
    parser.add_argument("--small-batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window of each packed process")
    parser.add_argument("--skip-ladder", action="store_true", help="only the packed measurement")
    parser.add_argument("--batch-sweep", type=str, default=None,
                        help="comma-separated batches: only the reference and bkd's default step at each batch")
    parser.add_argument("--compile-mode", default=None, choices=train.COMPILE_MODES,
                        help="torch.compile mode of bkd's step (default: the trainer's, reduce-overhead on CUDA)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write every figure to this file")
    parser.add_argument("--imagenet", action="store_true",
                        help="the ImageNet pair: ResNet34 -> ResNet18 at 224 px, 1000 classes (3 stones), 2,560 random images")
    parser.add_argument("--methods", default=None,
                        help="'all' or a comma list of search spaces: each method's step (bkd's default) against KD's")
    parser.add_argument("--pairs", default=None,
                        help="comma list of teacher:student@size: each pair's steps and Block-KD's cost against its bound")
    parser.add_argument("--only-bkd", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--barrier", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    teacher_name = args.teacher or ("ResNet34" if args.imagenet else "resnet32x4" if gpu else "tiny_resnet")
    student_name = args.student or ("ResNet18" if args.imagenet else "resnet8x4" if gpu else "tiny_cnn")
    steps = args.steps or (100 if gpu else 30)
    batch = args.batch or (512 if gpu else 64)  # large batches pay on GPUs; on CPU caches prefer small ones
    classes = 1000 if args.imagenet else 100
    dataset = random_cifar(2560, classes, 224) if args.imagenet else random_cifar(20000 if gpu else 4096, classes)
    torch.manual_seed(0)
    pair = lambda: (models.create(teacher_name, classes), models.create(student_name, classes))  # noqa: E731

    if args.only_bkd:
        r = bench_bkd(pair, dataset, device, True, steps, batch, seconds=args.seconds, barrier=args.barrier,
                      compile_mode=args.compile_mode)
        print(json.dumps(r.__dict__))
        return
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    pair_line = "" if args.pairs else f"; pair {teacher_name} -> {student_name}; 3 stones"
    print(f"device: {name}; torch {torch.__version__}{pair_line}", flush=True)
    report: dict = {"device": name, "torch": torch.__version__, "pair": f"{teacher_name} -> {student_name}", "rows": []}

    def record(r: Result) -> Result:
        report["rows"].append(r.__dict__)
        print(f"| {r.name} | {r.images_per_s:,.0f} | {r.peak_mem_mb:,.0f} |", flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=1))
        return r

    if args.methods:
        names = space_names() if args.methods == "all" else args.methods.split(",")
        print(f"\neach method's step with its search space's defaults, batch {batch}, bkd's default step for the device"
              "\n| method | img/s | peak memory (MB) | time per image vs KD |\n|---|---|---|---|", flush=True)
        bench_bkd(pair, dataset, device, False, steps, batch, method="kd")  # warm-up: the first row of a process runs slow
        rows = {name: bench_bkd(pair, dataset, device, False, steps, batch, method=name) for name in names}
        kd_again = bench_bkd(pair, dataset, device, False, steps, batch, method="kd")  # KD before and after: drift shows
        kd = (rows["kd"].images_per_s + kd_again.images_per_s) / 2 if "kd" in rows else kd_again.images_per_s
        report["methods"] = {}
        for name, r in rows.items():
            report["methods"][name] = {**r.__dict__, "vs_kd": kd / r.images_per_s}
            print(f"| {name} | {r.images_per_s:,.0f} | {r.peak_mem_mb:,.0f} | {kd / r.images_per_s:.2f}x |", flush=True)
        print(f"(KD measured twice, {rows['kd'].images_per_s if 'kd' in rows else kd:,.0f} and {kd_again.images_per_s:,.0f} img/s: "
              "the ratios use their mean)", flush=True)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=1))
        return
    if args.pairs:
        report["pairs"] = bench_pairs(args.pairs, device, steps, batch, args.loader_workers, record)
        if args.json_out:
            args.json_out.write_text(json.dumps(report, indent=1))
        return
    if args.batch_sweep:
        print("\n| step | img/s | peak memory (MB) |\n|---|---|---|", flush=True)
        ref = record(bench_reference(pair, dataset, device, True, 2 * steps, args.loader_workers)).images_per_s
        for b in (int(v) for v in args.batch_sweep.split(",")):
            kd = record(bench_bkd(pair, dataset, device, False, steps, b, compile_mode=args.compile_mode)).images_per_s
            r = record(bench_bkd(pair, dataset, device, True, steps, b, compile_mode=args.compile_mode))
            print(f"  b{b}: Block-KD {r.images_per_s / ref:.2f}x reference, Block-KD vs KD {kd / r.images_per_s:.2f}x", flush=True)
    elif not args.skip_ladder:
        print("\n| step | img/s | peak memory (MB) |\n|---|---|---|", flush=True)
        ref = {stones: record(bench_reference(pair, dataset, device, stones, 2 * steps if gpu else steps, args.loader_workers))
               for stones in (False, True)}
        if gpu:  # many KD codebases set cudnn.benchmark; show that reference too
            record(bench_reference(pair, dataset, device, True, 2 * steps, args.loader_workers, cudnn_benchmark=True))
        rows = ladder(device, batch)
        ours = {}
        for stones in (False, True):
            for label, kw in rows:
                r = bench_bkd(pair, dataset, device, stones, steps, compile_mode=args.compile_mode, **kw)
                ours[(stones, label)] = record(Result(f"bkd {'Block-KD' if stones else 'KD'} {label}", r.images_per_s, r.peak_mem_mb))
        default, default_kw = next((label, kw) for label, kw in rows if label.endswith("(default)"))
        one_by_one = record(bench_bkd(pair, dataset, device, True, steps, compile_mode=args.compile_mode,
                                      stack_stones=False, **default_kw))
        kd, bkd = ours[(False, default)].images_per_s, ours[(True, default)].images_per_s
        bound = arithmetic_bound(pair, dataset.images[:1].float())
        lines = [f"bkd Block-KD ({default}) / reference Block-KD: {bkd / ref[True].images_per_s:.2f}x",
                 f"stacked stones (default) / stones one by one: {bkd / one_by_one.images_per_s:.2f}x",
                 f"Block-KD cost vs KD (time per image): reference {ref[False].images_per_s / ref[True].images_per_s:.2f}x, "
                 f"bkd {kd / bkd:.2f}x, arithmetic bound {bound:.2f}x"]
        for label in (label for label, _ in rows if label != default):
            lines.append(f"  {label}: Block-KD vs KD {ours[(False, label)].images_per_s / ours[(True, label)].images_per_s:.2f}x")
        print("\n" + "\n".join(lines), flush=True)
        report["summary"] = lines
    if args.pack:
        one = packed(args, 1)
        many = packed(args, args.pack)
        line = (f"packed small trials ({args.small_teacher} -> {args.small_student}, b{args.small_batch}, default step): "
                f"1 process {one:,.0f} img/s, {args.pack} processes {many:,.0f} img/s together ({many / one:.2f}x)")
        print(line, flush=True)
        report["packed"] = {"one": one, "many": many, "k": args.pack, "line": line}
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
