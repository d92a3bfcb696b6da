"""How fxnumeric shows a metric's value (the advice, the checks), and checks the numbers it is
given."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import InputError

__all__ = ["shown", "shown_apart", "fixed", "unit", "a_number", "a_count"]


def a_number(value: Any, name: str, fix: str) -> float:
    """``value`` as a float, or an :class:`~fxnumeric.InputError` naming argument ``name``
    when it is no number or NaN: NaN compares false with every value, so a threshold or
    target of NaN silently flags nothing, or reaches nothing.

    >>> a_number(20, "threshold_db", "")
    20.0
    >>> a_number(float("nan"), "threshold_db", "Fix: threshold_db=20.0")
    Traceback (most recent call last):
    ...
    fxnumeric.errors.InputError: threshold_db must be a number, got nan: ...
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InputError(f"{name} must be a number, got {value!r}: NaN compares false with "
                         f"every value, and a value that is no number cannot be compared.\n{fix}")
    return float(value)


def a_count(value: Any, name: str, least: int) -> int:
    """``value`` when it is an int of at least ``least`` (a count of layers), else an
    :class:`~fxnumeric.InputError` naming argument ``name``: a NaN passed ``value < least``
    and then limited the search to nothing."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InputError(f"{name} must be a whole number >= {least}, got {value!r}")
    return value


def shown(value: float, *near: float) -> str:
    """``value`` to 4 significant digits, or as many more (up to 12) as it takes not to read
    as 1 or as one of ``near`` when it is not: a cosine of 0.99999 against a target of 0.99999
    read "cosine 1 >= 1".

    Example:
        >>> shown(31.28451), shown(0.99999, 0.999), shown(0.999991, 0.99999), shown(1.0)
        ('31.28', '0.99999', '0.999991', '1')
    """
    for digits in range(4, 12):
        text = f"{value:.{digits}g}"
        if all(value == other or text != f"{other:.{digits}g}" for other in (1.0, *near)):
            return text
    return f"{value:.12g}"


def fixed(value: float, places: int = 3) -> str:
    """``value`` to ``places`` decimals, or with the digits :func:`shown` gives it when that
    would read as 1 while it is not: a top-1 agreement of 0.9996 read "1.000".

    Example:
        >>> fixed(0.6634), fixed(0.9996), fixed(1.0)
        ('0.663', '0.9996', '1.000')
    """
    text = f"{value:.{places}f}"
    if value != 1.0 and text == f"{1.0:.{places}f}":
        return shown(value)
    return text


def unit(metric: str) -> str:
    """The unit written after a value of ``metric``: `` dB`` after an SQNR, `` nats`` after
    a KL (``kl``, ``kl_p99``, ``kl_max``), nothing after a ratio.

    >>> unit("sqnr"), unit("kl_p99"), unit("cosine")
    (' dB', ' nats', '')
    """
    if metric == "sqnr" or metric.endswith("_sqnr"):
        return " dB"
    return " nats" if metric == "kl" or metric.startswith("kl_") else ""


def shown_apart(values: Sequence[float], *near: float) -> list[str]:
    """Each of ``values`` as :func:`shown` shows it, with the digits it takes not to read as
    another of them (nor as 1 or one of ``near``): an advice's steps at cosine 0.99995 and
    0.99998 both read "1" at 4 significant digits.

    Example:
        >>> shown_apart([0.99995, 0.99998, 1.0]), shown_apart([12.5, 31.28451])
        (['0.99995', '0.99998', '1'], ['12.5', '31.28'])
    """
    return [shown(value, *values, *near) for value in values]
