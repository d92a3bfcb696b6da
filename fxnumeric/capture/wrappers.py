"""Models that wrap the model to compare: what fxnumeric reads instead.

``torch.compile(model)`` returns an ``OptimizedModule`` that holds ``model`` as
``_orig_mod``, and ``nn.DataParallel`` / ``DistributedDataParallel`` hold it as ``.module``:
the same parameters, called through a wrapper whose ``forward`` (compiled code, or a
scatter over devices) torch.fx cannot read. Like accelerate's
``extract_model_from_parallel`` and transformers' ``unwrap_model``, fxnumeric compares the
module inside (its numbers are the plain model's) and says so in a capture note. A
TorchScript module (``torch.jit.script`` / ``torch.jit.trace``) holds no Python ``forward``
to trace nor hooks to observe: it is refused with the fix.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .. import flows
from ..errors import InputError

__all__ = ["unwrap", "wrapped_at", "model_to_compare"]


def _compiled_type() -> type | None:
    # torch.compile's wrapper exists only once torch._dynamo is imported: never import it here
    # (a second of startup), an OptimizedModule cannot exist before
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def _inner(model: Any) -> tuple[Any, str] | None:
    """``(the module model wraps, how to reach it)``, or ``None`` for a model that is not a
    wrapper."""
    compiled = _compiled_type()
    if compiled is not None and isinstance(model, compiled):
        return model._orig_mod, "_orig_mod"
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return model.module, "module"
    return None


def _taken(model: Any) -> tuple[Any, list[tuple[str, str]]]:
    """The module inside every wrapper of ``model``, and ``(wrapper type, attribute)`` of
    each wrapper taken off, outermost first."""
    taken: list[tuple[str, str]] = []
    while (found := _inner(model)) is not None:
        name = type(model).__name__
        taken.append((f"torch.compile's {name}" if found[1] == "_orig_mod" else name,
                      found[1]))
        model = found[0]
    return model, taken


def wrapped_at(model: Any) -> str | None:
    """Where the module a wrapper holds is (``"_orig_mod"``, ``"module._orig_mod"``), or
    ``None`` when ``model`` is no wrapper."""
    _, taken = _taken(model)
    return ".".join(attr for _, attr in taken) or None


def unwrap(model: Any, which: str) -> tuple[Any, str | None]:
    """The model to compare for ``model`` (``which``: ``"float"`` or ``"quantized"``) and a
    note saying what was unwrapped (``None`` when nothing was).

    Wrappers nest (``torch.compile(nn.DataParallel(m))``): each is taken off in turn. The
    user's model is not modified.

    Raises:
        InputError: ``model`` is (or wraps) a TorchScript module.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> inner, note = unwrap(torch.nn.DataParallel(m), "float")
        >>> inner is m, note.split(":")[0]
        (True, 'wrapped in DataParallel')
    """
    model, taken = _taken(model)
    if isinstance(model, torch.jit.ScriptModule):
        made = "torch.jit.trace" if isinstance(model, torch.jit.TopLevelTracedModule) else (
            "torch.jit.script")
        raise InputError(
            f"the {which} model is a TorchScript {type(model).__name__} (made by {made}): "
            "fxnumeric traces the Python forward of an nn.Module and observes its layers, and "
            "a ScriptModule has neither to give.\nFix: pass the nn.Module you scripted or "
            "traced (compare it before torch.jit, or load its state_dict into the Python "
            "model)")
    if not taken:
        return model, None
    what = " in ".join(name for name, _ in taken)
    path = ".".join(attr for _, attr in taken)
    return model, (f"wrapped in {what}: compared the module it wraps (`model.{path}`), "
                   "whose parameters it shares")


def model_to_compare(model: Any, which: str) -> Any:
    """The model compared for ``model`` when no wrapper note is wanted: the module a wrapper
    holds (:func:`unwrap`), as its flow normalises it (an ``ExportedProgram``'s module,
    :func:`fxnumeric.flows.normalise_model`)."""
    return flows.normalise_model(unwrap(model, which)[0], which)

