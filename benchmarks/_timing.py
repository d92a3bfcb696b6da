"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any], repeat: int, *, warmup: bool = True,
          unit: float = 1.0) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls of ``fn`` (after one warm-up call unless
    ``warmup=False``), in seconds times ``unit`` (1e3 for ms), and the last call's result."""
    result = fn() if warmup else None
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * unit)
    return statistics.median(times), result


def median_time(fn: Callable[[], Any], repeat: int = 5, *, warmup: bool = True) -> float:
    """Median wall time in seconds of ``repeat`` calls of ``fn`` (see :func:`timed`)."""
    return timed(fn, repeat, warmup=warmup)[0]
