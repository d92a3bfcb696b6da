"""Op tables: what each graph node *is*, as data the matcher reads.

Every node of a traced graph gets a :class:`OpClass`:

* ``signature``: the sequence of base op kinds it computes. A float ``Conv2d`` is
  ``("conv2d",)``; a fused ``ConvReLU2d`` (float intrinsic, QAT or quantized) is
  ``("conv2d", "relu")``; ``torch.ops.quantized.add_relu`` is ``("add", "relu")``. The matcher
  pairs a chain of float nodes with a chain of quantized nodes when their signatures agree,
  so fusion needs no pattern list of its own: a fused module is simply a longer signature.
* ``role``: ``"op"`` (pairable), ``"plumbing"`` (transparent: Identity, DeQuantStub,
  ``dequantize``, eval-mode dropout, observers, loggers) or ``"optional"`` (quantize: paired
  when both sides have one, otherwise transparent).

The float, QAT, quantized, dynamic and reference forms of a module share a class name
(``Conv2d``, ``LinearReLU``, ``LSTM`` ...), so the module table is keyed by class name and
applies only to classes that live in ``torch.nn`` / ``torch.ao.nn``. Users add their own ops
with :func:`register_op`.
"""

from __future__ import annotations

import functools
import operator
import re
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from . import flows
from .errors import InputError
from .optypes import DEQUANTIZE, PLUMBING, QUANTIZE, ROLES, OpClass
from .storage import dynamic_weight_dtype, is_dynamic_module

__all__ = [
    "OpClass", "classify", "classify_module", "register_op", "unregister_op", "BN_FOLDING_KINDS",
    "is_quantized_module", "in_quantized_package", "is_pure", "PLUMBING", "QUANTIZE",
    "DEQUANTIZE", "dynamic_input", "index_of",
]



# Kinds that absorb a following batch_norm when quantized (BN folding).
BN_FOLDING_KINDS = frozenset(
    {"conv1d", "conv2d", "conv3d", "linear",
     "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
)

# --- modules: class name -> signature. Same name across float/QAT/quantized/dynamic/reference.
_MODULE_SIGNATURES: dict[str, tuple[str, ...]] = {
    "Linear": ("linear",),
    "NonDynamicallyQuantizableLinear": ("linear",),
    "LinearReLU": ("linear", "relu"),
    "LinearBn1d": ("linear", "batch_norm"),
    "LinearLeakyReLU": ("linear", "leaky_relu"),
    "LinearTanh": ("linear", "tanh"),
    "ConvAdd2d": ("conv2d", "add"),
    "ConvAddReLU2d": ("conv2d", "add", "relu"),
    "BatchNorm1d": ("batch_norm",),
    "BatchNorm2d": ("batch_norm",),
    "BatchNorm3d": ("batch_norm",),
    "BNReLU2d": ("batch_norm", "relu"),
    "BNReLU3d": ("batch_norm", "relu"),
    "LayerNorm": ("layer_norm",),
    "GroupNorm": ("group_norm",),
    "InstanceNorm1d": ("instance_norm",),
    "InstanceNorm2d": ("instance_norm",),
    "InstanceNorm3d": ("instance_norm",),
    "Embedding": ("embedding",),
    "EmbeddingBag": ("embedding_bag",),
    "LSTM": ("lstm",),
    "GRU": ("gru",),
    "RNN": ("rnn",),
    "LSTMCell": ("lstm_cell",),
    "GRUCell": ("gru_cell",),
    "RNNCell": ("rnn_cell",),
    "ReLU": ("relu",),
    "ReLU6": ("relu6",),
    "Hardswish": ("hardswish",),
    "Hardsigmoid": ("hardsigmoid",),
    "Hardtanh": ("hardtanh",),
    "Sigmoid": ("sigmoid",),
    "Tanh": ("tanh",),
    "LeakyReLU": ("leaky_relu",),
    "ELU": ("elu",),
    "GELU": ("gelu",),
    "SiLU": ("silu",),
    "Softmax": ("softmax",),
    "PReLU": ("prelu",),
    "Flatten": ("flatten",),
    "Upsample": ("interpolate",),
    "MultiheadAttention": ("multi_head_attention",),
}
for _n in (1, 2, 3):
    _MODULE_SIGNATURES.update(
        {
            f"Conv{_n}d": (f"conv{_n}d",),
            f"ConvTranspose{_n}d": (f"conv_transpose{_n}d",),
            f"ConvReLU{_n}d": (f"conv{_n}d", "relu"),
            f"ConvBn{_n}d": (f"conv{_n}d", "batch_norm"),
            f"ConvBnReLU{_n}d": (f"conv{_n}d", "batch_norm", "relu"),
            f"MaxPool{_n}d": (f"max_pool{_n}d",),
            f"AvgPool{_n}d": (f"avg_pool{_n}d",),
            f"AdaptiveAvgPool{_n}d": (f"adaptive_avg_pool{_n}d",),
            f"AdaptiveMaxPool{_n}d": (f"adaptive_max_pool{_n}d",),
        }
    )

# Layers of other libraries (Hugging Face transformers ...), by the end of their class name:
# the kind users call them by. ``None``: not a layer (a rotary embedding computes the angles of
# positions, not a value of the model's activations).
_FOREIGN_KINDS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("RMSNorm", ("rmsnorm",)),
    ("LayerNorm", ("layer_norm",)),
    ("Conv1D", ("linear",)),  # GPT-2's transposed Linear
    ("RotaryEmbedding", None),
)

