"""Edit a copy of one region's graph: observers on values, float shadows of pairs.

Every region is a pair of graphs, whatever capture made it (a whole model, a submodule, a
leaf module kept whole), so one editor serves all: :class:`GraphCopy` copies a region's graph
and adds

* **observers** as side branches (``observer(value)``; the result is never used, so the
  outputs stay bit-identical; a value a later op overwrites in place is cloned first), and
* **shadows**: a pair's float subgraph copied after the quantized op, fed the dequantized
  values the quantized op read, its output and the quantized output handed to an observer.

What a copied node may call or write is decided by :mod:`fxnumeric.semantics`. Every edit
is followed by ``graph.lint()``, and observer calls are marked impure, so a dead-code pass
(``graph.eliminate_dead_code()``) keeps them.
"""

from __future__ import annotations

import copy
import itertools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import rows as linear_rows
from .._tensors import copy_cache, copy_values, dequantize_all
from ..capture import graph_module
from ..errors import FxNumericError, InstrumentationError
from ..match import Pair, Region
from ..semantics import (
    aliases_of,
    fetch_attr,
    is_dequantize,
    mutated_in_place,
    shadow_copy,
    written_into,
)
from ..view import GraphView

__all__ = ["GraphCopy", "shadow_inputs", "span_inputs", "float_subgraph", "observe_call",
           "reads_at_call", "StandIns", "stand_ins", "behind_quantize", "carried_op",
           "RowShadow"]


@fx.node.has_side_effect  # torch.fx's registry: graph.eliminate_dead_code() keeps the call
def observe_call(observer: nn.Module, *values: Any, where: str = "") -> None:
    """Call ``observer`` on ``values``: the node an observer hangs off a graph by.

    ``where`` names the value observed (``the float model's `fc```). A logger of the user's
    own class that raises is reported as such, with its exception chained: run inside the
    model's forward, its error read as the model failing on its input.
    """
    try:
        observer(*values)
    except FxNumericError:
        raise
    except Exception as exc:
        cls = type(observer)
        if cls.__module__.split(".")[0] == "fxnumeric":
            raise  # fxnumeric's own observers: run_model tells a bug from a bad input
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InstrumentationError(
            f"the logger {cls.__name__} ({cls.__module__}.{cls.__qualname__}) logging "
            f"{where or 'a value'} raised {type(exc).__name__}: {first}\nThe model ran up to "
            f"it: the error is the logger's, not the input's. Fix: {cls.__name__}.forward, "
            "called as logger(output) (a shadow's logger: logger(quantized_output, "
            "float_output))"
        ) from exc


def reads_at_call(observer: nn.Module) -> bool:
    """Whether ``observer`` is done with the values it is given when its call returns (it
    keeps no reference to them): an observer runs right after the node it observes, before
    any later op, so a value a later op overwrites in place (a conv's output under
    ``ReLU6(inplace=True)``) need not be copied for it. Observers say so with a true
    ``reads_at_call`` attribute; any other (a logger that stores tensors) gets a copy."""
    return bool(getattr(observer, "reads_at_call", False))


def float_subgraph(region: Region, pair: Pair) -> list[fx.Node]:
    """The pair's float nodes with the plumbing between them, in graph order, through the
    node carrying the pair's float value (:meth:`Region.output_nodes`).

    A QAT float model hands on a quantized op's value after the op's output fake-quantize,
    which is a node after the pair's chain for a FloatFunctional op (its
    ``activation_post_process``) and in a ``prepare_qat_fx`` graph: the shadow runs it too,
    as a QAT conv's shadow runs the fake-quantize hooked on the conv, and as torch's eager
    ``Shadow`` calls the whole FloatFunctional method.
    """
    chain = region.chain(pair, "float")
    tail = []
    value = region.output_nodes(pair)[0]
    while value is not chain[-1]:  # the fake-quantizes crossed, each reading the one before
        tail.append(value)
        value = value.all_input_nodes[0]
    return region.float_view.with_plumbing(chain + tail)


