"""Block replay: hybrids that agree on a model's first blocks share those blocks' outputs.

A decoder runs its blocks (``model.layers.0`` .. ``model.layers.29``,
:func:`fxnumeric.blocks.block_paths`) one after another, each once per forward. Two hybrids
that swap the same layers in blocks ``0..j`` (and the same layers outside every block)
compute the same output of block ``j`` on a batch, so the second one need not run those
blocks: it takes block ``j``'s output from the first and runs from block ``j + 1`` on. A
search mostly runs hybrids one change away from its current plan (each layer upgraded alone,
one upgrade undone), so a hybrid changing a layer in block ``k`` costs about the blocks from
``k`` on.

What is replayed is exact: a block's output is the value the block computed, cloned, for the
same batch and the same swaps before it. It is what the block's ``forward`` returned (the
instance's own ``forward`` where it has one, such as accelerate's hook wrapper), not what
calling the block returned: a replayed block is still called, its ``forward`` returning that
value, so its forward pre-hooks and hooks (the model's own and torch's global ones) run once,
as ``model(x)`` runs them. Kept after them, a hook that rescales the block's output would
apply twice. The hooks of the modules inside a replayed block do not run: their effect is in
the value. Replay is used only for blocks that the hybrid model calls as modules (not blocks
traced into a graph), that run once each, in order: the first run checks this, and replay
stays off for a model where it does not hold. Memory is bounded: the outputs kept are the
most recently used ones, up to ``budget`` bytes.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..blocks import block_of, block_paths

__all__ = ["BlockReplay"]

_Key = tuple[int, str, int, frozenset]


def _clone(value: Any) -> Any:
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _nbytes(value: Any) -> int:
    total = 0

    def count(v: Any) -> Any:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        return v

    tree_map(count, value)
    return total


def _restore_forward(module: nn.Module) -> Callable[[], None]:
    """What puts ``module``'s own ``forward`` back (an instance attribute, such as
    accelerate's hook wrapper, or the class's)."""
    own = vars(module).get("forward", _NONE)

    def restore() -> None:
        if own is _NONE:
            vars(module).pop("forward", None)
        else:
            module.forward = own

    return restore


_NONE = object()


def _replayed(forward: Callable[..., Any], value: Any, calls: list[int],
              j: int) -> Callable[..., Any]:
    """``forward`` of block ``j``, returning ``value`` (a copy) instead of computing it."""

    @functools.wraps(forward)
    def replayed(*args: Any, **kwargs: Any) -> Any:
        calls.append(j)
        return _clone(value)

    return replayed


class BlockReplay:
    """Runs hybrid models, replaying the outputs of leading blocks another hybrid computed.

    Args:
        model: the float model (its blocks are the hybrids' blocks, by module path).
        region_paths: the module paths of the matching's regions: a block inside one of them
            was traced into a graph and is not called as a module.
        budget: bytes of block outputs kept (least recently used dropped first).
    """

    def __init__(self, model: nn.Module, region_paths: Iterable[str], budget: int) -> None:
        regions = [p for p in region_paths]
        self.blocks = [b for b in block_paths(model)
                       if not any(r == "" or b.startswith(r + ".") for r in regions)]
        self.budget = budget
        self.enabled: bool | None = None if len(self.blocks) >= 2 else False
        self.replayed = 0  # block calls not run
        self._index = {b: i for i, b in enumerate(self.blocks)}
        self._kept: OrderedDict[_Key, Any] = OrderedDict()
        self._bytes = 0

    def block(self, path: str) -> int:
        """The index of the block a swap at module ``path`` sits in; -1 outside every block
        (such a swap counts as coming before every block, which is always correct)."""
        found = block_of(path, self.blocks)
        return self._index[found] if found else -1

    def run(self, model: nn.Module, batch_index: int, base: str, where: Iterable[tuple[Any, int]],
            call: Callable[[nn.Module], Any]) -> Any:
        """``call(model)``, with the blocks whose output is known for this batch and these
        swaps (``where``: each swap with its block index) returned instead of run."""
        if self.enabled is False:
            return call(model)
        try:
            modules = [model.get_submodule(b) for b in self.blocks]
        except AttributeError:
            return call(model)
        placed = [(swap, i) for swap, i in where]
        keys = [(batch_index, base, j, frozenset(s for s, i in placed if i <= j))
                for j in range(len(self.blocks))]
        known = -1
        if self.enabled:
            for j in range(len(keys) - 1, -1, -1):
                if keys[j] in self._kept:
                    known = j
                    break
        calls: list[int] = []
        undo: list[Callable[[], None]] = []
        for j, module in enumerate(modules):
            undo.append(_restore_forward(module))
            if j <= known:
                value = self._kept[keys[j]]
                self._kept.move_to_end(keys[j])
                module.forward = _replayed(module.forward, value, calls, j)
            else:
                module.forward = self._keeping(module.forward, keys[j], calls, j)
        try:
            result = call(model)
        finally:
            for step in undo:
                step()
        if self.enabled is None:  # the first run: blocks once each, in order
            self.enabled = calls == list(range(len(self.blocks)))
            if not self.enabled:
                self._kept.clear()
                self._bytes = 0
        self.replayed += known + 1
        return result

    def _keeping(self, forward: Callable[..., Any], key: _Key, calls: list[int],
                 j: int) -> Callable[..., Any]:
        """``forward``, keeping what it returns under ``key``."""

        @functools.wraps(forward)
        def keeping(*args: Any, **kwargs: Any) -> Any:
            output = forward(*args, **kwargs)
            self._keep(key, output, calls, j)
            return output

        return keeping

    def _keep(self, key: _Key, output: Any, calls: list[int], j: int) -> None:
        calls.append(j)
        if key in self._kept:
            return
        value = _clone(output)
        size = _nbytes(value)
        if size > self.budget:
            return
        self._kept[key] = value
        self._bytes += size
        while self._bytes > self.budget:
            _, dropped = self._kept.popitem(last=False)
            self._bytes -= _nbytes(dropped)
