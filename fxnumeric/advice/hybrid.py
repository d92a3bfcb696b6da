"""Hybrid models: the float graph with some layers quantized, or the quantized graph with some
layers float, built from a :class:`~fxnumeric.Matching` without re-quantizing anything.

A *swap* replaces one pair's subgraph in a *base* graph with the pair's subgraph from the
other graph::

    base = quantized, pair `fc2` kept float ("all but fc2 quantized"):

        q_x -> qfc1 -> [dequantize -> float fc2 -> quantize(scale, zp of qfc2's output)] -> qfc3
                                                    (only where a quantized op reads it)

    base = float, pair `fc2` quantized ("only fc2 quantized"):

        x -> fc1 -> [quantize(scale, zp of qfc2's input) -> qfc2 -> dequantize] -> ...

Values cross between the two sides in the form the quantized model uses at that point: a
float value entering the quantized side runs through the quantized model's own quantize (and
dequantize) nodes in front of the layer, or is quantized with the qparams of the quantized
model's own tensor there (read from a reference run of the quantized model) when the layer
reads another quantized op directly; a quantized value entering the float side is
dequantized; dynamic-quantized layers take and return float tensors, so nothing is converted
around them. A float layer's output is requantized only where a quantized op reads it.

:class:`HybridRunner` runs both reference models node by node once per batch and keeps every
node's value, so a hybrid recomputes only the nodes downstream of its swaps (the common
prefix, and parallel branches that do not read a swapped layer, are reused).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._tensors import dequantize_all
from ..errors import InputError, InstrumentationError
from ..match import Matching, Pair
from ..run import as_args
from ..view import GraphView

__all__ = ["Swap", "HybridRunner", "layer_names", "module_path", "function_target"]


def layer_names(matching: Matching) -> list[str]:
    """Names of the pairs that compute in quantized form, in graph order, without repeats.

    These are the layers a hybrid can swap (a module called twice is one layer).
    """
    return list(dict.fromkeys(p.name for p in matching.pairs if p.quantized))


def module_path(matching: Matching, name: str) -> str:
    """The float model's module path of layer ``name`` (the name the user's flow configures).

    The module the layer's first float node (its head op) calls; for an exported (pt2e) graph,
    whose ops are functions, the innermost module of the node's ``nn_module_stack`` when that
    is a leaf module (a Linear); else the pair name (a function op such as a residual ``add``,
    whose fused ``relu`` module is not the layer: see :func:`function_target`).
    """
    for p in matching.pairs:
        if p.name == name:
            node = matching.float_node(p.float_nodes[0])  # the head op: conv of conv-bn-relu
            if node.op == "call_module":
                return str(node.target)
            path = _scope(node)
            if path and _is_leaf(matching, path):
                return path
            break
    return name


def function_target(matching: Matching, name: str) -> tuple[str, Any, int] | None:
    """For a layer that is a function op (no module of its own), what FX's ``QConfigMapping``
    names it by: ``(module path, function, index)`` for ``set_module_name_object_type_order``
    (the index counts the calls of that function inside that module, in graph order)."""
    if module_path(matching, name) != name:
        return None
    pair = next((p for p in matching.pairs if p.name == name), None)
    if pair is None:
        return None
    node = matching.float_node(pair.float_nodes[0])
    if node.op != "call_function":
        return None
    scope = _scope(node) or ""
    index = 0
    for other in matching.float_view.nodes:
        if other is node:
            return scope, node.target, index
        if other.op == "call_function" and other.target == node.target and (
                (_scope(other) or "") == scope):
            index += 1
    return None


def _scope(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.values())[-1][0]) or None


def _is_leaf(matching: Matching, path: str) -> bool:
    root = matching.float_view.root
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return True  # an exported graph keeps no module tree: trust its stack
    return not any(True for _ in module.children())


@dataclass(frozen=True)
class Swap:
    """One pair's subgraph from the ``other`` graph in place of its subgraph in the base graph.

    Attributes:
        name: the pair's name.
        base: ``"float"`` or ``"quant"``: which graph the swap is made in.
        skip: base-graph nodes not run (the pair's chain and the plumbing inside it).
        out: the base-graph node whose value the swap provides.
        nodes: other-graph nodes run instead, in order (get_attr nodes are read on demand).
        inputs: ``(other-graph node, base-graph node)``: where each outside value the other
            subgraph reads comes from in the base graph.
        other_out: the other-graph node whose value becomes ``out``'s value.
    """

    name: str
    base: str
    skip: frozenset[str]
    out: str
    nodes: tuple[str, ...]
    inputs: tuple[tuple[str, str], ...]
    other_out: str


class _Graph:
    """One side's :class:`~fxnumeric.GraphView`, with what running it node by node needs."""

    def __init__(self, view: GraphView) -> None:
        self.view = view
        self.gm = view.gm
        self.nodes = view.nodes
        self.modules = view.modules
        self.position = {n.name: view.position(n) for n in self.nodes}
        self._attrs: dict[str, Any] = {}
        self._constant: dict[str, bool] = {}
        self.writes_input = {n.name for n in self.nodes if _writes_first_input(n, self.modules)}

    def node(self, name: str) -> fx.Node:
        return self.view.node(name)

    def attr(self, node: fx.Node) -> Any:
        if node.name not in self._attrs:
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            self._attrs[node.name] = obj
        return self._attrs[node.name]

    def execute(self, node: fx.Node, env: dict[str, Any]) -> Any:
        """Run one compute node on the values in ``env`` (keyed by node name)."""

        def value(n: fx.Node) -> Any:
            return self.attr(n) if n.op == "get_attr" else env[n.name]

        args = fx.map_arg(node.args, value)
        kwargs = fx.map_arg(node.kwargs, value)
        if node.name in self.writes_input and args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(), *args[1:])  # never let a hybrid write into a shared value
        try:
            if node.op == "call_module":
                return self.modules[str(node.target)](*args, **kwargs)
            if node.op == "call_function":
                return node.target(*args, **kwargs)  # type: ignore[operator]
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise _NodeFailure(node, exc) from exc

    def inside(self, chain: Sequence[str]) -> list[str]:
        """``chain`` with the plumbing between its nodes, in graph order."""
        return [n.name for n in self.view.with_plumbing([self.node(c) for c in chain])]

    def external_inputs(self, inside: Sequence[str]) -> list[str]:
        """Nodes outside ``inside`` that it reads (get_attr excepted), in first-use order."""
        members = set(inside)
        out: list[str] = []
        for name in inside:
            for i in self.node(name).all_input_nodes:
                if i.name not in members and i.op != "get_attr" and i.name not in out:
                    out.append(i.name)
        return out

    def with_constants(self, inside: list[str]) -> list[str]:
        """``inside`` plus the outside nodes it reads that compute from constants only (a
        pt2e weight's ``dequantize`` of its int8 parameter), in graph order."""
        members = set(inside)
        todo = [n for n in self.external_inputs(inside) if self.constant(self.node(n))]
        while todo:
            name = todo.pop()
            if name not in members:
                members.add(name)
                todo += [i.name for i in self.node(name).all_input_nodes if i.op != "get_attr"]
        return sorted(members, key=self.position.__getitem__)

    def constant(self, node: fx.Node) -> bool:
        """Whether ``node``'s value depends on no model input (only attributes)."""
        if node.name not in self._constant:
            if node.op in ("placeholder", "output"):
                self._constant[node.name] = False
            elif node.op == "get_attr":
                self._constant[node.name] = True
            else:
                self._constant[node.name] = all(self.constant(i) for i in node.all_input_nodes)
        return self._constant[node.name]


