"""What a node does to the values around it, decided once for every copy of a graph that runs.

Three features run parts of a traced graph again outside the graph they came from: shadows
(:mod:`fxnumeric.instrument`: a pair's float subgraph inlined into the quantized graph),
hybrid models (:mod:`fxnumeric.advice.hybrid`: one graph with another graph's subgraph in
place of a layer) and weight reading (:mod:`fxnumeric.weights`: a weight computed from the
constants that feed it). They must agree on four questions, answered here:

* **in-place writes**: does a node write its result into a value it reads (``relu_``,
  ``aten.add_.Tensor``, ``ReLU(inplace=True)``, ``x += y``, ``y[:, 0] = 0``)? A copy of such
  a node must not write into a tensor the original graph still reads. ATen ops answer from
  their schema (which argument is written), methods and functions from torch's
  trailing-underscore and ``i``-operator conventions and ``operator.setitem``, modules from
  their ``inplace`` flag. A write into a value that *may alias* another (a view of it, or the
  same tensor handed on: ``DeQuantStub``, ``nn.Identity``, eval-mode dropout,
  ``.contiguous()``, ``.detach()``, ``.to()``) writes into that one too
  (:func:`aliases_of`).
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
import math
import operator
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .flows import WeightGrid
from .ops import is_inference_only, is_pure
from .view import GraphView

__all__ = [
    "fetch_attr", "overwrites", "mutated_in_place", "writes_first_input", "is_dequantize",
    "evaluate_constant", "shadow_copy", "QRANGE", "QuantGrid", "quantize_grid", "grid_before",
    "WeightGrid", "dequantize_grid",
    "computes_alike", "holds_quantized", "rounds_on_grid", "aliases_of", "written_into",
    "with_values", "output_bound",
]

QRANGE: dict[torch.dtype, tuple[int, int]] = {
    torch.quint8: (0, 255), torch.qint8: (-128, 127), torch.qint32: (-(2**31), 2**31 - 1),
    torch.quint4x2: (0, 15), torch.uint8: (0, 255), torch.int8: (-128, 127),
}
"""The integer range of each quantized (or integer) dtype."""

_INPLACE_FUNCTIONS = frozenset({
    operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
    operator.setitem,  # `y[:, 0] = 0` writes into `y`
})
_INPLACE_METHODS = frozenset(f"__{f.__name__}__" for f in _INPLACE_FUNCTIONS)
"""The same as methods: torch.fx records ``y.__setitem__(i, v)`` as a ``call_method``."""


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

    A ``Quantize`` module's ``scale`` and ``zero_point`` (and a fake-quant's ``quant_min`` /
    ``quant_max``, which may be narrower than its dtype's); a quantize function's arguments in
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
        qmin, qmax = QRANGE[dtype]
        # a fake-quant's range may be narrower than its dtype's (4-bit values held in int8)
        qmin, qmax = getattr(module, "quant_min", qmin), getattr(module, "quant_max", qmax)
        return QuantGrid(scale, int(_scalar(zp)), int(qmin), int(qmax))  # type: ignore[arg-type]
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


def dequantize_grid(node: fx.Node, view: GraphView) -> WeightGrid | None:
    """The grid the value a dequantize node reads was quantized on, from its constants: a
    pt2e weight's ``dequantize_per_tensor(w, scale, zero_point, quant_min, quant_max, dtype)``
    or ``dequantize_per_channel(w, scales, zero_points, axis, quant_min, quant_max, dtype)``,
    or a torch quantized tensor's own. ``None`` for any other node or scheme (group-wise)."""
    if not is_dequantize(view, node) or not node.args:
        return None
    args = [evaluate_constant(a, view) for a in node.args]
    first = args[0]
    if isinstance(first, torch.Tensor) and first.is_quantized:
        qmin, qmax = QRANGE.get(first.dtype, (-128, 127))
        if first.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return WeightGrid(torch.tensor([first.q_scale()], dtype=torch.float64), qmin, qmax)
        return WeightGrid(first.q_per_channel_scales().double(), qmin, qmax,
                          first.q_per_channel_axis())
    if len(args) >= 7 and all(isinstance(a, int) for a in args[3:6]):
        axis, qmin, qmax = args[3:6]  # per channel
    elif len(args) >= 6 and all(isinstance(a, int) for a in args[3:5]):
        axis, (qmin, qmax) = None, args[3:5]
    else:
        return None
    scales = args[1]
    if not isinstance(scales, (torch.Tensor, float, int)):
        return None
    scales = torch.as_tensor(scales, dtype=torch.float64).detach().reshape(-1)
    return WeightGrid(scales, qmin, qmax, axis)


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
    """Whether ``user`` writes its result into ``node``'s value (its first argument, or its
    ``out=``).

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
    if user.kwargs.get("out") is node:  # torch.add(y, 1, out=y): the result is written there
        return True
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        name = str(user.target)
        return name in _INPLACE_METHODS or (name.endswith("_") and not name.startswith("_"))
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

_SAME_TENSOR_OPS = frozenset({
    "contiguous", "detach", "to", "type", "type_as", "float", "double", "half", "bfloat16",
    "int", "long", "short", "bool", "byte", "char", "cpu", "cuda", "requires_grad", "alias",
    "reshape_as", "swapdims", "moveaxis", "broadcast_to", "ravel", "tensor_split", "hsplit",
    "vsplit", "dsplit", "split_with_sizes", "view_as_real", "view_as_complex", "conj",
    "resolve_conj", "resolve_neg", "positive", "adjoint", "atleast_1d", "atleast_2d",
    "atleast_3d", "as_tensor", "asarray", "align_as", "rename",
})
"""Methods and functions that may return their input itself (``.contiguous()`` of a
contiguous tensor, ``.to()`` / ``.float()`` / ``.type_as()`` to the dtype it has,
``.detach()``: a tensor sharing its memory) or a view of it."""

_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag", "data"})


def _may_alias(view: GraphView, user: fx.Node) -> bool:
    """Whether ``user``'s value may share the memory of a value it reads: a view, an op that
    may hand its input on unchanged, plumbing (``nn.Identity``, eval-mode dropout, a
    ``DeQuantStub`` or ``dequantize`` of a float value, an observer) or a quantize (a float
    model's ``QuantStub`` returns its input). Conservative: a copy too many costs memory, a
    write missed logs a value the op never returned."""
    target = user.target
    if user.op == "call_function" and isinstance(target, torch._ops.OpOverload):
        # an ATen op (torch.export): its schema says whether a result aliases an argument
        return any(r.alias_info is not None for r in target._schema.returns)
    cls = view.op_class(user)
    if cls is None or view.is_shape(user):  # a shape measured on the value is not the value
        return False
    if cls.role != "op":
        return True
    if len(cls.signature) != 1:
        return False
    kind = cls.signature[0]
    return (kind in _VIEW_OPS or kind in _SAME_TENSOR_OPS
            or (kind == "getattr" and len(user.args) > 1 and user.args[1] in _VIEW_ATTRIBUTES))


def aliases_of(view: GraphView, n: fx.Node) -> list[fx.Node]:
    """The ops whose values may alias op ``n``'s value (aliases of aliases too), in the order
    found: views of it and ops that may hand it on as it is (:func:`_may_alias`). A write
    into any of them writes into ``n``'s value.

    Example:
        >>> g = fx.Graph()
        >>> x = g.placeholder("x")
        >>> same = g.call_method("contiguous", (x,))
        >>> flat = g.call_method("view", (same, -1))
        >>> fresh = g.call_method("clone", (x,))
        >>> _ = g.output((flat, fresh))
        >>> [a.name for a in aliases_of(GraphView(fx.GraphModule(nn.Module(), g)), x)]
        ['contiguous', 'view']
    """
    found: list[fx.Node] = []
    todo, seen = [n], {n}
    while todo:
        # the graph's own users, plumbing included (GraphView.consumers looks through it):
        # the DeQuantStub that hands the value on is the alias a later op writes through
        for user in todo.pop().users:
            if user not in seen and _may_alias(view, user):
                seen.add(user)
                found.append(user)
                todo.append(user)
    return found


def written_into(view: GraphView, n: fx.Node, among: Any = None) -> bool:
    """Whether an op (of ``among``, a collection of ``view``'s nodes; any op if ``None``)
    writes in place into op ``n``'s value or into a value that may alias it
    (:func:`aliases_of`): ``y = fc(x); y.view(-1)[0] = 0`` and ``dequant(fc(x)).clamp_(0, 1)``
    both write into ``fc``'s output."""
    for value in (n, *aliases_of(view, n)):
        if any(overwrites(user, value, view.modules) for user in value.users
               if among is None or user in among):
            return True
    return False


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
                not _same_value(v, settings_b[k]) for k, v in settings_a.items()):
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


_GRID_EXACT = _VIEW_OPS | {
    "relu", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "max", "min", "amax", "amin", "flip", "roll",
    "repeat", "clone", "cat", "channel_shuffle", "pixel_shuffle", "pixel_unshuffle",
    "upsampling_nearest1d", "upsampling_nearest2d", "upsampling_nearest3d",
}
"""Op kinds that, run on a torch quantized tensor, compute exactly what they compute on its
dequantized values: they move, copy or select its integers (the greatest of a window, the
zero point for ``relu``, a reshaped view) and keep its grid, so their quantized result is the
float result, bit for bit. ``cat`` too: torch refuses quantized inputs of different grids.
Every other float-capable op run on a quantized tensor (an average pool, ``mean``, a
bilinear ``interpolate``, ``sigmoid``, a ``hardtanh`` whose bounds fall between grid points)
computes in integers and rounds its result onto a grid: an error of its own. ``interpolate``
(``nn.Upsample``) is exact in ``nearest`` mode only, and the clamps (:data:`_CLAMPS`) when
their bounds are points of the grid they read (:func:`_grid_exact`)."""

_NEAREST_ONLY = frozenset({"interpolate", "upsample"})

_CLAMPS = frozenset({"hardtanh", "relu6", "clamp", "clip"})
"""Clamps: torch quantizes each bound onto the grid of the value it clamps (a ``ReLU6`` on a
grid of step 0.05 clamps at 6.0 only if 120 steps make 6.0 exactly), so they are exact when
every bound is a grid point, as ``0`` (the zero point) always is."""


def _clamp_bounds(view: GraphView, node: fx.Node, kind: str) -> tuple[Any, Any]:
    """The lower and upper bounds of the clamp ``node`` (``None``: no bound), as given."""
    if node.op == "call_module":
        module = view.modules[str(node.target)]
        return getattr(module, "min_val", None), getattr(module, "max_val", None)
    if kind == "relu6":
        return 0.0, 6.0
    names, defaults = ((("min_val", "max_val"), (-1.0, 1.0)) if kind == "hardtanh"
                       else (("min", "max"), (None, None)))
    return tuple(node.kwargs.get(name, node.args[i + 1] if len(node.args) > i + 1 else default)
                 for i, (name, default) in enumerate(zip(names, defaults, strict=True)))


_BOUNDED: dict[str, float] = {
    "sigmoid": 1.0, "hardsigmoid": 1.0, "tanh": 1.0, "softmax": 1.0, "relu6": 6.0,
}
"""Op kinds whose output is bounded whatever their input, by this magnitude (the clamps of
:data:`_CLAMPS` other than ``relu6`` by their own bounds, read from the node)."""


def output_bound(view: GraphView, node: fx.Node) -> float | None:
    """The largest magnitude ``node``'s output can take whatever its input, when its last op
    bounds it (:data:`_BOUNDED`; ``hardtanh``, ``clamp`` or ``clip`` with two finite number
    bounds): ``None`` for an unbounded op.

    An activation after such an op is not computed at the scale of the values before it: a
    ``ReLU6`` of inputs of RMS 1e7 outputs values up to 6 (see
    :data:`fxnumeric.report.DEGENERATE_RMS_RATIO`).

    Example:
        >>> class M(nn.Module):
        ...     def forward(self, x):
        ...         return torch.clamp(torch.sigmoid(x) * x, -3, 2.5)
        >>> view = GraphView(fx.symbolic_trace(M()))
        >>> [output_bound(view, n) for n in view.gm.graph.nodes]
        [None, 1.0, None, 3.0, None]
    """
    cls = view.op_class(node)
    if cls is None or cls.role != "op" or not cls.signature:
        return None
    kind = cls.signature[-1]
    if kind in _BOUNDED:
        return _BOUNDED[kind]
    if kind not in _CLAMPS or len(cls.signature) != 1:
        return None  # a fused clamp's bounds are not the arguments of its node
    bounds = _clamp_bounds(view, node, kind)
    if not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds):
        return None  # one side open, or a tensor bound read at run time
    return float(max(abs(b) for b in bounds))