_PLUMBING_MODULE_NAMES = frozenset(
    {"Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
     "FeatureAlphaDropout",
     # torchvision's (EfficientNet, ConvNeXt, Swin, MaxViT): a dropout of whole samples, the
     # identity in eval mode, which torch.export (pt2e) leaves out of its graph
     "StochasticDepth"}
)
_DEQUANTIZE_MODULE_NAMES = frozenset({"DeQuantStub", "DeQuantize"})
_QUANTIZE_MODULE_NAMES = frozenset({"QuantStub", "Quantize"})

# --- functions and methods: normalised name -> signature
_NAME_ALIASES: dict[str, tuple[str, ...]] = {
    "iadd": ("add",), "add": ("add",), "radd": ("add",),
    "imul": ("mul",), "mul": ("mul",), "multiply": ("mul",),
    "isub": ("sub",), "subtract": ("sub",),
    "truediv": ("div",), "itruediv": ("div",), "divide": ("div",),
    "concat": ("cat",), "concatenate": ("cat",),
    "view": ("reshape",),
    "matmul": ("matmul",), "bmm": ("matmul",),
    "max_pool2d_with_indices": ("max_pool2d",),
    # `x.select(1, 0)` is `x[:, 0]`, as torch.export writes `x[:, 0]` (:func:`index_of`)
    "select": ("getitem",),
}
_PLUMBING_NAMES = frozenset(
    {"contiguous", "detach", "to", "float", "dropout", "dropout1d", "dropout2d",
     "dropout3d", "alpha_dropout", "feature_alpha_dropout", "identity", "stochastic_depth",
     # torch.fx's guard on an argument fixed to None when a submodule is traced as called
     "_assert_is_none"}
)
_QUANTIZE_NAMES = frozenset(
    {"quantize_per_tensor", "quantize_per_channel", "quantize_per_tensor_dynamic"}
)

# --- user registrations (checked first)
_REGISTERED: dict[Any, OpClass] = {}


