"""The shared argument checks: finite numbers in a named range."""

from __future__ import annotations

import math
import re

import pytest

from hf_distill.safety.validation import check_finite, check_integer, describe_range


@pytest.mark.parametrize(
    ("bounds", "expected"),
    [
        ((0, None, True, False), "> 0"),
        ((0, None, False, False), ">= 0"),
        ((0, 1, False, False), "in [0, 1]"),
        ((0, 1, False, True), "in [0, 1)"),
        ((0, 1, True, True), "in (0, 1)"),
        ((None, 5, False, True), "< 5"),
        ((None, None, False, False), "any finite number"),
    ],
)
def test_describe_range(bounds, expected):
    assert describe_range(*bounds) == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_finite_refuses_nan_and_infinity_even_without_bounds(value):
    with pytest.raises(ValueError, match=r"x must be a finite number any finite number, got"):
        check_finite("x", value)


@pytest.mark.parametrize(
    ("value", "low", "high", "low_open", "high_open", "ok"),
    [
        (0.0, 0, None, False, False, True),
        (0.0, 0, None, True, False, False),
        (1.0, 0, 1, False, False, True),
        (1.0, 0, 1, False, True, False),
        (-1e-9, 0, None, False, False, False),
        (1e300, 0, None, True, False, True),
    ],
)
def test_check_finite_bounds(value, low, high, low_open, high_open, ok):
    if ok:
        assert check_finite("x", value, low, high, low_open=low_open, high_open=high_open) == value
    else:
        with pytest.raises(ValueError, match=re.escape(describe_range(low, high, low_open, high_open))):
            check_finite("x", value, low, high, low_open=low_open, high_open=high_open)


@pytest.mark.parametrize("value", ["0.5", None, True])
def test_check_finite_refuses_non_numbers(value):
    with pytest.raises(ValueError, match="must be a finite number"):
        check_finite("x", value, 0)


def test_check_finite_appends_the_hint():
    with pytest.raises(ValueError, match=r"got nan\. CRD uses 0\.07\.$"):
        check_finite("crd_temperature", math.nan, 0, low_open=True, hint="CRD uses 0.07.")


@pytest.mark.parametrize(("value", "ok"), [(1, True), (3.0, True), (0, False), (1.5, False), (True, False)])
def test_check_integer(value, ok):
    if ok:
        assert check_integer("k", value, 1) == int(value)
    else:
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            check_integer("k", value, 1)
