"""Stage 2, match: pair the nodes of a float graph with those of its quantized graph.

Both graphs are condensed into views of their ops (:class:`fxnumeric.GraphView`, whose
``graph`` is a ``networkx`` DiGraph): plumbing nodes (Identity, DeQuantStub, ``dequantize``,
eval-mode dropout, observers) disappear and their edges pass through; ``get_attr`` nodes
(weights, scales) are not dataflow. The views are kept in the :class:`Matching`, for every
later stage to read. Pairing is then a single
walk over the quantized ops in topological order. For each one it looks among the float ops
that consume the float counterparts of its inputs, and aligns *chains*: a quantized op and a
float op pair when their kinds agree, and a fused op pairs with a chain of float ops whose
kinds add up to its signature, a BatchNorm after a conv or linear being absorbed (folded)::

    float:      x -> conv1 -> bn1 -> relu -> maxpool          (unfused nn.Module)
    quantized:  x -> quantize -> conv1 (ConvReLU2d) -> maxpool (eager or FX quantized)

    pairs:      ('conv2d-relu', float=(conv1, bn1, relu), quantized=(conv1,))
                ('max_pool2d',  float=(maxpool,),         quantized=(maxpool,))

Among several float candidates (parallel branches) the one with the same module name, then the
same module attributes (channels, kernel, features), then the earliest in graph order wins,
so symmetric branches pair branch to branch. The walk is linear in the number of nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx
from torch import nn

from . import flows
from .capture import LeafSpec, single_call_graph, trace
from .capture.export import (
    auto_exports_float,
    check_capture,
    export_module,
    export_side,
    is_export_graph,
)
from .errors import MatchError, TraceError
from .guards import check_pair
from .ops import BN_FOLDING_KINDS, classify, classify_module
from .view import MODULE_ATTRS, GraphView

__all__ = ["Pair", "Unmatched", "Matching", "RegionMatching", "match"]

_log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Pair:
    """A float subgraph and the quantized subgraph that computes the same thing.

    Attributes:
        name: the quantized side's name for it: module path (``layer1.0.conv1``), the
            FloatFunctional that owns a functional op (``layer1.0.add_relu``), or node name.
        kind: the op kinds, joined: ``conv2d-relu``.
        float_nodes: names of the float graph nodes, in order; the last one's output is the
            pair's float output.
        quant_nodes: names of the quantized graph nodes, in order.
        quantized: whether the quantized side computes in quantized form (False for ops
            left in float, such as an ``nn.Embedding`` under dynamic quantization).
        found_by: ``"graph"`` (paired by the graph matcher) or ``"module"`` (a leaf module
            of a model torch.fx cannot trace whole, paired through the module tree; its
            ``float_nodes`` and ``quant_nodes`` are then module paths).
        region: for a graph pair inside a submodule captured as a graph of its own (see
            :mod:`fxnumeric.capture.tree`), that submodule's quantized path; its name and
            node names are prefixed with it. ``""`` otherwise.
    """

    name: str
    kind: str
    float_nodes: tuple[str, ...]
    quant_nodes: tuple[str, ...]
    quantized: bool
    found_by: str = "graph"
    region: str = ""


@dataclass(frozen=True)
class Unmatched:
    """A node that found no partner, with the reason a person can act on."""

    node: str
    kind: str
    reason: str
    quantized: bool = False


@dataclass(frozen=True, eq=False)
class Matching:
    """The result of :func:`match`: pairs, misses and a view of each traced graph.

    The node names in ``pairs`` and the misses refer to ``float_graph`` and ``quant_graph``.
    ``float_view`` and ``quant_view`` (:class:`fxnumeric.GraphView`) are built once, by
    :func:`match`, and every later stage reads them: what each node computes, where it sits,
    which op produced the value it reads. The lookups below answer "which pair, which
    counterpart" for a node without searching.

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> m = match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear}))
        >>> pair = m.pair("0")
        >>> m.pair_of(m.quant_view.node("_0")) is pair, m.output_nodes(pair)[1].name
        (True, '_0')
    """

    pairs: tuple[Pair, ...]
    unmatched_float: tuple[Unmatched, ...]
    unmatched_quant: tuple[Unmatched, ...]
    float_view: GraphView = field(repr=False)
    quant_view: GraphView = field(repr=False)
    quant_to_float: dict[str, str] = field(repr=False, default_factory=dict)
    """For each quantized node whose output has a float counterpart, that float node's name."""
    float_model: nn.Module | None = field(repr=False, default=None)
    quant_model: nn.Module | None = field(repr=False, default=None)
    """The user's models (not modified); module paths in pair names refer to them."""
    regions: tuple[RegionMatching, ...] = field(repr=False, default=())
    """For models torch.fx cannot trace whole: the submodules captured as graphs of their own
    (the whole models, with some submodules kept whole, have paths ``""``)."""
    untraced: tuple[tuple[str, str], ...] = ()
    """``(float module path, reason)`` of modules torch.fx could not trace: each is kept
    whole and its children are compared, but the code of its own ``forward`` is not."""
    origin: dict[Pair, tuple[RegionMatching, Pair]] = field(repr=False, default_factory=dict)
    """For each pair found in a region: the region and the pair as its own matching has it."""
    capture_notes: tuple[tuple[str, str], ...] = ()
    """``(side, note)``: how a side was captured where that is not the ``capture=`` asked for
    (``capture="export"`` on a model torch.export cannot capture, which torch.fx traced
    instead), or where ``capture="auto"`` exported it."""

    @property
    def whole_graph(self) -> bool:
        """Whether both models were traced whole, so every pair lives in the two views.

        When not, pairs live in :attr:`regions` (see :attr:`origin`) or were found through
        the module tree (``found_by == "module"``), and ``float_view``/``quant_view`` show
        only the outermost graphs.
        """
        return not self.untraced

    def __post_init__(self) -> None:
        by_name: dict[str, Pair] = {}
        by_node: dict[fx.Node, Pair] = {}
        for p in self.pairs:
            by_name.setdefault(p.name, p)
        graph_pairs = [p for p in self.pairs if p.found_by == "graph" and p not in self.origin]
        for p in graph_pairs:
            by_node.update((self.float_view.node(n), p) for n in p.float_nodes)
            by_node.update((self.quant_view.node(n), p) for n in p.quant_nodes)
        to_quant: dict[fx.Node, fx.Node] = {}
        to_float: dict[fx.Node, fx.Node] = {}
        for q, f in self.quant_to_float.items():
            qn, fn = self.quant_view.node(q), self.float_view.node(f)
            to_float[qn] = fn
            to_quant.setdefault(fn, qn)  # the earliest quantized node carrying that value
        claimed = set(by_node)
        passable = frozenset(
            n for n in self.quant_view.nodes
            if n not in claimed and (c := self.quant_view.op_class(n)) is not None
            and c.role == "optional"
        )
        # A quantized op's value is what it hands on after its own output quantize; an op left
        # in float hands on its float value (a quantize after it belongs to the next layer).
        outputs = {
            id(p): (self.float_view.node(p.float_nodes[-1]),
                    self.quant_view.value_node(self.quant_view.node(p.quant_nodes[-1]),
                                               passable if p.quantized else frozenset()))
            for p in graph_pairs
        }
        # caches derived from the fields above, set once: the dataclass stays frozen
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_by_node", by_node)
        object.__setattr__(self, "_to_quant", to_quant)
        object.__setattr__(self, "_to_float", to_float)
        object.__setattr__(self, "_outputs", outputs)

    @property
    def float_graph(self) -> fx.GraphModule:
        """The traced float GraphModule."""
        return self.float_view.gm

    @property
    def quant_graph(self) -> fx.GraphModule:
        """The traced quantized GraphModule."""
        return self.quant_view.gm

    @property
    def quantized_ops(self) -> int:
        """How many quantized compute ops the quantized graph has, paired or not."""
        return (sum(1 for p in self.pairs if p.quantized)
                + sum(1 for u in self.unmatched_quant if u.quantized))

    @property
    def coverage(self) -> float:
        """Fraction of the quantized graph's quantized compute ops that were paired (1.0 when
        there are none: render the text with ``n/a`` then, as ``Matching.table`` does)."""
        total = self.quantized_ops
        return 1.0 if total == 0 else sum(1 for p in self.pairs if p.quantized) / total

    def check(self) -> Matching:
        """Raise :class:`MatchError` if a quantized compute op found no float partner."""
        missed = [u for u in self.unmatched_quant if u.quantized]
        nothing_paired = not self.pairs and (self.unmatched_quant or self.unmatched_float)
        if missed or nothing_paired:
            raise MatchError(_summary(self, missed))
        for side, items in (("float", self.unmatched_float), ("quantized", self.unmatched_quant)):
            for u in items:
                _log.warning("%s node `%s` (%s) is not compared: %s", side, u.node, u.kind,
                             u.reason)
        return self

    # ------------------------------------------------------------------ lookups
    def pair(self, name: str) -> Pair:
        """The (first) pair called ``name``."""
        found = self._by_name.get(name)  # type: ignore[attr-defined]
        if found is None:
            names = ", ".join(p.name for p in self.pairs[:20])
            raise MatchError(f"no pair named {name!r}; names are: {names} ...")
        return found

    def pair_of(self, node: fx.Node) -> Pair | None:
        """The pair a float or quantized node belongs to, if any."""
        return self._by_node.get(node)  # type: ignore[attr-defined]

    def float_counterpart(self, node: fx.Node) -> fx.Node | None:
        """The float node computing the value that quantized ``node`` carries, if any."""
        return self._to_float.get(node)  # type: ignore[attr-defined]

    def quant_counterpart(self, node: fx.Node) -> fx.Node | None:
        """The earliest quantized node carrying the value of float ``node``, if any."""
        return self._to_quant.get(node)  # type: ignore[attr-defined]

    def output_nodes(self, pair: Pair) -> tuple[fx.Node, fx.Node]:
        """``(float_node, quant_node)`` whose outputs are the pair's values.

        On the quantized side that is the value the next op reads: after the pair's own
        output quantize (and dequantize) where the graph has one (reference FX, pt2e), for
        pairs that compute in quantized form; a layer left in float is observed before the
        quantize that feeds the next quantized layer.
        """
        return self._outputs[id(pair)]  # type: ignore[attr-defined]

    def float_node(self, name: str) -> fx.Node:
        """The float graph's node called ``name``."""
        return self.float_view.node(name)

    def quant_node(self, name: str) -> fx.Node:
        """The quantized graph's node called ``name``."""
        return self.quant_view.node(name)

    # ------------------------------------------------------------------ explanations
    def explain(self, node: str, *, radius: int = 2, tablefmt: str = "simple") -> str:
        """Show the float and quantized graphs side by side around ``node``.

        Args:
            node: a float or quantized node name (an unpaired one, typically) or a pair name.
            radius: how many ops before and after it to show.
            tablefmt: tabulate format.

        Returns:
            A table with one row per op in the neighbourhood: the float nodes, the quantized
            nodes they pair with, and ``<- unpaired: reason`` where a node found no partner.
        """
        from .report.render import explain_table

        for p in self.pairs:
            if node not in (p.name, *p.float_nodes, *p.quant_nodes):
                continue
            if p in self.origin:  # found in a region: explain it inside the region's graphs
                region, local = self.origin[p]
                return region.matching.explain(local.name, radius=radius, tablefmt=tablefmt)
            if p.found_by == "module":
                note = "paired through the module tree"
                return explain_table([(p.float_nodes[0], p.kind, p.quant_nodes[0], note)], tablefmt)
        if not self.whole_graph:  # a module-tree miss, or a region's: no whole graph around it
            rows = [(u.node, u.kind, "-", f"<- unpaired: {u.reason}") for u in self.unmatched_float
                    if u.node == node]
            rows += [("-", u.kind, u.node, f"<- unpaired: {u.reason}") for u in self.unmatched_quant
                     if u.node == node]
            if rows:
                return explain_table(rows, tablefmt)
        return explain_table(_explain_rows(self, node, radius), tablefmt)

    def table(self, tablefmt: str = "simple", *, around_misses: bool = False) -> str:
        """Render pairs and misses as a tabulate table (``simple``, ``github``, ``plain`` ...).

        With ``around_misses=True``, each unpaired node is followed by :meth:`explain` of it:
        the two graphs side by side around the miss.
        """
        from .report.render import matching_table

        return matching_table(self, tablefmt, around_misses=around_misses)

    def __repr__(self) -> str:
        from .report.render import matching_summary

        return f"<Matching: {matching_summary(self)}>"

    def _repr_html_(self) -> str:
        from .report.render import matching_fragment

        return matching_fragment(self)


