"""What a node does to the values around it, decided once for every copy of a graph that runs.

Three features run parts of a traced graph again outside the graph they came from: shadows
(:mod:`fxnumeric.instrument`: a pair's float subgraph inlined into the quantized graph),
hybrid models (:mod:`fxnumeric.advice.hybrid`: one graph with another graph's subgraph in
place of a layer) and weight reading (:mod:`fxnumeric.weights`: a weight computed from the
constants that feed it). They must agree on four questions, answered here:

* **in-place writes**: does a node write its result into a value it reads (``relu_``,
  ``aten.add_.Tensor``, ``ReLU(inplace=True)``, ``x += y``)? A copy of such a node must not
  write into a tensor the original graph still reads. ATen ops answer from their schema
  (which argument is written), methods and functions from torch's trailing-underscore and
  ``i``-operator conventions, modules from their ``inplace`` flag.
* **dequantize**: does a node turn a quantized value into a float one? The op tables answer
  (:attr:`fxnumeric.optypes.OpClass.is_dequantize`), never a node's name.
* **constants**: what value does a node compute from graph constants alone (a pt2e weight's
  ``dequantize`` of its int8 parameter)? Observers and fake-quants are passed through, never
  run (running one updates its statistics).
* **attributes and modules**: what does a ``get_attr`` target hold, and what does a copy call
  in place of a float module: the module itself when calling it changes nothing (torch's own
  modules in eval mode), a deep copy otherwise (observers, fake-quants, training mode, user
  classes).
* **the same computation**: does a pair left in float compute on its side exactly what its
  float twin computes (same modules, equal weights, same functions)? Its shadow would then
  read its own output again: zero error by construction, at the cost of a float op (an LLM's
  ``lm_head``: a fifth of the model's multiply-adds, and a logits-sized output).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .ops import is_inference_only, is_pure
from .view import GraphView

__all__ = [
    "fetch_attr", "overwrites", "mutated_in_place", "writes_first_input", "is_dequantize",
    "evaluate_constant", "shadow_copy", "QRANGE", "QuantGrid", "quantize_grid", "grid_before",
    "computes_alike", "views_of", "with_values",
]

QRANGE: dict[torch.dtype, tuple[int, int]] = {
    torch.quint8: (0, 255), torch.qint8: (-128, 127), torch.qint32: (-(2**31), 2**31 - 1),
    torch.quint4x2: (0, 15), torch.uint8: (0, 255), torch.int8: (-128, 127),
}
"""The integer range of each quantized (or integer) dtype."""

_INPLACE_FUNCTIONS = frozenset({operator.iadd, operator.imul, operator.isub, operator.itruediv})


@dataclass(frozen=True)
class QuantGrid:
    """The per-tensor grid a value is quantized on: its step, zero point and integer range.

    Example:
        >>> QuantGrid(0.1, 0, -128, 127).bounds()
        (-12.850000000000001, 12.75)
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def bounds(self) -> tuple[float, float]:
        """The float range the grid represents, half a step beyond each end (rounding)."""
        return ((self.qmin - self.zero_point - 0.5) * self.scale,
                (self.qmax - self.zero_point + 0.5) * self.scale)

    @classmethod
    def of(cls, value: torch.Tensor) -> QuantGrid | None:
        """The grid of a per-tensor quantized tensor (``None`` for any other tensor)."""
        if not value.is_quantized or value.qscheme() not in (torch.per_tensor_affine,
                                                             torch.per_tensor_symmetric):
            return None
        qmin, qmax = QRANGE.get(value.dtype, (0, 255))
        return cls(float(value.q_scale()), int(value.q_zero_point()), qmin, qmax)


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 else None
    return float(value) if isinstance(value, (int, float)) else None


