"""The graph view: one condensed picture of a traced graph, built once, read by every stage.

A :class:`GraphView` answers, for each node of a traced GraphModule, the questions that
matching, instrumentation, weight pairing, explanations and reports all ask:

* what it computes (:meth:`GraphView.op_class`, from :mod:`fxnumeric.ops`) and whether it is
  an op at all, or plumbing that passes its input through (Identity, DeQuantStub,
  ``dequantize``, observers, eval-mode dropout);
* where it sits (:meth:`GraphView.position`) and what its user calls it
  (:meth:`GraphView.name`: module path, owning FloatFunctional, or node name);
* which op really produced the value it reads (:meth:`GraphView.producer`: plumbing
  resolved), and which ops read its value (:meth:`GraphView.consumers`).

Plumbing vanishes from the condensed graph; its edges pass through::

    traced:     x -> quant -> conv1 -> dequant -> fc -> output
    condensed:  x -> quant -> conv1 ----------> fc -> output
                producer(dequant) is conv1; consumers(conv1) == [fc]

A :class:`fxnumeric.Matching` owns one view per side (``matching.float_view``,
``matching.quant_view``), so no later stage re-derives any of this from node names.
The view reads the GraphModule and never changes it.
"""

from __future__ import annotations

import operator
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from . import flows
from .ops import OpClass, classify, index_of
from .optypes import PLUMBING

__all__ = ["GraphView", "MODULE_ATTRS"]

MODULE_ATTRS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
    "in_features", "out_features", "num_features", "normalized_shape", "num_embeddings",
    "embedding_dim", "input_size", "hidden_size", "num_layers", "bidirectional",
)
"""Module attributes compared between counterparts, in the order :meth:`GraphView.attrs` gives."""

_CALLS = ("call_module", "call_function", "call_method")
_APP = ".activation_post_process"