@dataclass(frozen=True, eq=False)
class RegionMatching:
    """A float submodule and its quantized counterpart, captured and paired as graphs."""

    float_path: str
    quant_path: str
    matching: Matching


def _explain_rows(m: Matching, node: str, radius: int) -> list[tuple[str, str, str, str]]:
    """Rows of :meth:`Matching.explain`, in float graph order."""
    fv, qv = m.float_view, m.quant_view
    focus_f: list[fx.Node] = []
    focus_q: list[fx.Node] = []
    for p in m.pairs:
        if node == p.name or node in p.float_nodes or node in p.quant_nodes:
            focus_f += [fv.node(n) for n in p.float_nodes]
            focus_q += [qv.node(n) for n in p.quant_nodes]
    misses_f = {u.node: u for u in m.unmatched_float}
    misses_q = {u.node: u for u in m.unmatched_quant}
    if not focus_f and not focus_q:
        if node in misses_f:
            focus_f.append(fv.node(node))
        if node in misses_q:
            focus_q.append(qv.node(node))
    if not focus_f and not focus_q:
        raise MatchError(f"no pair or unpaired node is called {node!r}; see Matching.table()")
    near_f = fv.neighbourhood(focus_f, radius)
    near_q = qv.neighbourhood(focus_q, radius)
    # the counterparts of what is near on one side are near on the other
    for f in list(near_f):
        q = m.quant_counterpart(f)
        if q is not None and qv.is_op(q):
            near_q.add(q)
    for q in list(near_q):
        f = m.float_counterpart(q)
        if f is not None and fv.is_op(f):
            near_f.add(f)
    rows: list[tuple[int, str, str, str, str]] = []
    done: set[fx.Node] = set()
    for f in sorted(near_f, key=fv.position) + sorted(near_q, key=qv.position):
        p = m.pair_of(f)
        if p is None or f in done:
            continue
        done.update(fv.node(n) for n in p.float_nodes)
        done.update(qv.node(n) for n in p.quant_nodes)
        pos = fv.position(fv.node(p.float_nodes[0]))
        rows.append((pos, ", ".join(p.float_nodes), p.kind, ", ".join(p.quant_nodes), ""))
    for f in near_f:
        if f not in done and f.name in misses_f:
            u = misses_f[f.name]
            rows.append((fv.position(f), f.name, u.kind, "-", f"<- unpaired: {u.reason}"))
    for q in near_q:
        if q not in done and q.name in misses_q:
            u = misses_q[q.name]
            before = [b for b in map(m.float_counterpart, qv.inputs(q)) if b is not None]
            pos = max((fv.position(b) for b in before), default=-1)
            rows.append((pos, "-", u.kind, q.name, f"<- unpaired: {u.reason}"))
    rows.sort(key=lambda r: r[0])
    return [r[1:] for r in rows]


