"""Python's cyclic garbage collector, deferred while fxnumeric builds what one call needs.

A call such as :func:`fxnumeric.compare` (or :func:`fxnumeric.diagnose`, or the stages
:func:`fxnumeric.match` and :func:`fxnumeric.instrument` and the eager API built on them) builds
many short-lived objects: traced graphs, copies of the module tree, observers (about 190,000 on a
30-layer LLM). With the collector's default thresholds they survive a few young collections
while the call still uses them, and so count toward the next *full* collection, which
walks every object of the process (0.23-0.35 s with transformers and a 135M-parameter model
loaded; more in a busier process): one ran in every compare of SmolLM2. Deferred, they are
still young when the call returns, and one young collection at its end frees those that are
garbage (fx graphs hold reference cycles) without walking the rest of the process.

The deferral is a raised threshold, not ``gc.disable()``: past ``YOUNG_LIMIT`` objects
allocated and not freed since the last collection, a young collection runs anyway, so that
a call that keeps making cyclic garbage (a user's metric, say) stays bounded. The setting is
the process's (``gc.set_threshold``): other threads see it for the call's length, as with
``torch.distributed.checkpoint.get_state_dict``, which disables the collector outright. A
collector the user turned off (``gc.disable()``, or a threshold of 0) is left alone.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["deferred_collection", "defers_collection", "YOUNG_LIMIT"]

YOUNG_LIMIT = 1_000_000
"""Objects allocated and not yet freed after which a young collection runs during a call."""

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def deferred_collection() -> Iterator[None]:
    """Defer young collections for the block, then collect the young generation once.

    Nested blocks are part of the outermost one: only the outermost collects. A block that
    starts while another thread's block runs is taken for a nested one. A threshold set by
    someone else during the block is left as they set it.

    Example:
        >>> import gc
        >>> before = gc.get_threshold()
        >>> with deferred_collection():
        ...     deferred = gc.get_threshold()[0]
        >>> deferred >= YOUNG_LIMIT or not gc.isenabled(), gc.get_threshold() == before
        (True, True)
    """
    thresholds = gc.get_threshold()
    if not gc.isenabled() or thresholds[0] == 0 or thresholds[0] >= YOUNG_LIMIT:
        yield  # the user's choice, or an enclosing block's
        return
    gc.set_threshold(YOUNG_LIMIT, *thresholds[1:])
    try:
        yield
    finally:
        if gc.get_threshold()[0] == YOUNG_LIMIT:  # else set by someone else meanwhile: theirs
            gc.set_threshold(*thresholds)
        gc.collect(0)


def defers_collection(fn: F) -> F:
    """``fn`` run inside :func:`deferred_collection`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with deferred_collection():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
