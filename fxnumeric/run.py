"""Stage 4, run: feed batches to (instrumented) models, turning input mistakes into clear errors.

A batch is a tensor (one input), a tuple or list (several positional inputs) or a dict
(keyword inputs: ``{"input_ids": ids, "attention_mask": mask}`` calls
``model(input_ids=ids, attention_mask=mask)``).

:func:`check_data` and :func:`check_batch` refuse what cannot be a batch before any model runs
on it (``None``, a string, a number, a list of strings, an empty tensor): metrics over such
input are silent nonsense (an empty batch reads "SQNR inf dB", mse nan). :func:`nonfinite_inputs`
tells a caller which batches hold NaN/Inf, to be left out of the metrics.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

import torch
import torch.fx as fx
from torch import nn

from . import flows
from ._tensors import copy_inputs, held_tensors
from .errors import FxNumericError, FxNumericWarning, InputError, InternalError
from .offload import devices
from .view import fixed_inputs

__all__ = ["run_model", "as_batches", "as_args", "as_call", "check_model", "check_devices",
           "pick_inputs", "buffers_kept", "buffers_put_back", "saved_buffers", "put_back",
           "keeps_buffers",
           "model_batches", "numbered_batches", "check_data", "check_batch", "nonfinite_inputs",
           "batch_tensors", "check_max_batches",
           "run_blaming_inside", "failure_site", "node_site", "module_frames", "precision_hint"]

_BATCH_IS = ("a batch must be a tensor, a tuple or list of positional inputs, or a dict of "
             "keyword inputs, holding at least one non-empty tensor (one in an object's "
             "attributes counts: a dataclass)")


def check_data(data: Any) -> None:
    """Raise :class:`InputError` unless ``data`` is something to iterate over for batches.

    >>> check_data(None)
    Traceback (most recent call last):
    ...
    fxnumeric.errors.InputError: data is None: pass an iterable of batches ...
    """
    if data is None:
        raise InputError("data is None: pass an iterable of batches (a list of tensors or a "
                         "DataLoader).\nFix: compare(float_model, quant_model, "
                         "[torch.randn(2, 3, 32, 32)]) or pass your DataLoader")
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise InputError(f"data is {_a(type(data).__name__)}, not an iterable of batches; "
                         f"{_BATCH_IS}.\nFix: pass a list of batches or a DataLoader")


def check_max_batches(max_batches: Any) -> None:
    """Raise :class:`InputError` unless ``max_batches`` is None (every batch) or a positive
    int: ``0`` would compare no batch, and a negative or fractional count none that means
    anything.

    >>> check_max_batches(-1)
    Traceback (most recent call last):
    ...
    fxnumeric.errors.InputError: max_batches=-1: pass a positive number of batches ...
    """
    if max_batches is None:
        return
    if not isinstance(max_batches, bool):
        try:
            count = operator.index(max_batches)  # an int, or a numpy integer
        except TypeError:
            count = 0
        if count > 0:
            return
    raise InputError(f"max_batches={max_batches!r}: pass a positive number of batches to "
                     "compare (an int), or None to compare every batch of data")


def as_batches(data: Any) -> Any:
    """``data`` as an iterable of batches: a single tensor, or a single dict of keyword inputs
    (a tokenizer's ``BatchEncoding``), is one batch, not a batch per row or per key."""
    return [data] if isinstance(data, (torch.Tensor, Mapping)) else data


def no_batches(data: Any = None) -> InputError:
    """The error for ``data``, as the user gave it, that yielded no batch; an iterator may be
    one an earlier call read to its end (a generator passed to ``compare`` and then to
    ``advise``). Without ``data`` (not the user's own object), no such hint."""
    text = "data yielded no batches: pass an iterable of input tensors (or tuples of inputs)"
    if data is not None and iter(data) is data:
        text += (f". It is an iterator ({type(data).__name__}), which yields its batches once: "
                 "one an earlier call read to its end yields nothing; pass a list of batches, "
                 "or a fresh iterator to each call")
    return InputError(text)


def batch_tensors(x: Any, where: str = "batch", *, objects: bool = True,
                  ) -> list[tuple[str, torch.Tensor]]:
    """Every tensor in a batch, with where it sits (``batch[1][0]``, ``batch['mask']``, and,
    with ``objects``, in an object's attributes: ``batch[0].x`` of a dataclass or a graph
    library's ``Batch``, as :func:`~fxnumeric._tensors.copy_inputs` copies them).

    >>> import dataclasses
    >>> Graph = dataclasses.make_dataclass("Graph", ["x", "edges"])
    >>> [where for where, _ in batch_tensors((Graph(torch.ones(2), [torch.zeros(2)]),))]
    ['batch[0].x', 'batch[0].edges[0]']
    """
    return list(held_tensors(x, where, objects=objects))


_SPARSE_PARTS = {
    torch.sparse_coo: ("indices", "values"),  # of the coalesced tensor
    torch.sparse_csr: ("crow_indices", "col_indices", "values"),
    torch.sparse_bsr: ("crow_indices", "col_indices", "values"),
    torch.sparse_csc: ("ccol_indices", "row_indices", "values"),
    torch.sparse_bsc: ("ccol_indices", "row_indices", "values"),
}
"""The strided tensors a sparse tensor of each layout stores, its values last."""


def stored_tensors(x: torch.Tensor) -> list[torch.Tensor]:
    """The strided tensors holding ``x``'s data: ``x`` itself, or a sparse tensor's indices and
    values (values last), which elementwise reductions and byte views can read.

    >>> [tuple(t.shape) for t in stored_tensors(torch.eye(3).to_sparse())]
    [(2, 3), (3,)]
    """
    parts = _SPARSE_PARTS.get(x.layout)
    if parts is None:
        return [x]
    if x.layout == torch.sparse_coo:
        x = x.coalesce()  # an uncoalesced tensor has no values() yet
    return [getattr(x, part)() for part in parts]


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "aeiou" else "a ") + noun


