"""Blocks: the repeated containers of a model (decoder layers, BERT layers, ResNet stages).

A model is read block by block: the layers of ``model.layers.3`` together, and the error
entering and leaving that block. A *block* is a child of a container whose siblings include
another module of the same kind (``model.layers.0`` .. ``model.layers.29``: 30
``LlamaDecoderLayer``; ``layer1`` .. ``layer4`` of a ResNet: its stages, Sequentials of
``BasicBlock``; a torch container's kind includes the classes it holds); the outermost such
level is taken. A block holds layers: torch's containers or the model's own classes with
submodules, never one of torch's layers.

Each block is found as a *span* of the matching's graphs, the way every stage reads a model:

* where the block's code was traced into a region's graphs (a model torch.fx traces whole),
  the span is the block's ops in that region (those named under its path), with one output;
* where the block is a module kept whole (a Hugging Face decoder layer), the span is a
  one-op region that calls it, as for any leaf module kept whole.

A block traced into a region its untraceable parent runs several times per forward (an
encoder called on two inputs) is a block per call, as its layers are pairs per call:
``encoder.layers.0``, ``encoder.layers.0#2``.

``compare`` observes each span's output on both sides and runs a *block shadow*: the float
block fed the quantized block's input, so a block row says how much error enters the block,
how much the block adds by itself, and how much leaves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch.fx as fx
from torch import nn

from . import flows
from .capture import leaf_graph
from .match import Matching, Pair, Region, pair_region
from .pairing import call_site_name
from .view import GraphView

__all__ = ["Block", "block_paths", "find_blocks", "block_of"]


@dataclass(frozen=True, eq=False)
class Block:
    """A block of the model as a span of one region's graphs.

    Attributes:
        name: the block's module path (``model.layers.3``).
        kind: the block's class name (``LlamaDecoderLayer``).
        region: the region holding the span (a one-op region of its own for a module kept
            whole).
        float_nodes: the span's float ops, in graph order.
        quant_nodes: the span's quantized ops, in graph order.
        float_out: the float node whose value leaves the block.
        quant_out: the quantized node whose value leaves the block (after its own output
            quantize, as for a layer).
        layers: the names of the matching's pairs inside the block, in order.
        own_region: whether ``region`` was made for the block (not one of the matching's).
        site: which call of ``region`` per forward the block is observed at (0: the first;
            see :attr:`fxnumeric.match.Region.call_sites`).
    """

    name: str
    kind: str
    region: Region
    float_nodes: tuple[fx.Node, ...]
    quant_nodes: tuple[fx.Node, ...]
    float_out: fx.Node
    quant_out: fx.Node
    layers: tuple[str, ...] = ()
    own_region: bool = False
    site: int = 0


def block_paths(model: nn.Module) -> list[str]:
    """The module paths of ``model``'s blocks, outermost repeated level first found.

    A model given as a torch.export graph (its modules gone) is read from the module tree its
    ops' ``nn_module_stack`` records.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2),
    ...                           *(torch.nn.Sequential(torch.nn.Linear(2, 2)) for _ in range(2)))
    >>> block_paths(net)
    ['1', '2']
    """
    return list(_blocks(model))


def _blocks(model: nn.Module) -> dict[str, str]:
    """``{block path: its class name}`` (see :func:`block_paths`)."""
    found = _repeated(_module_tree(model))
    if not found and isinstance(model, fx.GraphModule):
        found = _repeated(_stack_tree(model.graph))
    return found


@dataclass(frozen=True)
class _Tree:
    """A module of a model's tree, as the block rule reads it: its class's qualified name
    (``""`` unknown: a ``ModuleList`` an exported graph never records, since it is not called),
    whether it is one of torch's containers, and its children."""

    cls: str
    container: bool
    children: tuple[tuple[str, _Tree], ...]

    @property
    def kind(self) -> object:
        """What makes two siblings repeats of one block: their class, and for torch's
        containers the classes they hold too (mobilenet_v2's ``features`` and ``classifier``
        are both Sequentials, but not two of a kind; ResNet's stages hold Bottlenecks, 3 to 6
        of them)."""
        if self.container:
            return self.cls, frozenset(c.cls for _, c in self.children)
        return self.cls

    @property
    def may_be_block(self) -> bool:
        """A container of layers: torch's own containers, or a class of the model's with
        submodules; never one of torch's layers (a dynamic Linear holds a packed-params
        child)."""
        return self.container or (not self.cls.startswith("torch.") and bool(self.children))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONTAINER_NAMES = frozenset(f"{c.__module__}.{c.__qualname__}" for c in _CONTAINERS)


def _class_name(cls: Any) -> str:
    return cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"


def _module_tree(module: nn.Module) -> _Tree:
    return _Tree(_class_name(type(module)), isinstance(module, _CONTAINERS),
                 tuple((name, _module_tree(child)) for name, child in module.named_children()))