def _grid_read(view: GraphView, node: fx.Node) -> tuple[float, int] | None:
    """The scale and zero point of the quantized value ``node`` reads first, where the graph
    holds them: the quantize it went through (:func:`quantize_grid`) or the torch quantized
    module that made it (its ``scale`` and ``zero_point``), behind grid-exact ops; ``None``
    elsewhere (a grid computed at run time, a quantized function's arguments)."""
    value = node.all_input_nodes[0] if node.all_input_nodes else None
    while value is not None:
        cls = view.op_class(value)
        if cls is None or cls.is_dequantize:
            return None
        if cls.is_quantize:
            grid = quantize_grid(value, view)
            return None if grid is None else (grid.scale, grid.zero_point)
        if cls.quantized:
            module = view.modules.get(str(value.target)) if value.op == "call_module" else None
            scale, zero_point = (_scalar(getattr(module, "scale", None)),
                                 _scalar(getattr(module, "zero_point", None)))
            return None if scale is None or zero_point is None else (scale, int(zero_point))
        if not _grid_exact(view, value) or not value.all_input_nodes:
            return None
        value = value.all_input_nodes[0]
    return None


def _on_grid(bound: Any, grid: tuple[float, int]) -> bool:
    """Whether ``bound`` (a number, or ``None``: no bound) is a point of ``grid``, as torch
    quantizes a clamp's bound (in a 32-bit range: a bound beyond an 8-bit grid's ends is not
    asked to be one)."""
    if bound is None:
        return True
    if not isinstance(bound, (int, float)):
        return False  # a tensor bound: read at run time
    value = torch.tensor([float(bound)])
    snapped = torch.quantize_per_tensor(value, grid[0], grid[1], torch.qint32).dequantize()
    return bool(torch.equal(snapped, value))