def _writes_first_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    name = getattr(node.target, "__name__", str(node.target))
    if node.kwargs.get("inplace"):
        return True
    return name in ("iadd", "imul", "isub", "itruediv") or (
        name.endswith("_") and not name.startswith("_"))


def _is_dequantize(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(str(node.target))).__name__ in ("DeQuantize", "DeQuantStub")
    return getattr(node.target, "__name__", str(node.target)) == "dequantize"


def _is_quantized(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_quantized


def _like(value: Any, ref: Any) -> Any:
    """``value`` (float) in the form of ``ref``: quantized with ``ref``'s qparams if it is."""
    if isinstance(ref, torch.Tensor) and isinstance(value, torch.Tensor):
        if not ref.is_quantized:
            return value
        value = value.dequantize() if value.is_quantized else value
        if ref.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return torch.quantize_per_tensor(value, ref.q_scale(), ref.q_zero_point(), ref.dtype)
        return torch.quantize_per_channel(
            value, ref.q_per_channel_scales(), ref.q_per_channel_zero_points(),
            ref.q_per_channel_axis(), ref.dtype,
        )
    if (isinstance(ref, (tuple, list)) and isinstance(value, (tuple, list))
            and len(ref) == len(value)):
        return type(ref)(_like(v, r) for v, r in zip(value, ref, strict=True))
    return value


class HybridRunner:
    """Runs hybrids of one float/quantized pair, reusing the reference runs of both models.

    Call :meth:`reference` once per batch; then :meth:`run` any number of hybrids on it.
    Nothing here modifies the user's models: nodes call the models' own modules in eval mode.
    """

    def __init__(self, matching: Matching) -> None:
        self.matching = matching
        self.float = _Graph(matching.float_view)
        self.quant = _Graph(matching.quant_view)
        self._swaps: dict[tuple[str, str], tuple[Swap, ...]] = {}
        self.layers = layer_names(matching)

    # ------------------------------------------------------------------ building swaps
    def swaps(self, name: str, base: str, *, shadow: bool = False) -> tuple[Swap, ...]:
        """The swaps that replace layer ``name`` (every call of it) in the ``base`` graph.

        With ``shadow=True`` (quantized base only) the float subgraph reads exactly the values
        the quantized layer reads (FX's quantize in front of it included), as a shadow does:
        what :meth:`local_float` needs to measure the error the layer adds by itself.
        """
        key = (name, base, shadow)
        if key not in self._swaps:
            pairs = [p for p in self.matching.pairs if p.name == name]
            if not pairs:
                raise InstrumentationError(
                    f"no layer is named {name!r}; layers are: {', '.join(self.layers[:20])}"
                )
            self._swaps[key] = tuple(self._swap(p, base, shadow) for p in pairs)
        return self._swaps[key]

    def _swap(self, pair: Pair, base: str, shadow: bool = False) -> Swap:
        if base == "quant":
            base_g, other_g = self.quant, self.float
            base_chain, other_chain = pair.quant_nodes, pair.float_nodes
        else:
            base_g, other_g = self.float, self.quant
            base_chain, other_chain = pair.float_nodes, pair.quant_nodes
        read = self._chain_reads(pair) if shadow and base == "quant" else {}
        other_inside = other_g.inside(other_chain)
        base_inside = base_g.inside(base_chain)
        other_out, out = other_chain[-1], base_chain[-1]
        # where the quantized graph quantizes the layer's output itself (reference FX, pt2e:
        # op -> quantize -> dequantize), the layer ends after that
        tail = self._output_tail(pair)
        if tail and base == "float":
            other_inside, other_out = other_inside + tail, tail[-1]
        elif tail:
            base_inside, out = base_inside + tail, tail[-1]
        other_inside = other_g.with_constants(other_inside)
        if base == "float":
            # the quantized model's own quantize (and dequantize) nodes in front of the layer
            # are run again on the float values: the inputs get exactly its qparams
            other_inside = self.quant.with_constants(sorted(
                set(other_inside).union(*(self._quantize_path(e)
                                          for e in other_g.external_inputs(other_inside))),
                key=self.quant.position.__getitem__))
        inputs = []
        for ext in other_g.external_inputs(other_inside):
            carrier = (self.matching.float_view.producer(self.matching.float_node(ext))
                       if read else None)
            provider = read.get(carrier.name) if carrier is not None else None
            provider = provider or self._provider(ext, base)
            if provider is None or base_g.position[provider] >= base_g.position[out]:
                side = "float" if base == "quant" else "quantized"
                raise InstrumentationError(
                    f"layer `{pair.name}`: the {side} subgraph reads `{ext}`, which has no "
                    "counterpart before the layer in the other model, so the layer cannot be "
                    "swapped. Leave it out of the search (see Matching.explain)."
                )
            inputs.append((ext, provider))
        return Swap(
            name=pair.name, base=base, skip=frozenset(base_inside), out=out,
            nodes=tuple(other_inside), inputs=tuple(inputs), other_out=other_out,
        )

    def _quantize_path(self, name: str) -> list[str]:
        """The quantize and plumbing nodes from quantized node ``name`` back to the op (or
        input) whose value they carry, ``name`` included; empty if ``name`` is that op."""
        g = self.quant
        node = g.node(name)
        path: list[str] = []
        while node.all_input_nodes and node.all_input_nodes[0].op != "get_attr":
            c = g.view.op_class(node)
            if c is None or c.role not in ("plumbing", "optional"):
                break
            path.append(node.name)
            node = node.all_input_nodes[0]
        return path

    def _output_tail(self, pair: Pair) -> list[str]:
        """The quantized nodes from the pair's last op to its value node, in order (or none)."""
        value_node = self.matching.output_nodes(pair)[1]
        tail: list[str] = []
        node = value_node
        while node.name != pair.quant_nodes[-1] and node.all_input_nodes:
            tail.append(node.name)
            node = node.all_input_nodes[0]
        return list(reversed(tail)) if node.name == pair.quant_nodes[-1] else []

    def _chain_reads(self, pair: Pair) -> dict[str, str]:
        """Float node -> the quantized node whose value the pair's quantized chain reads."""
        m = self.matching
        chain = {m.quant_node(n) for n in pair.quant_nodes}
        read: dict[str, str] = {}
        for n in chain:
            for i in n.all_input_nodes:
                q = m.quant_view.producer(i)
                f = m.float_counterpart(q) if q is not None and q not in chain else None
                if f is not None:
                    read.setdefault(f.name, i.name)  # the value as the chain reads it
        return read

    def _provider(self, other_node: str, base: str) -> str | None:
        """The base-graph node that carries the value ``other_node`` holds in its own graph.

        Into a quantized base, a float input comes from the quantized node computing the same
        value: a pair's own output, else the earliest carrier (a model input rather than the
        quantize in front of one layer, as in a model re-quantized with that layer float).
        """
        m = self.matching
        if base == "quant":  # other = float
            carrier = m.float_view.producer(m.float_node(other_node))
            if carrier is None:
                return None
            pair = m.pair_of(carrier)
            if pair is not None and pair.float_nodes[-1] == carrier.name:
                # a quantized layer's output as the next op reads it (after its own quantize
                # in reference FX and pt2e); a float op's own output, not the quantize FX puts
                # in front of the next layer
                return m.output_nodes(pair)[1].name if pair.quantized else pair.quant_nodes[-1]
            q = m.quant_counterpart(carrier)
            return None if q is None else q.name
        producer = m.quant_view.producer(m.quant_node(other_node))
        f = m.float_counterpart(producer) if producer is not None else None
        return None if f is None else f.name

    # ------------------------------------------------------------------ running
    def reference(self, batch: Any) -> _Reference:
        """Run both models on ``batch``, keeping every node's value.

        Raises:
            InputError: when a model fails on the batch, naming the model and the node.
        """
        args = as_args(batch)
        envs = []
        with torch.no_grad():
            for which, g in (("float", self.float), ("quantized", self.quant)):
                try:
                    envs.append(self._run_all(g, args))
                except _NodeFailure as failure:
                    raise InputError(
                        f"the {which} model failed on the input at node "
                        f"`{failure.node.format_node()}`: {failure.message}\n"
                        "Check the input shape, dtype and device (a batch that is a tuple is "
                        "passed as several positional inputs)."
                    ) from failure.__cause__
        return _Reference(*envs)

    def _run_all(self, g: _Graph, args: tuple[Any, ...]) -> dict[str, Any]:
        env: dict[str, Any] = {}
        placeholders = iter(args)
        for node in g.nodes:
            if node.op == "placeholder":
                env[node.name] = next(placeholders, node.args[0] if node.args else None)
            elif node.op == "output":
                env[node.name] = fx.map_arg(node.args[0], lambda n: env[n.name])
            elif node.op != "get_attr":
                value = g.execute(node, env)
                if (isinstance(value, torch.Tensor)
                        and any(u.name in g.writes_input for u in node.users)):
                    value = value.clone()  # keep the value before an in-place user changes it
                env[node.name] = value
        return env

    def run(
        self,
        ref: _Reference,
        base: str,
        swaps: Iterable[Swap],
        start: dict[str, Any] | None = None,
        new: Iterable[Swap] | None = None,
    ) -> dict[str, Any]:
        """Every node value of the ``base`` graph with ``swaps`` applied.

        Args:
            ref: the reference runs of this batch.
            base: ``"float"`` or ``"quant"``.
            swaps: all swaps of the hybrid.
            start: values of a hybrid that already has every swap but ``new`` (default: the
                base model's reference run); only what ``new`` changes is recomputed.
            new: the swaps ``start`` lacks (default: all of ``swaps``).
        """
        g = self.float if base == "float" else self.quant
        other = self.quant if base == "float" else self.float
        other_ref = ref.quant if base == "float" else ref.float
        swaps = tuple(swaps)
        new = swaps if new is None else tuple(new)
        env = dict((ref.float if base == "float" else ref.quant) if start is None else start)
        by_out = {s.out: s for s in swaps}
        skipped = set().union(*(s.skip for s in swaps)) if swaps else set()
        changed = {s.out for s in new}
        if not changed:
            return env
        if base == "quant" and start is not None:
            # a layer kept float earlier is requantized only while a quantized op reads it:
            # the new swaps may have made all its readers float
            before = skipped - set().union(*(s.skip for s in new))
            changed.update(s.out for s in swaps if s not in new and (
                self._feeds_quantized_op(s.out, before)
                != self._feeds_quantized_op(s.out, skipped)))
        begin = min(min(g.position[n] for n in by_out[out].skip) for out in changed)
        try:
            self._recompute(g, other, other_ref, ref, env, base, by_out, skipped, changed, begin)
        except _NodeFailure as failure:
            kept = "float" if base == "quant" else "quantized"
            raise InstrumentationError(
                f"the hybrid with {', '.join(sorted({s.name for s in swaps}))} {kept} failed at "
                f"node `{failure.node.format_node()}`: {failure.message}\n"
                "A value crossed between the float and quantized graphs in a form this op "
                "does not take; leave that layer out (layers=...) and report the model."
            ) from failure.__cause__
        return env

    def _recompute(self, g: _Graph, other: _Graph, other_ref: dict[str, Any], ref: _Reference,
                   env: dict[str, Any], base: str, by_out: dict[str, Swap], skipped: set[str],
                   changed: set[str], begin: int) -> None:
        """Recompute, from position ``begin``, the nodes that read a changed value."""
        with torch.no_grad():
            for node in g.nodes[begin:]:
                name = node.name
                swap = by_out.get(name)
                if swap is not None:
                    if name in changed or any(p in changed for _, p in swap.inputs):
                        requantize = base == "quant" and self._feeds_quantized_op(name, skipped)
                        env[name] = self._swapped(swap, env, other, other_ref, ref, requantize)
                        changed.add(name)
                    continue
                if name in skipped or node.op in ("placeholder", "get_attr"):
                    continue
                if not any(i.name in changed for i in node.all_input_nodes):
                    continue
                if node.op == "output":
                    env[name] = fx.map_arg(node.args[0], lambda n: env[n.name])
                else:
                    env[name] = g.execute(node, env)
                changed.add(name)

    def _feeds_quantized_op(self, name: str, skipped: set[str]) -> bool:
        """Whether the quantized graph reads ``name``'s value as a quantized tensor somewhere.

        A float layer's output is requantized only then: when every reader is float (another
        layer kept float, a ``dequantize``, the model output) or quantizes it itself (FX's
        ``quantize_per_tensor`` before the next layer), it stays float, as it would in a model
        re-quantized with those layers float.
        """
        g = self.quant
        todo = list(g.node(name).users)
        seen: set[str] = set()
        while todo:
            user = todo.pop()
            if user.name in seen or user.op == "output" or user.name in skipped:
                continue
            seen.add(user.name)
            c = g.view.op_class(user)
            if c is None or c.quantized:
                return True
            if c.role == "optional" or (c.role == "plumbing" and _is_dequantize(user, g.modules)):
                continue  # it quantizes (FX's quantize_per_tensor) or dequantizes by itself
            todo.extend(user.users)  # plumbing and float-capable ops pass the value on
        return False

    def _swapped(self, swap: Swap, env: dict[str, Any], other: _Graph, other_ref: dict[str, Any],
                 ref: _Reference, requantize: bool = True) -> Any:
        local: dict[str, Any] = {}
        for ext, provider in swap.inputs:
            value = env[provider]
            # into the float side: dequantize; into the quantized side: the form it has there
            value = dequantize_all(value)
            local[ext] = value if swap.base == "quant" else self._into_quant(value, ext, other_ref)
        for name in swap.nodes:
            local[name] = other.execute(other.node(name), local)
        result = local[swap.other_out]
        if swap.base == "quant" and requantize:
            return self._into_quant(dequantize_all(result), swap.out, ref.quant)
        return dequantize_all(result)

    def held_quantized(self, name: str, quant_ref: dict[str, Any]) -> tuple[Any, bool]:
        """The quantized tensor behind quantized-graph node ``name``'s value.

        Returns ``(value, behind)``: the value of ``name`` itself if it is quantized, else the
        quantized value its ``dequantize`` (and other plumbing) reads, with ``behind=True``;
        ``name``'s own (float) value when there is none.
        """
        node = self.quant.node(name)
        held = quant_ref[name]
        while not _is_quantized(held) and node.all_input_nodes:
            c = self.quant.view.op_class(node)
            if c is None or c.role != "plumbing" or node.all_input_nodes[0].name not in quant_ref:
                break
            node = node.all_input_nodes[0]
            if _is_quantized(quant_ref[node.name]):
                return quant_ref[node.name], True
        return held, False

    def _into_quant(self, value: Any, name: str, quant_ref: dict[str, Any]) -> Any:
        """Float ``value`` as the quantized graph holds it at node ``name``.

        Quantized with the qparams of the quantized model's tensor there; if ``name`` is a
        ``dequantize`` (reference FX, pt2e), quantized with the qparams before it, then
        dequantized.
        """
        held, behind = self.held_quantized(name, quant_ref)
        if not _is_quantized(held):
            return value
        quantized = _like(value, held)
        return dequantize_all(quantized) if behind else quantized

    def local_float(self, swap: Swap, ref: _Reference) -> Any:
        """A quantized-base swap's float subgraph run on the quantized model's own values.

        This is the layer's float twin fed the same (dequantized) inputs as the quantized
        layer, the reference for the error the layer adds by itself (a shadow's output).
        """
        try:
            return self._swapped(swap, ref.quant, self.float, ref.float, ref, requantize=False)
        except _NodeFailure as failure:
            raise InstrumentationError(
                f"the float twin of layer `{swap.name}` failed at node "
                f"`{failure.node.format_node()}`: {failure.message}"
            ) from failure.__cause__

    def output(self, env: dict[str, Any], base: str) -> Any:
        """The model output held in ``env``."""
        g = self.float if base == "float" else self.quant
        return env[g.nodes[-1].name]


class _NodeFailure(Exception):
    """A node raised while a graph ran node by node (turned into a user-facing error above)."""

    def __init__(self, node: fx.Node, exc: Exception) -> None:
        super().__init__(str(exc))
        self.node = node
        self.message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@dataclass(frozen=True, eq=False)
class _Reference:
    """Every node value of the float and quantized models on one batch."""

    float: dict[str, Any]
    quant: dict[str, Any]
