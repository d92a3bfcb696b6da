"""Hybrid models: the float model with some layers quantized, or the quantized model with some
layers float, built from a :class:`~fxnumeric.Matching` without re-quantizing anything.

A *swap* replaces one pair's subgraph in a *base* graph with the pair's subgraph from the
other graph::

    base = quantized, pair `fc2` kept float ("all but fc2 quantized"):

        q_x -> qfc1 -> [dequantize -> float fc2] -> quantize(scale, zp of qfc2's output) -> qfc3
                                                 (for each quantized op that reads it)

    base = float, pair `fc2` quantized ("only fc2 quantized"):

        x -> fc1 -> [quantize(scale, zp of qfc2's input) -> qfc2 -> dequantize] -> ...

Values cross between the two sides in the form the quantized model uses at that point: a
float value entering the quantized side runs through the quantized model's own quantize (and
dequantize) nodes in front of the layer, or is quantized with the qparams of the quantized
model's own tensor there (recorded from a run of the quantized model on the same batch,
:meth:`HybridRunner.probe`) when the layer reads another quantized op directly; a quantized
value entering the float side is dequantized; dynamic-quantized and torchao layers take and
return float tensors, so nothing is converted around them. A float layer's output is
requantized for each quantized op that reads it, as that op reads it (with the op's own fixed
qparams for a ``sigmoid`` or ``tanh``, as FX observes their input); its float readers and the
model output read it float.

Every region of the matching (a whole model, a submodule, a leaf module kept whole) is a pair
of graphs, so hybrids are built the same way for every capture: the regions holding swaps run
on a :class:`torch.fx.Interpreter` (:class:`_SwapInterpreter`) and are assembled into a copy
of the base model (:func:`fxnumeric.instrument.assemble.assemble`), which runs as the model
does, keyword inputs included. What a copied node may write in place is decided by
:mod:`fxnumeric.semantics`, as for shadows.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import flows
from .._tensors import dequantize_all
from ..errors import InputError, InstrumentationError
from ..flows.pt2e import annotated, input_wanted, output_wanted, pattern_anchor, quantized_edge
from ..instrument.assemble import assemble, captured_model
from ..instrument.graph import carried_op, stand_ins
from ..match import Matching, Pair, Region
from ..offload import whole_modules
from ..pairing import op_name
from ..run import graph_signature, module_frames, node_site, precision_hint, run_model
from ..semantics import fetch_attr, is_dequantize, with_values, writes_first_input

__all__ = ["Swap", "HybridRunner", "HybridFailure", "layer_names", "whole_of", "called_whole",
           "op_names", "module_path", "module_calls", "function_target"]


def layer_names(matching: Matching, containers: bool = False) -> list[str]:
    """Names of the ops that compute in quantized form, in graph order, without repeats.

    These are the layers a hybrid can swap; the call sites of one op (``relu``, ``relu#2``)
    are one layer, since a quantization flow configures the op, not a call. A module kept
    whole whose own layers are pairs of other regions (:attr:`Matching.containers`) is one
    only with ``containers``: its quantized layers are the layers, and swapping it swaps them
    all under one name, so it is swapped only when asked for by name.
    """
    return list(dict.fromkeys(op_name(p.name) for p in matching.pairs
                              if p.quantized and (containers
                                                  or p.name not in matching.containers)))


def whole_of(matching: Matching) -> dict[str, tuple[str, str]]:
    """:func:`fxnumeric.offload.whole_modules` of both models of ``matching``: ``{path:
    (why, fix)}`` of the modules accelerate's hooks make fxnumeric call whole."""
    return {**whole_modules(matching.quant_model), **whole_modules(matching.float_model)}


def called_whole(matching: Matching, names: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``(layer, why)`` for each of ``names`` that is a module accelerate's hooks make
    fxnumeric call whole although it holds quantized layers (a decoder layer dispatched with
    ``preload_module_classes``: :func:`fxnumeric.offload.whole_modules`). Such a module is one
    layer: a hybrid swaps it whole (the float module for the quantized one), so its quantized
    layers are kept float or quantized together, and diagnosed together; ``why`` says so,
    which hook keeps it whole and how to have its layers one by one."""
    whole = whole_of(matching)
    found: list[tuple[str, str]] = []
    for name in names:
        # a model called whole is its graph's one op, held as submodule ``root``
        path = "" if "" in whole else module_path(matching, name)
        if path in whole:
            why, fix = whole[path]
            found.append((name, f"called whole because {why}: its quantized layers are one "
                                "layer, kept float or quantized (and diagnosed) together. "
                                f"{fix} to have them one by one"))
    return tuple(found)


def op_names(matching: Matching) -> list[str]:
    """Names of every paired op, quantized or not, in graph order, without repeats: the ops a
    :func:`fxnumeric.compare` report has a row for (its call sites merged, as in
    :func:`layer_names`)."""
    return list(dict.fromkeys(op_name(p.name) for p in matching.pairs))


def _every_layer(first: Matching, variants: dict[str, Matching]
                 ) -> tuple[list[str], tuple[tuple[str, str], ...]]:
    """The layers any variant quantizes, named as in the ``first`` matching (the base of
    every hybrid), in its graph order; and ``(layer, reason)`` for a variant's layer the first
    matching has no op for (its float graph was captured otherwise)."""
    names = layer_names(first)
    if len(variants) == 1:
        return names, ()
    order = {n: i for i, n in enumerate(op_names(first))}
    by_path = {module_path(first, n): n for n in order}
    unplaced: list[tuple[str, str]] = []
    for variant, matching in list(variants.items())[1:]:
        for name in layer_names(matching):
            path = module_path(matching, name)
            if by_path.get(path) is not None:
                names.append(by_path[path])
            else:
                unplaced.append((f"{variant}:{name}", f"variant {variant!r} quantizes `{path}`, "
                                 "which the first variant's graph has no op for (captured "
                                 "otherwise): float in every plan"))
    return sorted(dict.fromkeys(names), key=lambda n: order[n]), tuple(unplaced)


def _call_sites(matching: Matching, name: str) -> list[Pair]:
    return [p for p in matching.pairs if op_name(p.name) == name]


def module_path(matching: Matching, name: str) -> str:
    """The float model's module path of layer ``name`` (the name the user's flow configures).

    The module the layer's first float node (its head op) calls; for an exported (pt2e) graph,
    whose ops are functions, the innermost module the op ran in (:func:`fxnumeric.flows.scope`)
    when that is a leaf module (a Linear); else the layer name (a function op such as a
    residual ``add``, whose fused ``relu`` module is not the layer: see
    :func:`function_target`).
    """
    for p in _call_sites(matching, name):
        region = matching.region_of(p)
        node = region.chain(p, "float")[0]  # the head op: conv of conv-bn-relu
        if node.op == "call_module":
            return _prefixed(region.float_scope, str(node.target))
        path = flows.scope(node)
        if path and _is_leaf(region.float_view.root, path):
            return _prefixed(region.float_scope, path)
        break
    return name


def function_target(matching: Matching, name: str) -> tuple[str, Any, int] | None:
    """For a layer that is a function op (no module of its own), what FX's ``QConfigMapping``
    names it by: ``(module path, function, index)`` for ``set_module_name_object_type_order``
    (the index counts the calls of that function inside that module, in graph order)."""
    if module_path(matching, name) != name:
        return None
    pairs = _call_sites(matching, name)
    if not pairs:
        return None
    region = matching.region_of(pairs[0])
    node = region.chain(pairs[0], "float")[0]
    if node.op not in ("call_function", "call_method"):
        return None  # a method's target is its name (``"mean"`` for ``x.mean()``)
    scope = flows.scope(node) or ""
    index = 0
    for other in region.float_view.nodes:
        if other is node:
            return _prefixed(region.float_scope, scope), node.target, index
        if other.op == node.op and other.target == node.target and (
                (flows.scope(other) or "") == scope):
            index += 1
    return None


def module_calls(matching: Matching, name: str) -> tuple[tuple[str, type, int], ...]:
    """For a function-op layer, the module calls its pattern ends in (FX fuses a residual
    ``add`` with the ``ReLU`` module called on its output into one ``add_relu``): each as
    ``(parent path, module type, index)`` for ``set_module_name_object_type_order``, which is
    how FX configures one call of a module (a block's ``relu`` is often called at several
    places). FX counts the calls of a module type inside their parent after fusing modules,
    so a call fused into the module before it (the ``relu`` of conv-bn-relu) is not
    counted. Empty for a layer that is a module, or whose pattern calls none."""
    if function_target(matching, name) is None:  # a module, or no call site
        return ()
    pair = _call_sites(matching, name)[0]
    region = matching.region_of(pair)
    view = region.float_view
    calls = []
    for node in region.chain(pair, "float")[1:]:
        module = view.module(node) if node.op == "call_module" else None
        if module is None:
            continue
        parent = str(node.target).rpartition(".")[0]
        index = sum(1 for other in view.nodes[:view.position(node)]
                    if other.op == "call_module"
                    and str(other.target).rpartition(".")[0] == parent
                    and type(view.module(other)) is type(module)
                    and not _fused_into_previous(view, other))
        calls.append((_prefixed(region.float_scope, parent), type(module), index))
    return tuple(calls)


def _fused_into_previous(view: Any, node: fx.Node) -> bool:
    """Whether FX's module fusion folds the call ``node`` into the module call before it
    (the ``ReLU`` after a conv or a BatchNorm, the BatchNorm after a conv): torch's fusion
    patterns, over a producer whose only reader it is."""
    from torch.ao.quantization.fuser_method_mappings import _DEFAULT_OP_LIST_TO_FUSER_METHOD

    before = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if before is None or before.op != "call_module" or len(before.users) != 1:
        return False
    pair = (type(view.module(before)), type(view.module(node)))
    return any(pattern[-2:] == pair for pattern in _DEFAULT_OP_LIST_TO_FUSER_METHOD)


def _prefixed(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _is_leaf(root: nn.Module, path: str) -> bool:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return True  # an exported graph keeps no module tree: trust the flow's scope
    return not any(True for _ in module.children())


@dataclass(frozen=True, eq=False)
class Swap:
    """One pair's subgraph from the ``other`` graph in place of its subgraph in the base graph.

    Attributes:
        name: the layer (op) name.
        base: ``"float"`` or ``"quant"``: which graph the swap is made in.
        region: the region both subgraphs belong to.
        skip: base-graph nodes not run (the pair's chain and the plumbing inside it).
        out: the base-graph node whose value the swap provides.
        nodes: other-graph nodes run instead, in order.
        inputs: ``(other-graph node, base-graph node)``: where each outside value the other
            subgraph reads comes from in the base graph.
        other_out: the other-graph node whose value becomes ``out``'s value.
        cloned: other-graph inputs an in-place op of the subgraph writes into (copied first,
            so the base graph's own value is never changed).
        aliases: base-graph nodes that carry ``out``'s value too (pt2e gives each reader of a
            quantized value a ``dequantize`` of its own): they take the swapped value.
        pattern_edges: ``(dequantize, anchor)``: other-graph edges ``value -> quantize ->
            dequantize`` the swapped ops read quantized only when the first op of their fused
            pattern (``anchor``, another layer: an X86 conv whose residual ``add`` this is)
            is swapped in too; without it they carry ``value`` float
            (:func:`_pattern_edge`).
    """

    name: str
    base: str
    region: Region
    skip: frozenset[fx.Node]
    out: fx.Node
    nodes: tuple[fx.Node, ...]
    inputs: tuple[tuple[fx.Node, fx.Node], ...]
    other_out: fx.Node
    cloned: frozenset[fx.Node] = frozenset()
    aliases: frozenset[fx.Node] = frozenset()
    base_region: Region | None = None
    pattern_edges: tuple[tuple[fx.Node, fx.Node], ...] = ()

    @property
    def other(self) -> str:
        return "float" if self.base == "quant" else "quant"

    @property
    def base_graph(self) -> Region:
        """The region whose base graph the swap is made in (``region`` unless the swap came
        from another variant's matching onto the first one's float graph)."""
        return self.base_region if self.base_region is not None else self.region


class HybridFailure(InstrumentationError):
    """A hybrid model failed in an op: a graph node, or a module the model's own code calls
    (a module-tree capture's dynamic ``lm_head``).

    The float and quantized models ran on the batch, so the hybrid made the op fail: a value
    crossed sides in a form the op does not take, or NaN/Inf reached an op that refuses it
    (a dynamic quantized Linear cannot choose qparams for an all-NaN input, and a float
    layer no longer absorbs a NaN the quantized one next to it ignored). A search reads that
    hybrid's metric as NaN (:meth:`fxnumeric.advice.search._Search.evaluate`).

    Attributes:
        op: the op that raised: ``node `fc` (module `fc`)`` (:func:`fxnumeric.run.node_site`)
            or ``module `path```.
        error: the op's exception, its type and first line.
        nonfinite: whether the op's input held NaN/Inf.
        why: what that means and what to do.
        hint: what to do where a module of torch's own quantization refused half-precision
            values (:func:`fxnumeric.run.precision_hint`), or ``None``.
    """

    def __init__(self, op: str, error: str, nonfinite: bool, hint: str | None = None) -> None:
        self.op, self.error, self.nonfinite, self.hint = op, error, nonfinite, hint
        self.why = (
            "its input holds NaN/Inf in this hybrid: a layer swapped (or kept quantized next "
            "to it) makes them, and this op refuses them (fxnumeric.diagnose names the layer "
            "where NaN/Inf first appears)" if nonfinite else
            "a value crossed between the float and quantized graphs in a form this op does "
            "not take; leave that layer out (layers=...) and report the model")
        super().__init__(f"a hybrid model failed in {op}: {error}\n{self.why[:1].upper()}"
                         f"{self.why[1:]}.")


class _NodeFailure(Exception):
    """A node raised while an interpreter ran it (turned into a user-facing error above)."""

    def __init__(self, node: fx.Node, exc: BaseException, nonfinite: bool = False) -> None:
        super().__init__(str(exc))
        self.node = node
        self.message = _first_line(exc)
        self.nonfinite = nonfinite


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _holds_nonfinite(values: Iterable[Any]) -> bool:
    """Whether any floating-point tensor among ``values`` (dequantized) holds NaN/Inf."""
    for value in values:
        if isinstance(value, torch.Tensor) and not value.is_meta:
            value = value.dequantize() if value.is_quantized else value
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return True
    return False


def _raising_module(model: nn.Module, exc: BaseException | None
                    ) -> tuple[str, bool] | None:
    """The innermost module of ``model`` whose ``forward`` was running when ``exc`` was
    raised (its path, ``"<root>"`` for the model itself) and whether the tensors it was
    called with held NaN/Inf; ``None`` when no module of ``model`` was (the call itself was
    refused). Read off the traceback's frames: a module-tree model's modules run as its own
    code calls them, with no interpreter to say which node was running."""
    found: tuple[str, bool] | None = None
    for path, _, tb in module_frames(model, exc):
        code = tb.tb_frame.f_code
        if code.co_name == "forward":
            called = [tb.tb_frame.f_locals.get(a) for a in code.co_varnames[1:code.co_argcount]]
            found = (path or "<root>", _holds_nonfinite(called))
    return found


def _qparams(value: Any) -> tuple[Any, ...] | None:
    """What quantizing a float tensor like ``value`` takes, if ``value`` is quantized."""
    if not isinstance(value, torch.Tensor) or not value.is_quantized:
        return None
    if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return ("tensor", value.q_scale(), value.q_zero_point(), value.dtype)
    return ("channel", value.q_per_channel_scales(), value.q_per_channel_zero_points(),
            value.q_per_channel_axis(), value.dtype)


def _quantize(value: torch.Tensor, qparams: tuple[Any, ...]) -> torch.Tensor:
    if qparams[0] == "tensor":
        return torch.quantize_per_tensor(value, *qparams[1:])
    return torch.quantize_per_channel(value, *qparams[1:])


def _bind(graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    """A call's arguments as the graph's placeholders take them, one value each, in order:
    a ``*args`` placeholder takes the tuple of the positional arguments left, ``**kwargs``
    the dict of the keyword arguments no other placeholder names, as Python binds a call.
    Raises TypeError as a call would."""
    signature = graph_signature(graph)
    if signature is None:  # placeholders out of Python's order: by position, then by name
        return _bind_in_order(graph, args, kwargs)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def _bind_in_order(graph: fx.Graph, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    values: list[Any] = []
    rest = list(args)
    for node in graph.find_nodes(op="placeholder"):
        name = str(node.target)
        if rest:
            values.append(rest.pop(0))
        elif name in kwargs:
            values.append(kwargs[name])
        elif node.args:
            values.append(node.args[0])  # the default
        else:
            raise TypeError(f"missing input `{name}`")
    return values


class _RegionInterpreter(fx.Interpreter):
    """Runs one region's graph; the modules it calls are ``calls`` (the modules of the
    assembled copy of the model, where other regions may be replaced), its other attributes
    are the graph's own."""

    def __init__(self, gm: fx.GraphModule, calls: dict[str, nn.Module] | None) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.calls = calls or {}

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        return next(self.args_iter)  # one value each, ``*args`` and ``**kwargs`` too: _bind

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        # fresh plain lists and dicts, as the graph's generated code passes them: fx's
        # immutable ones fail a function that writes into its list argument (video Swin's
        # `_get_window_and_shift_size`)
        return with_values(n.args, self.env), with_values(n.kwargs, self.env)

    def fetch_attr(self, target: str) -> Any:
        found = self.calls.get(target)
        return found if found is not None else fetch_attr(self.module, target)

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except _NodeFailure:
            raise
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as exc:
            inputs = (self.env.get(i) for i in n.all_input_nodes)
            raise _NodeFailure(n, exc, _holds_nonfinite(inputs)) from exc


class _Recorder(_RegionInterpreter):
    """Records the qparams of every quantized tensor the region's quantized graph computes."""

    def __init__(self, gm: fx.GraphModule, calls: dict[str, nn.Module] | None,
                 sink: dict[fx.Node, tuple[Any, ...]]) -> None:
        super().__init__(gm, calls)
        self.sink = sink

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        found = _qparams(value)
        if found is not None:
            self.sink[n] = found
        return value


class _SwapInterpreter(_RegionInterpreter):
    """Runs one region's base graph with its swaps: skipped nodes are not run, a swap's
    ``out`` node takes the value of the other graph's subgraph."""

    def __init__(self, gm: fx.GraphModule, calls: dict[str, nn.Module] | None,
                 swaps: tuple[Swap, ...], runner: HybridRunner,
                 dropped: dict[fx.Node, fx.Node]) -> None:
        super().__init__(gm, calls)
        self.runner = runner
        self.swaps = swaps
        self.by_out = {s.out: s for s in swaps}
        self.alias = {a: s.out for s in swaps for a in s.aliases}
        skipped = frozenset().union(*(s.skip for s in swaps))
        self.skip = skipped - set(self.by_out)
        self.dropped = dropped  # edges of the base graph and of the swaps (_pattern_edge)
        # {reader: {swapped out node: node whose qparams it is quantized with}}: a float
        # layer's output, float in the environment, is requantized for its quantized readers
        # only, as each reads it (:func:`_requantize_plan`)
        self.requantized: dict[fx.Node, dict[fx.Node, fx.Node]] = {}
        for swap in swaps:
            if swap.base == "quant":
                plan = _requantize_plan(swap.region, swap.out, skipped, runner._held)
                for reader, qparams_at in plan.items():
                    self.requantized.setdefault(reader, {})[swap.out] = qparams_at
        # values a swap reads live until its out node runs (a skipped node was their last
        # user), and the value a dropped edge passes on until its dequantize runs
        self._position = {n: i for i, n in enumerate(gm.graph.nodes)}
        for swap in swaps:
            for _, provider in swap.inputs:
                self._keep_until(provider, swap.out)
        for dequantize, value in dropped.items():
            self._keep_until(value, dequantize)

    def _keep_until(self, node: fx.Node, until: fx.Node) -> None:
        """Keep ``node``'s value in the environment until ``until`` has run."""
        for user, dead in self.user_to_last_uses.items():
            if node in dead and self._position[user] < self._position[until]:
                dead.remove(node)
                self.user_to_last_uses.setdefault(until, []).append(node)
                return

    def fetch_args_kwargs_from_env(self, n: fx.Node) -> tuple[tuple, dict]:
        wanted = self.requantized.get(n)
        if wanted is None:
            return super().fetch_args_kwargs_from_env(n)
        values = dict(self.env)
        for out, qparams_at in wanted.items():
            values[out] = self.runner._into_quant(self.by_out[out].region, self.env[out], out,
                                                  qparams_at)
        return with_values(n.args, values), with_values(n.kwargs, values)

    def run_node(self, n: fx.Node) -> Any:
        swap = self.by_out.get(n)
        if swap is not None:
            return self.runner._swapped(swap, self.env, self.dropped)
        if n in self.alias:
            return self.env[self.alias[n]]  # another dequantize of the swapped layer's value
        if n in self.skip:
            return None
        if n in self.dropped:
            return self.env[self.dropped[n]]  # an edge only float layers asked to quantize
        value = super().run_node(n)
        if self.runner.watch is not None:
            self.runner._watched(n, value, self.env)
        return value


def _modules_called(gm: fx.GraphModule, calls: nn.Module | None) -> dict[str, nn.Module] | None:
    """The modules ``gm``'s graph calls, read from ``calls`` now, before :func:`assemble` puts
    the region itself in place of one of them (a leaf module kept whole)."""
    if calls is None:
        return None
    return {str(n.target): calls.get_submodule(str(n.target))
            for n in gm.graph.nodes if n.op == "call_module"}


class _Interpreted(nn.Module):
    """A region run by an interpreter: what :func:`assemble` puts in the region's place."""

    def __init__(self, make: Any, gm: fx.GraphModule) -> None:
        super().__init__()
        object.__setattr__(self, "_make", make)
        object.__setattr__(self, "_graph", gm.graph)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._make().run(*_bind(self._graph, args, kwargs))


class HybridRunner:
    """Builds and runs hybrids of a float model and one or more quantized variants of it.

    :meth:`swaps` says what replacing a layer takes; :meth:`model` assembles a hybrid model
    from swaps (run it like the user's model: a batch may be a tensor, a tuple or a dict of
    keyword inputs); :meth:`probe` runs the quantized models on a batch, recording the qparams
    that float values entering a quantized graph are quantized with. Nothing here modifies
    the user's models: regions call the models' own modules, in eval mode.

    Args:
        matching: the float model's matching with its quantized model, or
            ``{variant name: matching}`` for several quantized variants of one float model
            (the first one's float graphs are the base every float-based hybrid runs on;
            the others' swaps are translated onto them by node name). Layers are named as
            in the first matching; :meth:`layer_of` finds a variant's name for a layer.
    """

    def __init__(self, matching: Matching | dict[str, Matching]) -> None:
        self.variants = (dict(matching) if not isinstance(matching, Matching)
                         else {"quantized": matching})
        if not self.variants:
            raise InstrumentationError("no quantized variant to build hybrids from")
        self.matching = next(iter(self.variants.values()))
        self.layers, self.unplaced = _every_layer(self.matching, self.variants)
        # what a caller may name: the layers, and the modules kept whole around some of them
        self.swappable = set(self.layers) | set(layer_names(self.matching, containers=True))
        self._swaps: dict[tuple[str, str, str], tuple[Swap, ...]] = {}
        # what each pair of each variant reads where the models differ, as its shadow does
        # (StandIns: one derivation for both)
        self._stand_ins = {(region, pair): stand_ins(region, pair)
                           for m in self.variants.values() for region in m.regions
                           for pair in region.pairs}
        # {op: ops only the quantized model has whose values it reads}, every variant's, in
        # graph order: every hybrid keeps those ops, and their error
        self.strays: dict[str, tuple[str, ...]] = {}
        # of those, the ops whose input is rounded on the unpaired op's output grid: a layer
        # quantized alone in the float model reads its float input on that grid, calibrated
        # for other values (a `* 0.5` halves the range: the relu clipped at half)
        self.stray_grids: set[str] = set()
        for (region, pair), found in self._stand_ins.items():
            if found.strays:
                qv = region.quant_view
                self.strays[op_name(pair.name)] = tuple(
                    carried_op(qv, v).name for v in found.strays.values())
                if any(_rounded_by_stray(qv, v) for v in found.strays.values()):
                    self.stray_grids.add(op_name(pair.name))
        self._held: dict[fx.Node, tuple[Any, ...]] = {}
        self._float_regions = {r.float_path: r for r in self.matching.regions}
        self._owner = {r: m for m in self.variants.values() for r in m.regions}
        self._paths: dict[str, dict[str, str]] = {}
        # one interpreter per graph a swap runs nodes of: making one reads the whole model's
        # modules and graph, a third of advise's time on inception_v3 when made per swap
        self._swap_runners: dict[fx.GraphModule, _RegionInterpreter] = {}
        self._owned: dict[Region, bool] = {}
        # while a :meth:`watched` model runs: the layers (module paths) whose quantized op
        # made NaN/Inf from finite inputs, in the order met; None: nothing is watched
        self.watch: dict[str, None] | None = None
        self._quant_layers: dict[fx.Node, str] | None = None

    def layer_of(self, name: str, variant: str) -> str | None:
        """Variant ``variant``'s name for layer ``name`` (the one computing the same float
        module), or ``None`` when that variant does not quantize it."""
        if variant not in self._paths:
            m = self.variants[variant]
            self._paths[variant] = {module_path(m, n): n
                                    for n in layer_names(m, containers=True)}
        found = self._paths[variant].get(module_path(self.matching, name))
        return found if found is not None else None

    # ------------------------------------------------------------------ building swaps
    def swaps(self, name: str, base: str, variant: str | None = None) -> tuple[Swap, ...]:
        """The swaps that replace layer ``name`` (every call site of it) in the ``base`` graph.

        ``variant`` (default: the first) is the quantized model the swap reads; a ``"quant"``
        base is that variant's own graph, a ``"float"`` base the first variant's float graph.

        Raises:
            InstrumentationError: no such layer, or its subgraph reads a value the other
                graph does not carry before the layer.
        """
        variant = variant or next(iter(self.variants))
        key = (name, base, variant)
        if key not in self._swaps:
            local = self.layer_of(name, variant) if name in self.swappable else None
            pairs = _call_sites(self.variants[variant], local) if local else []
            if not pairs:
                raise InstrumentationError(
                    f"no layer is named {name!r}"
                    + (f" in variant {variant!r}" if len(self.variants) > 1 else "")
                    + f"; layers are: {', '.join(self.layers[:20])}"
                )
            self._swaps[key] = self._made(pairs, base, variant)
        return self._swaps[key]

    def op_swaps(self, name: str, variant: str) -> tuple[Swap, ...]:
        """The swaps that take op ``name``, as ``variant``'s own matching names it (a layer,
        or an op the matching does not count as one, such as an average pool FX runs on
        quantized values), from ``variant`` into the float base.

        Raises:
            InstrumentationError: as :meth:`swaps`.
        """
        key = (f"op:{name}", "float", variant)
        if key not in self._swaps:
            pairs = _call_sites(self.variants[variant], name)
            if not pairs:
                raise InstrumentationError(f"variant {variant!r} has no op named {name!r}")
            self._swaps[key] = self._made(pairs, "float", variant)
        return self._swaps[key]

    def _made(self, pairs: list[Pair], base: str, variant: str) -> tuple[Swap, ...]:
        made = [self._swap(self.variants[variant].region_of(p), p, base) for p in pairs]
        if base == "float" and variant != next(iter(self.variants)):
            made = [self._onto_float_base(swap, variant) for swap in made]
        return tuple(made)

    def hands_on_quantized(self, variant: str, name: str) -> bool:
        """Whether op ``name`` of ``variant``'s matching hands on a quantized tensor in that
        variant's run of the last :meth:`probe` (a static flow's quantized ``add``, or the
        average pool FX runs on quantized values, which rounds its output to its input's
        grid), or quantizes its output itself (pt2e: ``op -> quantize -> dequantize``), or is
        a quantized op reading a quantized value (a pt2e conv whose relu's output is quantized);
        not a torchao or dynamic layer, which reads and hands on float tensors."""
        matching = self.variants[variant]
        for pair in _call_sites(matching, name):
            region = matching.region_of(pair)
            chain = region.chain(pair, "quant")
            cls = region.quant_view.op_class(chain[-1])
            if cls is None or cls.role != "op":
                continue
            if (chain[-1] in self._held
                    or quantized_edge(region.output_nodes(pair)[1]) is chain[-1]
                    or pair.quantized and any(i in self._held or quantized_edge(i) is not None
                                              for i in chain[0].all_input_nodes)):
                return True
        return False

    def _onto_float_base(self, swap: Swap, variant: str) -> Swap:
        """``swap``, made on ``variant``'s own float graph, with its float nodes those of the
        first variant's float graph (the base every float-based hybrid runs on)."""
        base = self._float_regions.get(swap.region.float_path)
        view = base.float_view if base is not None else None

        def node(n: fx.Node) -> fx.Node:
            if view is None or not view.has_node(n.name):
                raise InstrumentationError(
                    f"variant {variant!r}: the float graph at "
                    f"`{swap.region.float_path or '<root>'}` is not the one the first variant "
                    f"was paired on (no node `{n.name}`); match every variant against the same "
                    "float model"
                )
            return view.node(n.name)

        return Swap(swap.name, swap.base, swap.region, frozenset(map(node, swap.skip)),
                    node(swap.out), swap.nodes,
                    tuple((ext, node(provider)) for ext, provider in swap.inputs),
                    swap.other_out, swap.cloned, frozenset(map(node, swap.aliases)),
                    base_region=base, pattern_edges=swap.pattern_edges)

    def _swap(self, region: Region, pair: Pair, base: str) -> Swap:
        other = "float" if base == "quant" else "quant"
        base_v, other_v = region.view(base), region.view(other)
        base_chain, other_chain = region.chain(pair, base), region.chain(pair, other)
        other_inside = other_v.with_plumbing(other_chain)
        base_inside = base_v.with_plumbing(base_chain)
        other_out, out = other_chain[-1], base_chain[-1]
        # where the quantized graph quantizes the layer's output itself (reference FX, pt2e:
        # op -> quantize -> dequantize), the layer ends after that
        tail = _output_tail(region, pair)
        owned = self._annotated(region)
        edge = quantized_edge(tail[-1]) if tail and owned else None
        if edge is not None and _readers_ask(tail[-1], edge) and (base == "quant"
                                                                  or not output_wanted(edge)):
            # pt2e: the quantize after the layer is its readers' (their input annotation): it
            # stays where it is, on the layer's float output, and the readers keep it
            # (:class:`_SwapInterpreter` drops it for those kept float too)
            tail = []
        aliases: frozenset[fx.Node] = frozenset()
        if tail and base == "float":
            other_inside, other_out = other_inside + tail, tail[-1]
        elif tail:
            base_inside, out = base_inside + tail, tail[-1]
            if len(tail) > 1:
                aliases = frozenset(u for u in tail[-2].users
                                    if u is not out and is_dequantize(base_v, u))
        other_inside = _with_constants(other_v, other_inside)
        # the plumbing in front of the layer runs again on the value it carries: into a float
        # base, the quantized model's own quantize (and dequantize) nodes, so the inputs get
        # exactly its qparams; into a quantized base, the float graph's views, transposes and
        # .contiguous() (a channel shuffle's view reads a contiguous tensor, not the
        # transposed one the quantized side carries)
        path = _quantize_path if base == "float" else _layout_path
        layer = set(other_inside)
        around, pattern_edges = set(other_inside), []
        for e in _external_inputs(other_inside):
            if owned and base == "float" and _not_asked_by(e, layer):
                anchor = _pattern_edge(e, layer)
                if anchor is None:
                    continue  # another layer's quantize: a layer quantized alone reads float
                pattern_edges.append((e, anchor))
            around.update(path(other_v, e))
        around |= _qparams_of(around)  # a dynamic quantize's scale and zero point, computed
        other_inside = _with_constants(other_v, sorted(around, key=other_v.position))
        inputs = []
        # the quantized layer reads the value of an op the float model does not have (a
        # `* 0.5` after a paired relu): the float layer swapped in reads it too, and the
        # quantized one swapped into the float model reads what its float twin reads
        strays = self._stand_ins[(region, pair)].strays
        for ext in _external_inputs(other_inside):
            provider = _provider(region, ext, base, base_inside, strays)
            if provider is None or base_v.position(provider) >= base_v.position(out):
                side = "float" if base == "quant" else "quantized"
                raise InstrumentationError(
                    f"layer `{op_name(pair.name)}`: the {side} subgraph reads `{ext.name}`, which "
                    "has no counterpart before the layer in the other model, so the layer cannot "
                    "be swapped. Leave it out of the search (see Matching.explain)."
                )
            inputs.append((ext, provider))
        inside = set(other_inside)
        attrs = {i for n in other_inside for i in n.all_input_nodes if i.op == "get_attr"}
        other_inside = sorted(inside | attrs, key=other_v.position)  # constants read on demand
        modules = other_v.modules
        cloned = frozenset(
            ext for ext, _ in inputs
            if any(u in inside and writes_first_input(u, modules) and u.args[0] is ext
                   for u in ext.users)
        )
        return Swap(op_name(pair.name), base, region, _skipped(base_inside, out, aliases), out,
                    tuple(other_inside), tuple(inputs), other_out, cloned, aliases,
                    pattern_edges=tuple(pattern_edges))

    # ------------------------------------------------------------------ models
    def model(self, base: str, swaps: Iterable[Swap], every_region: bool = False
              ) -> nn.Module:
        """The ``base`` model (``"float"`` or ``"quant"``) with ``swaps`` applied.

        Regions without a swap run as the model's own modules (or, with ``every_region``, on
        an interpreter too: :meth:`made_nonfinite` watches each op); the others on an
        interpreter. Build it once, run it on every batch (after :meth:`probe` of that
        batch when a swap crosses into the quantized graph).
        """
        by_region: dict[Region, list[Swap]] = {}
        for swap in swaps:
            by_region.setdefault(swap.base_graph, []).append(swap)
        owners = {self._owner[r] for r in by_region}
        if len(owners) > 1:
            raise InstrumentationError("a quantized base is one variant: its swaps must come "
                                       "from that variant's own matching")
        matching = owners.pop() if owners else self.matching
        return assemble(matching, base, {
            region: self._build(region, base, tuple(by_region.get(region, ())))
            for region in (matching.regions if every_region else by_region)
        })

    def made_nonfinite(self, base: str, swaps: Iterable[Swap], batch: Any) -> list[str]:
        """The layers (module paths) whose quantized ops, in the ``base`` model with ``swaps``
        applied, output NaN/Inf on ``batch`` from finite inputs, in the order they run.

        Every region runs on an interpreter that checks each quantized op's output (and, where
        it is not finite, its inputs): the error path of a search whose hybrid gave NaN/Inf
        where the float model did not, not the hybrids' own runs.
        """
        model = self.model(base, swaps, every_region=True)
        self.watch = {}
        try:
            self.run(model, batch)
        except (HybridFailure, InputError):
            pass  # an op refused the NaN/Inf: what ran before it was watched
        finally:
            found, self.watch = list(self.watch), None
        return found

    def _watched(self, node: fx.Node, value: Any, env: dict[fx.Node, Any]) -> None:
        """Note the layer of quantized op ``node`` if its output ``value`` holds NaN/Inf
        and the inputs it read (in ``env``) do not."""
        if self._quant_layers is None:
            self._quant_layers = {
                n: module_path(m, op_name(pair.name))
                for m in self.variants.values() for region in m.regions
                for pair in region.pairs for n in region.chain(pair, "quant")}
        layer = self._quant_layers.get(node)
        if (layer is None or self.watch is None or layer in self.watch
                or not _holds_nonfinite([value])):
            return
        if not _holds_nonfinite(env.get(i) for i in node.all_input_nodes):
            self.watch[layer] = None

    def _build(self, region: Region, base: str, swaps: tuple[Swap, ...]) -> Any:
        gm = region.view(base).gm
        if base == "quant":
            dropped = _dropped_edges(gm.graph, swaps) if self._annotated(region) else {}
        else:  # the edges of a fused pattern whose first op is not swapped in carry float
            swapped = frozenset().union(*(s.nodes for s in swaps))
            dropped = {dequantize: quantized_edge(dequantize) for s in swaps
                       for dequantize, anchor in s.pattern_edges if anchor not in swapped}

        def build(calls: nn.Module | None) -> nn.Module:
            modules = _modules_called(gm, calls)
            return _Interpreted(lambda: _SwapInterpreter(gm, modules, swaps, self, dropped), gm)

        return build

    def _annotated(self, region: Region) -> bool:
        """Whether the region's quantized graph says whose each quantize is (pt2e)."""
        found = self._owned.get(region)
        if found is None:
            found = self._owned[region] = annotated(region.quant_view.gm.graph)
        return found

    def probe(self, batch: Any) -> Any:
        """Run each quantized variant on ``batch``, recording the qparams of its quantized
        values (what float values crossing into a quantized graph are quantized with); return
        the first variant's output.

        Static quantization fixes its qparams, so one batch tells them all.
        """
        self._held = {}

        def build(region: Region) -> Any:
            gm = region.quant_view.gm

            def make(calls: nn.Module | None) -> nn.Module:
                modules = _modules_called(gm, calls)
                return _Interpreted(lambda: _Recorder(gm, modules, self._held), gm)

            return make

        outputs = [self.run(assemble(m, "quant", {r: build(r) for r in m.regions}), batch,
                            "quantized") for m in self.variants.values()]
        return outputs[0]

    def run(self, model: nn.Module, batch: Any, which: str = "hybrid") -> Any:
        """Run a hybrid (or reference: ``which="float"``) model on ``batch``.

        Raises:
            HybridFailure: an op of a hybrid failed, a graph node or a module the model's own
                code calls (naming it); the caller names the layers swapped.
            InputError: the model rejected the batch.
        """
        try:
            return run_model(model, batch, which=which)
        except _NodeFailure as failure:
            hint = precision_hint(failure.__cause__)
            if which in ("float", "quantized"):  # nothing swapped: the model itself failed
                raise InputError(
                    f"the {which} model failed on the input at {node_site(failure.node)}: "
                    f"{failure.message}\nCheck that the model runs on this batch outside "
                    "fxnumeric (its weights, its input shape and dtype): no layer was swapped."
                    + (f" {hint}" if hint else "")
                ) from failure.__cause__
            raise HybridFailure(node_site(failure.node), failure.message,
                                failure.nonfinite, hint) from failure.__cause__
        except InputError as error:
            # a module the model's own code calls raised (a module-tree capture: no
            # interpreter runs it), which run_model reads as the input's fault; the float
            # and quantized models ran on this input, so in a hybrid it is the hybrid's
            raised = _raising_module(model, error.__cause__) if which == "hybrid" else None
            if raised is None:
                raise
            path, nonfinite = raised
            raise HybridFailure(f"module `{path}`", _first_line(error.__cause__),
                                nonfinite) from error.__cause__

    def captured(self, side: str, variant: str | None = None) -> nn.Module:
        """``side``'s model as captured (the reference of every hybrid); ``"quant"`` is the
        first variant's unless ``variant`` names another."""
        return captured_model(self.variants[variant] if variant else self.matching, side)

    # ------------------------------------------------------------------ running a swap
    def _swapped(self, swap: Swap, env: dict[fx.Node, Any],
                 dropped: dict[fx.Node, fx.Node] | None = None) -> Any:
        """The value of ``swap``'s subgraph, on the base graph's values ``env``; an edge of
        ``dropped`` (``{dequantize: value}``) carries its value float."""
        dropped = dropped or {}
        region, other = swap.region, swap.other
        gm = region.view(other).gm
        runner = self._swap_runners.get(gm)
        if runner is None:
            runner = self._swap_runners[gm] = _RegionInterpreter(gm, None)
        runner.env = {}  # the values of this swap only (run_node reads them from here)
        for ext, provider in swap.inputs:
            value = dequantize_all(env[provider])
            if ext in swap.cloned and isinstance(value, torch.Tensor):
                value = value.clone()
            runner.env[ext] = value if other == "float" else self._into_quant(region, value, ext)
        for node in swap.nodes:
            runner.env[node] = (runner.env[dropped[node]] if node in dropped
                                else runner.run_node(node))
            if self.watch is not None and node not in dropped:
                self._watched(node, runner.env[node], runner.env)
        # float on either base: into a quantized base, the quantized readers requantize it
        # as they read it (:class:`_SwapInterpreter`), the float ones read it as it is
        value = dequantize_all(runner.env[swap.other_out])
        return _as_read(value, swap.base_graph.view(swap.base), swap.out, swap.other_out)

    def _into_quant(self, region: Region, value: Any, node: fx.Node,
                    qparams_at: fx.Node | None = None) -> Any:
        """Float ``value`` as the quantized graph holds it at ``node``: quantized with the
        qparams of the quantized model's tensor there (recorded by :meth:`probe`), or of
        ``qparams_at``'s when given (a fixed-qparams reader's: :func:`_requantize_plan`); if
        ``node`` is a ``dequantize`` (reference FX), quantized with the qparams before it,
        then dequantized."""
        if isinstance(value, (tuple, list)):
            return self._items_into_quant(region, value, node)
        view = region.quant_view
        cur, behind = node, False
        while cur not in self._held:
            cls = view.op_class(cur)
            if cls is None or cls.role != "plumbing" or not cur.all_input_nodes:
                return value
            cur, behind = cur.all_input_nodes[0], True
        if not isinstance(value, torch.Tensor):
            return value
        qparams = self._held.get(qparams_at) if qparams_at is not None else None
        quantized = _quantize(value, qparams or self._held[cur])
        return quantized.dequantize() if behind else quantized

    def _items_into_quant(self, region: Region, value: tuple | list, node: fx.Node) -> Any:
        """A float tuple (a static quantized LSTM's ``(y, (h, c))``) as the quantized graph
        holds it: each item the graph reads (``node[i]``) quantized as the quantized model's
        item there; items it does not read are left as they are."""
        items = list(value)
        for user in node.users:
            if (user.op == "call_function" and user.target is operator.getitem
                    and user.args[0] is node and isinstance(user.args[1], int)
                    and -len(items) <= user.args[1] < len(items)):
                items[user.args[1]] = self._into_quant(region, items[user.args[1]], user)
        return type(value)(items) if not hasattr(value, "_fields") else type(value)(*items)


# Kinds whose module form nests what their function form returns flat, from which item on:
# ``nn.LSTM`` (float or dynamic quantized, a call_module) returns ``(y, (h, c))``, the
# ``aten.lstm`` of an exported graph ``(y, h, c)``. GRU and RNN return ``(y, h)`` and the
# cells ``(h, c)`` or ``h`` in both forms.
_NESTED_FROM = {"lstm": 1}


def _as_read(value: Any, base_view: Any, out: fx.Node, other_out: fx.Node) -> Any:
    """``value``, computed by the other graph's ``other_out``, in the structure the base
    graph's readers of ``out`` index: an exported float graph's ``getitem(lstm, 2)`` reads
    ``c`` from aten.lstm's flat tuple, and a dynamic ``nn.LSTM`` swapped in its place gave
    ``(y, (h, c))``, two items (IndexError); the other way round, ``getitem(lstm, 1)`` of the
    module read ``h`` where it wanted ``(h, c)``."""
    cls = base_view.op_class(out)
    start = _NESTED_FROM.get(cls.signature[-1]) if cls is not None else None
    nested = out.op == "call_module"
    if start is None or nested == (other_out.op == "call_module") or not isinstance(
            value, (tuple, list)):
        return value
    if nested:
        return (*value[:start], tuple(value[start:]))
    return (*value[:start], *value[start])


# ---------------------------------------------------------------- what a swap reads


def _skipped(inside: list[fx.Node], out: fx.Node, aliases: frozenset[fx.Node]
             ) -> frozenset[fx.Node]:
    """The nodes of a layer's base subgraph ``inside`` that need not run when the swap
    provides ``out``'s value (and its ``aliases'``): those nothing outside reads. Plumbing
    that other layers read too still runs: an exported BERT builds its attention mask once
    (``where``, ``expand`` ...) and every layer's ``add`` reads it, so skipping it with one
    layer's ``add`` left the next layer's ``None``."""
    kept = set(inside)
    changed = True
    while changed:
        changed = False
        for node in list(kept):
            if node is not out and any(u not in kept and u not in aliases for u in node.users):
                kept.discard(node)  # read outside: it runs, and so does what it reads
                changed = True
    return frozenset(kept)


def _external_inputs(inside: list[fx.Node]) -> list[fx.Node]:
    """Nodes outside ``inside`` that it reads (get_attr excepted), in first-use order."""
    members = set(inside)
    out: list[fx.Node] = []
    for node in inside:
        for i in node.all_input_nodes:
            if i not in members and i.op != "get_attr" and i not in out:
                out.append(i)
    return out


def _computes_constant(node: fx.Node, known: dict[fx.Node, bool]) -> bool:
    """Whether ``node`` computes from ``get_attr`` constants only (no input), remembered in
    ``known``; walked with a stack, as :func:`fxnumeric.semantics.evaluate_constant` is: a
    recursion as deep as the graph overflowed Python's stack."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in known:
            stack.pop()
        elif n.op in ("placeholder", "output", "get_attr"):
            known[stack.pop()] = n.op == "get_attr"
        elif any(known.get(i) is False for i in n.all_input_nodes):
            known[stack.pop()] = False
        elif pending := [i for i in n.all_input_nodes if i not in known]:
            stack.extend(pending)
        else:
            known[stack.pop()] = True
    return known[node]


def _with_constants(view: Any, inside: list[fx.Node]) -> list[fx.Node]:
    """``inside`` plus the outside nodes it reads that compute from constants only (a pt2e
    weight's ``dequantize`` of its int8 parameter), in graph order."""
    members = set(inside)
    known: dict[fx.Node, bool] = {}
    todo = [n for n in _external_inputs(inside) if _computes_constant(n, known)]
    while todo:
        node = todo.pop()
        if node not in members:
            members.add(node)
            todo += [i for i in node.all_input_nodes if i.op != "get_attr"]
    return sorted(members, key=view.position)


def _quantize_path(view: Any, node: fx.Node) -> list[fx.Node]:
    """The quantize and plumbing nodes from quantized ``node`` back to the op (or input) whose
    value they carry, ``node`` included; empty if ``node`` is that op."""
    return _path_back(view, node, ("plumbing", "optional"))


def _layout_path(view: Any, node: fx.Node) -> list[fx.Node]:
    """The function and method plumbing (views, transposes, ``.contiguous()``) from ``node``
    back to the value it reshapes, ``node`` included; modules (a ``QuantStub``, a dropout)
    and inputs end it, as they change no layout."""
    return _path_back(view, node, ("plumbing",), ops=("call_function", "call_method"))


def _qparams_of(nodes: set[fx.Node]) -> set[fx.Node]:
    """The nodes that compute the qparams a quantize in ``nodes`` reads from its input (pt2e's
    dynamic quantization: ``choose_qparams`` and the ``getitem`` of its scale and zero point):
    they run again on the value the quantize reads, not taken from the other graph."""
    found: set[fx.Node] = set()
    for n in nodes:
        for i in n.all_input_nodes:
            source = i.args[0] if i.target is operator.getitem and i.args else None
            if (i not in nodes and isinstance(source, fx.Node) and source.op == "call_function"
                    and "choose_qparams" in str(source.target)):
                found |= {i, source}
    return found


def _path_back(view: Any, node: fx.Node, roles: tuple[str, ...],
               ops: tuple[str, ...] | None = None) -> list[fx.Node]:
    """``node`` and the nodes behind it, through each one's first input, while they are of
    ``roles`` (and of ``ops``, when given) and read no constant first."""
    path: list[fx.Node] = []
    while node.all_input_nodes and node.all_input_nodes[0].op != "get_attr":
        cls = view.op_class(node)
        if cls is None or cls.role not in roles or (ops is not None and node.op not in ops):
            break
        path.append(node)
        node = node.all_input_nodes[0]
    return path


def _output_tail(region: Region, pair: Pair) -> list[fx.Node]:
    """The quantized nodes from the pair's last op to its value node, in order (or none).

    None for a layer left in float whose value is handed on through the quantize in front of
    its quantized readers (:meth:`Region.output_nodes`): in a hybrid that quantize is its
    readers', which quantize what they read, swapped or not."""
    last = region.chain(pair, "quant")[-1]
    node = region.output_nodes(pair)[1]
    if not pair.quantized and not region.quant_view.fake_quantizes(node):
        return []
    tail: list[fx.Node] = []
    while node is not last and node.all_input_nodes:
        tail.append(node)
        node = node.all_input_nodes[0]
    return list(reversed(tail)) if node is last else []


def _provider(region: Region, other_node: fx.Node, base: str,
              replaced: Iterable[fx.Node] = (),
              strays: dict[fx.Node, fx.Node] | None = None) -> fx.Node | None:
    """The base-graph node that carries the value ``other_node`` holds in its own graph.

    Into a quantized base, a float input comes from the quantized node computing the same
    value: a pair's own output, else the earliest carrier (a model input rather than the
    quantize in front of one layer, as in a model re-quantized with that layer float). Of a
    pt2e value's dequantizes, the one the swapped layer's nodes ``replaced`` read
    (:func:`_own_edge`).

    ``strays`` (:attr:`fxnumeric.instrument.graph.StandIns.strays`): where the quantized layer
    reads the value of an op the float model does not have in place of its float twin's
    input, a float layer swapped into the quantized model reads that value, as a layer
    swapped by hand into the quantized model does (fed the counterpart of its float input,
    it skipped that op: a hybrid read 51 dB whose hand-built twin reads 21); a quantized
    layer swapped into the float model reads its float twin's input, there being no such
    op there.
    """
    strays = strays or {}
    if base == "quant":  # other = float
        carrier = region.float_view.producer(other_node)
        if carrier is None:
            return None
        if carrier in strays:
            return strays[carrier]
        pair = region.pair_of(carrier)
        if pair is not None and region.chain(pair, "float")[-1] is carrier:
            # a quantized layer's output as the next op reads it (after its own quantize in
            # reference FX and pt2e); a float op's own output, not the quantize FX puts in
            # front of the next layer
            return _own_edge(region.output_nodes(pair)[1], replaced) if pair.quantized else (
                region.chain(pair, "quant")[-1])
        return region.quant_counterpart(carrier)
    qv = region.quant_view
    producer = qv.producer(other_node)
    for float_node, stray in strays.items():
        if producer is not None and producer in (stray, qv.producer(stray),
                                                 carried_op(qv, stray)):
            return float_node
    return region.float_counterpart(producer) if producer is not None else None


def _rounded_by_stray(view: Any, value: fx.Node) -> bool:
    """Whether quantized ``value``, the value of an op the float model lacks, is on a static
    grid of that op's: a pt2e dequantize of a static quantize, or a torch quantized op's
    output (its own scale)."""
    cls = view.op_class(value)
    if cls is not None and cls.is_dequantize:
        return not any(view.is_dynamic_quantize(q) for q in value.all_input_nodes)
    op = carried_op(view, value)
    return view.op_class(op) is not None and view.op_class(op).quantized


def _own_edge(dequantize: fx.Node, readers: Iterable[fx.Node]) -> fx.Node:
    """The dequantize of the edge ``value -> quantize -> dequantize`` that one of ``readers``
    reads, else ``dequantize`` itself.

    convert_pt2e gives each reader of a quantized value a dequantize of its own, and the
    matching logs one of them: another reader's, maybe (fc's next call, where ``cat`` reads
    the same output). A layer kept float reads its own edge, which :class:`_SwapInterpreter`
    passes on float when only float layers asked for it; the sibling's edge stays quantized.
    """
    value = quantized_edge(dequantize)
    if value is None:
        return dequantize
    for reader in readers:
        for node in reader.all_input_nodes:
            if quantized_edge(node) is value:
                return node
    return dequantize


# ops FX quantizes with fixed qparams, and those qparams (scale, zero point), as torch.ao's
# backend configs constrain them (``_FIXED_QPARAMS_OP_TO_CONSTRAINTS``): their qconfig's
# activation is a FixedQParamsObserver, the observer FX puts on their input too
_FIXED_QPARAMS: dict[str, tuple[float, int]] = {
    "sigmoid": (1 / 256, 0), "hardsigmoid": (1 / 256, 0), "softmax": (1 / 256, 0),
    "tanh": (2 / 256, 128),
}


def _requantize_plan(region: Region, node: fx.Node, skipped: frozenset[fx.Node],
                     held: dict[fx.Node, Any]) -> dict[fx.Node, fx.Node]:
    """``{reader: node whose qparams it reads with}`` for the readers of float layer output
    ``node`` that read it as a quantized tensor (:func:`_quantized_reader`), and the output
    of a region inside the model (the module around it reads what the quantized layer
    handed it); the others (a float op, another layer kept float, the model output) read it
    float.

    This is what a model re-quantized with the layer float computes: FX puts an observer in
    front of each quantized reader, the reader's own qconfig's activation. For most readers
    it is the observer type the layer's output had, calibrated on the same values, so the
    layer's own qparams (``node``); for a fixed-qparams op (a ``sigmoid``, ``tanh``,
    ``hardsigmoid``) it is a FixedQParamsObserver, the same one as on the op's output, so
    the op's own output qparams (``sigmoid``'s scale 1/256, zero point 0).
    """
    view = region.quant_view
    plan: dict[fx.Node, fx.Node] = {}
    for user in node.users:
        if user.op == "output" and region.quant_path:
            # handed to the code of the module around the region (a module torch.fx cannot
            # trace), whose next layer reads a quantized tensor from this one: a float value
            # there crashed a QFunctional's add ("aten::qscheme" on a float tensor)
            plan[user] = node
        if user in skipped or user.op == "output":
            continue
        found = _quantized_reader(view, user, node, skipped, held)
        if found is not None:
            plan[user] = _fixed_qparams_at(view, found, held) or node
    return plan


def _fixed_qparams_at(view: Any, node: fx.Node, held: dict[fx.Node, Any]) -> fx.Node | None:
    """If ``node`` is an op FX quantized with fixed qparams, the node holding them: ``node``
    itself (a quantized ``sigmoid``), or the quantize after it (reference FX: ``dequantize ->
    sigmoid -> quantize``). An op of that kind whose output carries other qparams is not one:
    a float ``sigmoid`` whose reader quantized its output with a calibrated observer."""
    cls = view.op_class(node)
    if cls is None or len(cls.signature) != 1:
        return None
    fixed = _FIXED_QPARAMS.get(cls.signature[0])
    if fixed is None:
        return None
    for at in (node, *node.users):
        qparams = held.get(at)
        if (qparams is not None and qparams[0] == "tensor" and (qparams[1], qparams[2]) == fixed
                and (at is node or getattr(view.op_class(at), "is_quantize", False))):
            return at
    return None


def _quantized_reader(view: Any, user: fx.Node, via: fx.Node, skipped: frozenset[fx.Node],
                      held: dict[fx.Node, Any]) -> fx.Node | None:
    """The op that reads ``via``'s value as a quantized tensor on the branch starting at its
    reader ``user`` (through plumbing and float-capable ops), or ``None``.

    A float layer's output is requantized only for such a reader: a float reader (another
    layer kept float, a float op, a ``dequantize``, the model output) or one that quantizes it
    itself (FX's ``quantize_per_tensor`` before the next layer) reads it float, as it would
    in a model re-quantized with those layers float. An op that computes in float or
    quantized form alike and ran on quantized values in the quantized model (an average
    pool, a ``mean``) reads it quantized: FX quantizes its input for it when the layer before
    is float. A float-capable op that also reads a quantized value (``torch.cat`` of an
    inception block's branches, one of them kept float) reads it quantized too: it takes no
    mix of the two.
    """
    todo = [(user, via)]
    seen: set[fx.Node] = set()
    while todo:
        user, via = todo.pop()
        if user in seen or user.op == "output" or user in skipped:
            continue
        seen.add(user)
        cls = view.op_class(user)
        if cls is None or cls.quantized or _fixed_qparams_at(view, user, held) is not None:
            return user  # a fixed-qparams op of reference FX computes on dequantized values
        if cls.role == "optional" or is_dequantize(view, user):
            continue  # it quantizes (FX's quantize_per_tensor) or dequantizes by itself
        if cls.role == "op" and user in held:
            # a float-capable op the quantized model ran on quantized values (a pool, a
            # mean): a model re-quantized with the layer float quantizes its input for it
            return user
        if any(_still_quantized(view, other, skipped, held)
               for other in user.all_input_nodes if other is not via):
            return user
        todo.extend((after, user) for after in user.users)  # plumbing, float-capable ops
    return None


def _still_quantized(view: Any, node: fx.Node, skipped: frozenset[fx.Node],
                     held: dict[fx.Node, Any]) -> bool:
    """Whether ``node``'s value is a quantized tensor in the hybrid: it was in the quantized
    model's run (``held``, :meth:`HybridRunner.probe`) and is not, through plumbing, the
    output of a layer swapped to float."""
    while node not in skipped:
        cls = view.op_class(node)
        if cls is None or cls.role != "plumbing" or not node.all_input_nodes:
            return node in held
        node = node.all_input_nodes[0]
    return False


# ---------------------------------------------------------------- whose quantize (pt2e)


def _readers_ask(dequantize: fx.Node, value: fx.Node) -> bool:
    """Whether a reader of the edge ``value -> quantize -> dequantize`` (through any of the
    quantize's dequantizes) asked for it: its input is annotated (X86InductorQuantizer
    quantizes a Linear's input, not the op before it)."""
    return any(input_wanted(reader, value)
               for each in dequantize.args[0].users for reader in each.users)


def _not_asked_by(node: fx.Node, layer: set[fx.Node]) -> bool:
    """Whether the quantize edge ending at ``node`` is another's: an annotation asked for it
    (its producer's output, a reader's input), but no op of ``layer`` reading it, nor a
    reader whose fused pattern ``layer`` holds (:func:`pattern_anchor`: an X86 conv's residual
    add). A layer quantized alone reads that value float, as a model re-quantized with only
    that layer would."""
    value = quantized_edge(node)
    return (value is not None and _edge_kept(node, value, frozenset())
            and not any(input_wanted(reader, value) and pattern_anchor(reader) in layer
                        for reader in node.users if reader in layer))


def _pattern_edge(node: fx.Node, layer: set[fx.Node]) -> fx.Node | None:
    """The first op of the fused pattern (outside ``layer``) for which an op of ``layer``
    asks for the quantize edge ending at ``node``: X86's conv + add (+ relu) annotates the
    residual input's quantize on the ``add``, for the conv's pattern. A float-based hybrid
    swapping the add in reads the residual quantized when it swaps that conv in too, float
    when not (:func:`_edge_kept`). ``None`` when no op of ``layer`` asks for it so."""
    value = quantized_edge(node)
    if value is None:
        return None
    for reader in node.users:
        if reader in layer and input_wanted(reader, value):
            anchor = pattern_anchor(reader)
            if anchor not in layer:
                return anchor
    return None


def _edge_kept(dequantize: fx.Node, value: fx.Node, floated: frozenset[fx.Node]) -> bool:
    """Whether a model re-quantized with the ops ``floated`` left out has the edge ``value ->
    quantize -> dequantize``: its producer or a reader not left out asked for it. An
    annotation belongs to its fused pattern (:func:`pattern_anchor`): the pattern's first op
    left out leaves it out (an X86 conv float, its residual add reads the residual float), and
    another op of the pattern left out alone changes nothing, as no quantizer can leave it
    out alone."""
    return (output_wanted(value) and pattern_anchor(value) not in floated) or any(
        input_wanted(reader, value) and pattern_anchor(reader) not in floated
        for reader in dequantize.users)


def _dropped_edges(graph: fx.Graph, swaps: tuple[Swap, ...]) -> dict[fx.Node, fx.Node]:
    """``{dequantize: value}`` for the quantize edges of a pt2e graph that only the layers
    ``swaps`` keep float asked for: in the hybrid they carry ``value`` float. An edge whose
    quantize no annotation explains is kept, as in the quantized model."""
    floated = frozenset().union(*(s.skip for s in swaps), (s.out for s in swaps))
    dropped: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        value = quantized_edge(node)
        if (value is not None and _edge_kept(node, value, frozenset())
                and not _edge_kept(node, value, floated)):
            dropped[node] = value
    return dropped