def shadow_inputs(region: Region, pair: Pair) -> dict[fx.Node, str] | str:
    """``{float node read by the shadow: quantized node carrying its value}``, or why not.

    The quantized chain's own inputs are preferred (they are what the quantized op read);
    otherwise the earliest quantized node carrying the float value.
    """
    return span_inputs(region, float_subgraph(region, pair), region.chain(pair, "quant"))


def span_inputs(region: Region, nodes: list[fx.Node], chain: list[fx.Node], *,
                carried: bool = False) -> dict[fx.Node, str] | str:
    """What a shadow of the float ``nodes`` (a pair's subgraph, or a whole block's) reads:
    ``{float node: quantized node carrying its value}``, preferring the values the quantized
    ``chain`` reads; or why it cannot be shadowed.

    ``carried`` (a block): where the chain reads a value both as it is carried and through a
    quantize/dequantize of its own (a pt2e BERT layer: its residual add reads the hidden
    state, its query/key/value Linears a quantize/dequantize of it), the shadow reads it as
    carried: that quantize belongs to the block. Fed the dequantized copy everywhere, the
    float residual carried an input rounding the quantized block does not have (a block
    that adds nothing read 43 dB against 79 dB)."""
    fv, qv = region.float_view, region.quant_view
    read, _ = _reads(region, nodes, chain, carried)
    last = qv.position(chain[-1])
    inside = set(nodes)
    inputs: dict[fx.Node, str] = {}
    state = written_attributes(fv)
    for n in nodes:
        if n.op == "placeholder":  # the input quantize: its float twin is the input itself
            q = region.quant_counterpart(n)
            if q is None:
                return f"float input `{n.name}` of the shadow has no quantized counterpart"
            inputs[n] = q.name
            continue
        for e in n.all_input_nodes:
            if e.op == "get_attr" and str(e.target) in state and e not in inputs:
                # model state (a running average the forward updates in place): what the
                # quantized op read is the quantized model's own, as it is when the op runs
                q = _attribute_read(qv, str(e.target))
                if q is None:
                    return (f"it reads buffer `{e.target}`, which the float model updates in "
                            "place, and the quantized graph holds no buffer of that name")
                inputs[e] = q.name
                continue
            if e in inside or e.op == "get_attr" or e in inputs:
                continue
            f = fv.producer(e)
            q = (read.get(f) or region.quant_counterpart(f)) if f is not None else None
            if q is None or qv.position(q) > last:
                carrier = f.name if f is not None else e.name
                return f"float input `{carrier}` of the shadow has no quantized counterpart"
            inputs[e] = q.name
    return inputs


_WRITTEN: weakref.WeakKeyDictionary[GraphView, frozenset[str]] = weakref.WeakKeyDictionary()


def written_attributes(view: GraphView) -> frozenset[str]:
    """The targets of ``view``'s ``get_attr`` nodes that its graph writes into in place
    (through the node or an alias of it): a buffer the forward updates at every call
    (``self.ema.add_(0.1 * (m - self.ema))``), model state rather than a constant.

    A shadow reads such a buffer as the quantized op read it, the quantized model's own
    state (:func:`span_inputs`), never the float model's: a copy of the float op writing
    into the float buffer made the float model's running average move twice per batch, and
    read as an error of 30 dB on a layer that has none."""
    found = _WRITTEN.get(view)
    if found is None:
        tensors = {n: value for n in view.gm.graph.nodes if n.op == "get_attr"
                   for value in [_attribute(view, n)] if isinstance(value, torch.Tensor)}
        memory = {_memory(value) for n, value in tensors.items() if written_into(view, n)}
        # and what shares its memory: torch.fx keeps a view of a buffer taken outside any
        # traced value (`self.ema.unsqueeze(0)`) as a constant of its own (_tensor_constant0)
        found = _WRITTEN[view] = frozenset(
            str(n.target) for n, value in tensors.items() if _memory(value) in memory)
    return found


def _memory(tensor: torch.Tensor) -> tuple[str, int]:
    """Where ``tensor``'s elements are kept: views of one tensor share it."""
    if (tensor.is_quantized or tensor.layout != torch.strided
            or tensor.untyped_storage().nbytes() == 0):
        return ("", id(tensor))
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def _attribute(view: GraphView, node: fx.Node) -> Any:
    try:
        return fetch_attr(view.gm, str(node.target))
    except AttributeError:
        return None


