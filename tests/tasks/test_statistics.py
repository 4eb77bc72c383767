"""Bootstrap intervals, seed intervals, split-half reliability and the one-SE lambda rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.sweep.selection import select_lambda
from tasks.sweep.statistics import (
    bootstrap_mean,
    over_seeds,
    paired_difference,
    split_half_reliability,
)


def test_paired_difference_uses_the_pairing():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1.0, 200)  # shared per-image difficulty, large
    a = difficulty + 0.1 + rng.normal(0, 0.02, 200)
    b = difficulty
    paired = paired_difference(a, b)
    assert paired.low > 0.0 and paired.excludes_zero
    assert paired.estimate == pytest.approx(0.1, abs=0.01)
    # Unpaired, the difficulty swamps a 0.1 shift: the two means' intervals overlap.
    ia, ib = bootstrap_mean(a), bootstrap_mean(b)
    assert ia.low < ib.high


def test_interval_covers_and_shrinks_with_more_images():
    rng = np.random.default_rng(1)
    small = bootstrap_mean(rng.normal(0.5, 1.0, 30))
    large = bootstrap_mean(rng.normal(0.5, 1.0, 3000))
    assert large.low < 0.5 < large.high
    assert (large.high - large.low) < (small.high - small.low) / 5


def test_nan_pairs_are_dropped_and_lengths_checked():
    result = paired_difference([1.0, math.nan, 3.0], [0.0, 0.0, math.nan])
    assert result.n == 1 and result.estimate == 1.0
    assert math.isnan(paired_difference([math.nan], [1.0]).estimate)
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0, 2.0], [1.0])


def test_over_seeds_is_a_t_interval():
    one = over_seeds([0.4])
    assert one.low == one.high == 0.4
    three = over_seeds([0.1, 0.2, 0.3])
    # mean 0.2, sd 0.1, se 0.0577, t(0.975, 2) = 4.303
    assert three.estimate == pytest.approx(0.2)
    assert three.high - three.estimate == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)


def test_split_half_reliability_reflects_noise():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(100, 49))
    clean = split_half_reliability(truth + 0.1 * rng.normal(size=truth.shape), truth)
    noisy = split_half_reliability(
        truth + rng.normal(size=truth.shape), truth + rng.normal(size=truth.shape)
    )
    assert clean.estimate > 0.95
    assert 0.35 < noisy.estimate < 0.65  # r = 1 / (1 + 1) for unit signal and unit noise


def _rows(means, errors, accuracy=None):
    rows = []
    for coef, mean in means.items():
        # Per-image values with the given mean and standard error over 100 images.
        values = np.full(100, mean) + errors * 10 * np.tile([-1.0, 1.0], 50)
        rows.append(
            {
                "lambda": coef,
                "accuracy": (accuracy or {}).get(coef, 0.9),
                "pearson": mean,
                "per_image": {"pearson": values.tolist()},
            }
        )
    return rows


def test_one_se_rule_prefers_the_smaller_edit_within_noise():
    means = {0.0: 0.10, 0.5: 0.28, 1.0: 0.30}
    noisy = _rows(means, errors=0.05)
    assert select_lambda(noisy, one_se=False) == 1.0
    assert select_lambda(noisy) == 0.5  # 0.28 is within one SE (0.05) of 0.30
    precise = _rows(means, errors=0.001)
    assert select_lambda(precise) == 1.0
    flat = _rows({0.0: 0.10, 1.0: 0.12}, errors=0.05)
    assert select_lambda(flat) == 0.0


def test_one_se_rule_keeps_the_accuracy_tolerance():
    rows = _rows({0.0: 0.1, 1.0: 0.5}, errors=0.001, accuracy={0.0: 0.9, 1.0: 0.85})
    assert select_lambda(rows, tolerance=1.0) == 0.0