def _summary(m: Matching, missed: list[Unmatched]) -> str:
    lines = [
        f"could not pair the float and quantized models: {len(m.pairs)} pairs, "
        f"{len(m.unmatched_quant)} quantized and {len(m.unmatched_float)} float nodes without "
        "a partner."
    ]
    sides = (("quantized", missed or list(m.unmatched_quant)), ("float", list(m.unmatched_float)))
    for side, items in sides:
        for u in items[:5]:
            lines.append(f"  {side} `{u.node}` ({u.kind}): {u.reason}")
        if len(items) > 5:
            lines.append(f"  ... and {len(items) - 5} more {side} nodes")
    lines.append(
        "Are these a float model and the quantized model made from it? If an op is custom, "
        "declare it with fxnumeric.register_op; see Matching.table() for every pair."
    )
    return "\n".join(lines)



def _align(
    fv: GraphView, qv: GraphView, f0: fx.Node, q0: fx.Node, taken_f: set, taken_q: set
) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """Grow chains from ``f0`` and ``q0`` until their signatures agree, or give up."""
    f_chain, q_chain = [f0], [q0]
    fs, qs = list(fv.op_class(f0).signature), list(qv.op_class(q0).signature)
    i = j = 0
    while True:
        while i < len(fs) and j < len(qs):
            if fs[i] == qs[j]:
                i, j = i + 1, j + 1
            elif fs[i] == "batch_norm" and i > 0 and fs[i - 1] in BN_FOLDING_KINDS:
                i += 1  # folded into the quantized conv/linear
            else:
                return None
        if j == len(qs) and i < len(fs) and fs[i] == "batch_norm" and fs[i - 1] in BN_FOLDING_KINDS:
            # a fused float conv-bn (QAT ConvBn2d) whose BN the quantized conv folded
            q_nxt = _op_after(qv, q_chain[-1])
            if q_nxt is None or qv.op_class(q_nxt).signature[0] != "batch_norm":
                i += 1
                continue
        if i == len(fs) and j == len(qs):
            nxt = fv.sole_consumer(f_chain[-1])
            if (
                nxt is not None and nxt not in taken_f and fs[-1] in BN_FOLDING_KINDS
                and fv.op_class(nxt).signature == ("batch_norm",)
            ):
                q_nxt = _op_after(qv, q_chain[-1])
                if q_nxt is None or qv.op_class(q_nxt).signature[0] != "batch_norm":
                    f_chain.append(nxt)
            return f_chain, q_chain
        view, chain, seq, taken = ((fv, f_chain, fs, taken_f) if i == len(fs)
                                   else (qv, q_chain, qs, taken_q))
        nxt = view.sole_consumer(chain[-1])
        if nxt is None or nxt in taken:
            return None
        chain.append(nxt)
        seq.extend(view.op_class(nxt).signature)