class GraphView:
    """A traced graph condensed to its ops.

    Args:
        gm: the traced GraphModule (read, never modified).
        root: the user's model ``gm`` was traced from, to find modules the GraphModule does
            not hold itself (the FloatFunctional that owns a functional op). Defaults to
            ``gm``.

    Attributes:
        gm: the GraphModule.
        modules: ``gm``'s submodules by qualified name (duplicates kept).
        nodes: every node, in graph order.
        graph: the condensed ``networkx.DiGraph`` of ops, placeholders and the output node,
            built once with the view; an edge ``a -> b`` means op ``b`` reads the value ``a``
            produced. The matcher walks it (:mod:`fxnumeric.pairing`).
        placeholders: the input nodes whose value the graph uses, in order: not those of
            arguments only checked (fixed when tracing, :func:`fixed_inputs`; read by guards
            alone) or never read (``forward(x, unused=None)``), which carry no value into it.
        output: the output node.

    Example:
        >>> import torch
        >>> from fxnumeric import trace
        >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Identity(),
        ...                                torch.nn.ReLU()))
        >>> view = GraphView(gm)
        >>> [n.name for n in view.ops()]
        ['_0', '_2']
        >>> view.producer(view.node("_1")).name, [c.name for c in view.consumers(view.node("_0"))]
        ('_0', ['_2'])
    """

    def __init__(self, gm: fx.GraphModule, root: nn.Module | None = None) -> None:
        self.gm = gm
        self.root = root if root is not None else gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules(remove_duplicate=False))
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self.placeholders: list[fx.Node] = []
        self.output: fx.Node | None = None
        self._by_name = {n.name: n for n in self.nodes}
        self._position = {n: i for i, n in enumerate(self.nodes)}
        self._cls: dict[fx.Node, OpClass] = {}
        self._producer: dict[fx.Node, fx.Node | None] = {}
        self._inputs: dict[fx.Node, list[fx.Node]] = {}
        self._consumers: dict[fx.Node, list[fx.Node]] = {}
        self._attrs: dict[fx.Node, tuple[Any, ...]] = {}
        self._named: dict[str, list[fx.Node]] | None = None
        self._order: list[fx.Node] | None = None
        self._sources: list[fx.Node] | None = None
        _, guards = fixed_inputs(self.nodes)
        shapes = self._shapes = shape_values(self.nodes) | guards
        for n in self.nodes:
            if n.op == "get_attr":
                self._producer[n] = None
                continue
            ins = list(dict.fromkeys(
                p for p in (self._producer.get(i) for i in n.all_input_nodes) if p is not None
            ))
            if n.op == "placeholder":
                self.placeholders.append(n)
            elif n.op == "output":
                self.output = n
            else:
                c = PLUMBING if n in shapes else classify(n, self.modules)
                assert c is not None  # every call_* node has a class
                self._cls[n] = c
                if c.role == "plumbing":
                    # it passes on its first argument: `inv_freq.to(device=x.device)` carries
                    # the constant inv_freq (no producer), not the device
                    data = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
                    self._producer[n] = (self._producer.get(data) if data is not None
                                         else ins[0] if ins else None)
                    continue
            self._producer[n] = n
            self._inputs[n] = ins
            self._consumers[n] = []
            for i in ins:
                self._consumers[i].append(n)
        # the condensed graph: its nodes are the ops, placeholders and output (in graph order),
        # an edge per value read, in argument order (networkx keeps insertion order)
        g = nx.DiGraph()
        g.add_nodes_from(self._inputs)
        g.add_edges_from((i, n) for n, ins in self._inputs.items() for i in ins)
        self.graph = g
        self.placeholders = [n for n in self.placeholders if n in self._read()]

    def _read(self) -> set[fx.Node]:
        """The nodes of the condensed graph whose value the graph uses: they reach the output
        or an op with a side effect, as torch.fx's dead-code elimination keeps them.

        A placeholder outside it is an argument the graph never reads, which carries no value
        into it: one torch.fx fixed when tracing (only its checks read it, and they are
        plumbing), one read only by other checks (torch.export's guards), one the forward
        ignores (``forward(x, unused=None)``; convert_fx's dead-code elimination leaves its
        placeholder without users, a plain trace may leave dead ops on it). Both sides of a
        pairing drop it alike, whether fxnumeric traced them or took a GraphModule as it is.
        """
        g = self.graph
        sinks = [n for n in g if n.op == "output" or (
            not g.succ[n] and n in self._cls and n.is_impure(impure_random=False))]
        read, todo = set(sinks), list(sinks)
        while todo:
            for p in g.pred[todo.pop()]:
                if p not in read:
                    read.add(p)
                    todo.append(p)
        return read

    # ------------------------------------------------------------------ lookups
    def node(self, name: str) -> fx.Node:
        """The node called ``name`` (``KeyError`` if there is none)."""
        return self._by_name[name]

    def has_node(self, name: str) -> bool:
        """Whether the graph has a node called ``name``."""
        return name in self._by_name

    def position(self, n: fx.Node) -> int:
        """``n``'s index in graph (topological) order."""
        return self._position[n]

    def op_class(self, n: fx.Node) -> OpClass | None:
        """What ``n`` computes; ``None`` for placeholders, outputs and ``get_attr`` nodes."""
        return self._cls.get(n)

    def is_op(self, n: fx.Node) -> bool:
        """Whether ``n`` computes something (it is not plumbing, an input or the output)."""
        c = self._cls.get(n)
        return c is not None and c.role != "plumbing"

    def is_dynamic_quantize(self, n: fx.Node) -> bool:
        """Whether ``n`` is a quantize whose scale is computed from the value at run time
        (``choose_qparams`` before it in a pt2e or torchao graph,
        ``torch.quantize_per_tensor_dynamic`` in a reference FX one): dynamic quantization,
        which the op reading it does per call, as a ``quantize_dynamic`` Linear does inside
        itself. A static quantize reads constants (numbers, ``get_attr`` tensors)."""
        c = self._cls.get(n)
        if c is None or not c.is_quantize:
            return False
        if getattr(n.target, "__name__", None) == "quantize_per_tensor_dynamic":
            return True
        qparams = [*n.args[1:], *n.kwargs.values()]
        return any(isinstance(a, fx.Node) and a.op != "get_attr" for a in qparams)

    def is_shape(self, n: fx.Node) -> bool:
        """Whether ``n`` is a shape value (:func:`shape_values`): plumbing that does not carry
        its producer's value, only something measured on it."""
        return n in self._shapes

    def ops(self) -> list[fx.Node]:
        """Every op, in graph order."""
        return [n for n in self.nodes if self.is_op(n)]

    def module(self, n: fx.Node) -> nn.Module | None:
        """The module ``n`` calls, or the FloatFunctional owning a functional op, else None."""
        if n.op == "call_module":
            return self.modules[n.target]
        owner = self._owner_path(n)
        return self.root.get_submodule(owner) if owner is not None else None

    # ------------------------------------------------------------------ dataflow
    def producer(self, n: fx.Node) -> fx.Node | None:
        """The op (or input) whose value ``n`` carries: ``n`` itself unless it is plumbing.

        ``None`` for ``get_attr`` nodes and plumbing that reads no value.
        """
        return self._producer.get(n)

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        """The producers of the values op ``n`` reads, without duplicates, in argument order."""
        return self._inputs.get(n, [])

    def consumers(self, n: fx.Node) -> list[fx.Node]:
        """The ops (and the output node) that read the value op ``n`` produced."""
        return self._consumers.get(n, [])

    def sole_consumer(self, n: fx.Node) -> fx.Node | None:
        """The one op that reads ``n``'s value, if exactly one does."""
        users = self._consumers.get(n, ())
        return users[0] if len(users) == 1 and self.is_op(users[0]) else None

    def with_plumbing(self, chain: list[fx.Node]) -> list[fx.Node]:
        """``chain`` plus the plumbing between its ops, in graph order.

        The plumbing kept is what a chain node reads, through plumbing only, from another
        chain node or from a constant (``inv_freq.to(x.device)``), and the shapes it reads
        (:func:`shape_values`: computed again from the tensor they measure, which a copy then
        reads from outside): copying these nodes reproduces the chain's computation exactly.
        """
        inside = set(chain)
        frontier = list(chain)
        while frontier:
            n = frontier.pop()
            for i in n.all_input_nodes:
                if i in inside or not self._is_plumbing(i):
                    continue
                source = self._producer.get(i)
                if source is None or source in inside or self.is_shape(i):
                    inside.add(i)
                    frontier.append(i)
        return sorted(inside, key=self._position.__getitem__)

    def value_node(self, n: fx.Node, passable: set[fx.Node] | frozenset = frozenset(), *,
                   quantize: bool = False, fake_quants: bool = False) -> fx.Node:
        """The node carrying ``n``'s value as the next op reads it.

        Where ``n``'s output is quantized by a quantize node that reads it (a reference FX or
        pt2e graph: ``conv -> quantize -> dequantize -> next op``; convert_fx's
        ``quantize_per_tensor`` after an op left in float, in front of the quantized op
        reading it), that is the last node of the chain, the value the next quantized op
        reads. Otherwise ``n``. Only static quantize nodes in ``passable`` (those no pair
        claims) are crossed: a dynamic one belongs to the op reading it, which rounds its
        input per call. Where ``n`` is also read as it is (a pt2e ``cat`` read by a float
        ``max_pool2d`` and, through a quantize, by convs), the quantize is crossed all the
        same, so that its rounding is in ``n``'s row; of several, the first in graph order.
        ``quantize=True``: ``n`` is a quantize itself, read after its own dequantize (pt2e's
        int8 is not a value to read). ``fake_quants=True``: an enabled fake-quantize that is
        ``n``'s only reader (a QAT prepared model's output fake-quant) is crossed too: it is
        the op's output quantize, as a converted model's quantized op includes it.
        """
        cur, best, crossed = n, n, quantize
        while True:
            users = sorted(cur.users, key=self._position.__getitem__)
            if not users:
                return best
            quantizes = [u for u in users if u in passable and self._cls[u].role == "optional"
                         and not self.is_dynamic_quantize(u)]
            if fake_quants and len(users) == 1 and self.fake_quantizes(users[0]):
                cur = best = users[0]
            elif quantizes:
                cur = best = quantizes[0]
                crossed = True
            elif crossed and all(self._is_plumbing(u) for u in users):
                # one dequantize per consumer (pt2e duplicates them): they all carry one value
                cur = best = users[0]
            else:
                return best

    def fake_quantizes(self, n: fx.Node) -> bool:
        """Whether ``n`` calls a fake-quantize module that is on (it changes values)."""
        module = self.modules.get(n.target) if n.op == "call_module" else None  # type: ignore[arg-type]
        return flows.fake_quantizes(module)

    def _is_plumbing(self, n: fx.Node) -> bool:
        c = self._cls.get(n)
        return c is not None and c.role == "plumbing"

    def topological_order(self) -> list[fx.Node]:
        """The condensed graph's nodes in topological order, ties broken by graph position:
        the order the matcher walks (so results never depend on hash seeds)."""
        if self._order is None:
            self._order = list(nx.lexicographical_topological_sort(
                self.graph, key=self._position.__getitem__))
        return self._order

    def sources(self) -> list[fx.Node]:
        """The ops that read no value (constants, ``arange``): a walk's starting points."""
        if self._sources is None:
            self._sources = [n for n in self.ops() if not self.graph.pred[n]]
        return self._sources

    def ops_named(self, name: str) -> list[fx.Node]:
        """The ops whose :meth:`name` is ``name``, in graph order (an index built once)."""
        if self._named is None:
            named: dict[str, list[fx.Node]] = {}
            for n in self.ops():
                named.setdefault(self.name(n), []).append(n)
            self._named = named
        return self._named.get(name, [])

    def neighbourhood(self, focus: list[fx.Node], radius: int) -> set[fx.Node]:
        """The ops within ``radius`` edges of ``focus`` (either direction)."""
        undirected = self.graph.to_undirected(as_view=True)
        near: set[fx.Node] = set()
        for n in focus:
            if n in undirected:
                near.update(nx.single_source_shortest_path_length(undirected, n, cutoff=radius))
        return {n for n in near if self.is_op(n)}

    # ------------------------------------------------------------------ naming
    def name(self, n: fx.Node) -> str:
        """Module path, owning FloatFunctional path, a flow's name for it, or node name."""
        flow_name = flows.pair_name(n)
        if flow_name is not None:
            return flow_name
        if n.op == "call_module":
            return str(n.target)
        owner = self._owner_path(n)
        return owner if owner is not None else n.name

    def _owner_path(self, n: fx.Node) -> str | None:
        # a FloatFunctional's op is followed by its activation_post_process (observer)
        if len(n.users) == 1:
            (user,) = n.users
            if user.op == "call_module" and str(user.target).endswith(_APP):
                return str(user.target)[: -len(_APP)]
        return None

    def attrs(self, n: fx.Node) -> tuple[Any, ...]:
        """The module attributes in :data:`MODULE_ATTRS` (None where absent); for an
        indexing op (``getitem``, ``select``, ``slice``) its index, in one form
        (:func:`fxnumeric.ops.index_of`); ``()`` for other functions."""
        cached = self._attrs.get(n)
        if cached is None:
            cached = self._attrs[n] = self._compute_attrs(n)
        return cached

    def _compute_attrs(self, n: fx.Node) -> tuple[Any, ...]:
        if n.op == "call_module":
            mod = self.modules[n.target]
            if (isinstance(mod, nn.Sequential) and len(mod)
                    and not isinstance(getattr(mod, "weight", None), torch.Tensor)):
                mod = mod[0]  # a fused float module: its first part is the conv/linear
            return tuple(getattr(mod, a, None) for a in MODULE_ATTRS)
        if self._cls[n].signature == ("getitem",):
            # `x[:, 0]`, `x.select(1, 0)` and torch.export's `aten.select.int(x, 1, 0)` alike
            return index_of(n)
        return ()


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
_SHAPE_ARITHMETIC = frozenset({operator.getitem, operator.add, operator.sub, operator.mul,
                               operator.floordiv, operator.truediv, operator.mod, operator.neg})