def _grid_exact(view: GraphView, node: fx.Node) -> bool:
    """Whether ``node``, run on a quantized tensor, computes exactly its float result
    (:data:`_GRID_EXACT`; a nearest-neighbour ``interpolate`` or ``nn.Upsample``; a clamp
    whose bounds are points of the grid it reads, :data:`_CLAMPS`)."""
    cls = view.op_class(node)
    if cls is None or cls.role == "plumbing" or view.is_shape(node):
        return True  # passes its input through, or measures it
    if len(cls.signature) != 1:
        return False
    kind = cls.signature[0]
    if kind in _NEAREST_ONLY:
        mode = (getattr(view.modules[str(node.target)], "mode", None)
                if node.op == "call_module"
                else node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest"))
        return mode == "nearest"
    if kind in _CLAMPS:
        grid = _grid_read(view, node)
        return grid is not None and all(_on_grid(b, grid)
                                        for b in _clamp_bounds(view, node, kind))
    return kind in _GRID_EXACT


def holds_quantized(view: GraphView, node: fx.Node) -> bool:
    """Whether ``node``'s value is a torch quantized tensor when the graph runs, read from the
    graph alone: walking back along each node's first input, a quantize (``QuantStub``'s
    ``Quantize``, FX's ``quantize_per_tensor``) comes before any dequantize.

    Between the two, every op runs on quantized tensors: torch's quantized modules and
    functions (eager ``convert``, ``convert_fx``) and the float-capable ops left among them
    (a pool, ``flatten``, ``mean``). Reference FX and pt2e graphs dequantize before each op,
    and dynamic and torchao layers quantize inside the op: their ops read float values. A
    graph input reads as float (a region of a model captured as several regions does not
    know what its caller passes).

    Example:
        >>> g = fx.Graph()
        >>> x = g.placeholder("x")
        >>> q = g.call_function(torch.quantize_per_tensor, (x, 0.1, 0, torch.quint8))
        >>> pooled = g.call_function(torch.mean, (q,))
        >>> dq = g.call_method("dequantize", (pooled,))
        >>> _ = g.output(g.call_function(torch.mean, (dq,)))
        >>> view = GraphView(fx.GraphModule(nn.Module(), g))
        >>> [holds_quantized(view, n) for n in (x, q, pooled, dq)]
        [False, True, True, False]
    """
    return node in _quantized_values(view)


_QUANTIZED_VALUES: weakref.WeakKeyDictionary[GraphView, frozenset[fx.Node]] = (
    weakref.WeakKeyDictionary())
""":func:`_quantized_values` of each view, kept while the view lives."""


def _quantized_values(view: GraphView) -> frozenset[fx.Node]:
    """The nodes of ``view``'s graph whose values are torch quantized tensors
    (:func:`holds_quantized`), found in one pass in graph order and once per view: a walk
    back from each of a deep graph's float ops was quadratic in its length."""
    found = _QUANTIZED_VALUES.get(view)
    if found is None:
        held: set[fx.Node] = set()
        for node in view.nodes:
            cls = view.op_class(node)
            if cls is not None and (cls.is_quantize or (
                    not cls.is_dequantize and node.all_input_nodes
                    and node.all_input_nodes[0] in held)):
                held.add(node)
        found = _QUANTIZED_VALUES[view] = frozenset(held)
    return found


def rounds_on_grid(view: GraphView, node: fx.Node) -> bool:
    """Whether the float-capable op ``node`` reads a quantized tensor (:func:`holds_quantized`)
    and rounds its result onto a grid (it is not grid-exact, :data:`_GRID_EXACT`): the
    quantized model's average pool, ``mean`` or bilinear upsampling of quantized values adds
    an error of its own, though its float twin calls the same function."""
    return not _grid_exact(view, node) and any(
        holds_quantized(view, value) for value in node.all_input_nodes
        if not view.is_shape(value))


def computes_alike(region: Any, pair: Any) -> bool:
    """Whether a pair left in float computes on the quantized side exactly what its float
    twin computes: node for node the same op (the same function, or modules of one class with
    bit-equal weights and equal settings) on the same constants. Quantized pairs never do;
    nor does a float-capable op the quantized model runs on quantized tensors when it rounds
    its result onto the grid (:func:`rounds_on_grid`: an ``AdaptiveAvgPool2d`` between
    quantized layers), while grid-exact ops (``relu``, max pools, views) still do; nor one
    whose value is handed on through a quantize (:meth:`fxnumeric.match.Region.hands_on_rounded`:
    a float SiLU in front of a quantized conv)."""
    if pair.quantized:
        return False
    floats, quants = region.chain(pair, "float"), region.chain(pair, "quant")
    if len(floats) != len(quants) or region.hands_on_rounded(pair):
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
        if not _same_argument(region, (*f.args, *f.kwargs.values()),
                              (*q.args, *(q.kwargs[k] for k in f.kwargs))):
            return False
    return not any(rounds_on_grid(region.quant_view, q) for q in quants)


def _same_argument(region: Any, x: Any, y: Any) -> bool:
    """Whether a float node's argument ``x`` and its quantized twin's ``y`` are alike: values
    both made by the graph, equal constants (a buffer read through plumbing, ``inv.to(x.device)``,
    is evaluated), or tuples and lists of such, item by item (``adaptive_avg_pool2d(x, (1, 1))``,
    ``x.reshape((n, -1))``)."""
    if isinstance(x, fx.Node) and isinstance(y, fx.Node):
        constant_x = region.float_view.producer(x) is None
        if constant_x != (region.quant_view.producer(y) is None):
            return False
        if not constant_x:
            return True
        value_x = evaluate_constant(x, region.float_view)
        value_y = evaluate_constant(y, region.quant_view)
        return value_x is not None and value_y is not None and _same_value(value_x, value_y)
    if isinstance(x, (tuple, list)) and type(x) is type(y):
        return len(x) == len(y) and all(
            _same_argument(region, a, b) for a, b in zip(x, y, strict=True))
    return _same_value(x, y)


def _same_value(a: Any, b: Any) -> bool:
    """Equal plain constants, tuples and lists of them, or bit-equal tensors of one dtype
    and shape.

    A tensor subclass (torchao's ``Int8Tensor``: the weight of a functional ``F.linear``
    quantized by ``quantize_``) equals only itself: it may implement no ``aten.equal``, and
    its reported dtype is not what it stores."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a is b:
            return True
        return (_plain(a) and _plain(b) and a.dtype == b.dtype and a.shape == b.shape
                and not a.is_meta and not b.is_meta and not a.is_quantized
                and not b.is_quantized and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and type(a) is type(b):  # a pool's `(1, 1)` size
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return isinstance(a, _PLAIN) and type(a) is type(b) and a == b


def _plain(t: torch.Tensor) -> bool:
    """A tensor of torch's own class or a Parameter holding one (a Parameter made of a
    subclass takes the subclass's type), not a subclass."""
    return type(t) in (torch.Tensor, nn.Parameter)
