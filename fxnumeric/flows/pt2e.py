"""The pt2e flow: ``torch.export`` graphs quantized by ``prepare_pt2e`` / ``convert_pt2e``.

What its graphs look like (resnet18's stem, XNNPACK symmetric quantizer)::

    float (export(model).module()):   x -> conv2d -> batch_norm -> relu_ -> max_pool2d
                                           ^ get_attr conv1_weight

    quantized (convert_pt2e):         x -> quantize -> dequantize -> conv2d -> relu_
                                           -> quantize -> dequantize -> max_pool2d ...
                                                   ^ dequantize(get_attr _frozen_param0)

ATen ops are the same kinds as the torch functions they come from (:data:`ATEN_KINDS`);
``quantize_*`` / ``dequantize_*`` ops (``quantized_decomposed`` and torchao's own,
:data:`QDQ_ROLES`) are quantize roles or plumbing; the quantized conv absorbed the BatchNorm, so
the matcher pairs ``(conv2d, batch_norm)`` with ``conv2d`` as it does for any BN-folded conv.
An op counts as quantized when it reads a dequantized (or, in a ``prepare_pt2e`` model,
observed) value. Before conversion, an enabled fake-quant of an activation (a
``prepare_qat_pt2e`` model's ``call_module`` of torchao's own classes) is a quantize role, as
the quantize/dequantize ``convert_pt2e`` replaces it with: the model input's gets a row and a
layer's output fake-quant is read as part of the layer; observers pass values through.
Pairs are named by module path from ``nn_module_stack``.

:func:`fxnumeric.models.quantize_pt2e` builds such a pair from an ``nn.Module`` (what
``fxnumeric report --quant pt2e`` runs).
"""

from __future__ import annotations

import functools
import importlib
import operator
import weakref
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..optypes import DEQUANTIZE, PLUMBING, QUANTIZE, OpClass
from . import BatchNormParams, Flow, fake_quant_enabled, op_name

__all__ = ["Pt2eFlow", "ATEN_KINDS", "QDQ_ROLES", "annotated", "quantized_edge",
           "output_wanted", "input_wanted", "pattern_anchor"]

# --- q/dq ops: (namespace, op name) -> role. "quantize" ops become optional (paired when both
# sides have one, else transparent); "dequantize" and "qparams" ops are plumbing.
QDQ_ROLES: dict[tuple[str, str], str] = {
    **{("quantized_decomposed", f"quantize_per_{g}"): "quantize"
       for g in ("tensor", "channel", "token", "channel_group")},
    **{("quantized_decomposed", f"dequantize_per_{g}"): "dequantize"
       for g in ("tensor", "channel", "token", "channel_group")},
    ("quantized_decomposed", "choose_qparams"): "qparams",
    ("quantized_decomposed", "choose_qparams_symmetric"): "qparams",
    ("quantized_decomposed", "choose_qparams_per_token_asymmetric"): "qparams",
    ("quantized_decomposed", "fake_quant_per_channel"): "dequantize",
    ("torchao", "quantize_affine"): "quantize",
    ("torchao", "quantize_affine_float8_non_decomposed"): "quantize",
    ("torchao", "dequantize_affine"): "dequantize",
    ("torchao", "dequantize_affine_float8_non_decomposed"): "dequantize",
    ("torchao", "choose_qparams_affine"): "qparams",
}