def register_op(target: type | Callable | str, signature: str | tuple[str, ...], *,
                role: str = "op") -> None:
    """Tell the matcher what a custom module, function or method computes.

    Args:
        target: a module class, a function (``call_function`` target) or a method name.
        signature: a kind (``"my_gelu"``) or a tuple of kinds for a fused op
            (``("conv2d", "my_act")``). A float op and a quantized op pair when their kinds
            agree; fused ops pair with chains of float ops whose kinds add up to the tuple.
        role: ``"op"``, ``"plumbing"`` (transparent) or ``"optional"`` (like a quantize).

    Example:
        >>> import torch
        >>> class MyAct(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> register_op(MyAct, "my_act")
    """
    if role not in ROLES:
        raise InputError(f"role must be 'op', 'plumbing' or 'optional', got {role!r}")
    sig = (signature,) if isinstance(signature, str) else tuple(signature)
    if not sig or not all(isinstance(s, str) and s for s in sig):
        raise InputError(
            f"signature must be a non-empty string or tuple of strings, got {signature!r}")
    _REGISTERED[target] = OpClass(sig, role)


def unregister_op(target: type | Callable | str) -> None:
    """Forget what :func:`register_op` said about ``target`` (no error if it said nothing)."""
    _REGISTERED.pop(target, None)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _is_torch_class(cls: type) -> bool:
    mod = cls.__module__
    return mod.startswith("torch.nn.") or mod.startswith("torch.ao.nn.")


_QUANTIZED_PREFIXES = (
    "torch.ao.nn.quantized",
    "torch.ao.nn.intrinsic.quantized",
    "torch.nn.quantized",
    "torch.nn.intrinsic.quantized",
)


# float modules defined among the quantized ones: a float model's FloatFunctional computes
# in float (its quantized form is QFunctional), and counting it as quantized refused every
# float model keeping whole a module that holds one (torchvision's QuantizableBasicBlock)
_FLOAT_IN_QUANTIZED_PACKAGE = frozenset({"FloatFunctional", "FXFloatFunctional"})


def in_quantized_package(module: nn.Module) -> bool:
    """Whether ``module``'s class is one of torch's quantized modules (``torch.ao.nn.quantized``
    and the intrinsic ones), by where it is defined; not the float ``FloatFunctional`` kept
    there."""
    cls = type(module)
    return (cls.__module__.startswith(_QUANTIZED_PREFIXES)
            and cls.__name__ not in _FLOAT_IN_QUANTIZED_PACKAGE)


def is_quantized_module(module: nn.Module) -> bool:
    """Whether ``module`` computes in quantized form (static, dynamic or reference, or a
    flow's own form: a torchao tensor-subclass weight, see :mod:`fxnumeric.flows`)."""
    name = type(module).__name__
    if name in _QUANTIZE_MODULE_NAMES or name in _PLUMBING_MODULE_NAMES | _DEQUANTIZE_MODULE_NAMES:
        return False
    if in_quantized_package(module):
        return True
    # reference fused modules: a float intrinsic wrapper around a reference conv/linear
    if any(in_quantized_package(c) for c in module.children()):
        return True
    return flows.is_quantized_module(module)


def dynamic_input(module: nn.Module) -> tuple[Any, ...] | None:
    """How ``module`` rounds its float input inside the op: per call, ``(granularity, steps
    over the range)``, or on a fixed grid, ``("fixed", step, low, high)``; or ``None``
    (the forms: :meth:`fxnumeric.flows.Flow.dynamic_input`).

    torch's dynamic int8 modules quantize the whole input per call to quint8 with
    ``reduce_range`` (127 steps over ``[min(x, 0), max(x, 0)]``): the Linear, and the
    recurrent ones too (an LSTM or GRU its whole input sequence at once, on CPU; a cell its
    input batch; each also its hidden state, per step, which this does not count). Their
    float16 forms compute in float on float16-rounded weights: no input step. The weight
    dtype is read where each kind keeps it (:func:`fxnumeric.storage.dynamic_weight_dtype`).
    A flow answers for its own (torchao's dynamic and static activation configs,
    :func:`fxnumeric.flows.dynamic_input`).
    """
    if is_dynamic_module(module):
        return ("tensor", 127.0) if dynamic_weight_dtype(module) == torch.qint8 else None
    return flows.dynamic_input(module)


