"""Stage 1, trace: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule``.

The traced GraphModule shares its submodules with the user's model (nothing is copied and
nothing is changed), and its leaves are what the matcher pairs: every module from ``torch.nn``
or ``torch.ao.nn`` (float, QAT, quantized, dynamic and reference forms), fused intrinsic
modules such as ``ConvReLU2d`` kept whole, observers, fxnumeric's loggers, and whatever the
user names in ``leaf_modules``.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import operator
import os
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import flows
from ..errors import TraceError
from ..offload import held, hooks_of, keeps_whole
from ..run import buffers_put_back
from ..view import fixed_inputs
from .clone import carry_hooks

__all__ = [
    "trace", "LeafSpec", "TraceFailure", "is_leaf", "trace_submodule", "single_call_graph",
    "leaf_graph", "graph_module", "FUNCTIONAL_METHODS", "is_functional", "method_graph",
    "fixed_arguments", "attributes_kept", "kwargs_only",
]

LeafSpec = type | str
"""A module type, or a qualified module name such as ``"encoder.layers.0"``."""

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(__file__))


def graph_module(root: nn.Module | dict[str, Any], graph: fx.Graph,
                 class_name: str = "GraphModule") -> fx.GraphModule:
    """A GraphModule whose Python code is generated on first use, not on construction.

    fxnumeric reads most graphs without running them (matching reads the graph; only the
    instrumented copies run), and generating and compiling the code of a GraphModule took
    about a third of ``prepare_model_outputs`` on mobilenet_v2. torch's
    ``_LazyGraphModule`` (the GraphModule torch.compile uses) defers it; where it is missing,
    a plain GraphModule is made.

    The GraphModule holds what torch's constructor gives it (the modules, parameters and
    buffers the graph's nodes name, under empty modules for their parents), but each parent
    path is looked up once, not once per node under it: torch's constructor walked the whole
    path of every node and took 6 ms for each of the four graphs ``prepare_model_outputs``
    builds on mobilenet_v2.
    """
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule as cls
    except ImportError:  # pragma: no cover - older or newer torch
        cls = fx.GraphModule
    if not isinstance(root, nn.Module):
        return cls(root, graph, class_name=class_name)
    gm = cls(root, fx.Graph(), class_name=class_name)  # torch's own set-up, for no node
    _share_targets(root, gm, graph)
    gm.graph = graph
    tracer_cls = graph._tracer_cls  # as torch's constructor keeps them (torch.package reads them)
    if tracer_cls is not None and "<locals>" not in tracer_cls.__qualname__:
        gm._tracer_cls = tracer_cls
    gm._tracer_extras = graph._tracer_extras or {}
    return gm


def _share_targets(root: nn.Module, gm: fx.GraphModule, graph: fx.Graph) -> None:
    """Put on ``gm`` what ``graph``'s nodes read from ``root``, as torch.fx's ``_copy_attr``
    does for each node (same objects, same empty parents), walking each parent path once."""
    # path -> (root's module there, gm's module there); None once the two are the same
    # module (a node's module was installed whole, so everything under it is there too)
    walked: dict[str, tuple[nn.Module, nn.Module] | None] = {"": (root, gm)}

    def walk(path: str) -> tuple[nn.Module, nn.Module] | None:
        if path in walked:
            return walked[path]
        parent, _, item = path.rpartition(".")
        above = walk(parent)
        if above is not None:
            source, target = getattr(above[0], item), getattr(above[1], item, None)
            if source is target:
                above = None
            else:
                if target is None:
                    target = nn.Module()
                    setattr(above[1], item, target)
                above = (source, target)
        walked[path] = above
        return above

    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        path = str(node.target)
        parent, _, field = path.rpartition(".")
        owners = walk(parent)
        if owners is None:
            continue
        source, target = owners
        # a tensor accelerate offloaded from a module traced through: its value, not meta
        offloaded = held(source, field, parent) if node.op == "get_attr" else None
        value = getattr(source, field) if offloaded is None else offloaded
        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            target.register_buffer(field, value,
                                   persistent=field not in source._non_persistent_buffers_set)
        else:
            # where this replaces an empty parent made for an earlier node, paths under it
            # still lead to that parent: harmless, the module put here holds all they hold
            setattr(target, field, value)


def _always_leaf_types() -> tuple[type, ...]:
    from torch.ao.nn.intrinsic import _FusedModule
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase
    from torch.ao.quantization.observer import ObserverBase
    from torch.ao.quantization.stubs import DeQuantStub, QuantStub

    from ..loggers import Logger

    return (_FusedModule, ObserverBase, FakeQuantizeBase, Logger, QuantStub, DeQuantStub)


class _ModuleStack(OrderedDict):
    """torch.fx's stack of the modules being traced, copied into each node's
    ``nn_module_stack`` as the plain OrderedDict torch makes, without ``copy.copy``'s
    generic path (a tenth of tracing mobilenet_v2)."""

    def __copy__(self) -> OrderedDict:
        return OrderedDict(self)


class _Scope(fx.proxy.Scope):
    """torch.fx's current module, copied on entering each module the same way."""

    def __copy__(self) -> fx.proxy.Scope:
        return fx.proxy.Scope(self.module_path, self.module_type)


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put back every attribute tracing set on ``model``'s modules.

    A forward that caches on its first call writes what it computed into the module:
    torchvision's ``MultiScaleRoIAlign`` sets ``self.scales``, which, traced, is a torch.fx
    ``Proxy``; every later forward of the user's model then failed ("Proxy object cannot be
    iterated"). A cache filled in place (``self.cache["w"] = ...``, a list appended to) is put
    back too: its Proxy made the model return ``Proxy(getattr_1)`` afterwards. torch.fx also
    leaves its tensor constants (``_tensor_constant0``) on the root. The graph built in the
    block has what it needs by then. So are the buffers' values: torch.fx runs an in-place
    op on a buffer that no Proxy enters (``self.ema.mul_(0.9)``) on the buffer itself while
    tracing, and a check of a graph runs the model (a running average updated in place)."""
    # copies in C (dict(), list(), set()), compared on the way out by identity, also in C:
    # every module holds about fifteen containers of torch's own (_parameters, hooks), and
    # reading each item in Python cost 6-9 ms per model of mobilenet_v2's size, a sixth of
    # the eager API's setup
    kept = [(m.__dict__, dict(m.__dict__), [(v, _copied(v)) for v in m.__dict__.values()
                                            if isinstance(v, (dict, list, set))])
            for m in model.modules()]
    with buffers_put_back(model):
        try:
            yield
        finally:
            _restore(kept)


def _restore(kept: list[tuple[dict[str, Any], dict[str, Any], list[tuple[Any, Any]]]]
             ) -> None:
    """Put each module's attributes, and the containers it holds, back as
    :func:`attributes_kept` copied them."""
    for now, before, containers in kept:
        if _changed(now, before):
            for key in [k for k in now if k not in before]:
                del now[key]
            for key, value in before.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value
        for container, items in containers:  # filled in place: self.cache["w"]
            if _changed(container, items):
                container.clear()
                if isinstance(container, list):
                    container.extend(items)
                else:
                    container.update(items)


def _copied(container: dict | list | set) -> dict | list | set:
    """A shallow copy of ``container``'s items, as a plain dict, list or set."""
    if isinstance(container, dict):
        return dict(container)
    return list(container) if isinstance(container, list) else set(container)


