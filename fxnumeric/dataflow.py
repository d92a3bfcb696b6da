"""Which ops feed which: the data flow between a matching's pairs, read on the float graphs.

Every value of a float graph is an op's output, so the ops a pair reads are the pairs owning
the nodes its float subgraph takes as arguments. Plumbing between two ops (a ``view``, a
``getitem``, any node no pair owns) computes nothing to compare and is walked through::

    float:   linear_1 -> view -> getitem -> linear_2
    feeding: {"linear_1": (), "linear_2": ("linear_1",)}

A model captured through its module tree (:func:`fxnumeric.match` on a model torch.fx cannot
trace whole) has one graph per region, and the code between the regions (a decoder layer's
residual adds) is not traced: what a region's inputs hold is unknown beyond that it was
computed before the region's call. :func:`feeding_ops` says only what the graphs show;
:func:`upstream_ops`, which must not miss an upstream op, takes every op run before the call.
"""

from __future__ import annotations

from .match import Matching, Region
from .pairing import op_name

__all__ = ["feeding_ops", "upstream_ops"]


def _reads(matching: Matching) -> tuple[dict[str, dict[str, None]], dict[str, int]]:
    """``(feeding, region_inputs)``: for each op, the ops its float subgraph reads (in order,
    without repeats), and for the ops reading an input of a region that is not the whole
    model, how many of ``matching.pairs`` ran before that region's call (the earliest call)."""
    by_float_node = {n: p for p in reversed(matching.pairs) for n in p.float_nodes}
    call_start: dict[tuple[Region, int], int] = {}
    feeding: dict[str, dict[str, None]] = {}
    region_inputs: dict[str, int] = {}
    for index, pair in enumerate(matching.pairs):
        region = matching.region_of(pair)
        start = call_start.setdefault((region, region.call_site(pair)), index)
        chain = region.chain(pair, "float")
        read = feeding.setdefault(op_name(pair.name), {})
        seen = set(chain)
        pending = [arg for node in reversed(chain) for arg in reversed(node.all_input_nodes)]
        while pending:  # depth first, arguments in order: a plumbing node's own ones first
            arg = pending.pop()
            if arg in seen:
                continue
            seen.add(arg)
            # a model input counts when an input quantize pairs with it (static quantization)
            producer = by_float_node.get(region.float_name(arg))
            if producer is not None:
                if producer is not pair:
                    read[op_name(producer.name)] = None
            elif arg.op == "placeholder":
                # a region input: computed before the call, if the order of calls is known
                if region is not matching.root and matching.call_order:
                    name = op_name(pair.name)
                    region_inputs[name] = min(region_inputs.get(name, start), start)
            else:
                pending.extend(reversed(arg.all_input_nodes))
    return feeding, region_inputs


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
    feeding, _ = _reads(matching)
    return {name: tuple(ops) for name, ops in feeding.items()}


def upstream_ops(matching: Matching) -> dict[str, frozenset[str]]:
    """For each op, every op whose value reaches it (its transitive :func:`feeding_ops`), not
    itself unless it reads its own earlier call.

    An op reading an input of a region (a model captured through its module tree) counts every
    op run before that region's call as upstream: the untraced code between regions could
    have read any of them, and none run after it (nothing downstream is ever counted). A
    matching made without example inputs has no recorded order of calls (its pairs are in
    region order): there a region input adds no upstream op.
    """
    feeding, region_inputs = _reads(matching)
    run_before: list[str] = [op_name(p.name) for p in matching.pairs]
    upstream = {name: set(ops) | set(run_before[:region_inputs.get(name, 0)])
                for name, ops in feeding.items()}
    changed = True
    while changed:  # in run order one pass nearly does; more where call sites read each other
        changed = False
        for name, ups in upstream.items():
            size = len(ups)
            ups.update(*(upstream[op] for op in feeding[name]))
            changed = changed or len(ups) > size
    return {name: frozenset(ups) for name, ups in upstream.items()}
