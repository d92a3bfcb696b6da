"""Capture a float/quantized pair that torch.fx cannot trace whole: graphs where it can,
the module tree where it cannot.

Both models are walked together from the root. A module is captured as a *region* (a
GraphModule of its own, paired by the graph matcher) when it and its counterpart both trace;
a failure inside one of its submodules keeps that submodule whole, as ``leaf_modules`` would,
and the trace is retried. A module whose own ``forward`` cannot be traced is *kept whole* for
the graph around it, and its children are captured in turn. Leaf modules reached that way
(``nn.Linear``, ``nnqd.Linear``, ``nn.LayerNorm`` ...) pair through the module tree: same
path, or same position and type when the names differ. On a transformers ``BertModel``::

    BertModel                                  own forward untraceable: kept whole, descend
      embeddings (BertEmbeddings)              untraceable: descend
        word_embeddings (Embedding)            leaf: module-tree pair
      encoder.layer.0.attention.self           untraceable: descend
        query (Linear ~ dynamic Linear)        leaf: module-tree pair
      encoder.layer.0.intermediate             traced: region (dense -> gelu, paired as graphs)
      pooler                                   traced: region

A submodule is traced as a region only when it is known how it is called: with example
inputs, one run records every call (tensor arguments become graph inputs, ``None`` ones are
fixed and asserted by torch.fx; a module called with other Python values is descended into
instead); without them, only modules whose ``forward`` takes required arguments alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..metrics import TWIN_WEIGHT_SQNR_DB, sqnr
from ..ops import classify_module
from ..run import buffers_put_back, run_model
from ..weights import module_weight
from .check import check_regions
from .clone import module_tree_copy
from .fx import (
    FUNCTIONAL_METHODS,
    LeafSpec,
    TraceFailure,
    fixed_arguments,
    is_functional,
    is_leaf,
    kwargs_only,
    trace_submodule,
)

__all__ = ["Region", "TreeCapture", "CallSpecs", "record_calls", "capture_tree"]

class CallSpecs(dict[str, dict[str, Any] | None]):
    """Module path -> the arguments to fix when tracing it (``None``: calls that cannot be
    traced), in the order the modules were first called; ``counts``: how many times each
    path's module ran in the recorded forward (a module called twice has two call sites);
    ``sequence``: ``(path, call site)`` of every call, in the order the calls began (where each
    call's rows belong in a report); ``extra_kwargs``: the keyword arguments a module's
    ``**kwargs`` took in that run; ``methods``: for a functional module (``FloatFunctional``,
    whose ops are called through methods: their calls are counted as its calls), the one
    method of :data:`~fxnumeric.capture.fx.FUNCTIONAL_METHODS` it was called through on two
    tensors, or what else it was called through (``"cat"``, ``"add, mul"``)."""

    counts: dict[str, int]
    sequence: tuple[tuple[str, int], ...]
    extra_kwargs: dict[str, tuple[str, ...]]
    methods: dict[str, str]

_MAX_KEPT_WHOLE = 64  # retries per region; each keeps one more failing submodule whole


@dataclass(frozen=True)
class Region:
    """A float submodule and its quantized counterpart, each captured as a graph."""

    float_path: str
    quant_path: str
    float_graph: fx.GraphModule
    quant_graph: fx.GraphModule


@dataclass(frozen=True)
class TreeCapture:
    """What :func:`capture_tree` found, for the matcher to pair.

    Attributes:
        regions: submodule pairs captured as graphs, outermost first (the root's, if the
            root traced once some submodules were kept whole, has paths ``""``).
        leaves: ``(float_path, quant_path)`` of leaf modules paired through the module tree.
        orphans: ``(path, side, reason)`` of submodules with no counterpart on the other side.
        untraced: ``(float_path, reason)`` of modules kept whole whose own code is not
            compared (what they compute between their children has no logger).
        differed: ``(float_path, side, reason)`` of the modules among ``untraced`` that
            torch.fx traced, but whose ``side`` graph (``"float"``, ``"quantized"``) computed
            differently from its forward on the example inputs (:mod:`fxnumeric.capture.check`),
            or wrote into a buffer while tracing, which its graph then lacks.
    """

    regions: tuple[Region, ...]
    leaves: tuple[tuple[str, str], ...]
    orphans: tuple[tuple[str, str, str], ...]
    untraced: tuple[tuple[str, str], ...]
    differed: tuple[tuple[str, str, str], ...] = ()


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path and name else path or name


def _static_spec(module: nn.Module) -> dict[str, Any] | None:
    """Without a recorded call: traceable only if every argument is required."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    plain = all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in params
    )
    return {} if plain else None


