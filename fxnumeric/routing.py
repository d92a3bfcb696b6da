"""Calls whose rows follow a routing: a mixture of experts' layers, compared only when routed alike.

A module torch.fx cannot trace is kept whole and its children are captured on their own
(:attr:`fxnumeric.Matching.untraced`). When such a module picks, from index tensors it is
given, which rows each child sees (transformers 5's fused MoE experts: ``experts(hidden,
top_k_index, top_k_weights)`` runs ``act_fn`` once per expert hit, on the rows routed to
that expert), the float and quantized calls of a child line up only when both models routed
alike::

    float:      router -> top_k_index [[0, 2], [1, 0], ...] -> experts -> act_fn(rows of 0) ...
    quantized:  router -> top_k_index [[2, 0], [1, 0], ...] -> experts -> act_fn(rows of 0) ...
                                      ^ token 0's experts swapped rank: expert 0's rows come
                                        in another order, row i is another token on each side

Compared row by row, such calls show an error that is not there (0.6 dB on a tiny Mixtral
whose experts read 44 dB). :class:`Routes` watches each such module's calls on both sides: a
quantized call whose integer and boolean tensor arguments differ from its float twin's is
*misrouted*, and the outputs of the layers it runs are left out of that batch's comparison
(:class:`fxnumeric.compare`'s comparators skip them and say so in the row's note). Shadows
are unaffected: a shadow reads the quantized layer's own input.

A two-stage detector routes by boxes: torchvision's ``RoIHeads`` gets a list of proposals,
``(N, 4)`` float boxes sorted by objectness, and its box head runs one row per proposal. A
quantized backbone moves near-tied scores, the proposals come in another order, and row
``i`` is another region on each side (a box head's fc6 read 10.9 dB, 33.7 dB on the
proposals alike on both sides). Such boxes count as routing too: a quantized call is
misrouted where one of its boxes lies :data:`REORDER_RATIO` times farther from the float box
of its index than from the nearest float box.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .match import Matching, Pair

__all__ = ["Routes", "routed_containers", "hook_calls", "watch", "hook_watched", "Watched"]


def _indices(value: Any) -> Iterator[torch.Tensor]:
    """The integer and boolean tensors in a call's arguments, in order."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex() or value.is_quantized):
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _indices(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _indices(item)


def _boxes(value: Any, listed: bool = False) -> Iterator[torch.Tensor]:
    """The ``(N, 4)`` float tensors held in lists in a call's arguments (a detector's
    proposals, one tensor per image), in order."""
    if isinstance(value, torch.Tensor):
        if listed and value.is_floating_point() and value.dim() == 2 and value.shape[-1] == 4:
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _boxes(item, listed or isinstance(value, list))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _boxes(item, listed)


def _routing(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A call's index tensors and boxes: what routes its rows."""
    return list(_indices((args, kwargs))), list(_boxes((args, kwargs)))


REORDER_RATIO = 4.0
"""How many times farther than its nearest float box a quantized box must lie from the float
box of its own index to be read as another box: a reorder moves a box to another one
(pixels to tens of pixels away, against its twin's fraction of a pixel), where rounding
moves it by its own error, which ties and near-duplicates share."""


def _same_order(float_boxes: torch.Tensor, quant_boxes: torch.Tensor) -> bool:
    """Whether each quantized box lies near the float box of its own index: no nearer to
    another by :data:`REORDER_RATIO` (equal boxes, padding rows among them, are alike)."""
    if float_boxes.shape != quant_boxes.shape:
        return False
    float_boxes = float_boxes.to(quant_boxes.device)
    if len(quant_boxes) < 2 or torch.equal(float_boxes, quant_boxes):
        return True
    distance = torch.cdist(quant_boxes.double(), float_boxes.double())
    own = distance.diagonal()
    nearest = distance.min(dim=1).values
    return bool((own <= REORDER_RATIO * nearest + 1e-12).all())


def _alike(theirs: tuple[list[torch.Tensor], list[torch.Tensor]],
           ours: tuple[list[torch.Tensor], list[torch.Tensor]]) -> bool:
    (float_indices, float_boxes), (quant_indices, quant_boxes) = theirs, ours
    return (len(float_indices) == len(quant_indices) and all(
        f.shape == q.shape and torch.equal(f.to(q.device), q)
        for f, q in zip(float_indices, quant_indices, strict=True))
        and len(float_boxes) == len(quant_boxes)
        and all(map(_same_order, float_boxes, quant_boxes)))


class Routes:
    """The index tensors each call of one untraced module received, float side against
    quantized side, for a batch.

    The float model's calls add theirs (:meth:`float_call`, a forward pre-hook); a quantized
    call takes its float twin's (in call order) and is misrouted if its own differ
    (:meth:`quant_call`), until it returns (:meth:`quant_return`). ``pending`` is what
    :meth:`fxnumeric.lockstep.Lockstep.need` waits on when the quantized model runs in turns
    and reaches the call first.
    """

    def __init__(self, float_path: str, turn: Any) -> None:
        self.float_path = float_path
        self.turn = turn  # compare's _Turn: the batch's lockstep, if any
        self.pending: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self._open: list[bool] = []  # the quantized calls under way: misrouted or not

    @property
    def misrouted(self) -> bool:
        """Whether a quantized call under way was routed unlike its float twin."""
        return any(self._open)

    def float_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.pending.append(_routing(args, kwargs))

    def quant_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        lockstep = self.turn.lockstep
        if not self.pending and lockstep is not None:
            lockstep.need(self)  # the float model runs until it has made this call
        theirs = self.pending.pop(0) if self.pending else None
        self._open.append(theirs is None or not _alike(theirs, _routing(args, kwargs)))

    def quant_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._open:
            self._open.pop()

    def clear(self) -> None:
        """End of batch."""
        self.pending.clear()
        self._open.clear()


def routed_containers(matching: Matching) -> dict[str, tuple[str, list[Pair]]]:
    """``{float path: (quantized path, pairs inside)}`` of the untraced modules whose children
    hold pairs: the modules whose calls :class:`Routes` watches."""
    found: dict[str, tuple[str, list[Pair]]] = {}
    for float_path, _reason in matching.untraced:
        if not float_path:
            continue
        prefix = float_path + "."
        for region in matching.regions:
            if not region.float_path.startswith(prefix):
                continue
            rel = region.float_path[len(float_path):]
            quant_path = (region.quant_path[:-len(rel)] if region.quant_path.endswith(rel)
                          else float_path)
            entry = found.setdefault(float_path, (quant_path, []))
            entry[1].extend(region.pairs)
    return found


Watched = list[tuple[str, str, "Routes"]]
"""``(float path, quantized path, routes)`` of each module whose calls are watched."""


def watch(matching: Matching, turn: Any) -> tuple[dict[str, Routes], Watched]:
    """The :class:`Routes` of every module :func:`routed_containers` finds, by the name of
    each pair inside, and each module's once (:func:`hook_watched` hooks them)."""
    containers = routed_containers(matching)
    watched = [(path, quant_path, Routes(path, turn))
               for path, (quant_path, inside) in containers.items() if inside]
    by_path = {path: routes for path, _, routes in watched}
    return ({pair.name: by_path[path] for path, (_, inside) in containers.items()
             for pair in inside}, watched)


def hook_watched(watched: Watched, float_model: nn.Module | None, quant_model: nn.Module,
                 matching: Matching) -> None:
    """Hook the calls of each watched module in ``quant_model`` and, unless it is ``None``
    (a float model shared by several variants, hooked where it is built), ``float_model``:
    copies of ``matching``'s models, made for the comparison."""
    for path, quant_path, routes in watched:
        hook_calls(quant_model, matching.quant_model, quant_path, [routes], "quantized")
        if float_model is not None:
            hook_calls(float_model, matching.float_model, path, [routes], "float")


def hook_calls(model: nn.Module, user_model: nn.Module | None, path: str,
               routes: list[Routes], side: str) -> bool:
    """Watch the calls of ``model``'s module at ``path`` for every one of ``routes``: ``side``
    ``"float"`` or ``"quantized"``. ``model`` is a copy made for the comparison (hooks on it
    leave ``user_model`` as it was); False if it has no such module of its own."""
    try:
        module = model.get_submodule(path)
        if user_model is not None and module is user_model.get_submodule(path):
            return False  # the user's own module: never hooked
    except AttributeError:
        return False
    if side == "float":
        for r in routes:
            module.register_forward_pre_hook(r.float_call, with_kwargs=True)
    else:
        for r in routes:
            module.register_forward_pre_hook(r.quant_call, with_kwargs=True)
            module.register_forward_hook(r.quant_return, with_kwargs=True, always_call=True)
    return True