def _stack_tree(graph: fx.Graph) -> _Tree:
    """The module tree the ops of an exported graph record in ``nn_module_stack``."""
    classes: dict[str, str] = {}
    for node in graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            path = str(path)
            classes.setdefault(path, _class_name(cls))
            while "." in path:  # parents never called (a ModuleList) are known by their paths
                path = path.rpartition(".")[0]
                classes.setdefault(path, "")

    def tree(path: str) -> _Tree:
        lead = f"{path}." if path else ""
        names = [p[len(lead):] for p in classes if p.startswith(lead) and p != path
                 and "." not in p[len(lead):]]
        cls = classes.get(path, "")
        return _Tree(cls, cls in _CONTAINER_NAMES or not cls,
                     tuple((name, tree(lead + name)) for name in names))

    return tree("")


def _repeated(root: _Tree) -> dict[str, str]:
    """``{path: class name}`` of the outermost children of one kind that repeat: numbered
    siblings (``layers.0``, ResNet's ``layer1``, GoogLeNet's ``inception3a``). Two of a kind
    that are named, not numbered, are parts, not repeats: a T5's ``encoder`` and ``decoder``
    are both ``T5Stack``s, and its blocks are the layers inside them."""
    found: dict[str, str] = {}

    def visit(node: _Tree, path: str) -> None:
        kinds: dict[object, int] = {}
        for name, child in node.children:
            if child.may_be_block and _numbered(name):
                kinds[child.kind] = kinds.get(child.kind, 0) + 1
        for name, child in node.children:
            child_path = f"{path}.{name}" if path else name
            if child.may_be_block and _numbered(name) and kinds[child.kind] >= 2:
                found[child_path] = child.cls.rpartition(".")[2]
            else:
                visit(child, child_path)

    visit(root, "")
    return found


def _numbered(name: str) -> bool:
    return any(c.isdigit() for c in name)


def block_of(name: str, blocks: Iterable[str]) -> str:
    """The block a layer named ``name`` sits in (``""`` for none): the longest block path
    that is a prefix of it."""
    best = ""
    for path in blocks:
        if (name == path or name.startswith(path + ".")) and len(path) > len(best):
            best = path
    return best


def find_blocks(matching: Matching) -> tuple[Block, ...]:
    """The spans of the blocks of the matched models, in the order they run.

    A block whose span cannot be found (its ops spread over several regions, or leaving it
    by more than one value) is left out; ``compare`` notes how many were.
    """
    # an ExportedProgram is read as the .module() its graph was captured from (its
    # nn_module_stack holds the same blocks as its nn.Module)
    model, float_model = matching.module("quant"), matching.module("float")
    if model is None or float_model is None:
        return ()
    # read off the float model: an FX-converted quantized GraphModule keeps the paths with
    # plain ``nn.Module`` containers (``layer1`` is no longer a Sequential), and a pt2e one
    # keeps none (its ops say where they ran); blocks of a quantized model's own making
    # (eager) are the float model's as well
    kinds = _blocks(float_model)
    paths = list(kinds)
    if not paths:
        return ()
    ran_in = {p.name: _pair_path(matching, p) for p in matching.pairs}
    layers = {path: tuple(name for name, where in ran_in.items()
                          if block_of(where, [path]) == path)
              for path in paths}
    out: list[Block] = []
    for path in paths:
        if not layers[path]:
            continue
        held = {id(matching.region_of(matching.pair(name))): matching.region_of(
            matching.pair(name)) for name in layers[path]}
        (only,) = held.values() if len(held) == 1 else (None,)
        # traced into one region's graphs, or a module kept whole (its layers in regions of
        # their own): a span of that region, or a one-op region calling the block
        span = (_graph_span(only, path) if only is not None and not only.whole_module
                else _module_span(matching, path))
        if span is not None:
            *where, own = span
            out += _per_call(matching, Block(path, kinds[path], *where, layers=layers[path],
                                             own_region=own))
    # in run order: the matching's pairs are (a CLIP runs its vision tower first, its text
    # tower is registered first)
    ran = {p.name: i for i, p in reversed(list(enumerate(matching.pairs)))}
    return tuple(sorted(out, key=lambda b: min(ran[name] for name in b.layers)))


def _per_call(matching: Matching, block: Block) -> list[Block]:
    """``block``, or one block per call of its region where that runs several times per
    forward, each holding that call's layers: an observer on the one span would pool them."""
    region = block.region
    if block.own_region or region.call_sites == 1:  # kept whole: its layers are elsewhere
        return [block]
    seen: dict[str, int] = {}
    return [replace(block, name=call_site_name(block.name, seen), site=site,
                    layers=tuple(name for name in block.layers
                                 if region.call_site(matching.pair(name)) == site))
            for site in range(region.call_sites)]


