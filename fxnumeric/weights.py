"""Weights of paired ops: the float weight (BN-folded where the quantized op absorbed a
BatchNorm) beside the quantized weight, keyed like the quantized model's state_dict.

Weights that accelerate offloaded (on the meta device until a hook loads them) are read from
the hook's weights map (:func:`fxnumeric.offload.loaded`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from . import flows
from .flows.fx import packed_linear_weight, unpacked_weight
from .metrics import sqnr
from .offload import loaded
from .ops import is_quantized_module
from .semantics import evaluate_constant
from .storage import is_dynamic_module, named_module_weights
from .view import GraphView

if TYPE_CHECKING:  # annotations only: pairing (under match) reads a layer's weight from here
    from .match import Matching, Pair, Region

__all__ = ["extract_weights", "pair_weights", "rnn_cell_weights", "PairedWeight", "op_weight",
           "module_weight", "transposed_linear"]

_log = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Unread = Callable[["Pair", str], None]
"""Called as ``unread(pair, reason)`` for a paired op one of whose weights could not be read
or paired with the other side's: its weight comparison is missing, and ``reason`` says why."""


class PairedWeight(NamedTuple):
    """One weight of a paired op, float beside quantized.

    Attributes:
        pair: the op.
        key: the quantized model's state_dict name (``fc._packed_params._packed_params``,
            ``lstm._all_weight_values.3.param.weight_ih``), or, for a weight the state dict
            holds packed under another name, the module path and the name its accessor gives
            it (a quantized Embedding's ``emb.weight``, a dynamic LSTMCell's
            ``cell.weight_ih``).
        float_weight: the float weight (BN-folded where the quantized op absorbed one).
        quant_weight: the quantized weight, as the quantized op computes with it.
        matrix: which of a recurrent op's several matrices this is, by the float layer's
            name (``weight_ih_l1_reverse``); empty for an op with one weight.
        layer: for an op that is a module called whole holding quantized layers (a custom
            module kept whole), the quantized model's path of the layer this weight is
            (``block.fc``); empty for an op's own weight.
        grid: the grid of a weight a flow stores in its own form, read before
            ``quant_weight`` was dequantized from it (:func:`fxnumeric.flows.weight_grid`: a
            torchao ``Int8Tensor``'s per-tensor, per-row or per-group scales); ``None`` for
            any other weight (torch's quantized tensors carry their own grid).
    """

    pair: Pair
    key: str
    float_weight: torch.Tensor
    quant_weight: torch.Tensor
    matrix: str = ""
    layer: str = ""
    grid: flows.WeightGrid | None = None


def _leaf_parts(module: nn.Module) -> list[nn.Module]:
    """A fused float module's parts (Conv, BN, ReLU), or the module itself."""
    from torch.ao.nn.intrinsic import _FusedModule

    # QAT ConvBn modules are _FusedModules too, but carry the weight themselves
    holds_weight = isinstance(getattr(module, "weight", None), torch.Tensor)
    if isinstance(module, _FusedModule) and not holds_weight:
        return list(module.children())
    return [module]


def transposed_linear(module: nn.Module) -> bool:
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
        return _graph_float_weight(view, chain)
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
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        # a reference LSTM/GRU/cell (torch.ao.nn.quantized.reference), or one left float
        return {f"{path}.{k}": w for k, w in _recurrent_weights(module).items()}
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


def _recurrent_weights(module: nn.RNNBase | nn.RNNCellBase) -> dict[str, torch.Tensor]:
    """A recurrent layer's weight matrices by name, in torch's flat order, as its forward
    computes with them.

    A reference LSTM/GRU computes with ``get_flat_weights()``, each weight quantized and
    dequantized (a cell with ``get_weight_ih()``/``get_weight_hh()``): read quantized (the
    qparams show, and dequantized they are those), or as forward has them where its qparams
    do not quantize (float16). A float one left float computes with its parameters.
    """
    names = [n for n in getattr(module, "_flat_weights_names", ("weight_ih", "weight_hh"))
             if n.startswith("weight")]
    if callable(getattr(module, "get_quantized_weight_bias_dict", None)):  # reference LSTM, GRU
        quantized = module.get_quantized_weight_bias_dict()
        computed = dict(zip(module._flat_weights_names, module.get_flat_weights(), strict=True))
    elif callable(getattr(module, "get_quantized_weight_ih", None)):  # reference cells
        quantized = {"weight_ih": module.get_quantized_weight_ih(),
                     "weight_hh": module.get_quantized_weight_hh()}
        computed = {"weight_ih": module.get_weight_ih(), "weight_hh": module.get_weight_hh()}
    else:
        return {n: getattr(module, n).detach() for n in names}
    return {n: quantized[n] if quantized[n].is_quantized else computed[n].detach()
            for n in names}


