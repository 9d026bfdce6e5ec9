"""Tests for pocl_ds.stats."""

from __future__ import annotations

import math

import pytest

from pocl_ds.stats import (
    mean_std,
    paired_difference,
    spearman,
    student_t_cdf,
    student_t_quantile,
    t_interval,
)


def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4) -> cov 4.5, var 4.5 and 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 194 / 990
    iq = [106, 86, 100, 101, 99, 103, 97, 113, 112, 110]
    tv = [7, 0, 27, 50, 28, 29, 20, 12, 6, 17]
    assert spearman(iq, tv) == pytest.approx(1 - 6 * 194 / 990)


def test_spearman_undefined_and_bad_input():
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(ValueError, match="equal lengths"):
        spearman([1, 2], [1, 2, 3])


@pytest.mark.parametrize(
    ("df", "quantile"), [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)]
)
def test_t_quantile_matches_the_table(df, quantile):
    assert student_t_quantile(0.975, df) == pytest.approx(quantile, abs=5e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-quantile, abs=5e-4)
    assert student_t_cdf(student_t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-9)


def test_t_quantile_other_levels_and_the_normal_limit():
    assert student_t_quantile(0.995, 3) == pytest.approx(5.841, abs=5e-4)
    assert student_t_quantile(0.95, 10) == pytest.approx(1.812, abs=5e-4)
    assert student_t_quantile(0.975, 10_000) == pytest.approx(1.960, abs=5e-4)
    assert student_t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_mean_std_is_the_sample_std_over_training_seeds():
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == (2.5, pytest.approx(math.sqrt(5 / 3)))
    assert mean_std([7.0]) == (7.0, None)


def test_t_interval_matches_a_hand_computed_case():
    # differences [1, 2, 3]: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3) = 4.303 / 1.732
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.half_width == pytest.approx(4.303 / math.sqrt(3), abs=1e-3)
    assert interval.half_width == pytest.approx(2.484, abs=1e-3)
    assert (interval.low, interval.high) == pytest.approx((2 - 2.484, 2 + 2.484), abs=1e-3)
    assert interval.n == 3 and interval.why is None


def test_t_interval_of_one_value_is_undefined_and_says_why():
    interval = t_interval([4.0])
    assert (interval.low, interval.high, interval.half_width) == (None, None, None)
    assert "at least 2" in interval.why


def test_paired_difference_pairs_by_training_seed():
    cell = {1: 11.0, 2: 14.0, 3: 16.0, 4: 99.0}  # seed 4 has no baseline run: left out
    baseline = {3: 13.0, 1: 10.0, 2: 12.0}
    diff = paired_difference(cell, baseline)
    assert diff["interval"] == "paired t, 95%"
    assert diff["per_seed"] == {1: 1.0, 2: 2.0, 3: 3.0}
    assert (diff["n"], diff["mean"], diff["std"]) == (3, 2.0, 1.0)
    assert (diff["low"], diff["high"]) == pytest.approx((-0.484, 4.484), abs=1e-3)
    single = paired_difference({1: 5.0}, {1: 3.0})
    assert single["mean"] == 2.0 and single["low"] is None and "at least 2" in single["why"]
    assert paired_difference({1: 5.0}, {2: 3.0})["why"] == (
        "no training seed is shared with the baseline"
    )