def _op_after(view: GraphView, n: fx.Node) -> fx.Node | None:
    """The sole consumer of ``n``'s value past optional nodes (a quantize, or the scale a QAT
    conv divides back out): the quantized side still has its own BatchNorm after those."""
    nxt = view.sole_consumer(n)
    while nxt is not None and view.op_class(nxt).role == "optional":
        nxt = view.sole_consumer(nxt)
    return nxt


def _candidates(fv: GraphView, qv: GraphView, q: fx.Node, mapped: list,
                taken_f: set) -> list[fx.Node]:
    head = qv.op_class(q).signature[0]
    known = [m for m in mapped if m is not None]
    if known:
        pool = [f for f in fv.consumers(known[0]) if all(k in fv.inputs(f) for k in known[1:])]
    elif not qv.inputs(q):
        pool = [f for f in fv.ops() if not fv.inputs(f)]
    else:  # inputs unpaired upstream: only a same-named op will do
        qname = qv.name(q)
        pool = [f for f in fv.ops() if fv.name(f) == qname]
    pool = [f for f in pool
            if fv.is_op(f) and f not in taken_f and fv.op_class(f).signature[0] == head]
    qname, qattrs = qv.name(q), qv.attrs(q)
    if head == "getitem":
        pool = [f for f in pool if fv.attrs(f) == qattrs]
    elif qattrs:
        pool = [f for f in pool if _same_shape(fv.attrs(f), qattrs)]
    return sorted(pool, key=lambda f: (fv.name(f) != qname, fv.attrs(f) != qattrs, fv.position(f)))


# Quantization never changes these: a float and a quantized module that differ in them are
# not counterparts (attributes missing on either side are not compared).
_SHAPE_ATTRS = tuple(
    MODULE_ATTRS.index(a) for a in (
        "in_channels", "out_channels", "kernel_size", "groups", "in_features", "out_features",
        "num_embeddings", "embedding_dim", "input_size", "hidden_size",
    )
)