# --- ATen ops (overload packet name, in-place ``_`` stripped) whose kind is not their name.
# Everything else keeps its name (``conv2d``, ``linear``, ``max_pool2d``, ``add``), which is what
# the torch functions and modules of the float model are called too.
ATEN_KINDS: dict[str, tuple[str, ...]] = {
    "_native_batch_norm_legit_no_training": ("batch_norm",),
    "_native_batch_norm_legit": ("batch_norm",),
    "native_batch_norm": ("batch_norm",),
    "native_layer_norm": ("layer_norm",),
    "max_pool2d_with_indices": ("max_pool2d",),
    "_adaptive_avg_pool2d": ("adaptive_avg_pool2d",),
    "_softmax": ("softmax",),
    "_log_softmax": ("log_softmax",),
    "view": ("reshape",),
    "_unsafe_view": ("reshape",),
    "mm": ("matmul",),
    "bmm": ("matmul",),
    "mul": ("mul",),
    "div": ("div",),
    "sub": ("sub",),
    "concat": ("cat",),
    # `x[:, 0]` and `x[:, 1:]` as torch.export writes them: the float model's getitem, indexed
    # alike (:func:`fxnumeric.ops.index_of`)
    "select": ("getitem",),
    "slice": ("getitem",),
}
# ATen ops that only move, copy or check a value: transparent.
ATEN_PLUMBING = frozenset(
    {"detach", "clone", "contiguous", "alias", "_assert_tensor_metadata", "_to_copy", "to",
     "dropout", "lift_fresh_copy", "_assert_async", "sym_constrain_range_for_size"}
)
# ATen ops with several outputs of which getitem 0 is "the" result (the others are saved
# statistics or indices): that getitem is plumbing, so BN folding sees conv2d -> batch_norm.
ATEN_MULTI_OUTPUT = frozenset(
    {"_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
     "native_layer_norm", "max_pool2d_with_indices"}
)
# QAT conv-bn simulation (prepare_qat_pt2e): the conv reads ``weight * bn_scale`` (computed
# from constants, so plumbing) and its output is divided by that scale again (and the conv bias
# added) before the BatchNorm. Those ops restore the conv's own value: they get the optional
# role, like a quantize of the conv's output (transparent for pairing, and the conv's value is
# read after them), and the weight is compared with the scale divided back out.
_QAT_UNSCALE = frozenset({"div", "add"})
_WEIGHTED = frozenset({"conv1d", "conv2d", "conv3d", "linear", "conv_transpose1d",
                       "conv_transpose2d", "conv_transpose3d"})
# Argument positions of a BatchNorm's constants: (weight, bias, running_mean, running_var, eps).
_BATCH_NORM_ARGS: dict[str, tuple[int, int, int, int, int]] = {
    "batch_norm": (1, 2, 3, 4, 7),
    "_native_batch_norm_legit_no_training": (1, 2, 3, 4, 6),
    "native_batch_norm": (1, 2, 3, 4, 7),
}
# Which argument of a weighted ATen op is its weight.
_WEIGHT_ARG: dict[str, int] = {
    **{f"conv{n}d": 1 for n in (1, 2, 3)},
    **{f"conv_transpose{n}d": 1 for n in (1, 2, 3)},
    "linear": 1,
    "embedding": 0,
}
# torch.nn modules that export to one op: ops inside them are named by the module path alone.
_ONE_OP_MODULES = frozenset(
    {"Linear", "Bilinear", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "LayerNorm", "GroupNorm",
     "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "Embedding", "ReLU", "ReLU6",
     "Hardtanh", "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "GELU", "SiLU", "Mish",
     "LeakyReLU", "ELU", "PReLU", "Softmax", "LogSoftmax", "Flatten", "Dropout", "Identity",
     "Upsample"}
    | {f"{k}{n}d" for k in ("Conv", "ConvTranspose", "MaxPool", "AvgPool", "AdaptiveAvgPool",
                           "AdaptiveMaxPool") for n in (1, 2, 3)}
)
_GUARDS = "_guards_fn"
QAT_UNSCALE = OpClass(("qat_unscale",), "optional")


