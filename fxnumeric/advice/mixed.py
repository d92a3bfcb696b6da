"""Mixed precision: which quantized variant (or float) each layer should take, for a target.

Given the float model and several quantized variants of it (``{"int4": q4, "int8": q8}``),
:func:`advise_variants` chooses per layer one variant or float, minimising the average weight
bits, subject to the end metric reaching a target. Every step is verified on real hybrid
models (:mod:`fxnumeric.advice.hybrid`: the float model with each layer's subgraph taken from
its chosen variant); nothing is re-quantized and nothing is estimated without being run. An op
the search does not choose for that a static variant runs on quantized values (FX's average
pool, a quantized ``add``) is taken as the variant it follows has it, quantized or float
(:func:`_kept_quantized`), so a plan measures the model its assignment describes: the plan
where every layer takes one variant, that variant.

The search (closed loop):

1. **Cheapest**: every layer takes its cheapest choice; if that reaches the target, done.
2. **Efficiency**: each layer alone is upgraded to its next dearer choice, measured on a real
   hybrid: the metric it buys per bit it costs.
3. **Fill**: layers are upgraded in order of efficiency; a bisection over that order finds the
   fewest upgrades that reach the target (each probe a real hybrid). If all of them do not,
   the next dearer choices are measured the same way from there.
4. **Prune**: every upgrade the target can do without is undone again, largest layer first,
   each removal verified; an upgraded layer goes back to the cheapest choice that still meets
   the target, not only to the one below it (a dearer variant is not always a better one).
5. **Trade**: pruning undoes one upgrade at a time, so a large layer's upgrade the target
   cannot do without alone stays even when a few small layers' upgrades would make up for it
   at fewer bits (the fill's order comes from each upgrade alone, and its last upgrade may be
   a large layer that overshoots). The upgrades the fill left out are measured again, each
   alone from the pruned plan (what an upgrade buys depends on the rest of the plan: two
   layers' errors may cancel). Then each remaining upgrade, largest layer first, is undone a
   step and traded for the fewest of those, most efficient first, that cost fewer bits
   together and meet the target again (a bisection, each probe a real hybrid). A trade is
   run only when their gains are expected to make up for what undoing the upgrade lost
   (measured by pruning): the expectation chooses the trades to try, the hybrids decide.
   Pruning then runs once more, from the traded plan.

Each verified assignment is a point ``(bits, metric)``; :attr:`~fxnumeric.Advice.front` keeps
the Pareto front of them.

What a choice costs is the bits the applied model stores for it. A variant's: the layer's
weight as the variant stores it (:func:`fxnumeric.storage.weight_storage_bits`), by default
*nominal* (a packed format's width: torchao 0.18 keeps int4 values in whole bytes on CPU,
which ``bits="stored"`` counts), scales and zero points included. Float's: the float weight,
unless the model keeps it anyway: one also held by a module outside the search (a tied
``lm_head`` shares the embedding's, which stays float) costs nothing, and one held by several
searched layers is stored once when they stay float. A plan's bits are the sum over the layers
searched, divided by their weights: the bits per weight the applied model stores for them.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx, nn

from .. import flows
from ..errors import FxNumericWarning, InputError, InstrumentationError
from ..flows.fx import weight_owner
from ..guards import warn_foreign_weights
from ..numbers import shown, unit
from ..pairing import op_name
from ..semantics import evaluate_constant, is_dequantize
from ..storage import module_weights, tensor_storage_bits, weight_storage_bits
from ..weights import weight_sqnrs
from .hybrid import Swap, module_path, op_names

__all__ = ["LayerChoices", "advise_variants", "check_variant", "FLOAT"]

FLOAT = "float"
"""The choice that keeps a layer in float."""


def check_variant(matching: Any) -> None:
    """Warn when a variant does not look made from the float model it is advised against:
    quantized ops or modules with no counterpart in it (a variant of a 3-layer model against a
    2-layer one), which no plan can take; or weights that are not the float model's quantized
    (another seed or checkpoint: weight SQNR below 0 dB on most layers), which plans mix with
    the float model's as if they were. Both were taken silently, the extra layers dropped."""
    unpaired = [u.node for u in matching.unmatched_quant if u.quantized or u.region is None]
    if unpaired:
        shown_ops = ", ".join(f"`{n}`" for n in unpaired[:5]) + (", ..." if len(unpaired) > 5
                                                                  else "")
        warnings.warn(FxNumericWarning(
            f"{len(unpaired)} quantized op{'s' if len(unpaired) > 1 else ''} or module"
            f"{'s' if len(unpaired) > 1 else ''} of it {'have' if len(unpaired) > 1 else 'has'}"
            f" no counterpart in the float model ({shown_ops}): no plan can take "
            f"{'them' if len(unpaired) > 1 else 'it'}, and the search leaves "
            f"{'them' if len(unpaired) > 1 else 'it'} out. Is it made from this float model "
            "(the same layers)? fxnumeric.match(float_model, variant).table() lists what each "
            "side holds"), stacklevel=5)
    warn_foreign_weights(weight_sqnrs(matching), "its weights", "Every plan mixes its layers "
                         "with the float model's as if they were the same model's",
                         stacklevel=5)


