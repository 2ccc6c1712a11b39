"""Confidence intervals for every number the report shows.

- A proportion (an accuracy, an exact-match rate) gets the Wilson score interval: exact enough at any n
  and never outside [0, 1], unlike the normal approximation at accuracies near 0 or 1.
- Anything else (a mean of ROUGE scores, a corpus BLEU, a perplexity, a macro average over subjects, the
  difference between two models on the same items) gets a percentile bootstrap: the items are resampled
  with replacement (within each group when the statistic averages groups), the statistic recomputed, and
  the interval read from the quantiles of the resamples. The resampling is seeded: a report is reproducible.

`Estimate` is what the report stores: the value, the number of items behind it and the interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A reported number: its value, sample count and confidence interval (None when n is too small)."""

    value: float
    n: int
    low: float | None
    high: float | None
    method: str  # "wilson", "bootstrap" or "none"

    def to_json(self) -> dict:
        return {"value": self.value, "n": self.n, "ci": [self.low, self.high], "ci_method": self.method}


def wilson(successes: float, n: int, confidence: float = 0.95) -> Estimate:
    """The proportion successes/n with its Wilson score interval."""
    if n == 0:
        return Estimate(math.nan, 0, None, None, "none")
    p = successes / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (no rounding residue)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, n, low, high, "wilson")


def _resample_indices(rng: np.random.Generator, n: int, times: int, groups: Sequence | None) -> np.ndarray:
    """(times, n) indices drawn with replacement; within each group when `groups` is given."""
    if groups is None:
        return rng.integers(0, n, size=(times, n))
    out = np.empty((times, n), dtype=np.int64)
    labels = np.asarray(groups)
    for g in dict.fromkeys(groups):
        members = np.flatnonzero(labels == g)
        out[:, members] = members[rng.integers(0, len(members), size=(times, len(members)))]
    return out


def bootstrap(statistic: Callable[[np.ndarray], float], n: int, *, resamples: int, confidence: float, seed: int,
              groups: Sequence | None = None) -> tuple[float | None, float | None]:
    """Percentile interval of `statistic(indices)` over `resamples` resamplings of the n items (None if n < 2)."""
    if n < 2 or resamples < 1:
        return None, None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(idx) for idx in _resample_indices(rng, n, resamples, groups)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None, None
    alpha = (1 - confidence) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def mean_ci(values: Sequence[float], *, resamples: int, confidence: float, seed: int) -> Estimate:
    """The mean of `values` with a bootstrap interval."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return Estimate(math.nan, 0, None, None, "none")
    low, high = bootstrap(lambda idx: float(x[idx].mean()), len(x), resamples=resamples, confidence=confidence, seed=seed)
    return Estimate(float(x.mean()), len(x), low, high, "bootstrap" if low is not None else "none")


def ratio_ci(numerators: Sequence[float], denominators: Sequence[float], transform: Callable[[float], float], *,
             resamples: int, confidence: float, seed: int) -> Estimate:
    """transform(sum(num) / sum(den)) over items (e.g. perplexity from per-document NLL and token counts)."""
    a, b = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(a) == 0 or b.sum() == 0:
        return Estimate(math.nan, len(a), None, None, "none")
    low, high = bootstrap(lambda idx: transform(a[idx].sum() / b[idx].sum()), len(a), resamples=resamples,
                          confidence=confidence, seed=seed)
    return Estimate(transform(a.sum() / b.sum()), len(a), low, high, "bootstrap" if low is not None else "none")


def macro_mean_ci(values: Sequence[float], groups: Sequence[str], *, resamples: int, confidence: float,
                  seed: int) -> Estimate:
    """The mean over groups of each group's mean (e.g. MMLU's average over subjects), resampled within groups."""
    x = np.asarray(values, dtype=np.float64)
    labels = np.asarray(groups)
    names = list(dict.fromkeys(groups))
    if len(x) == 0:
        return Estimate(math.nan, 0, None, None, "none")
    members = [np.flatnonzero(labels == g) for g in names]

    def macro(idx: np.ndarray) -> float:
        return float(np.mean([x[idx[m]].mean() for m in members]))

    value = macro(np.arange(len(x)))
    low, high = bootstrap(macro, len(x), resamples=resamples, confidence=confidence, seed=seed, groups=list(groups))
    return Estimate(value, len(x), low, high, "bootstrap" if low is not None else "none")


def paired_difference(a: Sequence[float], b: Sequence[float], *, resamples: int, confidence: float,
                      seed: int) -> Estimate:
    """mean(b) - mean(a) over the same items, with a paired bootstrap interval (the items are resampled together)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} and {len(y)}")
    if len(x) == 0:
        return Estimate(math.nan, 0, None, None, "none")
    d = y - x
    low, high = bootstrap(lambda idx: float(d[idx].mean()), len(d), resamples=resamples, confidence=confidence, seed=seed)
    return Estimate(float(d.mean()), len(d), low, high, "bootstrap" if low is not None else "none")
