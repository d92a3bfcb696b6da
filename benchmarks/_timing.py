"""Wall-clock timing and resident memory, shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from fxnumeric.lockstep import return_free_pages


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


def rss_kib(field: str) -> int:
    """A memory field of ``/proc/self/status`` in KiB (``"VmRSS:"``, ``"VmHWM:"``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def reset_peak_rss() -> None:
    """Set the peak (``VmHWM``) back to the current RSS (Linux >= 4.0), once glibc's heaps have
    given their free pages back: the base is then what is alive, not also what earlier calls
    left free, which moved a 512-token compare's base by up to 450 MiB from run to run."""
    return_free_pages()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
