"""Stage 3, instrument: new models with observers on paired outputs and float shadows.

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
models give bit-identical outputs. The new models share the user's submodules and tensors
(nothing is copied or changed). A shadow calls the float model's own modules where calling them
changes nothing (torch's modules in eval mode) and deep copies of the others (observers,
fake-quants, modules in training mode, user classes), so running a shadow never touches the
float model (:mod:`fxnumeric.semantics` decides).

The package: :mod:`~fxnumeric.instrument.graph` edits one region's graph copy,
:mod:`~fxnumeric.instrument.assemble` puts the edited regions back into runnable models.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .._collector import defers_collection
from ..blocks import Block
from ..capture import LeafSpec, unwrap
from ..errors import InstrumentationError
from ..guards import check_eval_mode, check_graph_training
from ..loggers import OutputLogger, ShadowLogger
from ..match import Matching, Pair, Region, match, with_recorded_run
from ..pairing import op_name
from ..semantics import computes_alike
from .assemble import Build, CallSites, assemble, captured_model
from .graph import GraphCopy, carried_op, float_subgraph, shadow_inputs, span_inputs, stand_ins

__all__ = [
    "instrument", "Instrumented", "add_loggers", "add_shadows", "loggers_of", "PairFilter",
    "resolve_matching", "observe_values",
]

PairFilter = Callable[[Pair, Matching], bool]
"""Called as ``select(pair, matching)``; return True to instrument that pair."""

OutputObservers = Callable[[Pair], tuple[nn.Module | None, nn.Module]]
"""Called once per pair name as ``make(pair)``; returns ``(float_observer, quant_observer)``,
each then called as ``observer(output)``. A ``None`` float observer leaves the float side
alone: its value is observed elsewhere (``compare`` runs one float model for several quantized
variants, instrumented by :func:`observe_values`)."""

BlockObservers = Callable[[Block], tuple[nn.Module | None, nn.Module, nn.Module]]
"""Called once per block as ``make(block)``: ``(float output observer, quantized output
observer, block shadow observer)``, called like a pair's."""

