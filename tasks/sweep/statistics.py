"""Uncertainty of the sweep's numbers: bootstrap intervals over images and intervals over seeds.

Every quality metric of the sweep is a mean over images, and every claim compares two such means
on the *same* images (lambda 0 against the chosen lambda, the SEM against Kernel SHAP). The images
are the unit of resampling: :func:`paired_difference` resamples image indices once and applies
them to both methods, so the interval reflects how much the difference would move on another
draw of test images of the same domain, with the pairing kept (per-image difficulty cancels).

:func:`over_seeds` summarises a study repeated over seeds (``--seeds N``) by the mean and a
Student-t interval of the per-seed values: seeds are few, so a bootstrap over them would be
too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval.

    Attributes:
        estimate: the statistic on the observed sample (NaN when nothing is measurable).
        low: lower end of the interval.
        high: upper end of the interval.
        n: number of units (images or seeds) behind it.
    """

    estimate: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the whole interval lies on one side of zero."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-able form; NaN becomes None."""

        def clean(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "estimate": clean(self.estimate),
            "low": clean(self.low),
            "high": clean(self.high),
            "n": self.n,
        }

    def format(self, digits: int = 3) -> str:
        """``estimate [low, high]`` for tables."""
        if not math.isfinite(self.estimate):
            return "n/a"
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


_NAN = Interval(math.nan, math.nan, math.nan, 0)


def _clean(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Mean of ``values`` (NaN ignored) with a percentile bootstrap interval."""
    return paired_difference(
        values, np.zeros(len(values)), resamples=resamples, level=level, seed=seed
    )


def paired_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
) -> Interval:
    """Mean of ``a - b`` over paired units with a percentile bootstrap interval.

    ``a[i]`` and ``b[i]`` are two methods' scores on the same image ``i``; pairs with a NaN on
    either side (a metric not measurable on that image) are dropped before resampling.

    Args:
        a: per-image scores of the first method.
        b: per-image scores of the second method, same images in the same order.
        resamples: bootstrap resamples.
        level: coverage of the interval.
        seed: seeds the resampling (the interval is reproducible).

    Returns:
        The observed mean difference and its interval (NaN when no pair is left).

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or ``level`` is not in (0, 1).
    """
    first = np.asarray(a, dtype=np.float64).ravel()
    second = np.asarray(b, dtype=np.float64).ravel()
    if first.shape != second.shape:
        raise ValueError(f"paired samples differ in length: {first.size} and {second.size}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    keep = np.isfinite(first) & np.isfinite(second)
    diff = first[keep] - second[keep]
    if diff.size == 0:
        return _NAN
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(diff.mean()), float(low), float(high), int(diff.size))


def standard_error(values: Sequence[float] | np.ndarray) -> float:
    """Standard error of the mean of ``values`` (NaN ignored; NaN below two values)."""
    array = _clean(values)
    if array.size < 2:
        return math.nan
    return float(array.std(ddof=1) / math.sqrt(array.size))


def over_seeds(values: Sequence[float], *, level: float = DEFAULT_LEVEL) -> Interval:
    """Mean over seeds with a Student-t interval (a single seed gives a zero-width interval)."""
    from scipy import stats

    array = _clean(values)
    if array.size == 0:
        return _NAN
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, mean, mean, 1)
    half = float(stats.t.ppf(0.5 + level / 2.0, array.size - 1)) * standard_error(array)
    return Interval(mean, mean - half, mean + half, int(array.size))


def split_half_reliability(first: np.ndarray, second: np.ndarray) -> Interval:
    """Agreement between two independent estimates of the same attribution maps.

    ``first`` and ``second`` are ``[N, cells]`` maps of the same images from independent halves
    of the labelling budget (or two seeds). The per-image Pearson correlation between them, its
    mean and bootstrap interval, is the ceiling an agreement score against one such estimate can
    reach: a method that recovered the true maps exactly would score about this much.
    """
    a = np.asarray(first, dtype=np.float64).reshape(len(first), -1)
    b = np.asarray(second, dtype=np.float64).reshape(len(second), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)
    return bootstrap_mean(r)
