"""Copies of a module tree that can be instrumented without touching the original."""

from __future__ import annotations

import functools
import types
from typing import Any

import torch.fx as fx
from torch import nn

__all__ = ["module_tree_copy", "carry_hooks"]

# Per-instance hook registries: the copy gets its own, so a hook added to it stays on it.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def module_tree_copy(model: nn.Module) -> nn.Module:
    """Copy every module object of ``model``'s tree, sharing parameters, buffers and state.

    Replacing a submodule of the copy (``copy.set_submodule``) or registering a hook on one
    of its modules leaves ``model`` as it was; no tensor is copied, so this is cheap. A
    module registered at two paths is copied once (the copy keeps that sharing).

    Instance attributes that call the original module are rebound to the copy: a method bound
    to it, or a ``functools.partial`` whose first argument it is. accelerate's hooks
    (``dispatch_model``, ``cpu_offload``, ``disk_offload``) set ``module.forward`` to
    ``partial(new_forward, module)`` and keep the class's forward, bound, as
    ``module._old_forward``; copied as they are, calling a copy would run the original module
    and its original children, so nothing replaced or hooked in the copy would run. Rebound,
    the copy runs through the same hook (``module._hf_hook``, shared), which loads the
    offloaded weights into the copy's own parameter dict and offloads them again after.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> twin = module_tree_copy(model)
        >>> _ = twin[0].register_forward_hook(lambda m, i, o: None)
        >>> twin[0] is model[0], twin[0].weight is model[0].weight, len(model[0]._forward_hooks)
        (False, True, 0)
    """
    memo: dict[int, nn.Module] = {}

    def copy_module(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        # object.__new__ + __dict__ rather than copy.copy: some quantized modules define
        # __getstate__/__copy__ that repack their weights
        twin = object.__new__(type(module))
        twin.__dict__.update(module.__dict__)
        memo[id(module)] = twin
        state: dict[str, Any] = twin.__dict__
        state["_parameters"] = dict(module._parameters)
        state["_buffers"] = dict(module._buffers)
        for name in _HOOK_DICTS:
            if name in module.__dict__:
                state[name] = type(module.__dict__[name])(module.__dict__[name])
        for name, value in module.__dict__.items():
            rebound = _rebind(value, module, twin)
            if rebound is not value:
                state[name] = rebound
        state["_modules"] = {
            name: None if child is None else copy_module(child)
            for name, child in module._modules.items()
        }
        return twin

    return copy_module(model)


def _rebind(value: Any, module: nn.Module, twin: nn.Module) -> Any:
    """``value`` calling ``twin`` where it called ``module`` (a bound method, or a partial whose
    first argument is ``module``, its wrapper attributes rebound too); else ``value`` itself."""
    if isinstance(value, types.MethodType) and value.__self__ is module:
        return types.MethodType(value.__func__, twin)
    if isinstance(value, functools.partial) and value.args and value.args[0] is module:
        rebound = functools.partial(value.func, twin, *value.args[1:], **value.keywords)
        # functools.update_wrapper's attributes (__wrapped__: inspect.signature follows it)
        rebound.__dict__.update({k: _rebind(v, module, twin) for k, v in value.__dict__.items()})
        return rebound
    return value


class _HookOf:
    """A forward (pre-)hook of ``module`` run on a module standing for it: called as torch
    calls hooks, ``hook(module_it_runs_on, *rest)``, it calls ``hook(module, *rest)``, so the
    hook reads (and sets) the attributes of the module it was registered on, as ``module(x)``
    would have it."""

    def __init__(self, hook: Any, module: nn.Module) -> None:
        self.hook, self.module = hook, module

    def __call__(self, _runs_on: nn.Module, *rest: Any) -> Any:
        return self.hook(self.module, *rest)

    def __repr__(self) -> str:
        return f"{self.hook!r} (of {type(self.module).__name__})"


def carry_hooks(target: nn.Module, source: nn.Module) -> nn.Module:
    """Give ``target`` the forward hooks and pre-hooks of ``source``; return ``target``.

    For a module that stands for ``source`` without calling it: a GraphModule traced from
    ``source.forward`` (torch.fx traces ``forward``, so ``source``'s own hooks are not in the
    graph, while those of the modules it calls are) and the instrumented or hybrid copies
    built from it. Called, ``target`` then runs as ``source(x)`` does: a pre-hook that
    normalises the input, or a hook that rescales the output, applies around its graph.
    Each hook still receives ``source`` as its module (a hook ``target`` got from another
    module keeps that one), and keeps its handle id and its ``with_kwargs`` /
    ``always_call`` settings. ``source`` is not changed.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = model.register_forward_pre_hook(lambda m, args: (args[0] * m.in_features,))
        >>> stand_in = carry_hooks(torch.nn.Identity(), model)
        >>> stand_in(torch.ones(2))
        tensor([2., 2.])
    """
    if not any(source.__dict__.get(name) for name in _HOOK_DICTS):
        return target
    for name in _HOOK_DICTS:
        hooks = source.__dict__.get(name)
        if hooks is None:
            continue
        carried = type(hooks)(target.__dict__.get(name, ()))
        for key, hook in hooks.items():
            if name in ("_forward_hooks", "_forward_pre_hooks") and not isinstance(hook, _HookOf):
                hook = _HookOf(hook, source)
            carried[key] = hook
        target.__dict__[name] = carried
    if isinstance(target, fx.GraphModule):
        _hooked_graph_module(target)
    return target


def _hooked_graph_module(gm: fx.GraphModule) -> None:
    """Make the hooks of ``gm`` work on its first call and survive pickling.

    A lazy GraphModule's first forward compiles its code, then calls the module again: every
    hook would run twice on that call (torch's ``_LazyGraphModule._lazy_forward``), so its
    code is compiled now. torch rebuilds an unpickled GraphModule from its code and keeps
    only the attributes a new one lacks, so its hooks would be lost: each GraphModule has a
    class of its own (torch makes one per instance, to hold its ``forward``), on which this
    ``__reduce__`` puts them back.
    """
    compile_now = getattr(gm, "real_recompile", None)  # only a lazy GraphModule has it
    if compile_now is not None:
        compile_now()
    if type(gm).__qualname__.endswith("GraphModuleImpl"):  # never a class another one shares
        type(gm).__reduce__ = _reduce_with_hooks  # type: ignore[method-assign]


def _reduce_with_hooks(gm: fx.GraphModule) -> tuple[Any, ...]:
    rebuild, args = super(type(gm), gm).__reduce__()  # torch's: the code and the attributes
    hooks = {name: gm.__dict__[name] for name in _HOOK_DICTS if name in gm.__dict__}
    return _rebuilt_with_hooks, (rebuild, args, hooks)


def _rebuilt_with_hooks(rebuild: Any, args: tuple[Any, ...],
                        hooks: dict[str, Any]) -> fx.GraphModule:
    gm = rebuild(*args)
    gm.__dict__.update(hooks)
    _hooked_graph_module(gm)
    return gm