ShadowObserver = Callable[[Pair], nn.Module]
"""Called once per pair name as ``make(pair)``; the observer is then called as
``observer(quantized_output, float_shadow_output)``, or, if it has a true ``takes_inputs``
attribute, ``observer(quantized_output, float_shadow_output, *inputs)`` with the dequantized
values the shadow read (a layer's activation first). One with a true ``takes_rows`` attribute
may instead be called as ``observer.observe_rows(quantized_output, blocks, *inputs)`` when the
shadow is one large Linear, computed a block of rows at a time
(:class:`~fxnumeric.instrument.graph.RowShadow`)."""

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
        float_model: the float model with output observers (the float model as captured
            when none were asked for): a GraphModule for a model captured whole, else a copy
            of the user's model whose instrumented regions are GraphModules (see
            :mod:`fxnumeric.instrument.assemble`).
        quant_model: the quantized model with output observers and/or shadows, likewise.
        float_observers: ``{pair name: observer}`` on the float outputs.
        quant_observers: ``{pair name: observer}`` on the quantized outputs.
        shadow_observers: ``{pair name: observer}`` fed ``(quantized, float shadow)``.
        skipped: ``{pair (or block) name: reason}`` for what could not be shadowed.
        strays: ``{pair name: (unpaired quantized op, float op)}`` where the quantized op
            reads the value of an op the float model does not have, and its shadow reads it
            too, in place of the float op's counterpart: that op's error is in no row
            (:attr:`~fxnumeric.instrument.graph.StandIns.strays`).
        bypassed: ``{pair name: (quantized op, float op)}`` where the float op reads the
            value of a float op the quantized model lacks (unpaired), and its shadow reads the
            quantized op's input in its place, whose float counterpart is another op
            (:attr:`~fxnumeric.instrument.graph.StandIns.bypassed`).
        block_observers: ``{block name: (float, quantized, shadow observer)}``.
    """

    float_model: nn.Module
    quant_model: nn.Module
    float_observers: dict[str, nn.Module] = field(default_factory=dict)
    quant_observers: dict[str, nn.Module] = field(default_factory=dict)
    shadow_observers: dict[str, nn.Module] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    strays: dict[str, tuple[str, str]] = field(default_factory=dict)
    bypassed: dict[str, tuple[str, str]] = field(default_factory=dict)
    block_observers: dict[str, tuple[nn.Module | None, nn.Module, nn.Module]] = field(
        default_factory=dict)


@defers_collection
def instrument(
    matching: Matching,
    *,
    select: PairFilter | Iterable[str] | None = None,
    outputs: OutputObservers | None = None,
    shadows: ShadowObserver | None = None,
    blocks: Iterable[Block] = (),
    block_observers: BlockObservers | None = None,
) -> Instrumented:
    """Attach observers to the selected pairs of ``matching``, into one copy of each graph.

    Every region of the matching (a whole model, a submodule, a leaf module kept whole) is
    instrumented the same way (:class:`~fxnumeric.instrument.graph.GraphCopy`) and the
    results are assembled into runnable models (:func:`~fxnumeric.instrument.assemble.assemble`).

    Args:
        matching: a :func:`fxnumeric.match` result.
        select: which pairs: pair names, or ``select(pair, matching) -> bool``; all if None.
        outputs: builds the observers of each pair's float and quantized outputs. The
            quantized output is the value the next op reads (after the pair's own output
            quantize, see :meth:`Region.output_nodes`). Each call site of an op is a pair of
            its own (``relu``, ``relu#2``); a factory that returns the same observer for
            several pairs gets it called once per call site.
        shadows: builds the observer of each pair's float shadow: a copy of the pair's float
            subgraph fed the dequantized inputs of the quantized op, inserted after it.
        blocks: blocks of the model (:func:`fxnumeric.blocks.find_blocks`) to observe too.
        block_observers: builds each block's ``(float output observer, quantized output
            observer, shadow observer)``; the shadow is the whole float block fed the
            quantized block's (dequantized) input. A ``None`` float observer leaves the float
            side alone, as a pair's does.
            For each pair, ``outputs(pair)`` is called before ``shadows(pair)``, pair after
            pair in graph order (``fxnumeric.diagnose`` hands a pair's float observer to its
            shadow observer so).

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
    chosen = set(_select(matching, select))
    built = Instrumented(captured_model(matching, "float"), captured_model(matching, "quant"))
    blocks = list(blocks) if block_observers is not None else []
    copies: dict[Region, list[tuple[GraphCopy | None, GraphCopy]]] = {}
    index = 0
    for region in matching.regions:
        pairs = [p for p in region.pairs if p in chosen]
        if not pairs and not any(b.region is region for b in blocks):
            continue
        copies[region] = []
        for site in range(region.call_sites):  # a copy per call site (usually one)
            quant_copy = GraphCopy(region, "quant")
            # the float side is copied once an observer goes on it (compare's variants
            # observe it in a float model of their own: their factories return none)
            float_copy: GraphCopy | None = None
            for pair in (p for p in pairs if region.call_site(p) == site):
                observers = outputs(pair) if outputs is not None else None
                if observers is not None and observers[0] is not None and float_copy is None:
                    float_copy = GraphCopy(region, "float")
                container = pair.name in matching.containers
                _instrument_pair(region, pair, float_copy, quant_copy, built, observers,
                                 None if container else shadows, index)
                if shadows is not None and container:
                    built.skipped[pair.name] = (
                        "a module kept whole whose own layers are compared inside it: a "
                        "shadow of it would re-run them all and read their error, not its own")
                index += 1
            copies[region].append((float_copy, quant_copy))
    for block in blocks:  # after the regions: a block's own region wraps those inside it
        if block.region not in copies:
            copies[block.region] = [(None, GraphCopy(block.region, "quant"))
                                    for _ in range(block.region.call_sites)]
        assert block_observers is not None
        float_copy, quant_copy = copies[block.region][block.site]  # a block per call site
        observers = block_observers(block)
        if observers[0] is not None and float_copy is None:
            float_copy = GraphCopy(block.region, "float")
            copies[block.region][block.site] = (float_copy, quant_copy)
        _instrument_block(block, float_copy, quant_copy, built, observers, index)
        index += 1
    quant_parts = {r: _sites([q for _, q in c], r) for r, c in copies.items()}
    float_parts = {  # every call site of a region observed on the float side needs its copy
        r: _sites([f if f is not None else GraphCopy(r, "float") for f, _ in c], r)
        for r, c in copies.items() if any(f is not None for f, _ in c)}
    return replace(built, float_model=assemble(matching, "float", float_parts),
                   quant_model=assemble(matching, "quant", quant_parts))


