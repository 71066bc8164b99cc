"""Seeds to verdicts: means, sample standard deviations, Student t 95 % intervals, and paired
differences between methods trained on the same seeds."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

LEVEL = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


@dataclass
class Interval:
    """A mean with its 95 % Student t interval over ``n`` values (nan bounds for n < 2)."""

    n: int
    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Interval":
        mean, std = mean_std(values)
        if len(values) < 2:
            return cls(len(values), mean, std, float("nan"), float("nan"))
        from scipy import stats as scipy_stats  # only comparisons need it (0.5 s to import)

        half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1)) * std / math.sqrt(len(values))
        return cls(len(values), mean, std, mean - half, mean + half)


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> Optional[Interval]:
    """``values - reference`` over the seeds both have (pairing removes the seed's own effect)."""
    seeds = sorted(set(values) & set(reference))
    return Interval.of([values[s] - reference[s] for s in seeds]) if seeds else None


def verdict(name: str, reference: str, diff: Optional[Interval]) -> str:
    """One plain sentence: which method is better, by how much, and how sure."""
    if diff is None or diff.n == 0:
        return f"{name} and {reference} share no finished seed: nothing to compare."
    if diff.n < 2:
        return f"{name} - {reference} = {diff.mean:+.2f} points on one seed: no interval; use compare.seeds >= 2."
    span = f"{diff.low:.2f} to {diff.high:.2f}"
    if diff.low > 0:
        return f"{name} beats {reference} by {diff.mean:.2f} points (95 % CI {span}, {diff.n} seeds)."
    if diff.high < 0:
        return f"{name} trails {reference} by {-diff.mean:.2f} points (95 % CI {span}, {diff.n} seeds)."
    return f"{name} and {reference} are not distinguishable at {diff.n} seeds (difference {span})."
