"""The torchao ``quantize_`` flow: modules keep their class, their weight becomes a tensor subclass.

``quantize_(model, Int8WeightOnlyConfig())`` leaves ``model.fc`` an ``nn.Linear`` whose
``.weight`` is a torchao ``Int8Tensor`` (a ``TorchAOBaseTensor``). The graph is the float
graph, op for op; what differs is the weight, so this flow

* counts a module whose weight is a torchao tensor as quantized (coverage), and so a
  functional op that reads one through a ``get_attr`` (``F.linear(x, self.qkv.weight,
  self.qkv.bias)``, reported under the weight's module; torchvision's Swin passes its
  ``qkv`` and ``proj`` weights to the traced leaf function ``shifted_window_attention``), and
* hands the weight comparison its dequantized form: ``float_w - q_w`` on an ``Int8Tensor``
  raises ``NotImplementedError`` (no ``aten.sub`` for it), ``q_w.dequantize()`` does not.

Its QAT flow, ``quantize_(model, QATConfig(base_config, step="prepare"))`` (and the older
``IntXQuantizationAwareTrainingConfig``), swaps each ``nn.Linear`` for a
``FakeQuantizedLinear`` (each ``nn.Embedding`` for a ``FakeQuantizedEmbedding``) whose
``forward`` fake-quantizes its input (``activation_fake_quantizer``) and its weight
(``weight_fake_quantizer``), then calls ``F.linear``. Such a layer is the one op it replaced,
computed in (fake-)quantized form, so this flow

* keeps it whole when tracing (traced through, its fake-quantize code is several ops that
  pair with nothing: every Linear of a Llama was left unpaired),
* counts it as quantized while one of its fake-quantizers is enabled, and
* hands the weight comparison the weight it computes with, ``weight_fake_quantizer(weight)``
  (its stored weight is the float one being trained).

torchao is never imported here: a torchao tensor can only exist if the user imported torchao,
so the check looks the base class up in ``sys.modules``.
"""

from __future__ import annotations

import copy
import inspect
import re
import sys
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._tensors import stores_floats
from . import Flow, WeightGrid, per_input_channel
from .fx import functional_weight, weight_owner

__all__ = ["TorchaoFlow", "is_torchao_tensor", "holds_torchao_tensors", "is_qat_layer",
           "export_loses", "quantized_paths", "quantized_weights", "per_row_setting"]

# torchao's QAT layers, by the module that defines them; the legacy quantizers' layers
# (Int8DynActInt4WeightQATLinear, Int4WeightOnlyQATEmbedding ...) subclass them
_QAT_LAYERS = (("torchao.quantization.qat.linear", "FakeQuantizedLinear"),
               ("torchao.quantization.qat.embedding", "FakeQuantizedEmbedding"))


def is_torchao_tensor(value: Any) -> bool:
    """Whether ``value`` is a torchao tensor subclass (``Int8Tensor``, ``Int4Tensor`` ...)."""
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None) if utils is not None else None
    return base is not None and isinstance(value, base)


def holds_torchao_tensors(model: Any) -> bool:
    """Whether ``model`` (an ``nn.Module``) has a parameter that is a torchao tensor."""
    return isinstance(model, nn.Module) and any(is_torchao_tensor(_inner(p))
                                                for p in model.parameters())


def is_qat_layer(module: Any) -> bool:
    """Whether ``module`` is one of torchao's QAT layers (``FakeQuantizedLinear``,
    ``FakeQuantizedEmbedding`` or a subclass), whatever its fake-quantizers' state."""
    types = tuple(cls for cls in (getattr(sys.modules.get(where), name, None)
                                  for where, name in _QAT_LAYERS) if isinstance(cls, type))
    return bool(types) and isinstance(module, types)


def export_loses(model: Any) -> str | None:
    """Why ``torch.export`` would lose the layers of torchao's that ``model`` holds, as a note
    for the report, or ``None``: its graph would hold ops no float op pairs with, so both
    models are traced with torch.fx instead."""
    if holds_torchao_tensors(model):
        return ("torch.export turns torchao's quantized weights into integer ops (`_int_mm`, "
                "`access_subclass_inner_tensor`) that no float op pairs with: both models "
                "traced with torch.fx instead")
    if isinstance(model, nn.Module) and any(map(is_qat_layer, model.modules())):
        return ("torch.export traces torchao's QAT layers (`FakeQuantizedLinear`) into the "
                "arithmetic of their fake-quantizers, which no float op pairs with: both "
                "models traced with torch.fx instead")
    return None


