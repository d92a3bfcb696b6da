"""What a node does to the values around it, decided once for every copy of a graph that runs.

Three features run parts of a traced graph again outside the graph they came from: shadows
(:mod:`fxnumeric.instrument`: a pair's float subgraph inlined into the quantized graph),
hybrid models (:mod:`fxnumeric.advice.hybrid`: one graph with another graph's subgraph in
place of a layer) and weight reading (:mod:`fxnumeric.weights`: a weight computed from the
constants that feed it). They must agree on four questions, answered here:

* **in-place writes**: does a node write its result into a value it reads (``relu_``,
  ``aten.add_.Tensor``, ``ReLU(inplace=True)``, ``x += y``)? A copy of such a node must not
  write into a tensor the original graph still reads. ATen ops answer from their schema
  (which argument is written), methods and functions from torch's trailing-underscore and
  ``i``-operator conventions, modules from their ``inplace`` flag.
* **dequantize**: does a node turn a quantized value into a float one? The op tables answer
  (:attr:`fxnumeric.optypes.OpClass.is_dequantize`), never a node's name.
* **constants**: what value does a node compute from graph constants alone (a pt2e weight's
  ``dequantize`` of its int8 parameter)? Observers and fake-quants are passed through, never
  run (running one updates its statistics).
* **attributes and modules**: what does a ``get_attr`` target hold, and what does a copy call
  in place of a float module: the module itself when calling it changes nothing (torch's own
  modules in eval mode), a deep copy otherwise (observers, fake-quants, training mode, user
  classes).
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .ops import is_pure
from .view import GraphView

__all__ = [
    "fetch_attr", "overwrites", "mutated_in_place", "writes_first_input", "is_dequantize",
    "evaluate_constant", "shadow_copy",
]

_INPLACE_FUNCTIONS = frozenset({operator.iadd, operator.imul, operator.isub, operator.itruediv})


def fetch_attr(gm: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` (or ``call_module``) target names in ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _schema_writes(op: torch._ops.OpOverload, index: int) -> bool:
    arguments = op._schema.arguments
    if index >= len(arguments):
        return False
    alias = arguments[index].alias_info
    return alias is not None and alias.is_write


def overwrites(user: fx.Node, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``user`` writes its result into ``node``'s value (its first argument).

    Example:
        >>> g = fx.Graph()
        >>> x = g.placeholder("x")
        >>> y = g.call_function(torch.ops.aten.add_.Tensor, (x, x))
        >>> z = g.call_function(torch.ops.aten.add.Tensor, (x, x))
        >>> overwrites(y, x, {}), overwrites(z, x, {})
        (True, False)
    """
    if user.op == "call_module":
        return bool(getattr(modules.get(str(user.target)), "inplace", False))
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        name = str(user.target)
        return name.endswith("_") and not name.startswith("_")
    if user.op != "call_function":
        return False
    target = user.target
    if isinstance(target, torch._ops.OpOverload):  # aten.relu_, aten.add_ (torch.export)
        return _schema_writes(target, 0)
    if target in _INPLACE_FUNCTIONS or user.kwargs.get("inplace"):
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


def writes_first_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` writes into the value of its first argument."""
    first = node.args[0] if node.args else None
    if node.op == "call_module":
        return overwrites(node, first, modules)  # type: ignore[arg-type]
    return isinstance(first, fx.Node) and overwrites(node, first, modules)


def mutated_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a later op overwrites ``node``'s value in place (an observer then needs a copy)."""
    return any(overwrites(user, node, modules) for user in node.users)


def is_dequantize(view: GraphView, node: fx.Node) -> bool:
    """Whether ``node`` turns a quantized value into a float one."""
    cls = view.op_class(node)
    return cls is not None and cls.is_dequantize


def evaluate_constant(node: Any, view: GraphView) -> Any:
    """Compute ``node`` from graph constants alone (``None`` if it depends on an input).

    Observers and fake-quants are passed through, not run: running one would update its
    statistics, and the user's model must not change.
    """
    if not isinstance(node, fx.Node):
        return node
    if node.op == "get_attr":
        return fetch_attr(view.gm, str(node.target))
    if node.op == "call_module":
        cls = view.op_class(node)
        if cls is None or cls.role != "plumbing" or not node.args:
            return None
        return evaluate_constant(node.args[0], view)
    if node.op != "call_function":
        return None
    args = [evaluate_constant(a, view) for a in node.args]
    if any(v is None and isinstance(a, fx.Node) for a, v in zip(node.args, args, strict=True)):
        return None
    kwargs = {k: evaluate_constant(v, view) for k, v in node.kwargs.items()}
    with torch.no_grad():
        return node.target(*args, **kwargs)  # type: ignore[operator]


def shadow_copy(value: Any) -> Any:
    """What a copy of a graph calls in place of a module or constant of the original graph.

    The object itself where calling it changes nothing (a tensor; torch's own modules in eval
    mode, :func:`fxnumeric.ops.is_pure`: no copy of the weights), else a deep copy, so running
    the copy never touches the user's model (an observer in a QAT model keeps its statistics).
    """
    if isinstance(value, torch.Tensor) or (isinstance(value, nn.Module) and is_pure(value)):
        return value
    return copy.deepcopy(value)