def check_batch(batch: Any, index: int) -> None:
    """Raise :class:`InputError` when ``batch`` (the ``index``-th of the data) cannot be one.

    Refused: ``None``, strings, numbers, containers without a tensor (a list of strings; a
    tensor in an object's attributes counts: a dataclass or a graph library's ``Batch``,
    :func:`batch_tensors`), and empty tensors (a dimension of size 0) in the batch's tuples,
    lists and dicts (not in an object's attributes: a cache may start empty). Other objects
    pass: a model may take them.

    Args:
        batch: what the models are given (after ``inputs=`` picked it from the data).
        index: the batch's position in the data, 0 first, for the message.

    Raises:
        InputError: naming the batch index and what a batch must be.

    >>> check_batch(torch.zeros(2, 3), 0)
    >>> check_batch("a sentence", 3)
    Traceback (most recent call last):
    ...
    fxnumeric.errors.InputError: batch 3 is a str ('a sentence'): a batch must be a tensor, ...
    """
    fix = ("Fix: make data yield tensors (tokenize text first), or pass inputs= to pick the "
           "model inputs from each batch")
    scalar = (str, bytes, int, float, complex, bool)
    if batch is None or isinstance(batch, scalar):
        shown = repr(batch) if len(repr(batch)) <= 40 else repr(batch)[:37] + "..."
        what = "None" if batch is None else f"{_a(type(batch).__name__)} ({shown})"
        raise InputError(f"batch {index} is {what}: {_BATCH_IS}.\n{fix}")
    found = batch_tensors(batch)
    if isinstance(batch, (tuple, list, Mapping)) and not found:
        kinds = sorted({type(v).__name__ for v in (batch.values() if isinstance(batch, Mapping)
                                                    else batch)}) or ["nothing"]
        raise InputError(f"batch {index} is {_a(type(batch).__name__)} of {', '.join(kinds)} "
                         f"with no tensor: {_BATCH_IS}.\n{fix}")
    for where, t in batch_tensors(batch, objects=False):  # an object's (a cache's) may be empty
        if t.numel() == 0:
            raise InputError(
                f"batch {index} holds an empty tensor ({where if where != 'batch' else 'the batch'}"
                f": shape {list(t.shape)}): metrics over no values mean nothing (SQNR inf, mse "
                f"nan); {_BATCH_IS}.\nFix: leave empty batches out of the data")


def nonfinite_inputs(batch: Any) -> list[str]:
    """Where in ``batch`` a floating-point tensor holds NaN or Inf (of a sparse tensor, its
    stored values), as :func:`batch_tensors` names it; empty (false) when nowhere.

    >>> nonfinite_inputs((torch.ones(2), torch.tensor([1.0, float("nan")])))
    ['batch[1]']
    """
    return [where for where, t in batch_tensors(batch)
            if (t.is_floating_point() or t.is_complex()) and not t.is_meta  # meta: no values
            and not bool(torch.isfinite(stored_tensors(t)[-1]).all())]


