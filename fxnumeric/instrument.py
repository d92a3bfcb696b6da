"""Stage 3, instrument: new GraphModules with observers on paired outputs and float shadows.

One building block, :func:`instrument`, attaches observers to a :class:`~fxnumeric.Matching`'s
pairs: on the outputs of both sides, and/or on a float *shadow* of each pair inlined into the
quantized graph. :func:`add_loggers`, :func:`add_shadows`, :func:`fxnumeric.compare` and the
eager-compatible API all call it::

    float graph:      x -> conv1 -> relu -> fc
                                ^ float observer
    quantized graph:  x -> q -> conv1_relu -> fc
                                 ^ quant observer(quant_out)
                                 ^ shadow: dequantize(q) -> conv1 -> relu (float copies)
                                           -> shadow observer(quant_out, float_out)

Observers hang off the graph as side branches: their results are never used, so instrumented
models give bit-identical outputs. The new GraphModules share the user's submodules (nothing is
copied or changed). A shadow calls the float model's own modules where calling them changes
nothing (torch's modules in eval mode) and deep copies of the others (observers, fake-quants,
modules in training mode, user classes), so running a shadow never touches the float model.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ._tensors import dequantize_all
from .capture import LeafSpec, graph_module
from .errors import InstrumentationError
from .loggers import OutputLogger, ShadowLogger
from .match import Matching, Pair, match
from .ops import is_pure
from .view import GraphView

__all__ = [
    "instrument", "Instrumented", "add_loggers", "add_shadows", "loggers_of", "PairFilter",
    "resolve_matching",
]

PairFilter = Callable[[Pair, Matching], bool]
"""Called as ``select(pair, matching)``; return True to instrument that pair."""

OutputObservers = Callable[[Pair], tuple[nn.Module, nn.Module]]
"""Called once per pair name as ``make(pair)``; returns ``(float_observer, quant_observer)``,
each then called as ``observer(output)``."""

ShadowObserver = Callable[[Pair], nn.Module]
"""Called once per pair name as ``make(pair)``; the observer is then called as
``observer(quantized_output, float_shadow_output)``."""

# Each instrumented GraphModule's loggers by pair name, for loggers_of (weak: the registry
# never keeps a model alive, and nothing is stored on the model itself).
_LOGGERS: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def loggers_of(gm: nn.Module) -> dict[str, nn.Module]:
    """The loggers of a GraphModule made by :func:`add_loggers` or :func:`add_shadows`.

    Returns ``{pair name: logger}`` (empty for any other module).
    """
    return _LOGGERS.get(gm, {})


@dataclass(frozen=True)
class Instrumented:
    """What :func:`instrument` built.

    Attributes:
        float_model: the float GraphModule with output observers, or None when no output
            observers were asked for (the float side is then not copied). For a model
            captured through the module tree, a copy of the model instead (see
            :mod:`fxnumeric.capture.hooks`).
        quant_model: the quantized GraphModule (or copy) with output observers and/or shadows.
        float_observers: ``{pair name: observer}`` on the float outputs.
        quant_observers: ``{pair name: observer}`` on the quantized outputs.
        shadow_observers: ``{pair name: observer}`` fed ``(quantized, float shadow)``.
        skipped: ``{pair name: reason}`` for pairs that could not be shadowed.
    """

    float_model: nn.Module | None
    quant_model: nn.Module
    float_observers: dict[str, nn.Module] = field(default_factory=dict)
    quant_observers: dict[str, nn.Module] = field(default_factory=dict)
    shadow_observers: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def instrument(
    matching: Matching,
    *,
    select: PairFilter | Iterable[str] | None = None,
    outputs: OutputObservers | None = None,
    shadows: ShadowObserver | None = None,
) -> Instrumented:
    """Attach observers to the selected pairs of ``matching``, into one copy of each graph.

    Args:
        matching: a :func:`fxnumeric.match` result.
        select: which pairs: pair names, or ``select(pair, matching) -> bool``; all if None.
        outputs: builds the observers of each pair's float and quantized outputs. The
            quantized output is the value the next op reads (after the pair's own output
            quantize, see :meth:`Matching.output_nodes`). A name shared by several pairs (a
            module called twice) shares one observer per side, called once per call.
        shadows: builds the observer of each pair's float shadow: a copy of the pair's float
            subgraph fed the dequantized inputs of the quantized op, inserted after it.

    Returns:
        An :class:`Instrumented`; the models given are not modified.

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> from fxnumeric import OutputLogger, ShadowLogger, match
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> m = match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear}))
        >>> built = instrument(m, outputs=lambda p: (OutputLogger(), OutputLogger()),
        ...                    shadows=lambda p: ShadowLogger())
        >>> sorted(built.quant_observers), sorted(built.shadow_observers), built.skipped
        (['0', '1'], ['0', '1'], {})
    """
    pairs = _select(matching, select)
    if not matching.whole_graph:  # captured through the module tree: regions and hooks
        from .capture.hooks import instrument_tree

        return instrument_tree(matching, pairs, outputs=outputs, shadows=shadows)
    quant_copy = _GraphCopy(matching.quant_view)
    float_copy = _GraphCopy(matching.float_view) if outputs is not None else None
    built_f: dict[str, nn.Module] = {}
    built_q: dict[str, nn.Module] = {}
    built_s: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for i, pair in enumerate(pairs):
        float_out, quant_out = matching.output_nodes(pair)
        if outputs is not None and float_copy is not None:
            if pair.name not in built_q:
                built_f[pair.name], built_q[pair.name] = outputs(pair)
            float_copy.observe(float_out.name, built_f[pair.name], f"fxnumeric_logger_{i}")
            quant_copy.observe(quant_out.name, built_q[pair.name], f"fxnumeric_logger_{i}")
        if shadows is not None:
            inputs = _shadow_inputs(matching, pair)
            if isinstance(inputs, str):
                skipped[pair.name] = inputs
                continue
            if pair.name not in built_s:
                built_s[pair.name] = shadows(pair)
            inputs = {f: quant_copy.before_overwrite(q, pair.quant_nodes)
                      for f, q in inputs.items()}
            quant_copy.shadow(quant_out.name, matching.float_view, _float_subgraph(matching, pair),
                              inputs, built_s[pair.name], f"fxnumeric_shadow_{i}")
    return Instrumented(
        float_copy.finish() if float_copy is not None else None, quant_copy.finish(),
        built_f, built_q, built_s, skipped,
    )


# ---------------------------------------------------------------- the public wrappers


def resolve_matching(float_model: nn.Module | None, quant_model: nn.Module | None,
                     matching: Matching | None,
                     leaf_modules: Iterable[LeafSpec] | None, *, capture: str = "fx",
                     example_inputs: Any = None) -> Matching:
    """``matching``, checked against the models passed beside it, or a new :func:`match`."""
    if matching is None:
        if float_model is None or quant_model is None:
            raise InstrumentationError("pass the float and quantized models, or a matching")
        return match(float_model, quant_model, example_inputs, leaf_modules=leaf_modules,
                     capture=capture)
    for side, given, used in (("float", float_model, matching.float_model),
                              ("quantized", quant_model, matching.quant_model)):
        if given is not None and given is not used:
            raise InstrumentationError(
                f"the {side} model passed is not the one `matching` was built from; pass the "
                "models that fxnumeric.match was called with, or only the matching "
                "(float_model=None, quant_model=None)"
            )
    return matching


def add_loggers(
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    logger_cls: type = OutputLogger,
    *,
    select: PairFilter | Iterable[str] | None = None,
    matching: Matching | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Return new float and quantized GraphModules that log the output of every paired op.

    The same pair name gets one logger per side; a module called twice logs twice into it, as
    in torch's eager suite.

    Args:
        float_model: the float model (not modified); None when ``matching`` is given.
        quant_model: the quantized model (not modified); None when ``matching`` is given.
        logger_cls: logger class, called as ``logger(output)``.
        select: which pairs to log: pair names, or ``select(pair, matching) -> bool``.
        matching: a :func:`match` result to reuse instead of matching again; models passed
            beside it must be the ones it was built from.
        leaf_modules: passed to :func:`match`.

    Returns:
        ``(float_gm, quant_gm)``; their loggers are in :func:`loggers_of`.
    """
    matching = resolve_matching(float_model, quant_model, matching, leaf_modules)
    built = instrument(matching, select=select,
                       outputs=lambda p: (_make_logger(logger_cls), _make_logger(logger_cls)))
    assert built.float_model is not None  # outputs were asked for
    _LOGGERS[built.float_model] = built.float_observers
    _LOGGERS[built.quant_model] = built.quant_observers
    return built.float_model, built.quant_model


