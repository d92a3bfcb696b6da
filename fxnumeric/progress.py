"""Progress for the long parts of a comparison: batches, and phases that are not batches.

``compare`` shows a bar over batches and a line per phase that can take seconds on a big
model (tracing and pairing, weight comparison); the CLI adds calibration. Shown by default
when stderr is a terminal or when running in a Jupyter kernel (where stderr never is a
terminal); ``progress=False`` hides it, ``progress=True`` forces it.

``tqdm`` draws it when installed (``tqdm.auto``: a widget in notebooks with ipywidgets, text
elsewhere); it is imported lazily, and without it a plain ``\\r`` line is written to stderr.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Progress", "phase", "enabled_by_default"]


def _in_notebook() -> bool:
    """Whether we run inside a Jupyter kernel (its stderr is a pipe, not a terminal)."""
    return "ipykernel" in sys.modules


def enabled_by_default() -> bool:
    """True when stderr is a terminal or we run in a Jupyter kernel."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or _in_notebook()


def _tqdm(total: int | None, desc: str, unit: str) -> Any | None:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    kwargs = dict(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
    try:
        return tqdm(**kwargs)
    except ImportError:  # a notebook without ipywidgets: tqdm's text bar works there too
        from tqdm.std import tqdm as text_tqdm

        return text_tqdm(**kwargs)


class Progress:
    """A progress bar over ``total`` steps (or an open-ended count when ``total`` is None).

    Args:
        total: number of steps, if known.
        desc: what is being counted, shown before the bar.
        enabled: ``None`` for :func:`enabled_by_default`, else force on or off.
        unit: the name of one step.
    """

    def __init__(self, total: int | None, desc: str, enabled: bool | None = None,
                 unit: str = "batch") -> None:
        self.enabled = enabled_by_default() if enabled is None else enabled
        self.total, self.desc, self.unit = total, desc, unit
        self.done = 0
        self.start = time.perf_counter()
        self._bar = _tqdm(total, desc, unit) if self.enabled else None

    def extend(self, n: int, desc: str | None = None) -> None:
        """Count ``n`` more steps in the total (a search that learns its length as it goes),
        and show ``desc`` as what is being done now."""
        self.total = (self.total or 0) + n
        if desc is not None:
            self.desc = desc
        if self.enabled and self._bar is not None:
            self._bar.total = self.total
            if desc is not None:
                self._bar.set_description_str(desc, refresh=False)
            self._bar.refresh()

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        total = f"/{self.total}" if self.total else ""
        sys.stderr.write(f"\r{self.desc}: {self.done}{total} {self.unit}  "
                         f"{time.perf_counter() - self.start:.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        """Finish the bar (leaves the last state on screen)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def phase(desc: str, enabled: bool | None = None) -> Iterator[None]:
    """Show ``desc`` while the block runs, then how long it took: ``tracing ... 1.2s``."""
    on = enabled_by_default() if enabled is None else enabled
    start = time.perf_counter()
    if on:
        sys.stderr.write(f"{desc} ...")
        sys.stderr.flush()
    try:
        yield
    finally:
        if on:
            sys.stderr.write(f" {time.perf_counter() - start:.1f}s\n")
            sys.stderr.flush()