def as_args(batch: Any) -> tuple[Any, ...]:
    """A batch as positional arguments: a tuple or list is spread, anything else is one input."""
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def as_call(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch as ``(args, kwargs)``: a dict (any mapping: a tokenizer's ``BatchEncoding``)
    gives keyword inputs, anything else positional ones."""
    if isinstance(batch, Mapping):
        return (), dict(batch)
    return as_args(batch), {}


def pick_inputs(batch: Any, inputs: int | Callable[[Any], Any] | None) -> Any:
    """What of ``batch`` the models take: all of it (``inputs=None``), ``batch[inputs]`` for
    an index (``inputs=0`` drops the labels of ``(x, label)``), or ``inputs(batch)``."""
    if inputs is None:
        return batch
    if callable(inputs):
        return inputs(batch)
    try:
        return batch[inputs]
    except (IndexError, KeyError, TypeError) as exc:
        raise InputError(f"inputs={inputs!r} cannot index a batch of type {type(batch).__name__}: "
                         f"{exc}; pass an index into each batch or a function batch -> inputs"
                         ) from exc


def model_batches(data: Iterable[Any], inputs: int | Callable[[Any], Any] | None = None,
                  ) -> list[Any]:
    """Every batch of ``data`` as the models take it (see :func:`pick_inputs`), in a list: for
    calls that run each batch many times (hybrid models). A single tensor, or a single dict of
    keyword inputs, is one batch. A batch
    holding NaN/Inf is left out, with a warning naming it, as ``compare`` leaves it out.

    Raises:
        InputError: ``data`` yields no batch, a batch cannot be one (:func:`check_batch`), or
            every batch holds NaN/Inf.
    """
    return [batch for _, batch in numbered_batches(data, inputs)]


def numbered_batches(data: Iterable[Any], inputs: int | Callable[[Any], Any] | None = None,
                     ) -> list[tuple[int, Any]]:
    """:func:`model_batches` with each batch's index in ``data``: the number a message about
    one batch gives the user, which batches left out shift.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True):  # batch 1 holds NaN: left out
    ...     [i for i, _ in numbered_batches([torch.ones(1), torch.tensor([float("nan")]),
    ...                                      torch.ones(1)])]
    [0, 2]
    """
    if data is None:
        raise InputError("data is None: pass an iterable of batches (tensors, tuples of inputs "
                         "or dicts of keyword inputs), or a single tensor")
    given, data = data, as_batches(data)
    batches, left_out = [], []
    for index, batch in enumerate(data):
        batch = pick_inputs(batch, inputs)
        check_batch(batch, index)
        if nonfinite_inputs(batch):
            left_out.append(index)
        else:
            batches.append((index, batch))
    if left_out and not batches:
        raise InputError(f"every batch holds NaN/Inf ({len(left_out)} batches): nothing is left "
                         "to measure.\nFix: clean the data (torch.isfinite(x).all() per batch) "
                         "or check the preprocessing that produces it")
    if left_out:
        warnings.warn(f"batches {left_out} hold NaN/Inf: they are left out", FxNumericWarning,
                      stacklevel=4)
    if not batches:
        raise no_batches(given)
    return batches


def graph_signature(graph: fx.Graph) -> inspect.Signature | None:
    """The signature a graph's placeholders make (``*args``, ``**kwargs`` and defaults
    included), or None where they make no valid one."""
    params = []
    named = inspect.Parameter.POSITIONAL_OR_KEYWORD  # keyword-only after ``*args``
    for node in graph.find_nodes(op="placeholder"):
        target = str(node.target)
        if target.startswith("**"):
            params.append(inspect.Parameter(target[2:], inspect.Parameter.VAR_KEYWORD))
        elif target.startswith("*"):
            params.append(inspect.Parameter(target[1:], inspect.Parameter.VAR_POSITIONAL))
            named = inspect.Parameter.KEYWORD_ONLY
        else:
            default = node.args[0] if node.args else inspect.Parameter.empty
            params.append(inspect.Parameter(target, named, default=default))
    try:
        return inspect.Signature(params)
    except ValueError:
        return None


def _signature(model: nn.Module) -> inspect.Signature | None:
    """The forward's signature; a GraphModule's from its placeholders (its code may not exist
    yet: fxnumeric generates it lazily)."""
    if isinstance(model, fx.GraphModule):
        return graph_signature(model.graph)
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _check_signature(model: nn.Module, args: tuple, kwargs: dict, which: str) -> None:
    signature = _signature(model)
    if signature is None:
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        params = signature.parameters
        unknown = [k for k in kwargs if k not in params]
        problem = (f"unexpected keyword input {', '.join(map(repr, unknown))}" if unknown
                   else str(exc))
        raise InputError(
            f"the {which} model ({type(model).__name__}) cannot be called with these inputs: "
            f"{problem}. Its forward takes ({', '.join(params)}). A batch that is a dict is "
            "passed as keyword arguments, a tuple as positional ones"
            + (". Each item of data is one batch: one batch of several inputs is `[(x, y)]`, "
               "not `(x, y)`" if len(args) == 1 and not kwargs else "") + "."
        ) from exc


def run_model(model: nn.Module, batch: Any, *, which: str = "model", own: bool = False,
              ran: str = "") -> Any:
    """Call ``model`` on one batch under ``torch.no_grad()``.

    The model is handed copies of the batch's tensors, and of the objects holding them
    (:func:`fxnumeric._tensors.copy_inputs`): a model that writes into its input (``x.mul_(2)``,
    ``batch.x.mul_(2)``, an attention mask converted in place, keys appended to a cache)
    sees the batch as the user gave it at every run (float, quantized, each hybrid), and the
    user's batch is never written into. A copy of the batch is small next to the activations
    the forward computes: on a resnet18 batch of 8 images at 224x224, 0.2-0.6% of its time
    (2 threads); a language model's token ids and mask are a few KiB. ``own``: the batch's
    tensors are this run's own already (copied by the caller, which follows them through the
    run), and are not copied again.

    A model that can keep a cache of past keys and values (a Hugging Face language model's
    ``use_cache``) runs without it, even where the batch asks for one (with a warning): each
    batch is one forward, whose logits a cache does not change, and a layer and its float twin
    fed the same call would both write into the one cache the model made.

    ``ran``: the model (``"float"``) that ran on this same batch before, named in the error
    when this one fails on it (the input is then not the likely cause).

    Raises:
        InputError: when the model fails on the batch (shape, dtype, device, arity, or its
            own code), naming the model side, the shapes that were passed and where in the
            model it failed (:func:`failure_site`).
    """
    args, kwargs = as_call(batch) if own else copy_inputs(as_call(batch))
    signature = _signature(model)
    if signature is not None and "use_cache" in signature.parameters:
        if kwargs.get("use_cache"):
            warnings.warn("the batch asks for use_cache=True: fxnumeric runs each batch as one "
                          "forward without a cache (the logits are the same; a layer and its "
                          "float twin would both write into one cache)", FxNumericWarning,
                          stacklevel=2)
        kwargs["use_cache"] = False
    _check_signature(model, args, kwargs, which)
    _check_fixed(model, args, kwargs, which)
    try:
        with torch.no_grad():
            return _call(model, args, kwargs)
    except FxNumericError:
        raise  # raised on purpose by fxnumeric's observers (a custom metric that failed)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError,
            AssertionError) as exc:  # AssertionError: a graph's input guards (torch.export)
        first = str(exc).splitlines()[0] if str(exc) else ""
        if _raised_in_fxnumeric(exc):
            raise InternalError(
                f"fxnumeric's own code failed inside the {which} model's instrumented "
                f"forward: {type(exc).__name__}: {first}\nThis is a bug in fxnumeric, not in "
                "your model or input: please report it with this traceback"
            ) from exc
        shapes = ", ".join([_describe(a) for a in args]
                           + [f"{k}={_describe(v)}" for k, v in kwargs.items()])
        hint = (_left_out_hint(model, args, kwargs) or flows.failure_hint(exc)
                or precision_hint(exc))
        site = failure_site(model, exc)
        where = f" {site}" if site else ""
        if ran:
            check = (f"The {ran} model ran on this same input, so the cause is in the {which} "
                     f"model{where} rather than in the input: check that the {which} model "
                     "runs on it outside fxnumeric")
        else:
            check = ("Check the input shape, dtype and device (a batch that is a tuple is "
                     "passed as several positional inputs, a dict as keyword inputs), and that "
                     "the model runs on it outside fxnumeric")
        raise InputError(
            f"the {which} model failed on the input ({shapes}){where}: {type(exc).__name__}: "
            f"{first}\n{check}.{' ' + hint if hint else ''}"
        ) from exc


def _call(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    """``model(*args, **kwargs)``; a GraphModule called past torch.fx's wrapper of its
    ``__call__``, which, when an op of the generated code raises, prints the code to stderr
    and drops the exception's traceback: the frame :func:`failure_site` reads the node from.
    Only where the wrapper would call ``nn.Module.__call__`` itself (the class defines no
    ``__call__`` of its own), after the lazy code is generated (``code``)."""
    if not isinstance(model, fx.GraphModule):
        return model(*args, **kwargs)
    args, kwargs = _as_exported(model, args, kwargs)
    model.code  # noqa: B018 - generates a lazy GraphModule's code (and wrapper)
    wrapped = vars(type(model)).get("_wrapped_call")
    if wrapped is None or getattr(wrapped, "cls_call", True) is not None:
        return model(*args, **kwargs)
    return nn.Module.__call__(model, *args, **kwargs)


def precision_hint(exc: BaseException | None) -> str | None:
    """Why a module of torch's own quantization (``quantize_dynamic``'s, eager's, FX's)
    rejected half-precision values, or ``None``: its kernels take float32 alone. Read off
    the innermost module running in ``exc``'s traceback, whoever called it (the user's model,
    or a hybrid's interpreter). The one wording of every message about it: compare's
    (:func:`run_model`), and sensitivity's and advise's
    (:meth:`fxnumeric.advice.hybrid.HybridRunner.run`)."""
    message = str(exc) if exc is not None else ""
    if "BFloat16" not in message and "Half" not in message:
        return None
    running = [module for module, _ in _running_modules(exc)]
    if not running or not type(running[-1]).__module__.startswith("torch.ao.nn.quantized"):
        return None
    return ("torch's quantized modules (quantize_dynamic's, eager's and FX's) compute in "
            "float32 alone: quantize a float32 copy of the model (model.float()) and compare "
            "it with that copy; torchao's quantize_ keeps a bfloat16 model in bfloat16.")


def _as_exported(model: fx.GraphModule, args: tuple, kwargs: dict
                 ) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` as a torch.export graph takes them: it checks its inputs against the
    tree it was exported with, so an input exported as positional but given by name (a dict
    batch for ``forward(x, *, scale)``, which can pass ``scale`` only by name) is moved to its
    place. Other graphs' inputs are returned as they are."""
    info = getattr(model.graph._codegen, "pytree_info", None)
    specs = info.in_spec.children_specs if info is not None and info.in_spec is not None else []
    if not kwargs or len(specs) != 2:
        return args, kwargs
    named = info.orig_args[len(args):specs[0].num_children]
    if not named or not all(name in kwargs for name in named):
        return args, kwargs
    kwargs = dict(kwargs)
    return args + tuple(kwargs.pop(name) for name in named), kwargs