def quantize_grid(node: fx.Node, view: GraphView) -> QuantGrid | None:
    """The per-tensor grid a quantize node quantizes to, read from its constants.

    A ``Quantize`` module's ``scale`` and ``zero_point``; a quantize function's arguments in
    the order torch's (``quantize_per_tensor(x, scale, zero_point, dtype)``) and the pt2e
    ones (``quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, dtype)``) share.
    ``None`` for per-channel quantization or a node that is not a quantize.
    """
    cls = view.op_class(node)
    if cls is None or not cls.is_quantize:
        return None
    if node.op == "call_module":
        module = view.modules[str(node.target)]
        scale, zp = _scalar(getattr(module, "scale", None)), getattr(module, "zero_point", None)
        dtype = getattr(module, "dtype", None)
        if scale is None or _scalar(zp) is None or dtype not in QRANGE:
            return None
        return QuantGrid(scale, int(_scalar(zp)), *QRANGE[dtype])  # type: ignore[arg-type]
    # the value quantized (args[0]) is the layer's input, never a constant: not computed
    args = [None, *(evaluate_constant(a, view) for a in node.args[1:])]
    if len(args) < 4:
        return None
    scale, zp = _scalar(args[1]), _scalar(args[2])
    dtype = next((a for a in args[3:] if isinstance(a, torch.dtype)), None)
    if scale is None or zp is None or dtype not in QRANGE:
        return None
    qmin, qmax = QRANGE[dtype]
    if len(args) >= 6 and isinstance(args[3], int) and isinstance(args[4], int):
        qmin, qmax = args[3], args[4]  # pt2e: the range is explicit
    return QuantGrid(scale, int(zp), qmin, qmax)


