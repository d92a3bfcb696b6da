"""Guards against the wrong pair of models, judged by what the graphs contain.

Three mistakes give numbers that look fine and mean nothing, so they are caught before any
batch runs:

* **swapped arguments**: the "float" graph computes quantized ops and the "quantized" graph
  none (``compare(q, f, data)``); an error.
* **prepared but not converted**: the "quantized" graph holds observers and no quantized op
  (``prepare`` / ``prepare_fx`` without ``convert``): it computes exactly the float model;
  an error.
* **nothing quantized**: the "quantized" graph has no quantized op, no quantize node and no
  fake-quant (``compare(f, copy.deepcopy(f), data)``); a warning, and coverage reads n/a.

What counts is the ops, never the names: a node is quantized when :func:`fxnumeric.ops.classify`
says so (quantized modules and ``torch.ops.quantized`` functions, static, dynamic, float16 or
reference), or when it quantizes (``quantize_per_tensor``, a converted ``Quantize`` module:
pt2e and reference graphs keep float ops between quantize/dequantize pairs). A QAT-prepared
*float* model (fake-quants in the float graph) and partially quantized models pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .errors import FxNumericWarning, InputError
from .ops import in_quantized_package, is_quantized_module
from .optypes import OpClass
from .view import GraphView

__all__ = ["GraphContents", "contents", "check_pair", "warn_unquantized", "check_state_dicts",
           "nothing_quantized", "check_eval_mode", "check_graph_training", "check_pairable",
           "check_float_not_quantized", "check_variants", "warn_foreign_weights",
           "RESERVED_VARIANT_NAMES"]

RESERVED_VARIANT_NAMES = {
    "float": "advise's assignments name a layer kept float \"float\" (Advice.assignment, "
             "to_torchao, the search's choices)",
    "quantized": "advise's assignments with one quantized model name its layers "
                 "\"quantized\" (Advice.assignment), and messages call it \"the quantized "
                 "model\"",
}
"""Names a quantized variant cannot take, each with what it already means: a variant so named
would be read as that (a variant named ``"float"`` was read as the float choice, its model
never used)."""


@dataclass(frozen=True)
class GraphContents:
    """What one traced graph computes, counted by kind (names of up to three examples each)."""

    quantized_ops: tuple[str, ...]
    quantize_nodes: tuple[str, ...]
    observers: tuple[str, ...]
    fake_quants: tuple[str, ...]
    ops: int

    @property
    def quantizes(self) -> bool:
        """Whether anything in the graph computes in, or converts to, quantized form."""
        return bool(self.quantized_ops or self.quantize_nodes)


def _observer_types() -> tuple[type, type]:
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase

    return ObserverBase, FakeQuantizeBase


def _is_quantize(node: fx.Node, modules: dict[str, nn.Module], cls: OpClass) -> bool:
    """A quantize step of the dataflow: a converted model's ``Quantize``, ``quantize_per_*``
    functions, a flow's quantize ops; not the float model's no-op ``QuantStub``, nor a
    prepared model's fake-quant (a quantize role, but its values stay float: a QAT model is
    a legitimate float side, and as the quantized side it is counted as fake-quantizing)."""
    if not cls.is_quantize:
        return False
    from torch.ao.quantization.stubs import QuantStub

    simulated = (QuantStub, _observer_types()[1])
    return node.op != "call_module" or not isinstance(modules[node.target], simulated)


def contents(view: GraphView) -> GraphContents:
    """Count the quantized ops, quantize nodes, observers and fake-quants of a traced graph.

    Reads the op classes ``view`` already holds. A called module counts by what it holds:
    observers attached by eager ``prepare`` (through forward hooks), quantized layers inside a
    module kept whole (``leaf_modules``).
    """
    observer_t, fake_t = _observer_types()
    modules = view.modules
    found: dict[str, list[str]] = {"q": [], "qz": [], "obs": [], "fq": []}
    ops = 0
    for node in view.nodes:
        cls = view.op_class(node)
        if cls is None:
            continue
        ops += cls.role == "op"
        leaf = modules[node.target] if node.op == "call_module" else None
        # a called module counts by the quantized layers it holds, each once: the untraced
        # root of a model torch.fx cannot trace read "1 quantized ops (`root`)"
        path = "" if leaf is view.root else str(node.target)
        held = _quantized_inside(leaf, path) if leaf is not None else []
        if held and held != [path]:
            found["q"].extend(held)
        elif held or cls.quantized:  # a quantized op, a quantized module called itself
            found["q"].append(node.name)
        elif _is_quantize(node, modules, cls):
            found["qz"].append(node.name)
        if leaf is not None:
            for sub in leaf.modules():
                if isinstance(sub, fake_t):
                    found["fq"].append(node.name)
                    break
                if isinstance(sub, observer_t):
                    found["obs"].append(node.name)
                    break
    return GraphContents(
        tuple(found["q"]), tuple(found["qz"]), tuple(found["obs"]), tuple(found["fq"]), ops
    )


def _quantized_inside(module: nn.Module, path: str) -> list[str]:
    """The paths of the quantized layers inside ``module`` (at ``path``), each once: a
    quantized module is not searched further (a dynamic Linear's packed parameters are part
    of it), a float one that merely holds quantized layers (T5's ``DenseReluDense``, a
    reference fused module) is."""
    own = in_quantized_package(module) or not any(map(is_quantized_module, module.children()))
    if is_quantized_module(module) and own:
        return [path]
    return [found for name, child in module.named_children()
            for found in _quantized_inside(child, f"{path}.{name}" if path else name)]


def _examples(names: tuple[str, ...]) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:3])
    return shown + (", ..." if len(names) > 3 else "")


def check_pair(float_view: GraphView, quant_view: GraphView, *, warn: bool = True) -> None:
    """Raise :class:`InputError` for a swapped or unconverted pair; warn when nothing is quantized.

    Args:
        float_view: the view of the traced float model.
        quant_view: the view of the traced quantized model.
        warn: warn here when nothing is quantized. ``False`` where ``quant_view`` is one op
            calling the model whole (the module tree's guard, before any part is captured):
            the caller counts the parts with :func:`warn_unquantized` once they exist.
    """
    f, q = contents(float_view), contents(quant_view)
    if f.quantizes and not q.quantizes:
        raise InputError(
            f"the arguments look swapped: the float model has {len(f.quantized_ops)} quantized "
            f"ops ({_examples(f.quantized_ops or f.quantize_nodes)}) and the quantized model "
            "none. Fix: pass the float model first, then the quantized one."
        )
    if not q.quantizes and q.observers and not q.fake_quants:
        raise InputError(
            f"the quantized model was prepared but not converted: it has {len(q.observers)} "
            f"observers ({_examples(q.observers)}) and no quantized op, so it computes exactly "
            "the float model. Fix: calibrate it, then call convert (eager) or convert_fx (FX) "
            "and pass the result."
        )
    if warn and not q.quantizes:
        warn_unquantized((quant_view,), stacklevel=4)


def warn_unquantized(quant_views: Iterable[GraphView], stacklevel: int = 3) -> None:
    """Warn that the quantized model has no quantized op, counting the ops (and fake-quants)
    of every view it was captured as: one graph, or the module tree's parts (GPT-2's 32 ops
    were "all 1 ops", the one op calling the model whole)."""
    found = [contents(view) for view in quant_views]
    ops = sum(c.ops for c in found)
    fake_quants = sum(len(c.fake_quants) for c in found)
    simulated = (f" It simulates quantization with {fake_quants} fake-quants."
                 if fake_quants else "")
    warnings.warn(
        f"the quantized model has no quantized op (all {ops} ops are float).{simulated} "
        "Coverage is n/a; is it the model returned by convert / convert_fx / "
        "quantize_dynamic?",
        FxNumericWarning,
        stacklevel=stacklevel,
    )


def check_eval_mode(model: Any, side: str) -> None:
    """Raise :class:`InputError` when ``model`` (the ``side`` model) has a module in training
    mode whose forward then differs: a BatchNorm (normalises with each batch's statistics and
    updates its running ones in the user's model), a dropout (or torchvision's
    ``StochasticDepth``) with ``p > 0``, an attention with dropout, a module that passes a
    dropout probability of its own to a functional dropout (see :func:`_dropout_attribute`).
    Every metric would read that noise, and the call would change the model.

    Modules in training mode that compute alike in either mode pass: a model built and never
    put in eval mode, whose dropouts are all ``p = 0``, compares as it is."""
    if not isinstance(model, nn.Module):
        return
    found = [(name, kind) for name, module in model.named_modules()
             if module.training and (kind := _trains_differently(module))]
    if not found:  # a probability read from the model's config, not held by a module
        found = [(name, kind) for name, module in model.named_modules()
                 if module.training and (kind := _config_dropout(module))]
    if not found:
        return
    name, kind = found[0]
    more = f" and {len(found) - 1} more" if len(found) > 1 else ""
    raise InputError(
        f"the {side} model is in training mode: `{name or '<root>'}` ({kind}){more} computes "
        "differently in training (a BatchNorm normalises with each batch's statistics and "
        "updates its running ones, a dropout zeroes random values), so every metric would "
        f"read that noise and the call would change your model.\nFix: "
        f"{'float' if side == 'float' else 'quant'}_model.eval() "
        "before comparing (Hugging Face models built from a config start in training mode)"
    )


# Functional ops that compute differently in training: target -> (name of the training
# argument, its position, its default). A graph traced or exported from a model in training
# mode holds them with that argument true (``F.dropout(x, p, self.training)`` traced as
# ``dropout(x, 0.5, True)``), whatever mode the model is in afterwards.
_TRAINING_ARG: dict[Any, tuple[str, int, bool]] = {
    torch.nn.functional.dropout: ("training", 2, True),
    torch.nn.functional.dropout1d: ("training", 2, True),
    torch.nn.functional.dropout2d: ("training", 2, True),
    torch.nn.functional.dropout3d: ("training", 2, True),
    torch.nn.functional.alpha_dropout: ("training", 2, False),
    torch.nn.functional.feature_alpha_dropout: ("training", 2, False),
    torch.nn.functional.batch_norm: ("training", 5, False),
    torch.dropout: ("train", 2, False),
    torch.ops.aten.dropout.default: ("train", 2, False),
    torch.ops.aten.native_dropout.default: ("train", 2, False),
    torch.ops.aten._native_batch_norm_legit.default: ("training", 5, False),
    # what torch.export (training IR) and prepare_qat_pt2e leave for a BatchNorm: a program
    # exported in training mode, a QAT model not moved to eval
    torch.ops.aten.batch_norm.default: ("training", 5, False),
    torch.ops.aten.native_batch_norm.default: ("training", 5, False),
    torch.ops.aten._native_batch_norm_legit_functional.default: ("training", 5, False),
}
_NO_P = frozenset({torch.nn.functional.batch_norm,  # no p: in training they always differ
                   torch.ops.aten._native_batch_norm_legit.default,
                   torch.ops.aten.batch_norm.default, torch.ops.aten.native_batch_norm.default,
                   torch.ops.aten._native_batch_norm_legit_functional.default})


def _trains(node: fx.Node) -> bool:
    """Whether ``node`` is a functional op run in training mode (a dropout with ``p > 0``)."""
    spec = _TRAINING_ARG.get(node.target) if node.op == "call_function" else None
    if spec is None:
        return False
    name, position, default = spec
    training = node.kwargs.get(name, node.args[position] if len(node.args) > position
                               else default)
    if training is not True:
        return False
    if node.target in _NO_P:
        return True
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return not isinstance(p, (int, float)) or p > 0


def check_graph_training(matching: Any) -> None:
    """Raise :class:`InputError` when a graph of ``matching`` (a :class:`fxnumeric.Matching`)
    applies a functional dropout or batch norm in training mode: traced from a model in
    training mode (``F.dropout(x, p, self.training)``, a pt2e model exported in training
    mode), it keeps doing so whatever mode the model is in afterwards, and every metric would
    read that noise. :func:`check_eval_mode` sees modules only."""
    for region in matching.regions:
        for side, key in (("float", "float"), ("quantized", "quant")):
            node = next((n for n in region.view(key).gm.graph.nodes if _trains(n)), None)
            if node is None:
                continue
            path = region.path(key)
            where = f" in `{path}`" if path else ""
            raise InputError(
                f"the {side} graph{where} runs `{node.name}` ({node.format_node()}) in training "
                "mode: it was traced or exported from a model in training mode, so it keeps "
                "zeroing random values (or normalising with each batch's statistics) and every "
                "metric would read that noise.\nFix: call .eval() on the model before tracing "
                "it (before fxnumeric.match, torch.export or prepare_pt2e; for a pt2e model, a "
                "prepare_qat_pt2e one too, torchao.quantization.pt2e.move_exported_model_to_eval"
                "(model), or torch.ao.quantization's for a torch.ao one), then compare again"
            )


def _trains_differently(module: nn.Module) -> str:
    """What makes ``module`` compute differently in training mode ("" when nothing does):
    its type, and the dropout probability it holds when that is what tells."""
    from torch.nn.modules.batchnorm import _NormBase
    from torch.nn.modules.dropout import _DropoutNd

    kind = type(module).__name__
    if in_quantized_package(module):
        return ""  # torch's quantized Dropout and BatchNorm compute alike in either mode
    if isinstance(module, _NormBase):
        return kind if module.track_running_stats else ""
    if isinstance(module, _DropoutNd):
        return kind if module.p > 0 else ""
    if isinstance(module, nn.MultiheadAttention):
        return kind if module.dropout > 0 else ""
    if kind == "StochasticDepth":  # torchvision's dropout of whole samples
        return kind if getattr(module, "p", 0) > 0 else ""
    held = _dropout_attribute(vars(module))
    return f"{kind} with {held}" if held else ""


def _dropout_attribute(attributes: dict[str, Any]) -> str:
    """``name=p`` of the first dropout probability in ``attributes`` (a module's or a config's),
    "" when none is above 0.

    A module may drop out with no dropout module to see: transformers' layers hold the
    probability as a float and call ``F.dropout(x, p=self.dropout, training=self.training)``
    (OPT, BART, Whisper: ``dropout``, ``activation_dropout``, ``attention_dropout``,
    ``resid_pdrop``; ``layerdrop`` skips whole layers), timm's ``DropPath`` holds
    ``drop_prob``. When such a module is kept whole, its forward is never traced, so
    :func:`check_graph_training` cannot see the dropout either. A float named for dropping,
    between 0 and 1, is what these share; flags (``bool``) and counts (``int``) are not
    probabilities."""
    for name, value in attributes.items():
        if "drop" in name.lower() and type(value) is float and 0 < value <= 1:
            return f"{name}={value:g}"
    return ""


def _config_dropout(module: nn.Module) -> str:
    """The dropout probability the ``config`` of ``module`` declares ("" when none), for
    layers that read it there at each call (``F.dropout(x, p=self.config.dropout, ...)``)."""
    config = getattr(module, "config", None)
    if config is None or isinstance(config, nn.Module):
        return ""
    try:
        attributes = vars(config)
    except TypeError:  # a config without a __dict__ holds no probabilities we can read
        return ""
    held = _dropout_attribute(attributes)
    return f"{type(module).__name__} whose config declares {held}" if held else ""


def check_pairable(matching: Any) -> None:
    """Refuse, before any batch runs, a pair of models that cannot be compared layer by layer
    (``matching``: a :class:`fxnumeric.Matching`): nothing but the input quantize paired, or
    a float model that quantizes too."""
    # the input's quantize pairs with the input of any model: it says nothing about the pair
    if all(p.kind in ("quantize", "dequantize") for p in matching.pairs):
        # `is not None`: a module's truth is its len() where it defines one (torch.compile's
        # OptimizedModule forwards len() to a model that has none, and raises)
        float_name = ("float" if matching.float_model is None
                      else type(matching.float_model).__name__)
        quant_name = ("quantized" if matching.quant_model is None
                      else type(matching.quant_model).__name__)
        notes = getattr(matching, "capture_notes", ())
        if notes:  # how a side was captured can be the cause (capture="fx" against pt2e)
            raise InputError(
                f"nothing paired between the float model ({float_name}) and the quantized "
                f"model ({quant_name}), as they were captured: "
                + "; ".join(f"{side}: {note}" for side, note in notes))
        raise InputError(
            f"nothing paired: no compute op of the float model ({float_name}) was found in the "
            f"quantized model ({quant_name}); {len(matching.unmatched_float)} float and "
            f"{len(matching.unmatched_quant)} quantized nodes are unpaired. They do not look "
            "like a float model and the quantized model made from it, and no layer can be "
            "compared.\nFix: pass the float model the quantized one was made from; "
            "fxnumeric.match(float_model, quant_model).table() lists what each side holds")
    check_float_not_quantized(matching)


def check_float_not_quantized(matching: Any) -> None:
    """Raise :class:`InputError` when the float model of ``matching`` (a
    :class:`fxnumeric.Matching`) computes quantized ops or quantizes: the quantized model
    passed twice (``compare(copy.deepcopy(q), q, data)``). Every call that measures the pair
    runs it, the eager API's included (torch's suite returns quantized-vs-quantized numbers)."""
    found = [contents(region.float_view) for region in matching.regions]
    if any(c.quantizes for c in found):
        ops = tuple(n for c in found for n in c.quantized_ops or c.quantize_nodes)
        raise _quantized_float(
            f"model is quantized too: it computes {len(ops)} quantized ops or quantize nodes "
            f"({_examples(ops)})",
            "its shadows and hybrids run quantized ops on float input or read nonsense",
            "pass as the float model the one the quantized model was made from")


def _quantized_float(held: str, why: str, fix: str) -> InputError:
    """The error for a float side that is quantized: what it ``held``, ``why`` comparing it
    means nothing, and the ``fix``."""
    return InputError(
        f"the float {held}; fxnumeric measures a quantized model against the float model it "
        f"was made from (against another quantized one, {why}). Was the quantized model "
        f"passed twice?\nFix: {fix} (keep a copy.deepcopy of it before prepare / convert / "
        "quantize_dynamic / quantize_)")


def nothing_quantized(quant_view: GraphView) -> bool:
    """Whether the quantized graph has no quantized op and no quantize node at all."""
    return not contents(quant_view).quantizes


def _holds_quantized(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_quantized
    if isinstance(value, (tuple, list)):
        return any(_holds_quantized(v) for v in value)
    return isinstance(value, torch.ScriptObject)  # packed params of dynamic LSTM / Linear


def check_state_dicts(float_dict: dict[str, Any], quantized_dict: dict[str, Any]) -> None:
    """Raise :class:`InputError` when the float state dict holds quantized tensors or packed
    params (in it only: swapped arguments; in both: the quantized model's state dict passed
    twice), or the quantized one is a pt2e model's (its graph reads constants, not the names
    it holds)."""
    frozen = [k for k in quantized_dict if k.rpartition(".")[2].startswith("_frozen_param")]
    if frozen:
        raise InputError(
            f"the quantized state dict is a pt2e (convert_pt2e) model's: its graph computes "
            f"with constants ({_examples(tuple(frozen))}), and the float weights it still "
            f"holds under their names are not what it reads, so pairing by name would compare "
            f"float weights with themselves (inf dB). Fix: compare_weights(float_model, "
            f"quantized_model) pairs each weight through the graph")
    in_float = [k for k, v in float_dict.items() if _holds_quantized(v)]
    in_quant = [k for k, v in quantized_dict.items() if _holds_quantized(v)]
    if in_float and not in_quant:
        raise InputError(
            f"the arguments look swapped: the float state dict holds {len(in_float)} quantized "
            f"tensors ({_examples(tuple(in_float))}) and the quantized one none. Fix: "
            "compare_weights(float_model.state_dict(), quantized_model.state_dict())."
        )
    if in_float:
        raise _quantized_float(
            f"state dict is quantized too: it holds {len(in_float)} quantized tensors or packed "
            f"params ({_examples(tuple(in_float))})",
            "its quantized weights would be read as the float reference",
            "pass the state_dict() of the float model the quantized one was made from")


def check_variants(float_model: Any, variants: Mapping[Any, Any]) -> None:
    """Refuse, before any work, a ``{name: quantized model}`` that ``compare``, ``advise`` or
    ``sensitivity`` cannot take: no variant, a name that is not a non-empty string or is
    reserved (:data:`RESERVED_VARIANT_NAMES`), a value that is not a model, or the float model
    itself."""
    if not variants:
        raise InputError("quant_model is an empty dict: pass at least one quantized variant, "
                         "{name: quantized model}")
    for name, quant_model in variants.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"variant names must be non-empty strings, got {name!r}")
        if name in RESERVED_VARIANT_NAMES:
            raise InputError(
                f"variant name {name!r} is reserved: {RESERVED_VARIANT_NAMES[name]}, so a "
                "variant of that name would be read as that, not as its model.\nFix: name it "
                f"after its quantization, e.g. {{'int8': model}} instead of {{{name!r}: model}}")
        if not isinstance(quant_model, nn.Module):
            raise InputError(f"variant {name!r} is a {type(quant_model).__name__}, not a "
                             "model: quant_model={name: quantized nn.Module}")
        if quant_model is float_model:
            raise InputError(
                f"variant {name!r} is the float model object itself: compare needs the "
                "quantized models made from it.\nFix: keep the float model before quantizing "
                "(copy.deepcopy(model) before prepare / quantize_dynamic)")


def warn_foreign_weights(weight_sqnrs: Iterable[tuple[str, float]], whose: str,
                         consequence: str, stacklevel: int = 2) -> str:
    """Warn when the quantized weights do not look made from the float model's: weight SQNR
    below 0 dB (the error larger than the weight) on most layers, where quantizing a weight
    reads well above (about 6 dB a bit: int4 near 20 dB, int8 near 40 dB). A model of another
    seed or checkpoint reads so, and every number measured against it means nothing.

    Args:
        weight_sqnrs: ``(layer, weight SQNR in dB)`` of the paired layers with a weight (a
            layer may come several times: its lowest counts).
        whose: the warning's subject (``"its weights"``, ``"the quantized model's weights"``).
        consequence: what the mismatch makes of the caller's results.
        stacklevel: as ``warnings.warn``'s, counted from the caller.

    Returns:
        The warning's message, ``""`` when none was given.
    """
    low: dict[str, float] = {}
    layers: set[str] = set()
    for layer, value in weight_sqnrs:
        layers.add(layer)
        if value < 0:
            low[layer] = min(value, low.get(layer, value))
    if not layers or len(low) <= len(layers) / 2:
        return ""
    worst = ", ".join(f"`{n}` {v:.1f} dB" for n, v in list(low.items())[:3]) + (
        ", ..." if len(low) > 3 else "")
    message = (f"{whose} do not look made from the float model's: weight SQNR below 0 dB on "
               f"{len(low)} of {len(layers)} layers ({worst}), where quantizing them reads "
               f"well above. Weights of another seed or checkpoint? {consequence}.\nFix: pass "
               "the float model the quantized one was made from (copy.deepcopy(model) before "
               "quantizing)")
    warnings.warn(FxNumericWarning(message), stacklevel=stacklevel + 1)
    return message