def _same_shape(float_attrs: tuple[Any, ...], quant_attrs: tuple[Any, ...]) -> bool:
    if len(float_attrs) != len(MODULE_ATTRS) or len(quant_attrs) != len(MODULE_ATTRS):
        return True
    return all(
        float_attrs[i] is None or quant_attrs[i] is None or float_attrs[i] == quant_attrs[i]
        for i in _SHAPE_ATTRS
    )


def _quant_miss_reason(fv: GraphView, qv: GraphView, q: fx.Node, mapped: list, tried: list) -> str:
    kind = qv.op_class(q).kind
    unpaired_inputs = [i.name for i, m in zip(qv.inputs(q), mapped, strict=True) if m is None]
    if unpaired_inputs and all(m is None for m in mapped):
        return (
            f"its input `{unpaired_inputs[0]}` has no float counterpart, so there is no place "
            f"in the float graph to look for a `{kind}`"
        )
    if tried:
        names = ", ".join(f"`{f.name}` ({fv.op_class(f).kind})" for f in tried[:3])
        return (f"float candidates {names} start like it, but their op chain does not add up "
                f"to `{kind}`")
    anchor = next(m for m in mapped if m is not None) if any(mapped) else None
    head, qattrs = qv.op_class(q).signature[0], qv.attrs(q)
    for f in fv.consumers(anchor) if anchor is not None else []:
        same_head = fv.is_op(f) and fv.op_class(f).signature[0] == head
        if same_head and not _same_shape(fv.attrs(f), qattrs):
            diffs = ", ".join(
                f"{MODULE_ATTRS[i]} {fv.attrs(f)[i]} vs {qattrs[i]}" for i in _SHAPE_ATTRS
                if None not in (fv.attrs(f)[i], qattrs[i]) and fv.attrs(f)[i] != qattrs[i]
            )
            return (f"float `{f.name}` is a `{head}` on the same input but its shape differs "
                    f"({diffs})")
    around = fv.consumers(anchor) if anchor is not None else []
    near = [f"`{f.name}` ({fv.op_class(f).kind})" for f in around if fv.is_op(f)]
    where = (f"the float counterpart `{anchor.name}` of its input" if anchor is not None
             else "the float graph's inputs")
    nearest = f"; nearest candidates: {', '.join(near[:3])}" if near else ""
    return f"no float op of kind `{qv.op_class(q).signature[0]}` consumes {where}{nearest}"


def _float_miss_reason(fv: GraphView, qv: GraphView, f: fx.Node, pair_of: dict,
                       inverse: dict) -> str:
    kind = fv.op_class(f).kind
    if not f.users:
        return ("its result is never used (dead code the quantized graph dropped), so there is "
                "nothing to compare")
    head = fv.op_class(f).signature[0]
    for i in fv.inputs(f):
        for qc in qv.consumers(inverse[i]) if i in inverse else ():
            if qv.is_op(qc) and qv.op_class(qc).signature[0] == head:
                chain, nxt = [fv.op_class(f).kind], fv.sole_consumer(f)
                while nxt is not None and len(chain) < 4:
                    chain.append(fv.op_class(nxt).kind)
                    nxt = fv.sole_consumer(nxt)
                return (
                    f"quantized `{qc.name}` ({qv.op_class(qc).kind}) reads the same input, but "
                    f"the float ops from here compute {' -> '.join(chain)}: a float op it fused "
                    "is missing or different"
                )
    for nb in fv.inputs(f) + fv.consumers(f):
        if nb in pair_of:
            p = pair_of[nb]
            return (
                f"float `{f.name}` ({kind}) has no quantized counterpart: its neighbour "
                f"`{nb.name}` was paired with quantized `{p.name}` ({p.kind}), which does not "
                f"compute a `{kind}`"
            )
    ins = [i for i in fv.inputs(f) if i in inverse]
    if ins:
        q_in = inverse[ins[0]]
        cons = [f"`{c.name}` ({qv.op_class(c).kind})" for c in qv.consumers(q_in) if qv.is_op(c)]
        return (
            f"no quantized op of kind `{kind}` consumes `{q_in.name}`, the quantized counterpart "
            f"of its input" + (f"; it feeds {', '.join(cons[:3])}" if cons else "")
        )
    return f"none of its inputs has a quantized counterpart, so `{kind}` could not be placed"


