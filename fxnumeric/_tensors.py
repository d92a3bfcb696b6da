"""Small helpers on logged values (tensors, or tuples and lists of them), shared by stages."""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

__all__ = ["first_output", "model_output", "output_part", "after_loss", "detach", "copy_values",
           "dequantize_all", "stores_floats", "copy_cache", "copy_inputs", "version"]


def first_output(x: Any) -> Any:
    """The tensor a logger records for an output: element 0 of a tuple/list, the first value
    of a dict (a Hugging Face ``ModelOutput`` is one), else ``x``."""
    while isinstance(x, (tuple, list, Mapping)) and len(x):
        x = next(iter(x.values())) if isinstance(x, Mapping) else x[0]
    return x


def model_output(output: Any) -> Any:
    """The model output a report compares and an end metric reads: a model's logits (listed
    after the loss when the batch has labels), else its first output after a loss."""
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    return logits if isinstance(logits, torch.Tensor) else first_output(after_loss(output))


def output_part(output: Any) -> tuple[str, int]:
    """Where :func:`model_output` takes the tensor it compares from in a list, tuple or dict
    ``output`` (``"[0]['boxes']"``), and how many tensors ``output`` holds; ``("", 1)`` for
    a tensor, and for an output object or dict with ``logits`` (what a language model's
    user reads).

    >>> output_part([{"boxes": torch.zeros(1), "scores": torch.zeros(1)}, {"boxes": None}])
    ("[0]['boxes']", 2)
    """
    if not isinstance(output, (tuple, list, Mapping)) or hasattr(output, "logits") or (
            isinstance(output, Mapping) and "logits" in output):
        return "", 1
    x, path = output, ""
    if after_loss(output) is not output:
        x, path = output[1:], "[1:]"
    while isinstance(x, (tuple, list, Mapping)) and len(x):
        if isinstance(x, Mapping):
            key = next(iter(x))
            x, path = x[key], f"{path}[{key!r}]"
        else:
            x, path = x[0], f"{path}[0]"
    return path.replace("[1:][0]", "[1]", 1), _tensors_in(output)


def _tensors_in(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return 1
    if isinstance(x, Mapping):
        return sum(_tensors_in(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(_tensors_in(v) for v in x)
    return 0


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
    dicts holding them rebuilt, each key/value cache copied (:func:`copy_cache`); other
    objects are passed as they are.

    A model may write into its inputs (``x.mul_(2)``, a mask converted in place): each run
    given a copy sees the inputs as the caller gave them, whatever a run before it wrote, and
    the caller's own tensors are never written into. A copy keeps the tensor's strides where
    a dense copy can (a channels-last batch stays channels-last), and an expanded tensor
    (stride 0) stays expanded: only its distinct values are copied. A tensor found twice in
    ``x`` is copied once, so the two stay one tensor.

    >>> x = torch.ones(2)
    >>> copied = copy_inputs({"x": x, "again": x, "n": 3})
    >>> copied["x"].mul_(2); x.tolist(), copied["again"] is copied["x"], copied["n"]
    tensor([2., 2.])
    ([1.0, 1.0], True, 3)
    """
    return _copy_inputs(x, {})


def _copy_inputs(x: Any, copies: dict[int, torch.Tensor]) -> Any:
    if isinstance(x, torch.Tensor):
        if id(x) not in copies:
            copies[id(x)] = _copy_tensor(x)
        return copies[id(x)]
    if isinstance(x, (tuple, list)):
        return _each(lambda v: _copy_inputs(v, copies), x)
    if isinstance(x, MutableMapping):  # a dict, a tokenizer's BatchEncoding
        copied = copy.copy(x)
        for key, value in x.items():
            copied[key] = _copy_inputs(value, copies)
        return copied
    return copy_cache(x)


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
