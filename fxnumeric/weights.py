"""Weights of paired ops: the float weight (BN-folded where the quantized op absorbed a
BatchNorm) beside the quantized weight, keyed like the quantized model's state_dict.

Weights that accelerate offloaded (on the meta device until a hook loads them) are read from
the hook's weights map (:func:`fxnumeric.offload.loaded`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from . import flows
from .flows.fx import unpacked_weight
from .match import Matching, Pair, Region
from .offload import loaded
from .semantics import evaluate_constant
from .storage import is_dynamic_module, named_module_weights
from .view import GraphView

__all__ = ["extract_weights", "pair_weights", "rnn_cell_weights"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _leaf_parts(module: nn.Module) -> list[nn.Module]:
    """A fused float module's parts (Conv, BN, ReLU), or the module itself."""
    from torch.ao.nn.intrinsic import _FusedModule

    # QAT ConvBn modules are _FusedModules too, but carry the weight themselves
    holds_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    if isinstance(module, _FusedModule) and not holds_weight:
        return list(module.children())
    return [module]


def _transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a Linear whose weight is stored ``(in, out)``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor)
            and weight.dim() == 2 and tuple(weight.shape) == (getattr(module, "nx", None),
                                                              getattr(module, "nf", None)))


def _fold(weighted: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    weight = weighted.weight.detach()
    if bn is None:
        return weight
    if bn.running_mean is None or bn.running_var is None:
        return weight
    bias = weighted.bias.detach() if getattr(weighted, "bias", None) is not None else None
    if isinstance(weighted, nn.Linear):
        w, _ = fuse_linear_bn_weights(weight, bias, bn.running_mean, bn.running_var, bn.eps,
                                      bn.weight, bn.bias)
    else:
        transpose = isinstance(weighted, nn.modules.conv._ConvTransposeNd)
        w, _ = fuse_conv_bn_weights(weight, bias, bn.running_mean, bn.running_var, bn.eps,
                                    bn.weight, bn.bias, transpose)
    return w.detach()


def _float_weight(region: Region, pair: Pair) -> torch.Tensor | None:
    view = region.float_view
    chain = region.chain(pair, "float")
    if chain[0].op != "call_module":
        # a functional op (a torch.export float graph) paired with a quantized module
        return _graph_float_weight(region, pair)
    parts: list[nn.Module] = []
    for node in chain:
        if node.op == "call_module":
            parts.extend(loaded(m, str(node.target))
                         for m in _leaf_parts(view.modules[node.target]))
    return _folded_weight(parts)


def _folded_weight(parts: list[nn.Module]) -> torch.Tensor | None:
    """The weight of the first weighted module in ``parts``, folded with a BatchNorm after it."""
    weighted = next((m for m in parts if isinstance(getattr(m, "weight", None), torch.Tensor)),
                    None)
    if weighted is None:
        return None
    bn = next((m for m in parts[parts.index(weighted) + 1:] if isinstance(m, _BN_TYPES)), None)
    # QAT ConvBn modules carry their BN as an attribute
    if bn is None and isinstance(getattr(weighted, "bn", None), _BN_TYPES):
        bn = weighted.bn
    if bn is weighted:
        return None
    return _fold(weighted, bn)


def _quant_weights(module: nn.Module, path: str) -> dict[str, Any]:
    """The quantized weight(s) of ``module`` under their state_dict keys."""
    computed = flows.computed_weight(module)  # a QAT layer's fake-quantized weight (torchao)
    if computed is not None:
        return {f"{path}.weight": computed}
    # read from the attributes, not module.state_dict(): a quantized Linear's state_dict
    # unpacks its weight, which weight() then unpacks again (half of compare's weights on a
    # quantize_dynamic LLM)
    packed = getattr(module, "_packed_params", None)
    if isinstance(packed, nn.Module) and hasattr(packed, "_packed_params"):  # a Linear's
        return {f"{path}._packed_params._packed_params": module.weight()}
    if isinstance(getattr(module, "_all_weight_values", None), nn.ModuleList):  # LSTM, GRU
        state = module.state_dict()
        found = {f"{path}.{k}.{part}": weight
                 for k in state if k.startswith("_all_weight_values.") and k.endswith(".param")
                 for part, weight in zip(("weight_ih", "weight_hh"),
                                         rnn_cell_weights(state[k]), strict=True)}
        if found:
            return found
    if hasattr(module, "get_quantized_weight"):  # reference modules
        weight = module.get_quantized_weight()
        if not weight.is_quantized and hasattr(module, "get_weight"):
            # float16: the module computes with get_weight(), the float weight itself, not
            # the float16 copy (its output equals the float layer's; 73.7 dB read otherwise)
            weight = module.get_weight()
        return {f"{path}.weight": weight}
    if is_dynamic_module(module) and not hasattr(module, "weight"):  # LSTMCell, GRUCell ...
        return {f"{path}.{k}": w for k, w in named_module_weights(module).items()}
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        return {f"{path}.weight": weight()}
    if isinstance(weight, torch.Tensor):
        return {f"{path}.weight": weight.detach()}
    for child in _leaf_parts(module):
        if child is not module:
            found = _quant_weights(loaded(child, path), path)
            if found:
                return found
    return {}


def rnn_cell_weights(packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_ih, weight_hh)`` of one layer of a dynamic quantized LSTM/GRU.

    ``packed`` is a ``_all_weight_values.N.param`` entry of its state_dict: a
    ``CellParamsBase`` whose state holds the two packed linear weights.
    """
    linears = packed.__getstate__()[0][4]
    return linears[0].__getstate__()[0][0], linears[1].__getstate__()[0][0]


def _rnn_float_weights(module: nn.Module) -> list[torch.Tensor]:
    out = []
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            out.append((getattr(module, f"weight_ih_l{layer}{suffix}"),
                        getattr(module, f"weight_hh_l{layer}{suffix}")))
    return out


def pair_weights(matching: Matching, *, as_computed: bool = False,
                 ) -> Iterator[tuple[Pair, str, torch.Tensor, torch.Tensor]]:
    """``(pair, key, float_weight, quantized_weight)`` for every paired op that has weights.

    ``as_computed``: each weight in the layout its op computes with, so that two layouts of
    one op compare element by element (transformers' ``Conv1D``, stored ``(in, out)``, read
    as the ``(out, in)`` Linear it computes, as the Linear a user converted it to before
    quantizing holds it); otherwise as stored (the eager API returns the state dict's).

    Keys are the quantized model's state_dict names (``layer1.0.conv1.weight``,
    ``fc._packed_params._packed_params``); a functional op's weight is ``<pair name>.weight``.
    Yielded one op at a time: a weight that had to be made (dequantized from a torchao tensor,
    BN-folded, read from accelerate's offload) is freed once the caller drops it, so a caller
    that reduces each weight as it comes holds one layer's weights, not the model's.
    """
    for region in matching.regions:
        fmods, qmods = region.float_view.modules, region.quant_view.modules
        for pair in region.pairs:
            qnode = region.chain(pair, "quant")[0]
            if qnode.op != "call_module":
                found = _graph_weight(region, pair)
                if found is not None:
                    yield (pair, f"{pair.name}.weight", *found)
                continue
            fnode = region.chain(pair, "float")[0]
            fmod = fmods.get(fnode.target) if fnode.op == "call_module" else None
            path = _prefixed(region.quant_scope, str(qnode.target))
            yield from _module_weights(
                pair, fmod, qmods[qnode.target], path,
                lambda region=region, pair=pair: _float_weight(region, pair), as_computed)


def _prefixed(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _module_weights(
    pair: Pair, fmod: nn.Module | None, qmod: nn.Module, qpath: str, float_weight: Any,
    as_computed: bool = False,
) -> list[tuple[Pair, str, torch.Tensor, torch.Tensor]]:
    """The weights of one pair whose quantized side is the module ``qmod`` at ``qpath``;
    ``float_weight()`` gives the float weight (BN-folded where the pair absorbed one)."""
    qweights = _quant_weights(loaded(qmod, qpath), qpath)
    if not qweights:
        return []
    if isinstance(fmod, nn.RNNBase) and any(k.endswith(".weight_ih") for k in qweights):
        out = []
        ih_keys = [k for k in qweights if k.endswith(".weight_ih")]
        for (w_ih, w_hh), k in zip(_rnn_float_weights(loaded(fmod)), ih_keys, strict=True):
            base = k[: -len(".weight_ih")]
            out.append((pair, f"{base}.weight_ih", w_ih.detach(), qweights[f"{base}.weight_ih"]))
            out.append((pair, f"{base}.weight_hh", w_hh.detach(), qweights[f"{base}.weight_hh"]))
        return out
    if isinstance(fmod, nn.RNNCellBase) and f"{qpath}.weight_ih" in qweights:
        cell = loaded(fmod)
        return [(pair, f"{qpath}.{part}", getattr(cell, part).detach(), qweights[f"{qpath}.{part}"])
                for part in ("weight_ih", "weight_hh")]
    fweight = float_weight()
    if fweight is None:
        return []
    if as_computed and fmod is not None and _transposed_linear(fmod):
        fweight = fweight.t()
    flip = as_computed and _transposed_linear(qmod)
    return [(pair, key, fweight, qw.t() if flip else qw)
            for key, qw in ((k, flows.comparable_weight(w)) for k, w in qweights.items())]


# --- weights held in the graph: torch.export / pt2e ops read them as (dequantized) constants

def _graph_weight(region: Region, pair: Pair) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The float and quantized weight a functional op reads, each evaluated from the constants
    that feed it (``dequantize(int8 constant)`` on the quantized side); the float one BN-folded
    when the pair's float chain has a BatchNorm after the weighted op."""
    quant = _read_weight(region.quant_view, region.chain(pair, "quant"))
    if quant is None:
        return None
    weight = _float_weight(region, pair)
    return None if weight is None else (weight, quant[1])


def _graph_float_weight(region: Region, pair: Pair) -> torch.Tensor | None:
    """The weight a functional float op reads, BN-folded when the pair's float chain has a
    BatchNorm after it."""
    fv = region.float_view
    chain = region.chain(pair, "float")
    found = _read_weight(fv, chain)
    if found is None:
        return None
    weighted, weight = found
    bn = next((n for n in chain[chain.index(weighted) + 1:] if _kind(fv, n) == "batch_norm"), None)
    params = flows.batch_norm_params(bn, fv.gm) if bn is not None else None
    if params is not None:
        weight, _ = fuse_conv_bn_weights(
            weight, None, params.running_mean, params.running_var, params.eps,
            params.weight, params.bias, _kind(fv, weighted).startswith("conv_transpose"),
        )
    return weight.detach()


def _kind(view: GraphView, node: fx.Node) -> str:
    cls = view.op_class(node)
    return cls.signature[0] if cls is not None else ""


def _read_weight(view: GraphView, chain: list[fx.Node]) -> tuple[fx.Node, torch.Tensor] | None:
    """The first node of the chain that reads a weight, and that weight's value."""
    for node in chain:
        kind = _kind(view, node)
        source = flows.weight_input(node, kind)
        value = evaluate_constant(source, view) if source is not None else None
        value = unpacked_weight(value, node) if isinstance(value, torch.ScriptObject) else value
        if isinstance(value, torch.Tensor):
            value = flows.comparable_weight(value.detach())
            scale = flows.weight_scale(node, kind)  # a QAT conv's weight carries its BN scale
            factor = evaluate_constant(scale, view) if scale is not None else None
            return node, value / factor if isinstance(factor, torch.Tensor) else value
    return None


def extract_weights(matching: Matching) -> dict[str, dict[str, torch.Tensor]]:
    """Pair float and quantized weights through the graph.

    Returns ``{key: {"float": tensor, "quantized": tensor}}`` with keys as in the quantized
    model's state_dict (``conv1.weight``, ``fc._packed_params._packed_params``); a dynamic
    LSTM or GRU gives ``rnn._all_weight_values.N.param.weight_ih`` and ``.weight_hh``. When
    the quantized op absorbed a BatchNorm, the float weight is the BN-folded one, so the
    comparison measures quantization error only.
    """
    return {key: {"float": fw, "quantized": qw} for _, key, fw, qw in pair_weights(matching)}