def _graph_span(region: Region, path: str) -> tuple | None:
    """The block's ops in the region whose graphs its code was traced into."""
    prefix = path + "."
    fv, qv = region.float_view, region.quant_view
    f_nodes = _named_under(fv, region.float_scope, prefix)
    if not f_nodes:
        return None
    f_out = _single_output(fv, f_nodes)
    q_nodes = _named_under(qv, region.quant_scope, prefix)
    q_out = None
    if f_out is not None:
        # a quantized graph that does not say where its functional ops ran (convert_fx's
        # quantized.add, add_relu) leaves them out of the named ops: the quantized ops
        # paired with the block's float ops are the block's too. Without them a block ending
        # in a residual add read its last Linear's output as the block's.
        paired, paired_out = _paired_span(region, f_nodes, f_out)
        q_nodes = sorted({*q_nodes, *paired}, key=qv.position)
        q_out = (_single_output(qv, q_nodes) if q_nodes else None) or paired_out
    if f_out is None or q_out is None:
        return None
    pair = region.pair_of(q_out)
    if pair is not None:  # the value the next op reads, as for a layer
        q_out = region.output_nodes(pair)[1]
    return region, tuple(f_nodes), tuple(q_nodes), f_out, q_out, False


def _paired_span(region: Region, f_nodes: list[fx.Node], f_out: fx.Node,
                 ) -> tuple[list[fx.Node], fx.Node | None]:
    """The quantized ops of the pairs lying wholly among ``f_nodes``, in graph order, and the
    one carrying ``f_out``'s value (``None`` if ``f_out`` is not a pair's output)."""
    inside = set(f_nodes)
    pairs = {id(p): p for f in f_nodes if (p := region.pair_of(f)) is not None}
    held = [p for p in pairs.values()
            if all(n in inside or n.op == "placeholder" for n in region.chain(p, "float"))]
    qv = region.quant_view
    q_nodes = sorted({n for p in held for n in region.chain(p, "quant")}, key=qv.position)
    out_pair = region.pair_of(f_out)
    if out_pair is None or out_pair not in held or region.output_nodes(out_pair)[0] is not f_out:
        return q_nodes, None
    return q_nodes, region.chain(out_pair, "quant")[-1]


def _where(view: GraphView, n: fx.Node) -> str:
    """Where the op at ``n`` ran: a module's own path, else the module a functional op ran in
    (:func:`fxnumeric.flows.scope`), else the op's name."""
    if n.op == "call_module":
        return str(n.target)
    return flows.scope(n) or view.name(n)


def _named_under(view: GraphView, scope: str, prefix: str) -> list[fx.Node]:
    """The ops that ran inside the module at ``prefix`` (:func:`_where`)."""
    lead = f"{scope}." if scope else ""
    return [n for n in view.ops() if (lead + _where(view, n) + ".").startswith(prefix)]


def _pair_path(matching: Matching, pair: Pair) -> str:
    """Where a pair's float op ran (its module path, prefixed with its region's scope), or its
    name: ``layer1.0`` for the residual add of ResNet's first block, whose pair is named after
    the quantized graph's ``add_relu``."""
    region = matching.region_of(pair)
    ops = [n for n in region.chain(pair, "float") if n.op != "placeholder"]
    if not ops:
        return pair.name
    where = _where(region.float_view, ops[0])
    return f"{region.float_scope}.{where}" if region.float_scope else where


def _single_output(view: GraphView, nodes: list[fx.Node]) -> fx.Node | None:
    """The one node of ``nodes`` whose value is read outside them (``None`` if several)."""
    inside = set(nodes)
    leaving = [n for n in nodes if any(c not in inside for c in view.consumers(n))]
    return leaving[0] if len(leaving) == 1 else None


def _quant_path(matching: Matching, path: str) -> str:
    """The quantized model's path of the float module at ``path``: its own, unless the
    regions below it pair with modules elsewhere (a module list of one layer fewer, paired by
    weights: float ``layers.2`` is quantized ``layers.1``)."""
    for region in matching.regions:
        float_path, quant_path = region.float_path, region.quant_path
        if float_path == path:
            return quant_path
        rest = float_path[len(path):]
        if float_path.startswith(path + ".") and quant_path.endswith(rest):
            return quant_path[: -len(rest)]
    return path


def _module_span(matching: Matching, path: str) -> tuple | None:
    """A block kept whole (its code was not traced): a one-op region that calls it."""
    float_model, quant_model = matching.module("float"), matching.module("quant")
    assert float_model is not None and quant_model is not None
    quant_path = _quant_path(matching, path)
    extra = matching.extra_kwargs.get(quant_path, ())  # what its **kwargs was called with
    float_graph, float_scope = leaf_graph(float_model, path, extra)
    quant_graph, quant_scope = leaf_graph(quant_model, quant_path, extra)
    parent, quant_parent = path.rpartition(".")[0], quant_path.rpartition(".")[0]
    region = pair_region(
        GraphView(float_graph, root=float_model.get_submodule(parent) if parent else float_model),
        GraphView(quant_graph, root=quant_model.get_submodule(quant_parent) if quant_parent
                  else quant_model),
        float_path=path, quant_path=quant_path, float_scope=float_scope,
        quant_scope=quant_scope, whole_module=True,
    )
    if len(region.pairs) != 1:
        return None
    pair = region.pairs[0]
    (f_node,), (q_node,) = region.chain(pair, "float"), region.chain(pair, "quant")
    return region, (f_node,), (q_node,), f_node, q_node, True
