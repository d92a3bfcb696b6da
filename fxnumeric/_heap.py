"""Give glibc's free pages back to the system.

glibc keeps what a thread frees in that thread's heap for its later allocations, and a large
block asked for after many smaller ones were freed does not fit in their pieces: it is touched
on top of them. :mod:`fxnumeric.lockstep` (as the turn passes and as float values are read)
and :meth:`fxnumeric.rows.LinearRows.rows` (before each block of a large Linear's output held as
rows) hand those pages back.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

__all__ = ["return_free_pages"]


def return_free_pages() -> None:
    """Give the free pages of every glibc heap back to the system; nothing where the C library
    has no ``malloc_trim`` (musl, macOS, Windows)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no such symbol; no process handle (Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
