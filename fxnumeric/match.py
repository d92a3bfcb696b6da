"""Stage 2, match: pair the ops of a float model with those of its quantized model.

Capture (:mod:`fxnumeric.capture`) turns each model into graphs; a matching is a set of
**regions**, each a pair of graphs paired op by op by the networkx pairing pass
(:mod:`fxnumeric.pairing`), and every stage after this one walks them the same way,
whatever capture made them:

* a model torch.fx (or torch.export) captures whole is **one region**, the whole model
  (paths ``""``);
* a model torch.fx cannot trace whole (a Hugging Face transformer) is several regions:
  submodules traced as graphs of their own, and leaf modules below an untraceable module,
  each captured as a one-op graph that calls it (``Region.whole_module``).

::

    float:      x -> conv1 -> bn1 -> relu -> maxpool          (unfused nn.Module)
    quantized:  x -> quantize -> conv1 (ConvReLU2d) -> maxpool (eager or FX quantized)

    pairs:      ('conv2d-relu', float=(conv1, bn1, relu), quantized=(conv1,))
                ('max_pool2d',  float=(maxpool,),         quantized=(maxpool,))

A pair's name is the quantized side's (module path, the FloatFunctional owning a functional
op, a flow's name, or the node name), prefixed with its region's path; a module called twice
is two pairs, ``layer1.0.relu`` and ``layer1.0.relu#2``. Its node names are those of its
region's graphs, prefixed the same way. :meth:`Matching.region_of` gives a pair's region,
whose views answer every question about its nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch.fx as fx
from torch import nn

from . import flows
from ._collector import defers_collection
from .capture import (
    FUNCTIONAL_METHODS,
    LeafSpec,
    fixed_arguments,
    is_functional,
    kwargs_only,
    leaf_graph,
    method_graph,
    single_call_graph,
    takes_var_kwargs,
    trace,
)
from .capture.check import check_whole
from .capture.export import (
    auto_exports_float,
    check_capture,
    export_module,
    export_side,
    is_export_graph,
)
from .capture.tree import CallSpecs, capture_tree, record_calls
from .capture.wrappers import unwrap
from .errors import InputError, MatchError, TraceError
from .guards import check_pair, contents, nothing_quantized, warn_unquantized
from .offload import whole_layers, whole_modules, whole_paths
from .ops import classify, classify_module
from .pairing import NodeMatch, call_site_name, constant_inputs, op_name, pair_views, same_op
from .run import (
    as_call,
    buffers_put_back,
    check_devices,
    check_model,
    keeps_buffers,
    run_model,
)
from .view import GraphView

__all__ = ["Pair", "Unmatched", "Matching", "Region", "match"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pair:
    """A float subgraph and the quantized subgraph that computes the same thing.

    Attributes:
        name: the quantized side's name for it: module path (``layer1.0.conv1``), the
            FloatFunctional that owns a functional op (``layer1.0.add_relu``), a flow's name
            (``layer1.0.add`` in an exported graph), or node name; ``#2``, ``#3`` ... for the
            further call sites of the same op (a module called twice).
        kind: the op kinds, joined: ``conv2d-relu``.
        float_nodes: names of the float nodes, in order, prefixed with the region's path;
            the last one's output is the pair's float output.
        quant_nodes: names of the quantized nodes, in order, prefixed likewise.
        quantized: whether the quantized side computes in quantized form (False for ops
            left in float, such as an ``nn.Embedding`` under dynamic quantization).
        found_by: ``"graph"`` (ops of a traced graph) or ``"module"`` (a leaf module of a
            model torch.fx cannot trace whole, paired whole through the module tree).
        region: the quantized path of the region holding the pair (``""``: the whole model).
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
    """A node (or module) that found no partner, with the reason a person can act on.

    ``region`` is the quantized path of the region whose graph holds it, ``None`` for a
    module of one model with no counterpart in the other (no region holds it).
    """

    node: str
    kind: str
    reason: str
    quantized: bool = False
    region: str | None = ""