@dataclass(frozen=True)
class LayerChoices:
    """What one layer may take: ``choices`` as ``(name, bits per weight)``, cheapest first.

    A choice's bits are what it adds to the model: float's are 0 when the float weight is
    also held by a module outside the search (a tied ``lm_head``: the embedding keeps it).
    ``float_shared_with`` names the other searched layers holding the same float weight:
    those kept float store it once.
    """

    name: str
    module: str
    numel: int
    choices: tuple[tuple[str, float], ...]
    float_shared_with: tuple[str, ...] = ()

    def bits(self, choice: str) -> float:
        return dict(self.choices)[choice]


def _weight_module(matching: Any, name: str, side: str) -> nn.Module | None:
    """The module of ``side`` holding layer ``name``'s weight: the one its ops call, or the
    one whose weight a functional op reads (``F.linear(x, self.qkv.weight)``: ``qkv``)."""
    for view, node in _layer_nodes(matching, name, side):
        module = view.module(node)
        owner = weight_owner(node) if module is None else None
        if owner is not None:
            module = view.modules.get(owner)
        if module is not None and module_weights(module):  # an LSTM's are per gate matrix
            return module
    return None


def _layer_nodes(matching: Any, name: str, side: str) -> Iterator[tuple[Any, fx.Node]]:
    """``(graph view, node)`` for each node of layer ``name``'s chains on ``side``."""
    for pair in matching.pairs:
        if pair.name.partition("#")[0] == name:
            region = matching.region_of(pair)
            view = region.float_view if side == "float" else region.quant_view
            for node in region.chain(pair, side):
                yield view, node


def weight_bits(matching: Any, name: str, side: str, nominal: bool = True
                ) -> tuple[int, int] | None:
    """``(bits, numel)`` of layer ``name``'s weight on ``side`` (``"float"``/``"quant"``), as
    stored: its module's weight (:func:`fxnumeric.storage.weight_storage_bits`), else the
    constants a graph op reads it from. A pt2e layer reads ``dequantize(int8 constant, scales,
    zero points)``: those three are what it stores, the values at the width of their
    quantization range when ``nominal`` (``quant_min=-8, quant_max=7``: 4 bits). ``None``:
    the layer reads no weight of its own."""
    module = _weight_module(matching, name, side)
    if module is not None:
        return weight_storage_bits(module, nominal=nominal)
    for view, node in _layer_nodes(matching, name, side):
        cls = view.op_class(node)
        source = flows.weight_input(node, cls.signature[0]) if cls is not None else None
        if source is None:
            continue
        if is_dequantize(view, source) and source.op == "call_function":
            stored = _dequantized_bits(source, view, nominal)
            if stored is not None:
                return stored
        value = evaluate_constant(source, view)
        if isinstance(value, torch.Tensor):
            return weight_storage_bits(value, nominal=nominal)
    return None


