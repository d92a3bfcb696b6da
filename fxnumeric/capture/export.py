"""Capture with ``torch.export``: an ATen graph whose nodes name the user's modules.

``torch.fx`` traces Python symbolically and stops at data-dependent code; ``torch.export``
runs the model on example inputs (fake tensors, ``strict=False``) and records every ATen op
it reaches, with ``nn_module_stack`` metadata naming the module each op ran in. The graph
of ``exported.module()`` is read exactly as a pt2e float graph is
(:mod:`fxnumeric.flows.pt2e`: ATen kinds, ``_guards_fn`` as plumbing, pair names such as
``encoder.layer.0.attention.self.query`` from ``nn_module_stack``), so nothing here knows
about ATen ops: this module only decides which side is exported and says why one is not.

Captures (the ``capture=`` option of :func:`fxnumeric.match`):

* ``"fx"``: torch.fx, and the module tree where torch.fx cannot trace a model whole;
* ``"export"``: torch.export for every side that is an ``nn.Module`` (a GraphModule or an
  ``ExportedProgram`` is read as it is); a side that cannot be exported is traced by
  torch.fx instead, and the reason is kept in ``Matching.capture_notes``; a side whose
  export would lose a flow's modules (torchao's, torch.ao's fake-quants:
  :func:`fxnumeric.flows.export_loses`) is not exported, nor is the other;
* ``"auto"``: torch.fx, except that a float model torch.fx cannot trace whole is exported
  when the quantized model is already a ``torch.export`` graph (pt2e).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError
from ..offload import offloaded_names
from .fx import fixed_arguments

__all__ = [
    "CAPTURES", "ExportFailure", "export_module", "export_side", "auto_exports_float",
    "capture_example",
    "is_export_graph", "check_capture",
]

CAPTURES = ("fx", "export", "auto")


@dataclass(frozen=True)
class ExportFailure:
    """Why ``torch.export`` could not capture one side (``which``: "float" or "quantized")."""

    which: str
    reason: str


def check_capture(capture: str, example_inputs: Any) -> None:
    """Raise :class:`InputError` for an unknown capture or an export without inputs."""
    if capture not in CAPTURES:
        raise InputError(f"unknown capture {capture!r}; choose from {', '.join(CAPTURES)}")
    if capture == "export" and example_inputs is None:
        raise InputError(
            "capture='export' runs torch.export on example inputs, and none were given. Fix: "
            "pass example_inputs= to match() (a tensor, a tuple of positional inputs or a "
            "dict of keyword inputs such as {'input_ids': ids, 'attention_mask': mask})"
        )


def is_export_graph(model: Any) -> bool:
    """Whether ``model`` is a ``torch.export`` graph already (an ExportedProgram, its
    ``.module()``, or a pt2e model made from one): a graph of ATen ops."""
    if isinstance(model, torch.export.ExportedProgram):
        return True
    if not isinstance(model, fx.GraphModule):
        return False
    return any(isinstance(n.target, torch._ops.OpOverload)
               for n in model.graph.nodes if n.op == "call_function")


def export_module(model: nn.Module, example_inputs: Any,
                  which: str) -> fx.GraphModule | ExportFailure:
    """``torch.export.export(model, args, kwargs, strict=False).module()``, or why not.

    ``example_inputs`` is a batch as everywhere in fxnumeric: a tensor, a tuple of positional
    inputs, or a dict of keyword inputs. ``model`` is not modified. The graph is specialised
    to the shapes of ``example_inputs``: batches of other shapes fail its input guards.
    """
    from ..run import as_call

    args, kwargs = as_call(example_inputs)
    try:
        exported = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # torch.export raises many types; all mean "cannot export"
        first = str(exc).splitlines()[0] if str(exc) else ""
        error = f"{type(exc).__name__}: {first}"
        hooked = [path or "<root>" for path, m in model.named_modules() if offloaded_names(m)]
        if hooked:  # its fake tensors meet the hooks' weights: "FakeTensor.__new__() missing"
            more = f" and {len(hooked) - 3} more" if len(hooked) > 3 else ""
            error = (f"accelerate's offload hooks (on `{'`, `'.join(hooked[:3])}`{more}) load "
                     "its weights at each call, which torch.export cannot run through "
                     f"({error}); a model loaded in memory can be exported")
        return ExportFailure(which, (
            f"torch.export could not capture the {which} model ({type(model).__name__}): "
            f"{error}"
        ))
    return exported.module()


def export_side(model: Any, example_inputs: Any, which: str) -> tuple[Any, str | None]:
    """``capture="export"`` for one side: ``(what to pair, why it is not exported or None)``.

    An ``nn.Module`` is exported; a GraphModule (pt2e, ``convert_fx``) is already a graph and
    is read as it is; a module torch.export cannot capture is returned as it is, for torch.fx,
    with torch.export's reason.
    """
    if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        return model, None
    exported = export_module(model, example_inputs, which)
    if isinstance(exported, ExportFailure):
        return model, f"{exported.reason}; traced with torch.fx instead"
    return exported, None


def capture_example(capture: str, example_inputs: Any, float_model: Any,
                    quant_model: Any) -> Any:
    """The example inputs to match this pair on: ``example_inputs`` where the capture needs
    them (``"export"`` always, ``"auto"`` against a pt2e model, whose float side it may
    export, and any capture where they leave out, or give as None, an argument of the float
    model's forward: torch.fx traces the call they make, :func:`fixed_arguments`), else None.
    Callers that run nothing before the user does (the eager API) pass
    :func:`fxnumeric.match` what this returns."""
    from ..run import as_call

    needed = capture == "export" or auto_exports_float(capture, example_inputs, quant_model)
    if not needed and example_inputs is not None and isinstance(float_model, nn.Module):
        needed = bool(fixed_arguments(float_model, *as_call(example_inputs)))
    return example_inputs if needed else None


def auto_exports_float(capture: str, example_inputs: Any, quant_model: Any) -> bool:
    """``capture="auto"``: whether to export a float model torch.fx cannot trace whole.

    Only against a quantized model that is a torch.export graph, which the module tree cannot
    walk (its modules are gone). Not against an ``nn.Module``: its own export (torchao's
    ``quantize_`` computes a Linear as ``_int_mm`` and scale ops) would not pair op for op
    with the float ``linear``, while the module tree pairs it layer by layer.
    """
    return capture == "auto" and example_inputs is not None and is_export_graph(quant_model)