def shape_values(nodes: list[fx.Node]) -> set[fx.Node]:
    """The nodes of a traced graph that compute a tensor's shape (or dtype, device), and
    arithmetic on those alone (shufflenet's ``num_channels // groups`` from ``x.size()``;
    a function of the model's own package kept whole by ``torch.fx.wrap`` and fed shapes
    only, as video Swin's ``_compute_pad_size_3d``): plumbing, never a layer. Another capture
    of the model has none of them (an exported graph's shapes are constants), so as ops they
    were rows without values, or "not compared", and a shadow of one fed a shape to code that
    reads a tensor's ``.size()``."""
    found: set[fx.Node] = set()
    for n in nodes:
        if n.op == "call_method" and n.target in _SHAPE_METHODS:
            found.add(n)
        elif n.op != "call_function":
            continue
        elif n.target is getattr and len(n.args) > 1 and n.args[1] in _SHAPE_ATTRIBUTES:
            found.add(n)
        elif ((n.target in _SHAPE_ARITHMETIC or not _of_torch(n.target)) and n.all_input_nodes
              and all(i in found for i in n.all_input_nodes)):
            found.add(n)
    return found


def fixed_inputs(nodes: list[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """The placeholders of arguments torch.fx fixed when tracing (its ``concrete_args``:
    ``mask=None`` left out by the call the graph stands for), and torch.fx's checks of them
    (``_assert_is_none(mask_1)``; ``torch._assert(flag_1 == False)``).

    Such a placeholder is kept by torch.fx only to check at run time that the value is the
    one fixed: no value of it enters the graph, so it is no input to pair (a model exported
    on the same call has no placeholder for it) and its checks are plumbing.
    """
    placeholders = [n for n in nodes if n.op == "placeholder"]
    guards: set[fx.Node] = set()
    for n in placeholders:
        for user in n.users:
            if user.op != "call_function" or not user.args or user.args[0] is not n:
                continue
            if user.target is torch.fx._symbolic_trace._assert_is_none:
                guards.add(user)
            elif (user.target is operator.eq and user.users
                  and all(u.target is torch._assert for u in user.users)):
                guards |= {user, *user.users}
    fixed = {n for n in placeholders if n.users and all(u in guards for u in n.users)}
    return fixed, guards


def _of_torch(fn: Any) -> bool:
    """Whether ``fn`` may be torch's own (``torch.arange`` of a shape makes a tensor: an op;
    ``aten`` ops' module is ``torch._ops.aten``); a function of unknown origin counts too."""
    module = getattr(fn, "__module__", None)
    return not isinstance(module, str) or module.split(".")[0] == "torch"
