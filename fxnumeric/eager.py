"""The eager Numeric Suite API (``torch.ao.ns._numeric_suite``), on top of the graph stages.

Same names, signatures and semantics, so ``import fxnumeric as ns`` runs the PyTorch Numeric
Suite tutorial unchanged. Underneath nothing is paired by module name: each call traces both
models, pairs their nodes (:func:`fxnumeric.match`) and instruments copies of the graphs
(:func:`fxnumeric.add_loggers`, :func:`fxnumeric.add_shadows`).

``prepare_model_outputs`` and ``prepare_model_with_stubs`` act in place, as in eager mode:
the model's ``forward`` is routed through the instrumented graph (which shares the model's
submodules), so calling the model fills the loggers. Preparing again replaces the previous
instrumentation; :func:`remove_instrumentation` undoes it. ``compare_model_outputs`` and
``compare_model_stub`` leave both models untouched (eager modifies them in place).

Where fxnumeric deliberately differs from the eager suite, see ``docs/eager_compat.md``.
"""

from __future__ import annotations

import copy
import itertools
import sys
import uuid
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.dynamic as nnqd
import torch.fx as fx
from torch import nn

from . import flows
from ._collector import defers_collection
from .capture import LeafSpec, is_functional, wrapped_at
from .capture.export import capture_example
from .capture.wrappers import model_to_compare
from .errors import FxNumericWarning, InputError, InstrumentationError
from .flows.fx import packed_linear_weight
from .guards import check_float_not_quantized, check_state_dicts
from .instrument import add_loggers, add_shadows, loggers_of
from .instrument.assemble import CallSites
from .loggers import Logger, OutputLogger, ShadowLogger
from .match import Matching, Pair, match
from .run import check_devices, check_model, keeps_buffers, run_model
from .weights import extract_weights, rnn_cell_weights

__all__ = [
    "compare_weights",
    "compare_model_outputs",
    "prepare_model_outputs",
    "get_matching_activations",
    "compare_model_stub",
    "prepare_model_with_stubs",
    "get_logger_dict",
    "remove_instrumentation",
    "get_default_compare_output_module_list",
    "NON_LEAF_MODULE_TO_ADD_OBSERVER_ALLOW_LIST",
]

NON_LEAF_MODULE_TO_ADD_OBSERVER_ALLOW_LIST = {nnqd.Linear, nnq.Linear, nnqd.LSTM, nn.LSTM}
"""Modules with children that still get an output logger (as in torch's eager suite)."""


def get_default_compare_output_module_list() -> set[type]:
    """Module types whose outputs ``compare_model_outputs`` logs by default (torch's list)."""
    from torch.ao.quantization.quantization_mappings import (
        get_default_compare_output_module_list as _torch_list,
    )

    return _torch_list()


# ---------------------------------------------------------------- compare_weights


def _find_match(keys: Iterable[str], key: str, postfix: str) -> str | None:
    """torch's name matching for state dicts: ``conv1.weight`` ~ ``conv1.0.weight``."""
    parts = key.split(".")
    if parts[-1] != postfix:
        return None
    targets = ["".join(parts[:-1])]
    # "" is a target too: a single module's state dict ("weight" ~ "weight"), as in torch;
    # only a packed key's shorter name is skipped when empty
    if postfix == "_packed_params" and "".join(parts[:-2]):
        targets.append("".join(parts[:-2]))
    for target in targets:
        for candidate in keys:
            c = candidate.split(".")
            if target in ("".join(c[:-1]), "".join(c[:-2])):
                return candidate
    return None


_PACKED_WEIGHTS = {
    "_packed_params._packed_weight": "weight",  # quantized Embedding, EmbeddingBag
    "_packed_weight_ih": "weight_ih",  # dynamic LSTMCell, GRUCell, RNNCell
    "_packed_weight_hh": "weight_hh",
}
"""The quantized state dict's names of weights torch's eager suite does not pair, by the
float state dict's name of the same weight (under the same module path)."""


def _packed_weight(float_dict: Mapping[str, Any], key: str, value: Any,
                   ) -> tuple[str, Any] | None:
    """``(float key, quantized weight)`` for a quantized state dict entry named in
    :data:`_PACKED_WEIGHTS` whose float weight ``float_dict`` holds, else None. A cell's packed
    Linear weight is unpacked (quantized; float for float16, as ``get_weight()`` gives it)."""
    for suffix, float_name in _PACKED_WEIGHTS.items():
        if key != suffix and not key.endswith(f".{suffix}"):
            continue
        float_key = key[:len(key) - len(suffix)] + float_name
        if float_key not in float_dict:
            return None
        if isinstance(value, torch.ScriptObject):
            value = packed_linear_weight(value)
        return float_key, value
    return None