def _instrument_block(block: Block, float_copy: GraphCopy | None, quant_copy: GraphCopy,
                      built: Instrumented, observers: tuple[nn.Module | None, nn.Module, nn.Module],
                      index: int) -> None:
    """A block's output observers and its shadow (the float block fed the quantized block's
    input), in its region's graph copies (no float copy: the float output is observed
    elsewhere)."""
    region = block.region
    float_obs, quant_obs, shadow_obs = observers
    built.block_observers[block.name] = observers
    if float_copy is not None and float_obs is not None:
        float_copy.observe(block.float_out.name, float_obs, f"fxnumeric_block_{index}")
    quant_copy.observe(block.quant_out.name, quant_obs, f"fxnumeric_block_{index}")
    nodes = region.float_view.with_plumbing(list(block.float_nodes))
    inputs = span_inputs(region, nodes, list(block.quant_nodes), carried=True)
    if isinstance(inputs, str):
        built.skipped[block.name] = inputs
        return
    chain = tuple(n.name for n in block.quant_nodes)
    inputs = {f: quant_copy.before_run(quant_copy.before_overwrite(q, chain), chain)
              for f, q in inputs.items()}
    quant_copy.shadow(block.quant_out.name, region.float_view, nodes, inputs, shadow_obs,
                      f"fxnumeric_block_shadow_{index}")


def _sites(copies: list[Any], region: Region) -> Build:
    """What assembly puts in a region's place: a copy per call site, in :class:`CallSites`
    (which counts the calls of each forward: a batch calling a submodule more often than the
    first runs the extra calls unobserved, and says so); the whole model's one copy as it is."""
    if len(copies) == 1 and not region.quant_path:
        return copies[0].finish
    return lambda calls: CallSites([c.finish(calls) for c in copies])


def _instrument_pair(region: Region, pair: Pair, float_copy: GraphCopy | None,
                     quant_copy: GraphCopy, built: Instrumented,
                     observers: tuple[nn.Module | None, nn.Module] | None,
                     shadows: ShadowObserver | None, index: int) -> None:
    """Observers (and a shadow) of one pair, in the region's graph copies."""
    float_out, quant_out = region.output_nodes(pair)
    if observers is not None:
        float_observer, built.quant_observers[pair.name] = observers
        if float_observer is not None and float_copy is not None:
            built.float_observers[pair.name] = float_observer
            float_copy.observe(float_out.name, float_observer, f"fxnumeric_logger_{index}")
        quant_copy.observe(quant_out.name, built.quant_observers[pair.name],
                           f"fxnumeric_logger_{index}")
    if shadows is None:
        return
    inputs = shadow_inputs(region, pair)
    if isinstance(inputs, str):
        built.skipped[pair.name] = inputs
        return
    found = stand_ins(region, pair)  # what the shadow reads where the models differ
    for kept, read in ((built.strays, found.strays), (built.bypassed, found.bypassed)):
        for float_op, value in read.items():
            kept[pair.name] = (carried_op(region.quant_view, value).name, float_op.name)
    built.shadow_observers[pair.name] = observer = shadows(pair)
    if not getattr(observer, "takes_inputs", False) and computes_alike(region, pair):
        # a layer left float that computes what its twin computes: its shadow's output would
        # be its own output, bit for bit, so the float op is not run again (an LLM's lm_head)
        quant_copy.observe(quant_out.name, observer, f"fxnumeric_shadow_{index}", twice=True)
        return
    chain = tuple(n.name for n in region.chain(pair, "quant"))
    inputs = {f: quant_copy.before_overwrite(q, chain) for f, q in inputs.items()}
    quant_copy.shadow(quant_out.name, region.float_view, float_subgraph(region, pair), inputs,
                      built.shadow_observers[pair.name], f"fxnumeric_shadow_{index}")