def _pair_views(fv: GraphView, qv: GraphView,
                ) -> tuple[list[Pair], list[Unmatched], list[Unmatched], dict]:
    if len(fv.placeholders) != len(qv.placeholders):
        raise MatchError(
            f"the float model takes {len(fv.placeholders)} inputs "
            f"({', '.join(p.name for p in fv.placeholders)}) but the quantized model takes "
            f"{len(qv.placeholders)} ({', '.join(p.name for p in qv.placeholders)}); "
            "compare a float model with the quantized model made from it."
        )
    anchor: dict[fx.Node, fx.Node | None] = dict(zip(qv.placeholders, fv.placeholders, strict=True))
    taken_f: set = set()
    taken_q: set = set()
    pairs: list[Pair] = []
    pair_of: dict[fx.Node, Pair] = {}
    miss_q: list[Unmatched] = []
    for q in qv.nodes:
        if q in taken_q or not qv.is_op(q):
            continue
        mapped = [anchor.get(i) for i in qv.inputs(q)]
        tried: list[fx.Node] = []
        found = None
        for f in _candidates(fv, qv, q, mapped, taken_f):
            tried.append(f)
            found = _align(fv, qv, f, q, taken_f, taken_q)
            if found:
                break
        if found is None:
            c = qv.op_class(q)
            if c.role == "optional":
                anchor[q] = mapped[0] if mapped else None
            else:
                anchor[q] = None
                reason = _quant_miss_reason(fv, qv, q, mapped, tried)
                miss_q.append(Unmatched(q.name, c.kind, reason, c.quantized))
            continue
        f_chain, q_chain = found
        kinds = [k for n in q_chain for k in qv.op_class(n).signature]
        p = Pair(
            name=_pair_name(qv, q_chain),
            kind="-".join(kinds),
            float_nodes=tuple(n.name for n in f_chain),
            quant_nodes=tuple(n.name for n in q_chain),
            quantized=any(qv.op_class(n).quantized for n in q_chain),
        )
        pairs.append(p)
        taken_f.update(f_chain)
        taken_q.update(q_chain)
        for n in f_chain:
            pair_of[n] = p
        for n in q_chain:
            anchor[n] = f_chain[-1]
    inverse = {f: q for q, f in anchor.items() if f is not None}
    miss_f = [
        Unmatched(f.name, fv.op_class(f).kind, _float_miss_reason(fv, qv, f, pair_of, inverse))
        for f in fv.nodes
        if fv.is_op(f) and f not in taken_f and fv.op_class(f).role == "op"
    ]
    return pairs, miss_f, miss_q, anchor


def _pair_name(qv: GraphView, q_chain: list[fx.Node]) -> str:
    """The name of the module computing the chain's output, else of its head, else a node's."""
    last = qv.name(q_chain[-1])
    return last if last != q_chain[-1].name else qv.name(q_chain[0])


def _as_graph_module(model: nn.Module, leaf_modules: Iterable[LeafSpec] | None,
                     which: str) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and (not leaf_modules or _calls_no_layer(model)):
        # Read as it is: its node names are the keys of FX-mode results, and nothing
        # downstream writes to it (instrumentation copies the graph). A graph of functions
        # (torch.export, pt2e) has no module to keep whole; re-tracing it would only lose its
        # node metadata (nn_module_stack).
        return model
    return trace(model, leaf_modules=leaf_modules, which=which)


def _calls_no_layer(gm: fx.GraphModule) -> bool:
    """Whether every module ``gm`` calls is plumbing (observers, torch.export's guards)."""
    modules = dict(gm.named_modules())
    return all(classify(n, modules).role == "plumbing"  # type: ignore[union-attr]
               for n in gm.graph.nodes if n.op == "call_module")


def match(
    float_model: nn.Module,
    quant_model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
    capture: str = "fx",
) -> Matching:
    """Pair the ops of a float model with those of the quantized model made from it.

    Works for eager-quantized models (fused or not), FX-quantized GraphModules
    (``convert_fx`` and ``convert_to_reference_fx``) and dynamic quantization; the module
    names of the two models need not agree. Neither model is modified.

    When ``torch.fx`` cannot trace a model whole (Hugging Face transformers, for one), the
    failing module is kept whole and its children are captured in turn: those that trace
    pair as graphs, leaf modules reached below pair through the module tree (same path, or
    same position and type), so every layer is still compared. Such pairs say so in
    ``Pair.found_by`` / ``Pair.region``; ``Matching.untraced`` lists the modules kept whole.

    Args:
        float_model: the float model.
        quant_model: the quantized model.
        example_inputs: optional input: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs (``{"input_ids": ids, "attention_mask": mask}``). When given, both
            models are run once to check they accept it, and for models torch.fx cannot trace
            whole that run records how each submodule is called, so that more of them are
            captured as graphs. ``capture="export"`` exports on it.
        leaf_modules: module types or names to keep whole instead of tracing through them
            (torch.fx only: an exported graph has no modules to keep whole).
        capture: how a model becomes a graph (:mod:`fxnumeric.capture.export`):
            ``"fx"`` (default) traces with torch.fx, and through the module tree where it
            cannot trace a model whole. ``"export"`` captures each ``nn.Module`` side with
            ``torch.export`` on ``example_inputs`` (required): ATen graphs, so the code of
            every module (attention's ``matmul``/``softmax`` too) is compared, with pairs
            named by module path from ``nn_module_stack``; a side torch.export cannot capture
            is traced by torch.fx instead, and ``Matching.capture_notes`` says why.
            ``"auto"`` is ``"fx"``, except that a float model torch.fx cannot trace whole is
            exported when the quantized model is a ``torch.export`` graph (pt2e) and
            ``example_inputs`` are given.

    Returns:
        A :class:`Matching`. Misses are listed with reasons; call ``.check()`` to turn a
        missing quantized op into a :class:`MatchError`.

    Example:
        >>> import torch, copy
        >>> from torch.ao.quantization import quantize_dynamic
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> m = match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear}))
        >>> [(p.kind, p.float_nodes, p.quant_nodes) for p in m.pairs]
        [('linear', ('_0',), ('_0',)), ('relu', ('_1',), ('_1',))]
    """
    check_capture(capture, example_inputs)
    # what a flow reads differently (an ExportedProgram is traced as its .module())
    float_root = flows.normalise_model(float_model, "float")
    quant_root = flows.normalise_model(quant_model, "quantized")
    notes: list[tuple[str, str]] = []
    if capture == "export":
        float_root, float_note = export_side(float_root, example_inputs, "float")
        quant_root, quant_note = export_side(quant_root, example_inputs, "quantized")
        notes += [(side, note) for side, note in (("float", float_note),
                                                  ("quantized", quant_note)) if note]
    try:
        float_gm = _float_graph(float_root, quant_root, example_inputs, leaf_modules, capture,
                                notes)
        quant_gm = _as_graph_module(quant_root, leaf_modules, "quantized")
    except TraceError as exc:
        return _fall_back_to_tree(float_model, quant_model, example_inputs, leaf_modules,
                                  exc, notes)
    if is_export_graph(float_gm) and not is_export_graph(float_root):
        float_root = float_gm  # exported by capture="auto": its nodes name no module of it
    float_view = GraphView(float_gm, root=float_root)
    quant_view = GraphView(quant_gm, root=quant_root)
    check_pair(float_view, quant_view)  # swapped, unconverted or unquantized: fxnumeric.guards
    if example_inputs is not None:
        from .run import run_model

        run_model(float_gm, example_inputs, which="float")
        run_model(quant_gm, example_inputs, which="quantized")
    found = _graph_matching(float_view, quant_view, float_model, quant_model)
    return replace(found, capture_notes=tuple(notes)) if notes else found