def add_shadows(
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    logger_cls: type = ShadowLogger,
    *,
    select: PairFilter | Iterable[str] | None = None,
    matching: Matching | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Return a new quantized GraphModule in which every selected pair has a float shadow.

    The shadow is a copy of the pair's float subgraph, fed the dequantized inputs of the
    quantized op, so it measures the error that op adds on its own. The logger is called as
    ``logger(quantized_output, float_output)``. Pairs whose float subgraph reads a value that
    has no quantized counterpart cannot be shadowed; they are returned with the reason.

    Returns:
        ``(quant_gm, skipped)``: the instrumented model (loggers in :func:`loggers_of`) and
        ``{pair name: reason}`` for pairs that could not be shadowed.
    """
    matching = resolve_matching(float_model, quant_model, matching, leaf_modules)
    built = instrument(matching, select=select, shadows=lambda p: _make_logger(logger_cls))
    _LOGGERS[built.quant_model] = built.shadow_observers
    return built.quant_model, built.skipped


def _make_logger(logger_cls: type) -> nn.Module:
    try:
        logger = logger_cls()
    except TypeError as exc:
        name = getattr(logger_cls, "__name__", logger_cls)
        raise InstrumentationError(
            f"could not build a logger with {name}(): {exc}. "
            "Pass a Logger subclass whose __init__ takes no arguments."
        ) from exc
    if not isinstance(logger, nn.Module) or not isinstance(getattr(logger, "stats", None), dict):
        raise InstrumentationError(
            f"{type(logger).__name__} is not a logger: subclass fxnumeric.Logger (an nn.Module "
            "with a `stats` dict)."
        )
    return logger


def _select(matching: Matching, select: PairFilter | Iterable[str] | None) -> list[Pair]:
    if select is None:
        return list(matching.pairs)
    if callable(select):
        return [p for p in matching.pairs if _selected(select, p, matching)]
    names = set(select)
    unknown = names - {p.name for p in matching.pairs}
    if unknown:
        raise InstrumentationError(
            f"no pair is named {sorted(unknown)[:5]}; see Matching.table() for pair names"
        )
    return [p for p in matching.pairs if p.name in names]


def _selected(select: PairFilter, pair: Pair, matching: Matching) -> bool:
    """Ask ``select`` about a pair found in a region as that region's own matching has it."""
    if pair in matching.origin:
        region, local = matching.origin[pair]
        return select(local, region.matching)
    return select(pair, matching)


# ---------------------------------------------------------------- what a shadow copies and reads


def _float_subgraph(matching: Matching, pair: Pair) -> list[fx.Node]:
    """The pair's float nodes with the plumbing between them, in graph order."""
    view = matching.float_view
    return view.with_plumbing([view.node(n) for n in pair.float_nodes])


def _shadow_inputs(matching: Matching, pair: Pair) -> dict[fx.Node, str] | str:
    """``{float node read by the shadow: quantized node carrying its value}``, or why not.

    The quantized chain's own inputs are preferred (they are what the quantized op read);
    otherwise the earliest quantized node carrying the float value.
    """
    fv, qv = matching.float_view, matching.quant_view
    chain = [qv.node(n) for n in pair.quant_nodes]
    read: dict[fx.Node, fx.Node] = {}
    for n in chain:
        for i in n.all_input_nodes:
            q = qv.producer(i)
            f = matching.float_counterpart(q) if q is not None and q not in chain else None
            if f is not None:
                # the value the op reads (`i`), not its producer: in a pt2e graph that is a
                # quantize whose raw int8 output only its dequantize can read
                read.setdefault(f, i)
    last = qv.position(chain[-1])
    nodes = _float_subgraph(matching, pair)
    inside = set(nodes)
    inputs: dict[fx.Node, str] = {}
    for n in nodes:
        for e in n.all_input_nodes:
            if e in inside or e.op == "get_attr" or e in inputs:
                continue
            f = fv.producer(e)
            q = (read.get(f) or matching.quant_counterpart(f)) if f is not None else None
            if q is None or qv.position(q) > last:
                carrier = f.name if f is not None else e.name
                return f"float input `{carrier}` of the shadow has no quantized counterpart"
            inputs[e] = q.name
    return inputs


# ---------------------------------------------------------------- editing a graph copy


class _GraphCopy:
    """A copy of a traced graph being instrumented; :meth:`finish` recompiles it once."""

    def __init__(self, view: GraphView) -> None:
        source = view.gm
        self.gm = graph_module(source, copy.deepcopy(source.graph), type(source).__name__)
        self.nodes = {n.name: n for n in self.gm.graph.nodes}
        self.modules = view.modules  # the copy shares the source's submodules

    def finish(self) -> fx.GraphModule:
        self.gm.recompile()
        return self.gm

    def observe(self, node_name: str, observer: nn.Module, target: str) -> None:
        """Call ``observer(value of node)`` right after the node."""
        self.gm.add_submodule(target, observer)
        node = self.nodes[node_name]
        graph = self.gm.graph
        with graph.inserting_after(node):
            logged = node
            if _mutated_in_place(node, self.modules):
                logged = graph.call_method("clone", (node,))
            with graph.inserting_after(logged):
                graph.call_module(target, (logged,))

    def before_overwrite(self, node_name: str, chain: tuple[str, ...]) -> str:
        """``node_name``, or a copy of its value taken before an op of ``chain`` overwrites it
        in place (``aten.add_`` writes into its first input, which a shadow must read as it was).
        """
        node = self.nodes[node_name]
        ops = [self.nodes[n] for n in chain]
        if not any(_overwrites(u, node, self.modules) for u in node.users if u in ops):
            return node_name
        with self.gm.graph.inserting_before(ops[0]):
            copied = self.gm.graph.call_method("clone", (node,))
        self.nodes[copied.name] = copied
        return copied.name

    def shadow(self, anchor_name: str, float_view: GraphView, nodes: list[fx.Node],
               inputs: dict[fx.Node, str], observer: nn.Module, prefix: str) -> None:
        """Copy float ``nodes`` after ``anchor``, fed dequantized ``inputs``; observe both."""
        graph = self.gm.graph
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

        for float_node, quant_name in inputs.items():
            quant_node = self.nodes[quant_name]
            env[float_node] = emit(lambda q=quant_node: graph.call_function(dequantize_all, (q,)))
            if any(_overwrites(u, float_node, float_view.modules) for u in float_node.users
                   if u in nodes):
                # the copy writes into its input, which may be the quantized graph's own tensor
                env[float_node] = emit(lambda d=env[float_node]: graph.call_method("clone", (d,)))
        copied: dict[str, str] = {}
        for n in nodes:
            for attr_node in n.all_input_nodes:
                if attr_node.op == "get_attr" and attr_node not in env:
                    name = f"attr{len(copied)}"
                    value = _shadow_copy(_get_attr(float_view.gm, str(attr_node.target)))
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
                    holder.add_module(local, _shadow_copy(float_view.modules[n.target]))
                env[n] = emit(lambda n=n, local=local: graph.create_node(
                    "call_module", f"{prefix}.{local}",
                    fx.map_arg(n.args, env.__getitem__), fx.map_arg(n.kwargs, env.__getitem__)))
            else:
                env[n] = emit(lambda n=n: graph.node_copy(n, env.__getitem__))
        logged = anchor
        if _mutated_in_place(anchor, self.modules):
            logged = emit(lambda: graph.call_method("clone", (anchor,)))
        holder.add_module("logger", observer)
        emit(lambda: graph.call_module(f"{prefix}.logger", (logged, env[nodes[-1]])))


def _shadow_copy(value: Any) -> Any:
    """What a shadow calls in place of a float module or constant: the object itself where
    calling it changes nothing (no copy of the weights), else a deep copy, so running a shadow
    never touches the float model (an observer in a QAT float model keeps its statistics)."""
    if isinstance(value, torch.Tensor) or (isinstance(value, nn.Module) and is_pure(value)):
        return value
    return copy.deepcopy(value)


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


_INPLACE_FUNCTIONS = frozenset({"iadd", "imul", "isub", "itruediv"})


def _mutated_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a later op overwrites ``node``'s output in place (then the logger gets a copy)."""
    return any(_overwrites(user, node, modules) for user in node.users)


def _overwrites(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user`` writes its result into ``node``'s output (``relu_``, ``inplace=True``)."""
    if user.op == "call_module":
        return bool(getattr(modules.get(user.target), "inplace", False))
    first = bool(user.args) and user.args[0] is node
    if user.op == "call_method":
        return first and str(user.target).endswith("_")
    if user.op != "call_function" or not first:
        return False
    if isinstance(user.target, torch._ops.OpOverload):  # aten.relu_, aten.add_ (torch.export)
        return user.target._schema.is_mutable
    name = getattr(user.target, "__name__", "")
    return (bool(user.kwargs.get("inplace")) or name in _INPLACE_FUNCTIONS
            or (name.endswith("_") and not name.startswith("_")))