def _changed(container: dict | list | set, items: dict | list | set) -> bool:
    """Whether ``container`` holds other items than its copy ``items`` (:func:`_copied`): by
    identity and in order, never by ``==`` (a tensor's compares element-wise)."""
    if len(container) != len(items):
        return True
    if isinstance(container, set):
        return container != items  # a set's lookups match identical items first
    if not all(map(operator.is_, container, items)):  # a dict's keys, a list's items
        return True
    return isinstance(container, dict) and not all(
        map(operator.is_, container.values(), items.values()))


_MISSING = object()


class _Tracer(fx.Tracer):
    """A tracer whose leaves are torch's modules, fused modules, the flows' layers (torchao's QAT
    layers) and the user's choices.

    Every argument has a default: a GraphModule keeps the class of the tracer that made it,
    and unpickling one (``torch.load`` of a model prepared by ``prepare_model_outputs``)
    re-traces its code with a subclass of that class made with no arguments.
    """

    def __init__(self, leaf_types: tuple[type, ...] = (), leaf_names: frozenset[str] = frozenset(),
                 prefix: str = "") -> None:
        super().__init__()
        self.module_stack = _ModuleStack()
        self.scope = _Scope("", None)
        self._leaf_types = _always_leaf_types() + leaf_types
        self._leaf_names = leaf_names
        self._prefix = f"{prefix}." if prefix else ""  # where the traced module sits in the model
        self.scope_path: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        qualified = f"{self._prefix}{module_qualified_name}".rstrip(".")
        if qualified in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        if keeps_whole(m):  # its weights are offloaded by accelerate: its hook must load them
            return True
        if flows.is_leaf_module(m):  # a flow's layer: one op in its own form (torchao QAT)
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        # Remember where we are so a failure can name the module; popped only on success,
        # so after an exception the list ends with the innermost module being traced.
        self.scope_path.append(self.path_of_module(m))
        if (hooks_of(m) and callable(m.__dict__.get("_old_forward"))
                and not (m._forward_hooks or m._forward_pre_hooks)):
            # accelerate's forward loads the module's weights around its class's forward
            # (kept as _old_forward): traced through, its offloaded tensors are the graph's
            # (capture.fx._share_targets reads them), so the class's forward is what runs.
            # (``forward`` would also run the module's own torch hooks: then it stays.)
            forward = m._old_forward
        out = super().call_module(m, forward, args, kwargs)
        self.scope_path.pop()
        return out


