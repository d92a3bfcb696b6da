"""Models dispatched by accelerate: weights that live on the meta device until a hook loads them.

``accelerate.dispatch_model`` (a ``device_map`` with ``"cpu"`` or ``"disk"`` entries),
``cpu_offload``, ``disk_offload`` and ``from_pretrained(device_map=..., offload_folder=...)``
move a module's weights to the ``meta`` device and attach a hook (``module._hf_hook``, an
``AlignDevicesHook``, possibly inside a ``SequentialHook``) that loads them from its
``weights_map`` (a CPU state dict or memory-mapped files) before each call of the module and
drops them after. fxnumeric runs such a model through those hooks:

* copies of the module tree run the copy through the same hook
  (:func:`fxnumeric.capture.clone.module_tree_copy`);
* a module holding offloaded tensors of its own beside its children is traced through: the
  graph holds those tensors, read once from the hook (:func:`held`), up to a size; above it
  (or when ``preload_module_classes`` loads its children) it is called whole, its hook loads
  them (:func:`keeps_whole`), the layers inside it are listed unpaired with the reason
  (:func:`whole_layers`), and its row compares the weights of its quantized layers;
* the device check reads a hooked tensor's execution device, not ``meta``: :func:`devices`;
* weight comparisons read each offloaded weight from the hook's map, one module at a time, and
  never write into the user's module: :func:`loaded`.

Nothing here imports accelerate: the hooks are read by their attributes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["hooks_of", "offloaded_names", "keeps_whole", "held", "whole_modules", "whole_layers",
           "whole_paths",
           "loaded", "devices"]

_META = torch.device("meta")


def hooks_of(module: nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` that place tensors (``AlignDevicesHook`` s), a
    ``SequentialHook`` unpacked; ``[]`` for a module without hooks."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return []
    found = list(getattr(hook, "hooks", None) or [hook])
    return [h for h in found if hasattr(h, "execution_device")]


def _direct_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t for name, t in (*module._parameters.items(), *module._buffers.items())
            if isinstance(t, torch.Tensor)}


def offloaded_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own parameters and buffers that are on the meta device while a
    hook on it is there to load them (empty for an ordinary module)."""
    if not hooks_of(module):
        return []
    return [name for name, t in _direct_tensors(module).items() if t.device == _META]


_HELD_BYTES = 16 * 2**20
"""A module's own offloaded tensors up to this size in all are read once into the graphs that
trace through it (:func:`held`); larger ones keep it whole, called through its hook."""


def keeps_whole(module: nn.Module) -> bool:
    """Whether ``module`` must be called whole rather than traced through: its own tensors are
    offloaded and larger than :data:`_HELD_BYTES` (a graph tracing through it would hold them
    for the whole comparison), or, with accelerate's ``preload_module_classes``, its hook loads
    its submodules'. Smaller own tensors (a scale beside a Linear) are read into the graph
    (:func:`held`), so the module is traced through as in memory."""
    if any(getattr(h, "place_submodules", False) and getattr(h, "offload", False)
           for h in hooks_of(module)):
        return True
    own = _direct_tensors(module)
    return sum(own[name].numel() * own[name].element_size()
               for name in offloaded_names(module)) > _HELD_BYTES


def held(module: nn.Module, name: str, where: str = "") -> torch.Tensor | None:
    """What a graph traced through ``module`` holds for its tensor ``name`` when that one is
    offloaded (read from the hook's weights map, on the hook's execution device; a parameter
    stays one); ``None`` for a tensor that is not. The user's module is not touched.

    Raises:
        InputError: as :func:`loaded`, when no hook holds its value.
    """
    if name not in offloaded_names(module):
        return None
    value = getattr(loaded(module, where), name).detach()
    device = _execution_device(module)
    if device is not None:
        value = value.to(device)
    return nn.Parameter(value, requires_grad=False) if name in module._parameters else value


def whole_modules(model: Any) -> dict[str, tuple[str, str]]:
    """``{path: (why, fix)}`` of the outermost modules of ``model`` that accelerate's hooks
    make fxnumeric call whole although they hold layers of their own: one whose own tensors
    are offloaded above :data:`_HELD_BYTES` (a custom module holding a parameter beside its
    children; the root too, path ``""``: then the model is one op, and this its only entry),
    or one that ``preload_module_classes`` loads whole. ``why`` says which hook
    keeps it whole, ``fix`` how to have its layers one by one. Such a module is one op: one
    row (comparing its quantized layers' weights), one layer for sensitivity and advise (its
    quantized layers kept float or quantized together), one layer for diagnose."""
    if not isinstance(model, nn.Module):
        return {}
    found: dict[str, tuple[str, str]] = {}
    for path, module in model.named_modules():
        if not module._modules or not keeps_whole(module):
            continue
        if any(not outer or path.startswith(f"{outer}.") for outer in found):
            continue  # inside one found already (the root, when it is one, holds them all)
        own = offloaded_names(module)
        if own:
            why = (f"accelerate offloads its own {', '.join(f'`{n}`' for n in own)}, which "
                   "its hook loads only when it is called (more than the "
                   f"{_HELD_BYTES} bytes a graph traced through it may hold: "
                   "fxnumeric.offload._HELD_BYTES)")
            fix = (f"Keep `{path}`'s own tensors in memory (a device_map entry putting "
                   f"`{path}` on the execution device)" if path else
                   "Keep the model's own tensors in memory (device_map entries putting "
                   f"{', '.join(f'`{n}`' for n in own)} on the execution device, its "
                   "submodules where you like)")
        else:
            why = "accelerate's preload_module_classes hook loads its layers when it is called"
            fix = "Dispatch without preload_module_classes"
        found[path] = (why, fix)
    return found


