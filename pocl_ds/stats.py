"""Statistics of results: rank correlation (difficulty vs known level) and summaries over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def _average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of average ranks (ties handled); NaN if undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rank_x, rank_y = _average_ranks(x), _average_ranks(y)
    mean = (len(x) + 1) / 2  # the mean of average ranks is always (n + 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rank_x, rank_y, strict=True))
    var_x = sum((a - mean) ** 2 for a in rank_x)
    var_y = sum((b - mean) ** 2 for b in rank_y)
    if var_x == 0 or var_y == 0:
        return math.nan
    return cov / math.sqrt(var_x * var_y)


# ----------------------------------------------------------------------------- over training seeds


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and *sample* standard deviation (ddof = 1, the spread of independent training
    runs); the std is None for a single value, where it is undefined."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return result


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):  # where the continued fraction converges fast
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(probability: float, df: float) -> float:
    """The t with P(T <= t) = ``probability`` (scipy is not a dependency: the CDF is inverted
    by bisection, to about 1e-12)."""
    if not 0.0 < probability < 1.0 or df <= 0:
        raise ValueError(f"need 0 < probability < 1 and df > 0, got {probability}, {df}")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < probability:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        middle = (low + high) / 2.0
        if student_t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval of a mean: ``mean ± half_width``; the bounds are None
    (and ``why`` says so) when it cannot be computed."""

    mean: float
    low: float | None
    high: float | None
    half_width: float | None
    confidence: float
    n: int
    why: str | None = None


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The Student-t confidence interval of the mean of ``values`` (sample std, n - 1 df)."""
    mean, std = mean_std(values)
    n = len(values)
    if std is None:
        why = f"a t-interval needs at least 2 values, got {n}"
        return Interval(mean, None, None, None, confidence, n, why)
    half = student_t_quantile(0.5 + confidence / 2.0, n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, half, confidence, n)


PAIRED_INTERVAL = "paired t, 95%"


def paired_difference(
    cell: Mapping[Any, float], baseline: Mapping[Any, float], confidence: float = 0.95
) -> dict[str, Any]:
    """``cell - baseline`` paired by key (the training seed) over the keys both have: the mean
    difference, its sample std, n, the t-interval and the per-key differences."""
    keys = [key for key in cell if key in baseline]
    differences = {key: cell[key] - baseline[key] for key in keys}
    name = PAIRED_INTERVAL if confidence == 0.95 else f"paired t, {100 * confidence:g}%"
    if not differences:
        return {
            "interval": name,
            "n": 0,
            "mean": None,
            "std": None,
            "low": None,
            "high": None,
            "per_seed": {},
            "why": "no training seed is shared with the baseline",
        }
    interval = t_interval(list(differences.values()), confidence)
    return {
        "interval": name,
        "n": interval.n,
        "mean": interval.mean,
        "std": mean_std(list(differences.values()))[1],
        "low": interval.low,
        "high": interval.high,
        "per_seed": differences,
        "why": interval.why,
    }