def _dequantized_bits(node: fx.Node, view: Any, nominal: bool) -> tuple[int, int] | None:
    """``(bits, numel)`` stored by the constants of a ``dequantize_per_*(data, scale,
    zero_point, [axis,] quant_min, quant_max, dtype)`` node; ``None`` if its data is not a
    constant."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    args = {a.name: v for a, v in zip(schema.arguments, node.args, strict=False)}
    args.update(node.kwargs)
    data = evaluate_constant(args.get("input"), view)
    if not isinstance(data, torch.Tensor):
        return None
    low, high = args.get("quant_min"), args.get("quant_max")
    width = (math.ceil(math.log2(high - low + 1)) if nominal and isinstance(low, int)
             and isinstance(high, int) and high > low else data.element_size() * 8)
    bits = data.numel() * width
    for key in ("scale", "scales", "zero_point", "zero_points"):
        if key not in args:
            continue
        value = evaluate_constant(args[key], view) if isinstance(args[key], fx.Node) \
            else args[key]
        if isinstance(value, torch.Tensor):
            if not (nominal and "zero" in key and not bool(value.any())):
                bits += tensor_storage_bits(value)
        elif not (nominal and "zero" in key and value == 0):
            bits += 32  # one float or int of a per-tensor format
    return bits, data.numel()


def layer_choices(runner: Any, nominal: bool = True, wanted: Iterable[str] | None = None
                  ) -> tuple[list[LayerChoices], tuple[tuple[str, str], ...]]:
    """Each searchable layer with the bits of every variant that quantizes it, and float's;
    and ``(layer, reason)`` of the others.

    A layer is searchable when its float module holds a weight and at least one variant
    quantizes it; variants that do not quantize it are not offered for it. A quantized layer
    with no module's weight (an FX-quantized ``add``; torchvision's
    ``shifted_window_attention``, a function reading two modules' weights) is not: it stays
    float in every plan, unless a static variant runs it on quantized values
    (:func:`_kept_quantized`).
    """
    names = runner.layers if wanted is None else list(dict.fromkeys(wanted))
    unknown = [n for n in names if n not in runner.swappable]
    if unknown:
        raise InputError(f"no quantized layer is named {unknown[:5]}; layers are: "
                         f"{', '.join(runner.layers[:20])}")
    out: list[LayerChoices] = []
    float_modules: dict[str, nn.Module | None] = {}
    unsearched: list[tuple[str, str]] = []
    kinds = {p.name.partition("#")[0]: p.kind for p in runner.matching.pairs}
    for name in names:
        float_weight = weight_bits(runner.matching, name, "float")
        if float_weight is None:
            unsearched.append((name, f"a quantized {kinds.get(name)} op with no module's "
                                     "weight to choose a precision for (none of its own, or "
                                     "several modules'): float in every plan"))
            continue
        float_bits, numel = float_weight
        choices = [(FLOAT, float_bits / numel)]
        for variant, matching in runner.variants.items():
            local = runner.layer_of(name, variant)
            stored = weight_bits(matching, local, "quant", nominal) if local else None
            if stored is None:
                continue
            bits, count = stored
            if count == numel:
                choices.append((variant, bits / count))
        if len(choices) > 1:
            float_modules[name] = _weight_module(runner.matching, name, "float")
            out.append(LayerChoices(name, module_path(runner.matching, name), numel,
                                    tuple(choices)))
    out = _kept_float_costs(out, float_modules, runner.matching.float_model)
    chosen = set(names)
    unsearched += [(name, "a quantized layer left out by layers=: float in every plan")
                   for name in runner.layers if name not in chosen]
    unsearched += runner.unplaced
    if not out:
        raise InputError("no layer to choose a precision for: no variant quantizes a layer "
                         "with a weight; see fxnumeric.match(float_model, quant_model).table()")
    return out, tuple(unsearched)


def _kept_float_costs(found: list[LayerChoices], float_modules: Mapping[str, nn.Module | None],
                      float_model: nn.Module | None) -> list[LayerChoices]:
    """``found`` with float's cost what keeping each layer float adds to the model, and the
    choices sorted cheapest first.

    ``quantize_`` (and a hybrid) gives a quantized layer a weight of its own and leaves the
    float one to whatever else holds it. So a float weight also held by a module of
    ``float_model`` outside the search (a tied ``lm_head``'s, held by the embedding) is stored
    whatever the plan: keeping the layer float costs nothing. One held by other searched
    layers is named in ``float_shared_with``, to be counted once (:meth:`_Plans.bits`). When
    the layer's float weight is not a module of ``float_model``'s (a graph constant, a copy),
    nothing is known to be shared and float costs its whole weight.
    """
    holders: dict[int, list[nn.Module]] = {}  # id(weight) -> the modules holding it
    if float_model is not None:
        for module in float_model.modules():
            for weight in module_weights(module):
                holders.setdefault(id(weight), []).append(module)
    layer_of = {id(m): name for name, m in float_modules.items() if m is not None}
    out = []
    for lc in found:
        own = float_modules.get(lc.name)
        weights = module_weights(own) if own is not None else []
        known = bool(weights) and all(any(m is own for m in holders.get(id(w), ()))
                                      for w in weights)  # else a graph constant, or a copy
        kept_bits = 0
        shared_with: set[str] = set()
        for weight in weights if known else ():
            names = {layer_of.get(id(m)) for m in holders[id(weight)] if m is not own}
            if None in names:
                continue  # held outside the search: the model keeps it anyway
            kept_bits += weight_storage_bits(weight)[0]
            shared_with.update(n for n in names if n is not None)
        choices = dict(lc.choices)
        if known:
            choices[FLOAT] = kept_bits / lc.numel
        out.append(LayerChoices(lc.name, lc.module, lc.numel,
                                tuple(sorted(choices.items(), key=lambda c: c[1])),
                                tuple(sorted(shared_with))))
    return out


class _Plans:
    """Assignments ``{layer: choice}``: their average bits, their hybrids, their verified
    metric (each assignment is run once)."""

    def __init__(self, search: Any, layers: list[LayerChoices],
                 kept: Iterable[_Kept] = ()) -> None:
        self.search, self.layers, self.kept = search, layers, tuple(kept)
        self.by_name = {lc.name: lc for lc in layers}
        self.total = sum(lc.numel for lc in layers)
        self.order = {lc.name: i for i, lc in enumerate(layers)}
        self.seen: dict[tuple[tuple[str, str], ...], float] = {}

    def bits(self, plan: Mapping[str, str]) -> float:
        """The bits per weight the model ``plan`` makes stores for the searched layers: a
        float weight several of them share counts once, for the first kept float."""
        return sum(lc.numel * lc.bits(plan[lc.name]) for lc in self.layers
                   if not self._stored_before(lc, plan)) / self.total

    def _stored_before(self, lc: LayerChoices, plan: Mapping[str, str]) -> bool:
        """Whether ``lc`` is float and shares its float weight with an earlier float layer."""
        return plan[lc.name] == FLOAT and any(
            plan.get(other) == FLOAT and self.order[other] < self.order[lc.name]
            for other in lc.float_shared_with)

    def _key(self, plan: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(plan.items()))

    def swaps(self, plan: Mapping[str, str]) -> tuple[Swap, ...]:
        """The float graph's swaps that make ``plan``'s model: each layer's variant, and the
        ops kept as a variant has them (:func:`_kept_quantized`)."""
        runner = self.search.runner
        layers = tuple(s for name, choice in plan.items() if choice != FLOAT
                       for s in runner.swaps(name, "float", choice))
        covered = frozenset().union(*map(_footprint, layers))
        # a layer's swap that covers a kept op's nodes computes them (FX's conv + relu is
        # pt2e's conv and relu): the kept op is not swapped in twice
        return (*(s for kept in self.kept for s in kept.swaps(plan)
                  if not _footprint(s) & covered), *layers)

    def measure(self, plans: list[dict[str, str]], label: str) -> list[float]:
        """The end metric of each plan, running the ones not run before."""
        todo = [p for p in plans if self._key(p) not in self.seen]
        todo = list({self._key(p): p for p in todo}.values())
        if todo:
            hybrids = [("float", self.swaps(p)) for p in todo]
            for plan, value in zip(todo, self.search.evaluate(hybrids, label), strict=True):
                self.seen[self._key(plan)] = value
        return [self.seen[self._key(p)] for p in plans]

    def cheapest_meeting(self, target: float, plan: dict[str, str], value: float,
                         max_float: int | None) -> tuple[dict[str, str], float]:
        """The plan run with the fewest bits whose metric meets ``target`` (the best metric
        among equals) and keeps at most ``max_float`` layers float: ``plan`` unless a run one
        is cheaper."""
        metric = self.search.metric
        best = (self.bits(plan), -metric.utility(value), self._key(plan))
        for key, v in self.seen.items():
            if metric.meets(v, target) and _float_room(dict(key), max_float) >= 0:
                best = min(best, (self.bits(dict(key)), -metric.utility(v), key))
        chosen = dict(best[2])
        return (plan, value) if chosen == plan else (chosen, self.seen[best[2]])

    def best(self, plan: dict[str, str], value: float, max_float: int | None
             ) -> tuple[dict[str, str], float]:
        """The plan run with the best metric (the fewest bits among equals) that keeps at most
        ``max_float`` layers float: ``plan`` unless a run one is better. When the target is out
        of reach the search ends on its dearest plan, which need not be the best: an FX
        variant's float64 scales cost more than a pt2e one's and may read worse."""
        u = self.search.metric.utility
        best = (-u(value), self.bits(plan), self._key(plan))
        for key, v in self.seen.items():
            if _float_room(dict(key), max_float) >= 0:
                best = min(best, (-u(v), self.bits(dict(key)), key))
        chosen = dict(best[2])
        return (plan, value) if chosen == plan else (chosen, self.seen[best[2]])

    def front(self) -> tuple[tuple[float, float], ...]:
        """The Pareto front of every plan run: ``(bits, metric)``, fewest bits first."""
        u = self.search.metric.utility
        points = sorted(((self.bits(dict(k)), v) for k, v in self.seen.items()),
                        key=lambda p: (p[0], -u(p[1])))
        front: list[tuple[float, float]] = []
        for bits, value in points:
            if not front or u(value) > u(front[-1][1]):
                front.append((bits, value))
        return tuple(front)


@dataclass(frozen=True)
class _Kept:
    """Ops the search does not choose for at one place of the float graph, each variant's way:
    ``options`` are the swaps of each variant quantizing them there (the float nodes they
    replace overlap: FX's fused ``add_relu`` is pt2e's ``add`` and ``relu``), in the order
    the variants were given; ``reads`` the searched layer whose quantized output each one
    reads (``None``: it quantizes its input itself); ``variants`` every variant, in order.

    A plan runs them as one variant has them (:meth:`variant`), quantized, or float when that
    variant does not quantize them (a torchao variant's ``add``, X86's pool): the plan where
    every layer takes one variant measures that variant."""

    name: str
    options: dict[str, tuple[Swap, ...]]
    reads: dict[str, str | None]
    variants: tuple[str, ...]

    def variant(self, plan: Mapping[str, str]) -> str:
        """The variant whose way ``plan`` runs these ops: a variant whose op reads a layer the
        plan gives that variant; else the variant the plan gives a layer one of them reads;
        else, those layers float, the first variant quantizing them (a model re-quantized with
        those layers float keeps them); else, none reading a searched layer, the variant most
        of the plan's layers take (the first given among equals)."""
        for variant, layer in self.reads.items():
            if layer is not None and plan.get(layer) == variant:
                return variant
        read = [layer for layer in self.reads.values() if layer is not None]
        for layer in read:
            if plan.get(layer, FLOAT) != FLOAT:
                return plan[layer]
        taken = [choice for choice in plan.values() if choice != FLOAT]
        if read or not taken:
            return next(iter(self.options))
        return max(self.variants, key=taken.count)  # the first given among equals

    def swaps(self, plan: Mapping[str, str]) -> tuple[Swap, ...]:
        return self.options.get(self.variant(plan), ())


def _footprint(swap: Swap) -> frozenset[fx.Node]:
    """The float base's nodes ``swap`` replaces."""
    return swap.skip | {swap.out}


def _kept_quantized(search: Any, found: list[LayerChoices]
                    ) -> tuple[list[_Kept], list[tuple[str, str]]]:
    """The ops the search does not choose for that a variant runs on quantized values, kept
    as a variant has them in every plan; and ``(op, reason)`` for each of them.

    Every plan is a hybrid on the float graph, and an op not swapped in runs float there. A
    static flow quantizes more than the layers with a weight: FX runs an average pool, an
    ``add`` or a ``cat`` on quantized values (a pool rounds its output to its input's grid),
    pt2e puts ``quantize -> dequantize`` after a ``relu`` or a pool, and a model re-quantized
    with some layers float (``set_module_name(layer, None)``) still does. So such an op is
    taken, in every plan, as the variant of the searched layer whose output it reads has it,
    as FX's pool shares that layer's qparams: quantized when that variant quantizes it, float
    when not (a torchao variant's layers hand on float tensors; X86 leaves a pool to its
    input's quantize). With that layer float, it is taken from the first variant, in the order
    given, that quantizes it, as a model re-quantized with that layer float keeps it; an op
    reading no searched layer follows the variant most of the plan's layers take. The ops of
    the variants at one place are one choice (:class:`_Kept`), by the float nodes they
    replace, call site by call site: FX's fused ``add_relu`` and pt2e's ``add`` and ``relu``
    are never swapped in together. So a plan measures the model its assignment describes,
    the variant itself when every layer takes it. A layer left out by ``layers=`` is kept as
    a variant has it, as a re-quantized model keeps it. torchao's and dynamic layers hand on
    float tensors: an op of theirs the search does not choose for stays float, as
    :meth:`~fxnumeric.Advice.to_torchao`'s ``FqnToConfig`` leaves it.
    """
    runner = search.runner
    search.references()  # probes the variants: which ops hand on quantized tensors
    searched = {lc.module: lc.name for lc in found}
    variants = tuple(runner.variants)
    sites: list[_Site] = []
    notes: dict[str, tuple[str, str]] = {}  # by module path
    for variant, matching in runner.variants.items():
        kinds = {p.name.partition("#")[0]: p.kind for p in matching.pairs}
        calls: dict[int, tuple[str, Swap]] = {}  # id(pair) -> (module path, its swap)
        for name in op_names(matching):
            path = module_path(matching, name)
            if path in searched or not runner.hands_on_quantized(variant, name):
                continue
            label = name if variant == variants[0] else f"{variant}:{name}"
            what = f"a quantized {kinds.get(name)} op the search does not choose a precision for"
            try:
                swaps = runner.op_swaps(name, variant)
            except InstrumentationError as exc:
                notes.setdefault(path, (label, f"{what}; it cannot be taken from variant "
                                               f"{variant!r} into the float graph ({exc}): "
                                               "float in every plan"))
                continue
            notes.setdefault(path, (label, what))
            pairs = [p for p in matching.pairs if op_name(p.name) == name]
            calls.update((id(p), (path, s)) for p, s in zip(pairs, swaps, strict=True))
        read_by: dict[fx.Node, str | None] = {}  # a kept call's last quantized node: its reads
        for pair in matching.pairs:  # in graph order: a kept op reading a kept op reads its
            if id(pair) in calls:
                path, swap = calls[id(pair)]
                reads = _reads(matching, pair, searched, read_by)
                read_by[matching.region_of(pair).chain(pair, "quant")[-1]] = reads
                sites.append(_Site(variant, path, swap, reads))
    places = _places(sites)
    kept: list[_Kept] = []
    for place in places:
        options: dict[str, tuple[Swap, ...]] = {}
        reads_of: dict[str, str | None] = {}
        for site in sorted(place, key=lambda site: variants.index(site.variant)):
            options[site.variant] = (*options.get(site.variant, ()), site.swap)
            reads_of.setdefault(site.variant, site.reads)
        kept.append(_Kept(notes[place[0].path][0], options, reads_of, variants))
    for path, (label, what) in notes.items():
        if "every plan" not in what:
            notes[path] = (label, _kept_reason(
                what, [k for k, place in zip(kept, places, strict=True)
                       if any(site.path == path for site in place)],
                next(site.reads for site in sites if site.path == path), variants))
    return kept, list(notes.values())


@dataclass(frozen=True)
class _Site:
    """One call of an op a variant keeps quantized: the module path of its op, its swap, and
    the searched layer whose quantized output it reads (:func:`_reads`)."""

    variant: str
    path: str
    swap: Swap
    reads: str | None


def _places(sites: list[_Site]) -> list[list[_Site]]:
    """``sites`` grouped by place: the calls whose swaps replace overlapping float nodes
    (transitively), each group in the order of its first site."""
    group = list(range(len(sites)))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    owner: dict[fx.Node, int] = {}
    for i, site in enumerate(sites):
        for node in _footprint(site.swap):
            if node in owner:
                group[root(i)] = root(owner[node])
            else:
                owner[node] = i
    places: dict[int, list[_Site]] = {}
    for i, site in enumerate(sites):
        places.setdefault(root(i), []).append(site)
    return sorted(places.values(), key=lambda place: sites.index(place[0]))


def _kept_reason(what: str, places: list[_Kept], reads: str | None,
                 variants: tuple[str, ...]) -> str:
    """What an op kept as a variant has it is in every plan (:func:`_kept_quantized`)."""
    follows = (f"as the variant of `{reads}`, the layer it reads, has it (with that layer "
               "float, as the first variant quantizing it has it)" if reads else
               "as the variant most of the plan's layers take has it (with every layer "
               "float, as the first variant quantizing it has it)")
    missing = [v for v in variants if any(v not in k.options for k in places)]
    if not missing:
        return (f"{what}: quantized in every plan, {follows}, as a model re-quantized with the "
                "plan's layers float keeps it")
    return (f"{what}: quantized or float in each plan, {follows}, float where that variant "
            f"runs it float ({', '.join(repr(v) for v in missing)}), as a model re-quantized "
            "with the plan's layers keeps it")


def _reads(matching: Any, pair: Any, searched: Mapping[str, str],
           read_by: Mapping[fx.Node, str | None]) -> str | None:
    """The searched layer whose quantized output the kept call ``pair`` of ``matching`` reads
    as it is (its first input, back through plumbing and other kept calls, whose layers
    ``read_by`` holds by their last quantized node), by the search's name; FX's pool shares
    that layer's output qparams. ``None`` when it quantizes its input itself (a float op or a
    model input before it): its own qconfig's observer quantizes it."""
    region = matching.region_of(pair)
    view = region.quant_view
    node = region.chain(pair, "quant")[0]
    while True:
        inputs = [i for i in node.all_input_nodes if i.op != "get_attr"]
        if not inputs:
            return None
        node = inputs[0]
        owner = region.pair_of(node)
        if owner is not None and region.chain(owner, "quant")[-1] is node:
            path = module_path(matching, op_name(owner.name))
            return searched[path] if path in searched else read_by.get(node)
        cls = view.op_class(node)
        if cls is None or cls.role != "plumbing" or cls.is_dequantize:
            return None


def _upgrade(lc: LayerChoices, choice: str) -> str | None:
    names = [c for c, _ in lc.choices]
    i = names.index(choice)
    return names[i + 1] if i + 1 < len(names) else None


def _refuse_strays(strays: dict[str, tuple[str, ...]]) -> None:
    """Refuse variants whose ops read ops the float model lacks (``{reader: ops}``).

    Every plan of several variants is built on the float model, which has no such op: the
    plan where every layer takes the variant would skip it and measure another model (a
    ``* 0.5`` the variant computes before ``fcs.2``: the plan read 50.3 dB, the variant
    20.8)."""
    if not strays:
        return
    shown = "; ".join(f"`{layer}` reads {', '.join(f'`{op}`' for op in ops)}"
                      for layer, ops in list(strays.items())[:3])
    raise InputError(
        f"a variant computes ops the float model does not ({shown}"
        f"{'; ...' if len(strays) > 3 else ''}): plans over several variants are built on the "
        "float model, without those ops, so they would not measure the variants. Fix: see "
        "them with fxnumeric.compare(float_model, variant, data) (report.unmatched), and "
        "quantize the float model itself; or advise one variant at a time "
        "(advise(float_model, variant, data)), whose hybrids keep them")


def advise_variants(search: Any, target: float, *, nominal: bool = True,
                    layers: Iterable[str] | None = None, prune: bool = True,
                    max_float: int | None = None) -> dict[str, Any]:
    """Run the search of this module on a prepared ``_Search`` over several variants, with at
    most ``max_float`` layers kept float (any number when ``None``).

    Returns the fields of an :class:`~fxnumeric.Advice`: ``assignment``, ``bits``, ``value``,
    ``front``, ``curve``, ``reached``, ``message``, ``seconds``.
    """
    started = time.perf_counter()
    metric = search.metric
    meets = metric.meets
    found, unsearched = layer_choices(search.runner, nominal, layers)
    if max_float == 0:
        found = [replace(lc, choices=tuple(c for c in lc.choices if c[0] != FLOAT))
                 for lc in found]
        found = [lc for lc in found if lc.choices]
    kept, notes = _kept_quantized(search, found)
    noted = {name for name, _ in notes}
    unsearched = (*notes, *((n, r) for n, r in unsearched if n not in noted))
    plans = _Plans(search, found, kept)
    for lc in found:  # every swap can be built, or the layer is not offered
        for choice, _ in lc.choices:
            if choice != FLOAT:
                try:
                    search.runner.swaps(lc.name, "float", choice)
                except InstrumentationError as exc:
                    raise InputError(f"layer {lc.module}: {exc}") from exc
    _refuse_strays(search.runner.strays)
    plan = {lc.name: lc.choices[0][0] for lc in found}
    (value,) = plans.measure([plan], "cheapest plan")
    upgraded: list[str] = []
    while not meets(value, target):
        # each layer alone one step dearer, from the current plan: the metric bought per bit
        offers = _offers(plans, plan, value, (lc.name for lc in found), max_float)
        if not offers:
            break
        order = [o for o in offers if o.efficiency > 0]
        if not order:
            order = offers  # nothing helps alone: all, best first
        room = _float_room(plan, max_float)
        floats = [o for o in order if o.to == FLOAT][room:] if room < len(order) else []
        order = [o for o in order if o not in floats]  # no more float layers than allowed
        # the fewest upgrades, in order of efficiency, that reach the target
        steps = [(o.layer, o.to) for o in order]
        full = {**plan, **dict(steps)}
        (full_value,) = plans.measure([full], "all upgrades")
        if not meets(full_value, target):
            plan, value = full, full_value
            upgraded += [o.layer for o in order]
            continue
        hi, value = _fewest(plans, plan, steps, full_value, target, "upgrades")
        plan = {**plan, **dict(steps[:hi])}
        upgraded += [o.layer for o in order[:hi]]
    if prune and meets(value, target) and upgraded:
        plan, value, losses = _prune(plans, plan, value, target, upgraded, max_float)
        plan, value = _exchange(plans, plan, value, target, losses, upgraded, max_float)
    if meets(value, target):  # a cheaper plan run on the way (bisection, pruning) may meet it
        plan, value = plans.cheapest_meeting(target, plan, value, max_float)
    else:  # the dearest plan may read worse than one run on the way
        plan, value = plans.best(plan, value, max_float)
    reached = meets(value, target)
    bits = plans.bits(plan)
    counts: dict[str, int] = {}
    for choice in plan.values():
        counts[choice] = counts.get(choice, 0) + 1
    mix = ", ".join(f"{counts[c]} {c}" for c in sorted(counts, key=lambda c: -counts[c]))
    cmp = ">=" if metric.higher_is_better else "<="
    units = unit(metric.name)
    front = plans.front()
    if reached:
        # the front's first point: of the plans at the fewest bits (variants of equal cost
        # make several), the best verified, as advice.table() shows it
        message = (f"{len(found)} layers at {bits:.2f} average weight bits ({mix}) reach "
                   f"{metric.name} {shown(value, target)}{units} {cmp} {target:g}{units} "
                   f"(cheapest plan: {front[0][0]:.2f} bits, "
                   f"{shown(front[0][1], target)}{units})")
    else:
        message = (f"target {metric.name} {cmp} {target:g}{units} NOT reached: best found "
                   f"{shown(value, target)}{units} "
                   f"at {bits:.2f} average weight bits ({mix}), "
                   + ("even with every layer at its dearest choice"
                      if max_float is None or max_float >= len(found)
                      else f"with at most {max_float} layer{'' if max_float == 1 else 's'} float "
                           "(max_float_layers)"))
    message += _unsearched_note(unsearched)
    return {
        "assignment": {plans.by_name[n].module: c for n, c in plan.items()},
        "bits": bits, "value": value, "reached": reached, "message": message,
        "front": front, "curve": tuple(v for _, v in front),
        "seconds": time.perf_counter() - started, "layers": tuple(found),
        "unsearched": unsearched,
    }


def _unsearched_note(unsearched: tuple[tuple[str, str], ...]) -> str:
    """The end of the message naming the quantized ops the search does not choose a precision
    for: those quantized in every plan, those quantized or float as the variant they follow
    has them, and those float in every plan."""
    kinds = {"quantized in every plan": "stay quantized in every plan",
             "quantized or float in each plan": "are quantized or float in each plan, as the "
                                                "variant they follow has them"}
    groups: dict[str, list[str]] = {}
    for name, reason in unsearched:
        kind = next((says for key, says in kinds.items() if key in reason),
                    "stay float in every plan")
        groups.setdefault(kind, []).append(name)
    note = ""
    for says in (*kinds.values(), "stay float in every plan"):
        names = groups.get(says)
        if not names:
            continue
        one = len(names) == 1
        verb = says if not one else says.replace("stay ", "stays ").replace("are ", "is ")
        note += (f"; {len(names)} quantized {'op' if one else 'ops'} the search does not "
                 f"choose a precision for {verb} ({', '.join(names[:3])}"
                 f"{', ...' if len(names) > 3 else ''}: advice.unsearched)")
    return note


def _float_room(plan: Mapping[str, str], max_float: int | None) -> float:
    """How many more layers ``plan`` may keep float (negative: too many already)."""
    if max_float is None:
        return math.inf
    return max_float - sum(choice == FLOAT for choice in plan.values())


def _prune(plans: _Plans, plan: dict[str, str], value: float, target: float,
           upgraded: list[str], max_float: int | None
           ) -> tuple[dict[str, str], float, dict[str, float]]:
    """Undo every upgrade the target does without, largest layer first, each verified: each
    upgraded layer takes the cheapest of its cheaper choices that still meets the target, not
    only the one below its own. A dearer choice is not always a better one (an FX variant with
    per-channel float64 scales costs more than a per-tensor pt2e one and may read worse), so
    the search can pass a cheap good choice on its way up."""
    metric = plans.search.metric
    order = sorted(dict.fromkeys(upgraded), key=lambda n: -plans.by_name[n].numel)
    losses: dict[str, float] = {}
    for name in order:
        lc = plans.by_name[name]
        names = [c for c, _ in lc.choices]
        for cheaper in names[:names.index(plan[name])]:
            trial = {**plan, name: cheaper}
            if _float_room(trial, max_float) < 0:
                continue
            (v,) = plans.measure([trial], "pruning")
            if metric.meets(v, target):
                plan, value = trial, v
                break
            if cheaper == names[names.index(plan[name]) - 1]:
                losses[name] = metric.utility(value) - metric.utility(v)
    return plan, value, losses


@dataclass(frozen=True)
class _Offer:
    """One upgrade measured alone from a plan: ``layer`` to ``to``, the metric it bought
    (``gain``, as utility; negative where it cost) and the average bits it adds."""

    layer: str
    to: str
    gain: float
    bits: float

    @property
    def efficiency(self) -> float:
        """The metric bought per bit (a free upgrade that helps: infinite)."""
        if self.bits > 0:
            return self.gain / self.bits
        return math.inf if self.gain > 0 else -math.inf


def _offers(plans: _Plans, plan: dict[str, str], value: float, layers: Iterable[str],
            max_float: int | None) -> list[_Offer]:
    """Each of ``layers`` upgraded alone one step from ``plan`` (to float only while
    ``max_float`` leaves room), each a real hybrid, most efficient first."""
    u = plans.search.metric.utility
    room = _float_room(plan, max_float)
    steps = {n: _upgrade(plans.by_name[n], plan[n]) for n in layers}
    steps = {n: c for n, c in steps.items() if c is not None and (c != FLOAT or room > 0)}
    values = plans.measure([{**plan, n: c} for n, c in steps.items()],
                           f"upgrade each of {len(steps)} layers")
    bits = plans.bits(plan)
    offers = [_Offer(n, c, u(v) - u(value), plans.bits({**plan, n: c}) - bits)
              for (n, c), v in zip(steps.items(), values, strict=True)]
    return sorted(offers, key=lambda o: -o.efficiency)


def _fewest(plans: _Plans, plan: dict[str, str], steps: list[tuple[str, str]], full: float,
            target: float, label: str) -> tuple[int, float]:
    """The fewest of ``steps`` (a prefix) that make ``plan`` meet ``target``, by bisection,
    each probe a real hybrid, and the metric it reads; ``full``: the metric of ``plan`` with
    all of them, which meets the target. ``plan`` itself is taken not to."""
    meets = plans.search.metric.meets
    lo, hi, best = 0, len(steps), full
    while lo + 1 < hi:
        mid = (lo + hi) // 2
        (v,) = plans.measure([{**plan, **dict(steps[:mid])}], f"first {mid} {label}")
        if meets(v, target):
            hi, best = mid, v
        else:
            lo = mid
    return hi, best


def _exchange(plans: _Plans, plan: dict[str, str], value: float, target: float,
              losses: Mapping[str, float], upgraded: Iterable[str], max_float: int | None
              ) -> tuple[dict[str, str], float]:
    """Trade upgrades the target cannot do without, largest layer first, for cheaper ones of
    other layers, then prune again: undo one upgrade a step and take the fewest of the other
    layers' upgrades (most efficient first) that cost fewer bits together and meet the
    target again, each trade a real hybrid, found by bisection.

    Pruning undoes one upgrade at a time, so it keeps a large layer's upgrade whenever undoing
    it alone misses the target, even when a few small layers' upgrades would make up for it
    at fewer bits: the fill's order comes from each layer's gain alone from the plan it
    started from, and its last upgrades may be large layers that overshoot. What an upgrade
    buys depends on the rest of the plan (two layers' errors may cancel), so the upgrades left
    out (``upgraded``: the layers the fill upgraded, pruned back or not, are not offered)
    are measured again, each alone from the pruned plan. A trade is tried only when the
    ones that fit in the bits it frees are expected to make up for the loss: the sum of their
    gains at least what undoing the upgrade lost (measured by pruning) less the plan's margin
    over the target. The expectation only chooses which trades to run; each one is kept only
    when its hybrid meets the target. Pruning undid each upgrade in the plan of its turn,
    and the trades change the plan further, so it runs once more over the upgrades left.
    """
    metric = plans.search.metric
    u = metric.utility
    upgraded = set(upgraded)
    offers = [o for o in _offers(plans, plan, value, (lc.name for lc in plans.layers
                                                      if lc.name not in upgraded), max_float)
              if o.gain > 0]
    taken: set[str] = set()
    for name in sorted(losses, key=lambda n: -plans.by_name[n].numel):
        names = [c for c, _ in plans.by_name[name].choices]
        i = names.index(plan[name])
        if i == 0:
            continue
        down = {**plan, name: names[i - 1]}
        freed = plans.bits(plan) - plans.bits(down)
        fits: list[tuple[str, str]] = []
        spent = gain = 0.0
        for offer in offers:
            if offer.layer in taken:
                continue
            if spent + offer.bits < freed and (max_float is None or _float_room(
                    {**down, **dict(fits), offer.layer: offer.to}, max_float) >= 0):
                fits.append((offer.layer, offer.to))
                spent += offer.bits
                gain += offer.gain
        if not fits or gain < losses[name] - (u(value) - u(target)):
            continue
        (full,) = plans.measure([{**down, **dict(fits)}], f"trade {name}")
        if not metric.meets(full, target):
            continue
        hi, v = _fewest(plans, down, fits, full, target, "trades")
        plan, value = {**down, **dict(fits[:hi])}, v
        taken.update(layer for layer, _ in fits[:hi])
        taken.add(name)
    now = [lc.name for lc in plans.layers if plan[lc.name] != lc.choices[0][0]]
    plan, value, _ = _prune(plans, plan, value, target, now, max_float)
    return plan, value
