"""Train a small teacher on Fashion-MNIST, then a smaller student three ways (no KD, KD, Block-KD).

    python scripts/fashion_mnist_kd.py --root ../shared/data/fashion-mnist

Prints the three test accuracies (plain bkd_core, no Ray). A few minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import time

import torch

from bkd_core import BlockKD, LogitKD, data, models, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="../shared/data/fashion-mnist")
    parser.add_argument("--teacher", default="tiny_resnet")
    parser.add_argument("--student", default="tiny_cnn")
    parser.add_argument("--train-size", type=int, default=8000, help="training images used (of 60,000)")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--student-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(max(1, torch.get_num_threads()))
    splits = data.load("fashion_mnist", args.root)
    splits.train = splits.train.subset(args.train_size, seed=args.seed)
    sample = splits.train.images[:2].float()
    print(f"Fashion-MNIST: {len(splits.train)} train / {len(splits.test)} test images")

    torch.manual_seed(args.seed)
    teacher = models.create(args.teacher, 10, in_channels=1)
    t0 = time.perf_counter()
    print(f"teacher {args.teacher}:")
    teacher_cfg = train.TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size, lr=0.1, seed=args.seed)
    result = {"teacher": train.fit(train.Supervised(teacher), splits, teacher_cfg, on_epoch=train.print_progress)["val_acc"]}

    student_cfg = train.TrainConfig(epochs=args.student_epochs, batch_size=args.batch_size, lr=0.1, seed=args.seed)
    methods = {
        "no KD": lambda s: LogitKD(teacher, s, beta=0.0),
        "KD": lambda s: LogitKD(teacher, s, logit_loss="kd", temperature=4.0),
        "Block-KD": lambda s: BlockKD(teacher, s, logit_loss="kd", temperature=4.0, gamma=1.0, sample_input=sample),
    }
    for name, make in methods.items():
        torch.manual_seed(args.seed)  # same student initialisation for every method
        student = models.create(args.student, 10, in_channels=1)
        print(f"student {args.student}, {name}:")
        result[name] = train.fit(make(student), splits, student_cfg, on_epoch=train.print_progress)["val_acc"]

    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print("\n| model | params | test top-1 (%) |\n|---|---|---|")
    print(f"| teacher {args.teacher} | {params(teacher):,} | {result['teacher']:.2f} |")
    for name in methods:
        print(f"| student {args.student}, {name} | {params(student):,} | {result[name]:.2f} |")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