def record_calls(model: nn.Module, batch: Any, *, which: str = "model") -> CallSpecs:
    """Run ``model`` once on ``batch`` (on a copy with hooks) and record how each module is called.

    The specs are listed in the order the modules were first called (the order of their
    layers when reports list them).

    Raises:
        InputError: when the model does not run on ``batch``.
    """
    twin = module_tree_copy(model)
    by_module: dict[int, dict[str, Any] | None] = {}
    counts: dict[int, int] = {}
    sequence: list[tuple[int, int]] = []
    extras: dict[int, tuple[str, ...]] = {}

    def remember(module: nn.Module, args: tuple, kwargs: dict) -> None:
        spec = fixed_arguments(module, args, kwargs)
        key = id(module)
        if key in by_module and by_module[key] != spec:
            spec = None  # called in two ways: no single graph fits
        by_module[key] = spec
        sequence.append((key, counts.get(key, 0)))
        counts[key] = counts.get(key, 0) + 1
        extras.setdefault(key, kwargs_only(module, kwargs))

    methods: dict[int, list[str]] = {}

    def method_call(module: nn.Module, method: str) -> Any:
        original = getattr(module, method)

        def call(*args: Any, **kwargs: Any) -> Any:
            two_tensors = (len(args) == 2 and not kwargs
                           and all(isinstance(a, torch.Tensor) for a in args))
            name = method if two_tensors or method not in FUNCTIONAL_METHODS else (
                f"{method} (not on two tensors)")
            if name not in methods.setdefault(id(module), []):
                methods[id(module)].append(name)
            remember(module, (), {})  # counted and ordered as a call of the module
            by_module[id(module)] = None  # a leaf: never traced as a region
            return original(*args, **kwargs)
        return call

    for module in twin.modules():
        module.register_forward_pre_hook(remember, with_kwargs=True)
        if is_functional(module):
            for method in (*FUNCTIONAL_METHODS, "add_scalar", "mul_scalar", "cat"):
                object.__setattr__(module, method, method_call(module, method))
    with buffers_put_back(model):  # shared with the copy: a running average moves once a batch
        run_model(twin, batch, which=which)
    paths: dict[int, list[str]] = {}
    for path, module in twin.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    specs = CallSpecs((path, spec) for key, spec in by_module.items()
                      for path in paths.get(key, ()))
    specs.counts = {path: counts[key] for key in by_module for path in paths.get(key, ())}
    specs.sequence = tuple((path, site) for key, site in sequence for path in paths.get(key, ()))
    specs.extra_kwargs = {path: extras[key] for key in by_module for path in paths.get(key, ())
                          if extras.get(key)}
    specs.methods = {path: ", ".join(names) for key, names in methods.items()
                     for path in paths.get(key, ())}
    return specs


def _compatible(float_module: nn.Module, quant_module: nn.Module) -> bool:
    if type(float_module).__name__ == type(quant_module).__name__:
        return True
    return classify_module(float_module).signature == classify_module(quant_module).signature


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.ModuleDict))


def _owns_weight(module: nn.Module) -> bool:
    """A childless module holding its own ``weight`` (transformers' ``Conv1D``, RMSNorm) is a
    layer: it is kept whole so that it pairs, and its weight compares, as one op."""
    return not module._modules and isinstance(module._parameters.get("weight"), torch.Tensor)


def _weight_layers(module: nn.Module, path: str) -> list[str]:
    return [
        _join(path, name) for name, sub in module.named_modules()
        if name and _owns_weight(sub) and not type(sub).__module__.startswith("torch.")
    ]