def observe_values(matching: Matching, side: str,
                   observers: Mapping[tuple[str, str, int], nn.Module],
                   regions: Iterable[Region] = ()) -> nn.Module:
    """``side``'s model (``"float"`` or ``"quant"``) with observers on chosen values.

    The building block for a model whose observers serve several matchings: ``compare`` runs
    one float model for several quantized variants, and torch.fx names the nodes of two
    captures of one model alike, so each variant's float values are found in one capture by
    region path and node name.

    Args:
        matching: whose captured graphs (regions) are instrumented.
        side: ``"float"`` or ``"quant"``.
        observers: ``{(region path on that side, graph node name, call site): observer}``;
            the call site is which call of the region's module per forward the value is
            observed at (0: the first; see :attr:`Region.call_sites`). The observer is called
            as ``observer(value)`` after the node runs, as :func:`instrument`'s output
            observers are (a value a later op overwrites in place is cloned first).
        regions: regions beyond the matching's to look values up in: the one-op regions of
            blocks kept whole (:attr:`fxnumeric.blocks.Block.own_region`).

    Raises:
        InstrumentationError: no region at a path, no node of that name in its graph, or no
            such call site.

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> from fxnumeric import OutputLogger, match
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> m = match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear}))
        >>> logger = OutputLogger()
        >>> _ = observe_values(m, "float", {("", "_1", 0): logger})(torch.randn(2, 4))
        >>> len(logger.stats["tensor_val"])
        1
    """
    regions = {region.path(side): region for region in (*matching.regions, *regions)}
    by_region: dict[Region, list[tuple[str, int, nn.Module]]] = {}
    for (path, node, site), observer in observers.items():
        region = regions.get(path)
        missing = (f"no region at {path!r}" if region is None
                   else f"no node {node!r} at {path!r}" if not region.view(side).has_node(node)
                   else f"no call site {site} at {path!r} (it has {region.call_sites})"
                   if not 0 <= site < region.call_sites else "")
        if missing:
            raise InstrumentationError(
                f"cannot observe {side} value ({path!r}, {node!r}, {site}): {missing}; regions "
                "are at " + ", ".join(repr(p) for p in list(regions)[:10]))
        assert region is not None
        by_region.setdefault(region, []).append((node, site, observer))
    parts: dict[Region, Build] = {}
    index = 0
    for region, wanted in by_region.items():
        copies = []
        for site in range(region.call_sites):  # a copy per call site (usually one)
            graph_copy = GraphCopy(region, side)
            for node, _, observer in (w for w in wanted if w[1] == site):
                graph_copy.observe(node, observer, f"fxnumeric_logger_{index}")
                index += 1
            copies.append(graph_copy)
        parts[region] = _sites(copies, region)
    return assemble(matching, side, parts)


# ---------------------------------------------------------------- the public wrappers


def resolve_matching(float_model: nn.Module | None, quant_model: nn.Module | None,
                     matching: Matching | None,
                     leaf_modules: Iterable[LeafSpec] | None, *, capture: str = "auto",
                     example_inputs: Any = None, validate: bool = True) -> Matching:
    """``matching``, checked against the models passed beside it, or a new :func:`match`
    (``validate``: see its ``validate_inputs``). Models in training mode are refused
    (:func:`fxnumeric.guards.check_eval_mode`). A matching made without example inputs
    learns on ``example_inputs``, in one run, what the ``**kwargs`` of the modules it keeps
    whole take and the order its pairs run in (:func:`fxnumeric.match.with_recorded_run`)."""
    for side, given, matched in (("float", float_model, "float_model"),
                                 ("quantized", quant_model, "quant_model")):
        check_eval_mode(given if given is not None or matching is None
                        else getattr(matching, matched), side)
    if matching is None:
        if float_model is None or quant_model is None:
            raise InstrumentationError("pass the float and quantized models, or a matching")
        matching = match(float_model, quant_model, example_inputs, leaf_modules=leaf_modules,
                         capture=capture, validate_inputs=validate)
        check_graph_training(matching)
        return matching
    check_graph_training(matching)
    for side, given, used in (("float", float_model, matching.float_model),
                              ("quantized", quant_model, matching.quant_model)):
        # match() keeps the model a torch.compile or DataParallel wrapper holds
        if given is not None and given is not used and unwrap(given, side)[0] is not used:
            raise InstrumentationError(
                f"the {side} model passed is not the one `matching` was built from; pass the "
                "models that fxnumeric.match was called with, or only the matching "
                "(float_model=None, quant_model=None)"
            )
    return with_recorded_run(matching, example_inputs)


