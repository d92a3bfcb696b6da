"""How the advice shows a metric's value."""

from __future__ import annotations

__all__ = ["shown"]


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