def rnn_cell_weights(packed: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_ih, weight_hh)`` of one layer of a dynamic quantized LSTM/GRU.

    ``packed`` is a ``_all_weight_values.N.param`` entry of its state_dict: a
    ``CellParamsBase`` whose state holds the two packed linear weights.
    """
    linears = packed.__getstate__()[0][4]
    return packed_linear_weight(linears[0]), packed_linear_weight(linears[1])


def pair_weights(matching: Matching, *, as_computed: bool = False, unread: Unread | None = None,
                 ) -> Iterator[PairedWeight]:
    """A :class:`PairedWeight` for every weight of every paired op that has weights.

    ``as_computed``: each weight in the layout its op computes with, so that two layouts of
    one op compare element by element (transformers' ``Conv1D``, stored ``(in, out)``, read
    as the ``(out, in)`` Linear it computes, as the Linear a user converted it to before
    quantizing holds it); otherwise as stored (the eager API returns the state dict's).

    Keys are the quantized model's state_dict names (``layer1.0.conv1.weight``,
    ``fc._packed_params._packed_params``), but for weights the state dict holds packed under
    another name (:attr:`PairedWeight.key`: ``emb.weight``, ``cell.weight_ih``); a functional
    op's weight is ``<pair name>.weight``.
    A recurrent op (LSTM, GRU, their cells) gives one per matrix, each paired with the float
    one its forward multiplies by the same values (torch's flat weight order), whether the
    float side is the ``nn.LSTM`` or an exported ``aten.lstm`` reading its parameters.

    ``unread(pair, reason)`` is called for an op whose weights one side holds but that could
    not be read on the other, or not paired one to one: rather than missing silently, its
    weight comparison is missing for ``reason``.

    Yielded one op at a time: a weight that had to be made (dequantized from a torchao tensor,
    BN-folded, read from accelerate's offload) is freed once the caller drops it, so a caller
    that reduces each weight as it comes holds one layer's weights, not the model's.
    """
    def note(pair: Pair, reason: str) -> None:
        if unread is not None:
            unread(pair, reason)

    for region in matching.regions:
        fmods, qmods = region.float_view.modules, region.quant_view.modules
        for pair in region.pairs:
            qnode = region.chain(pair, "quant")[0]
            if qnode.op != "call_module":
                yield from _functional_weights(region, pair, note)
                continue
            fnode = region.chain(pair, "float")[0]
            fmod = fmods.get(fnode.target) if fnode.op == "call_module" else None
            qmod = qmods[qnode.target]
            # a model called whole (leaf_modules=[""], or its root's own tensors offloaded)
            # is held as submodule ``root`` of its one-op graph: its layers' paths are the
            # model's own, not under ``root``
            path = (region.quant_scope if qmod is region.quant_view.root
                    else _prefixed(region.quant_scope, str(qnode.target)))
            yield from _module_weights(
                pair, fmod, qmod, path,
                lambda region=region, pair=pair: _float_weight(region, pair), as_computed,
                lambda region=region, pair=pair, fmod=fmod: _float_matrices(region, pair, fmod),
                note, inner=pair.name not in matching.containers)


def module_weight(module: nn.Module, side: str) -> torch.Tensor | None:
    """The one weight matrix (or kernel) ``module`` computes with, as a plain float tensor in
    the layout it computes with (transformers' ``Conv1D`` transposed to a Linear's), or
    ``None``: it holds none, several (a recurrent layer), one offloaded (on the meta device:
    not loaded for this), or one fxnumeric does not read.

    ``side`` is ``"float"`` (a fused float module's conv or linear, its BatchNorm folded in)
    or ``"quant"`` (the quantized weight, dequantized). Pairing compares the two to tell a
    quantized layer's float twin (:mod:`fxnumeric.pairing`).
    """
    if side == "float":
        weight = _folded_weight(_leaf_parts(module))
    else:
        found = _quant_weights(module, "")
        weight = flows.comparable_weight(next(iter(found.values()))) if len(found) == 1 else None
    if not _a_matrix(weight):
        return None
    weight = weight.detach()
    weight = weight.dequantize() if weight.is_quantized else weight
    return weight.t() if transposed_linear(module) else weight


def _a_matrix(weight: Any) -> bool:
    """Whether ``weight`` is a loaded tensor of two dims or more (not one offloaded to the
    meta device, a bias, or no tensor at all)."""
    return isinstance(weight, torch.Tensor) and not weight.is_meta and weight.dim() >= 2


def op_weight(view: GraphView, chain: Sequence[fx.Node], side: str) -> torch.Tensor | None:
    """The weight of the op whose nodes are ``chain`` (a pair's nodes on one side of
    ``view``), as :func:`module_weight` gives a module's: a module called, or the weight a
    functional op reads from the graph (torch.export, pt2e). ``None`` where that gives none."""
    head = chain[0]
    if head.op == "call_module":
        if side == "float":
            parts = [m for n in chain if n.op == "call_module"
                     for m in _leaf_parts(view.modules[str(n.target)])]
            weight = _folded_weight(parts)
            if not _a_matrix(weight):
                return None
            return weight.t() if transposed_linear(view.modules[str(head.target)]) else weight
        return module_weight(view.modules[str(head.target)], side)
    if side == "float":
        weight = _graph_float_weight(view, chain)
    else:
        found = _read_weight(view, chain)
        weight = found[1] if found is not None else None
    if not _a_matrix(weight):
        return None
    return weight.dequantize() if weight.is_quantized else weight


def weight_sqnrs(matching: Matching) -> Iterator[tuple[str, float]]:
    """``(pair name, SQNR in dB)`` of every weight :func:`pair_weights` pairs (as computed),
    the quantized one dequantized; those of two shapes are left out. Summed in float64 a
    chunk at a time (:func:`~fxnumeric.metrics.sqnr`): no float64 copy of a whole weight (an
    LLM's 49152 x 576 head is 226 MB in float64, and its error as much again)."""
    for paired in pair_weights(matching, as_computed=True):
        if paired.float_weight.shape != paired.quant_weight.shape:
            continue
        quant = paired.quant_weight.detach()
        yield paired.pair.name, sqnr(paired.float_weight.detach(),
                                     quant.dequantize() if quant.is_quantized else quant)


def _prefixed(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _module_weights(
    pair: Pair, fmod: nn.Module | None, qmod: nn.Module, qpath: str, float_weight: Any,
    as_computed: bool, float_matrices: Callable[[], dict[str, torch.Tensor] | None],
    unread: Unread, inner: bool = False,
) -> list[PairedWeight]:
    """The weights of one pair whose quantized side is the module ``qmod`` at ``qpath``;
    ``float_weight()`` gives the float weight (BN-folded where the pair absorbed one),
    ``float_matrices()`` a recurrent float op's matrices (``None`` for any other op).
    ``inner``: a pair of modules without weights of their own gives those of the quantized
    layers inside them (:func:`_inner_weights`); False for a pair whose layers have rows of
    their own."""
    qweights = _quant_weights(loaded(qmod, qpath), qpath)
    matrices = float_matrices()
    if not qweights:
        if pair.quantized and (matrices is not None or float_weight() is not None):
            unread(pair, f"the quantized `{type(qmod).__name__}` holds its weights in a form "
                         "fxnumeric does not read")
            return []
        if inner and fmod is not None:
            # a module called whole (leaf_modules, or its own tensors offloaded by
            # accelerate): the weights of its quantized layers compare in its row
            return _inner_weights(pair, fmod, qmod, qpath, as_computed, unread)
        return []
    if matrices is not None:
        return _paired_matrices(pair, matrices, qmod, qweights, unread)
    fweight = float_weight()
    if fweight is None:
        unread(pair, f"the float op paired with `{qpath}` holds no weight fxnumeric reads")
        return []
    return _beside(pair, fweight, fmod, qmod, qweights, as_computed, unread)


def _beside(pair: Pair, fweight: torch.Tensor, fmod: nn.Module | None, qmod: nn.Module,
            qweights: dict[str, Any], as_computed: bool, unread: Unread, layer: str = "",
            ) -> list[PairedWeight]:
    """The float weight of module ``fmod`` beside each quantized weight of ``qmod`` (keyed as
    its state_dict), both as the ops compute with them when ``as_computed`` (a transposed
    Linear's weight transposed back). None when one cannot be read, named in ``unread``."""
    if as_computed and fmod is not None and transposed_linear(fmod):
        fweight = fweight.t()
    flip = as_computed and transposed_linear(qmod)
    quant = _readable(pair, qweights, unread)
    # a transposed weight's channels are not the rows its grid was read along
    return [PairedWeight(pair, key, fweight, qw.t() if flip else qw, layer=layer,
                         grid=None if flip else flows.weight_grid(qweights[key]))
            for key, qw in quant]


def _readable(pair: Pair, qweights: dict[str, Any], unread: Unread,
              ) -> list[tuple[str, Any]]:
    """``qweights`` as the metrics read them (:func:`fxnumeric.flows.comparable_weight`),
    or none, named in ``unread``, when one is a tensor subclass whose values no torch op
    reads (a wrapper around a torchao weight that no flow unwraps raised
    ``NotImplementedError: aten.view`` in the histogram, after every batch had run)."""
    quant = [(key, flows.comparable_weight(w)) for key, w in qweights.items()]
    for key, weight in quant:
        why = _unreadable(weight)
        if why:
            unread(pair, f"its weight `{key}` is a `{type(weight).__name__}` whose values "
                         f"torch cannot read ({why}); compare the model without the wrapper "
                         "or tensor subclass that holds it")
            return []
    return quant


def _unreadable(weight: Any) -> str:
    """Why reading ``weight``'s values fails (a tensor subclass with no such op), or ``""``."""
    if (not isinstance(weight, torch.Tensor) or type(weight) in (torch.Tensor, nn.Parameter)
            or weight.is_quantized):
        return ""
    try:
        weight.detach().reshape(-1)[:1].float().sum()
    except (NotImplementedError, RuntimeError, TypeError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return ""


def _quantized_layers(module: nn.Module, path: str,
                      ) -> Iterator[tuple[str, nn.Module, dict[str, Any]]]:
    """``(path inside module, layer, its quantized weights)`` of the quantized layers with
    weights inside ``module`` (at ``path`` in its model), outermost first: a quantized
    module without weights of its own (a custom module holding a quantized Linear) is looked
    inside."""
    def visit(parent: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module, dict[str, Any]]]:
        for name, child in parent.named_children():
            rel = _prefixed(prefix, name)
            if is_quantized_module(child):
                qweights = _quant_weights(loaded(child, _prefixed(path, rel), (module, rel)),
                                          _prefixed(path, rel))
                if qweights:
                    yield rel, child, qweights
                    continue
            yield from visit(child, rel)

    yield from visit(module, "")


def _inner_weights(pair: Pair, fmod: nn.Module, qmod: nn.Module, qpath: str, as_computed: bool,
                   unread: Unread) -> list[PairedWeight]:
    """The weights of the quantized layers inside a module pair called whole, each beside the
    float layer at the same path inside the float module (``layer`` names it), keyed as
    the quantized model's state_dict.

    Such a pair holds no weight of its own: a custom module kept whole (``leaf_modules``, or
    called whole because accelerate offloads a tensor of its own), holding an ``nn.Linear``.
    Its row is the only one those layers have, so their weights compare there (not for a
    module whose layers have rows of their own: :attr:`Matching.containers`). A quantized
    layer without a float twin with a weight at its path is named in ``unread``.
    """
    found: list[PairedWeight] = []
    missing: list[str] = []
    for rel, qlayer, qweights in _quantized_layers(qmod, qpath):
        path = _prefixed(qpath, rel)
        try:
            flayer = fmod.get_submodule(rel)
        except AttributeError:
            missing.append(rel)
            continue
        if isinstance(flayer, (nn.RNNBase, nn.RNNCellBase)):
            matrices = _recurrent_weights(loaded(flayer, path, (fmod, rel)))
            found += [w._replace(layer=path)
                      for w in _paired_matrices(pair, matrices, qlayer, qweights, unread)]
            continue
        fweight = _folded_weight([loaded(part, path, (fmod, rel))
                                  for part in _leaf_parts(flayer)])
        if fweight is None:
            missing.append(rel)
            continue
        found += _beside(pair, fweight, flayer, qlayer, qweights, as_computed, unread,
                         layer=path)
    if missing:
        shown = ", ".join(f"`{_prefixed(qpath, rel)}`" for rel in missing)
        unread(pair, f"the quantized {shown} inside it have no float layer with a weight at "
                     f"the same path inside the float `{type(fmod).__name__}`")
    return found


def _paired_matrices(pair: Pair, matrices: dict[str, torch.Tensor], qmod: nn.Module,
                     qweights: dict[str, Any], unread: Unread) -> list[PairedWeight]:
    """A recurrent op's float matrices beside the quantized ones, both in torch's flat order
    (per layer and direction, ``weight_ih`` then ``weight_hh``): the dynamic LSTM's keys
    (``_all_weight_values.N.param.weight_ih``) do not name the layer, their order does.

    Paired only when they correspond one to one (count, name, shape); otherwise none is, and
    ``unread`` says why."""
    if not matrices:
        unread(pair, "the float op reads its weight matrices from values that are not graph "
                     "constants fxnumeric can evaluate")
        return []
    quant = _readable(pair, qweights, unread)
    if not quant:
        return []
    float_list = list(matrices.items())
    alike = len(float_list) == len(quant) and all(
        name.startswith(key.rpartition(".")[2]) and tuple(fw.shape) == tuple(qw.shape)
        for (name, fw), (key, qw) in zip(float_list, quant, strict=True))
    if not alike:
        quant_names = ", ".join(key.rpartition(".")[2] for key, _ in quant)
        unread(pair, f"its float weight matrices ({', '.join(matrices)}) and the quantized "
                     f"`{type(qmod).__name__}`'s ({quant_names}) do not correspond one to one")
        return []
    return [PairedWeight(pair, key, fw, qw, name)
            for (name, fw), (key, qw) in zip(float_list, quant, strict=True)]


def _float_matrices(region: Region, pair: Pair, fmod: nn.Module | None,
                    ) -> dict[str, torch.Tensor] | None:
    """A recurrent float op's weight matrices by name, in torch's flat order: an
    ``nn.LSTM``'s (or cell's) parameters, or those an exported ``aten.lstm`` reads (its flat
    parameter list, whose 2-d entries are the matrices); ``None`` for any other op."""
    if isinstance(fmod, (nn.RNNBase, nn.RNNCellBase)):
        return _recurrent_weights(loaded(fmod))
    if fmod is not None:
        return None
    view = region.float_view
    for node in region.chain(pair, "float"):
        inputs = flows.recurrent_weight_inputs(node)
        if inputs is None:
            continue
        found = {}
        for source in inputs:
            value = evaluate_constant(source, view)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                # its parameter's name (``lstm.weight_ih_l1_reverse``)
                name = (str(source.target).rpartition(".")[2] if source.op == "get_attr"
                        else source.name)
                found[name] = value.detach()
        return found
    return None


def _functional_weights(region: Region, pair: Pair, unread: Unread) -> list[PairedWeight]:
    """The weight of a pair whose quantized side is a functional op (``<pair name>.weight``)."""
    quant = _read_weight(region.quant_view, region.chain(pair, "quant"))
    if quant is None:
        return []
    weight = _float_weight(region, pair)
    if weight is None:
        unread(pair, f"the quantized op reads a weight (`{quant[0].name}`), the float op "
                     "paired with it none fxnumeric reads")
        return []
    return [PairedWeight(pair, f"{pair.name}.weight", weight, quant[1])]


# --- weights held in the graph: torch.export / pt2e ops read them as (dequantized) constants

def _graph_float_weight(fv: GraphView, chain: Sequence[fx.Node]) -> torch.Tensor | None:
    """The weight a functional float op reads, BN-folded when its float chain has a
    BatchNorm after it."""
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


def _read_weight(view: GraphView, chain: Sequence[fx.Node]) -> tuple[fx.Node, torch.Tensor] | None:
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
    model's state_dict (``conv1.weight``, ``fc._packed_params._packed_params``), but for
    weights it holds packed under another name (:attr:`PairedWeight.key`: ``emb.weight``,
    ``cell.weight_ih``); a dynamic LSTM or GRU gives
    ``rnn._all_weight_values.N.param.weight_ih`` and ``.weight_hh``. When
    the quantized op absorbed a BatchNorm, the float weight is the BN-folded one, so the
    comparison measures quantization error only.
    """
    return {w.key: {"float": w.float_weight, "quantized": w.quant_weight}
            for w in pair_weights(matching, unread=_log_unread)}


def _log_unread(pair: Pair, reason: str) -> None:
    """Log a weight comparison missing from the eager API's dict (which has no notes)."""
    _log.warning("no weight comparison for %s: %s", pair.name, reason)
