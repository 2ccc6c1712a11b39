"""Confidence intervals: Wilson against published values, bootstrap properties."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loratune.eval.stats import macro_mean_ci, mean_ci, paired_difference, ratio_ci, wilson


def test_wilson_matches_published_values() -> None:
    # 8 of 10 at 95%: (0.4902, 0.9433), as statsmodels' proportion_confint(8, 10, method="wilson") gives
    w = wilson(8, 10, 0.95)
    assert (w.value, w.n, w.method) == (0.8, 10, "wilson")
    assert (w.low, w.high) == pytest.approx((0.49016, 0.94332), abs=1e-4)
    # the extremes stay inside [0, 1] and are not degenerate
    zero, full = wilson(0, 20), wilson(20, 20)
    assert zero.low == 0.0 and 0 < zero.high < 0.2
    assert full.high == 1.0 and 0.8 < full.low < 1.0
    assert math.isnan(wilson(0, 0).value) and wilson(0, 0).low is None


def test_bootstrap_mean_interval_is_seeded_and_covers_the_mean() -> None:
    x = np.random.default_rng(0).normal(10.0, 2.0, size=400)
    a = mean_ci(x, resamples=500, confidence=0.95, seed=1)
    assert a == mean_ci(x, resamples=500, confidence=0.95, seed=1)
    assert a.low < a.value < a.high
    # the interval's half-width is about 1.96 standard errors
    assert (a.high - a.low) / 2 == pytest.approx(1.96 * x.std() / math.sqrt(len(x)), rel=0.2)


def test_macro_mean_weights_groups_equally() -> None:
    values = [1.0] * 9 + [0.0]  # group a: 9 right; group b: 1 wrong
    e = macro_mean_ci(values, ["a"] * 9 + ["b"], resamples=200, confidence=0.95, seed=0)
    assert e.value == pytest.approx(0.5)
    assert e.low == e.high == pytest.approx(0.5)  # resampling within groups cannot change either group's mean


def test_paired_difference_and_ratio() -> None:
    a, b = [0, 0, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1]
    d = paired_difference(a, b, resamples=300, confidence=0.9, seed=0)
    assert d.value == pytest.approx(2 / 6)
    assert d.low >= 0  # b is never worse than a on any item
    r = ratio_ci([2.0, 4.0], [1.0, 3.0], math.exp, resamples=100, confidence=0.95, seed=0)
    assert r.value == pytest.approx(math.exp(6 / 4))
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1], resamples=10, confidence=0.9, seed=0)
