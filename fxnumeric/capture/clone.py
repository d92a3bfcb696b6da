"""Copies of a module tree that can be instrumented without touching the original."""

from __future__ import annotations

import functools
import types
from typing import Any

from torch import nn

__all__ = ["module_tree_copy"]

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