def _qdq_role(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    op = op_name(node.target)
    return QDQ_ROLES.get(op) if op is not None else None


# --- whose q/dq an edge is. prepare_pt2e observes an edge ``X -> C`` when the quantizer
# annotated X's output or C's input (its ``quantization_annotation``, which convert_pt2e leaves
# in each node's meta): X86InductorQuantizer annotates a Linear's input, not the output of the
# op before it. Re-quantized with a layer's annotations gone, the edges only that layer asked
# for are float; a hybrid that keeps the layer float drops them too (fxnumeric.advice.hybrid).


def _annotation(node: fx.Node) -> Any:
    return node.meta.get("quantization_annotation")


def annotated(graph: fx.Graph) -> bool:
    """Whether ``graph`` carries a pt2e quantizer's annotations (a ``convert_pt2e`` graph)."""
    return any(_annotation(n) is not None for n in graph.nodes)


def quantized_edge(dequantize: fx.Node) -> fx.Node | None:
    """``X`` when ``dequantize`` ends a ``X -> quantize -> dequantize`` edge of the dataflow
    (not a weight's: X is computed, not a constant); else ``None``."""
    if _qdq_role(dequantize) != "dequantize" or not dequantize.args:
        return None
    quantize = dequantize.args[0]
    if not isinstance(quantize, fx.Node) or _qdq_role(quantize) != "quantize":
        return None
    value = quantize.args[0] if quantize.args else None
    return value if isinstance(value, fx.Node) and value.op != "get_attr" else None


def output_wanted(node: fx.Node) -> bool:
    """Whether the quantizer asked for ``node``'s output to be quantized: its annotation
    says so, or the op its fused pattern ended in is gone (:func:`_pattern_end_gone`)."""
    found = _annotation(node)
    if found is None:
        return False
    return getattr(found, "output_qspec", None) is not None or _pattern_end_gone(node)


def _pattern_end_gone(node: fx.Node) -> bool:
    """Whether ``node`` is a conv whose fused pattern ended in a BatchNorm ``convert_pt2e``
    folded away, and its output is quantized.

    ``prepare_qat_pt2e`` annotates conv-bn with the conv's inputs on the conv and the output
    on the BatchNorm, then rewrites the pattern: the conv reads ``weight * bn_scale``, which
    its annotation names as its weight. Converted, the BatchNorm is folded into the conv,
    whose value is the pattern's: a quantize reading it directly is the pattern's own (the
    BatchNorm's annotation is gone with it). A conv-bn-relu's conv is read by its ``relu``,
    which carries the output annotation itself; an op whose output the quantizer left alone
    for its reader to quantize (X86InductorQuantizer's Linear before a Linear) read its
    weight as it is, so keeps ``False``.
    """
    found = _annotation(node)
    specs = getattr(found, "input_qspec_map", None) or {}
    if (getattr(found, "_is_output_of_quantized_pattern", True) is False
            or not any(_is_scaled_weight(key) and spec is not None
                       for key, spec in specs.items())):
        return False
    read = {_carried(arg).name for arg in _inputs_in_order(node)}
    return (not any(_is_scaled_weight(key) and key.name in read for key in specs)
            and any(_qdq_role(user) == "quantize" for user in node.users))


def _is_scaled_weight(key: Any) -> bool:
    """Whether annotation key ``key`` is ``mul(weight, scale)`` (a QAT conv-bn's weight)."""
    return (isinstance(key, fx.Node) and key.op == "call_function"
            and op_name(key.target) == ("aten", "mul") and bool(key.args)
            and isinstance(key.args[0], fx.Node) and key.args[0].op == "get_attr")


def input_wanted(consumer: fx.Node, value: fx.Node) -> bool:
    """Whether the quantizer asked for ``consumer``'s input ``value`` to be quantized.

    The annotation names each input by its node; matched by name, which a copied graph
    keeps. A graph rewritten after annotating keeps annotations that name nodes it no longer
    has: ``prepare_qat_pt2e``'s conv-bn rewrite replaces the ``batch_norm`` a residual
    ``add``'s annotation names (keys ``relu``, ``batch_norm_3``; the add reads ``relu`` and
    the new conv's output). Such a stale key is the input at its place in the annotation
    when the keys line up with the consumer's inputs (as many, every other key at its own
    input); else the converted graph itself tells: the input was asked for when a stale key
    asks for something and ``value`` reaches ``consumer`` through a quantize/dequantize.
    Read by name alone, ``input_wanted(add, conv)`` was false there, and a hybrid keeping
    the conv float dropped the quantize the add asked for (28.64 dB against 28.34 dB).
    """
    found = _annotation(consumer)
    specs: dict[Any, Any] = dict(getattr(found, "input_qspec_map", None) or {})
    if not specs:
        return False
    for key, spec in specs.items():
        if getattr(key, "name", None) == value.name:
            return spec is not None
    args = _inputs_in_order(consumer)
    read = [_carried(arg) for arg in args]
    names = {node.name for node in read}
    stale = {id(key) for key in specs if getattr(key, "name", None) not in names}
    if not stale or value not in read:
        return False
    keys = list(specs)
    if len(keys) == len(read):
        placed = list(zip(keys, read, strict=True))
        if all(id(key) in stale or key.name == node.name for key, node in placed):
            return any(node is value and id(key) in stale and specs[key] is not None
                       for key, node in placed)
    return (any(specs[key] is not None for key in keys if id(key) in stale)
            and any(quantized_edge(arg) is value for arg in args))


def _inputs_in_order(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` reads, in argument order, a node read twice twice."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _carried(node: fx.Node) -> fx.Node:
    """The value ``node`` carries: ``X`` for the dequantize of ``X -> quantize -> dequantize``,
    else ``node`` itself."""
    value = quantized_edge(node)
    return value if value is not None else node


def pattern_anchor(node: fx.Node) -> fx.Node:
    """The first op of the fused pattern ``node``'s annotation belongs to (``node`` itself
    when it is annotated alone).

    X86InductorQuantizer annotates a fused pattern node by node: for conv + add (+ relu) the
    conv's input and weight on the conv, the residual input on the add, and it marks every
    node but the last as not the pattern's output (``_is_output_of_quantized_pattern``). The
    add's annotation is there only because the conv is quantized: with the conv left float
    by name (``set_module_name_qconfig``) the whole pattern is float and the add reads the
    residual unquantized. A node is inside the pattern of the input it extends: an annotated
    op whose only reader it is and whose annotation quantizes an input but says its output
    is not the pattern's. Quantizers that do not mark their patterns (XNNPACK's annotations
    carry no such flag) annotate each node on its own here.
    """
    while True:
        inner = next((i for i in node.all_input_nodes if _pattern_goes_on(i, node)), None)
        if inner is None:
            return node
        node = inner


def _pattern_goes_on(node: fx.Node, reader: fx.Node) -> bool:
    """Whether ``node``'s annotation is of a fused pattern that goes on in ``reader``."""
    found = _annotation(node)
    specs = getattr(found, "input_qspec_map", None) or {}
    return (getattr(found, "_is_output_of_quantized_pattern", True) is False
            and any(spec is not None for spec in specs.values())
            and list(node.users) == [reader])


def _is_transparent_module(module: nn.Module) -> bool:
    """torchao's pt2e observers and fake-quants (their own class tree, not torch.ao's)."""
    return _derives_from(type(module), ("ObserverBase", "FakeQuantizeBase"))


def _fake_quantizes(module: nn.Module) -> bool:
    """Whether ``module`` is a torchao pt2e fake-quant that is on: it changes the values it
    passes (its ``fake_quant_enabled`` flag, cleared by ``disable_fake_quant``)."""
    return _derives_from(type(module), ("FakeQuantizeBase",)) and fake_quant_enabled(module)


@functools.cache
def _derives_from(cls: type, base_names: tuple[str, ...]) -> bool:
    """Whether ``cls`` derives from a torchao class named in ``base_names``."""
    return any(
        klass.__name__ in base_names and klass.__module__.startswith("torchao.")
        for klass in cls.__mro__
    )


def _is_observer_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and _is_transparent_module(modules[node.target])


def _reads_constant(node: fx.Node) -> bool:
    """Whether ``node``'s first input is a constant (a weight), not an activation."""
    first = node.args[0] if node.args else None
    return isinstance(first, fx.Node) and first.op == "get_attr"


def _aten_class(node: fx.Node, name: str) -> OpClass:
    base = name.rstrip("_") if name not in ATEN_KINDS else name
    if base in ATEN_PLUMBING:
        return PLUMBING
    if base == "hardtanh" and tuple(node.args[1:3]) == (0.0, 6.0):
        return OpClass(("relu6",))
    if base == "convolution":
        return _convolution_class(node)
    return OpClass(ATEN_KINDS.get(base, (base,)))


def _convolution_class(node: fx.Node) -> OpClass:
    """``aten.convolution`` (after decompositions): conv{1,2,3}d or conv_transpose{1,2,3}d."""
    weight = node.args[1] if len(node.args) > 1 else None
    val = weight.meta.get("val") if isinstance(weight, fx.Node) else None
    if val is None:
        return OpClass(("convolution",))
    transposed = bool(node.args[6]) if len(node.args) > 6 else False
    return OpClass((f"conv{'_transpose' if transposed else ''}{val.dim() - 2}d",))


class Pt2eFlow(Flow):
    """``torch.export`` graphs and their ``prepare_pt2e`` / ``convert_pt2e`` forms."""

    name = "pt2e"

    def __init__(self) -> None:
        # per-node answers of _is_constant; weak, so graphs are not kept alive
        self._constant: weakref.WeakKeyDictionary[fx.Node, bool] = weakref.WeakKeyDictionary()
        self._annotated: weakref.WeakKeyDictionary[fx.Graph, bool] = weakref.WeakKeyDictionary()

    def normalise_model(self, model: Any, which: str) -> nn.Module | None:
        """An ``ExportedProgram`` is read as its ``.module()`` (a new GraphModule)."""
        if isinstance(model, torch.export.ExportedProgram):
            return model.module()
        return None

    def classify(self, node: fx.Node, modules: dict[str, nn.Module]) -> OpClass | None:
        if node.op == "call_module":
            # _guards_fn checks input shapes for torch.export and computes nothing compared:
            # plumbing, so it is never a layer (copying the graph to erase it cost 87% of
            # match() on mobilenet_v2)
            if node.target == _GUARDS:
                return PLUMBING
            module = modules[node.target]
            if not _is_transparent_module(module):
                return None
            # a fake-quant on an activation (prepare_qat_pt2e) quantizes it as convert_pt2e's
            # quantize/dequantize will: the same role, so the model input's gets a row
            # (x.quantize) and a layer's output fake-quant is read as part of the layer.
            # Observers, fake-quants switched off and a weight's fake-quant (part of the
            # weight) pass the value through.
            read = node.all_input_nodes
            if _fake_quantizes(module) and read and not self._is_constant(read[0], modules):
                return QUANTIZE
            return PLUMBING
        if node.op != "call_function":
            return None
        if node.target is operator.getitem:
            source = node.args[0]
            if isinstance(source, fx.Node) and source.op == "call_function":
                op = op_name(source.target)
                if op is not None and (
                    (op[0] == "aten" and op[1] in ATEN_MULTI_OUTPUT and node.args[1] == 0)
                    or QDQ_ROLES.get(op) == "qparams"
                ):
                    return PLUMBING
            return None
        op = op_name(node.target)
        if op is None:
            return None
        role = QDQ_ROLES.get(op)
        if role == "quantize":
            # quantizing a weight is part of the weight, not a step of the dataflow
            return PLUMBING if _reads_constant(node) else QUANTIZE
        if role == "dequantize":
            return DEQUANTIZE
        if role is not None:
            return PLUMBING
        if op[0] == "aten":
            if self._is_constant(node, modules):
                return PLUMBING
            if _undoes_qat_scale(node, op[1], self, modules):
                return QAT_UNSCALE
            return _aten_class(node, op[1])
        return None

    def _is_constant(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """Whether ``node`` is computed from graph constants alone (a weight's expression)."""
        known = self._constant.get(node)
        if known is None:
            known = self._constant[node] = _computes_constant(node, self, modules)
        return known

    def rounding_owner(self, value: fx.Node, reader: fx.Node) -> fx.Node | None:
        """Read from the quantizer's annotations a ``convert_pt2e`` graph keeps
        (:func:`output_wanted`, :func:`input_wanted`, :func:`pattern_anchor`): X86's Linear
        asks for its input to be quantized, so the quantize after a GELU in front of it is the
        Linear's. ``None`` for a graph without annotations, or an edge no annotation explains."""
        graph = value.graph
        if graph not in self._annotated:
            self._annotated[graph] = annotated(graph)
        if not self._annotated[graph]:
            return None
        if output_wanted(value):
            return pattern_anchor(value)
        return pattern_anchor(reader) if input_wanted(reader, value) else None

    def is_quantized(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """An op that reads a dequantized value (or, before convert, an observed one), or
        whose output is quantized (observed): a ``relu_`` fused after its conv reads the conv's
        float result, but runs in the same quantized kernel."""
        if node.op != "call_function" or op_name(node.target) is None:
            return False  # not an exported graph's op
        for i in node.all_input_nodes:
            if _qdq_role(i) == "dequantize" or _is_observer_call(i, modules):
                return True
        return any(_qdq_role(u) == "quantize" or _is_observer_call(u, modules)
                   for u in node.users)

    def module_type(self, node: fx.Node) -> type | None:
        """The ``torch.nn`` one-op module (``Conv2d``, ``ReLU`` ...) in ``nn_module_stack``."""
        found = _innermost_module(node)
        if found is None or found[1] == _OWNER or not _is_one_op_module(found[1]):
            return None
        return _type_named(found[1])

    def traced_type(self, model: Any) -> type | None:
        """The class torch.export traced: the outermost entry (path ``""``) of the
        ``nn_module_stack`` its ops record, kept by ``.module()``, ``prepare_pt2e`` and
        ``convert_pt2e``. ``None`` for a graph that does not record it (torch.fx's
        ``symbolic_trace`` records submodules only) or whose class cannot be imported here
        (a program loaded without the library that defined it)."""
        graph = getattr(model, "graph", None)
        if not isinstance(model, (torch.export.ExportedProgram, fx.GraphModule)) or graph is None:
            return None
        for node in graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if stack:
                path, module_type = next(iter(stack.values()))
                return _type_named(module_type) if path == "" else None
        return None

    def scope(self, node: fx.Node) -> str | None:
        """The innermost module path of the node's ``nn_module_stack``."""
        found = _innermost_module(node)
        return str(found[0]) or None if found is not None else None

    def failure_hint(self, exc: BaseException) -> str | None:
        """A ``torch.export`` graph's input guard rejected the batch's shapes."""
        message = str(exc)
        if isinstance(exc, AssertionError) and message.startswith("Guard failed"):
            return ("It is a torch.export graph (capture='export', pt2e), specialised to the "
                    "shapes it was exported with: give every batch those shapes.")
        return None

    def pair_name(self, node: fx.Node) -> str | None:
        """The module path from ``nn_module_stack``: ``layer1.0.conv1`` for the conv of that
        ``Conv2d``; for an op a bigger module computes itself, that module's path and the op's
        kind, as users name it (``layer1.0.add``, not the node's ``add__1``; the matcher numbers
        further call sites ``layer1.0.add#2``)."""
        found = _innermost_module(node)
        if found is None:
            return None
        path, module_type = found
        if module_type == _OWNER or _is_one_op_module(module_type):
            return path
        kind = _op_kind(node)
        return f"{path}.{kind}" if path else kind

    def weight_input(self, node: fx.Node, kind: str) -> fx.Node | None:
        if node.op != "call_function" or (op_name(node.target) or ("",))[0] != "aten":
            return None
        position = _WEIGHT_ARG.get(kind)
        if position is None or len(node.args) <= position:
            return None
        weight = node.args[position]
        return weight if isinstance(weight, fx.Node) else None

    def recurrent_weight_inputs(self, node: fx.Node) -> list[fx.Node] | None:
        """An ``aten.lstm``/``gru``/``rnn_*``'s ``params`` list, an ``aten.*_cell``'s ``w_ih,
        w_hh, b_ih, b_hh``: read by their schema's argument names, so that every overload
        (``lstm.input``, ``lstm.data`` with the parameters one place later) is found alike."""
        target = node.target if node.op == "call_function" else None
        if not isinstance(target, torch._ops.OpOverload) or op_name(target)[0] != "aten":
            return None
        values = {arg.name: (node.args[i] if i < len(node.args) else node.kwargs.get(arg.name))
                  for i, arg in enumerate(target._schema.arguments)}
        if isinstance(values.get("params"), (list, tuple)):
            found = list(values["params"])
        elif "w_ih" in values and "w_hh" in values:
            found = [values[name] for name in ("w_ih", "w_hh", "b_ih", "b_hh")
                     if values.get(name) is not None]
        else:
            return None
        return found if all(isinstance(n, fx.Node) for n in found) else None

    def weight_scale(self, node: fx.Node, kind: str) -> fx.Node | None:
        """The BN scale a QAT conv's weight was multiplied by (``weight * scale`` feeding its
        fake-quant), reshaped like the weight: the weight is compared divided by it."""
        weight = self.weight_input(node, kind)
        while weight is not None and weight.op == "call_module" and weight.args:
            weight = weight.args[0] if isinstance(weight.args[0], fx.Node) else None
        if weight is None or weight.op != "call_function" or op_name(weight.target) != (
                "aten", "mul"):
            return None
        scale = weight.args[1]
        return scale if isinstance(scale, fx.Node) and scale.op == "call_function" else None

    def batch_norm_params(self, node: fx.Node, gm: fx.GraphModule) -> BatchNormParams | None:
        if node.op == "call_function" and node.target is operator.getitem:
            node = node.args[0]  # type: ignore[assignment]
        op = op_name(node.target) if node.op == "call_function" else None
        if op is None or op[0] != "aten" or op[1] not in _BATCH_NORM_ARGS:
            return None
        w, b, mean, var, eps = (_arg(node, i) for i in _BATCH_NORM_ARGS[op[1]])
        mean_t, var_t = _constant(mean, gm), _constant(var, gm)
        if mean_t is None or var_t is None:
            return None
        return BatchNormParams(_constant(w, gm), _constant(b, gm), mean_t, var_t, float(eps))


def _computes_constant(node: fx.Node, flow: Pt2eFlow, modules: dict[str, nn.Module]) -> bool:
    if node.op == "get_attr":
        return True
    inputs = node.all_input_nodes
    if node.op == "call_module":  # an observer or fake-quant on a weight
        return (node.target != _GUARDS and _is_transparent_module(modules[node.target])
                and bool(inputs) and flow._is_constant(inputs[0], modules))
    if node.op != "call_function":
        return False
    # an ATen op reading no input at all (arange, ones: position ids, default masks) is a
    # constant too: convert_pt2e folds such subgraphs into one
    op = op_name(node.target)
    return op is not None and op[0] == "aten" and all(flow._is_constant(i, modules) for i in inputs)


def _undoes_qat_scale(node: fx.Node, name: str, flow: Pt2eFlow,
                      modules: dict[str, nn.Module]) -> bool:
    """``div(conv_out, scale)`` / ``add(that, bias)`` of a QAT conv-bn (see ``_QAT_UNSCALE``)."""
    if name not in _QAT_UNSCALE or len(node.args) < 2:
        return False
    data, other = node.args[0], node.args[1]
    if not (isinstance(data, fx.Node) and isinstance(other, fx.Node)
            and flow._is_constant(other, modules)):
        return False
    while (data.op == "call_function" and (op_name(data.target) or ("", ""))[1] in _QAT_UNSCALE
           and data.args and isinstance(data.args[0], fx.Node)):
        data = data.args[0]  # div then add: walk back to the conv
    op = op_name(data.target) if data.op == "call_function" else None
    # only a conv whose weight was multiplied by a scale (the QAT pattern), so that a model's
    # own `linear(x) + constant` stays an ordinary add
    return op is not None and op[1] in _WEIGHTED and flow.weight_scale(data, op[1]) is not None


_OWNER = "<owner of its parameters>"
"""The module type :func:`_innermost_module` gives for a module found by the constants an op
reads: named by its path alone, as a one-op module is."""


def _innermost_module(node: fx.Node) -> tuple[str, Any] | None:
    """``(path, type or type name)`` of the module an ATen op of an exported graph ran in.

    torchao's pattern rewrites (``prepare_qat_pt2e``'s conv-bn, ``move_exported_model_to_eval``
    swapping a BatchNorm for its eval form) put the ops they create inside a
    ``WrapperModule`` at the root, or leave them no ``nn_module_stack`` at all: such an op
    reading parameters or buffers of one module (a BatchNorm's ``bn2.weight``,
    ``bn2.running_mean``) ran in that module, named by its path (``bn2``, :data:`_OWNER`);
    another has none (``None``). Named by the wrapper, two BatchNorms were ``batch_norm``
    and ``batch_norm#2``, call sites of one layer that ``sensitivity`` and ``advise``
    swapped together as ``bn1``.
    """
    if node.op != "call_function" or (op_name(node.target) or ("",))[0] != "aten":
        return None
    stack = node.meta.get("nn_module_stack")
    found = tuple(list(stack.values())[-1]) if stack else None
    if found is None or _is_pattern_wrapper(found[1]):
        # no module to name it by: the node's own name, never the wrapper's root path and the
        # op's kind, which would make distinct ops call sites of one (``batch_norm#2``)
        owner = _constants_owner(node)
        return (owner, _OWNER) if owner is not None else None
    return found  # type: ignore[return-value]


def _is_pattern_wrapper(module_type: Any) -> bool:
    """torch.ao's or torchao's ``export_utils.WrapperModule``, around a pattern rewrite."""
    name = module_type if isinstance(module_type, str) else (
        f"{module_type.__module__}.{module_type.__qualname__}")
    return name.endswith("export_utils.WrapperModule")


def _constants_owner(node: fx.Node) -> str | None:
    """The path of the one module whose parameters or buffers ``node`` reads (``get_attr``
    arguments ``bn2.weight``, ``bn2.running_var``), else ``None``."""
    owners = {str(arg.target).rpartition(".")[0] for arg in _inputs_in_order(node)
              if arg.op == "get_attr"}
    return owners.pop() or None if len(owners) == 1 else None


def _type_named(module_type: Any) -> type | None:
    """The class an ``nn_module_stack`` entry names (a class, or its qualified name), or
    ``None`` when it cannot be imported."""
    if isinstance(module_type, type):
        return module_type
    module_name, _, class_name = str(module_type).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), class_name, None)
    except (ImportError, ValueError):  # loaded where the library that defined it is missing
        return None
    return found if isinstance(found, type) else None


def _op_kind(node: fx.Node) -> str:
    """The kind an ATen op is reported as: ``add`` for ``aten.add_.Tensor``."""
    name = (op_name(node.target) or ("", node.name))[1]
    base = name.rstrip("_") if name not in ATEN_KINDS else name
    return ATEN_KINDS.get(base, (base,))[0]


def _is_one_op_module(module_type: Any) -> bool:
    name = module_type if isinstance(module_type, str) else (
        f"{module_type.__module__}.{module_type.__qualname__}")
    return name.startswith("torch.nn.") and name.rsplit(".", 1)[-1] in _ONE_OP_MODULES


def _arg(node: fx.Node, i: int) -> Any:
    return node.args[i] if len(node.args) > i else None


def _constant(node: Any, gm: fx.GraphModule) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value.detach() if isinstance(value, torch.Tensor) else None
