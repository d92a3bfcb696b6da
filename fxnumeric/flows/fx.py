"""The torch.fx flow: graphs ``torch.fx.symbolic_trace`` (and ``prepare_fx``/``convert_fx``) made.

Their modules are ``call_module`` nodes the op tables read directly; what this flow adds is
where a *functional* op ran: torch.fx records the module stack of every node it traces in
``node.meta["nn_module_stack"]``, so a residual ``operator.add`` inside ``blocks.1`` is known to
belong to ``blocks.1`` (what FX's ``QConfigMapping.set_module_name_object_type_order`` names it
by), and which ``get_attr`` feeds the weight of a functional linear or convolution: a
float model's ``F.linear(x, self.w)``, ``convert_fx``'s ``quantized.linear(x, packed weight,
...)`` (the packed weight is unpacked for the comparison, as torch's FX Numeric Suite reads it).

A ``prepare_qat_fx`` model (or a ``prepare_fx`` one whose qconfig fake-quantizes) quantizes
each activation with a fake-quant ``call_module``, where ``convert_fx`` will put a quantize: an
enabled one reading an activation is a quantize role as that one is, so the model input's gets
the ``x.quantize`` row and a layer's output fake-quant is read as part of the layer, as the
converted model's quantize is. One reading a weight (a functional linear's) is part of the
weight, and one switched off (``disable_fake_quant``) passes values through: plumbing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..optypes import QUANTIZE, OpClass
from . import Flow, fake_quantizes, op_name

__all__ = ["FxFlow", "functional_weight", "weight_owner", "unpacked_weight", "packed_linear_weight"]


class FxFlow(Flow):
    """Graphs traced by torch.fx: the module path a functional op ran in."""

    name = "fx"

    def scope(self, node: fx.Node) -> str | None:
        """The innermost module path of the node's ``nn_module_stack``."""
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        return str(list(stack.values())[-1][0]) or None

    def weight_input(self, node: fx.Node, kind: str) -> fx.Node | None:
        """The ``get_attr`` feeding the weight of a functional linear or convolution."""
        return functional_weight(node)

    def classify(self, node: fx.Node, modules: dict[str, nn.Module]) -> OpClass | None:
        """An enabled torch.ao fake-quant on an activation is a quantize (see the module
        docstring); anything else is left to the op tables (which make fake-quants plumbing)."""
        read = node.all_input_nodes
        if (node.op == "call_module" and fake_quantizes(modules.get(str(node.target)))
                and read and read[0].op != "get_attr"):
            return QUANTIZE
        return None

    def export_loses(self, model: Any) -> str | None:
        """An ``nn.Module`` holding torch.ao fake-quants or observers (eager ``prepare_qat``
        or ``prepare``): torch.export records their arithmetic (``aten.fused_moving_avg_obs_
        fake_quant``, ``aminmax``) where torch.fx keeps each a ``call_module`` this flow reads
        as a quantize. Exported, an eager QAT MLP left its first two layers unpaired, read
        the others before their output fake-quant, and said "nothing was quantized". A
        GraphModule (``prepare_qat_fx``) is not exported: ``capture="export"`` reads it as
        it is."""
        if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
            return None
        found = _observing_modules(model)
        if not found:
            return None
        path, kind = found[0]
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        return (f"torch.export traces torch.ao's fake-quants and observers (`{path}`: {kind}"
                f"{more}; an eager prepare_qat / prepare model) into their arithmetic, which "
                "no float op pairs with: both models traced with torch.fx instead")


def _observing_modules(model: nn.Module) -> list[tuple[str, str]]:
    """``(path, class name)`` of the torch.ao fake-quants and observers in ``model``, the
    outermost only (a ``FakeQuantize`` holds its observer), in registration order."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    found: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if isinstance(module, (FakeQuantizeBase, ObserverBase)) and not any(
                path.startswith(f"{outer}.") for outer, _ in found):
            found.append((path, type(module).__name__))
    return found


_WEIGHTED_FUNCTIONS = frozenset({
    F.linear, F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
})
"""Functional ops whose second argument is the weight (``kwargs["weight"]`` when named)."""

_QUANTIZED_WEIGHTED = frozenset({
    "linear", "linear_relu", "linear_dynamic", "linear_relu_dynamic", "linear_dynamic_fp16",
    "linear_relu_dynamic_fp16", "conv1d", "conv2d", "conv3d", "conv1d_relu", "conv2d_relu",
    "conv3d_relu", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
})
"""``torch.ops.quantized`` ops (what ``convert_fx`` makes of a functional linear or
convolution) whose second argument is the packed weight."""


def _quantized_op(target: Any) -> str | None:
    """``linear`` for ``torch.ops.quantized.linear`` (packet or overload), else ``None``."""
    op = op_name(target)
    return op[1] if op is not None and op[0] == "quantized" else None


def _weighted(target: Any) -> bool:
    return target in _WEIGHTED_FUNCTIONS or _quantized_op(target) in _QUANTIZED_WEIGHTED


def functional_weight(node: fx.Node) -> fx.Node | None:
    """The ``get_attr`` node feeding the weight of a functional linear or convolution
    (``None`` for anything else, or a weight computed in the graph)."""
    if node.op != "call_function" or not _weighted(node.target):
        return None
    weight = node.kwargs.get("weight", node.args[1] if len(node.args) > 1 else None)
    return weight if isinstance(weight, fx.Node) and weight.op == "get_attr" else None


def weight_owner(node: fx.Node) -> str | None:
    """The path (relative to ``node``'s graph) of the module whose weight the functional
    linear or convolution ``node`` reads, else ``None``."""
    weight = functional_weight(node)
    owner = str(weight.target).rpartition(".")[0] if weight is not None else ""
    return owner or None


def packed_linear_weight(packed: Any) -> torch.Tensor:
    """The weight a packed Linear (a ``LinearPackedParamsBase`` script object: a quantized
    Linear's, a dynamic cell's ``_packed_weight_ih``) holds: quantized, or float16 for a
    float16 dynamic one."""
    (weight, _bias), *_ = packed.__getstate__()
    return weight


def unpacked_weight(packed: Any, node: fx.Node) -> torch.Tensor | None:
    """The weight inside the packed parameters the quantized op ``node`` reads, read as
    torch's FX Numeric Suite reads it (quantized; float16 for ``linear_dynamic_fp16``);
    ``None`` for anything else. A 1d convolution is packed as a 2d one (``[out, in, 1, k]``):
    its weight is given the float weight's ``[out, in, k]``."""
    if not isinstance(packed, torch.ScriptObject):
        return None
    kind = packed._type().name()
    if "Conv" in kind:
        weight = packed.unpack()[0]
        op = _quantized_op(node.target) or ""
        one_d = op.startswith(("conv1d", "conv_transpose1d"))
        return weight.squeeze(2) if one_d and weight.dim() == 4 else weight
    if "Linear" in kind:
        return packed_linear_weight(packed)
    return None
