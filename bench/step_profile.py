"""Host time vs GPU time of bkd's default CUDA Block-KD step (resnet32x4 -> resnet8x4, 3 stones).

    python bench/step_profile.py [BATCH] [--compile-mode reduce-overhead]

Prints the time to issue a step from Python, the wall time per step, the GPU kernel time per step
(torch profiler) and the costliest kernels. A step whose issue time exceeds its kernel time is
bound by the host: a larger batch or CUDA graphs (``train.compile_mode=reduce-overhead``) help.
"""
from __future__ import annotations

import argparse
import time

import torch
from step_bench import random_cifar  # bench/ is on sys.path when run as a script

from bkd_core import BlockKD, data, models, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=int, nargs="?", default=512)
    parser.add_argument("--compile-mode", default="default", choices=train.COMPILE_MODES)
    parser.add_argument("--stones-one-by-one", action="store_true", help="BlockKD(stack_stones=False)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("step_profile needs a CUDA GPU; on CPU use bench/step_bench.py.")
    dev = torch.device("cuda")
    dataset = random_cifar(8192, 100)
    teacher, student = models.create("resnet32x4", 100).to(dev), models.create("resnet8x4", 100).to(dev)
    module = BlockKD(teacher, student, sample_input=dataset.images[:2].float().to(dev), stack_stones=not args.stones_one_by_one)
    module.to(dev).to(memory_format=torch.channels_last)
    cfg = train.TrainConfig(batch_size=args.batch, lr_base_batch=64, compile_mode=args.compile_mode).resolved(dev)
    opt = train.make_optimizer(module.trainable_parameters(), cfg, dev)
    step = train.step_module(module, cfg, dev)
    loader = data.BatchLoader(dataset, args.batch, train=True, augmentation=data.Augmentation(4, True), device=dev,
                              channels_last=True)
    batches = list(loader)[:8]

    def run(n: int) -> None:
        for i in range(n):
            x, y = batches[i % len(batches)]
            train.train_step(step, opt, x, y, cfg, dev)

    run(8)
    torch.cuda.synchronize()
    start = time.perf_counter()
    run(20)
    issue = (time.perf_counter() - start) / 20
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(5)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    gpu = sum(k.self_device_time_total for k in averages) / 5 / 1e3
    stones = "stones one by one" if args.stones_one_by_one else "stacked stones"
    print(f"b{args.batch} ({args.compile_mode}, {stones}): issue {issue * 1e3:.1f} ms/step, wall {wall * 1e3:.1f} ms/step, "
          f"GPU kernels {gpu:.1f} ms/step")
    print(averages.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
