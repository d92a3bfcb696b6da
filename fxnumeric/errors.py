"""One exception family for everything a user can trigger.

Every message says what failed, where (node, module path, which model) and what to do next.
"""

from __future__ import annotations

__all__ = [
    "FxNumericError",
    "TraceError",
    "MatchError",
    "InstrumentationError",
    "InputError",
    "FxNumericWarning",
]


class FxNumericError(Exception):
    """Base class of every error fxnumeric raises on purpose."""


class TraceError(FxNumericError):
    """A model could not be symbolically traced with ``torch.fx``."""


class MatchError(FxNumericError):
    """The float and quantized graphs could not be paired."""


class InstrumentationError(FxNumericError):
    """Loggers or shadows could not be inserted, or were used wrongly."""


class InputError(FxNumericError, ValueError):
    """An argument (model, data batch, option) is not what fxnumeric needs."""


class FxNumericWarning(UserWarning):
    """A result that is computed but probably not what the user meant (for instance, a
    "quantized" model with no quantized op). Filter it with
    ``warnings.filterwarnings("ignore", category=fxnumeric.FxNumericWarning)``."""
