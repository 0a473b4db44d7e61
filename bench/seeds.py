"""Numbers over training seeds (bench/quality.py, bench/grow.py): each model's mean ± sd, and paired differences
with t-intervals.

A difference between two models is paired by seed (the same data, prep and evaluation images; only the
training seed changes), so its interval reflects how much the *gap* moves from seed to seed, which is what a
claim like "the ensemble beats the generalist" needs — not the spread of either model alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def t_interval(values: list[float], level: float = 0.95) -> Interval:
    """Student-t interval of the mean (two-sided); NaN bounds with a single value."""
    from scipy import stats

    mean, sd = mean_sd(values)
    n = len(values)
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_interval(a: list[float], b: list[float], level: float = 0.95) -> Interval:
    """Interval of the mean of a − b, seed by seed."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} vs {len(b)}")
    return t_interval([x - y for x, y in zip(a, b, strict=True)], level)