def _float_graph(float_root: Any, quant_root: Any, example_inputs: Any,
                 leaf_modules: Iterable[LeafSpec] | None, capture: str,
                 notes: list[tuple[str, str]]) -> fx.GraphModule:
    """The float graph: torch.fx's, or (``capture="auto"``, where torch.fx cannot trace it
    whole) torch.export's, noted in ``notes``.

    Raises:
        TraceError: torch.fx's, when neither captures the float model.
    """
    try:
        return _as_graph_module(float_root, leaf_modules, "float")
    except TraceError as exc:
        if not auto_exports_float(capture, example_inputs, quant_root):
            raise
        exported = export_module(float_root, example_inputs, "float")
        if not isinstance(exported, fx.GraphModule):
            notes.append(("float", exported.reason))
            raise
        notes.append(("float", "captured with torch.export (capture='auto'): torch.fx could "
                      f"not trace it whole ({_first_line(exc)})"))
        return exported


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _fall_back_to_tree(float_model: nn.Module, quant_model: nn.Module, example_inputs: Any,
                       leaf_modules: Iterable[LeafSpec] | None, exc: TraceError,
                       notes: list[tuple[str, str]]) -> Matching:
    """torch.fx cannot trace a model whole: capture both through the module tree."""
    if not isinstance(float_model, nn.Module) or not isinstance(quant_model, nn.Module):
        raise exc
    _log.info("capturing through the module tree: %s", _first_line(exc))
    found = _match_tree(float_model, quant_model, example_inputs, leaf_modules)
    export_tried = any(side == "float" for side, _ in notes)
    if not export_tried and is_export_graph(quant_model):
        notes.append(("float", (
            "torch.fx could not trace it whole, and the quantized model is a torch.export graph "
            "(pt2e), which the module tree cannot walk (its modules are gone). Fix: pass "
            "example_inputs and capture='export' (or 'auto') to capture the float model with "
            "torch.export too")))
    elif notes:
        # the module tree pairs modules of both models, so an exported side is not used either
        notes.append(("both", "captured through the module tree: torch.fx could not trace a "
                      f"model whole ({_first_line(exc)}), and the tree pairs modules of both "
                      "models"))
    return replace(found, capture_notes=tuple(notes)) if notes else found


def _graph_matching(float_view: GraphView, quant_view: GraphView,
                    float_model: nn.Module, quant_model: nn.Module) -> Matching:
    """Pair two views of traced graphs of ``float_model`` and ``quant_model``."""
    pairs, miss_f, miss_q, anchor = _pair_views(float_view, quant_view)
    quant_to_float = {q.name: f.name for q, f in anchor.items() if f is not None}
    return Matching(tuple(pairs), tuple(miss_f), tuple(miss_q), float_view, quant_view,
                    quant_to_float, float_model, quant_model)


