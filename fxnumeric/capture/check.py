"""Check that a traced graph computes what its module's ``forward`` computes, on a real call.

torch.fx runs a ``forward`` once, on Proxies, and keeps one path through its Python code. A
test that reads differently on a Proxy than on a tensor takes the other branch, silently:
``if isinstance(mask, torch.Tensor): h = h * mask`` drops the mask (a Proxy is no Tensor);
T5's feed-forward loses ``hidden.to(self.wo.weight.dtype)`` behind
``isinstance(self.wo.weight, torch.Tensor)``, and its fp16 graph then fails where the module
runs (``wo`` kept in float32). The trace succeeds either way, so fxnumeric would compare a
model the user does not have. Every graph fxnumeric traces from a module is therefore run on
the call the module made on the first batch and held to the module's own output there:

- :func:`check_whole`: a model traced whole, both run on the example inputs;
- :func:`check_regions`: the regions of a model captured through the module tree
  (:mod:`fxnumeric.capture.tree`), each graph run inside one run of the model, on the
  arguments its module was called with (forward hooks on a copy of the module tree; each
  call's inputs are held only while the module runs).

The outputs must be equal, bit for bit: the graph calls the same ops in the same order on the
same tensors, and on CPU that gave equal outputs on every model checked (torchvision's
resnet18 and mobilenet_v2, float, FX and eager-quantized; Hugging Face BERT, Llama and T5,
float32, bfloat16 and float16). A tolerance would hide the harm this looks for: a lost
``.to(torch.float32)`` before a bfloat16 softmax changes the output at bfloat16's precision
only. Where they differ, the module runs again on the same inputs: a module whose own two
runs differ (a nondeterministic kernel, ``index_add_`` on CUDA) accepts a graph that differs
from it by at most :data:`NONDETERMINISM_MARGIN` times as much. Both runs see the same random
numbers (dropout in training mode).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from .._tensors import copy_inputs
from ..errors import InputError
from ..run import run_model
from .clone import module_tree_copy
from .fx import attributes_kept

__all__ = ["check_whole", "check_regions", "difference", "NONDETERMINISM_MARGIN"]

NONDETERMINISM_MARGIN = 4.0
"""How much further than a module's two own runs its graph may be from it (max |difference|),
for a module whose own runs differ."""

_CAUSE = (
    "torch.fx keeps one path through a forward's Python code, decided on Proxies: a test "
    "that reads differently on a Proxy (`isinstance(x, torch.Tensor)` on an argument or a "
    "parameter, a dtype or device test, `with torch.autocast`) takes the other branch")


def difference(ref: Any, actual: Any, where: str = "output") -> tuple[str, float] | None:
    """Where and how ``actual`` (a graph's output) differs from ``ref`` (the module's): a
    description and the largest absolute difference (``inf`` for a different structure,
    shape or dtype); None when every tensor is equal, NaN where NaN.

    >>> difference((torch.ones(2), 3), (torch.ones(2), 3)) is None
    True
    >>> difference({"logits": torch.ones(1)}, {"logits": torch.ones(1), "attentions": None})
    >>> difference(torch.ones(2), torch.tensor([1.0, 1.5]))
    ('output differs by up to 0.5 (largest |value| 1)', 0.5)
    """
    if isinstance(ref, torch.Tensor) or isinstance(actual, torch.Tensor):
        return _tensor_difference(ref, actual, where)
    if isinstance(ref, Mapping) and isinstance(actual, Mapping):
        # a key left out reads as None: a Hugging Face ModelOutput built in a graph keeps
        # the fields its forward, run eagerly, leaves out for being None
        keys = list(dict.fromkeys([*ref, *actual]))
        return _largest(difference(ref.get(k), actual.get(k), f"{where}[{k!r}]") for k in keys)
    if isinstance(ref, (tuple, list)) and isinstance(actual, (tuple, list)):
        if len(ref) != len(actual):
            return (f"{where} holds {len(actual)} values, the module's {len(ref)}",
                    float("inf"))
        return _largest(difference(r, a, f"{where}[{i}]")
                        for i, (r, a) in enumerate(zip(ref, actual, strict=True)))
    if type(ref) is not type(actual):
        return (f"{where} is {type(actual).__name__}, the module's {type(ref).__name__}",
                float("inf"))
    if isinstance(ref, (int, float, bool, str, type(None))) and ref != actual:
        return f"{where} is {actual!r}, the module's {ref!r}", float("inf")
    return None  # another object (a cache): its tensors are not the output compared


def _largest(found: Iterator[tuple[str, float] | None]) -> tuple[str, float] | None:
    return max((f for f in found if f is not None), key=lambda f: f[1], default=None)


def _tensor_difference(ref: Any, actual: Any, where: str) -> tuple[str, float] | None:
    if not (isinstance(ref, torch.Tensor) and isinstance(actual, torch.Tensor)):
        kinds = [type(v).__name__ for v in (actual, ref)]
        return f"{where} is {kinds[0]}, the module's {kinds[1]}", float("inf")
    if ref.shape != actual.shape or ref.dtype != actual.dtype:
        return (f"{where} is {actual.dtype} {tuple(actual.shape)}, the module's {ref.dtype} "
                f"{tuple(ref.shape)}", float("inf"))
    ref, actual = (t.dequantize() if t.is_quantized else t.detach() for t in (ref, actual))
    if not (ref.is_floating_point() or ref.is_complex()):
        if torch.equal(ref, actual):
            return None
        return f"{where} differs at {int((ref != actual).sum())} positions", float("inf")
    same = (ref == actual) | (ref.isnan() & actual.isnan())
    if bool(same.all()):
        return None
    gap = (ref.double() - actual.double()).abs().nan_to_num(nan=float("inf"))
    largest = float(ref.double().abs().nan_to_num(nan=0.0, posinf=0.0).max())
    return (f"{where} differs by up to {float(gap.max()):.3g} (largest |value| {largest:.3g})",
            float(gap.max()))


def _seeded_state() -> Any:
    """The random number generators' state (CPU, and CUDA where torch started it)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _rng_at(state: Any) -> Iterator[None]:
    """Run with the generators at ``state``; the caller's state is put back after."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=list(range(len(cuda))) if cuda else []):
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
        yield


def _verdict(ref: Any, actual: Any, again: Any) -> tuple[str, float] | None:
    """:func:`difference` of ``actual`` from ``ref``, unless the module's second run
    ``again`` differs from its first nearly as much (a nondeterministic module)."""
    found = difference(ref, actual)
    if found is None:
        return None
    own = difference(ref, again)
    if own is not None and found[1] <= NONDETERMINISM_MARGIN * own[1]:
        return None
    return found


def _reason(found: tuple[str, float], module: nn.Module, which: str, fix: str) -> str:
    return (f"the {which} {type(module).__name__}'s graph traced by torch.fx computes "
            f"differently from its forward on the first batch: its {found[0]}. {_CAUSE}. {fix}")


def _failed(exc: BaseException, module: nn.Module, which: str, fix: str) -> str:
    first = (str(exc).splitlines() or [""])[0][:200]
    return (f"the {which} {type(module).__name__}'s graph traced by torch.fx fails where its "
            f"forward ran on the first batch ({type(exc).__name__}: {first}). {_CAUSE}. {fix}")


def check_whole(model: nn.Module, graph: fx.GraphModule, batch: Any, *,
                which: str, fix: str) -> str | None | Literal[False]:
    """Why ``graph`` (``model`` traced whole) is not ``model`` on ``batch``; None when it is;
    False when ``model`` itself fails on ``batch`` (nothing checked).

    Both run once on ``batch`` (with the same random numbers); a model that fails on it is
    not checked (the runs after it say where it fails, as before the check). What the model's
    forward writes into its modules (a cache filled on the first call) is put back after.
    """
    with attributes_kept(model):
        return _check_whole(model, graph, batch, which, fix)


def _check_whole(model: nn.Module, graph: fx.GraphModule, batch: Any, which: str,
                 fix: str) -> str | None | Literal[False]:
    state = _seeded_state()
    try:
        with _rng_at(state):
            ref = run_model(model, batch, which=which)
    except InputError:
        return False  # nothing to hold the graph to: the runs after say where the model fails
    try:
        with _rng_at(state):
            actual = run_model(graph, batch, which=which)
    except Exception as exc:  # whatever the graph raises, the model ran
        return _failed(exc, model, which, fix)
    if difference(ref, actual) is None:
        return None
    with _rng_at(state):
        again = run_model(model, batch, which=which)
    found = _verdict(ref, actual, again)
    return None if found is None else _reason(found, model, which, fix)


def check_regions(model: nn.Module, graphs: Mapping[str, fx.GraphModule], batch: Any, *,
                  which: str, fix: str) -> dict[str, str]:
    """``{path: why}`` for the graphs of ``graphs`` (module path -> its graph) that are not
    their modules on the calls one run of ``model`` on ``batch`` makes (each call checked;
    the first that differs is the reason).

    The run is on a copy of the module tree with hooks on those modules: each call's inputs
    are copied before the module runs (it may write into them), its graph is run on them
    once the module returns, and they are dropped. What the run writes into the modules is
    put back after, as :func:`check_whole` does."""
    twin = module_tree_copy(model)
    found: dict[str, str] = {}
    rerun: set[str] = set()  # the module running again (nondeterminism): not a call to check
    for path, graph in graphs.items():
        module = twin.get_submodule(path)
        held: list[tuple[tuple, dict, Any]] = []  # a stack: a module may call itself

        def before(m: nn.Module, args: tuple, kwargs: dict,
                   held: list[tuple[tuple, dict, Any]] = held, path: str = path) -> None:
            if path in rerun:
                return
            held.append((*copy_inputs((args, kwargs)), _seeded_state()))

        def after(m: nn.Module, args: tuple, kwargs: dict, out: Any,
                  held: list[tuple[tuple, dict, Any]] = held, path: str = path,
                  graph: fx.GraphModule = graph) -> None:
            if path in rerun:
                return
            f_args, f_kwargs, state = held.pop()
            if path in found:
                return
            graph_args, graph_kwargs = copy_inputs((f_args, f_kwargs))
            try:
                with _rng_at(state), torch.no_grad():
                    actual = graph(*graph_args, **graph_kwargs)
            except Exception as exc:  # whatever the graph raises, the module ran
                found[path] = _failed(exc, m, which, fix)
                return
            if difference(out, actual) is None:
                return
            rerun.add(path)
            try:
                with _rng_at(state), torch.no_grad():
                    again = m(*f_args, **f_kwargs)
            finally:
                rerun.discard(path)
            verdict = _verdict(out, actual, again)
            if verdict is not None:
                found[path] = _reason(verdict, m, which, fix)

        # the inputs before the module's own pre-hooks change them (its graph runs those
        # hooks too), its output after its own hooks
        module.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
        module.register_forward_hook(after, with_kwargs=True)
    with attributes_kept(model):  # the copy's modules share their caches with the model's
        run_model(twin, batch, which=which)
    return found