def _attribute_read(view: GraphView, target: str) -> fx.Node | None:
    """A ``get_attr`` node of ``view`` reading ``target``, if any."""
    return next((n for n in view.gm.graph.nodes if n.op == "get_attr" and n.target == target),
                None)


@dataclass(frozen=True)
class StandIns:
    """The quantized values a pair's shadow reads in place of the counterparts of its float
    inputs, where the two models compute different things before the pair. Decided here,
    once, for everything that feeds a float op from the quantized model: a pair's shadow
    (:func:`fxnumeric.instrument.instrument`, whose ``Instrumented.strays`` and ``.bypassed``
    these are) and a float layer swapped into a hybrid (:mod:`fxnumeric.advice.hybrid`).

    Attributes:
        strays: ``{float op: quantized value}`` where the quantized chain reads the value of
            an op the float model does not have (``y * 0.5`` after a paired ``relu``) in
            place of the float op's (the relu). A shadow, and a float layer swapped into the
            quantized model, read that value, as torch's eager ``Shadow`` and a model edited
            by hand do; fed the relu's counterpart, they skipped the unpaired op, and its
            error read as the layer's own (a shadow), or vanished (a hybrid).
        bypassed: ``{float op: quantized value}`` the other way round: the float op read is
            one the quantized model lacks (unpaired), and the quantized chain reads the value
            of a paired op before it, which the shadow reads too.

    Both hold at most one entry: the one value of the float ops read that the chain does not
    read, for the one value the chain reads in its place.
    """

    strays: dict[fx.Node, fx.Node] = field(default_factory=dict)
    bypassed: dict[fx.Node, fx.Node] = field(default_factory=dict)


def stand_ins(region: Region, pair: Pair) -> StandIns:
    """What ``pair``'s shadow reads in place of its float inputs' counterparts (see
    :class:`StandIns`); empty where the two models compute the same before the pair."""
    return _reads(region, float_subgraph(region, pair), region.chain(pair, "quant"))[1]


def carried_op(qv: GraphView, value: fx.Node) -> fx.Node:
    """The op whose value quantized ``value`` carries, past a pt2e quantize (``mul ->
    quantize -> dequantize``: the ``mul``): what a stand-in's error is named by."""
    return behind_quantize(qv, qv.producer(value) or value) or value


def _reads(region: Region, nodes: list[fx.Node], chain: list[fx.Node], carried: bool = False
           ) -> tuple[dict[fx.Node, fx.Node], StandIns]:
    """``({float node: quantized value a shadow of float nodes reads for it}, the stand-ins
    among them)``: the values the quantized ``chain`` reads of float nodes' counterparts,
    completed by the stand-ins (see :func:`span_inputs` for ``carried``)."""
    read, strays, shaped = _chain_reads(region, chain, carried)
    outside = _outside_values(region.float_view, nodes)
    found = StandIns(_stray_read(outside, read, strays),
                     _skipped_read(region, outside, read, shaped, strays))
    return read | found.strays | found.bypassed, found


def _chain_reads(region: Region, chain: list[fx.Node], carried: bool = False
                 ) -> tuple[dict[fx.Node, fx.Node], list[fx.Node], set[fx.Node]]:
    """``({float node: quantized value the chain reads of it}, [values the chain reads of ops
    with no float counterpart], {float nodes the chain reads a shape of})`` (see
    :func:`span_inputs` for ``carried``)."""
    qv = region.quant_view
    read: dict[fx.Node, fx.Node] = {}
    shapes: dict[fx.Node, fx.Node] = {}
    strays: list[fx.Node] = []
    members = set(chain)
    for n in chain:
        for i in n.all_input_nodes:
            q = qv.producer(i)
            f = region.float_counterpart(q) if q is not None and q not in members else None
            if f is None and q is not None and q not in members and qv.is_op(q):
                value = _before_dynamic_quantize(qv, i)
                if not qv.is_shape(value) and value not in strays:
                    strays.append(value)
            if f is not None:
                # the value the op reads (`i`), not its producer: in a pt2e graph that is a
                # quantize whose raw int8 output only its dequantize can read; but a shape
                # read off the producer (`torch.arange(x.size(1))`) is not its value: the
                # producer only where the chain reads no value of it
                i = _before_dynamic_quantize(qv, i)
                if qv.is_shape(i):
                    shapes.setdefault(f, q)
                elif f not in read or (carried and is_dequantize(qv, read[f])
                                       and not is_dequantize(qv, i)):
                    read[f] = i
    return shapes | read, strays, set(shapes)


