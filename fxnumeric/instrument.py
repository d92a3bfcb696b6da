"""Stage 3, instrument: new GraphModules with logger nodes or float shadow subgraphs.

Loggers and shadows hang off the graph as side branches: their results are never used, so
the instrumented model's outputs are bit-identical to the original's. The new GraphModules
share the user's submodules (nothing is copied or changed) except the float subgraphs run as
shadows, which are deep copies, so running a shadow never touches the float model.

Each instrumented GraphModule records its loggers by pair name in ``gm.fxnumeric_loggers``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx
from torch import nn

from .errors import InstrumentationError
from .loggers import OutputLogger, ShadowLogger, _dequantize
from .match import Matching, Pair, match
from .trace import LeafSpec

__all__ = ["add_loggers", "add_shadows", "loggers_of", "PairFilter"]

PairFilter = Callable[[Pair, Matching], bool]
"""Called as ``select(pair, matching)``; return True to instrument that pair."""

_LOGGERS_ATTR = "fxnumeric_loggers"


def loggers_of(gm: nn.Module) -> dict[str, nn.Module]:
    """The loggers of an instrumented GraphModule, by pair name (empty if none)."""
    return gm.__dict__.get(_LOGGERS_ATTR, {})


def _make_logger(logger_cls: type) -> nn.Module:
    try:
        logger = logger_cls()
    except TypeError as exc:
        raise InstrumentationError(
            f"could not build a logger with {getattr(logger_cls, '__name__', logger_cls)}(): {exc}. "
            "Pass a Logger subclass whose __init__ takes no arguments."
        ) from exc
    if not isinstance(logger, nn.Module) or not isinstance(getattr(logger, "stats", None), dict):
        raise InstrumentationError(
            f"{type(logger).__name__} is not a logger: subclass fxnumeric.Logger (an nn.Module "
            "with a `stats` dict)."
        )
    return logger


def _copy_graph_module(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    return new, {n.name: n for n in new.graph.nodes}


def _mutated_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a later op overwrites ``node``'s output in place (then the logger gets a copy)."""
    for user in node.users:
        if user.op == "call_module" and getattr(modules.get(user.target), "inplace", False):
            return True
        if user.op == "call_method" and str(user.target).endswith("_") and user.args and user.args[0] is node:
            return True
        if user.op == "call_function":
            name = getattr(user.target, "__name__", "")
            first = bool(user.args) and user.args[0] is node
            if user.kwargs.get("inplace") and first:
                return True
            if first and (name in ("iadd", "imul", "isub", "itruediv") or (name.endswith("_") and not name.startswith("_"))):
                return True
    return False


def _select(matching: Matching, select: PairFilter | Iterable[str] | None) -> list[Pair]:
    if select is None:
        return list(matching.pairs)
    if callable(select):
        return [p for p in matching.pairs if select(p, matching)]
    names = set(select)
    unknown = names - {p.name for p in matching.pairs}
    if unknown:
        raise InstrumentationError(
            f"no pair is named {sorted(unknown)[:5]}; see Matching.table() for pair names"
        )
    return [p for p in matching.pairs if p.name in names]


def _attach(gm: fx.GraphModule, nodes: dict[str, fx.Node], modules: dict[str, nn.Module],
            node_name: str, module: nn.Module, target: str) -> None:
    gm.add_submodule(target, module)
    node = nodes[node_name]
    with gm.graph.inserting_after(node):
        logged = node
        if _mutated_in_place(node, modules):
            logged = gm.graph.call_method("clone", (node,))
        with gm.graph.inserting_after(logged):
            gm.graph.call_module(target, (logged,))


def _resolve_matching(float_model: nn.Module, quant_model: nn.Module, matching: Matching | None,
                      leaf_modules: Iterable[LeafSpec] | None) -> Matching:
    return matching if matching is not None else match(float_model, quant_model, leaf_modules=leaf_modules)