def _acts(quantizer: Any) -> bool:
    """Whether a QAT layer's fake-quantizer (``None`` where the config has none) changes
    what it reads: torchao's ``disable_linear_fake_quant`` clears ``enabled``."""
    return isinstance(quantizer, nn.Module) and bool(getattr(quantizer, "enabled", True))


class TorchaoFlow(Flow):
    """Models quantized in place by ``torchao.quantization.quantize_``, or prepared for QAT
    by it (``QATConfig(step="prepare")``)."""

    name = "torchao"

    def is_leaf_module(self, module: nn.Module) -> bool:
        return is_qat_layer(module)

    def export_loses(self, model: Any) -> str | None:
        return export_loses(model)

    def is_quantized_module(self, module: nn.Module) -> bool:
        if "torchao.utils" not in sys.modules:
            return False  # no torchao tensor can exist before torchao is imported
        if is_qat_layer(module):
            return (_acts(getattr(module, "activation_fake_quantizer", None))
                    or _acts(getattr(module, "weight_fake_quantizer", None)))
        return any(is_torchao_tensor(_inner(p)) for p in module.parameters(recurse=False))

    def computed_weight(self, module: nn.Module) -> torch.Tensor | None:
        """A QAT layer's fake-quantized weight, ``weight_fake_quantizer(weight)``, computed by
        a copy of the fake-quantizer: calling it stores the scales it chose on it."""
        quantizer = getattr(module, "weight_fake_quantizer", None)
        if not is_qat_layer(module) or not _acts(quantizer):
            return None
        with torch.no_grad():
            return copy.deepcopy(quantizer)(module.weight.detach()).detach()

    def is_quantized(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """A functional op that reads a torchao weight through a ``get_attr``."""
        if node.op != "call_function" or "torchao.utils" not in sys.modules:
            return False
        return any(is_torchao_tensor(_inner(_attribute(i, modules)))
                   for i in node.all_input_nodes if i.op == "get_attr")

    def layer_name(self, node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
        """A functional op reading a torchao weight (``F.linear(x, self.qkv.weight)``) is
        reported under the module that owns the weight (``qkv``): the path ``quantize_``
        quantized and an ``FqnToConfig`` names, not the node's ``linear``. Its nodes keep
        their own names, which the float graph shares, for pairing."""
        weight = functional_weight(node) if "torchao.utils" in sys.modules else None
        if weight is None or not is_torchao_tensor(_inner(_attribute(weight, modules))):
            return None
        return weight_owner(node)

    def dynamic_input(self, module: nn.Module) -> tuple[Any, ...] | None:
        """How a torchao layer rounds its input inside the op, read from its weight tensor.

        * ``Int8Tensor`` with ``act_quant_kwargs`` (``Int8DynamicActivationInt8WeightConfig``):
          per call, each token (``PerRow``) or the whole tensor symmetric int8: ``("token",
          255)`` / ``("tensor-symmetric", 255)``, 255 steps over ``±max|x|``; asymmetric:
          ``("token-range", 255)`` / ``("tensor", 255)``, over ``[min(x, 0), max(x, 0)]``.
        * the same with ``act_quant_scale`` set (``Int8StaticActivationInt8WeightConfig``): a
          fixed grid, ``("fixed", step, low, high)`` (values outside ``[low, high]`` clip);
          ``None`` for a scale per row (no one grid to read).
        * ``IntxUnpackedToInt8Tensor`` with ``activation_quantization`` ``int8_asym_per_token``
          (``Int8DynamicActivationIntxWeightConfig``): ``("token-range", 255)``.

        What is rounded is the input times the weight's ``act_pre_scale`` (SmoothQuant, AWQ:
        :meth:`input_scale`)."""
        weight = _inner(getattr(module, "weight", None))
        if not is_torchao_tensor(weight) or stores_floats(weight):
            return None  # float8 activations (with float8 weights) are no uniform grid either
        scheme = getattr(weight, "activation_quantization", None)
        if scheme is not None:
            if str(getattr(scheme, "value", scheme)) == "int8_asym_per_token":
                return ("token-range", 255.0)
            return None  # a scheme this does not know: no input term, not a wrong one
        kwargs = getattr(weight, "act_quant_kwargs", None)
        if kwargs is None:
            return None
        mapping = getattr(getattr(kwargs, "mapping_type", None), "name", "SYMMETRIC")
        symmetric = mapping == "SYMMETRIC"
        levels = 127.0 if getattr(kwargs, "reduce_range", False) else 255.0
        static = getattr(weight, "act_quant_scale", None)
        if isinstance(static, torch.Tensor):
            if static.numel() != 1:
                return None
            step = float(static)
            zero = getattr(weight, "act_quant_zero_point", None)
            zero = int(zero) if isinstance(zero, torch.Tensor) and zero.numel() == 1 else 0
            qmin, qmax = (-64, 63) if levels == 127.0 else (-128, 127)
            return ("fixed", step, (qmin - zero - 0.5) * step, (qmax - zero + 0.5) * step)
        per_token = type(getattr(kwargs, "granularity", None)).__name__ == "PerRow"
        if symmetric:
            return ("token" if per_token else "tensor-symmetric", levels)
        return ("token-range" if per_token else "tensor", levels)

    def input_scale(self, module: nn.Module) -> torch.Tensor | None:
        """The weight's ``act_pre_scale`` (SmoothQuant, AWQ), flat, per input channel (or one
        value): the op multiplies its input by it before rounding it, its stored weight holds
        the float weight divided by it."""
        return _pre_scale(_inner(getattr(module, "weight", None)))

    def weight_grid(self, weight: Any) -> WeightGrid | None:
        """The grid of a torchao weight, from its ``scale``: one step (``[1, 1]``,
        ``PerTensor``), one per row (``[N, 1]``, ``PerRow``) or a row of group steps per row
        (``[N, K / group]``, ``PerGroup``); its integer range from ``target_dtype``
        (``IntxUnpackedToInt8Tensor``'s ``torch.int4``), else from ``qdata``'s dtype where it
        holds one integer per weight (``Int8Tensor``), else 4 bits for the packed ``Int4*``
        tensors. ``None`` for float8 values or a tensor of no such ``scale``."""
        weight = _inner(weight)  # through torchao's activation logger
        if not is_torchao_tensor(weight) or stores_floats(weight) or weight.dim() < 1:
            return None
        scale, bits = getattr(weight, "scale", None), _bits(weight)
        if not isinstance(scale, torch.Tensor) or bits is None:
            return None
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1  # only their span is used
        scales, channels = scale.detach().double(), weight.shape[0]
        if scales.numel() == 1:
            return WeightGrid(scales.reshape(1), qmin, qmax)
        if scales.dim() == 2 and scales.shape[0] != channels and scales.shape[1] == channels:
            scales = scales.t()  # kept (groups, rows)
        if scales.shape[0] != channels:
            return None
        scales = scales.reshape(channels, -1)
        return WeightGrid(scales[:, 0] if scales.shape[1] == 1 else scales, qmin, qmax, axis=0)

    def stored_weight(self, weight: Any) -> Any:
        inner = _inner(weight)
        return inner if inner is not weight else None

    def comparable_weight(self, weight: Any) -> torch.Tensor | None:
        """The weight the op multiplies its (unscaled) input by, in float: the dequantized
        tensor times its ``act_pre_scale`` per input channel (SmoothQuant and AWQ store
        ``W / act_pre_scale``, then scale the input: their raw ``dequantize()`` read -14.6 dB
        against the float weight on a layer whose effective weight reads 37.5 dB). A wrapper
        (torchao's activation logger, ``ActivationLoggingTensor``) is read through to the
        tensor it wraps."""
        inner = _inner(weight)
        if not is_torchao_tensor(inner):
            # a wrapper around a plain tensor: that tensor (the logger's ops unwrap it anyway)
            return inner.detach() if inner is not weight and isinstance(inner, torch.Tensor) \
                else None
        # in float32 where the tensor can: int8 kernels scale in the output (mm(x, qdata) *
        # scale), so rounding each weight to a bfloat16 model's dtype first reads an error
        # the model never makes (0.8 dB lower weight SQNR on int8 per-row weights)
        if "output_dtype" in inspect.signature(inner.dequantize).parameters:
            values = inner.dequantize(output_dtype=torch.float32).detach()
        else:
            values = inner.dequantize().detach().float()
        pre = _pre_scale(inner)
        return values if pre is None else values * per_input_channel(pre, values)


_WRAPPED = "original_weight_tensor"
"""Where a wrapper tensor keeps the weight it wraps (torchao's ``ActivationLoggingTensor``)."""


def _inner(weight: Any) -> Any:
    """The tensor a wrapper tensor wraps (through several), else ``weight``."""
    for _ in range(8):  # a wrapper of a wrapper ...; a cycle would be a bug, not a loop
        inner = getattr(weight, _WRAPPED, None) if type(weight) not in (torch.Tensor,
                                                                        nn.Parameter) else None
        if not isinstance(inner, torch.Tensor):
            return weight
        weight = inner
    return weight


def _pre_scale(weight: Any) -> torch.Tensor | None:
    """A torchao weight's ``act_pre_scale``, flat in float32, or ``None``."""
    scale = getattr(weight, "act_pre_scale", None) if is_torchao_tensor(weight) else None
    return scale.detach().reshape(-1).float() if isinstance(scale, torch.Tensor) else None


def _bits(weight: Any) -> int | None:
    """How many bits a torchao weight's integers have (see :meth:`TorchaoFlow.weight_grid`)."""
    stored = getattr(weight, "qdata", None)
    dtype = getattr(weight, "target_dtype", None)
    if dtype is None and isinstance(stored, torch.Tensor) and stored.numel() == weight.numel():
        dtype = stored.dtype  # one integer per weight, not packed
    found = re.fullmatch(r"torch\.u?int(\d+)", str(dtype))
    if found:
        return int(found[1])
    return 4 if type(weight).__name__.startswith("Int4") else None


def per_row_setting(weight: Any) -> str:
    """The ``quantize_`` config that quantizes a weight like ``weight`` (a torchao tensor) per
    row, as a line: ``Int8DynamicActivationInt8WeightConfig(granularity=PerRow())`` for an
    ``Int8Tensor`` that quantizes its input too, ``Int8WeightOnlyConfig(...)`` for one that
    does not; the config's ``granularity`` in general."""
    if type(weight).__name__ == "Int8Tensor":
        config = ("Int8DynamicActivationInt8WeightConfig"
                  if getattr(weight, "act_quant_kwargs", None) is not None
                  else "Int8WeightOnlyConfig")
        return (f"{config}(granularity=PerRow()), the config's default (PerRow from "
                "torchao.quantization.granularity)")
    return ("the config's granularity=PerRow() or PerGroup(group_size) in place of PerTensor() "
            "(torchao.quantization.granularity)")


def _attribute(node: fx.Node, modules: dict[str, nn.Module]) -> Any:
    """The value a ``get_attr`` node reads, or ``None`` when its owner is not in ``modules``."""
    owner, _, name = str(node.target).rpartition(".")
    module = modules.get(owner)
    return getattr(module, name, None) if module is not None else None


def quantized_paths(model: Any) -> tuple[str, ...]:
    """Module paths of every module ``quantize_`` quantized (or prepared for QAT) in ``model``.

    Read from the modules as they are, not from a rule such as "every ``nn.Linear``": the
    ``filter_fn`` that made ``model`` may have left some float (a tied ``lm_head``,
    :func:`fxnumeric.models.untied_linears`), and a line rebuilding the model must leave them
    float too.
    """
    if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        return ()
    flow = TorchaoFlow()
    return tuple(path for path, module in model.named_modules()
                 if flow.is_quantized_module(module))


def quantized_weights(model: Any) -> tuple[tuple[str, str], ...]:
    """``(parameter path, kind)`` of every weight ``quantize_`` quantized in ``model`` (a QAT
    layer's ``weight``, which it fake-quantizes), in module order.

    ``kind`` says how the weight was quantized, as read from it: its tensor type, element
    type, blocks and activation scheme (``"Int8Tensor int8, per row"``,
    ``"IntxUnpackedToInt8Tensor int2, groups of 16"``). Weights one config made share one kind;
    weights of different kinds came from different configs (an ``FqnToConfig`` mixing them),
    so one ``config`` cannot rebuild them. A block covering a whole dimension (per row) counts
    as any block of that size, so one ``PerGroup(32)`` config reads the same on a layer 32
    wide (its block the whole row) and one 64 wide.
    """
    if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        return ()
    found: list[tuple[str, tuple[Any, ...], tuple[tuple[int, bool], ...], Any]] = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        if is_qat_layer(module):
            if TorchaoFlow().is_quantized_module(module):
                key = tuple(_no_address(repr(getattr(module, name, None)))
                            if _acts(getattr(module, name, None)) else None
                            for name in ("activation_fake_quantizer", "weight_fake_quantizer"))
                found.append((f"{prefix}weight", ("qat", key), (), module))
            continue
        for name, weight in module.named_parameters(recurse=False):
            weight = _inner(weight)  # through torchao's activation logger
            if is_torchao_tensor(weight):
                found.append((f"{prefix}{name}", _weight_key(weight), _blocks(weight), weight))
    groups: list[list[int]] = []  # indices into found, one list per kind
    for i, (_, key, blocks, _) in enumerate(found):
        for group in groups:
            if all(found[j][1] == key and _same_blocks(found[j][2], blocks) for j in group):
                group.append(i)
                break
        else:
            groups.append([i])
    kinds: dict[int, str] = {}
    seen: dict[str, int] = {}
    for group in groups:
        text = _describe([found[j] for j in group])
        seen[text] = seen.get(text, 0) + 1
        text += f" (kind {seen[text]})" if seen[text] > 1 else ""
        kinds.update((j, text) for j in group)
    return tuple((path, kinds[i]) for i, (path, *_) in enumerate(found))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _no_address(text: str) -> str:
    """``text`` without object addresses, which differ between layers of one config."""
    return _ADDRESS.sub("", text)


def _weight_key(weight: Any) -> tuple[Any, ...]:
    """What a torchao weight's config decides, but its blocks: its type, the element types of
    its tensors (which it holds: a zero point, a static activation scale), its attributes."""
    cls = type(weight)
    tensors = (*getattr(cls, "tensor_data_names", ()),
               *(getattr(cls, "optional_tensor_data_names", None) or ()))
    attributes = (*getattr(cls, "tensor_attribute_names", ()),
                  *(getattr(cls, "optional_tensor_attribute_names", None) or ()))
    return (cls.__name__,
            tuple((name, getattr(getattr(weight, name, None), "dtype", None)) for name in tensors),
            tuple((name, _no_address(repr(getattr(weight, name, None))))
                  for name in attributes if name != "block_size"))


def _blocks(weight: Any) -> tuple[tuple[int, bool], ...]:
    """``(block size, whether it is the whole dimension)`` per dimension of ``weight``."""
    block = getattr(weight, "block_size", None)
    if block is None:
        return ()
    return tuple((int(b), int(b) == int(s)) for b, s in zip(block, weight.shape, strict=False))


def _same_blocks(a: tuple[tuple[int, bool], ...], b: tuple[tuple[int, bool], ...]) -> bool:
    """Whether one granularity makes both blocks: the same size, or both whole dimensions."""
    return len(a) == len(b) and all(sa == sb or (wa and wb)
                                    for (sa, wa), (sb, wb) in zip(a, b, strict=True))


def _describe(members: list[tuple[str, Any, tuple[tuple[int, bool], ...], Any]]) -> str:
    """One kind of weight in words: ``"Int8Tensor int8, per row, dynamic activations"``."""
    _, key, _, first = members[0]
    if key[0] == "qat":
        quantizers = [f"{role} {_quantizer_text(q)}"
                      for role, q in (("activation", getattr(first, "activation_fake_quantizer",
                                                             None)),  # none on an Embedding
                                      ("weight", first.weight_fake_quantizer)) if _acts(q)]
        return f"{type(first).__name__}: " + "; ".join(quantizers)
    element = getattr(first, "target_dtype", None) or getattr(getattr(first, "qdata", None),
                                                              "dtype", None)
    text = f"{type(first).__name__} {str(element).removeprefix('torch.')}"
    dims = [None if all(m[2][d][1] for m in members) else members[0][2][d][0]
            for d in range(len(members[0][2]))]
    if dims:
        text += {(1, None): ", per row", (None, None): ", per tensor"}.get(
            tuple(dims), f", groups of {dims[-1]}" if dims[0] == 1 and len(dims) == 2
            else f", blocks {tuple('all' if d is None else d for d in dims)}")
    if getattr(first, "act_pre_scale", None) is not None:
        text += ", input pre-scaled per channel (calibrated: SmoothQuant/AWQ)"
    if getattr(first, "act_quant_scale", None) is not None:
        text += ", static activation scale"
    elif getattr(first, "act_quant_kwargs", None) is not None:
        text += ", dynamic activations"
    if getattr(first, "activation_quantization", None):
        text += f", activations {first.activation_quantization}"
    return text


def _quantizer_text(quantizer: nn.Module) -> str:
    """A QAT fake-quantizer's config in short (``"int4 PerGroup(group_size=32)"``), or in full
    when it has no element type and granularity."""
    config = getattr(quantizer, "config", quantizer)
    dtype, granularity = getattr(config, "dtype", None), getattr(config, "granularity", None)
    if dtype is None or granularity is None:
        return _no_address(repr(config))
    return f"{str(dtype).removeprefix('torch.')} {granularity!r}"
