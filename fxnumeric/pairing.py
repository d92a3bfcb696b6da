"""The pairing pass: pair the ops of two condensed graphs, walking their networkx DiGraphs.

Each side is a :class:`~fxnumeric.GraphView`, whose ``graph`` is a ``networkx.DiGraph`` of ops
(plumbing removed, its edges passed through). One walk over the quantized graph in topological
order (:meth:`GraphView.topological_order`) pairs each quantized op with a float op:

1. **Candidates** are the float successors of the float counterparts of its predecessors
   (``fv.graph.succ``), for which :func:`same_op` (or the ``node_match`` passed to
   :func:`fxnumeric.match`) holds, ranked by same name, same module attributes, then graph
   position. A quantized op none of whose inputs has a counterpart looks only at float ops of
   the same name (an index built once), so the search stays linear in the graph size.
   **Weights as evidence**: where the first candidate that aligns has another name (a renamed
   model, parallel branches called in another order, a layer missing on one side), the
   candidates' weights decide (:class:`_WeightEvidence`): the one whose weight the quantized
   weight is a copy of (weight SQNR at least :data:`~fxnumeric.metrics.TWIN_WEIGHT_SQNR_DB`,
   0 dB) wins; if every candidate's weight is another tensor, the float op of the quantized
   op's name, wherever it sits, is tried, and failing that the quantized op stays unpaired,
   with the weight SQNRs as the reason. Names that agree read no weight.
2. **Subgraph alignment**: a fused op pairs as a subgraph. Chains are grown on both sides
   through sole successors until their signatures agree; a BatchNorm after a conv or linear is
   absorbed on the float side when the quantized side has none (folding)::

       float:      conv -> bn -> relu          quantized:  ConvReLU2d
       pair:       ('conv2d-relu', float=(conv, bn, relu), quantized=(conv,))

3. **The input quantize**: a quantize node on a model input that the float graph has no
   op for (FX and pt2e graphs quantize the input themselves; an eager model's QuantStub pairs
   as an op) pairs with the input itself, as ``x.quantize``: the error quantizing the input
   adds is a row like any other.
4. **Misses** keep a reason a person can act on.

Call sites: an op called twice (a module reused, an ATen op of the same module) is two pairs,
named ``layer1.0.relu`` and ``layer1.0.relu#2``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from . import flows
from .errors import InputError, MatchError
from .metrics import TWIN_WEIGHT_SQNR_DB, sqnr
from .ops import BN_FOLDING_KINDS
from .semantics import writes_first_input
from .view import MODULE_ATTRS, GraphView, fixed_inputs
from .weights import op_weight

__all__ = ["NodeMatch", "same_op", "node_attrs", "pair_views", "LocalPair", "LocalMiss",
           "call_site_name", "op_name"]

NodeMatch = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]
"""Called as ``node_match(float_attrs, quant_attrs)`` with the attributes (:func:`node_attrs`)
of a float candidate and of the quantized op it may pair with; True admits the candidate."""


def node_attrs(view: GraphView, n: fx.Node) -> dict[str, Any]:
    """The attributes a :data:`NodeMatch` reads for op ``n``.

    Keys: ``kind`` (``conv2d-relu``), ``head`` (the first kind, ``conv2d``), ``signature``,
    ``name`` (module path or flow name), ``attrs`` (:data:`~fxnumeric.view.MODULE_ATTRS` values,
    or a ``getitem``'s index), ``position`` (graph order).
    """
    cls = view.op_class(n)
    assert cls is not None
    return {"kind": cls.kind, "head": cls.signature[0], "signature": cls.signature,
            "name": view.name(n), "attrs": view.attrs(n), "position": view.position(n)}


def same_op(float_attrs: Mapping[str, Any], quant_attrs: Mapping[str, Any]) -> bool:
    """The default :data:`NodeMatch`: the same head kind, and shapes quantization keeps.

    A ``getitem`` must take the same index (a tensor index, ``y[y > t]``, counts as the
    same: its inputs pair first); modules must agree on channels, kernel, features and sizes
    (:data:`SHAPE_ATTRS`; attributes missing on either side are not compared).

    Example:
        >>> a = {"head": "conv2d", "attrs": ()}
        >>> same_op(a, {"head": "conv2d", "attrs": ()}), same_op(a, {"head": "linear", "attrs": ()})
        (True, False)
    """
    if float_attrs["head"] != quant_attrs["head"]:
        return False
    if quant_attrs["head"] == "getitem":
        return float_attrs["attrs"] == quant_attrs["attrs"]
    return not quant_attrs["attrs"] or _same_shape(float_attrs["attrs"], quant_attrs["attrs"])


@dataclass(frozen=True)
class LocalPair:
    """A pair as the pass finds it: names of the nodes of one region's graphs."""

    name: str
    kind: str
    float_nodes: tuple[str, ...]
    quant_nodes: tuple[str, ...]
    quantized: bool


@dataclass(frozen=True)
class LocalMiss:
    """A node of one region's graph that found no partner, with the reason."""

    node: str
    kind: str
    reason: str
    quantized: bool = False


def op_name(pair_name: str) -> str:
    """The op a call-site name belongs to: ``layer1.0.relu#2`` -> ``layer1.0.relu``.

    >>> op_name("layer1.0.relu#2"), op_name("fc")
    ('layer1.0.relu', 'fc')
    """
    return pair_name.partition("#")[0]


def call_site_name(base: str, seen: dict[str, int]) -> str:
    """``base`` for its first call site, ``base#2``, ``base#3`` ... for the next ones.

    >>> seen = {}
    >>> [call_site_name("relu", seen) for _ in range(3)]
    ['relu', 'relu#2', 'relu#3']
    """
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}#{seen[base]}"


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
                taken_f: set, node_match: NodeMatch) -> list[fx.Node]:
    known = [m for m in mapped if m is not None]
    succ, pred = fv.graph.succ, fv.graph.pred
    if known:  # the float successors of every input's counterpart
        # seen through a float quantize no quantized op took (a QuantStub, or a QAT float
        # side's fake-quant, against a model quantizing elsewhere or not at all)
        def unpaired_quantize(f: fx.Node) -> bool:
            return f not in taken_f and (c := fv.op_class(f)) is not None and c.role == "optional"

        def reads(f: fx.Node, k: fx.Node) -> bool:
            return k in pred[f] or any(k in pred[g] for g in pred[f] if unpaired_quantize(g))

        after = list(succ[known[0]])
        after += [g for f in list(after) if unpaired_quantize(f) for g in succ[f]]
        pool = [f for f in after if all(reads(f, k) for k in known[1:])]
    elif not qv.graph.pred[q]:
        pool = fv.sources()
    else:  # inputs unpaired upstream: only a same-named op will do
        pool = fv.ops_named(qv.name(q))
    want = node_attrs(qv, q)
    pool = [f for f in pool if fv.is_op(f) and f not in taken_f
            and node_match(node_attrs(fv, f), want)]
    qname, qattrs = want["name"], want["attrs"]
    return sorted(pool, key=lambda f: (fv.name(f) != qname, fv.attrs(f) != qattrs, fv.position(f)))