def _prefixed(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


@dataclass(frozen=True, eq=False)
class Region:
    """A float graph and a quantized graph paired op by op: a whole model, a submodule, or a
    leaf module kept whole (its graph only calls it).

    Attributes:
        float_path: where the float graph sits in the float model (``""``: the whole model);
            instrumented and hybrid versions of the region replace the module at that path.
        quant_path: the same in the quantized model.
        float_view: the view of the float graph (:class:`~fxnumeric.GraphView`).
        quant_view: the view of the quantized graph.
        pairs: the region's pairs (names and nodes prefixed with the scopes).
        unmatched_float: its float nodes without a partner.
        unmatched_quant: its quantized nodes without a partner.
        quant_to_float: for each quantized node whose value has a float counterpart, that
            float node's name (graph node names, not prefixed).
        float_scope: the module path the graph's names are relative to (the parent of a leaf
            module kept whole, else ``float_path``).
        quant_scope: the same for the quantized graph.
        whole_module: the region is a leaf module kept whole.
        method: for a functional module (``FloatFunctional``) under code torch.fx cannot
            trace, the method its parent calls it through (``"add"``): the region's graphs
            are that method's (:func:`fxnumeric.capture.method_graph`), and its replacement
            in an assembled model is called through it. ``""`` otherwise.
    """

    float_path: str
    quant_path: str
    float_view: GraphView = field(repr=False)
    quant_view: GraphView = field(repr=False)
    pairs: tuple[Pair, ...] = field(repr=False, default=())
    unmatched_float: tuple[Unmatched, ...] = field(repr=False, default=())
    unmatched_quant: tuple[Unmatched, ...] = field(repr=False, default=())
    quant_to_float: dict[str, str] = field(repr=False, default_factory=dict)
    float_scope: str = ""
    quant_scope: str = ""
    whole_module: bool = False
    call_sites: int = 1
    """How many times the region's module runs per forward (a submodule or leaf module its
    untraceable parent calls several times, as ALBERT calls its one shared layer): each call
    is a call site with pairs of its own, ``#2`` ..."""
    method: str = ""

    def __post_init__(self) -> None:
        fv, qv = self.float_view, self.quant_view
        float_by_name = {_prefixed(self.float_scope, n.name): n for n in fv.nodes}
        quant_by_name = {_prefixed(self.quant_scope, n.name): n for n in qv.nodes}
        by_node: dict[fx.Node, Pair] = {}
        for p in reversed(self.pairs):  # a node's pair is its first call site's
            # an input quantize pairs with the input itself, which stays a model input
            by_node.update((n, p) for n in map(float_by_name.__getitem__, p.float_nodes)
                           if n.op != "placeholder")
            by_node.update((quant_by_name[n], p) for n in p.quant_nodes)
        to_quant: dict[fx.Node, fx.Node] = {}
        to_float: dict[fx.Node, fx.Node] = {}
        for q, f in self.quant_to_float.items():
            qn, fn = qv.node(q), fv.node(f)
            to_float[qn] = fn
            to_quant.setdefault(fn, qn)  # the earliest quantized node carrying that value
        # a float quantize that pairs with nothing (a QAT float side's fake-quant against its
        # converted model, a QuantStub against a model without one) passes its input's value
        # on, as pairing reads an unpaired quantize on the quantized side: a shadow reading it
        # is fed its input's counterpart
        for fn in fv.nodes:
            c = fv.op_class(fn)
            if c is None or c.role != "optional" or fn in by_node or fn in to_quant:
                continue
            read = fv.inputs(fn)
            if read and read[0] in to_quant:
                to_quant[fn] = to_quant[read[0]]
        passable = frozenset(
            n for n in qv.nodes
            if n not in by_node and (c := qv.op_class(n)) is not None and c.role == "optional"
        )
        # An op's value is what it hands on: after its own output quantize for a quantized op,
        # and after the quantize in front of its quantized readers for an op left in float
        # (those readers' shadows are fed the rounded value: read before it, that rounding was
        # in no row, and efficientnet_b0's SiLU rows read 34.32 dB where the next conv reads
        # 32.41). On the float side: a QAT model hands on a quantized op's value after its output
        # fake-quant, the one convert turns into the op's output scale (inside a QAT conv's
        # forward hook; a node of its own after a FloatFunctional op, or in a prepare_qat_fx
        # graph). Read before it, a FloatFunctional add was a sum its model never hands on,
        # unclamped and unrounded (off by 0.30 in tests/test_eager_oracle.py's QAT model)
        def float_output(p: Pair) -> fx.Node:
            last = float_by_name[p.float_nodes[-1]]
            out = fv.value_node(last, fake_quants=p.quantized)
            # a fake-quant another pair claims (an input quantize) is that pair's value
            return out if by_node.get(out, p) is p else last

        outputs = {
            p: (float_output(p),
                qv.value_node(quant_by_name[p.quant_nodes[-1]], passable,
                              quantize=p.kind == "quantize",
                              fake_quants=p.quantized or _owns_output_fake_quant(
                                  qv, [quant_by_name[n] for n in p.quant_nodes])))
            for p in self.pairs
        }
        per_site = len(self.pairs) // self.call_sites  # the pairs are listed call after call
        sites = {p: i // per_site for i, p in enumerate(self.pairs)}
        # caches derived from the fields above, set once: the dataclass stays frozen
        for name, value in (("_float_by_name", float_by_name), ("_quant_by_name", quant_by_name),
                            ("_by_node", by_node), ("_to_quant", to_quant),
                            ("_to_float", to_float), ("_outputs", outputs), ("_sites", sites)):
            object.__setattr__(self, name, value)

    def float_node(self, name: str) -> fx.Node:
        """The float node called ``name`` (prefixed as in :attr:`Pair.float_nodes`)."""
        return self._float_by_name[name]  # type: ignore[attr-defined]

    def quant_node(self, name: str) -> fx.Node:
        """The quantized node called ``name`` (prefixed as in :attr:`Pair.quant_nodes`)."""
        return self._quant_by_name[name]  # type: ignore[attr-defined]

    def has_node(self, name: str) -> bool:
        """Whether either graph has a node called ``name`` (prefixed)."""
        return name in self._float_by_name or name in self._quant_by_name  # type: ignore

    def float_name(self, node: fx.Node) -> str:
        """``node``'s name as pairs give it (prefixed with the float scope)."""
        return _prefixed(self.float_scope, node.name)

    def quant_name(self, node: fx.Node) -> str:
        """``node``'s name as pairs give it (prefixed with the quantized scope)."""
        return _prefixed(self.quant_scope, node.name)

    def pair_of(self, node: fx.Node) -> Pair | None:
        """The pair a float or quantized node of this region belongs to, if any."""
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
        output quantize (and dequantize) where the graph has one (reference FX, pt2e), and
        for a layer left in float, after the quantize that feeds the next quantized layer
        (also where other readers read the value unrounded: see :meth:`GraphView.value_node`),
        so that the rounding is in the layer's row. On the float side of a quantized pair,
        a QAT model's op is read after its own output fake-quantize where that is a node of
        the graph (a FloatFunctional's ``activation_post_process``, a ``prepare_qat_fx``
        layer's): the value the QAT model hands on, as an eager QAT conv's forward hook hands
        on its own.
        """
        return self._outputs[pair]  # type: ignore[attr-defined]

    def hands_on_rounded(self, pair: Pair) -> bool:
        """Whether ``pair`` is an op left in float whose value is handed on through the
        quantize in front of its quantized readers (:meth:`output_nodes`): it computes in
        float, and what it hands on is rounded."""
        return not pair.quantized and self.output_nodes(pair)[1] is not self.quant_node(
            pair.quant_nodes[-1])

    def rounded_for(self, pair: Pair) -> tuple[Pair, ...]:
        """The pairs whose input quantize is all the error ``pair``'s own row holds, ``()``
        for any other pair.

        A pair's value is read after the quantize in front of its quantized readers
        (:meth:`output_nodes`), so its row holds that rounding. Where ``pair`` computes what
        its float twin computes and that quantize is its readers' request, not its own, the
        row measures the readers' input quantization: an op left in float
        (:meth:`hands_on_rounded`: a GELU in front of an FX-quantized Linear), or a pt2e op
        without a weight whose output its quantizer left alone while its reader asked for its
        input (X86InductorQuantizer's Linear: :func:`fxnumeric.flows.rounding_owner`; a fused
        pattern's first op stands for the pattern). Kept float by name, the readers lose that
        rounding; ``pair`` kept float keeps it. ``()`` as well where any reader is not a pair
        (the model's output) or the graph does not say whose the quantize is.
        """
        if pair.kind == "quantize":
            return ()
        view = self.quant_view
        chain = self.chain(pair, "quant")
        out = self.output_nodes(pair)[1]
        quantize, node = None, out
        while node is not chain[-1]:  # the chain output_nodes crossed, back to the op
            cls = view.op_class(node)
            if cls is not None and cls.is_quantize:
                quantize = node
            if not node.args or not isinstance(node.args[0], fx.Node):
                return ()
            node = node.args[0]
        if quantize is None:
            return ()
        readers: list[fx.Node] = []
        todo = list(quantize.users)
        while todo:
            user = todo.pop(0)
            cls = view.op_class(user)
            if cls is not None and cls.role == "plumbing":
                todo.extend(user.users)
            else:
                readers.append(user)
        if pair.quantized:
            if any(flows.weight_input(n, c.signature[0]) is not None
                   for n in chain if (c := view.op_class(n)) is not None):
                return ()  # its own weight's rounding is in the row too
            owners = [flows.rounding_owner(chain[-1], r) for r in readers]
        elif self.hands_on_rounded(pair):
            owners = list(readers)
        else:
            return ()
        found = [self.pair_of(o) if o is not None and o not in chain else None for o in owners]
        if not found or None in found:
            return ()
        return tuple(dict.fromkeys(p for p in found if p is not None))

    def chain(self, pair: Pair, side: str) -> list[fx.Node]:
        """The nodes of ``pair`` on ``side`` (``"float"`` or ``"quant"``), in order."""
        if side == "float":
            return [self.float_node(n) for n in pair.float_nodes]
        return [self.quant_node(n) for n in pair.quant_nodes]

    def view(self, side: str) -> GraphView:
        """The view of ``side`` (``"float"`` or ``"quant"``)."""
        return self.float_view if side == "float" else self.quant_view

    def call_site(self, pair: Pair) -> int:
        """Which call of the region's module ``pair`` observes (0 for the first)."""
        return self._sites[pair]  # type: ignore[attr-defined]

    def path(self, side: str) -> str:
        """Where ``side``'s graph sits in its model."""
        return self.float_path if side == "float" else self.quant_path

    def scope(self, side: str) -> str:
        """The module path ``side``'s names are relative to."""
        return self.float_scope if side == "float" else self.quant_scope


def _owns_output_fake_quant(view: GraphView, chain: list[fx.Node]) -> bool:
    """Whether the fake-quant after a pair's quantized ``chain`` (in an FX prepared model) is
    the chain's own output quantize, as ``convert_fx`` makes it: the chain ends in a QAT
    module (its weight fake-quantized: ``prepare_qat`` / ``prepare_qat_fx``), or it reads a
    fake-quantized value (FX fake-quantizes the inputs of exactly the ops it will quantize,
    ``prepare_fx`` with a fake-quant qconfig included). An op left in float reads float
    values: the fake-quant after it is the next op's input quantize, which the op hands on
    all the same, as any quantize in front of a quantized reader
    (:meth:`GraphView.value_node`)."""
    last = chain[-1]
    module = view.modules.get(last.target) if last.op == "call_module" else None  # type: ignore[arg-type]
    if module is not None and hasattr(module, "weight_fake_quant"):
        return True
    return any(view.fake_quantizes(i) for i in view.inputs(chain[0]))


def pair_region(float_view: GraphView, quant_view: GraphView, *, float_path: str = "",
                quant_path: str = "", float_scope: str | None = None,
                quant_scope: str | None = None, whole_module: bool = False,
                node_match: NodeMatch = same_op, call_sites: int = 1) -> Region:
    """Pair two views into a :class:`Region` (see :func:`fxnumeric.pairing.pair_views`).

    With ``call_sites`` > 1 (a module its parent calls several times), every pair is
    repeated per call, numbered on from the graph's own call sites of its op: a graph calling
    ``relu`` twice, run twice, has ``relu``, ``relu#2`` (first run), ``relu#3``, ``relu#4``.
    """
    fscope = float_path if float_scope is None else float_scope
    qscope = quant_path if quant_scope is None else quant_scope
    found, miss_f, miss_q, anchor = pair_views(float_view, quant_view, node_match)
    seen: dict[str, int] = {}
    pairs = tuple(
        Pair(call_site_name(_prefixed(qscope, op_name(p.name)), seen), p.kind,
             tuple(_prefixed(fscope, n) for n in p.float_nodes),
             tuple(_prefixed(qscope, n) for n in p.quant_nodes), p.quantized,
             "module" if whole_module else "graph", quant_path)
        for site in range(call_sites) for p in found
    )
    return Region(
        float_path, quant_path, float_view, quant_view, pairs,
        tuple(Unmatched(_prefixed(fscope, u.node), u.kind, u.reason, u.quantized, quant_path)
              for u in miss_f),
        tuple(Unmatched(_prefixed(qscope, u.node), u.kind, u.reason, u.quantized, quant_path)
              for u in miss_q),
        {q.name: f.name for q, f in anchor.items() if f is not None},
        fscope, qscope, whole_module, call_sites,
    )


@dataclass(frozen=True, eq=False)
class Matching:
    """The result of :func:`match`: regions of paired graphs, their pairs and their misses.

    Every stage walks :attr:`regions` (or :attr:`pairs` and :meth:`region_of`) the same way,
    whatever capture made them. For a model captured whole, the one region is
    :attr:`root` and :attr:`float_view` / :attr:`quant_view` are its views. The lookups
    below answer "which pair, which counterpart" for a node without searching.

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> m = match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear}))
        >>> pair = m.pair("0")
        >>> m.pair_of(m.quant_view.node("_0")) is pair, m.output_nodes(pair)[1].name
        (True, '_0')
    """

    regions: tuple[Region, ...]
    pairs: tuple[Pair, ...] = ()
    """Every region's pairs: graph order for a model captured whole; for several regions, in
    the order their calls run (:meth:`run_position`), then graph order."""
    unmatched_float: tuple[Unmatched, ...] = ()
    unmatched_quant: tuple[Unmatched, ...] = ()
    float_model: nn.Module | None = field(repr=False, default=None)
    quant_model: nn.Module | None = field(repr=False, default=None)
    """The user's models (not modified); module paths in pair names refer to them."""
    untraced: tuple[tuple[str, str], ...] = ()
    """``(float module path, reason)`` of modules torch.fx could not trace: each is kept
    whole and its children are compared, but the code of its own ``forward`` is not."""
    capture_notes: tuple[tuple[str, str], ...] = ()
    """``(side, note)``: how a side was captured where that is not the ``capture=`` asked for
    (``capture="export"`` on a model torch.export cannot capture, which torch.fx traced
    instead), or where ``capture="auto"`` exported it."""
    extra_kwargs: dict[str, tuple[str, ...]] = field(repr=False, default_factory=dict)
    """Quantized module path -> the keyword arguments its ``**kwargs`` took on the example
    inputs (models captured through the module tree): what a graph calling it whole takes."""
    call_order: tuple[tuple[str, int], ...] = ()
    """``(quantized region path, call site)`` of the regions' calls in the order they began on
    the example inputs (models captured through the module tree); see :meth:`run_position`."""
    containers: frozenset[str] = frozenset()
    """Names of the pairs that call a module kept whole whose own layers are pairs of other
    regions (a user's wrapper tracing around an untraceable ``LlamaModel``): their output is a
    value to compare, but a shadow of them would re-run every layer inside, measuring those
    layers' error rather than their own, so they get none (see :func:`container_pairs`)."""

    def __post_init__(self) -> None:
        by_name: dict[str, Pair] = {}
        region_of: dict[Pair, Region] = {}
        node_region: dict[fx.Node, Region] = {}
        for region in self.regions:
            for p in region.pairs:
                region_of[p] = region
                by_name.setdefault(p.name, p)
            for n in (*region.float_view.nodes, *region.quant_view.nodes):
                node_region[n] = region
        by_path = {r.quant_path: r for r in self.regions}
        root = next((r for r in self.regions if not r.float_path and not r.quant_path), None)
        index = {r: i for i, r in enumerate(self.regions)}
        call_rank = {call: i for i, call in enumerate(self.call_order)}
        for name, value in (("_by_name", by_name), ("_region_of", region_of),
                            ("_node_region", node_region), ("_by_path", by_path),
                            ("_root", root), ("_index", index), ("_call_rank", call_rank)):
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ regions
    @property
    def root(self) -> Region | None:
        """The region covering each whole model (paths ``""``), if there is one."""
        return self._root  # type: ignore[attr-defined]

    @property
    def whole_graph(self) -> bool:
        """Whether each model was captured as one graph (one region, the whole model)."""
        return len(self.regions) == 1 and self.root is not None and not self.untraced

    def region_of(self, item: Pair | Unmatched | fx.Node | str) -> Region:
        """The region holding a pair, a miss, a node, or the region at a quantized path."""
        if isinstance(item, Pair):
            return self._region_of[item]  # type: ignore[attr-defined]
        if isinstance(item, fx.Node):
            return self._node_region[item]  # type: ignore[attr-defined]
        path = item.region if isinstance(item, Unmatched) else item
        found = self._by_path.get(path)  # type: ignore[attr-defined]
        if found is None:
            raise MatchError(f"no region at {path!r}; regions are at: "
                             + ", ".join(repr(r.quant_path) for r in self.regions[:10]))
        return found

    def run_position(self, region: Region, site: int = 0) -> tuple[int, int, int]:
        """Sorts call ``site`` of ``region`` (:meth:`Region.call_site`) in run order.

        A region called several times runs its calls apart (ALBERT's shared layer: its
        attention, feed-forward and activation of the first call, then of the second), so
        each call's pairs are listed, and reported, where it began in :attr:`call_order`;
        calls not recorded there (no example inputs) follow, in region order.
        """
        rank = self._call_rank.get((region.quant_path, site))  # type: ignore[attr-defined]
        if rank is not None:
            return rank, 0, 0
        return len(self.call_order), self._index[region], site  # type: ignore[attr-defined]

    def _root_region(self, what: str) -> Region:
        if self.root is None:
            raise MatchError(
                f"Matching.{what} exists for models captured whole; these were captured in "
                f"{len(self.regions)} regions (torch.fx could not trace them whole). Fix: read "
                "matching.regions, or matching.region_of(pair)."
            )
        return self.root

    @property
    def float_view(self) -> GraphView:
        """The view of the float model's graph (the root region's)."""
        return self._root_region("float_view").float_view

    @property
    def quant_view(self) -> GraphView:
        """The view of the quantized model's graph (the root region's)."""
        return self._root_region("quant_view").quant_view

    def module(self, side: str) -> nn.Module | None:
        """``side``'s model (``"float"`` or ``"quant"``) as a module tree: the user's model,
        or for a torch.export ``ExportedProgram`` (no ``nn.Module``) the ``.module()`` its
        graph was read from (the root region's). Module paths read from it are the user's."""
        model = self.float_model if side == "float" else self.quant_model
        if isinstance(model, nn.Module) or model is None or self.root is None:
            return model
        view = self.root.float_view if side == "float" else self.root.quant_view
        return view.root

    @property
    def float_graph(self) -> fx.GraphModule:
        """The traced float GraphModule (the root region's)."""
        return self.float_view.gm

    @property
    def quant_graph(self) -> fx.GraphModule:
        """The traced quantized GraphModule (the root region's)."""
        return self.quant_view.gm

    @property
    def nothing_quantized(self) -> bool:
        """Whether no region's quantized graph has a quantized op or a quantize node."""
        return not any(contents(r.quant_view).quantizes for r in self.regions)

    @property
    def quantized_ops(self) -> int:
        """How many quantized compute ops the quantized graphs have, paired or not."""
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
        """The pair called ``name``."""
        found = self._by_name.get(name)  # type: ignore[attr-defined]
        if found is None:
            names = ", ".join(p.name for p in self.pairs[:20])
            raise MatchError(f"no pair named {name!r}; names are: {names} ...")
        return found

    def pair_of(self, node: fx.Node) -> Pair | None:
        """The pair a float or quantized node belongs to, if any."""
        region = self._node_region.get(node)  # type: ignore[attr-defined]
        return None if region is None else region.pair_of(node)

    def float_counterpart(self, node: fx.Node) -> fx.Node | None:
        """The float node computing the value that quantized ``node`` carries, if any."""
        return self.region_of(node).float_counterpart(node)

    def quant_counterpart(self, node: fx.Node) -> fx.Node | None:
        """The earliest quantized node carrying the value of float ``node``, if any."""
        return self.region_of(node).quant_counterpart(node)

    def output_nodes(self, pair: Pair) -> tuple[fx.Node, fx.Node]:
        """``(float_node, quant_node)`` whose outputs are the pair's values (see
        :meth:`Region.output_nodes`)."""
        return self.region_of(pair).output_nodes(pair)

    def float_node(self, name: str) -> fx.Node:
        """The float node called ``name`` (as in :attr:`Pair.float_nodes`)."""
        for region in self.regions:
            if name in region._float_by_name:  # type: ignore[attr-defined]
                return region.float_node(name)
        raise MatchError(f"no float node is called {name!r}")

    def quant_node(self, name: str) -> fx.Node:
        """The quantized node called ``name`` (as in :attr:`Pair.quant_nodes`)."""
        for region in self.regions:
            if name in region._quant_by_name:  # type: ignore[attr-defined]
                return region.quant_node(name)
        raise MatchError(f"no quantized node is called {name!r}")

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
            if node in (p.name, *p.float_nodes, *p.quant_nodes):
                region = self.region_of(p)
                if region.whole_module:
                    note = "paired through the module tree"
                    return explain_table([(p.float_nodes[0], p.kind, p.quant_nodes[0], note)],
                                         tablefmt)
                return explain_table(_explain_rows(region, node, radius), tablefmt)
        for u in (*self.unmatched_float, *self.unmatched_quant):
            if u.node != node:
                continue
            if u.region is None:  # a module without counterpart: no graph around it
                side = ((u.node, u.kind, "-") if u in self.unmatched_float
                        else ("-", u.kind, u.node))
                return explain_table([(*side, f"<- unpaired: {u.reason}")], tablefmt)
            return explain_table(_explain_rows(self.region_of(u), node, radius), tablefmt)
        raise MatchError(f"no pair or unpaired node is called {node!r}; see Matching.table()")

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


def _explain_rows(m: Region, node: str, radius: int) -> list[tuple[str, str, str, str]]:
    """Rows of :meth:`Matching.explain` inside region ``m``, in float graph order (names as
    pairs give them: prefixed with the region's scopes)."""
    fv, qv = m.float_view, m.quant_view
    focus_f: list[fx.Node] = []
    focus_q: list[fx.Node] = []
    for p in m.pairs:
        if node == p.name or node in p.float_nodes or node in p.quant_nodes:
            focus_f += m.chain(p, "float")
            focus_q += m.chain(p, "quant")
    misses_f = {u.node: u for u in m.unmatched_float}
    misses_q = {u.node: u for u in m.unmatched_quant}
    if not focus_f and not focus_q:
        if node in misses_f:
            focus_f.append(m.float_node(node))
        if node in misses_q:
            focus_q.append(m.quant_node(node))
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
        done.update(m.chain(p, "float"))
        done.update(m.chain(p, "quant"))
        pos = fv.position(m.float_node(p.float_nodes[0]))
        rows.append((pos, ", ".join(p.float_nodes), p.kind, ", ".join(p.quant_nodes), ""))
    for f in near_f:
        name = m.float_name(f)
        if f not in done and name in misses_f:
            u = misses_f[name]
            rows.append((fv.position(f), name, u.kind, "-", f"<- unpaired: {u.reason}"))
    for q in near_q:
        name = m.quant_name(q)
        if q not in done and name in misses_q:
            u = misses_q[name]
            before = [b for b in map(m.float_counterpart, qv.inputs(q)) if b is not None]
            pos = max((fv.position(b) for b in before), default=-1)
            rows.append((pos, "-", u.kind, name, f"<- unpaired: {u.reason}"))
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



def _check_leaf_names(leaf_modules: Iterable[LeafSpec] | None, *models: Any) -> None:
    """Refuse a ``leaf_modules`` name that is no module path of either model (a typo would
    otherwise keep nothing whole, and say nothing)."""
    names = [spec for spec in leaf_modules or () if isinstance(spec, str)]
    trees = [model for model in models if isinstance(model, nn.Module)]
    if not names or len(trees) < len(models):
        return
    paths = {path for model in trees for path, _ in model.named_modules()}
    unknown = [name for name in names if name not in paths]
    if unknown:
        near = sorted(p for p in paths if p and p.rsplit(".", 1)[-1] in
                      {u.rsplit(".", 1)[-1] for u in unknown})[:5]
        similar = f"; similar: {', '.join(near)}" if near else ""
        raise InputError(
            f"leaf_modules names {', '.join(map(repr, unknown))}, which is no module of the "
            "float or the quantized model. Fix: give module paths as named_modules() spells "
            f"them (from the model's root, dot-separated){similar}")


def _as_graph_module(model: nn.Module, leaf_modules: Iterable[LeafSpec] | None,
                     which: str, example_inputs: Any = None) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule) and (not leaf_modules or _calls_no_layer(model)):
        # Read as it is: its node names are the keys of FX-mode results, and nothing
        # downstream writes to it (instrumentation copies the graph). A graph of functions
        # (torch.export, pt2e) has no module to keep whole; re-tracing it would only lose its
        # node metadata (nn_module_stack).
        return model
    gm = trace(model, leaf_modules=leaf_modules, which=which,
               concrete_args=_fixed_by(model, example_inputs))
    extra = kwargs_only(model, as_call(example_inputs)[1]) if example_inputs is not None else ()
    if extra and _calls_root_whole(gm):  # a root kept whole takes what its **kwargs is given
        return single_call_graph(model, extra)
    return gm


def _check_traced(root: Any, gm: fx.GraphModule, example_inputs: Any,
                  which: str) -> tuple[str, ...]:
    """``(which,)`` once ``gm``, traced from ``root`` by torch.fx, is checked to compute what
    ``root`` computes on ``example_inputs`` (:func:`fxnumeric.capture.check.check_whole`);
    ``()`` for a graph with nothing to check (none given; ``root`` read as it is, exported,
    or called whole; ``root`` fails on them).

    Raises:
        TraceError: the graph computes differently, or fails where the model ran (the
            caller captures both models through the module tree instead).
    """
    if (example_inputs is None or gm is root or not isinstance(root, nn.Module)
            or is_export_graph(gm) or _calls_root_whole(gm)):
        return ()
    why = check_whole(root, gm, example_inputs, which=which, fix=(
        "fxnumeric captures both models through the module tree instead, where each "
        "module's graph is checked the same way"))
    if why is False:
        return ()  # the model fails on them: validate_inputs' run of the graph says so
    if why is not None:
        raise TraceError(why)
    return (which,)


def _calls_root_whole(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is :func:`fxnumeric.capture.single_call_graph`'s: the model as one op."""
    ops = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    return len(ops) == 1 and ops[0].op == "call_module" and ops[0].target == "root"


def _fixed_by(model: nn.Module, example_inputs: Any) -> dict[str, Any] | None:
    """The arguments of ``model``'s forward that ``example_inputs`` leaves out or gives as
    None, fixed to those values when tracing (:func:`fxnumeric.capture.fixed_arguments`):
    the graph is the model on the call the batches make. None without example inputs (every
    argument a graph input, as torch.fx traces it)."""
    if example_inputs is None:
        return None
    return fixed_arguments(model, *as_call(example_inputs))


def _calls_no_layer(gm: fx.GraphModule) -> bool:
    """Whether every module ``gm`` calls is plumbing (observers, torch.export's guards)."""
    modules = dict(gm.named_modules())
    return all(classify(n, modules).role == "plumbing"  # type: ignore[union-attr]
               for n in gm.graph.nodes if n.op == "call_module")


@keeps_buffers
@defers_collection
def match(
    float_model: nn.Module,
    quant_model: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
    capture: str = "auto",
    node_match: NodeMatch = same_op,
    validate_inputs: bool = True,
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
            ``"fx"`` traces with torch.fx, and through the module tree where it cannot
            trace a model whole. ``"export"`` captures each ``nn.Module`` side with
            ``torch.export`` on ``example_inputs`` (required): ATen graphs, so the code of
            every module (attention's ``matmul``/``softmax`` too) is compared, with pairs
            named by module path from ``nn_module_stack``; a side torch.export cannot capture
            is traced by torch.fx instead, and ``Matching.capture_notes`` says why. A side
            holding what torch.export would turn into arithmetic no float op pairs with
            (torchao tensors or QAT layers, torch.ao fake-quants and observers: an eager
            ``prepare_qat`` model) is not exported: both models are traced with torch.fx,
            and a capture note says so.
            ``"auto"`` (default) is ``"fx"``, except that a float model torch.fx cannot
            trace whole is exported when the quantized model is a ``torch.export`` graph
            (pt2e) and ``example_inputs`` are given: the module tree cannot walk a pt2e
            model (its modules are gone), so ``"fx"`` pairs nothing there. So is a float
            model whose torch.fx graph reads a non-tensor argument the pt2e model computes
            without (torch.export made a constant of it:
            :func:`fxnumeric.pairing.constant_inputs`).
        node_match: which float ops may pair with a quantized op, called as
            ``node_match(float_attrs, quant_attrs)`` on the attribute dicts of
            :func:`fxnumeric.pairing.node_attrs` (default :func:`fxnumeric.pairing.same_op`:
            same head kind, same channels/features). Pass your own to pair ops the default
            refuses (or to refuse more).
        validate_inputs: run both captured graphs once on ``example_inputs`` to check they
            accept them (a model captured through the module tree is run anyway, to record
            how its submodules are called). :func:`fxnumeric.compare`, which runs the models
            on that batch next, passes False.

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
    check_model(float_model, "float_model")
    check_model(quant_model, "quant_model")
    # torch.compile / DataParallel wrap the model compared: the Matching holds the inner one
    float_model, float_wrapped = unwrap(float_model, "float")
    quant_model, quant_wrapped = unwrap(quant_model, "quantized")
    _check_leaf_names(leaf_modules, float_model, quant_model)
    # a module whose own weights accelerate offloaded is called whole (its hook loads them):
    # keep its path whole on both sides, so that it pairs with its in-memory counterpart
    offloaded = whole_paths(float_model) + whole_paths(quant_model)
    if offloaded:
        leaf_modules = [*(leaf_modules or ()), *offloaded]
    # what a flow reads differently (an ExportedProgram is traced as its .module())
    float_root = flows.normalise_model(float_model, "float")
    quant_root = flows.normalise_model(quant_model, "quantized")
    wrapped = tuple((side, note) for side, note in (("float", float_wrapped),
                                                    ("quantized", quant_wrapped)) if note)
    notes: list[tuple[str, str]] = []
    lost = _export_loses(float_root, quant_root) if capture == "export" else None
    if lost is not None:
        notes.append(lost)
    elif capture == "export":
        float_root, float_note = export_side(float_root, example_inputs, "float")
        quant_root, quant_note = export_side(quant_root, example_inputs, "quantized")
        notes += [(side, note) for side, note in (("float", float_note),
                                                  ("quantized", quant_note)) if note]
    if example_inputs is not None and all(isinstance(m, nn.Module)
                                          for m in (float_model, quant_model)):
        check_devices(float_model, quant_model, example_inputs)  # before either runs on them
    try:
        float_gm = _float_graph(float_root, quant_root, example_inputs, leaf_modules, capture,
                                notes)
        quant_gm = _as_graph_module(quant_root, leaf_modules, "quantized", example_inputs)
        checked = (_check_traced(float_root, float_gm, example_inputs, "float")
                   + _check_traced(quant_root, quant_gm, example_inputs, "quantized"))
    except TraceError as exc:
        found = _fall_back_to_tree(float_model, quant_model, example_inputs, leaf_modules,
                                   exc, notes, node_match)
        return _with_whole_layers(replace(found, capture_notes=wrapped + found.capture_notes))
    if is_export_graph(float_gm) and not is_export_graph(float_root):
        float_root = float_gm  # exported by capture="auto": its nodes name no module of it
    float_view = GraphView(float_gm, root=float_root)
    quant_view = GraphView(quant_gm, root=quant_root)
    constant = constant_inputs(float_view, quant_view)
    if constant and not is_export_graph(float_gm):
        exported = _export_as_quantized(float_root, quant_root, example_inputs, capture,
                                        constant, notes)
        if exported is not None:
            float_gm = float_root = exported
            float_view = GraphView(float_gm, root=float_root)
    check_pair(float_view, quant_view)  # swapped, unconverted or unquantized: fxnumeric.guards
    if example_inputs is not None and validate_inputs:
        for gm, which in ((float_gm, "float"), (quant_gm, "quantized")):
            if which not in checked:  # a graph checked ran on them already
                with buffers_put_back(gm):  # the model's own: compare's first batch reads them
                    run_model(gm, example_inputs, which=which)
    region = pair_region(float_view, quant_view, node_match=node_match)
    return _with_whole_layers(Matching((region,), region.pairs, region.unmatched_float,
                                       region.unmatched_quant, float_model, quant_model,
                                       capture_notes=wrapped + tuple(notes)))


def _export_loses(float_root: Any, quant_root: Any) -> tuple[str, str] | None:
    """``(side, why)`` when ``capture="export"`` must trace both models with torch.fx: a
    side whose exported graph would hold a flow's modules as arithmetic no op of the other
    side pairs with (torchao's tensors and QAT layers, torch.ao's fake-quants and
    observers: :func:`fxnumeric.flows.export_loses`), the quantized side's first."""
    for side, root in (("quantized", quant_root), ("float", float_root)):
        why = flows.export_loses(root)
        if why is not None:
            return side, why
    return None


def _with_whole_layers(matching: Matching) -> Matching:
    """``matching`` with the layers inside a module that accelerate's hooks make fxnumeric
    call whole (:func:`fxnumeric.offload.whole_layers`) listed as unpaired, with the reason:
    that module is compared as one op, which compares their weights but not their outputs
    (nor those of their twins in the other model, at the same paths)."""
    found = {side: whole_layers(model) for side, model in
             (("float", matching.float_model), ("quant", matching.quant_model))}
    if not found["float"] and not found["quant"]:
        return matching
    fixes = {path: fix for model in (matching.float_model, matching.quant_model)
             for path, (_, fix) in whole_modules(model).items()}

    def at(layers: list[tuple[str, str, str]], model: nn.Module) -> list[tuple[str, str, str]]:
        names = dict(model.named_modules())
        return [layer for layer in layers if layer[0] in names]

    def missing(layers: list[tuple[str, str, str]], quantized: bool) -> tuple[Unmatched, ...]:
        def named(parent: str) -> str:
            return f"`{parent}`" if parent else "the model's root module"

        return tuple(Unmatched(path, "module", (
            f"inside {named(parent)}, called whole because {why}: {named(parent)} is compared "
            f"as one op (its row compares the weights of its quantized layers), its layers' "
            f"outputs are not compared one by one. {fixes[parent]} to compare them one by one"),
            quantized, None) for path, parent, why in layers)

    float_layers = found["float"] or at(found["quant"], matching.float_model)
    quant_layers = found["quant"] or at(found["float"], matching.quant_model)
    return replace(matching,
                   unmatched_float=matching.unmatched_float + missing(float_layers, False),
                   unmatched_quant=matching.unmatched_quant + missing(quant_layers, True))


def _float_graph(float_root: Any, quant_root: Any, example_inputs: Any,
                 leaf_modules: Iterable[LeafSpec] | None, capture: str,
                 notes: list[tuple[str, str]]) -> fx.GraphModule:
    """The float graph: torch.fx's, or (``capture="auto"``, where torch.fx cannot trace it
    whole) torch.export's, noted in ``notes``.

    Raises:
        TraceError: torch.fx's, when neither captures the float model.
    """
    try:
        return _as_graph_module(float_root, leaf_modules, "float", example_inputs)
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


def _export_as_quantized(float_root: Any, quant_root: Any, example_inputs: Any, capture: str,
                         constant: list[str], notes: list[tuple[str, str]]
                         ) -> fx.GraphModule | None:
    """``capture="auto"`` against a pt2e model that made constants of the non-tensor inputs
    ``constant`` (:func:`fxnumeric.pairing.constant_inputs`): the float model exported on
    ``example_inputs`` as the quantized one was, noted in ``notes``; ``None`` where it is not
    exported (the pairing then says why it cannot pair)."""
    if not auto_exports_float(capture, example_inputs, quant_root):
        return None
    exported = export_module(float_root, example_inputs, "float")
    if not isinstance(exported, fx.GraphModule):
        notes.append(("float", exported.reason))
        return None
    listed = ", ".join(f"`{name}`" for name in constant)
    notes.append(("float", "captured with torch.export (capture='auto'): the quantized model, a "
                  f"torch.export graph, computes with the value of {listed} it was exported "
                  "with (torch.export makes a constant of a non-tensor input), and so does the "
                  "float model exported on the first batch"))
    return exported


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _fall_back_to_tree(float_model: nn.Module, quant_model: nn.Module, example_inputs: Any,
                       leaf_modules: Iterable[LeafSpec] | None, exc: TraceError,
                       notes: list[tuple[str, str]], node_match: NodeMatch) -> Matching:
    """torch.fx cannot trace a model whole: capture both through the module tree."""
    if not isinstance(float_model, nn.Module) or not isinstance(quant_model, nn.Module):
        raise exc
    export_tried = any(side == "float" for side, _ in notes)
    if not export_tried and is_export_graph(quant_model):
        # the tree would pair nothing: the quantized graph's modules are gone
        raise InputError(
            f"nothing paired: torch.fx could not trace the float model "
            f"({type(float_model).__name__}) whole "
            f"({_first_line(exc)}), and the quantized model is a torch.export graph (pt2e), "
            "which the module tree cannot walk (its modules are gone).\nFix: pass "
            "example_inputs (a batch) with capture='export' or 'auto' (the default), so that "
            "the float model is captured with torch.export too; compare, advise and diagnose "
            "pass their first batch themselves") from exc
    _log.info("capturing through the module tree: %s", _first_line(exc))
    found = _match_tree(float_model, quant_model, example_inputs, leaf_modules, node_match)
    if notes:
        # the module tree pairs modules of both models, so an exported side is not used either
        notes.append(("both", "captured through the module tree: torch.fx could not trace a "
                      f"model whole ({_first_line(exc)}), and the tree pairs modules of both "
                      "models"))
    return replace(found, capture_notes=(*notes, *found.capture_notes)) if notes else found




def _match_tree(float_model: nn.Module, quant_model: nn.Module, example_inputs: Any,
                leaf_modules: Iterable[LeafSpec] | None, node_match: NodeMatch) -> Matching:
    """Pair models torch.fx cannot trace whole: every captured part becomes a region.

    The submodules that trace become regions of their graphs; each leaf module reached below
    an untraceable module becomes a region of its own, a one-op graph calling it
    (:func:`fxnumeric.capture.leaf_graph`), paired by the same pass as any graph.
    """
    # the guards judge each whole model as one op, by the modules it holds, before it runs;
    # whether it quantizes is said once its parts are captured, counting their ops
    whole_quant = GraphView(single_call_graph(quant_model), root=quant_model)
    check_pair(GraphView(single_call_graph(float_model), root=float_model), whole_quant,
               warn=False)
    float_calls = quant_calls = None
    if example_inputs is not None:
        float_calls = record_calls(float_model, example_inputs, which="float")
        quant_calls = record_calls(quant_model, example_inputs, which="quantized")
    tree = capture_tree(float_model, quant_model, leaf_modules=list(leaf_modules or ()),
                        float_calls=float_calls, quant_calls=quant_calls,
                        example_inputs=example_inputs)
    regions: list[Region] = []
    misses_f: list[Unmatched] = []
    misses_q: list[Unmatched] = []

    def calls(float_path: str, quant_path: str) -> int:
        """The call sites of a module pair: how many times both ran per forward."""
        return min((c.counts.get(p, 1) for c, p in ((float_calls, float_path),
                                                     (quant_calls, quant_path))
                    if c is not None), default=1)

    for part in tree.regions:
        regions.append(pair_region(
            GraphView(part.float_graph, root=float_model.get_submodule(part.float_path)),
            GraphView(part.quant_graph, root=quant_model.get_submodule(part.quant_path)),
            float_path=part.float_path, quant_path=part.quant_path, node_match=node_match,
            call_sites=calls(part.float_path, part.quant_path),
        ))
    for float_path, quant_path in tree.leaves:
        methods = tuple(c.methods.get(p, "") if c is not None else None
                        for c, p in ((float_calls, float_path), (quant_calls, quant_path)))
        leaf = _leaf_region(float_model, quant_model, float_path, quant_path, node_match,
                            calls(float_path, quant_path), methods,
                            _passed_through(float_calls, quant_calls, float_path, quant_path))
        if isinstance(leaf, Region):
            regions.append(leaf)
        elif leaf is not None:
            misses_f.append(leaf[0])
            misses_q.append(leaf[1])
    for path, side, reason in tree.orphans:
        module = (float_model if side == "float" else quant_model).get_submodule(path)
        cls = classify_module(module)
        if side == "float":
            misses_f.append(Unmatched(path, cls.kind, reason, False, None))
        else:
            misses_q.append(Unmatched(path, cls.kind, reason, cls.quantized, None))
    # the order modules run (recorded on the example inputs), else their registration order
    modules = [name for name, _ in quant_model.named_modules(remove_duplicate=False)]
    order = list(quant_calls or ()) + [m for m in modules if m not in (quant_calls or {})]
    rank = {name: i for i, name in enumerate(order)}
    regions.sort(key=lambda r: rank.get(r.quant_path, 0))
    if nothing_quantized(whole_quant):
        warn_unquantized([r.quant_view for r in regions])
    found = Matching(
        tuple(regions), (),
        tuple(u for r in regions for u in r.unmatched_float) + tuple(misses_f),
        tuple(u for r in regions for u in r.unmatched_quant) + tuple(misses_q),
        float_model, quant_model, untraced=tree.untraced,
        capture_notes=_differed_notes(tree.differed),
        containers=container_pairs(regions),
    )
    return _recorded(found, quant_calls)


def _passed_through(float_calls: CallSpecs | None, quant_calls: CallSpecs | None,
                    float_path: str, quant_path: str) -> tuple[str, ...]:
    """The keyword arguments the ``**kwargs`` of the modules at ``float_path`` and
    ``quant_path`` took in the recorded runs (either side's: a shadow calls the float module
    as the quantized one was called), in call order."""
    names = [name for calls, path in ((quant_calls, quant_path), (float_calls, float_path))
             if calls is not None for name in calls.extra_kwargs.get(path, ())]
    return tuple(dict.fromkeys(names))


def _differed_notes(differed: Iterable[tuple[str, str, str]]) -> tuple[tuple[str, str], ...]:
    """One capture note per reason of :attr:`TreeCapture.differed`, naming its modules (every
    decoder layer's feed-forward fails alike)."""
    paths: dict[tuple[str, str], list[str]] = {}
    for path, side, reason in differed:
        paths.setdefault((side, reason), []).append(f"`{path or '<root>'}`")
    notes = []
    for (side, reason), names in paths.items():
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        notes.append((side, f"{', '.join(names[:4])}{more}: {reason}"))
    return tuple(notes)


def _recorded(found: Matching, quant_calls: Any) -> Matching:
    """``found`` with what the quantized model's run on the example inputs recorded
    (:func:`fxnumeric.capture.tree.record_calls`; None: nothing ran), and its pairs sorted
    where each call runs: a shared layer's calls interleave."""
    region_paths = {r.quant_path for r in found.regions}
    found = replace(
        found, extra_kwargs=dict(getattr(quant_calls, "extra_kwargs", {})),
        call_order=tuple(call for call in getattr(quant_calls, "sequence", ())
                         if call[0] in region_paths))
    ordered = sorted(((found.run_position(r, r.call_site(p)), p) for r in found.regions
                      for p in r.pairs), key=lambda item: item[0])
    return replace(found, pairs=tuple(p for _, p in ordered))


def with_recorded_run(matching: Matching, example_inputs: Any) -> Matching:
    """``matching`` as if :func:`match` had been given ``example_inputs``, for a matching made
    without them and given to :func:`fxnumeric.compare`, ``diagnose``, ``sensitivity`` or
    ``advise`` with their batches: one run of the quantized model records its calls, and

    * the one-op graphs of modules kept whole take the keyword arguments their ``**kwargs``
      takes (:func:`_taking_kwargs`: transformers' BERT encoder passes each layer
      ``position_ids``, which a graph made without them rejects);
    * the pairs are in the order the model runs them. A model captured through the module
      tree (torch.fx cannot trace it whole: Hugging Face models) lists its pairs in run order
      only when :func:`match` ran it; ``match(f, q)`` without example inputs lists them region
      by region in module registration order (a Llama layer's projections before the norm
      that feeds them), and the report's rows, and the layer it names where NaN/Inf first
      appears, would follow. Not for a matching whose regions the run calls more often than it
      counted (a layer shared by a ModuleList, matched without example inputs: its calls were
      not counted, so each is observed at every call, as the eager API logs them).

    Returned as it is, without running anything, when neither applies: a matching captured
    whole (graph order is run order, no module kept whole) and one that recorded its calls
    already.
    """
    if example_inputs is None or matching.call_order or matching.quant_model is None:
        return matching
    model = matching.quant_model
    takes_kwargs = any(takes_var_kwargs(model.get_submodule(r.quant_path))
                       for r in matching.regions
                       if r.whole_module and not r.method and r.quant_path)
    ordered = len(matching.regions) > 1
    if not takes_kwargs and not ordered:
        return matching
    quant_calls = record_calls(model, example_inputs, which="quantized")
    if takes_kwargs:
        matching = _taking_kwargs(matching, quant_calls.extra_kwargs)
    if ordered and not any(quant_calls.counts.get(r.quant_path, 1) > r.call_sites
                           for r in matching.regions):
        matching = _recorded(matching, quant_calls)
    return matching


def _taking_kwargs(matching: Matching, extra_kwargs: dict[str, tuple[str, ...]]) -> Matching:
    """``matching`` whose one-op graphs of modules kept whole take the keyword arguments
    their ``**kwargs`` took in a recorded run (``extra_kwargs``, by quantized path), as
    :func:`match` builds them when given example inputs: a matching made without them has
    graphs that reject the ``position_ids`` transformers' BERT encoder passes each layer.

    The graphs gain placeholders only; pairs and node names stay as they were.
    """
    regions = []
    for region in matching.regions:
        taken = {n.target for n in region.quant_view.nodes if n.op == "placeholder"}
        extra = extra_kwargs.get(region.quant_path, ())
        if not region.whole_module or region.method or not region.quant_path or (
                set(extra) <= taken):
            regions.append(region)
            continue
        views = []
        for model, path, view in ((matching.float_model, region.float_path, region.float_view),
                                  (matching.quant_model, region.quant_path, region.quant_view)):
            assert model is not None  # a module kept whole was captured from the modules
            views.append(GraphView(leaf_graph(model, path, extra)[0], root=view.root))
        added = {name: name for name in extra if name not in taken}  # same names both sides
        regions.append(replace(region, float_view=views[0], quant_view=views[1],
                               quant_to_float={**region.quant_to_float, **added}))
    if regions == list(matching.regions):
        return matching
    return replace(matching, regions=tuple(regions))


def container_pairs(regions: Iterable[Region]) -> frozenset[str]:
    """Names of the pairs whose op calls a module kept whole in its region's graph while its
    own submodules are compared in other regions (:attr:`Matching.containers`). Its shadow was
    the whole float stack fed the quantized input: a LlamaModel inside a wrapper read the
    accumulated error, 32 dB against 44 dB for every real layer, and was named the culprit."""
    regions = list(regions)
    compared = {r.float_path for r in regions} | {
        _prefixed(r.float_scope, str(n.target)) for r in regions for p in r.pairs
        for n in r.chain(p, "float") if n.op == "call_module"}
    found = set()
    for region in regions:
        for pair in region.pairs:
            chain = region.chain(pair, "float")
            if region.whole_module or len(chain) != 1 or chain[0].op != "call_module":
                continue
            path = _prefixed(region.float_scope, str(chain[0].target))
            if any(c.startswith(path + ".") for c in compared):
                found.add(pair.name)
    return frozenset(found)


def _leaf_region(float_model: nn.Module, quant_model: nn.Module, float_path: str,
                 quant_path: str, node_match: NodeMatch, call_sites: int = 1,
                 methods: tuple[str | None, str | None] = (None, None),
                 extra_kwargs: tuple[str, ...] = (),
                 ) -> Region | tuple[Unmatched, Unmatched] | None:
    """Two leaf modules at the same place of the module tree, as a region of one-op graphs;
    the misses if they compute different ops; ``None`` for plumbing (dropout, identity).
    ``methods``: what each functional module was called through in the recorded run
    (:attr:`fxnumeric.capture.tree.CallSpecs.methods`; None: nothing was run);
    ``extra_kwargs``: the keyword arguments their ``**kwargs`` took there, which the one-op
    graphs must take too (transformers' BERT encoder passes ``position_ids`` to each layer so)."""
    f_module = float_model.get_submodule(float_path)
    q_module = quant_model.get_submodule(quant_path)
    if is_functional(f_module) and is_functional(q_module):
        return _functional_region(float_model, quant_model, float_path, quant_path,
                                  node_match, call_sites, methods)
    f_cls, q_cls = classify_module(f_module), classify_module(q_module)
    if f_cls.role == "plumbing" or q_cls.role == "plumbing":
        return None  # transparent, as in the graph matcher
    if f_cls.signature != q_cls.signature:
        reason = (f"float `{float_path}` ({f_cls.kind}) and quantized `{quant_path}` "
                  f"({q_cls.kind}) sit at the same place in the module tree but compute "
                  "different ops")
        return (Unmatched(float_path, f_cls.kind, reason, False, None),
                Unmatched(quant_path, q_cls.kind, reason, q_cls.quantized, None))
    float_graph, float_scope = leaf_graph(float_model, float_path, extra_kwargs)
    quant_graph, quant_scope = leaf_graph(quant_model, quant_path, extra_kwargs)
    return pair_region(
        GraphView(float_graph, root=_parent(float_model, float_path)),
        GraphView(quant_graph, root=_parent(quant_model, quant_path)),
        float_path=float_path, quant_path=quant_path, float_scope=float_scope,
        quant_scope=quant_scope, whole_module=True, node_match=node_match,
        call_sites=call_sites,
    )


def _functional_region(float_model: nn.Module, quant_model: nn.Module, float_path: str,
                       quant_path: str, node_match: NodeMatch, call_sites: int,
                       methods: tuple[str | None, str | None],
                       ) -> Region | tuple[Unmatched, Unmatched] | None:
    """A ``FloatFunctional`` and its ``QFunctional`` called from code torch.fx cannot trace,
    as a region of the graphs of the method they were called through; the misses with the
    reason if that is not known or not one of :data:`fxnumeric.capture.FUNCTIONAL_METHODS`;
    ``None`` if the run never called them (nothing to compare, as in a traced graph)."""
    float_method, quant_method = methods
    parent = quant_path.rpartition(".")[0] or "<root>"
    kind = type(float_model.get_submodule(float_path)).__name__
    if float_method == "" and quant_method == "":
        return None
    if float_method is None or quant_method is None:
        reason = (f"a {kind} called through its methods from `{parent}`, whose forward "
                  "torch.fx cannot trace: which method is known from a run only. Pass "
                  "example_inputs to match() (compare, advise, diagnose, compare_model_outputs "
                  "and compare_model_stub pass their batch; prepare_model_outputs has none), "
                  f"or keep `{parent}` whole with leaf_modules=[\"{parent}\"]")
    elif float_method != quant_method or float_method not in FUNCTIONAL_METHODS:
        reason = (f"a {kind} called through {float_method or 'nothing'} (float) and "
                  f"{quant_method or 'nothing'} (quantized) from `{parent}`, whose forward "
                  "torch.fx cannot trace: only one of "
                  f"{', '.join(FUNCTIONAL_METHODS)} on two tensors is compared there. Use a "
                  f"FloatFunctional per op, or keep `{parent}` whole with "
                  f"leaf_modules=[\"{parent}\"]")
    else:
        float_graph, float_scope = method_graph(float_model, float_path, float_method)
        quant_graph, quant_scope = method_graph(quant_model, quant_path, quant_method)
        region = pair_region(
            GraphView(float_graph, root=_parent(float_model, float_path)),
            GraphView(quant_graph, root=_parent(quant_model, quant_path)),
            float_path=float_path, quant_path=quant_path, float_scope=float_scope,
            quant_scope=quant_scope, whole_module=True, node_match=node_match,
            call_sites=call_sites)
        return replace(region, method=float_method)
    q_cls = classify_module(quant_model.get_submodule(quant_path))
    return (Unmatched(float_path, "float_functional", reason, False, None),
            Unmatched(quant_path, q_cls.kind, reason, q_cls.quantized, None))


def _parent(model: nn.Module, path: str) -> nn.Module:
    parent = path.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model