def whole_layers(model: Any) -> list[tuple[str, str, str]]:
    """``(layer path, parent path, why)`` of each module with a weight of its own inside a
    module of :func:`whole_modules`. The parent is compared as one op (its hook must run to
    load them; its row compares its quantized layers' weights), so these layers are not
    compared one by one. ``why`` says which hook keeps the parent whole."""
    found: list[tuple[str, str, str]] = []
    for path, (why, _) in whole_modules(model).items():
        found += [(f"{path}.{name}" if path else name, path, why)
                  for name, child in model.get_submodule(path).named_modules()
                  if name and isinstance(child._parameters.get("weight"), torch.Tensor)]
    return found


def whole_paths(model: Any) -> list[str]:
    """Paths of the modules of ``model`` that :func:`keeps_whole`, to keep whole on both sides
    of a pair (a custom module with an offloaded parameter of its own, traced through on the
    in-memory side, would not pair with itself called whole); ``""`` for a root kept whole, as
    ``leaf_modules=[""]`` (the whole model as one op) names it."""
    if not isinstance(model, nn.Module):
        return []
    return [path for path, module in model.named_modules() if keeps_whole(module)]


def _offloaded_value(module: nn.Module, name: str,
                     holder: tuple[nn.Module, str] | None = None) -> torch.Tensor | None:
    # the module's own hook, else (preload_module_classes) the hook of the module holding it,
    # whose weights map names the tensor by its path inside that module
    holders = [(module, name)]
    if holder is not None:
        holders.append((holder[0], f"{holder[1]}.{name}"))
    for owner, key in holders:
        for hook in hooks_of(owner):
            weights = getattr(hook, "weights_map", None)
            if weights is None:
                continue
            try:
                value = weights[key]
            except KeyError:
                continue
            if isinstance(value, torch.Tensor):
                return value
    return None


def loaded(module: nn.Module, where: str = "",
           holder: tuple[nn.Module, str] | None = None) -> nn.Module:
    """``module`` with its offloaded tensors readable: the module itself when none is
    offloaded, else a shallow copy whose offloaded parameters and buffers are read from the
    hook's weights map (the user's module is not touched; its hook still offloads it).

    Args:
        module: a module of a model dispatched by accelerate, or any module.
        where: the module's path, for the error message.
        holder: ``(ancestor, path of module inside it)``: an ancestor whose hook may hold the
            module's tensors (accelerate's ``preload_module_classes`` hooks the parent only).

    Raises:
        InputError: a tensor is on the meta device and no hook on the module holds its value.
    """
    names = offloaded_names(module)
    if not names and not any(t.device == _META for t in _direct_tensors(module).values()):
        return module
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)
    twin.__dict__["_parameters"] = dict(module._parameters)
    twin.__dict__["_buffers"] = dict(module._buffers)
    for name, tensor in _direct_tensors(module).items():
        if tensor.device != _META:
            continue
        value = _offloaded_value(module, name, holder)
        if value is None:
            raise InputError(
                f"`{where or type(module).__name__}.{name}` is on the meta device and no "
                "accelerate hook on that module holds its value, so its weight cannot be "
                "compared (a model built under init_empty_weights and never loaded, or "
                "dispatched with preload_module_classes, whose hook sits on a parent module).\n"
                "Fix: load the weights (accelerate.load_checkpoint_and_dispatch), or leave "
                "weights out: compare(..., comparisons=('outputs', 'shadows'))")
        store = "_parameters" if name in module._parameters else "_buffers"
        twin.__dict__[store][name] = value.detach()
    return twin


def devices(model: Any) -> set[torch.device]:
    """Where ``model``'s tensors compute: a tensor offloaded by a hook counts as the hook's
    execution device (a submodule's too, under a hook that places its submodules); a tensor
    on the meta device with no hook stays ``meta``. A model that is not an ``nn.Module`` (an
    ``ExportedProgram``) answers by its ``parameters()`` and ``buffers()``."""
    if not isinstance(model, nn.Module):
        return {t.device for t in (*model.parameters(), *model.buffers())}
    found: set[torch.device] = set()

    def visit(module: nn.Module, inherited: torch.device | None) -> None:
        own = _execution_device(module)
        placing = next((_device(h.execution_device) for h in hooks_of(module)
                        if getattr(h, "place_submodules", False)
                        and h.execution_device is not None), None)
        for tensor in _direct_tensors(module).values():
            if tensor.device == _META:
                found.add(own or placing or inherited or _META)
            else:
                found.add(tensor.device)
        for child in module._modules.values():
            if child is not None:
                visit(child, placing or inherited)

    visit(model, None)
    return found


def _device(value: Any) -> torch.device:
    return value if isinstance(value, torch.device) else torch.device(value)


def _execution_device(module: nn.Module) -> torch.device | None:
    for hook in hooks_of(module):
        if hook.execution_device is not None:
            return _device(hook.execution_device)
    return None
