"""What following mdistiller's FitNet and ReviewKD modules changes, measured through ``orchestrator.compare``:
the same pair, budget, data and seeds, once with the modules as mdistiller lays them out (the defaults) and once
with the design bkd had before (``compare.fixed.fitnet.regressor=connector``: a 1x1 conv + BN connector with no
ReLU; ``compare.fixed.reviewkd.levels=block_ends``: the block outputs after their ReLU, no pooled level).
Differences are paired by seed and by test example (``orchestrator.tracking.stats``).

    python bench/fidelity_cost.py --out bench/results/fidelity            # digits, resnet56 -> resnet20, 2 cores
    python bench/fidelity_cost.py --pair resnet32x4_resnet8x4 --data cifar100 --root /data/cifar100 --seeds 5 --epochs 240

Both comparisons share one MLflow store, so the teacher is trained once and reused. Prints one table: per method,
each variant's mean test accuracy (95 % interval) and the paired difference mdistiller - before.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

VARIANTS = {"mdistiller": [], "before": ["compare.fixed.fitnet.regressor=connector", "compare.fixed.reviewkd.levels=block_ends"]}


def run_compare(out: Path, name: str, args: argparse.Namespace, extra: list[str]) -> Path:
    """One comparison of FitNet and ReviewKD; returns its compare.parquet (reused when it exists)."""
    table = out / "out" / name / "compare.parquet"
    if table.is_file():
        return table
    data = [f"data={args.data}"] + ([f"data.root={args.root}"] if args.root else [])
    cmd = [sys.executable, "-m", "orchestrator.compare", *data, f"pair={args.pair}", "compare.methods=[fitnet,reviewkd]",
           "compare.baseline=null", f"compare.seeds={args.seeds}", f"train.epochs={args.epochs}", f"teacher.epochs={args.teacher_epochs}",
           f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", f"ray.storage_path={out}/ray", f"output_dir={out}/out",
           f"tune.name={name}", *extra, *args.overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fidelity"))
    parser.add_argument("--pair", default="resnet56_resnet20")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--root", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="more KEY=VALUE overrides for both comparisons")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    from orchestrator.tracking.stats import METHOD, SeedResult, decode_correct, method_interval, paired_difference

    results: dict[str, dict[str, dict[int, SeedResult]]] = {}
    for variant, extra in VARIANTS.items():
        rows = pq.read_table(run_compare(args.out, f"fidelity-{variant}", args, extra)).to_pylist()
        for r in rows:
            if r["status"] == "FINISHED":
                correct = decode_correct(r["test_correct"]) if r.get("test_correct") else None
                count = correct.size if correct is not None else 0
                results.setdefault(r["method"], {}).setdefault(variant, {})[r["seed"]] = SeedResult(r["test_acc"], correct, count)
    print(f"\n{args.pair} on {args.data}, {args.epochs} epochs, {args.seeds} seeds (test_acc %, 95 % intervals: {METHOD})")
    print(f"{'method':<10} {'mdistiller (mean, CI)':<26} {'before (mean, CI)':<26} {'mdistiller - before (CI)'}")
    for method, by_variant in sorted(results.items()):
        a, b = method_interval(by_variant.get("mdistiller", {})), method_interval(by_variant.get("before", {}))
        d = paired_difference(by_variant.get("mdistiller", {}), by_variant.get("before", {}))
        cell = lambda i: f"{i.mean:6.2f} ({i.low:.2f} to {i.high:.2f})" if i and i.n > 1 else "-"  # noqa: E731
        print(f"{method:<10} {cell(a):<26} {cell(b):<26} {f'{d.mean:+.2f} ({d.low:.2f} to {d.high:.2f})' if d and d.n > 1 else '-'}")


if __name__ == "__main__":
    main()
