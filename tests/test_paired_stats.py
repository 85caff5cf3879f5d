"""benchmarks/paired_stats.py: the seed-paired t interval against the textbook formula."""

import math
import sys
from pathlib import Path

import pytest
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paired_stats import paired_difference_interval  # noqa: E402

# ----- paired_difference_interval -----------------------------------------------------------------------------


def _slow_paired_interval(a: list[float], b: list[float], t_quantile: float) -> tuple[float, float, float]:
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    half = t_quantile * math.sqrt(variance) / math.sqrt(n)
    return mean, mean - half, mean + half


def test_paired_interval_matches_the_textbook_formula():
    a = [0.84, 0.86, 0.83, 0.87, 0.85]
    b = [0.82, 0.83, 0.83, 0.84, 0.81]
    interval = paired_difference_interval(a, b)
    # t_{0.975, 4} = 2.7764 from printed t tables, independently of scipy.
    mean, low, high = _slow_paired_interval(a, b, 2.7764)
    assert interval.n == 5
    assert interval.mean == pytest.approx(mean, abs=1e-12)
    assert interval.low == pytest.approx(low, abs=1e-4)
    assert interval.high == pytest.approx(high, abs=1e-4)
    assert interval.excludes_zero  # every seed better by 0 to 4 points: more than noise


def test_paired_interval_uses_the_requested_confidence():
    a, b = [1.0, 3.0, 2.0, 6.0], [0.0, 0.0, 1.0, 1.0]
    for confidence in (0.8, 0.9, 0.99):
        quantile = scipy.stats.t.ppf((1 + confidence) / 2, df=3)
        mean, low, high = _slow_paired_interval(a, b, quantile)
        interval = paired_difference_interval(a, b, confidence)
        assert (interval.mean, interval.low, interval.high) == pytest.approx((mean, low, high), abs=1e-12)


def test_paired_interval_straddling_zero_is_not_a_difference():
    interval = paired_difference_interval([0.5, 0.7, 0.6], [0.6, 0.6, 0.6])
    assert interval.low < 0 < interval.high
    assert not interval.excludes_zero


@pytest.mark.parametrize(
    ("a", "b", "message"),
    [([0.1], [0.2], "at least 2 pairs"), ([0.1, 0.2], [0.2], "equal lengths")],
)
def test_paired_interval_refuses_unpaired_or_single_values(a, b, message):
    with pytest.raises(ValueError, match=message):
        paired_difference_interval(a, b)