class _WeightEvidence:
    """Weight SQNR of a quantized op's weight against float candidates', each quantized weight
    read (and dequantized) once; read only where names do not settle a pairing."""

    def __init__(self, fv: GraphView, qv: GraphView) -> None:
        self.fv, self.qv = fv, qv
        self._quant: dict[tuple[fx.Node, ...], Any] = {}

    def sqnr(self, f_chain: list[fx.Node], q_chain: list[fx.Node]) -> float | None:
        """The weight SQNR of the pair the chains would make; ``None`` when either holds no
        weight fxnumeric reads, or the two weights' shapes differ."""
        key = tuple(q_chain)
        if key not in self._quant:
            self._quant[key] = op_weight(self.qv, q_chain, "quant")
        quant = self._quant[key]
        if quant is None:
            return None
        weight = op_weight(self.fv, f_chain, "float")
        if weight is None or weight.shape != quant.shape:
            return None
        return sqnr(weight, quant)


Chains = tuple[list[fx.Node], list[fx.Node]]


@dataclass(frozen=True)
class _Rejected:
    """A float candidate that aligned with a quantized op whose weight is not a copy of its
    own (weight SQNR below :data:`~fxnumeric.metrics.TWIN_WEIGHT_SQNR_DB`)."""

    float_chain: tuple[fx.Node, ...]
    quant: fx.Node
    weight_sqnr: float