def grid_before(view: GraphView, node: fx.Node) -> QuantGrid | None:
    """The grid of the quantize that ``node``'s value went through just before it (``node``
    itself, or behind its dequantize and other plumbing): a layer's output step in a
    reference FX or pt2e graph. ``None`` where there is none."""
    while True:
        cls = view.op_class(node)
        if cls is not None and cls.is_quantize:
            return quantize_grid(node, view)
        if cls is None or cls.role != "plumbing" or not node.all_input_nodes:
            return None
        node = node.all_input_nodes[0]


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` (or ``call_module``) target names in ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _schema_writes(op: torch._ops.OpOverload, index: int) -> bool:
    arguments = op._schema.arguments
    if index >= len(arguments):
        return False
    alias = arguments[index].alias_info
    return alias is not None and alias.is_write


def overwrites(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user`` writes its result into ``node``'s value (its first argument).

    Example:
        >>> g = fx.Graph()
        >>> x = g.placeholder("x")
        >>> y = g.call_function(torch.ops.aten.add_.Tensor, (x, x))
        >>> z = g.call_function(torch.ops.aten.add.Tensor, (x, x))
        >>> overwrites(y, x, {}), overwrites(z, x, {})
        (True, False)
    """
    if user.op == "call_module":
        return bool(getattr(modules.get(str(user.target)), "inplace", False))
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        name = str(user.target)
        return name.endswith("_") and not name.startswith("_")
    if user.op != "call_function":
        return False
    target = user.target
    if isinstance(target, torch._ops.OpOverload):  # aten.relu_, aten.add_ (torch.export)
        return _schema_writes(target, 0)
    if target in _INPLACE_FUNCTIONS or user.kwargs.get("inplace"):
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def writes_first_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes into the value of its first argument."""
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        return overwrites(node, first, modules)  # type: ignore[arg-type]
    return isinstance(first, fx.Node) and overwrites(node, first, modules)


def mutated_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a later op overwrites ``node``'s value in place (an observer then needs a copy)."""
    return any(overwrites(user, node, modules) for user in node.users)


_VIEW_OPS = frozenset({
    "reshape", "transpose", "permute", "flatten", "unflatten", "squeeze", "unsqueeze", "t",
    "expand", "expand_as", "narrow", "select", "view_as", "split", "chunk", "unbind",
    "movedim", "swapaxes", "as_strided", "diagonal", "unfold", "getitem",
})
"""Ops whose value may share its input's memory (``reshape`` and ``getitem`` do for most
inputs): writing into their value writes into the input's."""

_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag", "data"})


def views_of(view: GraphView, n: fx.Node) -> list[fx.Node]:
    """The ops whose values may be views of op ``n``'s value (views of views too), in the
    order found: a write into any of them writes into ``n``'s value."""
    found: list[fx.Node] = []
    todo, seen = [n], {n}
    while todo:
        for user in view.consumers(todo.pop()):
            cls = view.op_class(user)
            if user in seen or cls is None or len(cls.signature) != 1:
                continue
            kind = cls.signature[0]
            if kind in _VIEW_OPS or (kind == "getattr" and len(user.args) > 1
                                     and user.args[1] in _VIEW_ATTRIBUTES):
                seen.add(user)
                found.append(user)
                todo.append(user)
    return found


def is_dequantize(view: GraphView, node: fx.Node) -> bool:
    """Whether ``node`` turns a quantized value into a float one."""
    cls = view.op_class(node)
    return cls is not None and cls.is_dequantize


def evaluate_constant(node: Any, view: GraphView) -> Any:
    """Compute ``node`` from graph constants alone (``None`` if it depends on an input).

    Observers and fake-quants are passed through, not run: running one would update its
    statistics, and the user's model must not change.

    The nodes it reads are found first, walking up the graph once (a node read on several
    paths is visited once: a residual network's adds made a recursive walk exponential, and
    a deep one overflowed Python's stack), then computed in graph order.
    """
    if not isinstance(node, fx.Node):
        return node
    reads = _constant_inputs(node, view)
    if reads is None:
        return None
    values: dict[fx.Node, Any] = {}
    for n in sorted(reads, key=view.position):
        if n.op == "get_attr":
            values[n] = fetch_attr(view.gm, str(n.target))
        elif n.op == "call_module":  # plumbing: its value is its input's
            values[n] = with_values(n.args[0], values)
        else:
            args, kwargs = with_values(n.args, values), with_values(n.kwargs, values)
            with torch.no_grad():
                values[n] = n.target(*args, **kwargs)  # type: ignore[operator]
    return values[node]


def _constant_inputs(node: fx.Node, view: GraphView) -> set[fx.Node] | None:
    """``node`` and every node it reads, if they all come from graph constants (``get_attr``,
    functions of them, plumbing modules passing them on); ``None`` if any reads an input."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            continue
        if n.op == "call_module":
            cls = view.op_class(n)
            if cls is None or cls.role != "plumbing" or not n.args:
                return None
            inputs = [n.args[0]] if isinstance(n.args[0], fx.Node) else []
        elif n.op == "call_function":
            inputs = n.all_input_nodes
        else:  # an input, a method call, the output
            return None
        for read in inputs:
            if read not in seen:
                seen.add(read)
                stack.append(read)
    return seen


def with_values(arg: Any, values: dict[fx.Node, Any]) -> Any:
    """``arg`` with every node replaced by its value, nested lists, tuples and dicts included
    (``torch.cat`` takes a list of nodes), as plain Python containers: ATen ops refuse fx's
    immutable ones."""
    if isinstance(arg, fx.Node):
        return values[arg]
    if isinstance(arg, list):
        return [with_values(a, values) for a in arg]
    if isinstance(arg, tuple):
        return tuple(with_values(a, values) for a in arg)
    if isinstance(arg, dict):
        return {k: with_values(v, values) for k, v in arg.items()}
    return arg


def shadow_copy(value: Any) -> Any:
    """What a copy of a graph calls in place of a module or constant of the original graph.

    The object itself where calling it changes nothing (a tensor; torch's own modules in eval
    mode, :func:`fxnumeric.ops.is_pure`: no copy of the weights), else a deep copy, so running
    the copy never touches the user's model (an observer in a QAT model keeps its statistics).
    A module of the user's own class in eval mode with no observer inside (a Hugging Face
    decoder layer that a block shadow runs) is deep-copied sharing its parameters: what its
    forward sets on itself or writes into its buffers stays on the copy, and the weights are
    not duplicated (SmolLM2's 30 decoder layers, deep-copied, added 0.8x the float model's
    parameter bytes to compare's peak memory).
    """
    if isinstance(value, torch.Tensor) or (isinstance(value, nn.Module) and is_pure(value)):
        return value
    if isinstance(value, nn.Module) and is_inference_only(value):
        return copy.deepcopy(value, memo={id(p): p for p in value.parameters()})
    return copy.deepcopy(value)


_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    """Same class, equal plain settings (``eps``, ``inplace``...), and bit-equal parameters
    and buffers of one dtype, in every submodule. Anything not plainly comparable (a weight
    on the meta device, a setting that is an object) reads as different."""
    if a is b:
        return True
    subs_a, subs_b = dict(a.named_modules()), dict(b.named_modules())
    if subs_a.keys() != subs_b.keys():
        return False
    for name, ma in subs_a.items():
        mb = subs_b[name]
        if type(ma) is not type(mb) or ma.training != mb.training:
            return False
        settings_a = {k: v for k, v in vars(ma).items() if not k.startswith("_")}
        settings_b = {k: v for k, v in vars(mb).items() if not k.startswith("_")}
        if settings_a.keys() != settings_b.keys() or any(
                not isinstance(v, _PLAIN) or type(v) is not type(settings_b[k])
                or v != settings_b[k] for k, v in settings_a.items()):
            return False
        tensors_a = {**ma._parameters, **ma._buffers}
        tensors_b = {**mb._parameters, **mb._buffers}
        if tensors_a.keys() != tensors_b.keys():
            return False
        for key, ta in tensors_a.items():
            tb = tensors_b[key]
            if ta is tb:
                continue
            if type(ta) is not type(tb) or not _same_value(ta, tb):
                return False
    return True


def computes_alike(region: Any, pair: Any) -> bool:
    """Whether a pair left in float computes on the quantized side exactly what its float
    twin computes: node for node the same op (the same function, or modules of one class with
    bit-equal weights and equal settings) on the same constants. Quantized pairs never do."""
    if pair.quantized:
        return False
    floats, quants = region.chain(pair, "float"), region.chain(pair, "quant")
    if len(floats) != len(quants):
        return False
    fmods, qmods = region.float_view.modules, region.quant_view.modules
    for f, q in zip(floats, quants, strict=True):
        if f.op != q.op or len(f.args) != len(q.args) or f.kwargs.keys() != q.kwargs.keys():
            return False
        if f.op == "call_module":
            if not _same_module(fmods[f.target], qmods[q.target]):
                return False
        elif f.target != q.target:
            return False
        for x, y in zip((*f.args, *f.kwargs.values()),
                        (*q.args, *(q.kwargs[k] for k in f.kwargs)), strict=True):
            if isinstance(x, fx.Node) and isinstance(y, fx.Node):
                constant_x = region.float_view.producer(x) is None
                if constant_x != (region.quant_view.producer(y) is None):
                    return False
                if constant_x:  # a buffer read through plumbing (`inv.to(x.device)`)
                    value_x = evaluate_constant(x, region.float_view)
                    value_y = evaluate_constant(y, region.quant_view)
                    if value_x is None or value_y is None or not _same_value(value_x, value_y):
                        return False
            elif not _same_value(x, y):
                return False
    return True


def _same_value(a: Any, b: Any) -> bool:
    """Equal plain constants, or bit-equal tensors of one dtype and shape.

    A tensor subclass (torchao's ``Int8Tensor``: the weight of a functional ``F.linear``
    quantized by ``quantize_``) equals only itself: it may implement no ``aten.equal``, and
    its reported dtype is not what it stores."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a is b:
            return True
        return (_plain(a) and _plain(b) and a.dtype == b.dtype and a.shape == b.shape
                and not a.is_meta and not b.is_meta and not a.is_quantized
                and not b.is_quantized and bool(torch.equal(a, b)))
    return isinstance(a, _PLAIN) and type(a) is type(b) and a == b


def _plain(t: torch.Tensor) -> bool:
    """A tensor of torch's own class or a Parameter holding one (a Parameter made of a
    subclass takes the subclass's type), not a subclass."""
    return type(t) in (torch.Tensor, nn.Parameter)
