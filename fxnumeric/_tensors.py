"""Small helpers on logged values (tensors, or tuples and lists of them), shared by stages."""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any

import torch

from .errors import InputError

__all__ = ["first_output", "model_output", "output_part", "after_loss", "detach", "copy_values",
           "dequantize_all", "stores_floats", "copy_cache", "copy_inputs", "object_attributes",
           "held_tensors", "version", "part_note"]


def first_output(x: Any) -> Any:
    """The tensor a logger records for an output: element 0 of a tuple/list, the first value
    of a dict (a Hugging Face ``ModelOutput`` is one), the first field of a dataclass, else
    ``x``."""
    while True:
        if isinstance(x, (tuple, list, Mapping)) and len(x):
            x = next(iter(x.values())) if isinstance(x, Mapping) else x[0]
        elif dataclasses.is_dataclass(x) and not isinstance(x, type) and dataclasses.fields(x):
            x = getattr(x, dataclasses.fields(x)[0].name)
        else:
            return x


def model_output(output: Any) -> Any:
    """The model output a report compares and an end metric reads: a model's logits (listed
    after the loss when the batch has labels), else the first tensor its output holds after
    a loss (:func:`held_tensors`: in a tuple whose first item is ``None``, a dataclass),
    else :func:`first_output` (no tensor: nothing to compare).

    >>> model_output((None, torch.ones(1)))
    tensor([1.])
    """
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if isinstance(logits, torch.Tensor):
        return logits
    rest = after_loss(output)
    found = next(held_tensors(rest), None)
    return found[1] if found is not None else first_output(rest)


def output_part(output: Any) -> tuple[str, int]:
    """Where :func:`model_output` takes the tensor it compares from in ``output``
    (``"[0]['boxes']"``, ``".h"`` of a dataclass), and how many tensors ``output`` holds;
    ``("", 1)`` for a tensor, and for an output object or dict with ``logits`` (what a
    language model's user reads); ``("", 0)`` when it holds no tensor.

    >>> output_part([{"boxes": torch.zeros(1), "scores": torch.zeros(1)}, {"boxes": None}])
    ("[0]['boxes']", 2)
    >>> output_part((None, torch.zeros(1)))
    ('[1]', 1)
    """
    if isinstance(output, torch.Tensor) or hasattr(output, "logits") or (
            isinstance(output, Mapping) and "logits" in output):
        return "", 1
    every = list(held_tensors(output))
    if not every:
        return "", 0
    rest = after_loss(output)
    if rest is output:
        return every[0][0], len(every)
    path, _ = next(held_tensors(rest))  # in output[1:]: its index is one past
    index, _, tail = path[1:].partition("]")
    return f"[{int(index) + 1}]{tail}", len(every)


def part_note(part: str, tensors: int, loss: bool, reads: str) -> str:
    """A note saying which of a model's ``tensors`` returned tensors is read (``reads``:
    ``"the metrics read"``), the one at ``part`` (:func:`output_part`), when it returned more
    than one, else ``""``; ``loss``: it returned a scalar loss first, which is skipped.

    >>> part_note("['last_hidden_state']", 2, False, "the end metric reads")[:64]
    "model output: the end metric reads `output['last_hidden_state']`"
    """
    if tensors < 2 or not part:
        return ""
    first = "the first after the scalar loss it returns first" if loss else "the first"
    return (f"model output: {reads} `output{part}`, one of the {tensors} tensors the model "
            f"returns ({first}); the rest are not compared")


