"""Instrument models captured through the module tree, on copies of them.

:func:`fxnumeric.instrument.instrument` calls :func:`instrument_tree` for a matching that is
not one whole graph per model. The float and quantized copies are
:func:`~fxnumeric.capture.clone.module_tree_copy` s of the user's models (they share weights,
not module objects). In each copy:

* every region (a submodule pair captured as graphs) is replaced by the GraphModule that
  :func:`~fxnumeric.instrument.instrument` builds for the region's own matching, exactly as
  for a whole-model graph; the innermost regions go first, and each region's graph calls the
  copy's submodules, so what was instrumented inside a submodule kept whole stays in;
* every module-tree pair gets a forward hook on the copy's module: output observers receive
  its output; a shadow (the float module itself, or a deep copy when calling it could change
  it) runs on its dequantized inputs, and its observer receives ``(quantized output, float
  output)``.

The user's models carry no hook and no new submodule afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from .._tensors import dequantize_all
from ..ops import is_pure
from .clone import module_tree_copy

if TYPE_CHECKING:
    from ..instrument import Instrumented, OutputObservers, ShadowObserver
    from ..match import Matching, Pair, RegionMatching

__all__ = ["instrument_tree"]


def instrument_tree(
    matching: Matching,
    pairs: list[Pair],
    *,
    outputs: OutputObservers | None = None,
    shadows: ShadowObserver | None = None,
) -> Instrumented:
    """Attach observers to ``pairs`` of a module-tree matching, in copies of both models.

    Same contract as :func:`fxnumeric.instrument.instrument` (observers keyed by pair name,
    built once per name, shadows that cannot run listed in ``skipped``).
    """
    from ..instrument import Instrumented

    assert matching.float_model is not None and matching.quant_model is not None
    float_copy = module_tree_copy(matching.float_model) if outputs is not None else None
    quant_copy = module_tree_copy(matching.quant_model)
    built = Instrumented(float_copy, quant_copy)  # collects the observers as they are made
    for pair in pairs:
        if pair.found_by == "module":
            _hook(matching, pair, built, outputs, shadows)
    by_region: dict[int, list[Pair]] = {}
    for pair in pairs:
        if pair in matching.origin:
            by_region.setdefault(id(matching.origin[pair][0]), []).append(pair)
    float_root, quant_root = float_copy, quant_copy
    for region in sorted(matching.regions, key=lambda r: _depth(r.quant_path), reverse=True):
        if id(region) in by_region:
            float_gm, quant_gm = _instrument_region(
                matching, region, by_region[id(region)], float_root, quant_root, built,
                outputs, shadows,
            )
            float_root = _put(float_root, region.float_path, float_gm)
            quant_root = _put(quant_root, region.quant_path, quant_gm)
    # the root region, if any, replaced the whole copy
    return dataclasses.replace(built, float_model=float_root, quant_model=quant_root)


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def _put(root: nn.Module | None, path: str, module: nn.Module | None) -> nn.Module | None:
    """Replace ``root``'s submodule at ``path`` (in the copy) with ``module``."""
    if root is None or module is None:
        return root
    if not path:
        return module
    root.set_submodule(path, module)
    return root


def _instrument_region(
    matching: Matching,
    region: RegionMatching,
    flat_pairs: list[Pair],
    float_root: nn.Module | None,
    quant_root: nn.Module,
    built: Instrumented,
    outputs: OutputObservers | None,
    shadows: ShadowObserver | None,
) -> tuple[nn.Module | None, nn.Module]:
    """Instrument one region with the building block; its graphs call the copies' modules."""
    from ..instrument import instrument

    flat_of = {matching.origin[p][1]: p for p in flat_pairs}
    sub = instrument(
        region.matching,
        select=lambda p, m: p in flat_of,
        outputs=(lambda p: outputs(flat_of[p])) if outputs is not None else None,
        shadows=(lambda p: shadows(flat_of[p])) if shadows is not None else None,
    )
    lead = f"{region.quant_path}." if region.quant_path else ""
    built.float_observers.update({lead + k: v for k, v in sub.float_observers.items()})
    built.quant_observers.update({lead + k: v for k, v in sub.quant_observers.items()})
    built.shadow_observers.update({lead + k: v for k, v in sub.shadow_observers.items()})
    built.skipped.update({lead + k: v for k, v in sub.skipped.items()})
    float_gm = None
    if sub.float_model is not None and float_root is not None:
        float_gm = _call_copies(sub.float_model, region.matching.float_graph,
                                float_root.get_submodule(region.float_path))
    quant_gm = _call_copies(sub.quant_model, region.matching.quant_graph,
                            quant_root.get_submodule(region.quant_path))
    return float_gm, quant_gm


def _call_copies(gm: nn.Module, traced: fx.GraphModule, copy_root: nn.Module) -> nn.Module:
    """Point ``gm``'s calls of the traced graph's modules at the copy's modules.

    The building block's GraphModule calls the user's submodules; the copy's may carry hooks
    or instrumented regions below them (a submodule kept whole, then descended into).
    """
    for node in traced.graph.nodes:
        if node.op == "call_module":
            gm.set_submodule(str(node.target), copy_root.get_submodule(str(node.target)))
    return gm


def _hook(
    matching: Matching,
    pair: Pair,
    built: Instrumented,
    outputs: OutputObservers | None,
    shadows: ShadowObserver | None,
) -> None:
    """Forward hooks on the copies' modules of one module-tree pair."""
    assert matching.float_model is not None
    (float_path,), (quant_path,) = pair.float_nodes, pair.quant_nodes
    quant_module = built.quant_model.get_submodule(quant_path)
    if outputs is not None and built.float_model is not None:
        if pair.name not in built.quant_observers:
            built.float_observers[pair.name], built.quant_observers[pair.name] = outputs(pair)
        float_obs, quant_obs = built.float_observers[pair.name], built.quant_observers[pair.name]
        built.float_model.get_submodule(float_path).register_forward_hook(
            lambda module, args, output: float_obs(output)
        )
        quant_module.register_forward_hook(lambda module, args, output: quant_obs(output))
    if shadows is not None:
        if pair.name not in built.shadow_observers:
            built.shadow_observers[pair.name] = shadows(pair)
        observer = built.shadow_observers[pair.name]
        float_module = matching.float_model.get_submodule(float_path)
        # as for graph shadows: torch's own eval-mode modules are called as they are
        shadow = float_module if is_pure(float_module) else copy.deepcopy(float_module)

        def run_shadow(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            float_output = shadow(*dequantize_all(args),
                                  **{k: dequantize_all(v) for k, v in kwargs.items()})
            observer(output, float_output)

        quant_module.register_forward_hook(run_shadow, with_kwargs=True)