def failure_site(model: nn.Module, exc: BaseException) -> str:
    """Where in ``model`` ``exc`` was raised, as a message puts it: ``in module `norm`
    (LayerNorm)`` for the innermost of ``model``'s modules whose code was running; for a
    GraphModule running its generated code, the node at the failing line, ``at node `matmul`
    (torch.matmul)``, with the module of the user's model it came from (``nn_module_stack``)
    when known. Empty when no frame of ``model``'s modules is in the traceback (the call was
    refused before any ran). Read off ``exc``'s traceback, on the error path only."""
    frames = module_frames(model, exc)
    if not frames:
        return ""
    path, module, tb = frames[-1]
    node = _node_at(module, tb)
    if node is not None:
        return f"at {node_site(node, path)}"
    return f"in module `{path}` ({type(module).__name__})" if path else ""


def node_site(node: fx.Node, path: str = "") -> str:
    """``node`` as a message names it: ``node `matmul` (torch.matmul)``, with the module of
    the user's model it came from (``nn_module_stack``) when known, and ``path``, the module
    whose graph it is in, when that is another."""
    scope = flows.scope(node)
    called = node.op == "call_module" and scope == node.target  # `fc` (module `fc`)
    of = f" of module `{scope}`" if scope and not called else ""
    inside = f" inside `{path}`" if path and path != scope else ""
    return f"node `{node.name}` ({_target(node)}){of}{inside}"


