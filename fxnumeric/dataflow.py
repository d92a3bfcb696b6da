"""Which ops feed which: the data flow between a matching's pairs, read on the float graphs.

Every value of a float graph is an op's output, so the ops a pair reads are the pairs owning
the nodes its float subgraph takes as arguments. Plumbing between two ops (a ``view``, a
``getitem``, any node no pair owns) computes nothing to compare and is walked through::

    float:   linear_1 -> view -> getitem -> linear_2
    feeding: {"linear_1": (), "linear_2": ("linear_1",)}

A model captured through its module tree (:func:`fxnumeric.match` on a model torch.fx cannot
trace whole) has one graph per region, and the code between the regions (a decoder layer's
residual adds) is not traced: the graphs alone do not say what a region's inputs hold.
:func:`value_sources` finds out by running the float model once: a value crossing into a
region is an op's output (or a view of it: the same storage), a model input, or something
the untraced code computed, which no op's row measures::

    Top.forward (untraced):  h = self.pre(x); return self.block(x, h)
    block (a region):        fc(x) + res
    sources:                 block's x: model input; block's res: `pre`

Without them (:func:`feeding_ops` with no sources), a region's inputs name no op;
:func:`upstream_ops`, which must not miss an upstream op, takes every op run before the call.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._tensors import copy_inputs, version
from .instrument import observe_values
from .match import Matching, Region
from .pairing import op_name
from .run import as_call, run_model

__all__ = ["feeding_ops", "upstream_ops", "value_sources", "op_reads", "model_inputs", "Source",
           "OpReads"]


@dataclass(frozen=True)
class Source:
    """Where a value crossing into a region comes from: an op's output (``op``, the name of
    the call site that wrote it: ``layer.fc#2`` for the second call of a region called
    twice) or a model input (``model_input``, its place in the
    batch: ``"input_ids"`` for a keyword input, ``"[0]"`` for the first positional one)."""

    op: str | None = None
    model_input: str | None = None


Sources = Mapping[tuple[str, str, int], tuple[Source | None, ...]]
"""``{(region float path, placeholder name, call site): the source of each tensor it holds}``
(``None``: computed by code no graph holds; a placeholder holding no tensor has none)."""


@dataclass(frozen=True)
class OpReads:
    """What one op's float subgraph reads (:func:`op_reads`).

    Attributes:
        ops: the ops whose values it reads, in order, without repeats.
        model_inputs: the model inputs it reads as they are (see :class:`Source`).
        unresolved: the region inputs it reads whose producer is not known: computed by
            untraced code (a decoder layer's residual add), or no run says
            (``"<region>.<placeholder>"``).
    """

    ops: tuple[str, ...] = ()
    model_inputs: tuple[str, ...] = ()
    unresolved: tuple[str, ...] = ()


def _reads(matching: Matching, sources: Sources | None = None,
           key: Callable[[str], str] = op_name,
           ) -> tuple[dict[str, dict[str, None]], dict[str, int], dict[str, OpReads]]:
    """``(feeding, region_inputs, reads)``: for each op, the ops its float subgraph reads (in
    order, without repeats); without ``sources``, for the ops reading an input of a region
    that is not the whole model, how many of ``matching.pairs`` ran before that region's call
    (the earliest call); with them, each op's :class:`OpReads`, region inputs resolved.

    Ops are named by ``key`` of their pairs' names: :func:`~fxnumeric.pairing.op_name` merges
    an op's call sites, the identity keeps them apart."""
    # a node's pair within one call of its region: a region its parent calls twice has the
    # same nodes at both call sites, each call reading its own call's values
    by_float_node = {(matching.region_of(p).call_site(p), n): p
                     for p in reversed(matching.pairs) for n in p.float_nodes}
    call_start: dict[tuple[Region, int], int] = {}
    feeding: dict[str, dict[str, None]] = {}
    region_inputs: dict[str, int] = {}
    from_models: dict[str, dict[str, None]] = {}
    unresolved: dict[str, dict[str, None]] = {}
    for index, pair in enumerate(matching.pairs):
        region = matching.region_of(pair)
        start = call_start.setdefault((region, region.call_site(pair)), index)
        chain = region.chain(pair, "float")
        name = key(pair.name)
        site = region.call_site(pair)
        read = feeding.setdefault(name, {})
        from_model = from_models.setdefault(name, {})
        unknown = unresolved.setdefault(name, {})
        seen = set(chain)
        pending = [arg for node in reversed(chain) for arg in reversed(node.all_input_nodes)]
        while pending:  # depth first, arguments in order: a plumbing node's own ones first
            arg = pending.pop()
            if arg in seen:
                continue
            seen.add(arg)
            # a model input counts when an input quantize pairs with it (static quantization)
            producer = by_float_node.get((site, region.float_name(arg)))
            if producer is not None:
                if producer is not pair:
                    read[key(producer.name)] = None
            elif arg.op == "placeholder" and sources is not None:
                found = sources.get((region.float_path, arg.name, site))
                if found is None:  # the run never called this region (call site)
                    unknown[_prefixed(region.float_path, arg.name)] = None
                for source in found or ():
                    if source is None:
                        unknown[_prefixed(region.float_path, arg.name)] = None
                    elif source.model_input is not None:
                        from_model[source.model_input] = None
                    elif source.op is not None:  # its own earlier call too, as in a graph
                        read[key(source.op)] = None
            elif arg.op == "placeholder":
                # a region input: computed before the call, if the order of calls is known
                if region is not matching.root and matching.call_order:
                    region_inputs[name] = min(region_inputs.get(name, start), start)
            else:
                pending.extend(reversed(arg.all_input_nodes))
    reads = {name: OpReads(tuple(ops), tuple(from_models[name]), tuple(unresolved[name]))
             for name, ops in feeding.items()}
    return feeding, region_inputs, reads


def _prefixed(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _tensors(value: Any, place: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(place, tensor)`` for every tensor in ``value`` (tuples, lists, dicts walked)."""
    if isinstance(value, torch.Tensor):
        yield place, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{place}[{i}]")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{place}[{key!r}]" if place else str(key))


def model_inputs(batch: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` as the model is called with them, by their place in it
    (:class:`Source`'s ``model_input``)."""
    args, kwargs = as_call(batch)
    return dict(_tensors(list(args)) if args else ()) | dict(_tensors(kwargs))


def _storage(t: torch.Tensor) -> tuple[str, int] | None:
    """What identifies the memory a tensor's values live in (a view shares its base's)."""
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # quantized, sparse, subclasses
        return None
    return (str(t.device), ptr) if ptr else None


class _Tracker:
    """The float run's record: which op last wrote each storage, and what region inputs held."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        # the storage's writer, and its in-place count then: code no graph holds writing it
        # in place since (a residual ``h += x``) makes it a value no op computed
        self.writer: dict[tuple[str, int], tuple[Source, int | None]] = {}
        for place, tensor in inputs.items():
            key = _storage(tensor)
            if key is not None:
                self.writer.setdefault(key, (Source(model_input=place), version(tensor)))
        self.keep: list[Any] = [inputs]  # no storage is freed, and reused, during the run
        self.found: dict[tuple[str, str, int], tuple[Source | None, ...]] = {}

    def source(self, t: torch.Tensor) -> Source | None:
        """Who wrote what ``t`` holds, if an op or the batch did and nothing changed it since."""
        key = _storage(t)
        source, then = self.writer.get(key, (None, None)) if key is not None else (None, None)
        return source if then == version(t) else None

    def wrote(self, op: str, t: torch.Tensor) -> None:
        key = _storage(t)
        if key is not None:
            self.writer[key] = (Source(op=op), version(t))


class _Observe(nn.Module):
    """Observes one value of the float run: a region input (``reads``: where each of its
    tensors came from) and/or an op's output (``op``: it now holds those storages)."""

    reads_at_call = True  # only the storage is looked at, never the values

    def __init__(self, tracker: _Tracker, key: tuple[str, str, int], reads: bool,
                 op: str | None) -> None:
        super().__init__()
        self.key, self.reads, self.op = key, reads, op
        self.tracker = [tracker]  # a list: not a submodule

    def forward(self, value: Any) -> None:
        tracker = self.tracker[0]
        tracker.keep.append(value)
        tensors = [t for _, t in _tensors(value)]
        if self.reads and self.key not in tracker.found:  # the first batch's calls
            tracker.found[self.key] = tuple(tracker.source(t) for t in tensors)
        if self.op is not None:
            for t in tensors:
                tracker.wrote(self.op, t)


def value_sources(matching: Matching, batch: Any) -> Sources:
    """Where each region input's tensors come from, found by running the float model on
    ``batch`` once: for every region, placeholder and call site, the :class:`Source` of each
    tensor it holds (``None``: computed by code no graph holds).

    A value is an op's output when it lives in the memory that op's output (its value as
    :meth:`~fxnumeric.match.Region.output_nodes` gives it) last wrote: the output itself, a
    view or slice of it, unless something wrote it in place since: another op (it is that
    op's value then), or code no graph holds (no op's value).

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> from fxnumeric import match
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> m = match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear}))
        >>> value_sources(m, torch.randn(2, 4))
        {('', 'input_1', 0): (Source(op=None, model_input='[0]'),)}
    """
    batch = copy_inputs(batch)  # the run's own tensors, followed through it (run_model)
    tracker = _Tracker(model_inputs(batch))
    wanted: dict[tuple[str, str, int], tuple[bool, str | None]] = {}
    for region in matching.regions:
        for site in range(region.call_sites):
            for node in region.float_view.gm.graph.find_nodes(op="placeholder"):
                wanted[(region.float_path, node.name, site)] = (True, None)
        for pair in region.pairs:
            key = (region.float_path, region.output_nodes(pair)[0].name, region.call_site(pair))
            wanted[key] = (wanted.get(key, (False, None))[0], pair.name)
    observers = {key: _Observe(tracker, key, reads, op) for key, (reads, op) in wanted.items()}
    run_model(observe_values(matching, "float", observers), batch, which="float", own=True)
    return tracker.found


def op_reads(matching: Matching, sources: Sources, *, call_sites: bool = False,
             ) -> dict[str, OpReads]:
    """For each op, what its float subgraph reads (:class:`OpReads`), through plumbing, region
    inputs resolved with ``sources`` (:func:`value_sources`).

    The ops are named by :func:`~fxnumeric.pairing.op_name`, the call sites of one op merged;
    with ``call_sites``, by pair name, each call site apart (``relu`` and ``relu#2``, as a
    :func:`fxnumeric.compare` report's rows), each reading the call sites that computed its
    values.
    """
    return _reads(matching, sources, (lambda name: name) if call_sites else op_name)[2]


def feeding_ops(matching: Matching) -> dict[str, tuple[str, ...]]:
    """For each op (:func:`~fxnumeric.pairing.op_name` of its pairs), the ops whose values its
    float subgraph reads, in order, without repeats: through plumbing, within its graph (a
    region's inputs, computed by code no graph holds, name no op).

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> from fxnumeric import match
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> feeding_ops(match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})))
        {'0': (), '1': ('0',)}
    """
    feeding, _, _ = _reads(matching)
    return {name: tuple(ops) for name, ops in feeding.items()}


def upstream_ops(matching: Matching, stop: Collection[str] = (),
                 ) -> dict[str, frozenset[str]]:
    """For each op, every op whose value reaches it (its transitive :func:`feeding_ops`), not
    itself unless it reads its own earlier call; not walked past the ops of ``stop``
    (themselves included): what is upstream of a ``stop`` op is not upstream of its readers
    through it.

    An op reading an input of a region (a model captured through its module tree) counts every
    op run before that region's call as upstream: the untraced code between regions could
    have read any of them, and none run after it (nothing downstream is ever counted). A
    matching made without example inputs has no recorded order of calls (its pairs are in
    region order): there a region input adds no upstream op.
    """
    feeding, region_inputs, _ = _reads(matching)
    run_before: list[str] = [op_name(p.name) for p in matching.pairs]
    upstream = {name: set(ops) | set(run_before[:region_inputs.get(name, 0)])
                for name, ops in feeding.items()}
    changed = True
    while changed:  # in run order one pass nearly does; more where call sites read each other
        changed = False
        for name, ups in upstream.items():
            size = len(ups)
            ups.update(*(upstream[op] for op in feeding[name] if op not in stop))
            changed = changed or len(ups) > size
    return {name: frozenset(ups) for name, ups in upstream.items()}