def _split_leaves(
    leaf_modules: Iterable[LeafSpec] | None,
) -> tuple[tuple[type, ...], frozenset[str]]:
    types: list[type] = []
    names: set[str] = set()
    for spec in leaf_modules or ():
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str):
            names.add(spec)
        else:
            raise TraceError(
                f"leaf_modules entries must be nn.Module subclasses or qualified module names, "
                f"got {spec!r}"
            )
    return tuple(types), frozenset(names)


def _user_frame(exc: BaseException) -> str:
    """``file:line: source`` of the innermost frame in user code (else in a torch module)."""
    frames = traceback.extract_tb(exc.__traceback__)
    fx_dir = os.path.join(_TORCH_DIR, "fx")
    for outside_torch in (True, False):
        for frame in reversed(frames):
            path = os.path.abspath(frame.filename)
            if path.startswith(_PACKAGE_DIR) or path.startswith(fx_dir):
                continue
            if outside_torch and path.startswith(_TORCH_DIR):
                continue
            line = (frame.line or linecache.getline(frame.filename, frame.lineno or 0)).strip()
            return f"{frame.filename}:{frame.lineno}: {line}"
    return "(no source frame)"


def is_leaf(module: nn.Module, path: str, leaf_modules: Iterable[LeafSpec] | None = None) -> bool:
    """Whether ``module`` (at ``path`` in its model) is kept whole when tracing."""
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    return _Tracer(leaf_types, leaf_names).is_leaf_module(module, path)