def _prefixed(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _match_tree(float_model: nn.Module, quant_model: nn.Module, example_inputs: Any,
                leaf_modules: Iterable[LeafSpec] | None) -> Matching:
    """Pair models torch.fx cannot trace whole: graphs where it can, the module tree elsewhere.

    Every region (:mod:`fxnumeric.capture.tree`) is paired as graphs and its pairs are listed
    under prefixed names; leaf modules reached through the module tree pair as modules.
    """
    from .capture.tree import capture_tree, record_calls

    # the guards judge each whole model as one op, by the modules it holds
    whole_views = (GraphView(single_call_graph(float_model), root=float_model),
                   GraphView(single_call_graph(quant_model), root=quant_model))
    check_pair(*whole_views)
    float_calls = quant_calls = None
    if example_inputs is not None:
        float_calls = record_calls(float_model, example_inputs, which="float")
        quant_calls = record_calls(quant_model, example_inputs, which="quantized")
    tree = capture_tree(float_model, quant_model, leaf_modules=list(leaf_modules or ()),
                        float_calls=float_calls, quant_calls=quant_calls)
    found = _Found()
    for region in tree.regions:
        float_part = float_model.get_submodule(region.float_path)
        quant_part = quant_model.get_submodule(region.quant_path)
        found.add_region(RegionMatching(region.float_path, region.quant_path, _graph_matching(
            GraphView(region.float_graph, root=float_part),
            GraphView(region.quant_graph, root=quant_part), float_part, quant_part,
        )))
    for float_path, quant_path in tree.leaves:
        found.add_leaves(float_path, float_model.get_submodule(float_path),
                         quant_path, quant_model.get_submodule(quant_path))
    for path, side, reason in tree.orphans:
        found.add_orphan(path, side, (float_model if side == "float" else quant_model)
                         .get_submodule(path), reason)
    root = next((r.matching for r in found.regions if not r.float_path and not r.quant_path), None)
    if root is not None:
        float_view, quant_view = root.float_view, root.quant_view
    else:
        float_view, quant_view = whole_views
    return Matching(
        found.ordered_pairs(quant_model), tuple(found.miss_f), tuple(found.miss_q),
        float_view, quant_view, {}, float_model, quant_model,
        regions=tuple(found.regions), untraced=tree.untraced, origin=found.origin,
    )


class _Found:
    """Pairs and misses of a module-tree capture, gathered region by region and leaf by leaf."""

    def __init__(self) -> None:
        self.regions: list[RegionMatching] = []
        self.origin: dict[Pair, tuple[RegionMatching, Pair]] = {}
        self.local_index: dict[Pair, int] = {}
        self.pairs: list[Pair] = []
        self.miss_f: list[Unmatched] = []
        self.miss_q: list[Unmatched] = []

    def add_region(self, region: RegionMatching) -> None:
        """The region's pairs and misses, renamed with its paths as prefixes."""
        fpath, qpath, sub = region.float_path, region.quant_path, region.matching
        self.regions.append(region)
        for i, p in enumerate(sub.pairs):
            flat = Pair(
                name=_prefixed(qpath, p.name), kind=p.kind,
                float_nodes=tuple(_prefixed(fpath, n) for n in p.float_nodes),
                quant_nodes=tuple(_prefixed(qpath, n) for n in p.quant_nodes),
                quantized=p.quantized, region=qpath,
            )
            self.pairs.append(flat)
            self.origin[flat] = (region, p)
            self.local_index[flat] = i
        self.miss_f += [Unmatched(_prefixed(fpath, u.node), u.kind, u.reason, u.quantized)
                        for u in sub.unmatched_float]
        self.miss_q += [Unmatched(_prefixed(qpath, u.node), u.kind, u.reason, u.quantized)
                        for u in sub.unmatched_quant]

    def add_leaves(self, fpath: str, float_module: nn.Module,
                   qpath: str, quant_module: nn.Module) -> None:
        """Two leaf modules at the same place of the module tree: a pair if they agree."""
        f_cls, q_cls = classify_module(float_module), classify_module(quant_module)
        if f_cls.role == "plumbing" or q_cls.role == "plumbing":
            return  # dropout, identity, observers: transparent, as in the graph matcher
        if f_cls.signature == q_cls.signature:
            self.pairs.append(Pair(qpath, q_cls.kind, (fpath,), (qpath,), q_cls.quantized,
                                   found_by="module"))
            return
        reason = (
            f"float `{fpath}` ({f_cls.kind}) and quantized `{qpath}` ({q_cls.kind}) sit at the "
            "same place in the module tree but compute different ops"
        )
        self.miss_f.append(Unmatched(fpath, f_cls.kind, reason, False))
        self.miss_q.append(Unmatched(qpath, q_cls.kind, reason, q_cls.quantized))

    def add_orphan(self, path: str, side: str, module: nn.Module, reason: str) -> None:
        """A submodule without counterpart on the other side."""
        cls = classify_module(module)
        if side == "float":
            self.miss_f.append(Unmatched(path, cls.kind, reason, False))
        else:
            self.miss_q.append(Unmatched(path, cls.kind, reason, cls.quantized))

    def ordered_pairs(self, quant_model: nn.Module) -> tuple[Pair, ...]:
        """Pairs in module registration order of what holds them, then in graph order."""
        rank = {name: i for i, (name, _) in
                enumerate(quant_model.named_modules(remove_duplicate=False))}

        def position(p: Pair) -> tuple[int, int]:
            if p in self.origin:
                return rank.get(p.region, 0), self.local_index[p]
            return rank.get(p.quant_nodes[0], 0), 0

        return tuple(sorted(self.pairs, key=position))