def module_frames(model: nn.Module, exc: BaseException | None
                  ) -> list[tuple[str, nn.Module, TracebackType]]:
    """``(path, module, traceback entry)`` for each frame of ``exc``'s traceback whose
    ``self`` is one of ``model``'s modules (its ``forward``, its ``_call_impl``), outermost
    first; the path of a module registered twice is its first. Read on the error path only:
    a module-tree model's modules run as its own code calls them, with no interpreter to
    say which was running."""
    paths: dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), path)
    return [(paths[id(module)], module, tb) for module, tb in _running_modules(exc)
            if id(module) in paths]


def _running_modules(exc: BaseException | None) -> Iterator[tuple[nn.Module, TracebackType]]:
    """``(module, traceback entry)`` for each frame of ``exc``'s traceback whose ``self`` is a
    module, outermost first."""
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        module = tb.tb_frame.f_locals.get("self")
        if isinstance(module, nn.Module):
            yield module, tb
        tb = tb.tb_next


def _node_at(module: nn.Module, tb: TracebackType) -> fx.Node | None:
    """The node of GraphModule ``module`` whose line of the generated ``forward`` traceback
    entry ``tb`` is at (torch.fx maps lines past the prologue to node indices), or None."""
    lines = getattr(module, "_lineno_map", None)
    forward = getattr(type(module), "forward", None)
    if (not isinstance(module, fx.GraphModule) or not lines
            or tb.tb_frame.f_code is not getattr(forward, "__code__", None)):
        return None
    index = lines.get(tb.tb_lineno - getattr(module, "_prologue_start", 0))
    nodes = list(module.graph.nodes)
    return nodes[index] if index is not None and 0 <= index < len(nodes) else None