class _Walk:
    def __init__(
        self,
        leaf_modules: list[LeafSpec],
        float_calls: CallSpecs | None,
        quant_calls: CallSpecs | None,
        traced: dict[tuple[str, str], tuple[Region, list[str]] | str] | None = None,
        differed: dict[str, str] | None = None,
    ) -> None:
        self.leaf_modules = leaf_modules
        self.calls = {"float": float_calls, "quantized": quant_calls}
        # shared by the walks of one capture: each module pair is traced once, and a graph
        # that computed differently from its module is not taken again
        self.traced = {} if traced is None else traced
        self.differed = {} if differed is None else differed
        self.regions: list[Region] = []
        self.leaves: list[tuple[str, str]] = []
        self.orphans: list[tuple[str, str, str]] = []
        self.untraced: list[tuple[str, str]] = []
        self.written: dict[str, str] = {}  # float path: the side whose trace wrote a buffer

    def spec(self, module: nn.Module, path: str, side: str) -> dict[str, Any] | None:
        calls = self.calls[side]
        if calls is None:
            return {} if path == "" else _static_spec(module)
        return calls.get(path)

    def is_leaf(self, module: nn.Module, path: str) -> bool:
        if _is_container(module):
            return False
        return is_leaf(module, path, self.leaf_modules) or _owns_weight(module)

    def visit(self, fm: nn.Module, qm: nn.Module, fpath: str, qpath: str) -> None:
        if classify_module(fm).role == classify_module(qm).role == "plumbing" and fpath:
            return  # not a layer on either side (a rotary embedding): nothing to compare
        f_leaf, q_leaf = self.is_leaf(fm, fpath), self.is_leaf(qm, qpath)
        if f_leaf and q_leaf:
            self.leaves.append((fpath, qpath))
            return
        if f_leaf or q_leaf:
            whole, inside = (("float", fpath, fm), ("quantized", qpath, qm))[:: 1 if f_leaf else -1]
            reason = (
                f"the {whole[0]} side `{whole[1]}` ({type(whole[2]).__name__}) is one op but the "
                f"{inside[0]} side `{inside[1]}` ({type(inside[2]).__name__}) is not; keep both "
                f"whole with leaf_modules=[\"{inside[1]}\"]"
            )
            self.orphans += [(fpath, "float", reason), (qpath, "quantized", reason)]
            return
        if not _is_container(fm):
            found = self.differed.get(fpath)
            if found is None:
                if (fpath, qpath) not in self.traced:
                    self.traced[fpath, qpath] = self.region(fm, qm, fpath, qpath)
                found = self.traced[fpath, qpath]
            if isinstance(found, tuple):
                region, kept_whole = found
                self.regions.append(region)
                for rel in kept_whole:
                    self.visit(fm.get_submodule(rel), qm.get_submodule(rel),
                               _join(fpath, rel), _join(qpath, rel))
                return
            self.untraced.append((fpath, found))
        for f_name, q_name in self.child_pairs(fm, qm, fpath, qpath):
            self.visit(fm.get_submodule(f_name), qm.get_submodule(q_name),
                       _join(fpath, f_name), _join(qpath, q_name))

    def region(
        self, fm: nn.Module, qm: nn.Module, fpath: str, qpath: str
    ) -> tuple[Region, list[str]] | str:
        """Trace both sides, keeping failing submodules whole; the reason if it cannot."""
        f_spec, q_spec = self.spec(fm, fpath, "float"), self.spec(qm, qpath, "quantized")
        if f_spec is None or q_spec is None:
            return (
                "not traced on its own: it takes optional or non-tensor arguments; pass "
                "example_inputs to match() so fxnumeric records how it is called"
                if self.calls["float"] is None
                else "not traced on its own: it is never called, or called with Python "
                "values (ints, flags, caches) that could change from call to call"
            )
        kept: list[str] = []  # relative paths kept whole, on both sides
        for _ in range(_MAX_KEPT_WHOLE):
            leaves_f = [*self.leaf_modules, *(_join(fpath, k) for k in kept),
                        *_weight_layers(fm, fpath)]
            leaves_q = [*self.leaf_modules, *(_join(qpath, k) for k in kept),
                        *_weight_layers(qm, qpath)]
            f_graph = trace_submodule(fm, fpath, leaf_modules=leaves_f,
                                      concrete_args=f_spec or None)
            q_graph = trace_submodule(qm, qpath, leaf_modules=leaves_q,
                                      concrete_args=q_spec or None)
            failure = next((g for g in (f_graph, q_graph) if isinstance(g, TraceFailure)), None)
            if failure is None:
                assert isinstance(f_graph, fx.GraphModule) and isinstance(q_graph, fx.GraphModule)
                return Region(fpath, qpath, f_graph, q_graph), kept
            if failure.differs:  # a graph that would compute something else: noted
                self.written[fpath] = "float" if failure is f_graph else "quantized"
                return failure.reason
            scope = failure.scope
            paired = _has(fm, scope) and _has(qm, scope)
            if scope == "" or scope in kept or not paired:
                return failure.reason
            kept.append(scope)
        return f"more than {_MAX_KEPT_WHOLE} of its submodules cannot be traced"

    def child_pairs(
        self, fm: nn.Module, qm: nn.Module, fpath: str, qpath: str
    ) -> list[tuple[str, str]]:
        """Children paired by name, then the rest by position and type; orphans recorded.

        A ``ModuleList`` (or ``ModuleDict``) holding more entries on one side (a decoder
        layer deleted) pairs its entries by their weights where those tell
        (:func:`_align_by_weights`): by name, every entry after the missing one paired with
        its predecessor's twin (every Linear of a Llama layer read weight SQNR -2.5 to -3.6
        dB, as two unrelated layers do)."""
        f_children, q_children = list(fm.named_children()), list(qm.named_children())
        if _is_container(fm) and _is_container(qm) and len(f_children) != len(q_children):
            aligned = _align_by_weights(f_children, q_children)
            if aligned is not None:
                return self._aligned(aligned, f_children, q_children, fpath, qpath)
        q_names = {name for name, _ in q_children}
        f_names = {name for name, _ in f_children}
        pairs = [(name, name) for name, _ in f_children if name in q_names]
        left_q = {i: (n, c) for i, (n, c) in enumerate(q_children) if n not in f_names}
        for i, (name, child) in enumerate(f_children):
            if name in q_names:
                continue
            twin = left_q.get(i)
            if twin is not None and _compatible(child, twin[1]):
                pairs.append((name, twin[0]))
                del left_q[i]
            elif classify_module(child).role != "plumbing":
                self.orphans.append((_join(fpath, name), "float", (
                    f"no quantized submodule `{_join(qpath, name)}`, nor one of type "
                    f"{type(child).__name__} at the same position under `{qpath or '<root>'}`"
                )))
        for name, child in left_q.values():
            if classify_module(child).role != "plumbing":
                self.orphans.append((_join(qpath, name), "quantized", (
                    f"no float submodule `{_join(fpath, name)}`, nor one of type "
                    f"{type(child).__name__} at the same position under `{fpath or '<root>'}`"
                )))
        return pairs


    def _aligned(self, aligned: list[tuple[str, str, float]], f_children: list, q_children: list,
                 fpath: str, qpath: str) -> list[tuple[str, str]]:
        """The pairs :func:`_align_by_weights` found; the entries left on either side are
        orphans, with the weights as the reason."""
        paired_f = {f for f, _, _ in aligned}
        paired_q = {q for _, q, _ in aligned}
        counts = (f"the float `{fpath or '<root>'}` holds {len(f_children)} entries, the "
                  f"quantized `{qpath or '<root>'}` {len(q_children)}")
        for side, other, children, paired, path in (
                ("float", "quantized", f_children, paired_f, fpath),
                ("quantized", "float", q_children, paired_q, qpath)):
            for name, child in children:
                if name not in paired and classify_module(child).role != "plumbing":
                    self.orphans.append((_join(path, name), side, (
                        f"{counts}, and none of the {other} ones holds its weights (weight "
                        f"SQNR below {TWIN_WEIGHT_SQNR_DB:g} dB against each, where quantizing "
                        f"a weight reads well above): the {other} model lacks it")))
        return [(f, q) for f, q, _ in aligned]


