"""One exception family for everything a user can trigger.

Every message says what failed, where (node, module path, which model) and what to do next.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

__all__ = [
    "FxNumericError",
    "TraceError",
    "MatchError",
    "InstrumentationError",
    "InternalError",
    "InputError",
    "FxNumericWarning",
    "about_variant",
]


class FxNumericError(Exception):
    """Base class of every error fxnumeric raises on purpose."""


class TraceError(FxNumericError):
    """A model could not be symbolically traced with ``torch.fx``."""


class MatchError(FxNumericError):
    """The float and quantized graphs could not be paired."""


class InstrumentationError(FxNumericError):
    """Loggers or shadows could not be inserted, or were used wrongly."""


class InternalError(InstrumentationError):
    """fxnumeric's own code failed (inside an instrumented forward): a bug to report, not a
    problem of the model or input."""


class InputError(FxNumericError, ValueError):
    """An argument (model, data batch, option) is not what fxnumeric needs."""


class FxNumericWarning(UserWarning):
    """A result that is computed but probably not what the user meant (for instance, a
    "quantized" model with no quantized op). Filter it with
    ``warnings.filterwarnings("ignore", category=fxnumeric.FxNumericWarning)``."""


@contextlib.contextmanager
def about_variant(name: str) -> Iterator[None]:
    """Say which quantized variant fxnumeric's errors and warnings raised inside are about
    (``compare`` and ``advise`` with ``{name: quantized model}``)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FxNumericWarning)  # each variant's own, not once
            yield
    except FxNumericError as exc:
        raise type(exc)(f"variant {name!r}: {exc}") from exc
    finally:
        for w in caught:  # again, outside the recording: the caller's filters decide
            ours = issubclass(w.category, FxNumericWarning)
            warnings.warn_explicit(f"variant {name!r}: {w.message}" if ours else w.message,
                                   w.category, w.filename, w.lineno)