def held_tensors(x: Any, path: str = "", *, objects: bool = True,
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor ``x`` holds, depth first, with where it sits (``[1]``, ``['boxes']``,
    ``.h``): in tuples, lists, dicts and, with ``objects``, objects' attributes (a
    dataclass's fields, in order; :func:`object_attributes`), each object once.

    >>> [where for where, _ in held_tensors({"a": None, "b": [1, torch.ones(1)]})]
    ["['b'][1]"]
    """
    return _held_tensors(x, path, objects, set())


def _held_tensors(x: Any, path: str, objects: bool, seen: set[int],
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        yield path, x
        return
    if isinstance(x, (tuple, list)):
        parts: Iterable[tuple[str, Any]] = ((f"[{i}]", v) for i, v in enumerate(x))
    elif isinstance(x, Mapping):
        parts = ((f"[{k!r}]", v) for k, v in x.items())
    else:
        if not objects or id(x) in seen:  # an object met again (a cycle): its tensors listed
            return
        seen.add(id(x))
        parts = ((f".{name}", v) for name, v in object_attributes(x).items())
    for where, value in parts:
        yield from _held_tensors(value, path + where, objects, seen)


def after_loss(output: Any) -> Any:
    """``output`` without a leading scalar loss: a Hugging Face model called with labels and
    ``return_dict=False`` returns ``(loss, logits, ...)``."""
    if (isinstance(output, (tuple, list)) and len(output) > 1
            and isinstance(output[0], torch.Tensor) and output[0].dim() == 0):
        return output[1:]
    return output


def _each(fn: Any, x: tuple | list) -> tuple | list:
    """``fn`` of each item of ``x``, in a sequence of ``x``'s type (a named tuple, such as an
    LSTM's ``PackedSequence``, is built from positional fields)."""
    items = [fn(v) for v in x]
    return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)


def detach(x: Any) -> Any:
    """``x`` with every tensor in it detached."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return _each(detach, x)
    return x


def copy_values(x: Any) -> Any:
    """``x`` with every tensor in it copied (detached): what a logger that keeps a value
    holds when the value may be overwritten in place after it was logged."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (tuple, list)):
        return _each(copy_values, x)
    return x


def copy_cache(x: Any) -> Any:
    """A copy of ``x`` when it is a key/value cache (a Hugging Face ``Cache``, which a model
    appends to in place), else ``x`` itself: what each run of a model or block that a cache is
    handed to must get, so that one run's keys and values do not become another's past."""
    cache = getattr(sys.modules.get("transformers.cache_utils"), "Cache", None)
    # transformers not imported: no such cache can exist
    return copy.deepcopy(x) if cache is not None and isinstance(x, cache) else x


def copy_inputs(x: Any) -> Any:
    """``x`` (a model's inputs) as one run's own: every tensor copied, the tuples, lists and
    dicts holding them rebuilt, each key/value cache copied (:func:`copy_cache`), and each
    other object with attributes (a dataclass, a graph library's ``Batch``, a cache of the
    model's own) copied (:func:`copy.copy`), its attributes copied alike. Modules, classes,
    functions and objects without attributes (a NumPy array, a ``torch.device``) are passed
    as they are.

    A model may write into its inputs (``x.mul_(2)``, ``batch.x.mul_(2)``, a mask converted in
    place, keys appended to ``cache.k``): each run given a copy sees the inputs as the caller
    gave them, whatever a run before it wrote, and the caller's own tensors and objects are
    never written into. A copy keeps the tensor's strides where a dense copy can (a
    channels-last batch stays channels-last), and an expanded tensor (stride 0) stays
    expanded: only its distinct values are copied. A tensor or object found twice in ``x`` is
    copied once, so the two stay one.

    >>> x = torch.ones(2)
    >>> copied = copy_inputs({"x": x, "again": x, "n": 3})
    >>> copied["x"].mul_(2); x.tolist(), copied["again"] is copied["x"], copied["n"]
    tensor([2., 2.])
    ([1.0, 1.0], True, 3)

    Raises:
        InputError: an object holding tensors that :func:`copy.copy` cannot copy.
    """
    return _copy_inputs(x, {})


_PASSED_AS_IS = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
                 types.ModuleType, torch.nn.Module, weakref.ReferenceType)
"""Objects an input copy never copies: classes, functions, Python modules and torch modules
(a model may be handed a module; its parameters are not the batch), weak references."""


def _copy_inputs(x: Any, copies: dict[int, Any]) -> Any:
    if id(x) in copies:
        return copies[id(x)]
    if isinstance(x, torch.Tensor):
        copies[id(x)] = _copy_tensor(x)
        return copies[id(x)]
    if isinstance(x, (tuple, list)):
        return _each(lambda v: _copy_inputs(v, copies), x)
    if isinstance(x, MutableMapping):  # a dict, a tokenizer's BatchEncoding
        copied = copy.copy(x)
        for key, value in x.items():
            copied[key] = _copy_inputs(value, copies)
        return copied
    cached = copy_cache(x)
    if cached is not x or isinstance(x, _PASSED_AS_IS):
        return cached
    return _copy_object(x, copies)