def add_loggers(
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    logger_cls: type = OutputLogger,
    *,
    select: PairFilter | Iterable[str] | None = None,
    matching: Matching | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
    per_call_site: bool = True,
) -> tuple[nn.Module, nn.Module]:
    """Return new float and quantized models that log the output of every paired op.

    Each call site of an op is a pair of its own with its own logger (``relu``, ``relu#2``).
    With ``per_call_site=False`` the call sites of one op share one logger under the op's
    name, which logs once per call, as torch's eager suite does (the eager API uses this).

    Args:
        float_model: the float model (not modified); None when ``matching`` is given.
        quant_model: the quantized model (not modified); None when ``matching`` is given.
        logger_cls: logger class, called as ``logger(output)``.
        select: which pairs to log: pair names, or ``select(pair, matching) -> bool``.
        matching: a :func:`match` result to reuse instead of matching again; models passed
            beside it must be the ones it was built from.
        leaf_modules: passed to :func:`match`.
        per_call_site: one logger per call site (default), or one per op name.

    Returns:
        ``(float_gm, quant_gm)``; their loggers are in :func:`loggers_of`.
    """
    matching = resolve_matching(float_model, quant_model, matching, leaf_modules)
    make = _loggers(lambda: (_make_logger(logger_cls, 1), _make_logger(logger_cls, 1)),
                    per_call_site)
    built = instrument(matching, select=select, outputs=make)
    _LOGGERS[built.float_model] = _by_name(built.float_observers, per_call_site)
    _LOGGERS[built.quant_model] = _by_name(built.quant_observers, per_call_site)
    return built.float_model, built.quant_model


def add_shadows(
    float_model: nn.Module | None,
    quant_model: nn.Module | None,
    logger_cls: type = ShadowLogger,
    *,
    select: PairFilter | Iterable[str] | None = None,
    matching: Matching | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
    per_call_site: bool = True,
) -> tuple[nn.Module, dict[str, str]]:
    """Return a new quantized model in which every selected pair has a float shadow.

    The shadow is a copy of the pair's float subgraph, fed the dequantized inputs of the
    quantized op, so it measures the error that op adds on its own. The logger is called as
    ``logger(quantized_output, float_output)``. Pairs whose float subgraph reads a value that
    has no quantized counterpart cannot be shadowed; they are returned with the reason.

    Loggers are per call site, or per op name with ``per_call_site=False`` (see
    :func:`add_loggers`).

    Returns:
        ``(quant_gm, skipped)``: the instrumented model (loggers in :func:`loggers_of`) and
        ``{pair name: reason}`` for pairs that could not be shadowed.
    """
    matching = resolve_matching(float_model, quant_model, matching, leaf_modules)
    built = instrument(matching, select=select,
                       shadows=_loggers(lambda: _make_logger(logger_cls, 2), per_call_site))
    _LOGGERS[built.quant_model] = _by_name(built.shadow_observers, per_call_site)
    return built.quant_model, built.skipped


def _loggers(make: Callable[[], Any], per_call_site: bool) -> Callable[[Pair], Any]:
    """A factory of loggers per pair: new ones per call site, or shared by the op's name."""
    if per_call_site:
        return lambda pair: make()
    made: dict[str, Any] = {}

    def shared(pair: Pair) -> Any:
        name = op_name(pair.name)
        if name not in made:
            made[name] = make()
        return made[name]

    return shared


def _by_name(observers: dict[str, nn.Module], per_call_site: bool) -> dict[str, nn.Module]:
    """``observers`` keyed by pair name, or by op name when call sites share them."""
    if per_call_site:
        return observers
    return {op_name(name): logger for name, logger in observers.items()}


_CALLED_WITH = {1: ("the output (logger(output))", "fxnumeric.OutputLogger"),
                2: ("the quantized and the float shadow's outputs (logger(quantized, float))",
                    "fxnumeric.ShadowLogger")}


def _make_logger(logger_cls: type, values: int) -> nn.Module:
    """A new logger of ``logger_cls``, checked to take the ``values`` it will be called with."""
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
    try:
        signature = inspect.signature(logger.forward)
    except (TypeError, ValueError):  # a builtin's: nothing to read, the call will tell
        return logger
    try:
        signature.bind(*[None] * values)
    except TypeError as exc:
        what, like = _CALLED_WITH[values]
        raise InstrumentationError(
            f"{type(logger).__name__}.forward({', '.join(signature.parameters)}) cannot take "
            f"{what}: pass a logger class like {like}") from exc
    return logger


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
