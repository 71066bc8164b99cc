"""Distillation step benchmark: a reference step written the usual way vs bkd's step, same process,
same device, same teacher/student pair.

    python bench/step_bench.py                      # CPU: tiny_resnet -> tiny_cnn
    python bench/step_bench.py --device cuda        # GPU: resnet32x4 -> resnet8x4, 3 stones
    python bench/step_bench.py --device cuda --pack 4   # + 4 small trials packed on one GPU

Reference: fp32, eager, batch 64, a DataLoader that crops and flips each image in Python, teacher
under no_grad, student + 3 stepping stones through the frozen teacher, KD losses, torch.optim.SGD.
bkd: bkd_core.BlockKD / LogitKD with data held on the device and augmented there in batches, bf16
autocast + channels_last + torch.compile on CUDA, fused SGD, larger batch with the lr scaled,
no host sync inside the loop. Prints img/s, the ratio, the Block-KD / KD cost and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from bkd_core import BlockKD, LogitKD, data, models, train
from bkd_core.losses import kd_loss


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


def bench_reference(pair, dataset, device, stones: bool, steps: int, workers: int) -> Result:
    teacher, student = (m.to(device) for m in pair())
    teacher.eval()
    kd = BlockKD(teacher, student, sample_input=dataset.images[:2].float().to(device))  # only to build connectors
    connectors, cuts = kd.connectors, kd.cuts if stones else []
    params = list(student.parameters()) + list(connectors.parameters())
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(PerImageAugmented(dataset.images, dataset.labels), batch_size=64, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    student.train()
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
    return Result(f"reference {'Block-KD' if stones else 'KD'} fp32 b64", counted / (time.perf_counter() - start), peak_memory_mb(device))


def bench_bkd(pair, dataset, device, stones: bool, steps: int, batch: int, compile: bool | None = None) -> Result:
    teacher, student = (m.to(device) for m in pair())
    sample = dataset.images[:2].float().to(device)
    module = BlockKD(teacher, student, sample_input=sample) if stones else LogitKD(teacher, student)
    cfg = train.TrainConfig(epochs=1, batch_size=batch, lr=0.05 * batch / 64, compile=compile).resolved(device)
    module.to(device)
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    splits_aug = data.Augmentation(crop_padding=4, flip=True)
    loader = data.BatchLoader(dataset, batch, train=True, augmentation=splits_aug, device=device, channels_last=bool(cfg.channels_last))
    opt = train.make_optimizer(module.trainable_parameters(), cfg, device)
    step = torch.compile(module) if cfg.compile else module
    module.train()
    done, start, counted, epoch = 0, None, 0, 0
    warmup = 8 if cfg.compile else 3
    steps += warmup
    while done < steps:
        loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            if done == warmup:  # after compile and warm-up
                sync(device)
                start, counted = time.perf_counter(), 0
            with train.autocast(device, bool(cfg.bf16)):
                out = step(x, y)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            done += 1
            counted += x.shape[0]
            if done >= steps:
                break
    sync(device)
    mode = "+".join(n for n, on in (("bf16", cfg.bf16), ("channels_last", cfg.channels_last), ("compile", cfg.compile)) if on)
    mode = f"{mode or 'fp32'} b{batch}"
    return Result(f"bkd {'Block-KD' if stones else 'KD'} {mode}", counted / (time.perf_counter() - start), peak_memory_mb(device))


def random_cifar(n: int, classes: int) -> data.ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return data.ImageDataset(images, torch.randint(0, classes, (n,), generator=g), classes, (0.5,) * 3, (0.25,) * 3, "random-cifar")


def packed(args, k: int) -> float:
    """Aggregate img/s of k processes each running bkd's step at once (small trials sharing a device)."""
    cmd = [sys.executable, __file__, "--device", args.device, "--teacher", args.small_teacher, "--student", args.small_student,
           "--steps", str(args.steps), "--batch", "256", "--only-bkd", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(k)]
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["images_per_s"] for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser(description="Block-KD step benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--student", default=None)
    parser.add_argument("--small-teacher", default="tiny_resnet")
    parser.add_argument("--small-student", default="tiny_cnn")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--loader-workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--pack", type=int, default=0, help="also measure this many packed processes")
    parser.add_argument("--only-bkd", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    teacher_name = args.teacher or ("resnet32x4" if gpu else "tiny_resnet")
    student_name = args.student or ("resnet8x4" if gpu else "tiny_cnn")
    steps = args.steps or (60 if gpu else 30)
    batch = args.batch or (512 if gpu else 64)  # large batches pay on GPUs; on CPU caches prefer small ones
    classes = 100
    dataset = random_cifar(20000 if gpu else 4096, classes)
    torch.manual_seed(0)
    pair = lambda: (models.create(teacher_name, classes), models.create(student_name, classes))  # noqa: E731

    if args.only_bkd:
        r = bench_bkd(pair, dataset, device, True, steps, batch)
        print(json.dumps(r.__dict__))
        return
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; pair {teacher_name} -> {student_name}; 3 stones")
    results = [
        bench_reference(pair, dataset, device, False, steps, args.loader_workers),
        bench_reference(pair, dataset, device, True, steps, args.loader_workers),
        bench_bkd(pair, dataset, device, False, steps, batch),
        bench_bkd(pair, dataset, device, True, steps, batch),
    ]
    if not gpu:  # the default on CPU is eager; show what train.compile=true gives
        results += [bench_bkd(pair, dataset, device, False, steps, batch, compile=True),
                    bench_bkd(pair, dataset, device, True, steps, batch, compile=True)]
    print("\n| step | img/s | peak memory (MB) |\n|---|---|---|")
    for r in results:
        print(f"| {r.name} | {r.images_per_s:,.0f} | {r.peak_mem_mb:,.0f} |")
    ref_kd, ref_bkd, our_kd, our_bkd = (r.images_per_s for r in results[:4])
    print(f"\nbkd Block-KD / reference Block-KD: {our_bkd / ref_bkd:.2f}x (default settings)")
    print(f"Block-KD cost vs KD (time per image): reference {ref_kd / ref_bkd:.2f}x, bkd {our_kd / our_bkd:.2f}x")
    if not gpu:
        c_kd, c_bkd = (r.images_per_s for r in results[4:])
        print(f"with train.compile=true: bkd Block-KD / reference Block-KD {c_bkd / ref_bkd:.2f}x, Block-KD vs KD {c_kd / c_bkd:.2f}x")
    if args.pack:
        one = packed(args, 1)
        many = packed(args, args.pack)
        print(f"packed small trials ({args.small_teacher} -> {args.small_student}): 1 process {one:,.0f} img/s, "
              f"{args.pack} processes {many:,.0f} img/s together ({many / one:.2f}x)")


if __name__ == "__main__":
    main()
