"""Seeds and test examples to verdicts: means, 95 % intervals that count both sources of noise, and paired
differences between methods trained on the same seeds and scored on the same test examples.

A run's test accuracy varies with its training seed *and* with which examples the test split happens to
hold. The interval of a mean over k seeds therefore adds the test split's sampling variance to the seeds'
(a two-way, seeds x examples, decomposition; Bouthillier et al., 2021, "Accounting for Variance in Machine
Learning Benchmarks", MLSys; Miller, 2024, "Adding Error Bars to Evals", arXiv:2411.00640, for the paired,
per-example form):

    var(mean) = s_seed^2 / k + s_example^2 / n

``s_seed^2``: the sample variance of the k per-seed accuracies (or paired differences); ``s_example^2``: the
sample variance over the n test examples of each example's correctness (or paired difference in
correctness) averaged over the seeds. Each term also holds the seed x example interaction once, so the sum
is slightly conservative. The interval is ``mean +- t(0.975, k - 1) * sqrt(var)``: Student t with the seeds'
degrees of freedom, so two seeds give an honest, wide interval, and it is never zero-wide while the test
split is finite. Without per-example results (streamed test data) the example term is the binomial one,
``p (1 - p) / n`` (for a difference, the two methods' terms added: conservative, as it ignores their
positive correlation). A language model's loss (the mean over target tokens, a ratio of per-example sums) keeps
each example's linearised term, ``(nll_i - L * n_i) / mean(n)`` (the delta method): their variance over examples,
divided by n, is the test term of L, and paired differences pair them by example as for correctness.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np

LEVEL = 0.95
METHOD = ("Student t over seeds with the test split's sampling variance added (seeds x test examples); "
          "paired by seed and by test example")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


def encode_correct(correct: "np.ndarray | Sequence[bool]") -> str:
    """Per-example results in the test split's order as a short string: correctness (bools) as bits, base64 (10,000
    examples: 1,668 characters); an LM's per-example loss terms (floats) as float16, base64, after an ``f``."""
    values = np.asarray(correct)
    if values.dtype.kind == "f":
        return f"f{values.size}:" + base64.b64encode(values.astype(np.float16).tobytes()).decode()
    bits = values.astype(bool)
    return f"{bits.size}:" + base64.b64encode(np.packbits(bits).tobytes()).decode()


def decode_correct(text: str) -> np.ndarray:
    """``encode_correct``'s string back to bools (or floats)."""
    count, data = text.split(":", 1)
    if count.startswith("f"):
        return np.frombuffer(base64.b64decode(data), dtype=np.float16)[: int(count[1:])].astype(np.float64)
    return np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))[: int(count)].astype(bool)


def in_points(values: np.ndarray) -> np.ndarray:
    """Per-example results in the figure's units: correctness as 0 or 100 points, a loss's terms as they are."""
    values = np.asarray(values)
    return values.astype(float) * 100.0 if values.dtype == bool else values.astype(float)


