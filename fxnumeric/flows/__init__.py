"""Quantization flows: what each flow's graphs look like, kept in one place per flow.

The shared stages (``trace``/``match``, ``ops.classify``, ``weights``) know nothing about any
particular flow. Where a flow's graphs need knowledge of their own, a stage asks every
:class:`Flow` in :data:`FLOWS` through one of the hooks below and takes the first answer that is
not ``None``. Adding a flow is then one new module here and one entry in :data:`FLOWS`.

==========================  ==================================  ===============================
hook                        called by                           answers
==========================  ==================================  ===============================
``normalise_model``         capture, before tracing             the model to trace instead
``is_leaf_module``          the tracer                          whether a module is kept whole
``classify``                :func:`fxnumeric.ops.classify`      an :class:`~fxnumeric.ops.OpClass`
``is_quantized``            :func:`fxnumeric.ops.classify`      whether an op counts as quantized
``is_quantized_module``     ``ops.is_quantized_module``         whether a module counts as quantized
``pair_name``               the matcher                         the name a pair is reported as
``scope``                   advice (what a flow configures)     the module path an op ran in
``failure_hint``            :mod:`fxnumeric.run`                why a model rejected a batch
``dynamic_input``           :mod:`fxnumeric.floor`              how an op quantizes its input
``input_scale``             :mod:`fxnumeric.floor`              a factor on the input before it
``module_type``             the eager layer (stub selection)    the module class an op came from
``traced_type``             :mod:`fxnumeric.llm_metrics`        the class a graph was traced from
``weight_input``            :mod:`fxnumeric.weights`            the node feeding an op's weight
``weight_scale``            :mod:`fxnumeric.weights`            a scale folded into that weight
``batch_norm_params``       :mod:`fxnumeric.weights`            a BatchNorm node's constants
``comparable_weight``       :mod:`fxnumeric.weights`            a plain float tensor for a weight
``weight_grid``             :mod:`fxnumeric.weights`, ``floor``  the grid of a weight in its form
``stored_weight``           :mod:`fxnumeric.floor`              the tensor a wrapper weight wraps
``computed_weight``         :mod:`fxnumeric.weights`            the weight a module computes with
``export_loses``            ``match(..., capture="export")``    why torch.export would lose a model
``rounding_owner``          ``match.Region.rounded_for``        whose request a quantize is
==========================  ==================================  ===============================

Flows shipped: :mod:`fxnumeric.flows.pt2e` (``torch.export`` graphs, ``prepare_pt2e`` /
``convert_pt2e``), :mod:`fxnumeric.flows.torchao` (``torchao.quantization.quantize_``) and
:mod:`fxnumeric.flows.fx` (torch.fx's own metadata).
Neither imports ``torchao`` unless a torchao object is already in the user's hands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from ..optypes import OpClass

__all__ = [
    "Flow", "BatchNormParams", "FLOWS", "normalise_model", "is_leaf_module", "classify",
    "is_quantized", "is_quantized_module",
    "pair_name", "layer_name", "op_name", "scope", "failure_hint", "dynamic_input",
    "input_scale", "per_input_channel",
    "module_type", "weight_input", "recurrent_weight_inputs",
    "weight_scale",
    "batch_norm_params", "comparable_weight", "weight_grid", "WeightGrid",
    "stored_weight", "computed_weight",
    "export_loses",
    "fake_quant_enabled", "fake_quantizes", "rounding_owner",
]


@dataclass(frozen=True)
class BatchNormParams:
    """The constants of an inference BatchNorm: what folding it into a conv or linear needs."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor
    running_var: torch.Tensor
    eps: float


@dataclass(frozen=True)
class WeightGrid:
    """The grid a quantized weight was quantized on: its steps and its integer range.

    ``scales`` holds one step for the whole tensor (``axis`` ``None``), one per channel along
    ``axis``, or, for group-wise scales, one row of group steps per channel along ``axis``
    (shape ``(channels, groups)``: torchao's ``PerGroup``)."""

    scales: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None
    """The axis of the channels, ``None`` for one scale for the whole tensor."""

    @property
    def per_channel(self) -> bool:
        """Whether the steps differ by channel (per channel or per group), not one for all."""
        return self.axis is not None


