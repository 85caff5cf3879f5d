"""Seed-paired differences with a t confidence interval: how the benchmarks say whether two methods differ
by more than seed noise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from scipy.stats import t as student_t


class PairedInterval(NamedTuple):
    """Mean of paired differences ``a_k − b_k`` and its two-sided t confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0: the difference is more than seed noise."""
        return self.low > 0 or self.high < 0


def paired_difference_interval(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> PairedInterval:
    """The t interval of the mean paired difference ``a − b`` (pairs: same seed, two methods).

    ``mean ± t_{(1+confidence)/2, n−1} · s / √n`` with ``s`` the sample standard deviation of the ``n``
    differences. Needs at least two pairs; identical differences give a zero-width interval.
    """
    if len(a) != len(b):
        raise ValueError(f"Paired values need equal lengths, got {len(a)} and {len(b)}: pair them by seed.")
    if len(a) < 2:
        raise ValueError(f"A paired interval needs at least 2 pairs, got {len(a)}: run more seeds.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diffs)
    mean = float(diffs.mean())
    half = float(student_t.ppf((1 + confidence) / 2, n - 1) * diffs.std(ddof=1) / np.sqrt(n))
    return PairedInterval(mean, mean - half, mean + half, n)