def _skipped_read(region: Region, outside: list[fx.Node], read: dict[fx.Node, fx.Node],
                  shaped: set[fx.Node], strays: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """:attr:`StandIns.bypassed`, the other way round from :func:`_stray_read`: the float
    nodes read (``outside``, from
    :func:`_outside_values`) the value of float ops the quantized model lacks (a layer it
    skips; pairing found the twin by its weights), the quantized chain the value of a paired
    op before them: the shadow reads that, what the quantized op read. Held to that case:
    the value read is a paired op's (not one a quantize no pair claims carries on from the
    model input), the float input an unpaired op's."""
    fv, qv = region.float_view, region.quant_view
    unread = [f for f in outside if f not in read]
    spare = [f for f in read if f not in outside and f not in shaped
             and (p := behind_quantize(qv, qv.producer(read[f]))) is not None
             and region.pair_of(p) is not None]
    if (not strays and len(unread) == 1 and len(spare) == 1 and fv.is_op(unread[0])
            and region.pair_of(unread[0]) is None):
        return {unread[0]: read[spare[0]]}
    return {}


def behind_quantize(qv: GraphView, node: fx.Node | None) -> fx.Node | None:
    """The op whose value ``node`` rounds, past the quantizes in front of its readers (an FX
    graph quantizes a float relu's output for the Linear reading it); else ``node``."""
    while (node is not None and (c := qv.op_class(node)) is not None and c.is_quantize
           and qv.inputs(node)):
        node = qv.inputs(node)[0]
    return node


def _stray_read(outside: list[fx.Node], read: dict[fx.Node, fx.Node],
                strays: list[fx.Node]) -> dict[fx.Node, fx.Node]:
    """:attr:`StandIns.strays`: of the float values read from ``outside``, the one the chain
    does not read, to the one value it reads of an op with no float counterpart; else
    ``{}``."""
    unread = [f for f in outside if f not in read]
    if len(strays) == 1 and len(unread) == 1:
        # the quantized op reads the value of an op the float model does not have (`y * 0.5`
        # after a paired `relu`): the shadow reads what the quantized op read, as torch's
        # eager Shadow does. Fed the float input's counterpart (the relu), the shadow read
        # the unpaired op's error as the layer's own, and named the layer culprit.
        return {unread[0]: strays[0]}
    return {}


def _outside_values(fv: GraphView, nodes: list[fx.Node]) -> list[fx.Node]:
    """The producers of the values float ``nodes`` read from outside them, in order (no
    weights, no shapes)."""
    inside, found = set(nodes), []
    for n in nodes:
        for e in n.all_input_nodes:
            f = fv.producer(e) if e not in inside and e.op != "get_attr" else None
            if f is not None and f not in inside and not fv.is_shape(e) and f not in found:
                found.append(f)
    return found


def _before_dynamic_quantize(qv: GraphView, value: fx.Node) -> fx.Node:
    """The value a dynamic quantize read, where ``value`` is its dequantized output; else
    ``value``. An op quantizing its input per call (a pt2e or reference FX dynamic Linear)
    owns that rounding, as a ``quantize_dynamic`` Linear does: its shadow reads the value
    before it. Fed the dequantized value, every shadow but the first read weights only (fc1:
    50.15 dB against 48.79 by an fx Interpreter), and the rounding was in no row."""
    if not is_dequantize(qv, value) or not value.all_input_nodes:
        return value
    quantize = value.all_input_nodes[0]
    if not qv.is_dynamic_quantize(quantize) or not quantize.all_input_nodes:
        return value
    return quantize.all_input_nodes[0]


class GraphCopy:
    """A copy of one side of a region's graph being instrumented; :meth:`finish` builds its
    GraphModule."""

    def __init__(self, region: Region, side: str) -> None:
        view = region.view(side)
        source = view.gm
        # the copy shares the source's submodules until finish() points them elsewhere
        self.gm = graph_module(source, copy.deepcopy(source.graph), type(source).__name__)
        self.graph = self.gm.graph
        self.calls = [str(n.target) for n in source.graph.nodes if n.op == "call_module"]
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.modules = view.modules  # what the copied nodes call, for in-place questions
        self.view = view
        self.side, self.scope = side, region.scope(side)

    def _where(self, node: fx.Node) -> str:
        """``node``'s value, as an error names it: ``the quantized model's `layer1.0.conv1```
        (its module's path, else its node's name)."""
        name = str(node.target) if node.op == "call_module" else node.name
        path = f"{self.scope}.{name}" if self.scope else name
        return f"the {'float' if self.side == 'float' else 'quantized'} model's `{path}`"

    def finish(self, calls: nn.Module | None = None) -> fx.GraphModule:
        """The instrumented GraphModule (its code is generated on first run).

        Args:
            calls: the module the graph's ``call_module`` targets are read from (a copy of
                the user's model, or a submodule of one, that holds other instrumented
                regions); default: the modules of the traced graph (the user's).
        """
        if calls is not None:
            for target in self.calls:
                self.gm.set_submodule(target, calls.get_submodule(target))
        self.graph.lint()
        self.gm.recompile()
        return self.gm

    def observe(self, node_name: str, observer: nn.Module, target: str,
                twice: bool = False) -> None:
        """Call ``observer(value of node)`` right after the node (``observer(value, value)``
        with ``twice``: a shadow observer of a pair whose shadow would compute the value
        again, :func:`fxnumeric.semantics.computes_alike`).

        An observer with a true ``takes_linear`` attribute, of a node that is a Linear
        reading its input positionally (``nn.Linear``'s own forward, ``F.linear``), is called
        as ``observer(value, linear, args, kwargs)``: ``linear`` the module (``None`` for the
        function), ``args`` and ``kwargs`` what it was called with, so that it may hold the
        value as the Linear and its input (:class:`fxnumeric.rows.LinearRows`)."""
        self.gm.add_submodule(target, observer)
        node = self.nodes[node_name]
        graph = self.graph
        with graph.inserting_after(node):
            logged = node
            if self._overwritten(node, observer):
                logged = graph.call_function(copy_values, (node,))
            with graph.inserting_after(logged):
                holder = graph.get_attr(target)
            values: tuple[Any, ...] = (logged, logged) if twice else (logged,)
            cursor = holder
            if getattr(observer, "takes_linear", False) and self._is_row_linear(node):
                linear = None
                if node.op == "call_module":
                    with graph.inserting_after(holder):
                        cursor = linear = graph.get_attr(str(node.target))
                values += (linear, node.args, node.kwargs)
            with graph.inserting_after(cursor):
                graph.call_function(observe_call, (holder, *values),
                                    {"where": self._where(node)})

    def _is_row_linear(self, node: fx.Node) -> bool:
        """Whether ``node`` (of this copy) is a Linear of the source graph whose output rows
        each read the same input row alone (:func:`_row_linear`)."""
        view = self.view
        return view.has_node(node.name) and _row_linear(view, [view.node(node.name)]) is not None

    def _overwritten(self, node: fx.Node, observer: nn.Module) -> bool:
        """Whether ``node``'s value may be overwritten in place while ``observer`` still
        holds it: by a later op of the graph, or by the code the graph returns it to (an
        observer done with it when its call returns never needs a copy; one with a true
        ``checks_overwrites`` attribute reads the value's version counter to find out).

        A write into any value that may alias it counts (:func:`fxnumeric.semantics.aliases_of`:
        a view of it, or the tensor itself handed on by a ``DeQuantStub``, an ``nn.Identity``,
        eval-mode dropout, ``.contiguous()``, ``.to()``), and so does returning it or an
        alias: the model's caller (``out = model(x); out.mul_(0)``), or the untraced model code
        around a submodule's graph (Falcon's ``mlp_output += attention_output``), may write
        into what it receives. Only values a logger keeps are copied, and only those."""
        if reads_at_call(observer):
            return False
        # the value, and every alias of it (read on the source graph, whose node names the
        # copy keeps): an op writing into an alias writes into the value
        view = self.view
        value = view.producer(view.node(node.name))
        aliases = [value, *aliases_of(view, value)] if value is not None else []
        copied = [self.nodes[a.name] for a in aliases if a.name in self.nodes]
        if any(mutated_in_place(a, self.modules) for a in (node, *copied)):
            return True
        if getattr(observer, "checks_overwrites", False):
            return False
        return _returned(view.output, aliases)

    def before_overwrite(self, node_name: str, chain: tuple[str, ...]) -> str:
        """``node_name``, or a copy of its value taken before an op of ``chain`` overwrites it
        in place (``aten.add_`` writes into its first input, which a shadow must read as it
        was). ``chain`` holds the graph's own node names."""
        node = self.nodes[node_name]
        ops = [self.nodes[n] for n in chain]
        # read on the source graph, whose node names the copy keeps: a write through an
        # alias of the value (`x.contiguous().add_(1)`) writes into it too
        view = self.view
        if node.op == "get_attr":
            # a buffer is one tensor however many nodes read it (`ema` read by a sub,
            # `ema_1` by the add_ after it): its value as the chain's first op found it
            reads = [view.node(n.name) for n in self.graph.nodes
                     if n.op == "get_attr" and n.target == node.target and view.has_node(n.name)]
            among = {view.node(n) for n in chain}
            if not any(written_into(view, n, among) for n in reads):
                return node_name
            with self.graph.inserting_before(ops[0]):
                fresh = self.graph.get_attr(str(node.target))
                copied = self.graph.call_method("clone", (fresh,))
            self.nodes[copied.name] = copied
            return copied.name
        if view.has_node(node_name):
            written = written_into(view, view.node(node_name), {view.node(n) for n in chain})
        else:  # a node this copy added (a snapshot): its own users only
            written = written_into(view, node, set(ops))
        if not written:
            return node_name
        with self.graph.inserting_before(ops[0]):
            copied = self.graph.call_method("clone", (node,))
        self.nodes[copied.name] = copied
        return copied.name

    def before_run(self, node_name: str, chain: tuple[str, ...]) -> str:
        """A node giving ``node_name``'s value as it was before ``chain`` ran: a copy when it
        is a key/value cache (the chain appends its keys and values to it, and a shadow of the
        chain must read the cache without them), else the value itself."""
        with self.graph.inserting_before(self.nodes[chain[0]]):
            snapshot = self.graph.call_function(copy_cache, (self.nodes[node_name],))
        self.nodes[snapshot.name] = snapshot
        return snapshot.name

    def shadow(self, anchor_name: str, float_view: GraphView, nodes: list[fx.Node],
               inputs: dict[fx.Node, str], observer: nn.Module, prefix: str) -> None:
        """Copy float ``nodes`` after ``anchor``, fed dequantized ``inputs``; observe both."""
        graph = self.graph
        anchor = self.nodes[anchor_name]
        holder = nn.Module()
        self.gm.add_submodule(prefix, holder)
        cursor = anchor
        env: dict[fx.Node, fx.Node] = {}

        def emit(make: Callable[[], fx.Node]) -> fx.Node:
            nonlocal cursor
            with graph.inserting_after(cursor):
                cursor = make()
            return cursor

        dtype = _weights_dtype(float_view, nodes)
        for float_node, quant_name in inputs.items():
            quant_node = self.nodes[quant_name]
            # a bfloat16 quantized model's values feed a float32 twin in float32
            env[float_node] = emit(lambda q=quant_node: graph.call_function(
                dequantize_all, (q,) if dtype is None else (q, dtype)))
            if written_into(float_view, float_node, set(nodes)):
                # the copy writes into its input, which may be the quantized graph's own tensor
                env[float_node] = emit(lambda d=env[float_node]: graph.call_method("clone", (d,)))
        copied: dict[str, str] = {}
        # a large Linear's output, for an observer that sums it by rows: a block at a time
        by_rows = (_row_linear(float_view, [n for n in nodes if n not in env])
                   if getattr(observer, "takes_rows", False) else None)
        for n in nodes:
            if n in env:  # a model input, read as the quantized graph has it
                continue
            for attr_node in n.all_input_nodes:
                if attr_node.op == "get_attr" and attr_node not in env:
                    name = f"attr{len(copied)}"
                    value = shadow_copy(fetch_attr(float_view.gm, str(attr_node.target)))
                    if isinstance(value, nn.Module):
                        holder.add_module(name, value)
                    elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                        holder.register_buffer(name, value)  # e.g. an exported BN's running_mean
                    else:
                        setattr(holder, name, value)
                    copied[str(attr_node.target)] = name
                    env[attr_node] = emit(lambda name=name: graph.get_attr(f"{prefix}.{name}"))
            if n.op == "call_module":
                local = copied.get(str(n.target))
                if local is None:
                    local = copied[str(n.target)] = f"m{len(copied)}"
                    holder.add_module(local, shadow_copy(float_view.modules[n.target]))
                if n is by_rows:  # run by the observer's call below
                    holder.add_module("rows", RowShadow(observer, holder.get_submodule(local)))
                    continue
                env[n] = emit(lambda n=n, local=local: graph.create_node(
                    "call_module", f"{prefix}.{local}",
                    fx.map_arg(n.args, env.__getitem__), fx.map_arg(n.kwargs, env.__getitem__)))
            elif n is by_rows:
                holder.add_module("rows", RowShadow(observer, n.target))
            else:
                env[n] = emit(lambda n=n: graph.node_copy(n, env.__getitem__))
        logged = anchor
        if self._overwritten(anchor, observer):
            logged = emit(lambda: graph.call_function(copy_values, (anchor,)))
        holder.add_module("logger", observer)
        # an observer that asks for them also gets the (dequantized) values the shadow read
        extra = tuple(env[f] for f in inputs) if getattr(observer, "takes_inputs", False) else ()
        if by_rows is None:  # observer(quantized output, float output, *inputs)
            called, values = "logger", (env[nodes[-1]],)
        else:  # the RowShadow runs the Linear on the arguments it reads (its input first)
            called = "rows"
            values = (fx.map_arg(by_rows.args, env.__getitem__),
                      fx.map_arg(by_rows.kwargs, env.__getitem__))
        target = emit(lambda: graph.get_attr(f"{prefix}.{called}"))
        emit(lambda: graph.call_function(observe_call, (target, logged, *values, *extra),
                                         {"where": f"the shadow of {self._where(anchor)}"}))



def _row_linear(view: GraphView, ops: list[fx.Node]) -> fx.Node | None:
    """The one node of a shadow (``ops``: its nodes but the inputs it reads) if it is a
    Linear reading its input positionally (``nn.Linear``'s own forward, ``F.linear``, ATen's
    ``linear``): each row of its output reads the same row of its input alone, so its output
    can be computed a block of rows at a time; else ``None``."""
    ops = [n for n in ops if n.op != "get_attr"]
    if len(ops) != 1 or not ops[0].args:
        return None
    node = ops[0]
    if node.op == "call_module":
        module = view.modules.get(str(node.target))
        linear = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
    else:
        linear = node.op == "call_function" and node.target in linear_rows.LINEAR_FUNCTIONS
    return node if linear else None


class RowShadow(nn.Module):
    """A one-Linear shadow that computes its float output a block of rows at a time, for an
    observer whose sums add up over blocks of rows (:meth:`GraphCopy.shadow`).

    The float twin of a quantized ``lm_head`` otherwise makes a third logits-sized tensor
    (512 tokens x 49152 words: 96 MiB in float32; 1 GiB for Llama-3's 128256 words x 2048
    tokens) while the float and quantized logits are alive: compare's peak on an LLM whose
    head is quantized (``quantize_dynamic``'s; a tied head torchao leaves float has no shadow).
    Past :data:`fxnumeric.rows.ROW_BLOCK` values, the input's leading dims are read as rows
    and the Linear runs on that many values' worth of them at a time; each block of output goes to
    the observer and is dropped before the next is computed.

    Called (by :func:`observe_call`) as ``rows(quantized_output, linear_args, linear_kwargs,
    *inputs)``. The observer, which must have a true ``takes_rows`` attribute, is then called
    as ``observer.observe_rows(quantized_output, blocks, *inputs)``, ``blocks`` yielding
    ``(first row, float output block)`` in order, its rows those of
    ``quantized_output.flatten(0, -2)`` from that row on; below the bound (or when the
    quantized output's rows are not the input's) as any shadow observer,
    ``observer(quantized_output, float_output, *inputs)``.
    """

    def __init__(self, observer: nn.Module, linear: Callable[..., Any]) -> None:
        super().__init__()
        self.observers = [observer]  # a list: held as the shadow's `logger`, not twice
        self.linear = linear  # an nn.Linear (a submodule), or F.linear / aten.linear

    def forward(self, quant: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                *inputs: Any) -> None:
        rows = _block_rows(quant, args, self._out_features(args, kwargs))
        observer = self.observers[0]
        if not rows:
            observer(quant, self.linear(*args, **kwargs), *inputs)
            return
        observer.observe_rows(quant, self._blocks(rows, args, kwargs), *inputs)

    def _out_features(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        if isinstance(self.linear, nn.Module):  # hooked or not: it is run as called
            weight = self.linear.weight
        else:
            operands = linear_rows.linear_operands(self.linear, args, kwargs)
            weight = operands[1] if operands is not None else None
        return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 \
            else None

    def _blocks(self, rows: int, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> Iterator[tuple[int, torch.Tensor]]:
        x, rest = args[0], args[1:]
        flat = x.reshape(-1, x.shape[-1])
        for start in range(0, flat.shape[0], rows):
            yield start, self.linear(flat[start:start + rows], *rest, **kwargs)


def _block_rows(quant: Any, args: tuple[Any, ...], out_features: int | None) -> int:
    """Rows per block of a Linear's output past :data:`fxnumeric.rows.ROW_BLOCK` values; 0 to
    compute it whole: a small output, or a quantized output whose rows are not its input's (the
    observer then reads a shape mismatch, as it would unchunked)."""
    x = args[0] if args else None
    if (not isinstance(quant, torch.Tensor) or not isinstance(x, torch.Tensor)
            or not (quant.is_floating_point() or quant.is_quantized)
            or quant.numel() <= linear_rows.ROW_BLOCK or x.dim() < 2
            or quant.shape[:-1] != x.shape[:-1]
            or out_features != quant.shape[-1]):
        return 0
    return linear_rows.rows_per_block(out_features)


def _returned(output: fx.Node, values: list[fx.Node]) -> bool:
    """Whether any of ``values`` reaches the graph's ``output``: directly (torch.fx writes a
    returned dict, list or tuple into the output's arguments) or inside an object a class
    call builds (``Out(y)`` for a NamedTuple, a Hugging Face ``ModelOutput``)."""
    todo, seen = list(values), set(values)
    while todo:
        for user in todo.pop().users:
            if user is output:
                return True
            if user.op == "call_function" and isinstance(user.target, type) and user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def _weights_dtype(view: GraphView, nodes: list[fx.Node]) -> torch.dtype | None:
    """The floating dtype of the first weight (parameter or buffer) ``nodes`` read, or None."""
    for n in nodes:
        if n.op == "call_module":
            held = itertools.chain(view.modules[n.target].parameters(),
                                   view.modules[n.target].buffers())
        elif n.op == "get_attr":
            value = fetch_attr(view.gm, str(n.target))
            held = (value.parameters() if isinstance(value, nn.Module)
                    else [value] if isinstance(value, torch.Tensor) else [])
        else:
            continue
        for tensor in held:
            if tensor.is_floating_point():
                return tensor.dtype
    return None