@functools.cache
def _transparent_types() -> tuple[type, ...]:
    """Observers, fake-quants and loggers: modules that pass their input through."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    from .loggers import Logger

    return (ObserverBase, FakeQuantizeBase, Logger)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _in_eval(module: nn.Module) -> bool:
    """Whether ``module`` computes as in eval mode: it is, or it is one of torch's containers,
    whose forward only calls its children and never reads its own flag. torch's
    ``fuse_modules`` leaves the fused ``ConvReLU2d`` it builds (an ``nn.Sequential``) in
    training mode around children in eval mode."""
    return not module.training or (isinstance(module, _CONTAINERS)
                                    and type(module).__module__.startswith("torch."))


def is_pure(module: nn.Module) -> bool:
    """Whether calling ``module`` leaves it (and everything in it) unchanged.

    True for torch's own modules in eval mode with no observer, fake-quantize or logger
    inside: a shadow may then call the float model's module itself instead of a copy, and
    sees a weight changed after preparing as torch's ``Shadow`` does. A torch container in
    training mode around eval-mode children counts (:func:`_in_eval`). A module of the user's
    own class, or one in training mode, may record what it sees.
    """
    stateful = _transparent_types()
    return all(
        _in_eval(m) and type(m).__module__.startswith("torch.") and not isinstance(m, stateful)
        for m in module.modules()
    )


def is_inference_only(module: nn.Module) -> bool:
    """Whether ``module`` and everything in it is in eval mode with no observer, fake-quantize
    or logger inside: calling it updates no statistics (its own code may still set
    attributes or write buffers, which :func:`is_pure` rules out for torch's modules only)."""
    stateful = _transparent_types()
    return all(_in_eval(m) and not isinstance(m, stateful) for m in module.modules())


def _holds_quantized(module: nn.Module) -> bool:
    """Whether ``module``, called as one op, computes in quantized form: it is a quantized
    module, or holds one however deep (a decoder layer called whole, whose quantized Linears
    sit inside its attention and MLP blocks; :func:`is_quantized_module` looks at direct
    children only, as a reference fused module holds its reference conv)."""
    return any(map(is_quantized_module, module.modules()))


def _module_class(module: nn.Module) -> OpClass:
    # a parametrized layer (weight_norm, spectral_norm, orthogonal) is an instance of a class
    # made for it (ParametrizedLinear) and computes its own op with the parametrized weight
    cls = type_before_parametrizations(module)
    for klass in cls.__mro__:
        if klass in _REGISTERED:
            return _REGISTERED[klass]
    if isinstance(module, _transparent_types()):
        return PLUMBING
    name = cls.__name__
    if cls.__module__.startswith("torch."):
        if name in _PLUMBING_MODULE_NAMES:
            return PLUMBING
        if name in _DEQUANTIZE_MODULE_NAMES:
            return DEQUANTIZE
        if name in _QUANTIZE_MODULE_NAMES:
            return QUANTIZE
    if _is_torch_class(cls):
        sig = _MODULE_SIGNATURES.get(name) or (_snake(name),)
        return OpClass(sig, "op", _holds_quantized(module))
    for suffix, kind in _FOREIGN_KINDS:
        if name.endswith(suffix):
            return PLUMBING if kind is None else OpClass(kind, "op", _holds_quantized(module))
    for klass in cls.__mro__[1:]:  # a torch layer of another library's (FalconLinear: Linear)
        if _is_torch_class(klass) and klass.__name__ in _MODULE_SIGNATURES:
            return OpClass(_MODULE_SIGNATURES[klass.__name__], "op", _holds_quantized(module))
    return OpClass((f"module:{cls.__qualname__}",), "op", _holds_quantized(module))


def _normalise_name(name: str) -> tuple[str, ...]:
    if name in _NAME_ALIASES:
        return _NAME_ALIASES[name]
    stripped = name.rstrip("_")
    return _NAME_ALIASES.get(stripped, (stripped,))


def _quantized_op_signature(name: str) -> tuple[str, ...]:
    """``add_relu`` -> (add, relu); ``linear_dynamic`` -> (linear,);
    ``batch_norm2d`` -> (batch_norm,)."""
    name = name.replace("_dynamic", "").replace("_fp16", "")
    tail: tuple[str, ...] = ()
    if name.endswith("_relu"):
        name, tail = name[: -len("_relu")], ("relu",)
    name = re.sub(r"_scalar$", "", name)
    name = re.sub(r"^batch_norm\dd$", "batch_norm", name)
    name = re.sub(r"^embedding_(bag_)?(byte|4bit).*$",
                  lambda m: "embedding_bag" if m.group(1) else "embedding", name)
    name = re.sub(r"_prepack$", "", name)
    return _normalise_name(name) + tail


def _function_class(target: Any) -> OpClass:
    if target in _REGISTERED:
        return _REGISTERED[target]
    op = flows.op_name(target)
    if op is not None:
        namespace, name = op
        if namespace == "quantized":
            if name in _PLUMBING_NAMES:  # convert_fx turns F.dropout into quantized.dropout
                return PLUMBING
            if name == "dequantize":
                return DEQUANTIZE
            return OpClass(_quantized_op_signature(name), "op", True)
        return OpClass(_normalise_name(name), "op", False)
    name = getattr(target, "__name__", None) or str(target)
    if name in _PLUMBING_NAMES:
        return PLUMBING
    if name == "dequantize":
        return DEQUANTIZE
    if name in _QUANTIZE_NAMES:
        return QUANTIZE
    if target is operator.getitem:
        return OpClass(("getitem",))
    return OpClass(_normalise_name(name))


def _method_class(name: str) -> OpClass:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in _PLUMBING_NAMES:
        return PLUMBING
    if name == "dequantize":
        return DEQUANTIZE
    return OpClass(_normalise_name(name))


# Indexing ops written other than `x[...]`, by name: their arguments after the tensor, with
# their defaults (torch's schemas `select(self, int dim, SymInt index)` and `slice.Tensor(self,
# int dim=0, SymInt? start=None, SymInt? end=None, SymInt step=1)`). torch.export writes
# `x[:, 0]` as `aten.select.int(x, 1, 0)` and `x[:, 1:]` as `aten.slice.Tensor(x, 1, 1,
# 9223372036854775807)`, where torch.fx keeps the one `getitem`.
_REQUIRED = object()
_INDEXING_ARGS: dict[str, tuple[tuple[str, Any], ...]] = {
    "select": (("dim", _REQUIRED), ("index", _REQUIRED)),
    "slice": (("dim", 0), ("start", None), ("end", None), ("step", 1)),
}
_NODE_INDEX = "<tensor index>"


def index_of(node: fx.Node) -> tuple[Any, ...]:
    """The index an indexing node takes, as ``x[...]`` writes it, in one form however the
    graph wrote it: ``(index,)``, or ``()`` for a node that is no indexing op.

    ``getitem(x, (slice(None), 0))`` (torch.fx's ``x[:, 0]``), ``x.select(1, 0)`` and
    ``aten.select.int(x, 1, 0)`` (torch.export's) all take ``(slice(None), 0)``; ``x[0]`` and
    ``aten.select.int(x, 0, 0)`` take ``0``; ``aten.slice.Tensor(x, 1, 0, 2)`` takes
    ``x[:, :2]``'s index. A slice's start 0, step 1 and an end of ``sys.maxsize`` (torch.export's
    open end) are left out, as are trailing ``:`` and ``...``, which select everything.
    A node in the index (a tensor index, ``y[y > t]``, or a size computed in the graph) is
    written ``"<tensor index>"``: a node of one graph is never equal to one of another, and
    the values it carries are paired before the indexing op is.

    An index counting dimensions from the end (``x[..., 0]``) is not compared with the
    dimension torch.export counts from the front (``select(x, 2, 0)``): the float graph
    traced by torch.fx does not know the tensor's rank.

    Example:
        >>> import torch
        >>> gm = torch.fx.symbolic_trace(lambda x: x[:, 0] + x.select(1, 0) + x[0, :])
        >>> [index_of(n) for n in gm.graph.nodes if n.op != "placeholder"]
        [((slice(None, None, None), 0),), ((slice(None, None, None), 0),), (), (0,), (), ()]
    """
    if node.op == "call_function" and node.target is operator.getitem:
        return (_canonical_index(fx.node.map_arg(node.args[1], lambda _: _NODE_INDEX)),)
    name = _indexing_name(node)
    if name is None:
        return ()
    values: list[Any] = []
    for i, (arg, default) in enumerate(_INDEXING_ARGS[name], start=1):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg, default)
        if value is _REQUIRED:
            return ()
        values.append(fx.node.map_arg(value, lambda _: _NODE_INDEX))
    dim, rest = values[0], values[1:]
    if not isinstance(dim, int):
        return ()
    item = rest[0] if name == "select" else slice(*rest)
    before = ((slice(None),) * dim if dim >= 0
              else (Ellipsis,) + (slice(None),) * (-dim - 1))  # x.select(-1, 0) is x[..., 0]
    return (_canonical_index((*before, item)),)