def _choose(fv: GraphView, qv: GraphView, q: fx.Node, candidates: list[fx.Node],
            taken_f: set, taken_q: set, node_match: NodeMatch, evidence: _WeightEvidence,
            ) -> tuple[Chains | None, list[fx.Node], list[_Rejected]]:
    """The chains ``q`` pairs as, the candidates tried, and those its weight rejected.

    The first candidate that aligns wins if it has ``q``'s name; otherwise every candidate
    that aligns is weighed (:class:`_WeightEvidence`): the best weight SQNR at least
    :data:`~fxnumeric.metrics.TWIN_WEIGHT_SQNR_DB` wins, then the first whose weight is not
    read; if all read below, the float op of ``q``'s name is tried wherever it sits (the
    float model has a layer the quantized one skips), and no pair is made if its weight is
    not ``q``'s either.
    """
    qname = qv.name(q)
    tried: list[fx.Node] = []
    aligned: list[Chains] = []
    for f in candidates:
        tried.append(f)
        found = _align(fv, qv, f, q, taken_f, taken_q)
        if found is None:
            continue
        if not aligned and fv.name(f) == qname:
            return found, tried, []
        aligned.append(found)
    if not aligned:
        # nothing after its input's counterpart computes it (the float model has an op there
        # the quantized one lacks, `y * 0.5`): the float layer of its name, where its weights
        # say it is its twin
        found, _ = _by_name(fv, qv, q, tried, taken_f, taken_q, node_match, evidence,
                            weighed=True)
        return found, tried, []
    weighed = [(evidence.sqnr(*found), found) for found in aligned]
    twins = [(value, found) for value, found in weighed
             if value is not None and value >= TWIN_WEIGHT_SQNR_DB]
    if twins:
        return max(twins, key=lambda t: t[0])[1], tried, []  # max keeps the first of equals
    unread = [found for value, found in weighed if value is None]
    if unread:
        return unread[0], tried, []
    rejected = [_Rejected(tuple(f_chain), q, value) for value, (f_chain, _) in weighed]
    found, refused = _by_name(fv, qv, q, tried, taken_f, taken_q, node_match, evidence)
    return found, tried, rejected + refused


def _by_name(fv: GraphView, qv: GraphView, q: fx.Node, tried: list[fx.Node], taken_f: set,
             taken_q: set, node_match: NodeMatch, evidence: _WeightEvidence, *,
             weighed: bool = False) -> tuple[Chains | None, list[_Rejected]]:
    """The chains of the float op named as ``q`` is, wherever it sits, unless its weight
    is not ``q``'s (and, ``weighed``, unless no weight says it is: a name alone places no
    op found nowhere near its input, a module called at several places among them)."""
    want, rejected = node_attrs(qv, q), []
    for f in fv.ops_named(qv.name(q)):
        if f in taken_f or f in tried or not node_match(node_attrs(fv, f), want):
            continue
        found = _align(fv, qv, f, q, taken_f, taken_q)
        if found is None:
            continue
        value = evidence.sqnr(*found)
        if value is None and not weighed or value is not None and value >= TWIN_WEIGHT_SQNR_DB:
            return found, rejected  # its name, and no weight against it
        if value is not None:
            rejected.append(_Rejected(tuple(found[0]), q, value))
    return None, rejected