class Flow:
    """A quantization flow's knowledge, as hooks; every hook returns ``None`` for "not mine".

    Subclass it, override the hooks your flow needs, and add an instance to :data:`FLOWS`.
    """

    name = "flow"

    def normalise_model(self, model: Any, which: str) -> nn.Module | None:
        """Called as ``normalise_model(model, "float" | "quantized")`` before tracing; return
        the ``nn.Module`` to trace instead (never modify ``model``), or ``None``."""
        return None

    def is_leaf_module(self, module: nn.Module) -> bool:
        """Whether tracing must call ``module`` whole: a layer of this flow whose ``forward``
        computes one op in its own form (torchao's QAT ``FakeQuantizedLinear``: fake-quantize
        the input and the weight, then ``F.linear``), to pair with the float layer it
        replaced. Traced through, it is several ops that pair with nothing."""
        return False

    def classify(self, node: fx.Node, modules: dict[str, nn.Module]) -> OpClass | None:
        """What ``node`` computes (for ops of this flow), or ``None`` to leave it to the tables."""
        return None

    def is_quantized(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """Whether ``node`` (a pairable op) computes in quantized form under this flow."""
        return False

    def is_quantized_module(self, module: nn.Module) -> bool:
        """Whether ``module``, paired whole (a module-tree leaf), computes in quantized form."""
        return False

    def pair_name(self, node: fx.Node) -> str | None:
        """The user-facing name of the op at ``node`` (a module path), or ``None``."""
        return None

    def layer_name(self, node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
        """The name a pair whose quantized chain holds ``node`` is reported under, when it
        is not the op's own (:meth:`pair_name`, which pairing also matches names by), or
        ``None``."""
        return None

    def scope(self, node: fx.Node) -> str | None:
        """The path of the innermost module whose ``forward`` computed the functional op at
        ``node`` (``layer1.0.conv1`` for an exported conv), or ``None``."""
        return None

    def failure_hint(self, exc: BaseException) -> str | None:
        """A sentence on why a model of this flow rejected a batch with ``exc``, or ``None``."""
        return None

    def dynamic_input(self, module: nn.Module) -> tuple[Any, ...] | None:
        """How ``module`` rounds its float input inside the op: per call, ``(granularity,
        levels)``, the input's range over that many steps, where ``granularity`` is
        ``"tensor"`` (the whole input, ``[min(x, 0), max(x, 0)]``), ``"tensor-symmetric"``
        (``±max|x|``), ``"token"`` (each token, ``±max|x|``) or ``"token-range"`` (each
        token, ``[min(x, 0), max(x, 0)]``); or on a grid fixed when it was quantized,
        ``("fixed", step, low, high)`` (values outside ``[low, high]`` clip); else ``None``."""
        return None

    def input_scale(self, module: nn.Module) -> torch.Tensor | None:
        """A factor (flat: one per input channel, or one value) that ``module`` multiplies its
        input by inside the op, before rounding it, its stored weight divided by it
        (torchao's ``act_pre_scale``: SmoothQuant, AWQ), or ``None``."""
        return None

    def module_type(self, node: fx.Node) -> type | None:
        """The ``nn.Module`` class whose forward computed the functional op at ``node`` (for
        selections by module type, such as ``compare_model_stub``'s), or ``None``."""
        return None

    def traced_type(self, model: Any) -> type | None:
        """The class of the module a graph model of this flow was traced from (an
        ``ExportedProgram`` of a ``BertForMaskedLM``: that class), when the graph records it,
        or ``None``. What tells a language model's kind (next-token or not) once its own
        methods are gone."""
        return None

    def weight_input(self, node: fx.Node, kind: str) -> fx.Node | None:
        """The input node carrying the weight of a functional op of ``kind``, or ``None``."""
        return None

    def recurrent_weight_inputs(self, node: fx.Node) -> list[fx.Node] | None:
        """The nodes feeding the parameters of a functional recurrent op, in torch's flat
        order (per layer and direction: ``w_ih, w_hh``, then the biases), or ``None``."""
        return None

    def weight_scale(self, node: fx.Node, kind: str) -> fx.Node | None:
        """A constant the op's weight was multiplied by before quantization (a QAT conv's BN
        scale), to divide back out before comparing, or ``None``."""
        return None

    def batch_norm_params(self, node: fx.Node, gm: fx.GraphModule) -> BatchNormParams | None:
        """The constants of a functional BatchNorm ``node`` in ``gm``, or ``None``."""
        return None

    def comparable_weight(self, weight: Any) -> torch.Tensor | None:
        """A plain float tensor for a weight this flow stores in its own form, or ``None``."""
        return None

    def weight_grid(self, weight: Any) -> WeightGrid | None:
        """The grid of a weight this flow stores in its own form (a torchao ``Int8Tensor``:
        its ``scale``, per tensor, per row or per group, and its integer range), or ``None``
        (not this flow's, or no uniform integer grid: float8 values)."""
        return None

    def stored_weight(self, weight: Any) -> Any:
        """The tensor holding ``weight``'s quantized form (its scales) when ``weight`` wraps
        it (torchao's activation logger, ``ActivationLoggingTensor``), or ``None``."""
        return None

    def computed_weight(self, module: nn.Module) -> torch.Tensor | None:
        """The weight ``module`` computes with where that is not its stored ``weight`` (a QAT
        layer's fake-quantized weight: the stored one is the float weight being trained), as
        a plain float tensor, or ``None``. Computing it must leave ``module`` unchanged."""
        return None

    def export_loses(self, model: Any) -> str | None:
        """Why ``capture="export"`` must not export ``model`` (one side, as the user passed
        it): its exported graph would hold this flow's modules as arithmetic that no float op
        pairs with, where torch.fx keeps them whole. A note for the report (ending in what is
        done instead: both models are traced with torch.fx), or ``None``."""
        return None

    def rounding_owner(self, value: fx.Node, reader: fx.Node) -> fx.Node | None:
        """The op whose request the quantize between the op ``value`` and its ``reader`` is
        (``value -> quantize -> dequantize -> reader``): ``value`` when its op asked for its
        output to be quantized; ``reader``, or the first op of the fused pattern ``reader``
        belongs to, when only the reader asked for its input to be (re-quantized with that op
        left float, the edge goes; with ``value``'s op left float, it stays). ``None``: the
        graph does not say (a flow whose quantized ops quantize their own outputs, as
        ``convert_fx``'s do, and whose quantizes carry no annotation)."""
        return None


def op_name(target: Any) -> tuple[str, str] | None:
    """``(namespace, name)`` of an ATen/custom op target (packet or overload: ``("aten",
    "conv2d")``, ``("quantized", "linear")``), else ``None``."""
    if isinstance(target, torch._ops.OpOverload):
        target = target._overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        namespace, _, name = target._qualified_op_name.partition("::")
        return namespace, name
    return None


def fake_quantizes(module: nn.Module | None) -> bool:
    """Whether ``module`` is a torch.ao fake-quant that is on (:func:`fake_quant_enabled`): it
    changes the values it passes (a ``prepare_qat_fx`` model's, or a ``prepare_fx`` one's
    whose qconfig fake-quantizes)."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    return isinstance(module, FakeQuantizeBase) and fake_quant_enabled(module)


def fake_quant_enabled(module: nn.Module) -> bool:
    """Whether the fake-quant ``module`` (torch.ao's or torchao's) changes the values it passes:
    its ``fake_quant_enabled`` flag, which ``disable_fake_quant`` clears (a fake-quant without
    the flag always quantizes). Switched off, it passes its input through, as an observer."""
    enabled = getattr(module, "fake_quant_enabled", None)
    return enabled is None or bool(enabled[0])


def per_input_channel(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An :func:`input_scale` (flat, or one value) shaped to multiply ``weight`` (out, in,
    ...) per input channel."""
    if scale.numel() == 1:
        return scale.reshape(())
    return scale.reshape(1, -1, *([1] * (weight.dim() - 2))).to(weight.device)


def _flows() -> tuple[Flow, ...]:
    from .fx import FxFlow
    from .pt2e import Pt2eFlow
    from .torchao import TorchaoFlow

    # torch.fx last: it answers for any traced node, the others for their own graphs only
    return (Pt2eFlow(), TorchaoFlow(), FxFlow())


FLOWS: tuple[Flow, ...] = _flows()
"""The flows every stage consults, in order."""


def _first(hook: str, *args: Any) -> Any:
    """The first flow's answer to ``hook(*args)`` that is not ``None``, else ``None``."""
    for flow in FLOWS:
        found = getattr(flow, hook)(*args)
        if found is not None:
            return found
    return None


def normalise_model(model: Any, which: str) -> Any:
    """The model to trace for ``model``: the first flow's answer, else ``model`` itself."""
    found = _first("normalise_model", model, which)
    return model if found is None else found


def is_leaf_module(module: nn.Module) -> bool:
    """Whether any flow keeps ``module`` whole when tracing."""
    return any(flow.is_leaf_module(module) for flow in FLOWS)


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> OpClass | None:
    """The first flow's classification of ``node``, or ``None``."""
    return _first("classify", node, modules)


def is_quantized(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether any flow counts the op at ``node`` as quantized."""
    return any(flow.is_quantized(node, modules) for flow in FLOWS)


def is_quantized_module(module: nn.Module) -> bool:
    """Whether any flow counts ``module`` (paired whole) as quantized."""
    return any(flow.is_quantized_module(module) for flow in FLOWS)


def pair_name(node: fx.Node) -> str | None:
    """The first flow's name for the op at ``node``, or ``None``."""
    return _first("pair_name", node)


def layer_name(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The first flow's report name for a pair whose quantized chain holds ``node``."""
    return _first("layer_name", node, modules)


def scope(node: fx.Node) -> str | None:
    """The first flow's module path for the op at ``node``, or ``None``."""
    return _first("scope", node)


def failure_hint(exc: BaseException) -> str | None:
    """The first flow's explanation of a model rejecting a batch with ``exc``, or ``None``."""
    return _first("failure_hint", exc)


def dynamic_input(module: nn.Module) -> tuple[Any, ...] | None:
    """The first flow's answer to how ``module`` rounds its input inside the op, or ``None``
    (:meth:`Flow.dynamic_input`)."""
    return _first("dynamic_input", module)


def input_scale(module: nn.Module) -> torch.Tensor | None:
    """The first flow's factor on ``module``'s input inside the op, or ``None``
    (:meth:`Flow.input_scale`)."""
    return _first("input_scale", module)


def module_type(node: fx.Node) -> type | None:
    """The first flow's module class for the functional op at ``node``, or ``None``."""
    return _first("module_type", node)


def traced_type(model: Any) -> type | None:
    """The first flow's class of the module ``model`` (a graph) was traced from, or ``None``."""
    return _first("traced_type", model)


def weight_input(node: fx.Node, kind: str) -> fx.Node | None:
    """The node feeding the weight of the functional op ``node`` of ``kind``, or ``None``."""
    return _first("weight_input", node, kind)


def recurrent_weight_inputs(node: fx.Node) -> list[fx.Node] | None:
    """The nodes feeding the parameters of the functional recurrent op ``node`` (an exported
    ``aten.lstm``, ``aten.gru_cell``), in torch's flat order, or ``None``."""
    return _first("recurrent_weight_inputs", node)


def weight_scale(node: fx.Node, kind: str) -> fx.Node | None:
    """The node of a scale folded into the weight of ``node``, or ``None``."""
    return _first("weight_scale", node, kind)


def batch_norm_params(node: fx.Node, gm: fx.GraphModule) -> BatchNormParams | None:
    """The constants of the functional BatchNorm ``node``, or ``None``."""
    return _first("batch_norm_params", node, gm)


def comparable_weight(weight: Any) -> Any:
    """``weight`` as a tensor the metrics can subtract from a float one.

    torch's quantized tensors stay as they are (the metrics dequantize them); a flow's own
    weight types (torchao tensor subclasses) are dequantized by that flow.
    """
    found = _first("comparable_weight", weight)
    return weight if found is None else found


def weight_grid(weight: Any) -> WeightGrid | None:
    """The first flow's grid of ``weight``, a weight stored in a flow's own form (a torchao
    tensor subclass), or ``None`` (torch's quantized tensors carry theirs: ``q_scale``)."""
    return _first("weight_grid", weight)


def stored_weight(weight: Any) -> Any:
    """The tensor holding ``weight``'s quantized form: the one a wrapper tensor wraps
    (:meth:`Flow.stored_weight`), else ``weight``."""
    found = _first("stored_weight", weight)
    return weight if found is None else found


def export_loses(model: Any) -> str | None:
    """The first flow's reason not to export ``model`` (``capture="export"``), or ``None``."""
    return _first("export_loses", model)


def computed_weight(module: nn.Module) -> torch.Tensor | None:
    """The first flow's answer to the weight ``module`` computes with, when that is not its
    stored ``weight``; ``None`` when it computes with the stored one."""
    return _first("computed_weight", module)


def rounding_owner(value: fx.Node, reader: fx.Node) -> fx.Node | None:
    """The op whose request the quantize between ``value`` and ``reader`` is
    (:meth:`Flow.rounding_owner`); ``None`` when no flow can tell."""
    return _first("rounding_owner", value, reader)