def _indexing_name(node: fx.Node) -> str | None:
    """``"select"`` or ``"slice"`` for those ops (``torch.select``, ``Tensor.select``,
    ``aten.select`` and ``aten.slice``), else ``None``."""
    if node.op == "call_method":
        return "select" if node.target == "select" else None
    if node.op != "call_function":
        return None
    if node.target is torch.select:
        return "select"
    op = flows.op_name(node.target)
    return op[1] if op is not None and op[0] == "aten" and op[1] in _INDEXING_ARGS else None


def _canonical_index(index: Any) -> Any:
    """``index`` with every way of writing the same selection written one way
    (:func:`index_of`)."""
    parts = list(index) if isinstance(index, tuple) else [index]
    parts = [_canonical_slice(p) if isinstance(p, slice) else p for p in parts]
    while parts and (parts[-1] is Ellipsis
                     or isinstance(parts[-1], slice) and parts[-1] == slice(None)):
        parts.pop()
    return parts[0] if len(parts) == 1 else tuple(parts)


def _canonical_slice(s: slice) -> slice:
    step = None if s.step == 1 else s.step
    if step is not None and not (isinstance(step, int) and step > 0):
        return slice(s.start, s.stop, step)  # a backward slice's 0 and end mean other things
    start = None if s.start == 0 else s.start
    stop = None if isinstance(s.stop, int) and s.stop >= sys.maxsize else s.stop
    return slice(start, stop, step)