# Quantization never changes these: a float and a quantized module that differ in them are
# not counterparts (attributes missing on either side are not compared).
SHAPE_ATTRS = tuple(
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
        for i in SHAPE_ATTRS
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
                f"{MODULE_ATTRS[i]} {fv.attrs(f)[i]} vs {qattrs[i]}" for i in SHAPE_ATTRS
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


def _weight_miss_reason(fv: GraphView, qv: GraphView, q: fx.Node, refused: list[_Rejected],
                        taken_f: set) -> str:
    """Why ``q`` stays unpaired although float ops aligned with it: their weights are not
    its weight's (:data:`~fxnumeric.metrics.TWIN_WEIGHT_SQNR_DB`)."""
    read = ", ".join(f"`{r.float_chain[0].name}` ({fv.op_class(r.float_chain[0]).kind}) "
                     f"{r.weight_sqnr:.2f} dB" for r in refused[:3])
    name = qv.name(q)
    named = fv.ops_named(name)
    taken = [f for f in named if f in taken_f]
    if taken:
        where = (f"the float op of its name, `{taken[0].name}`, is paired already (the "
                 "quantized model calls it more often than the float model does?)")
    elif named:
        where = f"the float op of its name, `{named[0].name}`, does not compute it either"
    else:
        where = f"the float graph has no op named `{name}`"
    return (f"its weights are not a quantized copy of any float candidate's: weight SQNR "
            f"{read}, where quantizing a weight reads well above {TWIN_WEIGHT_SQNR_DB:g} dB; "
            f"{where}. The quantized model has a layer the float model lacks, or other "
            "weights")


def _rejected_reason(fv: GraphView, qv: GraphView, r: _Rejected, pair_of: dict) -> str:
    """Why a float op stays unpaired though a quantized op at its place aligned with it: that
    op's weight is not a copy of its own."""
    head = r.float_chain[0]
    ops = " -> ".join(f"`{n.name}`" for n in r.float_chain)
    took = next((p for n, p in pair_of.items() if r.quant.name in p.quant_nodes), None)
    where = (f"; it paired with float `{took.float_nodes[0]}`, whose weights it holds"
             if took is not None else "")
    return (f"quantized `{r.quant.name}` ({qv.op_class(r.quant).kind}) reads the same input as "
            f"float {ops}, but its weights are not `{head.name}`'s: weight SQNR "
            f"{r.weight_sqnr:.2f} dB, where quantizing a weight reads well above "
            f"{TWIN_WEIGHT_SQNR_DB:g} dB{where}. The quantized model lacks this layer, or "
            "holds other weights")


def _float_miss_reason(fv: GraphView, qv: GraphView, f: fx.Node, pair_of: dict,
                       inverse: dict) -> str:
    kind = fv.op_class(f).kind
    if not f.users and writes_first_input(f, fv.modules):
        # `y.relu_()` with its result unused: it changes `y` for every later reader, and
        # torch's convert_fx drops it (4.5 dB downstream on a model it did this to)
        written = f.args[0].name if f.args and isinstance(f.args[0], fx.Node) else "its input"
        return (f"an in-place op whose result is unused, but which writes into `{written}`: the "
                "quantized graph has no such op (torch's convert_fx drops one it does not "
                "see used), so every value read after it differs between the models")
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


def _refuse_fixed_on_one_side(fv: GraphView, qv: GraphView) -> None:
    """Refuse a graph that reads an argument the other graph was traced with fixed.

    fxnumeric traces a model on the call the example inputs make, ``y`` left out fixed to its
    default; a GraphModule (convert_fx's) is read as it was traced, where ``y`` may be an
    input its code reads. The batches give it no value: that graph fails on them, and its
    inputs cannot pair with the other's.
    """
    for side, view, other_side, other in (("quantized", qv, "float", fv),
                                          ("float", fv, "quantized", qv)):
        fixed_there = {str(n.target) for n in fixed_inputs(other.nodes)[0]}
        read = [f"`{n.target}`" for n in view.placeholders if str(n.target) in fixed_there]
        if read:
            listed = ", ".join(read)
            raise InputError(
                f"the {side} model's graph reads {listed}, which the {other_side} model was "
                f"traced with fixed to its default, as the example inputs leave it out or give "
                "it as None (the first batch of compare, advise, sensitivity, diagnose; "
                f"match's example_inputs). The {side} model is a GraphModule, read as it was "
                f"traced, with {listed} as an input: it fails on batches without it.\n"
                f"Fix: give {listed} in every batch, or pass a {side} model traced on the call "
                f"the batches make (for convert_fx: prepare_fx a wrapper whose forward calls "
                f"the model without {listed})")


def constant_inputs(fv: GraphView, qv: GraphView) -> list[str]:
    """The inputs the float graph reads that the quantized graph takes but computes without:
    ``torch.export`` makes a constant of a non-tensor argument (``forward(x, n)`` exported
    with ``n=3``), so a pt2e model keeps the argument but computes with the value it was
    exported with."""
    taken = {str(n.target) for n in qv.gm.graph.nodes if n.op == "placeholder"}
    unread = taken - {str(n.target) for n in qv.placeholders}
    return [str(n.target) for n in fv.placeholders if str(n.target) in unread]


def _refuse_constant_on_one_side(fv: GraphView, qv: GraphView) -> None:
    """Refuse, with the reason, a quantized graph that made a constant of an input the float
    graph reads (:func:`constant_inputs`)."""
    constant = constant_inputs(fv, qv)
    if constant:
        listed = ", ".join(f"`{name}`" for name in constant)
        raise MatchError(
            f"the float model reads {listed}, which the quantized model takes but computes "
            "without: torch.export made a constant of it (a non-tensor argument is "
            "specialised to the value it was exported with), so the quantized graph has no "
            "op reading it for the float one's to pair with.\nFix: pass example_inputs with "
            f"that value of {listed} (compare, advise, diagnose and sensitivity pass their "
            "first batch), so that the float model is exported the same way "
            "(capture='auto' or 'export')")


def pair_views(fv: GraphView, qv: GraphView, node_match: NodeMatch = same_op,
               ) -> tuple[list[LocalPair], list[LocalMiss], list[LocalMiss], dict]:
    """Pair the ops of two views.

    Returns:
        ``(pairs, float misses, quantized misses, anchor)``; ``anchor`` maps each quantized
        node the walk visited to the float node carrying its value (``None`` if none).

    Raises:
        InputError: one graph reads an argument the other was traced with fixed (the
            example inputs leave it out): the batches give it no value.
        MatchError: the graphs take different numbers of inputs otherwise.
    """
    if len(fv.placeholders) != len(qv.placeholders):
        _refuse_fixed_on_one_side(fv, qv)
        _refuse_constant_on_one_side(fv, qv)
        raise MatchError(
            f"the float model takes {len(fv.placeholders)} inputs "
            f"({', '.join(p.name for p in fv.placeholders)}) but the quantized model takes "
            f"{len(qv.placeholders)} ({', '.join(p.name for p in qv.placeholders)}); "
            "compare a float model with the quantized model made from it."
        )
    anchor: dict[fx.Node, fx.Node | None] = dict(zip(qv.placeholders, fv.placeholders, strict=True))
    taken_f: set = set()
    taken_q: set = set()
    pairs: list[LocalPair] = []
    pair_of: dict[fx.Node, LocalPair] = {}
    miss_q: list[LocalMiss] = []
    seen: dict[str, int] = {}
    evidence = _WeightEvidence(fv, qv)
    rejected: dict[fx.Node, _Rejected] = {}  # float node -> the quantized op it was not
    for q in qv.topological_order():
        if q in taken_q or not qv.is_op(q):
            continue
        mapped = [anchor.get(i) for i in qv.graph.pred[q]]
        found, tried, refused = _choose(fv, qv, q, _candidates(fv, qv, q, mapped, taken_f,
                                                                node_match),
                                        taken_f, taken_q, node_match, evidence)
        for r in refused:
            for n in r.float_chain:
                rejected.setdefault(n, r)
        if found is None:
            c = qv.op_class(q)
            if c.role == "optional":
                anchor[q] = mapped[0] if mapped else None
                if (c.is_quantize and anchor[q] is not None and anchor[q].op == "placeholder"
                        and not qv.is_dynamic_quantize(q)):
                    # the model's input quantized: the error it adds gets a row of its own
                    # (quantized dynamically, it is the reading op's, as every later one is)
                    pairs.append(LocalPair(
                        call_site_name(f"{anchor[q].target}.quantize", seen), c.kind,
                        (anchor[q].name,), (q.name,), False))
            else:
                anchor[q] = None
                reason = (_weight_miss_reason(fv, qv, q, refused, taken_f) if refused
                          else _quant_miss_reason(fv, qv, q, mapped, tried))
                miss_q.append(LocalMiss(q.name, c.kind, reason, c.quantized))
            continue
        f_chain, q_chain = found
        kinds = [k for n in q_chain for k in qv.op_class(n).signature]
        p = LocalPair(
            name=call_site_name(_pair_name(qv, q_chain), seen),
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
        LocalMiss(f.name, fv.op_class(f).kind,
                  _rejected_reason(fv, qv, rejected[f], pair_of) if f in rejected
                  else _float_miss_reason(fv, qv, f, pair_of, inverse))
        for f in fv.nodes
        if fv.is_op(f) and f not in taken_f and fv.op_class(f).role == "op"
    ]
    return pairs, miss_f, miss_q, anchor


def _pair_name(qv: GraphView, q_chain: list[fx.Node]) -> str:
    """A flow's report name for the chain (:func:`fxnumeric.flows.layer_name`), else the name
    of the module computing the chain's output, else of its head, else a node's."""
    for n in q_chain:
        named = flows.layer_name(n, qv.modules)
        if named is not None:
            return named
    last = qv.name(q_chain[-1])
    return last if last != q_chain[-1].name else qv.name(q_chain[0])