def add_loggers(
    float_model: nn.Module,
    quant_model: nn.Module,
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
        float_model: the float model (not modified).
        quant_model: the quantized model (not modified).
        logger_cls: logger class, called as ``logger(output)``.
        select: which pairs to log: pair names, or ``select(pair, matching) -> bool``.
        matching: a :func:`match` result to reuse instead of matching again.
        leaf_modules: passed to :func:`match`.

    Returns:
        ``(float_gm, quant_gm)``; their loggers are in :func:`loggers_of`.
    """
    matching = _resolve_matching(float_model, quant_model, matching, leaf_modules)
    float_copy, quant_copy = _GraphCopy(matching.float_graph), _GraphCopy(matching.quant_graph)
    float_loggers, quant_loggers = _log_outputs(
        float_copy, quant_copy, _select(matching, select),
        lambda name: _make_logger(logger_cls), lambda name, twin: _make_logger(logger_cls),
    )
    return float_copy.finish(float_loggers), quant_copy.finish(quant_loggers)


class _GraphCopy:
    """A copy of a traced graph being instrumented; :meth:`finish` recompiles it once."""

    def __init__(self, source: fx.GraphModule) -> None:
        self.gm, self.nodes = _copy_graph_module(source)
        self.modules = dict(self.gm.named_modules(remove_duplicate=False))

    def finish(self, loggers: dict[str, nn.Module]) -> fx.GraphModule:
        self.gm.recompile()
        self.gm.__dict__[_LOGGERS_ATTR] = loggers
        return self.gm


def _log_outputs(
    float_copy: _GraphCopy,
    quant_copy: _GraphCopy,
    pairs: list[Pair],
    make_float: Callable[[str], nn.Module],
    make_quant: Callable[[str, nn.Module], nn.Module],
) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Log ``pairs`` on both sides; ``make_quant(name, float_logger)`` builds the quantized one."""
    float_loggers: dict[str, nn.Module] = {}
    quant_loggers: dict[str, nn.Module] = {}
    for i, pair in enumerate(pairs):
        if pair.name not in quant_loggers:
            float_loggers[pair.name] = make_float(pair.name)
            quant_loggers[pair.name] = make_quant(pair.name, float_loggers[pair.name])
        target = f"fxnumeric_logger_{i}"
        for copy_, node, logger in ((float_copy, pair.float_nodes[-1], float_loggers[pair.name]),
                                    (quant_copy, pair.quant_nodes[-1], quant_loggers[pair.name])):
            _attach(copy_.gm, copy_.nodes, copy_.modules, node, logger, target)
    return float_loggers, quant_loggers


def _float_subgraph(
    matching: Matching, pair: Pair, modules: dict[str, nn.Module]
) -> tuple[list[fx.Node], list[fx.Node], list[str]]:
    """The pair's float nodes with the plumbing between them, in graph order.

    Returns ``(nodes, external, carriers)``: the nodes to copy, the outside nodes they read
    (get_attr excepted) and, for each of those, the name of the node carrying its value
    (plumbing such as Identity passes its input through).
    """
    from .ops import classify

    chain = [matching.float_node(n) for n in pair.float_nodes]
    inside = set(chain)
    frontier = list(chain)
    while frontier:
        n = frontier.pop()
        for i in n.all_input_nodes:
            if i in inside or i.op not in ("call_module", "call_function", "call_method"):
                continue
            c = classify(i, modules)
            if c is not None and c.role == "plumbing" and _feeds_from(i, inside, modules):
                inside.add(i)
                frontier.append(i)
    ordered = sorted(inside, key=_graph_position(matching.float_graph))
    external: list[fx.Node] = []
    for n in ordered:
        for i in n.all_input_nodes:
            if i not in inside and i.op != "get_attr" and i not in external:
                external.append(i)

    def carrier(node: fx.Node) -> fx.Node:
        while node.op in ("call_module", "call_function", "call_method") and node.all_input_nodes:
            c = classify(node, modules)
            if c is None or c.role != "plumbing":
                break
            node = node.all_input_nodes[0]
        return node

    return ordered, external, [carrier(e).name for e in external]


def _graph_position(gm: fx.GraphModule) -> Callable[[fx.Node], int]:
    index = gm.__dict__.get("_fxnumeric_position")
    if index is None or len(index) != len(gm.graph.nodes):
        index = gm.__dict__["_fxnumeric_position"] = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__


def _feeds_from(node: fx.Node, inside: set, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` (plumbing) reads, through plumbing only, from a node in ``inside``."""
    from .ops import classify

    seen = node
    while seen.all_input_nodes:
        seen = seen.all_input_nodes[0]
        if seen in inside:
            return True
        if seen.op not in ("call_module", "call_function", "call_method"):
            return False
        c = classify(seen, modules)
        if c is None or c.role != "plumbing":
            return False
    return False


def add_shadows(
    float_model: nn.Module,
    quant_model: nn.Module,
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
    matching = _resolve_matching(float_model, quant_model, matching, leaf_modules)
    quant_copy = _GraphCopy(matching.quant_graph)
    loggers, skipped = _shadow(matching, quant_copy, _select(matching, select), lambda name: _make_logger(logger_cls))
    return quant_copy.finish(loggers), skipped


def _shadow(
    matching: Matching, quant_copy: _GraphCopy, pairs: list[Pair], make_logger: Callable[[str], nn.Module]
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Shadow ``pairs`` in ``quant_copy``; ``make_logger(name)`` builds the loggers.

    Each shadow is the pair's float nodes copied into the quantized graph right after the
    quantized output, reading dequantized copies of the quantized inputs, with deep copies of
    the float modules they call. Returns the loggers and ``{pair name: reason}`` for skips.
    """
    quant_gm, quant_nodes, quant_modules = quant_copy.gm, quant_copy.nodes, quant_copy.modules
    graph = quant_gm.graph
    float_gm = matching.float_graph
    float_modules = dict(float_gm.named_modules(remove_duplicate=False))
    float_to_quant: dict[str, str] = {}
    for q, f in matching.quant_to_float.items():
        float_to_quant.setdefault(f, q)  # earliest quantized node carrying that value
    loggers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    for i, pair in enumerate(pairs):
        nodes, external, carriers = _float_subgraph(matching, pair, float_modules)
        head_inputs = _quant_head_inputs(matching, pair)
        quant_inputs = []
        for f in carriers:
            q = head_inputs.get(f) or float_to_quant.get(f)
            if q is None or order[q] > order[pair.quant_nodes[-1]]:
                skipped[pair.name] = f"float input `{f}` of the shadow has no quantized counterpart"
                break
            quant_inputs.append(quant_nodes[q])
        else:
            if pair.name not in loggers:
                loggers[pair.name] = make_logger(pair.name)
            _insert_shadow(quant_gm, quant_modules, float_gm, float_modules, quant_nodes[pair.quant_nodes[-1]],
                           nodes, dict(zip(external, quant_inputs, strict=True)), loggers[pair.name], f"fxnumeric_shadow_{i}")
    return loggers, skipped


def _insert_shadow(
    quant_gm: fx.GraphModule,
    quant_modules: dict[str, nn.Module],
    float_gm: fx.GraphModule,
    float_modules: dict[str, nn.Module],
    anchor: fx.Node,
    nodes: list[fx.Node],
    inputs: dict[fx.Node, fx.Node],
    logger: nn.Module,
    prefix: str,
) -> None:
    """Copy float ``nodes`` after ``anchor``, fed dequantized ``inputs``, and log both outputs."""
    graph = quant_gm.graph
    holder = nn.Module()
    quant_gm.add_submodule(prefix, holder)
    cursor = anchor
    env: dict[fx.Node, fx.Node] = {}

    def emit(make: Callable[[], fx.Node]) -> fx.Node:
        nonlocal cursor
        with graph.inserting_after(cursor):
            cursor = make()
        return cursor

    for float_node, quant_node in inputs.items():
        env[float_node] = emit(lambda q=quant_node: graph.call_function(_dequantize, (q,)))
    copied: dict[str, str] = {}
    for n in nodes:
        for attr_node in n.all_input_nodes:
            if attr_node.op == "get_attr" and attr_node not in env:
                name = f"attr{len(copied)}"
                value = copy.deepcopy(_get_attr(float_gm, str(attr_node.target)))
                if isinstance(value, nn.Module):
                    holder.add_module(name, value)
                else:
                    setattr(holder, name, value)
                copied[str(attr_node.target)] = name
                env[attr_node] = emit(lambda name=name: graph.get_attr(f"{prefix}.{name}"))
        if n.op == "call_module":
            local = copied.get(str(n.target))
            if local is None:
                local = copied[str(n.target)] = f"m{len(copied)}"
                holder.add_module(local, copy.deepcopy(float_modules[n.target]))
            env[n] = emit(lambda n=n, local=local: graph.create_node(
                "call_module", f"{prefix}.{local}",
                fx.map_arg(n.args, env.__getitem__), fx.map_arg(n.kwargs, env.__getitem__)))
        else:
            env[n] = emit(lambda n=n: graph.node_copy(n, env.__getitem__))
    logged = anchor
    if _mutated_in_place(anchor, quant_modules):
        logged = emit(lambda: graph.call_method("clone", (anchor,)))
    holder.add_module("logger", logger)
    emit(lambda: graph.call_module(f"{prefix}.logger", (logged, env[nodes[-1]])))


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _quant_head_inputs(matching: Matching, pair: Pair) -> dict[str, str]:
    """Float node name -> quantized node name, for the values the quantized chain reads."""
    chain = {matching.quant_node(n) for n in pair.quant_nodes}
    out: dict[str, str] = {}
    for n in chain:
        for i in n.all_input_nodes:
            node = i
            # walk back through plumbing to the node that carries a float counterpart
            while node.name not in matching.quant_to_float and node.all_input_nodes and node not in chain:
                node = node.all_input_nodes[0]
            f = matching.quant_to_float.get(node.name)
            if f is not None and node not in chain:
                out.setdefault(f, node.name)
    return out