@dataclass
class Interval:
    """A mean over ``n`` seeds with its 95 % interval (nan bounds for n < 2); ``test_se``: the test split's
    share of its standard error (points)."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    test_se: float = float("nan")
    counts_examples: bool = True  # the test split's sampling variance is in the interval

    @classmethod
    def of(cls, values: Sequence[float], test_variance: Optional[float] = 0.0) -> "Interval":
        """``values`` (one per seed, in points) and the test term ``s_example^2 / n`` (points^2) of their mean (None:
        not known, the interval counts the seeds alone)."""
        mean, std = mean_std(values)
        counts = test_variance is not None
        test_variance = test_variance or 0.0
        test_se = math.sqrt(test_variance)
        if len(values) < 2:
            return cls(len(values), mean, std, float("nan"), float("nan"), test_se, counts)
        from scipy import stats as scipy_stats  # only comparisons need it (0.5 s to import)

        se = math.sqrt(std ** 2 / len(values) + test_variance)
        half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1)) * se
        return cls(len(values), mean, std, mean - half, mean + half, test_se, counts)


def example_variance(per_seed: Sequence[np.ndarray]) -> float:
    """``s_example^2 / n`` in the figure's units squared: the variance over examples of each example's value
    (correctness, a loss's term, or a difference of them; ``in_points``) averaged over the seeds, divided by the
    examples' count."""
    matrix = np.stack([in_points(v) for v in per_seed])
    per_example = matrix.mean(axis=0)
    n = per_example.size
    return float(per_example.var(ddof=1)) / n if n > 1 else 0.0


def binomial_variance(accuracy: float, count: int) -> float:
    """The test term of one accuracy (%) on ``count`` examples, without per-example results: p (1 - p) / n."""
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return p * (1.0 - p) * 100.0**2 / max(1, count)


@dataclass
class SeedResult:
    """One run's test figure: its accuracy (%) (or an LM's loss), and its per-example correctness where it was kept."""

    accuracy: float
    correct: Optional[np.ndarray] = None
    count: int = 0  # test examples (for the binomial term when ``correct`` is missing; 0: an LM's loss, no such term)


def method_interval(results: Mapping[int, SeedResult]) -> Optional[Interval]:
    """A method's mean test accuracy over its seeds, with both sources of noise."""
    if not results:
        return None
    runs = list(results.values())
    values = [r.accuracy for r in runs]
    test: Optional[float]
    if all(r.correct is not None for r in runs) and len({r.correct.size for r in runs}) == 1:
        test = example_variance([r.correct for r in runs])
    elif max(r.count for r in runs) > 0:  # the same n examples for every seed: at most one run's p (1 - p) / n
        test = binomial_variance(sum(values) / len(values), max(r.count for r in runs))
    else:
        test = None
    return Interval.of(values, test)


def paired_difference(values: Mapping[int, SeedResult], reference: Mapping[int, SeedResult]) -> Optional[Interval]:
    """``values - reference`` over the seeds both have, paired by seed and, where both kept it, by test example."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = [values[s].accuracy - reference[s].accuracy for s in seeds]
    pairs = [(values[s].correct, reference[s].correct) for s in seeds]
    count = max(max(values[s].count, reference[s].count) for s in seeds)
    test: Optional[float]
    if all(a is not None and b is not None and a.size == b.size for a, b in pairs) and len({a.size for a, _ in pairs}) == 1:
        test = example_variance([in_points(a) - in_points(b) for a, b in pairs])
    elif count == 0:
        test = None
    else:
        mean_a = sum(values[s].accuracy for s in seeds) / len(seeds)
        mean_b = sum(reference[s].accuracy for s in seeds) / len(seeds)
        test = binomial_variance(mean_a, count) + binomial_variance(mean_b, count)
    return Interval.of(diffs, test)


def verdict(name: str, reference: str, diff: Optional[Interval], higher_is_better: bool = True, unit: str = "points") -> str:
    """One plain sentence: which method is better, by how much, and how sure (``higher_is_better=False``: a loss)."""
    if diff is None or diff.n == 0:
        return f"{name} and {reference} share no finished seed: nothing to compare."
    if diff.n < 2:
        return f"{name} - {reference} = {diff.mean:+.2f} {unit} on one seed: no interval; use compare.seeds >= 2."
    span = f"{diff.low:.2f} to {diff.high:.2f}"
    few = " (few seeds: a wide interval; more compare.seeds narrow it)" if diff.n < 3 else ""
    above, below = (diff.low > 0, diff.high < 0) if higher_is_better else (diff.high < 0, diff.low > 0)
    if above:
        return f"{name} beats {reference} by {abs(diff.mean):.2f} {unit} (95 % CI {span}, {diff.n} seeds){few}."
    if below:
        return f"{name} trails {reference} by {abs(diff.mean):.2f} {unit} (95 % CI {span}, {diff.n} seeds){few}."
    units = "" if unit == "points" else f" {unit}"
    return f"{name} and {reference} are not distinguishable at {diff.n} seeds (difference {span}{units}){few}."