def _compare_state_dicts(float_dict: dict[str, Any],
                         quantized_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    weight_dict: dict[str, dict[str, Any]] = {}
    # (quantized key, float key) paired by name whose tensors differ in shape: left out
    mismatched: list[tuple[str, str]] = []

    def pair(key: str, float_key: str, quantized: Any) -> None:
        float_weight = float_dict[float_key]
        if _shape(float_weight) != _shape(quantized):
            mismatched.append((key, float_key))
            return
        weight_dict[key] = {"float": float_weight, "quantized": quantized}

    for key, value in quantized_dict.items():
        packed = _packed_weight(float_dict, key, value)
        if packed is not None:
            pair(key, packed[0], packed[1])
            continue
        match_key = _find_match(float_dict, key, "weight")
        if match_key is not None:
            # a torchao tensor subclass is dequantized (ordinary tensors pass unchanged)
            pair(key, match_key, flows.comparable_weight(value))
            continue
        match_key = _find_match(float_dict, key, "_packed_params")
        if match_key is not None:
            pair(key, match_key, value[0])
        parts = key.split(".")
        if len(parts) >= 3 and parts[-1] == "param" and parts[-3] == "_all_weight_values":
            cell, module = int(parts[-2]), ".".join(parts[:-3])
            # cells are numbered layer * directions + direction (l0, l0_reverse, l1, ...)
            directions = 2 if f"{module}.weight_ih_l0_reverse" in float_dict else 1
            name = f"l{cell // directions}{'_reverse' if cell % directions else ''}"
            ih, hh = f"{module}.weight_ih_{name}", f"{module}.weight_hh_{name}"
            if ih in float_dict and hh in float_dict:
                q_ih, q_hh = rnn_cell_weights(value)
                weight_dict[f"{key}.weight_ih"] = {"float": float_dict[ih], "quantized": q_ih}
                weight_dict[f"{key}.weight_hh"] = {"float": float_dict[hh], "quantized": q_hh}
    _warn_mismatched(float_dict, quantized_dict, mismatched)
    _warn_unpaired(quantized_dict, {**weight_dict, **dict.fromkeys(k for k, _ in mismatched)},
                   float_dict)
    return weight_dict


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _warn_mismatched(float_dict: Mapping[str, Any], quantized_dict: Mapping[str, Any],
                     mismatched: list[tuple[str, str]]) -> None:
    """Say which quantized weights the name matching paired with a float tensor of another
    shape (torch's suite pairs them: a parametrized Linear's float ``bias`` with its quantized
    weight), left out instead."""
    if not mismatched:
        return
    key, float_key = mismatched[0]
    quantized = quantized_dict[key]
    quantized = quantized[0] if isinstance(quantized, tuple) else quantized
    # the module's path: what precedes `_packed_params...` or the weight's own name
    module = (key.partition("._packed_params")[0] if "._packed_params" in key[1:]
              else key.rpartition(".")[0])
    prefix = f"{module}.parametrizations." if module else "parametrizations."
    parametrized = [k for k in float_dict if k.startswith(prefix)]
    why = (f" The float state dict holds `{module or 'the model'}`'s weight parametrized "
           f"(`{parametrized[0]}`: weight_norm, spectral_norm, orthogonal): the weight the layer "
           "computes with is not in it." if parametrized else "")
    many = len(mismatched) > 1
    warnings.warn(
        f"compare_weights: {len(mismatched)} quantized weight{'s' if many else ''} of the "
        f"quantized state dict {'are' if many else 'is'} left out: the float entry of its name "
        f"has another shape (`{key}` {list(_shape(quantized) or ())} against float "
        f"`{float_key}` {list(_shape(float_dict[float_key]) or ())}"
        f"{', ...' if many else ''}).{why} Fix: compare the two models "
        "(compare_weights(float_model, quant_model)), which pairs weights through the graph "
        "and reads the weight each float layer computes with", FxNumericWarning, stacklevel=5)


def _wrapped_keys(state_dict: Mapping[str, Any]) -> str:
    """The prefix every key of ``state_dict`` has when it is a wrapper's (``module.`` of
    DataParallel and DistributedDataParallel, ``_orig_mod.`` of torch.compile), else ``""``."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(str(key).startswith(prefix) for key in state_dict):
            return prefix
    return ""


def _warn_unpaired(quantized_dict: Mapping[str, Any], weight_dict: Mapping[str, Any],
                   float_dict: Mapping[str, Any] | None = None) -> None:
    """Say which quantized weights of the state dict no float weight was found for (torch's
    suite leaves them out without a word), and, where one state dict is a wrapper's
    (``module.`` keys), which to pass instead."""
    paired = {key.rsplit(".", 1)[0] for key in weight_dict} | set(weight_dict)
    unpaired = [key for key, value in quantized_dict.items() if key not in paired and (
        isinstance(value, torch.ScriptObject) or key.endswith("_packed_params._packed_params")
        or (isinstance(value, torch.Tensor) and value.is_quantized))]
    if unpaired:
        listed = ", ".join(f"`{key}`" for key in unpaired[:3])
        many = len(unpaired) > 1
        warnings.warn(
            f"compare_weights: {len(unpaired)} quantized weight{'s' if many else ''} of the "
            f"quantized state dict ({listed}{', ...' if len(unpaired) > 3 else ''}) "
            f"{'have' if many else 'has'} no float weight of the same name in the float state "
            f"dict: {'they are' if many else 'it is'} left out. Fix: compare the two models "
            "(compare_weights(float_model, quant_model)), which pairs weights through the "
            "graph whatever their names, and says why of any it cannot read (a static "
            "quantized LSTM's)" + _wrapper_fix(float_dict or {}, quantized_dict),
            FxNumericWarning, stacklevel=5)


def _wrapper_fix(float_dict: Mapping[str, Any], quantized_dict: Mapping[str, Any]) -> str:
    """What to pass when one state dict's keys carry a wrapper's prefix the other's lack."""
    for side, state, other in (("float", float_dict, quantized_dict),
                               ("quantized", quantized_dict, float_dict)):
        prefix = _wrapped_keys(state)
        if prefix and _wrapped_keys(other) != prefix:
            holder = "torch.compile" if prefix == "_orig_mod." else "DataParallel/DDP"
            attr = prefix.rstrip(".")
            return (f"; every key of the {side} state dict starts with `{prefix}` (a "
                    f"{holder} wrapper's): pass the wrapped module's, "
                    f"{side}_model.{attr}.state_dict()")
    return ""


@defers_collection
def compare_weights(float_dict: Any, quantized_dict: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Compare the weights of a float model with those of its quantized counterpart.

    Args:
        float_dict: the float model's ``state_dict()``, or the float model itself.
        quantized_dict: the quantized model's ``state_dict()``, or the quantized model.

    Returns:
        ``{key: {"float": tensor, "quantized": tensor}}``. With state dicts, weights are
        paired by name as torch's eager suite does, keyed by the quantized state dict's names
        (``conv1.weight``, ``fc._packed_params._packed_params``); unlike torch's suite, a
        quantized Embedding's or EmbeddingBag's (``emb._packed_params._packed_weight``) and a
        dynamic LSTMCell's or GRUCell's (``cell._packed_weight_ih``, ``..._hh``, unpacked)
        are paired too, and a quantized weight without a float weight of its name is named
        in an :class:`~fxnumeric.FxNumericWarning`. With two models they are paired through
        the graph, so it works when names differ, keyed by the quantized module's path and
        its weight's name: the state dict's name where the state dict holds the weight
        itself (``conv1.weight``, ``fc._packed_params._packed_params``), else the name the
        module's own accessor gives it (``emb.weight``, ``cell.weight_ih``); where the
        quantized op absorbed a BatchNorm the float entry is the BN-folded float weight, so
        the comparison measures quantization error only. A dynamic LSTM layer N gives two
        keys, ``rnn._all_weight_values.N.param.weight_ih`` and ``...weight_hh`` (torch's
        eager suite overwrote the first with the second under one key).

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
        >>> q = quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
        >>> list(compare_weights(f.state_dict(), q.state_dict()))
        ['0._packed_params._packed_params']
    """
    if isinstance(float_dict, nn.Module) and isinstance(quantized_dict, nn.Module):
        matching = match(float_dict, quantized_dict)
        check_float_not_quantized(matching)  # the quantized model passed twice
        return extract_weights(matching)
    if isinstance(float_dict, nn.Module) or isinstance(quantized_dict, nn.Module):
        raise InputError("compare_weights takes two state dicts or two models, not one of each")
    if not isinstance(float_dict, Mapping) or not isinstance(quantized_dict, Mapping):
        raise InputError(f"compare_weights takes two state dicts (model.state_dict()) or two "
                         f"models, got a {type(float_dict).__name__} and a "
                         f"{type(quantized_dict).__name__}")
    # quantized tensors under 'float': swapped, or the quantized state dict passed twice
    check_state_dicts(float_dict, quantized_dict)
    return _compare_state_dicts(float_dict, quantized_dict)


# ---------------------------------------------------------------- in-place instrumentation


@dataclass(frozen=True)
class _Prepared:
    """An instrumented copy of a model's graph, and how the model orders its modules."""

    gm: fx.GraphModule
    rank: dict[str, int]  # module path -> registration order, for torch's key order
    loggers: dict[str, nn.Module]  # loggers_of(gm), kept here so that deep copies have theirs

    @classmethod
    def of(cls, model: nn.Module, gm: fx.GraphModule,
           names: Mapping[str, str] | None = None) -> _Prepared:
        """``gm``'s loggers, under the eager suite's key where ``names`` (pair name -> key,
        :func:`_eager_names`) gives one."""
        names = names or {}
        return cls(gm, {name: i for i, (name, _) in enumerate(model.named_modules())},
                   {names.get(name, name): lg for name, lg in loggers_of(gm).items()})

    def ordered(self, keys: Iterable[str]) -> list[str]:
        """``keys`` as torch's get_logger_dict orders them: registration order, then the rest."""
        position = {k: i for i, k in enumerate(keys)}
        return sorted(position, key=lambda k: (self.rank.get(k, len(self.rank)), position[k]))


class _Installed:
    """The ``forward`` a prepare_* call puts on a model: the instrumented graph, run after
    checking that the model still holds the submodules the graph calls (the graph was traced
    at prepare time; a layer swapped in since would silently not run).

    It lives on the model, so a deep copy of a prepared model is prepared too, with loggers of
    its own, and so is one saved and loaded (``torch.save`` / ``torch.load``). ``call`` is the
    preparing function and ``token`` tells models prepared together from models prepared by
    separate calls (in any process: a loaded model keeps its token).
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule, call: str, token: str,
                 names: Mapping[str, str] | None = None) -> None:
        self.model, self.call, self.token = model, call, token
        self.prepared = _Prepared.of(model, gm, names)
        owned = dict(model.named_modules())
        # the model's own modules the instrumented copy runs, at the same path
        self.calls = tuple((path, module) for path, module in gm.named_modules()
                           if path and owned.get(path) is module)
        self.edges = _edges(model, (path for path, _ in self.calls))
        # run through .forward, without the hook that restarts them: restarted here
        self.counted = tuple(m for m in gm.modules() if isinstance(m, CallSites))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if any(parent._modules.get(name) is not child for parent, name, child in self.edges):
            self._refuse_replaced()
        for sites in self.counted:
            sites.calls = 0
        return self.prepared.gm.forward(*args, **kwargs)

    def _refuse_replaced(self) -> None:
        for path, module in self.calls:
            try:
                now = self.model.get_submodule(path)
            except AttributeError:
                now = None
            if now is not module:
                raise InstrumentationError(
                    f"`{path}` of the {type(self.model).__name__} prepared by {self.call} was "
                    f"replaced or removed after preparing: the prepared forward would still run "
                    f"the old module. Call fxnumeric.{self.call} again after changing the model "
                    f"(or fxnumeric.remove_instrumentation to run it unprepared)")

    def __deepcopy__(self, memo: dict[int, Any]) -> _Installed:
        copied = _Installed.__new__(_Installed)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        _ROOTS.add(copied.model)
        return copied

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickled (torch.load of a prepared model): a prepared model again, so that
        # get_logger_dict of its submodules finds it
        self.__dict__.update(state)
        if "edges" not in state:  # saved by a version that walked each path per call
            self.edges = _edges(self.model, (path for path, _ in self.calls))
        _ROOTS.add(self.model)


def _edges(model: nn.Module, paths: Iterable[str]) -> tuple[tuple[nn.Module, str, nn.Module], ...]:
    """``(parent, name, child)`` for each link from ``model`` down to the modules at ``paths``:
    the model still holds each of them at its path while every parent's ``_modules[name]``
    is its child (``setattr`` and ``del`` of a submodule write there). Checked per call, a
    dict read per link: walking each path with ``get_submodule`` was 12% of the prepared
    forwards of mobilenet_v2."""
    edges: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
    for path in paths:
        parent = model
        for name in path.split("."):
            child = parent._modules[name]
            edges[id(parent), name] = (parent, name, child)
            parent = child
    return tuple(edges.values())


# The models prepared in place (weak: never keeps one alive), to find the one a submodule
# belongs to; each model's instrumentation itself is its ``forward`` (an _Installed).
_ROOTS: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_TOKENS = itertools.count()
_PROCESS = uuid.uuid4().hex  # with the count, a token no other process (a model loaded) has


def _installed(model: nn.Module) -> _Installed | None:
    forward = model.__dict__.get("forward")
    return forward if isinstance(forward, _Installed) else None


def _install(call: str, *prepared: tuple[nn.Module, fx.GraphModule],
             names: Mapping[str, str] | None = None) -> None:
    """Route each model's ``forward`` through its instrumented graph (which shares its
    submodules): the in-place part of the eager API, undone by remove_instrumentation.
    ``names``: the loggers' keys where they differ from the pairs' (:func:`_eager_names`)."""
    token = f"{_PROCESS}:{next(_TOKENS)}"
    for model, gm in prepared:
        model.forward = _Installed(model, gm, call, token, names)
        _ROOTS.add(model)


def remove_instrumentation(model: nn.Module) -> nn.Module:
    """Undo ``prepare_model_outputs`` / ``prepare_model_with_stubs`` on ``model``.

    Returns the model itself, with its own forward back and no fxnumeric state left.
    """
    if _installed(model) is not None:
        del model.__dict__["forward"]  # only the forward fxnumeric installed
    _ROOTS.discard(model)
    return model


def _check_in_place(model: Any, which: str) -> None:
    """Refuse what the in-place calls cannot instrument: a non-model, or an ExportedProgram
    (it has no forward to route through loggers)."""
    check_model(model, which)
    inside = wrapped_at(model)
    if inside is not None:
        raise InputError(
            f"{which} is a {type(model).__name__}, which wraps the model to instrument: the "
            "prepare_* calls instrument a model in place, through its forward, and the "
            "wrapper's forward (compiled code, or a scatter over devices) would not run the "
            f"instrumented one.\nFix: pass `{which}.{inside}` here and run that; "
            "compare_model_outputs and compare_model_stub take the wrapper as it is")
    if isinstance(model, torch.export.ExportedProgram):
        raise InputError(f"{which} is an ExportedProgram: the prepare_* functions instrument a "
                         "model in place and it has no forward of its own. Pass its .module() "
                         "and run that, or call compare_model_outputs / compare_model_stub, "
                         "which take the program")


def _pair_module(matching: Matching, pair: Pair, side: str, *,
                 head_first: bool) -> nn.Module | None:
    """The module behind one side of a pair, looking at its head or its output node first."""
    region = matching.region_of(pair)
    view = region.view("float" if side == "float" else "quant")
    chain = region.chain(pair, "float" if side == "float" else "quant")
    for node in (chain[0], chain[-1]) if head_first else (chain[-1], chain[0]):
        module = view.module(node)
        if module is not None:
            return module
    return None


def _pair_module_type(matching: Matching, pair: Pair, side: str, *,
                      head_first: bool) -> type | None:
    """The class of the module behind one side of a pair, however that side was captured: the
    module a ``call_module`` node calls (a model torch.fx traced), or the one-op module a
    functional op records in its ``nn_module_stack`` (an exported or pt2e graph)."""
    module = _pair_module(matching, pair, side, head_first=head_first)
    if module is not None:
        return type(module)
    chain = matching.region_of(pair).chain(pair, "float" if side == "float" else "quant")
    for node in (chain[0], chain[-1]) if head_first else (chain[-1], chain[0]):
        found = flows.module_type(node)
        if found is not None:
            return found
    return None


_FUNCTIONAL = (nnq.FloatFunctional, nnq.QFunctional)
"""torch's prepare observes these whatever the allow list says."""


def _stands_for(module: nn.Module, types: set[type]) -> bool:
    """Whether ``module`` is a flow's layer kept whole that subclasses one of ``types``: it
    stands for the torch layer it replaced (torchao's QAT ``FakeQuantizedLinear`` for the
    ``nn.Linear`` torch's list names), so the type lists select it as that layer."""
    return flows.is_leaf_module(module) and isinstance(module, tuple(types))


def _output_selector(allow_list: set[type] | None):
    explicit = allow_list is not None
    if allow_list is None:
        allow_list = get_default_compare_output_module_list()
    allowed = set(allow_list) | NON_LEAF_MODULE_TO_ADD_OBSERVER_ALLOW_LIST

    def select(pair: Pair, matching: Matching) -> bool:
        # the logger sits on the module that produces the quantized output, as in eager mode
        module = _pair_module(matching, pair, "quantized", head_first=False)
        if isinstance(module, _FUNCTIONAL):
            return True
        if module is not None:
            if type(module) not in allowed and not _stands_for(module, allowed):
                return False
            if not explicit:  # the default list holds every float type it pairs with
                return True
            # torch logs both models and keeps the names logged on both sides: the float
            # module's type must be in a given list too (the non-leaf list serves the
            # quantized side only)
            fmod = _pair_module(matching, pair, "float", head_first=False)
            return fmod is None or isinstance(fmod, _FUNCTIONAL) or type(fmod) in allow_list
        # FX-quantized graphs: quantized functional ops (torch.ops.quantized.*) are logged too;
        # an eager model's are not, as in torch (a FloatFunctional's add_scalar and mul_scalar
        # are not observed: no activation_post_process call names their module)
        if not (pair.quantized and isinstance(matching.quant_model, fx.GraphModule)):
            return False
        if not explicit:
            return True
        # a pt2e op records the module class it came from (nn_module_stack), and the float
        # model's op may be that module called (torch.fx's trace of the plain nn.Module): a
        # list you pass selects by those classes, as module_swap_list does
        return all(found is None or found in allow_list
                   for found in (_pair_module_type(matching, pair, side, head_first=True)
                                 for side in ("quantized", "float")))

    return select


def _eager_match(float_model: nn.Module, q_model: nn.Module, data: Any,
                 leaf_modules: Iterable[LeafSpec] | None, capture: str) -> Matching:
    """:func:`fxnumeric.match` as the eager calls need it, checked (:meth:`Matching.check`,
    and a float model that is quantized too is refused).

    Matched without running the models, except where a functional module (``FloatFunctional``)
    sits under code torch.fx cannot trace: which method its parent calls is known from a run
    only, so the pair is matched again on ``data`` (the calls that have it), as torch's
    suite observes the method whatever code calls it.
    """
    found = match(float_model, q_model, capture_example(capture, data, float_model, q_model),
                  leaf_modules=leaf_modules, capture=capture)
    if data is not None and not found.whole_graph and any(
            _is_functional_at(q_model, u.node) for u in found.unmatched_quant):
        found = match(float_model, q_model, data, leaf_modules=leaf_modules, capture=capture,
                      validate_inputs=False)
    check_float_not_quantized(found)  # compare's guard: torch's suite logs q against q
    return found.check()


def _is_functional_at(model: nn.Module, path: str) -> bool:
    try:
        return is_functional(model.get_submodule(path))
    except AttributeError:  # a node name, not a module path
        return False


def _eager_names(matching: Matching) -> dict[str, str]:
    """Pair name -> the eager suite's key for it, where they differ.

    The model's input quantize pairs with the float model's input and is named after it
    (``x.quantize``, a row of :func:`fxnumeric.compare`); a float model without a QuantStub
    against its ``QuantWrapper`` has no module there, and torch names the logger after the
    quantized model's (``quant``).
    """
    names: dict[str, str] = {}
    for pair in matching.pairs:
        region = matching.region_of(pair)
        head = region.chain(pair, "quant")[0]
        if pair.kind == "quantize" and head.op == "call_module":
            scope = region.scope("quant")
            names[pair.name] = f"{scope}.{head.target}" if scope else str(head.target)
    return {name: key for name, key in names.items() if name != key}


def _output_loggers(float_model: nn.Module, q_model: nn.Module, logger_cls: type,
                    allow_list: set[type] | None,
                    leaf_modules: Iterable[LeafSpec] | None, capture: str = "auto",
                    example_inputs: Any = None,
                    ) -> tuple[fx.GraphModule, fx.GraphModule, dict[str, str]]:
    """Logged copies of both models, on the pairs whose quantized module is allowed, and
    the keys their loggers go by (:func:`_eager_names`)."""
    if allow_list is not None:
        allow_list = set(_module_types(allow_list, "allow_list", float_model))
    matching = _eager_match(float_model, q_model, example_inputs, leaf_modules, capture)
    # one logger per module, logged once per call, as in torch's eager suite
    return (*add_loggers(float_model, q_model, logger_cls, select=_output_selector(allow_list),
                         matching=matching, per_call_site=False), _eager_names(matching))


@defers_collection
def prepare_model_outputs(
    float_module: nn.Module,
    q_module: nn.Module,
    logger_cls: type = OutputLogger,
    allow_list: set[type] | None = None,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
) -> None:
    """Attach loggers to the outputs of matching float and quantized ops, in place.

    After it, ``float_module(x)`` and ``q_module(x)`` fill the loggers and
    :func:`get_matching_activations` reads them. Ops are paired through the graph; a
    quantized op is logged when its module type is in ``allow_list`` (torch's default list
    when None), or, in FX-quantized graphs, when it is a quantized functional op. Preparing
    again replaces the previous loggers (they never stack).
    """
    _check_in_place(float_module, "float_module")
    _check_in_place(q_module, "q_module")
    for model in (float_module, q_module):
        remove_instrumentation(model)
    float_gm, quant_gm, names = _output_loggers(float_module, q_module, logger_cls, allow_list,
                                                leaf_modules)
    _install("prepare_model_outputs", (float_module, float_gm), (q_module, quant_gm),
             names=names)


def _logged(stats: dict) -> bool:
    return "tensor_val" not in stats or len(stats["tensor_val"]) > 0


def get_matching_activations(float_module: nn.Module,
                             q_module: nn.Module) -> dict[str, dict[str, Any]]:
    """Return ``{key: {"float": [...], "quantized": [...]}}`` from prepared models.

    Keys are the quantized model's names with ``.stats`` (``conv1.stats``). With
    OutputLogger the values are the lists of logged tensors, one per forward call. With a
    custom logger that keeps no ``tensor_val`` list, each side is that logger's whole
    ``stats`` dict (torch's eager suite raises ``KeyError: 'tensor_val'`` there).

    Raises:
        InstrumentationError: if the models were not prepared together by
            :func:`prepare_model_outputs`, or nothing was logged yet.
    """
    check_model(float_module, "float_module")
    check_model(q_module, "q_module")
    float_inst, quant_inst = _installed(float_module), _installed(q_module)
    if float_inst is None or quant_inst is None:
        raise InstrumentationError(
            "the models are not prepared: call fxnumeric.prepare_model_outputs(float_model, "
            "q_model) first, then run both models"
        )
    if float_inst.token != quant_inst.token:
        raise InstrumentationError(
            f"the models were prepared by separate calls (float_module by "
            f"{float_inst.call}, q_module by {quant_inst.call}), so their loggers do not "
            f"pair: call fxnumeric.prepare_model_outputs(float_model, q_model) again, then run "
            f"both models")
    _check_both_ran(float_inst.prepared, quant_inst.prepared)
    return _activations(float_inst.prepared, quant_inst.prepared)


def _check_both_ran(float_prep: _Prepared, quant_prep: _Prepared) -> None:
    """Refuse prepared models of which one logged and the other did not: the entries would
    be empty lists or missing (torch's suite returns ``{}`` when only the float model ran, and
    empty float lists when only the quantized one did). Loggers that keep no ``tensor_val``
    cannot tell."""
    unlogged = {}
    for which, prepared in (("float", float_prep), ("quantized", quant_prep)):
        kept = [lg.stats["tensor_val"] for lg in prepared.loggers.values()
                if "tensor_val" in lg.stats]
        unlogged[which] = bool(kept) and not any(kept)
    if unlogged["float"] != unlogged["quantized"]:
        which = "float" if unlogged["float"] else "quantized"
        other, call = (("quantized", "float_model(x)") if which == "float"
                       else ("float", "q_model(x)"))
        raise InstrumentationError(
            f"the prepared {which} model was not run: its loggers hold nothing, while the "
            f"{other} model's logged activations. Run it on the same input ({call}) before "
            "get_matching_activations")


def _activations(float_prep: _Prepared, quant_prep: _Prepared) -> dict[str, dict[str, Any]]:
    float_loggers, quant_loggers = float_prep.loggers, quant_prep.loggers
    every = [*float_loggers.values(), *quant_loggers.values()]
    if quant_loggers and not any(_logged(lg.stats) for lg in every):
        raise InstrumentationError(
            "no activations were logged yet: run a forward pass of both prepared models "
            "(float_model(x); q_model(x)) before get_matching_activations"
        )
    result: dict[str, dict[str, Any]] = {}
    for name in quant_prep.ordered(quant_loggers):
        f_stats, q_stats = float_loggers[name].stats, quant_loggers[name].stats
        if "tensor_val" in q_stats and "tensor_val" in f_stats:
            if not q_stats["tensor_val"]:
                continue
            result[f"{name}.stats"] = {"float": f_stats["tensor_val"],
                                       "quantized": q_stats["tensor_val"]}
        else:
            result[f"{name}.stats"] = {"float": f_stats, "quantized": q_stats}
    return result


@keeps_buffers
@defers_collection
def compare_model_outputs(float_model: nn.Module, q_model: nn.Module, *data: Any,
                          logger_cls: type = OutputLogger, allow_list: set[type] | None = None,
                          leaf_modules: Iterable[LeafSpec] | None = None,
                          capture: str = "auto",
                          ) -> dict[str, dict[str, Any]]:
    """Compare float and quantized activations at matching places for one input.

    Same result as :func:`prepare_model_outputs`, one forward of each model and
    :func:`get_matching_activations`, but neither model is modified. ``data`` are the
    model's positional inputs; a single dict is passed as keyword inputs
    (``compare_model_outputs(f, q, {"input_ids": ids, "attention_mask": mask})``).
    ``capture`` is :func:`fxnumeric.match`'s (``"export"`` exports on ``data``).

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
        >>> q = quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
        >>> d = compare_model_outputs(f, q, torch.randn(2, 4))
        >>> list(d), d["0.stats"]["float"][0].shape  # the dynamic Linear (as torch's suite)
        (['0.stats'], torch.Size([2, 4]))
    """
    data = _batch(data)
    # an ExportedProgram's module; the module a torch.compile or DataParallel wrapper holds
    float_model = model_to_compare(float_model, "float")
    q_model = model_to_compare(q_model, "quantized")
    float_gm, quant_gm, names = _output_loggers(float_model, q_model, logger_cls, allow_list,
                                                leaf_modules, capture, data)
    check_devices(float_model, q_model, data)
    run_model(float_gm, data, which="float")
    run_model(quant_gm, data, which="quantized", ran="float")
    if not loggers_of(quant_gm):
        return {}
    return _activations(_Prepared.of(float_model, float_gm, names),
                        _Prepared.of(q_model, quant_gm, names))


# ---------------------------------------------------------------- shadows


def _batch(data: tuple[Any, ...]) -> Any:
    """The ``*data`` of the eager calls as one batch: a lone dict (any mapping) holds keyword
    inputs."""
    return data[0] if len(data) == 1 and isinstance(data[0], Mapping) else data


def _is_identical_module_type(a: nn.Module, b: nn.Module) -> bool:
    return [type(m) for m in a.modules()] == [type(m) for m in b.modules()]


def _stub_selector(module_swap_list: Iterable[type]):
    swap = tuple(module_swap_list)

    def select(pair: Pair, matching: Matching) -> bool:
        # the float head decides (a conv whose bn and relu the quantized op absorbed counts);
        # functional ops count through the FloatFunctional that owns them
        fmod = _pair_module(matching, pair, "float", head_first=True)
        qmod = _pair_module(matching, pair, "quantized", head_first=True)
        if fmod is None or qmod is None:
            # a functional op on either side (a pt2e graph): the float module class it came
            # from, if it computes in quantized form. The float model may be a torch.fx trace
            # of the plain nn.Module (a call_module node) or an exported one (nn_module_stack)
            head = _pair_module_type(matching, pair, "float", head_first=True)
            return head in swap and pair.quantized
        # torch skips a module of the float type (not swapped, so not quantized); a torchao
        # model keeps nn.Linear and quantizes its weight (flows: pair.quantized)
        return type(fmod) in swap and (pair.quantized
                                       or not _is_identical_module_type(fmod, qmod))

    return select


def _module_types(value: Any, name: str, model: nn.Module) -> tuple[type, ...]:
    """``value`` (``module_swap_list``, ``allow_list``) read once as the module types it
    lists (a generator serves every later choice), refused unless it is a collection of
    types: a module path (``["fc"]``) would select nothing, as in torch's suite, without a
    word. A path of ``model`` is answered with its module's type."""
    example = "e.g. [nn.Linear, nn.Conv2d]"
    if isinstance(value, (str, bytes, type, Mapping, nn.Module)) or not isinstance(
            value, Iterable):
        raise InputError(f"{name} is a {type(value).__name__}: pass a list (or set) of "
                         f"module types, {example}")
    types = tuple(value)
    for item in types:
        if isinstance(item, type):
            continue
        try:
            found = type(model.get_submodule(item)) if isinstance(item, str) and item else None
        except AttributeError:
            found = None
        at, fix = "", "list the types of the modules to select"
        if found is not None:
            at = f"; `{item}` is a {found.__name__} of the float model"
            fix = (f"pass [{found.__name__}], which selects every {found.__name__} (as in "
                   "torch's suite, selection is by type)")
        raise InputError(f"{name} holds {item!r}, which is not a module type: {name} takes "
                         f"module types, {example}, not module names or modules{at}.\n"
                         f"Fix: {fix}")
    return types


def _stub_graph(float_model: nn.Module, q_model: nn.Module, module_swap_list: Iterable[type],
                logger_cls: type, leaf_modules: Iterable[LeafSpec] | None,
                capture: str = "auto", example_inputs: Any = None) -> fx.GraphModule:
    swap = _module_types(module_swap_list, "module_swap_list", float_model)
    matching = _eager_match(float_model, q_model, example_inputs,
                            [*swap, *(leaf_modules or ())], capture)
    quant_gm, skipped = add_shadows(
        float_model, q_model, logger_cls, select=_stub_selector(swap),
        matching=matching, per_call_site=False,
    )
    if skipped:
        name, reason = next(iter(skipped.items()))
        raise InstrumentationError(f"cannot shadow quantized `{name}`: {reason}")
    return quant_gm


@defers_collection
def prepare_model_with_stubs(
    float_module: nn.Module,
    q_module: nn.Module,
    module_swap_list: Iterable[type],
    logger_cls: type,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
) -> None:
    """Shadow each quantized op whose float counterpart's type is in ``module_swap_list``.

    In place on ``q_module``: after it, ``q_module(x)`` runs each such quantized op and a
    copy of its float counterpart on the same (dequantized) input, and the logger receives
    ``(quantized_output, float_output)``; :func:`get_logger_dict` reads them. The float
    model is not modified.
    """
    _check_in_place(float_module, "float_module")
    _check_in_place(q_module, "q_module")
    remove_instrumentation(q_module)
    gm = _stub_graph(float_module, q_module, module_swap_list, logger_cls, leaf_modules)
    _install("prepare_model_with_stubs", (q_module, gm))


@keeps_buffers
@defers_collection
def compare_model_stub(
    float_model: nn.Module,
    q_model: nn.Module,
    module_swap_list: Iterable[type],
    *data: Any,
    logger_cls: type = ShadowLogger,
    leaf_modules: Iterable[LeafSpec] | None = None,
    capture: str = "auto",
) -> dict[str, dict]:
    """Compare each quantized op of the listed types with its float shadow on the same input.

    Returns ``{"<name>.stats": {"float": [...], "quantized": [...]}}`` as torch's eager
    suite does (with ShadowLogger; a custom logger's ``stats`` otherwise). Neither model is
    modified. ShadowLogger keeps whole batches; torch's keeps only sample 0. ``capture`` is
    :func:`fxnumeric.match`'s (``"export"`` exports on ``data``).
    """
    data = _batch(data)
    float_model = model_to_compare(float_model, "float")
    q_model = model_to_compare(q_model, "quantized")
    quant_gm = _stub_graph(float_model, q_model, module_swap_list, logger_cls, leaf_modules,
                           capture, data)
    check_devices(float_model, q_model, data)
    run_model(quant_gm, data, which="quantized")
    return _logger_dict(_Prepared.of(q_model, quant_gm), "")


def get_logger_dict(mod: nn.Module, prefix: str = "") -> dict[str, dict]:
    """Return ``{"<name>.stats": logger.stats}`` for every logger of ``mod``.

    Works on models prepared by fxnumeric and on their submodules (names relative to the
    submodule, as torch's), and, as torch's version does, on any module tree containing Logger
    submodules (fxnumeric's, such as :class:`fxnumeric.Shadow` modules, or torch's own).
    """
    check_model(mod, "mod")
    installed = _installed(mod)
    if installed is not None:
        return _logger_dict(installed.prepared, prefix)
    for root in list(_ROOTS):
        installed = _installed(root)
        path = next((p for p, m in root.named_modules() if m is mod), None)
        if installed is not None and path:
            return _logger_dict(installed.prepared, prefix, under=path)
    target: dict[str, dict] = {}
    _logger_dict_helper(mod, target, prefix)
    return target


def _logger_dict(prepared: _Prepared, prefix: str, under: str = "") -> dict[str, dict]:
    """The loggers of a prepared graph, or of those under the submodule ``under``."""
    lead = f"{prefix}." if prefix else ""
    loggers = prepared.loggers
    within = f"{under}." if under else ""
    return {f"{lead}{name[len(within):]}.stats": loggers[name].stats
            for name in prepared.ordered(loggers) if name.startswith(within)}


def _logger_types() -> tuple[type, ...]:
    """fxnumeric's Logger, and torch's eager suite's where it was imported: a model holding
    torch's loggers was prepared by it. fxnumeric itself never imports ``torch.ao.ns``, which
    torch deprecated and will remove."""
    torch_ns = sys.modules.get("torch.ao.ns._numeric_suite")
    return (Logger,) if torch_ns is None else (Logger, torch_ns.Logger)


def _logger_dict_helper(mod: nn.Module, target: dict[str, dict], prefix: str,
                        loggers: tuple[type, ...] | None = None) -> None:
    loggers = _logger_types() if loggers is None else loggers
    lead = f"{prefix}." if prefix else ""
    for child in mod.children():
        if isinstance(child, loggers):
            target[f"{lead}stats"] = child.stats
            break
    for name, child in mod.named_children():
        _logger_dict_helper(child, target, f"{lead}{name}", loggers)