def classify_module(module: nn.Module) -> OpClass:
    """Classify a module called as one op (a ``call_module`` node, or a module-tree leaf)."""
    return _module_class(module)


def _is_registered(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if not _REGISTERED:
        return False
    if node.op == "call_module":
        return any(klass in _REGISTERED for klass in type(modules[node.target]).__mro__)
    return node.target in _REGISTERED


def _table_class(node: fx.Node, modules: dict[str, nn.Module]) -> OpClass | None:
    if node.op == "call_module":
        return _module_class(modules[node.target])
    if node.op == "call_function":
        return _function_class(node.target)
    if node.op == "call_method":
        return _method_class(node.target)
    return None


def classify(node: fx.Node, modules: dict[str, nn.Module]) -> OpClass | None:
    """Classify a node; ``None`` for placeholders, outputs and ``get_attr`` nodes.

    Order: the user's :func:`register_op` entries, then the quantization flows
    (:mod:`fxnumeric.flows`: pt2e's ATen and q/dq ops, torchao's weights), then the tables here.
    """
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    cls = None if _is_registered(node, modules) else flows.classify(node, modules)
    if cls is None:
        cls = _table_class(node, modules)
    if (cls is not None and cls.role == "op" and not cls.quantized
            and flows.is_quantized(node, modules)):
        cls = OpClass(cls.signature, cls.role, True)
    return cls
