"""Argument checks shared by every arguments class: one message format, the valid range always named."""

from __future__ import annotations

import math
from numbers import Real


def describe_range(
    low: float | None, high: float | None, low_open: bool = False, high_open: bool = False
) -> str:
    """The interval a value must lie in, written for a message: ``> 0``, ``>= 0``, ``in [0, 1]``, ``in [0, 1)``."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "any finite number"


def check_finite(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """Return ``value`` as a float if it is a finite real number in the given range, else raise ValueError.

    NaN and ±infinity are always refused: every argument checked here is a weight, a rate, a radius or a
    temperature, for which they only produce non-finite models (NaN also slips through ``x < 0`` tests).
    ``hint`` follows the range in the message (what the value means, a typical setting).
    """
    valid = describe_range(low, high, low_open, high_open)
    suffix = f" {hint}" if hint else ""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a finite number {valid}, got {value!r}.{suffix}")
    number = float(value)
    in_range = math.isfinite(number)
    if in_range and low is not None:
        in_range = number > low if low_open else number >= low
    if in_range and high is not None:
        in_range = number < high if high_open else number <= high
    if not in_range:
        raise ValueError(f"{name} must be a finite number {valid}, got {value!r}.{suffix}")
    return number


def check_integer(name: str, value: object, low: int, hint: str = "") -> int:
    """Return ``value`` as an int if it is a whole number >= ``low`` (not a bool), else raise ValueError."""
    suffix = f" {hint}" if hint else ""
    if (
        isinstance(value, bool)
        or not isinstance(value, Real)
        or not math.isfinite(float(value))
        or int(value) != value
        or value < low
    ):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.{suffix}")
    return int(value)
