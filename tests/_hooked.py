"""Oracles read by forward hooks on the plain models, shared by the tests."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def pooled_sqnr(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """SQNR in dB of ``(float, quantized)`` pairs, pooled: total signal over total noise, in
    float64."""
    pairs = list(pairs)
    signal = sum(float((a.double() ** 2).sum()) for a, _ in pairs)
    noise = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in pairs)
    return 10 * math.log10(signal / noise)


def hooked_sqnr(f: nn.Module, q: nn.Module, name: str, batches: Iterable[torch.Tensor]) -> float:
    """Pooled SQNR of the output of the module at ``name`` of both models over ``batches``,
    read by forward hooks."""
    got: dict[str, list[torch.Tensor]] = {"f": [], "q": []}
    handles = [m.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, side=side: got[side].append(out.detach()))
        for side, m in (("f", f), ("q", q))]
    try:
        with torch.no_grad():
            for x in batches:
                f(x), q(x)
    finally:
        for h in handles:
            h.remove()
    return pooled_sqnr(zip(got["f"], got["q"], strict=True))