def object_attributes(x: Any) -> dict[str, Any]:
    """The attributes through which an input object holds data, as :func:`copy_inputs` copies
    them: its ``__dict__`` and its ``__slots__`` that are set; none for a tensor, a tuple,
    list or dict, and for what is passed as it is (a module, a class, a function).

    >>> import dataclasses
    >>> Pair = dataclasses.make_dataclass("Pair", ["x", "n"])
    >>> object_attributes(Pair(torch.ones(1), 3))
    {'x': tensor([1.]), 'n': 3}
    """
    if isinstance(x, (torch.Tensor, tuple, list, Mapping, *_PASSED_AS_IS)):
        return {}
    found = dict(vars(x)) if hasattr(x, "__dict__") else {}
    for cls in type(x).__mro__:
        slots = vars(cls).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(x, name):
                found[name] = getattr(x, name)
    return found


def _copy_object(x: Any, copies: dict[int, Any]) -> Any:
    """A shallow copy of ``x`` whose attributes are input copies (:func:`_copy_inputs`: an
    empty list a model appends to is copied, as a tensor it writes into); ``x`` itself when
    it has no attributes."""
    attributes = object_attributes(x)
    if not attributes:
        return x
    copies[id(x)] = x  # while its attributes are copied: a cycle back to it keeps x
    copied = {name: _copy_inputs(value, copies) for name, value in attributes.items()}
    try:
        duplicate = copy.copy(x)
        for name, value in copied.items():
            if value is not attributes[name]:
                object.__setattr__(duplicate, name, value)  # a frozen dataclass too
    except Exception as exc:  # whatever its __copy__ / __reduce_ex__ raises
        tensors = [name for name, value in copied.items() if _holds_tensor(value)]
        if not tensors:
            return x  # nothing of the batch's data in it: passed as it is
        raise InputError(
            f"an input of type {type(x).__name__} holds tensors ({', '.join(tensors)}) but "
            f"cannot be copied: {type(exc).__name__}: {exc}. Each run of a model gets its own "
            "copy of the batch, so that what one run writes into it is not what the next "
            "reads.\nFix: make the object copyable (copy.copy), or pass its tensors in a "
            "tuple or dict") from exc
    copies[id(x)] = duplicate
    return duplicate


def _holds_tensor(x: Any) -> bool:
    """Whether ``x`` is a tensor or a tuple, list or dict holding one (an input copy's)."""
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, Mapping):
        return any(_holds_tensor(v) for v in x.values())
    return isinstance(x, (tuple, list)) and any(_holds_tensor(v) for v in x)


def _copy_tensor(t: torch.Tensor) -> torch.Tensor:
    expanded = []  # the dimensions broadcast by stride 0 (a mask expanded to S x S)
    if t.layout == torch.strided and not t.is_nested:
        expanded = [dim for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True))
                    if stride == 0 and size > 1]
    compact = t.detach()
    for dim in expanded:  # one value along each: the broadcast is not copied
        compact = compact.narrow(dim, 0, 1)
    copied = compact.clone().expand(t.shape) if expanded else compact.clone()
    return copied.requires_grad_() if t.requires_grad else copied


def version(x: Any) -> int | None:
    """The version counter of a tensor (torch bumps it at every in-place write; a view shares
    its base's), or ``None`` (not a tensor, or an inference tensor, which keeps none)."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return x._version
    except RuntimeError:
        return None


def dequantize_all(x: Any, dtype: torch.dtype | None = None) -> Any:
    """Dequantize every quantized tensor in ``x`` (tensors, tuples, lists) and, given a
    ``dtype``, cast every floating tensor to it."""
    if isinstance(x, torch.Tensor):
        x = x.dequantize() if x.is_quantized else x
        return x.to(dtype) if dtype is not None and x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return _each(lambda v: dequantize_all(v, dtype), x)
    return x


def stores_floats(weight: Any) -> bool:
    """Whether a quantized tensor subclass stores floating-point values (torchao's
    ``Float8Tensor``: ``qdata`` in float8): rounded to a few mantissa bits, a step that grows
    with the value, so no uniform grid of step ``scale``."""
    stored = getattr(weight, "qdata", None)
    return isinstance(stored, torch.Tensor) and stored.dtype.is_floating_point
