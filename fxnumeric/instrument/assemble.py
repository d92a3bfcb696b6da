"""Assemble a runnable model from a matching's regions, some of them replaced.

Instrumented models and hybrid models are built region by region: each region's graph is
edited (observers, shadows, swapped layers) into a module of its own. :func:`assemble` puts
those modules back where the regions sit, the same way for every capture:

* no region replaced: the model as captured (the whole model's graph, or the user's model);
* only the region covering the whole model replaced: that module, calling the user's own
  submodules (nothing is copied);
* otherwise a :func:`~fxnumeric.capture.clone.module_tree_copy` of the user's model (new
  module objects, shared tensors) with each replaced region set at its path, innermost
  first; each region's graph calls the copy's modules, so what was replaced inside a module
  it calls stays in. A replaced module is wrapped in :class:`Spliced`, which answers every
  other attribute from the module it replaces: the parent's own code still reads
  ``self.projection.weight.dtype`` (a ViT's patch embedding) or ``self.attn.num_heads``.

A replacement runs the forward hooks and pre-hooks of the region's captured graph, which
:func:`~fxnumeric.capture.trace` gave it from the module it traced (torch.fx traces
``forward``, without the module's own hooks): a pre-hook that normalises the model's input
applies to every instrumented and hybrid model, as to ``model(x)``.

The user's models carry nothing new afterwards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..capture.clone import carry_hooks, module_tree_copy
from ..errors import FxNumericWarning
from ..match import Matching, Region

__all__ = ["assemble", "captured_model", "Build", "Spliced", "CallSites"]

Build = Callable[[nn.Module | None], nn.Module]
"""Called as ``build(calls)``: the replacement module of one region, whose graph's
``call_module`` targets are read from ``calls`` (None: the user's own modules)."""


class Spliced(nn.Module):
    """A region's replacement inside an assembled model.

    Calling it calls ``inner`` (the instrumented or hybrid graph); any attribute it does not
    have itself is read from ``replaced``, the module it stands in for, which is not
    registered as a submodule (its weights are not listed twice). A functional module's
    region (:attr:`fxnumeric.match.Region.method`) is called through that method
    (``self.add.add(y, x)``): the method is ``inner``.
    """

    def __init__(self, inner: nn.Module, replaced: nn.Module, method: str = "") -> None:
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "_replaced", replaced)
        self._method = method

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner(*args, **kwargs)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name and name == self.__dict__.get("_method"):
                return self.inner
            return getattr(self.__dict__["_replaced"], name)


class CallSites(nn.Module):
    """One module per call site of a region: the ``i``-th call of each forward runs
    ``sites[i]``.

    The calls per forward were counted on the first batch. Spliced into a model tree
    (:func:`assemble`), the count restarts with every forward of the model, and a forward that
    calls the region more often runs the calls past the sites on ``fallback`` (the region's
    module as the model holds it, observing nothing) and warns once: those calls belong to no
    row, rather than to the row of another call. Counted across forwards (the count of a
    model that made 3 calls, then 1, then 3 ran the third batch's first call as the second
    call site), the rows mixed calls whenever a batch made fewer. Without a fallback (the
    region covering the whole model, called once per forward; a matching made without example
    inputs, whose calls were not counted: the eager API's one logger per module, logged at
    every call) calls cycle through the sites.
    """

    def __init__(self, sites: list[nn.Module]) -> None:
        super().__init__()
        self.sites = nn.ModuleList(sites)
        self.calls = 0
        self.path = ""
        self.unobserved = 0  # calls run on the fallback, past the first batch's count
        object.__setattr__(self, "_fallback", None)

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        call, self.calls = self.calls, self.calls + 1
        fallback = self.__dict__["_fallback"]
        if call < len(self.sites) or fallback is None:
            return self.sites[call % len(self.sites)](*args, **kwargs)
        if not self.unobserved:
            counted = len(self.sites)
            warnings.warn(FxNumericWarning(
                f"`{self.path}` is called more often in a batch than in the first "
                f"({counted} call{'s' if counted > 1 else ''} a forward), whose calls set its "
                f"rows: the calls past the first {counted} are not compared. Put a batch "
                "that makes the most calls first"), stacklevel=2)
        self.unobserved += 1
        return fallback(*args, **kwargs)


class _Restart:
    """A forward pre-hook that restarts the call count of every :class:`CallSites`."""

    def __init__(self, sites: list[CallSites]) -> None:
        self.sites = sites

    def __call__(self, module: nn.Module, args: Any) -> None:
        for site in self.sites:
            site.calls = 0


def _depth(path: str) -> int:
    return path.count(".") + 1 if path else 0


def captured_model(matching: Matching, side: str) -> nn.Module:
    """``side``'s model as captured: the whole model's graph, or the user's model."""
    if matching.root is not None:
        return matching.root.view(side).gm
    model = matching.float_model if side == "float" else matching.quant_model
    assert model is not None
    return model


def assemble(matching: Matching, side: str, replaced: Mapping[Region, Build]) -> nn.Module:
    """``side``'s model (``"float"`` or ``"quant"``) with the regions in ``replaced`` swapped
    for the modules their builds return.

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> from fxnumeric import match
        >>> f = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()
        >>> m = match(f, quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear}))
        >>> assemble(m, "float", {}) is m.float_graph
        True
    """
    if not replaced:
        return captured_model(matching, side)
    if set(replaced) == {matching.root}:
        # the replacement stands for the captured graph: it runs the model's own hooks too
        return carry_hooks(replaced[matching.root](None),  # type: ignore[index]
                           captured_model(matching, side))
    model = matching.float_model if side == "float" else matching.quant_model
    assert model is not None
    root = module_tree_copy(model)
    # a module registered at several paths (one layer shared by a ModuleList) is one region
    # whose calls (its call sites) run through each of them: its replacement goes at all of
    # them, so that CallSites counts every call. Called once per forward (the quantized
    # model's copy is no longer shared), the region is what runs at its own path.
    paths: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    counted: list[CallSites] = []
    for region in sorted(replaced, key=lambda r: _depth(r.path(side)), reverse=True):
        path = region.path(side)
        own = root.get_submodule(path)
        inner = replaced[region](root.get_submodule(region.scope(side)))
        if isinstance(inner, CallSites) and path and matching.call_order:  # calls counted
            inner.path = path
            object.__setattr__(inner, "_fallback", own)
            counted.append(inner)
        module = carry_hooks(Spliced(inner, own, region.method), region.view(side).gm)
        if not path:
            root = module
        else:
            for alias in paths.get(id(own), [path]) if region.call_sites > 1 else [path]:
                root.set_submodule(alias, module)
    if counted:
        root.register_forward_pre_hook(_Restart(counted))
    return root
