"""Stage 4, run: feed batches to (instrumented) models, turning input mistakes into clear errors."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["run_model", "as_args", "check_devices"]


def as_args(batch: Any) -> tuple[Any, ...]:
    """A batch as positional arguments: a tuple or list is spread, anything else is one input."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def run_model(model: nn.Module, batch: Any, *, which: str = "model") -> Any:
    """Call ``model`` on one batch under ``torch.no_grad()``.

    Raises:
        InputError: when the model rejects the batch (shape, dtype, device, arity), naming
            the model side and the shapes that were passed.
    """
    args = as_args(batch)
    try:
        with torch.no_grad():
            return model(*args)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as exc:
        shapes = ", ".join(_describe(a) for a in args)
        raise InputError(
            f"the {which} model failed on the input ({shapes}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            "Check the input shape, dtype and device (a batch that is a tuple is passed as "
            "several positional inputs), and that the model runs on it outside fxnumeric."
        ) from exc


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def _devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in (*model.parameters(), *model.buffers())}


def _input_devices(x: Any) -> set[torch.device]:
    if isinstance(x, torch.Tensor):
        return {x.device}
    if isinstance(x, (tuple, list)):
        return set().union(*(_input_devices(v) for v in x)) if x else set()
    if isinstance(x, dict):
        return _input_devices(list(x.values()))
    return set()


def check_devices(float_model: nn.Module, quant_model: nn.Module, batch: Any = None) -> None:
    """Raise :class:`InputError` when the models (or the batch) live on different devices."""
    float_dev, quant_dev = _devices(float_model), _devices(quant_model)
    names = {"float model": float_dev, "quantized model": quant_dev}
    if batch is not None:
        names["input"] = _input_devices(as_args(batch))
    seen = set().union(*names.values())
    if len(seen) > 1:
        where = "; ".join(f"{k} on {', '.join(sorted(str(d) for d in v))}"
                          for k, v in names.items() if v)
        raise InputError(
            f"the models and inputs must be on one device, but the {where}. "
            "Move them first, e.g. float_model.to('cpu') (quantized kernels run on CPU)."
        )