def _target(node: fx.Node) -> str:
    """What ``node`` calls, for a message: ``torch.matmul``, ``.view()``, ``module `fc```."""
    if node.op == "call_module":
        return f"module `{node.target}`"
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op != "call_function":
        return node.op
    try:
        name = fx.node._get_qualified_name(node.target)  # torch.matmul, _operator.add
    except (AttributeError, RuntimeError, TypeError):
        return str(node.target)  # an OpOverload: aten.mm.default
    return name[1:] if name.startswith("_operator.") else name  # operator.add, as imported


def run_blaming_inside(run: Callable[..., Any], model: nn.Module, model_inputs: Any,
                       which: str, first_nonfinite: Callable[[], tuple[str, str] | None]) -> Any:
    """``run(model, model_inputs, which=which)`` (:func:`run_model`, or the caller's own
    reference to it), raising a clearer error when the input is finite and NaN/Inf appeared
    inside the model before it failed: a NaN bias that a later dynamic layer cannot quantize
    fails with torch's "min should be less than or equal to max", which :func:`run_model`'s
    generic message blames on the input's shape, dtype and device.

    ``first_nonfinite`` says where NaN/Inf first appeared, as ``(op, kind)``, from the sums
    the caller keeps of the ops that ran (:func:`fxnumeric.compare`'s comparisons,
    :func:`fxnumeric.diagnose`'s), or None; it is called only once the model has failed.

    Raises:
        InputError: the model failed on the input; naming the op where NaN/Inf first appeared
            when the input is finite and such an op is known.
    """
    try:
        return run(model, model_inputs, which=which)
    except InputError as exc:
        found = None if nonfinite_inputs(model_inputs) else first_nonfinite()
        if found is None:
            raise
        at, kind = found
        cause = exc.__cause__ or exc
        first = (str(cause).splitlines() or [""])[0]
        raise InputError(
            f"the {which} model failed on a finite input ({type(cause).__name__}: {first}) "
            f"after NaN/Inf appeared inside it, first at {at}{f' ({kind})' if kind else ''}: "
            f"the cause is inside the model (a NaN/Inf weight, bias, scale or zero point of "
            f"{at}), not the input.\nFix: check {at}'s parameters and quantization parameters "
            "with torch.isfinite (a torch quantized module's weight(), bias(), scale and "
            "zero_point)") from exc


def _check_fixed(model: nn.Module, args: tuple, kwargs: dict, which: str) -> None:
    """Refuse a batch giving a value to an argument the graph was traced without.

    A graph traced on example inputs that leave out ``y`` (or give it as None) is traced with
    ``y`` fixed to its default (:func:`fxnumeric.capture.fixed_arguments`): its ``if y is not
    None`` branch is not in it. A later batch giving ``y`` would fail in torch.fx's run-time
    check ("y has been specialized to have value None"), which says neither why nor what to do.
    """
    if not isinstance(model, fx.GraphModule):
        return
    fixed, _ = fixed_inputs(model.graph.find_nodes(op="placeholder"))
    signature = graph_signature(model.graph) if fixed else None
    if signature is None:
        return
    bound = signature.bind_partial(*args, **kwargs).arguments
    for node in fixed:
        name = str(node.target)
        if name not in bound:
            continue
        guard = next(iter(node.users))
        value, expected = bound[name], guard.args[1] if guard.target is operator.eq else None
        if value is expected or (not isinstance(value, torch.Tensor) and value == expected):
            continue
        raise InputError(
            f"the {which} model was traced with `{name}` fixed to {expected!r}, as the example "
            f"inputs it was captured on leave it out (the first batch of compare, advise, "
            f"diagnose; match's example_inputs), but this batch gives `{name}` "
            f"({_describe(value)}): its graph has none of the code that reads `{name}`.\n"
            f"Fix: give every batch the same arguments; compare the batches that give `{name}` "
            "in a call of their own (match again on one of them)")