def fixed_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The arguments to fix when tracing ``module`` for the call ``module(*args, **kwargs)``
    (torch.fx's ``concrete_args``), or None if no one graph can stand for that call.

    An argument the call leaves out is fixed to its default, and one it gives as ``None`` to
    None: traced as graph inputs, ``if mask is not None`` would take the branch the call does
    not (a Proxy is never None). Tensors stay graph inputs. A call giving another Python value
    (an int, a flag, a cache object), or ``*args`` / ``**kwargs`` values, gives None: that value
    could change from call to call.

    Example:
        >>> class M(torch.nn.Module):
        ...     def forward(self, x, y=None, scale=2.0):
        ...         return x if y is None else x + y
        >>> fixed_arguments(M(), (torch.ones(1),), {})
        {'y': None, 'scale': 2.0}
        >>> fixed_arguments(M(), (torch.ones(1), torch.ones(1)), {})
        {'scale': 2.0}
    """
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    fixed: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        passed = name in bound.arguments
        value = bound.arguments.get(name, param.default)
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            if passed and value:
                return None  # torch.fx cannot give *args / **kwargs placeholders
            continue
        if isinstance(value, torch.Tensor):
            continue
        if value is None or not passed:
            fixed[name] = value  # asserted by torch.fx at run time
        else:
            return None  # a Python value (int, bool, cache object): it could change per call
    return fixed


def _named_as_arguments(graph: fx.Graph, concrete_args: dict[str, Any] | None) -> None:
    """Give the placeholders of fixed arguments their arguments' names back.

    torch.fx names the placeholder of a fixed argument ``mask_1`` (it keeps one, for its
    run-time check that the value is the one fixed), so the graph's forward takes ``mask_1=``:
    a caller passing ``mask=None``, as the model takes it, got "unexpected keyword argument
    'mask'". Only the name the caller sees (the placeholder's target) changes.
    """
    if not concrete_args:
        return
    placeholders = graph.find_nodes(op="placeholder")
    taken = {str(n.target) for n in placeholders}
    fixed, _ = fixed_inputs(placeholders)
    for node in placeholders:
        name, _, suffix = str(node.target).rpartition("_")
        # torch.fx's own renaming (``mask_1``) of a placeholder only its checks read: not an
        # input ``mask_b`` or ``mask_1`` of the model's own beside a fixed ``mask``
        if (suffix.isdigit() and name in concrete_args and name not in taken
                and (node in fixed or not node.users)):
            node.target = name
            taken.add(name)


@dataclass(frozen=True)
class TraceFailure:
    """Why torch.fx could not trace a module.

    Attributes:
        scope: path, relative to the traced module, of the innermost submodule being traced
            when it failed; ``""`` when the module's own ``forward`` failed.
        reason: the exception, one line, with the user's source line.
        differs: the trace succeeded but computes differently from the forward (a buffer
            written while tracing), rather than failing.
    """

    scope: str
    reason: str
    differs: bool = False


def trace_submodule(
    module: nn.Module,
    path: str,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule | TraceFailure:
    """Trace the submodule at ``path`` on its own; a failure is returned, not raised.

    ``leaf_modules`` names are qualified from the model's root, as in :func:`trace`.
    ``concrete_args`` fixes arguments (``None`` values are asserted at run time by torch.fx).
    The graph runs the submodule's own forward hooks, as :func:`trace`'s does.
    """
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    tracer = _Tracer(leaf_types, leaf_names, path)
    with attributes_kept(module):
        versions = _buffer_versions(module)
        try:
            graph = tracer.trace(module, concrete_args=concrete_args)
        except Exception as exc:  # torch.fx raises many types; all mean "cannot trace"
            first_line = (str(exc).splitlines() or [""])[0][:200]
            scope = tracer.scope_path[-1] if tracer.scope_path else ""
            return TraceFailure(scope,
                                f"{type(exc).__name__}: {first_line} (at {_user_frame(exc)})")
        written = _written_while_tracing(versions, graph)
        if written:
            return TraceFailure("", f"{written}. Kept whole: its children are compared, the "
                                "code of its own forward is not; to compare it too, write the "
                                "update from a traced value (`self.ema.lerp_(h.mean(0), 0.1)`)",
                                differs=True)
        _named_as_arguments(graph, concrete_args)
        gm = graph_module(module, graph, class_name=type(module).__name__)
    return carry_hooks(gm, module)


def _call_graph(module: nn.Module, target: str,
                extra_kwargs: tuple[str, ...] = ()) -> fx.GraphModule:
    """A graph whose one op calls ``module``, held as submodule ``target``; it takes the
    module's named arguments and, by name, the ``extra_kwargs`` its ``**kwargs`` is called
    with (recorded on example inputs).

    The module gets its first argument (the layer's input) and every other required one by
    position, so that a forward pre-hook registered without ``with_kwargs`` sees them, and
    the ones with defaults by name, as transformers passes them: its decorators read such an
    argument from ``kwargs`` and add it there again when it came by position
    (``merge_with_config_defaults``: T5's encoder, "got multiple values for argument
    'use_cache'").
    """
    graph = fx.Graph()
    params = [
        p for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    args: list[fx.Node] = []
    kwargs: dict[str, fx.Node] = {}
    for i, p in enumerate(params):
        node = graph.placeholder(
            p.name, default_value=p.default if p.default is not p.empty else inspect.Signature.empty
        )
        if not kwargs and (i == 0 or p.kind is p.POSITIONAL_ONLY or p.default is p.empty):
            args.append(node)
        else:
            kwargs[p.name] = node
    kwargs |= {name: graph.placeholder(name, default_value=None) for name in extra_kwargs}
    graph.output(graph.call_module(target, tuple(args), kwargs))
    return graph_module({target: module}, graph, class_name=type(module).__name__)


def single_call_graph(model: nn.Module, extra_kwargs: tuple[str, ...] = ()) -> fx.GraphModule:
    """A graph that calls ``model`` whole (as submodule ``root``): for a root that is itself a
    leaf; it takes ``extra_kwargs`` too, the keyword arguments the batches give its
    ``**kwargs`` (:func:`kwargs_only`)."""
    return _call_graph(model, "root", extra_kwargs)


def kwargs_only(module: nn.Module, kwargs: dict) -> tuple[str, ...]:
    """The keyword arguments of a call that only ``**kwargs`` takes, in the call's order:
    what a graph calling ``module`` whole must take besides its named arguments.

    Example:
        >>> class M(torch.nn.Module):
        ...     def forward(self, x, mask=None, **kwargs):
        ...         return x
        >>> kwargs_only(M(), {"mask": None, "position_ids": None})
        ('position_ids',)
    """
    params = _forward_params(module)
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return tuple(k for k in kwargs if k not in named)


def takes_var_kwargs(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes ``**kwargs`` (calls may pass it arguments that
    :func:`kwargs_only` names)."""
    return any(p.kind is p.VAR_KEYWORD for p in _forward_params(module).values())


def _forward_params(module: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The parameters of ``module.forward``; none when Python cannot read its signature."""
    try:
        return inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}


def leaf_graph(model: nn.Module, path: str,
               extra_kwargs: tuple[str, ...] = ()) -> tuple[fx.GraphModule, str]:
    """A one-op graph calling the module at ``path`` of ``model`` whole, and the scope its
    names are relative to.

    The module is held under its own name (the last part of ``path``), so the op's module
    path, read relative to the scope (the parent's path), is ``path``: a leaf module paired
    whole is a graph like any other.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        >>> gm, scope = leaf_graph(model, "0.0")
        >>> scope, [n.target for n in gm.graph.nodes if n.op == "call_module"]
        ('0', ['0'])
    """
    if not path:
        return single_call_graph(model, extra_kwargs), ""
    scope, _, name = path.rpartition(".")
    return _call_graph(model.get_submodule(path), name, extra_kwargs), scope


FUNCTIONAL_METHODS = ("add", "add_relu", "mul", "matmul")
"""The methods of a ``FloatFunctional`` (and its quantized ``QFunctional``) that take two
tensors: what a functional module is called through when its parent's forward is not traced
(``add_scalar``, ``mul_scalar`` and ``cat`` take other values)."""


def is_functional(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's functional modules (``FloatFunctional``,
    ``FXFloatFunctional``, ``QFunctional``), whose ops are called through methods, not
    ``forward``."""
    from torch.ao.nn.quantized import FloatFunctional, FXFloatFunctional, QFunctional

    return isinstance(module, (FloatFunctional, FXFloatFunctional, QFunctional))


class _MethodCall(nn.Module):
    """Calls ``method`` of the functional module it holds under ``name`` on two tensors."""

    def __init__(self, name: str, module: nn.Module, method: str) -> None:
        super().__init__()
        self.add_module(name, module)
        self._name, self._method = name, method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return getattr(getattr(self, self._name), self._method)(x, y)


def method_graph(model: nn.Module, path: str, method: str) -> tuple[fx.GraphModule, str]:
    """The graph of ``method`` (one of :data:`FUNCTIONAL_METHODS`) of the functional module at
    ``path``, traced as torch.fx traces the call inside a model (``torch.add``, then the
    module's ``activation_post_process``), and the scope its names are relative to, as
    :func:`leaf_graph` gives them.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.ao.nn.quantized.FloatFunctional())
        >>> gm, scope = method_graph(model, "0", "add")
        >>> scope, [n.op for n in gm.graph.nodes]
        ('', ['placeholder', 'placeholder', 'call_function', 'call_module', 'output'])
    """
    scope, _, name = path.rpartition(".")
    caller = _MethodCall(name, model.get_submodule(path), method)
    with attributes_kept(caller):
        graph = _Tracer().trace(caller)
        gm = graph_module(caller, graph, class_name=type(caller).__name__)
    return gm, scope


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] | None = None,
    which: str = "model",
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its submodules.

    Args:
        model: the float or quantized model. A GraphModule is re-traced so that its leaves
            follow fxnumeric's rules; its nodes keep their names.
        leaf_modules: module types or qualified names to keep whole (not traced through).
            Use this for submodules that ``torch.fx`` cannot trace (data-dependent control
            flow, ``len()`` of a proxy, shape asserts).
        which: ``"float"`` or ``"quantized"``, used in error messages.
        concrete_args: arguments of ``model``'s forward to fix, by name, as the call the
            graph stands for makes them (:func:`fixed_arguments`): ``forward(x, y=None)``
            called as ``model(x)`` is traced with ``y=None``, so its ``if y is not None``
            branch is left out as the call leaves it out. The graph still takes ``y``, and
            torch.fx asserts at run time that it is the value fixed.

    Returns:
        A new GraphModule; ``model`` is not modified. It runs ``model``'s own forward hooks
        and pre-hooks (torch.fx traces ``forward``, without them), so calling it is calling
        ``model``.

    Raises:
        TraceError: naming the module and the source line that failed, with the remedy.

    Example:
        >>> import torch
        >>> gm = trace(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> [n.op for n in gm.graph.nodes]
        ['placeholder', 'call_module', 'call_module', 'output']
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"the {which} model must be a torch.nn.Module, got {type(model).__name__}")
    leaf_types, leaf_names = _split_leaves(leaf_modules)
    tracer = _Tracer(leaf_types, leaf_names)
    if "" in leaf_names or tracer.is_leaf_module(model, ""):
        return single_call_graph(model)
    with attributes_kept(model):
        return _traced(model, tracer, which, concrete_args)


def _traced(model: nn.Module, tracer: _Tracer, which: str,
            concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    """:func:`trace`'s GraphModule of ``model`` by ``tracer``."""
    versions = _buffer_versions(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
    except Exception as exc:  # torch.fx raises many types; all mean "cannot trace"
        where = tracer.scope_path[-1] if tracer.scope_path else ""
        module = f"`{where}` ({type(model.get_submodule(where)).__name__})" if where else (
            f"the top-level {type(model).__name__}"
        )
        hint = (
            f"leaf_modules=[\"{where}\"] or "
            f"leaf_modules=[{type(model.get_submodule(where)).__name__}]"
            if where
            else "leaf_modules=[\"\"] (the whole model as one op) or leaf_modules=[...] naming "
            "the submodule that fails"
        )
        raise TraceError(
            f"torch.fx could not trace the {which} model in {module}: "
            f"{type(exc).__name__}: {exc}\n  at {_user_frame(exc)}\n"
            f"Fix: keep that module whole by passing {hint}, or make its forward traceable "
            f"(no data-dependent `if`, no len()/assert on tensor shapes)."
        ) from exc
    written = _written_while_tracing(versions, graph)
    if written:
        raise TraceError(
            f"torch.fx cannot trace the {which} {type(model).__name__} as it runs: {written}.\n"
            "Fix: keep the module whose forward updates the buffer whole (leaf_modules=[...]), "
            "capture=\"auto\" (the module tree, which keeps such a forward whole), or write "
            "the update from a traced value (`self.ema.lerp_(h.mean(0), 0.1)`)")
    _named_as_arguments(graph, concrete_args)
    name = type(model).__name__
    return carry_hooks(graph_module(model, graph, class_name=name), model)


def _buffer_versions(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Each buffer of ``module`` by its path, with its version counter."""
    return {name: (buffer, buffer._version) for name, buffer in module.named_buffers()}


def _written_while_tracing(versions: dict[str, tuple[torch.Tensor, int]],
                           graph: fx.Graph) -> str:
    """Why ``graph`` computes a buffer differently from the forward traced, or ``""``.

    torch.fx records an op only where a traced value (a Proxy) enters it. An in-place op on
    a buffer that none enters (``self.ema.mul_(0.9).add_(0.1 * h.mean(0))``: the ``mul_``)
    runs on the buffer itself while tracing, once, and is not in the graph, which then reads
    the buffer (``ema.add_(...)``) without that write: the first batch computes what the
    forward does from zeros, and every later one drifts from it. A buffer written while
    tracing that the graph never reads (a call counter, ``self.calls += 1``) changes
    nothing the graph computes (:func:`attributes_kept` puts its value back)."""
    read = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    written = [name for name, (buffer, version) in versions.items()
               if buffer._version != version and name in read]
    if not written:
        return ""
    names = ", ".join(f"`{name}`" for name in written)
    return (f"its forward writes in place into buffer {names} with an op no traced value "
            "enters (as `self.ema.mul_(0.9)`), which torch.fx ran once while tracing instead of "
            "recording it: the graph reads the buffer without that write")