def _first_weight(module: nn.Module, side: str) -> tuple[str, torch.Tensor] | None:
    """``(path inside module, weight)`` of the first layer inside ``module`` with a weight
    matrix (:func:`fxnumeric.weights.module_weight`; a norm's vector tells nothing: every
    layer's starts as ones), or None."""
    for rel, sub in module.named_modules():
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) or callable(weight):
            found = module_weight(sub, side)
            if found is not None:
                return rel, found
    return None


def _align_by_weights(f_children: list[tuple[str, nn.Module]],
                      q_children: list[tuple[str, nn.Module]],
                      ) -> list[tuple[str, str, float]] | None:
    """Pair the entries of two module lists of different lengths in order, each quantized
    entry with the next float entry whose first weight matrix (at the same path inside it)
    its own is a quantized copy of (weight SQNR at least
    :data:`~fxnumeric.pairing.TWIN_WEIGHT_SQNR_DB`); entries skipped stay unpaired.
    ``(float name, quantized name, weight SQNR)`` of the pairs, or None where weights do not
    tell (an entry without a weight fxnumeric reads: names decide, as before). Each weight
    is read once."""
    float_weights = [_first_weight(child, "float") for _, child in f_children]
    quant_weights = [_first_weight(child, "quant") for _, child in q_children]
    if any(w is None for w in (*float_weights, *quant_weights)):
        return None
    if len({rel for rel, _ in (*float_weights, *quant_weights)}) > 1:  # not alike inside
        return None
    found: list[tuple[str, str, float]] = []
    start = 0
    for (q_name, _), (_, q_weight) in zip(q_children, quant_weights, strict=True):
        for k in range(start, len(f_children)):
            f_weight = float_weights[k][1]
            if f_weight.shape != q_weight.shape:
                continue
            value = sqnr(f_weight, q_weight)
            if value >= TWIN_WEIGHT_SQNR_DB:
                found.append((f_children[k][0], q_name, value))
                start = k + 1
                break
    return found or None  # no entry alike: other weights (another checkpoint), names decide


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def capture_tree(
    float_model: nn.Module,
    quant_model: nn.Module,
    *,
    leaf_modules: list[LeafSpec] | None = None,
    float_calls: CallSpecs | None = None,
    quant_calls: CallSpecs | None = None,
    example_inputs: Any = None,
) -> TreeCapture:
    """Walk both models together, capturing graphs where torch.fx can and leaves elsewhere.

    With ``example_inputs`` (the batch the calls were recorded on), each region's graphs are
    run on the calls their modules make on it (:func:`fxnumeric.capture.check.check_regions`,
    one run of each model): a region whose float or quantized graph computes differently from
    its module, or fails where the module ran, is not taken; its module is kept whole as one
    torch.fx cannot trace, and its children are captured in turn (and checked, in one more
    run, until every region taken computes what its module does).

    Args:
        float_model: the float model (not modified).
        quant_model: the quantized model (not modified).
        leaf_modules: module types or qualified names to keep whole, as in :func:`trace`.
        float_calls: how each float module is called (:func:`record_calls`), or None.
        quant_calls: the same for the quantized model.
        example_inputs: the batch ``float_calls`` and ``quant_calls`` were recorded on, to
            check the regions on; None: they are not checked.
    """
    traced: dict[tuple[str, str], tuple[Region, list[str]] | str] = {}
    differed: dict[str, str] = {}
    sides: dict[str, str] = {}
    checked: set[str] = set()
    while True:
        walk = _Walk(list(leaf_modules or ()), float_calls, quant_calls, traced, differed)
        walk.visit(float_model, quant_model, "", "")
        unchecked = [r for r in walk.regions if r.float_path not in checked]
        if example_inputs is None or float_calls is None or not unchecked:
            break
        checked.update(r.float_path for r in unchecked)
        found = _check(float_model, quant_model, unchecked, example_inputs)
        if not found:
            break
        differed |= {path: reason for path, (_, reason) in found.items()}
        sides |= {path: side for path, (side, _) in found.items()}
    return TreeCapture(
        tuple(walk.regions), tuple(walk.leaves), tuple(walk.orphans), tuple(walk.untraced),
        tuple((path, sides.get(path) or walk.written[path], reason)
              for path, reason in walk.untraced if path in differed or path in walk.written),
    )


_KEPT_WHOLE_FIX = (
    "Kept whole: its children are compared, the code of its own forward is not. To compare "
    "that code too, make the test traceable (`mask is not None` rather than "
    "`isinstance(mask, torch.Tensor)`)")


def _check(float_model: nn.Module, quant_model: nn.Module, regions: list[Region],
           example_inputs: Any) -> dict[str, tuple[str, str]]:
    """``{float path: (side, why)}`` of the ``regions`` whose float or quantized graph is not
    its module on ``example_inputs`` (the float side's reason first)."""
    float_found = check_regions(float_model, {r.float_path: r.float_graph for r in regions},
                                example_inputs, which="float", fix=_KEPT_WHOLE_FIX)
    quant_found = check_regions(quant_model, {r.quant_path: r.quant_graph for r in regions},
                                example_inputs, which="quantized", fix=_KEPT_WHOLE_FIX)
    return {r.float_path: ("float", float_found[r.float_path]) if r.float_path in float_found
            else ("quantized", quant_found[r.quant_path])
            for r in regions if r.float_path in float_found or r.quant_path in quant_found}