def _left_out_hint(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """Where a graph that failed takes an argument the batch leaves out (or gives as None):
    it was traced with a value there (the example inputs gave it, or there were none and
    torch.fx made every argument an input), which this batch lacks."""
    if not isinstance(model, fx.GraphModule):
        return ""
    signature = graph_signature(model.graph)
    if signature is None:
        return ""
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return ""
    fixed, _ = fixed_inputs(model.graph.find_nodes(op="placeholder"))
    names = [str(n.target) for n in model.graph.find_nodes(op="placeholder")
             if n not in fixed and n.users and n.args and n.args[0] is None
             and bound.get(str(n.target)) is None]
    if not names:
        return ""
    listed = ", ".join(f"`{name}`" for name in names)
    return (f"This batch leaves out (or gives as None) {listed}, which the graph was traced "
            "with as an input (a tensor): the example inputs it was captured on gave a value "
            "there (the first batch of compare, advise, diagnose), or there were none "
            "(match without example_inputs). Fix: give every batch the same arguments, and "
            "match on one of them (match(float_model, quant_model, example_inputs=batch))")


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _raised_in_fxnumeric(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc``'s traceback is fxnumeric's own code (an
    observer or a metric), not the model's or torch's."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep)


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')} on {x.device}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in x) + ")"
    return type(x).__name__


def _devices(model: Any) -> set[torch.device]:
    # a weight offloaded by accelerate computes on its hook's execution device, not on meta
    return devices(model)


def _input_devices(x: Any) -> set[torch.device]:
    if isinstance(x, torch.Tensor):
        return {x.device}
    if isinstance(x, (tuple, list)):
        return set().union(*(_input_devices(v) for v in x)) if x else set()
    if isinstance(x, Mapping):
        return _input_devices(list(x.values()))
    return set()


def check_model(model: Any, which: str) -> None:
    """Raise :class:`InputError` when ``model`` (``which``: ``"float_model"``,
    ``"quant_model"``) is not a model: an ``nn.Module`` or a ``torch.export`` program."""
    if isinstance(model, (nn.Module, torch.export.ExportedProgram)):
        return
    several = (" Several quantized variants are a dict, {name: quantized model}."
               if which == "quant_model" and isinstance(model, (list, tuple)) else "")
    raise InputError(f"{which} is a {type(model).__name__}, not a model: pass an nn.Module "
                     f"(or a torch.export ExportedProgram).{several}")


def check_devices(float_model: nn.Module, quant_model: nn.Module, batch: Any = None) -> None:
    """Raise :class:`InputError` when the models are not models or they (or the batch) live on
    different devices."""
    check_model(float_model, "float_model")
    check_model(quant_model, "quant_model")
    float_dev, quant_dev = _devices(float_model), _devices(quant_model)
    names = {"float model": float_dev, "quantized model": quant_dev}
    if batch is not None:
        names["input"] = _input_devices(as_args(batch))
    seen = set().union(*names.values())
    if len(seen) > 1:
        where = "; ".join(f"{k} on {', '.join(sorted(str(d) for d in v))}"
                          for k, v in names.items() if v)
        meta = (" Weights on the meta device were never loaded (a model built under "
                "init_empty_weights): load them, or dispatch the model with accelerate "
                "(disk_offload, dispatch_model), whose hooks load them at each call."
                if torch.device("meta") in seen else "")
        raise InputError(
            f"the models and inputs must be on one device, but the {where}. "
            f"Move them first, e.g. float_model.to('cpu') (quantized kernels run on CPU).{meta}"
        )


_MODEL_ARGS = ("float_model", "quant_model", "q_model", "float_module", "q_module")
F = TypeVar("F", bound=Callable[..., Any])
_KEPT: set[int] = set()
"""Models an enclosing :func:`buffers_kept` keeps already (``compare`` calls ``match``)."""


@contextlib.contextmanager
def buffers_kept(*models: Any) -> Iterator[None]:
    """Run with every buffer of ``models`` (a dict of variants too, an ``ExportedProgram``'s
    buffers too) put back as it was after, and every fake-quant observing nothing meanwhile.

    A model prepared but not converted (``prepare_pt2e``, ``prepare_qat_pt2e``, FX or eager
    ``prepare``) holds observers and fake-quants whose statistics, histograms and scales are
    buffers a forward updates: comparing on new data would go into the user's calibration
    (a later ``convert`` would read it), and a fake-quant would quantize each batch with the
    scale the batches before it moved. Buffers are small next to parameters (observers,
    BatchNorm statistics, rotary tables); each is copied once, and written back if a forward
    wrote it: its version counter moved or its value differs (a BatchNorm in training mode
    updates its running statistics without moving their version counter). An
    ``ExportedProgram``'s buffers are the tensors its ``.module()`` runs with. A model an
    enclosing call keeps already is left to it.
    """
    saved: list[_SavedBuffer] = []
    roots: list[int] = []
    try:
        for model in models:
            for root in (model.values() if isinstance(model, Mapping) else [model]):
                if not isinstance(root, (nn.Module, torch.export.ExportedProgram)) or (
                        id(root) in _KEPT):
                    continue
                _KEPT.add(id(root))
                roots.append(id(root))
                for held, names, module in _buffer_holders(root):
                    saved += _saved(held, names)
                    if (module is not None and "observer_enabled" in held
                            and hasattr(module, "disable_observer")):
                        module.disable_observer()  # its observer_enabled buffer is put back
        yield
    finally:
        _KEPT.difference_update(roots)
        put_back(saved)


_SavedBuffer = tuple[dict[str, Any], str, torch.Tensor, int, torch.Tensor]
"""``(dict holding it, its name there, the buffer, its version counter, a copy of it)``."""


def _saved(held: dict[str, Any], names: Iterable[str]) -> list[_SavedBuffer]:
    return [(held, name, held[name], held[name]._version, held[name].clone())
            for name in names
            if isinstance(held[name], torch.Tensor) and not held[name].is_meta]


def saved_buffers(*models: nn.Module) -> list[_SavedBuffer]:
    """A copy of every buffer of ``models`` (each module's ``_buffers``), for
    :func:`put_back`. Unlike :func:`buffers_kept`, also inside an enclosing one: a forward
    that updates a buffer in place (a running average, ``self.ema.mul_(0.9)``) run again on
    one batch (to check a traced graph, to run a batch again) must start from the state the
    first run started from."""
    return [entry for model in models for module in model.modules() if module._buffers
            for entry in _saved(module._buffers, list(module._buffers))]


@contextlib.contextmanager
def buffers_put_back(*models: nn.Module) -> Iterator[None]:
    """Run with every buffer of ``models`` put back as it was after (:func:`saved_buffers`,
    :func:`put_back`): a run of a model that only checks or records must leave the state the
    next run starts from (a running average updated in place) as it found it."""
    saved = saved_buffers(*models)
    try:
        yield
    finally:
        put_back(saved)


def put_back(saved: Iterable[_SavedBuffer]) -> None:
    """Put every buffer :func:`saved_buffers` copied back as it was (one a forward did not
    write is left alone)."""
    for held, name, buffer, version, value in saved:
        current = held.get(name)
        if current is buffer and buffer._version == version and _same_values(buffer, value):
            continue
        if current is buffer and buffer.shape == value.shape:
            with torch.no_grad():
                buffer.copy_(value)
        else:  # replaced or resized (a histogram observer's)
            held[name] = value


def _buffer_holders(root: Any
                    ) -> Iterator[tuple[dict[str, Any], Iterable[str], nn.Module | None]]:
    """``(dict holding buffers, their names in it, the module or None)`` for each place
    ``root`` keeps buffers: every module's ``_buffers``; an ``ExportedProgram``'s buffers are
    entries of its ``state_dict`` (persistent) and ``constants`` (not), the tensors its
    ``.module()`` runs with."""
    if isinstance(root, nn.Module):
        for module in root.modules():
            if module._buffers:
                yield module._buffers, list(module._buffers), module
        return
    names = root.graph_signature.buffers
    for held in (root.state_dict, root.constants):
        yield held, [name for name in names if name in held], None


def _same_values(buffer: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``buffer`` still holds ``value`` (a NaN reads as changed: put back, harmless)."""
    if buffer.shape != value.shape or buffer.dtype != value.dtype:
        return False
    if buffer.is_quantized:
        return torch.equal(buffer.int_repr(), value.int_repr())
    return torch.equal(buffer, value)


def keeps_buffers(fn: F) -> F:
    """``fn(float_model, quant_model, ...)`` run inside :func:`buffers_kept` of its models."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        models = [*args[:2], *(kwargs[k] for k in _MODEL_ARGS if k in kwargs)]
        with buffers_kept(*models):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
