"""Each layer against its own floor: the SQNR its own qparams allow.

A quantized layer cannot beat the noise of its own grids. Rounding to a uniform grid of step
``Δ`` adds noise of power ``Δ² / 12`` per value (the error is uniform on ``±Δ/2``); a layer
whose output is quantized to step ``Δ_out`` adds that to each output value, and a weight
quantized to step ``Δ_w`` adds, to each output, ``Δ_w² / 12`` times the energy of the input
values that weight row multiplies (``fan_in · E[x²]``). Values outside the output grid's range
are clipped, which adds their distance to the range, squared. So, for a layer whose float twin
(its shadow) outputs ``y``::

    floor noise = N · Δ_out² / 12  +  Σ (y - clip(y))²  +  N · fan_in · E[x²] · mean(Δ_w²) / 12
    floor SQNR  = 10 log10( Σ y² / floor noise )

``N`` is the number of output values, ``mean(Δ_w²)`` is over the weight's output channels (and
groups, for group-wise scales). This is the "is this good?" answer from physics rather than
fixed thresholds: a layer whose measured shadow SQNR sits at its floor is as good as its
bits allow (it needs more bits, not a fix); a layer far below it is broken, and the part of its
error that is a constant offset per output channel (a lost bias, a wrong zero point) or that
comes from clipping says which way.

Dynamic activation quantization (the input quantized per batch or per token inside the op) is
not modelled: the floor of such a layer counts its weight (and output) grids only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .semantics import QuantGrid

__all__ = ["FLOOR_MARGIN_DB", "floor_sqnr", "weight_steps", "FloorVerdict", "judge"]

FLOOR_MARGIN_DB = 6.0
"""How far (dB) below its floor a layer's shadow SQNR must be to count as broken: the noise
model is an expectation, and 6 dB is four times its noise power."""

AT_FLOOR_DB = 3.0
"""Within this many dB of its floor a layer is "at its floor": it needs more bits, not a fix."""


def weight_steps(weight: Any) -> torch.Tensor | None:
    """The squared steps of a quantized weight, one value per output channel (the mean over
    its groups for group-wise scales); ``None`` for a float weight.

    Reads torch quantized tensors (per-tensor and per-channel) and tensor subclasses with a
    ``scale`` attribute (torchao's ``Int8Tensor``, ``IntxUnpackedToInt8Tensor``).

    >>> w = torch.quantize_per_tensor(torch.randn(4, 3), 0.5, 0, torch.qint8)
    >>> weight_steps(w).tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    if isinstance(weight, torch.Tensor) and weight.is_quantized:
        channels = weight.shape[0] if weight.dim() else 1
        if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return torch.full((channels,), float(weight.q_scale()) ** 2, dtype=torch.float64)
        axis = weight.q_per_channel_axis()
        steps = weight.q_per_channel_scales().double() ** 2
        return steps if axis == 0 else torch.full((channels,), float(steps.mean()),
                                                  dtype=torch.float64)
    scale = getattr(weight, "scale", None)
    if isinstance(scale, torch.Tensor) and type(weight) is not torch.Tensor and weight.dim():
        squared = scale.detach().double().reshape(scale.shape[0], -1) ** 2
        if squared.shape[0] == weight.shape[0]:
            return squared.mean(dim=1)
        return torch.full((weight.shape[0],), float(squared.mean()), dtype=torch.float64)
    return None


def floor_sqnr(signal: float, count: int, *, grid: QuantGrid | None = None,
               clip_noise: float = 0.0, weight_step_sq: float | None = None,
               fan_in: int | None = None, input_mean_square: float | None = None) -> float | None:
    """The SQNR (dB) a layer's own grids allow, over ``count`` output values of energy
    ``signal`` (see the module docstring); ``None`` when no grid of it is known.

    >>> round(floor_sqnr(1000.0, 1000, grid=QuantGrid(0.01, 0, -128, 127)), 2)  # rms 1, step 0.01
    50.79
    """
    noise = clip_noise
    known = False
    if grid is not None:
        noise += count * grid.scale ** 2 / 12
        known = True
    if weight_step_sq is not None and fan_in and input_mean_square is not None:
        noise += count * fan_in * input_mean_square * weight_step_sq / 12
        known = True
    if not known or count == 0:
        return None
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


@dataclass(frozen=True)
class FloorVerdict:
    """A layer's shadow SQNR against its floor.

    Attributes:
        state: ``"below"`` (broken: more than :data:`FLOOR_MARGIN_DB` under its floor),
            ``"at"`` (within :data:`AT_FLOOR_DB`: as good as its bits allow) or ``"above"``
            (between, or better than the noise model expects).
        cause: for ``"below"``: ``"clipping"``, ``"offset"`` (a constant per output channel:
            a lost bias or a wrong zero point) or ``"scale"`` (a step the values do not fit).
        text: one sentence for a person.
    """

    state: str
    cause: str = ""
    text: str = ""


def judge(shadow_sqnr: float | None, floor: float | None, *, clip_share: float = 0.0,
          offset_share: float = 0.0) -> FloorVerdict | None:
    """Place a layer against its floor; ``None`` when either number is missing.

    ``clip_share`` and ``offset_share``: the fractions of the layer's measured local error
    power that clipping and a per-channel constant offset explain.

    >>> judge(20.0, 40.0, offset_share=0.9).cause
    'offset'
    >>> judge(39.0, 40.0).state
    'at'
    """
    if shadow_sqnr is None or floor is None or math.isnan(shadow_sqnr) or math.isnan(floor):
        return None
    gap = floor - shadow_sqnr
    if gap > FLOOR_MARGIN_DB:
        if clip_share > 0.3:
            return FloorVerdict("below", "clipping", (
                f"{gap:.1f} dB below its floor: {100 * clip_share:.0f}% of its error is clipping "
                "(its output range is too narrow); recalibrate, or widen the range"))
        if offset_share > 0.5:
            return FloorVerdict("below", "offset", (
                f"{gap:.1f} dB below its floor: {100 * offset_share:.0f}% of its error is a "
                "constant per output channel (a lost bias or a wrong zero point)"))
        return FloorVerdict("below", "scale", (
            f"{gap:.1f} dB below its floor: its error exceeds what its steps allow (a wrong "
            "scale, for the output or the weights)"))
    if abs(gap) <= AT_FLOOR_DB:
        return FloorVerdict("at", "", "at its floor: as good as its bits allow (more bits, "
                                      "not a fix, would help)")
    return FloorVerdict("above", "", "")
