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

A layer that quantizes its float input inside the op, per call (torch's int8 dynamic modules:
the whole input over 127 steps; torchao's dynamic-activation configs: each token over 255) adds
the input's rounding through its weights: ``Σ_calls Σ_tokens Δ_x² / 12 · ‖W‖²``. One that rounds
it on a grid fixed at conversion (torchao's ``Int8StaticActivationInt8WeightConfig``) adds each
input value's own error on that grid (rounding, and clipping beyond it), ``Σ e²``, through the
weights' mean column energy ``‖W‖² / fan_in``.

A layer that multiplies its input by a factor per input channel inside the op, its stored weight
divided by it (torchao's ``act_pre_scale``: SmoothQuant, AWQ), is a layer whose quantized op
reads that scaled input with that stored weight: its floor is computed in that frame (the
input's energy and rounding read on the scaled input; the weight's energy on the stored one).

A recurrent layer (torch's dynamic LSTM, GRU or a cell) has no floor: its output is a
nonlinear recurrence of its gates, not a linear map of its weights, so this noise model does
not describe it (its input is quantized per call all the same: :func:`fxnumeric.ops.dynamic_input`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from . import flows, offload
from .errors import InputError
from .metrics import aminmax, db, energy
from .ops import dynamic_input
from .semantics import (
    QRANGE,
    QuantGrid,
    WeightGrid,
    dequantize_grid,
    evaluate_constant,
    grid_before,
    is_dequantize,
)

__all__ = ["FLOOR_MARGIN_DB", "AT_FLOOR_DB", "floor_sqnr", "floor_noise", "output_rounding",
           "weight_steps", "FloorVerdict", "judge", "FloorSums", "layer_weight_steps",
           "layer_module", "layer_floor", "floor_sums", "functional_weight_grid",
           "output_channel_dim", "unexplained"]

FLOOR_MARGIN_DB = 6.0
"""How far (dB) below its floor a layer's shadow SQNR must be to count as broken: the noise
model is an expectation, and 6 dB is four times its noise power."""

AT_FLOOR_DB = 3.0
"""Within this many dB of its floor a layer is "at its floor": it needs more bits, not a fix."""


def weight_steps(weight: Any) -> torch.Tensor | None:
    """The squared steps of a quantized weight, one value per output channel (the mean over
    its groups for group-wise scales); ``None`` for a float weight.

    Reads torch quantized tensors (per-tensor and per-channel) and a flow's own weight types
    through their grid (:func:`fxnumeric.flows.weight_grid`: torchao's ``Int8Tensor``,
    ``IntxUnpackedToInt8Tensor``); ``None`` for one that stores floating-point values
    (``Float8Tensor``: no uniform grid).

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
    grid = flows.weight_grid(weight)  # float8: no uniform grid, so no floor, not a wrong one
    if grid is None:
        return None
    squared = grid.scales ** 2
    if grid.axis is None:
        return torch.full((weight.shape[0],), float(squared[0]), dtype=torch.float64)
    return squared.reshape(weight.shape[0], -1).mean(dim=1)


def layer_module(region: Any, pair: Any) -> Any:
    """The quantized module a pair's layer computes with (``None`` for a functional op)."""
    for node in region.chain(pair, "quant"):
        module = _reference_inside(region.quant_view.module(node))
        if module is not None and getattr(module, "weight", None) is not None:
            return module
    return None


def _reference_inside(module: Any) -> Any:
    """A fused reference module's weighted first module (``convert_to_reference_fx`` keeps
    conv + relu as a ``ConvReLU2d`` holding a reference ``Conv2d``, whose quantized weight
    is its own), else ``module``."""
    if (isinstance(module, torch.nn.Sequential) and len(module)
            and callable(getattr(module[0], "get_quantized_weight", None))):
        return module[0]
    return module


def _window(module: Any) -> tuple[Any, ...] | None:
    """``(rank, kernel_size, stride, padding, dilation)`` of a conv with zero padding, whose
    taps read the padding's zeros too; else ``None``."""
    kernel = getattr(module, "kernel_size", None)
    if (not isinstance(kernel, tuple) or getattr(module, "padding_mode", "zeros") != "zeros"
            or getattr(module, "transposed", False) or len(kernel) not in (1, 2, 3)):
        return None
    return (len(kernel), kernel, module.stride, module.padding, module.dilation)


def layer_weight_steps(region: Any, pair: Any, read: torch.Tensor | None = None,
                       ) -> tuple[float, int, float] | None:
    """``(mean squared weight step, fan-in, energy of the weight)`` of the quantized weight a
    pair's layer computes with, or ``None`` (no weight, or a float one).

    The weight is read where it lives: a quantized module's weight (torch's, or a torchao
    tensor subclass), or, for a functional op of an exported graph, the scales of the
    ``dequantize`` that produces it. ``read``: that module's weight as the weight comparison
    read it already (:func:`fxnumeric.weights.pair_weights`), so that it is not unpacked or
    dequantized twice (a quantize_dynamic Linear's ``weight()`` copies it out of its packed
    form: 0.25 s per compare of SmolLM2).
    """
    for node in region.chain(pair, "quant"):
        module = _reference_inside(region.quant_view.module(node))
        if module is not None:  # offloaded by accelerate: read from its hook's weights map
            try:
                module = offload.loaded(module)
            except InputError:
                return None  # nothing holds the weight: no floor, not a guess
        weight = getattr(module, "weight", None) if module is not None else None
        if callable(getattr(module, "get_quantized_weight", None)):
            # a reference module (convert_to_reference_fx) keeps its weight float and rounds a
            # copy of it onto its grid per call: the grid is its quantized weight's
            weight = module.get_quantized_weight()
        elif callable(weight) and not isinstance(weight, torch.Tensor):
            # torch's quantized modules unpack their weight; read already: its quantized form
            weight = read if _same_read(read) else weight()
        weight = flows.stored_weight(weight)  # through a wrapper (torchao's logger)
        if isinstance(weight, torch.Tensor) and weight.dim() > 1:
            steps = weight_steps(weight)
            if steps is not None:
                # a tensor subclass (torchao) as the weight comparison dequantized it
                same = read is not None and read.shape == weight.shape
                values = read if same else flows.comparable_weight(weight)
                values = values.dequantize() if values.is_quantized else values
                scale = flows.input_scale(module)
                if scale is not None:  # the weight the op stores: the one it reads, unscaled
                    values = values / flows.per_input_channel(scale, values)
                fan_in = math.prod(weight.shape[1:])  # subclasses index no row (torchao)
                return float(steps.mean()), fan_in, _energy64(values)
    return _functional_steps(region, pair)


def _same_read(read: torch.Tensor | None) -> bool:
    """Whether ``read`` can stand for a torch quantized module's ``weight()``: both are the
    same quantized tensor (:func:`fxnumeric.weights.pair_weights` calls ``weight()`` too)."""
    return isinstance(read, torch.Tensor) and read.is_quantized


def _weight_dequantizes(region: Any, pair: Any) -> Iterator[Any]:
    """The ``dequantize`` nodes producing the weights of a pair's functional quantized ops (an
    exported graph's), through plumbing, in chain order."""
    view = region.quant_view
    for node in region.chain(pair, "quant"):
        cls = view.op_class(node)
        source = flows.weight_input(node, cls.signature[0]) if cls is not None else None
        while source is not None and (c := view.op_class(source)) is not None and \
                c.role == "plumbing" and not c.is_dequantize and source.all_input_nodes:
            source = source.all_input_nodes[0]
        if source is not None and (c := view.op_class(source)) and c.is_dequantize:
            yield source


def _functional_steps(region: Any, pair: Any) -> tuple[float, int] | None:
    view = region.quant_view
    for source in _weight_dequantizes(region, pair):
        weight = evaluate_constant(source, view)
        scales = evaluate_constant(source.args[1], view) if len(source.args) > 1 else None
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or scales is None:
            continue
        squared = torch.as_tensor(scales, dtype=torch.float64) ** 2
        return (float(squared.mean()), math.prod(weight.shape[1:]),
                _energy64(weight))
    return None


def functional_weight_grid(region: Any, pair: Any) -> WeightGrid | None:
    """The grid the weight of a pair's functional quantized op is quantized on (a pt2e
    ``linear`` reading ``dequantize_per_tensor`` of its int8 weight), read from that
    ``dequantize``'s constants; ``None`` for a module's weight or a weight held in float."""
    for source in _weight_dequantizes(region, pair):
        grid = dequantize_grid(source, region.quant_view)
        if grid is not None:
            return grid
    return None


@dataclass(frozen=True)
class FloorState:
    """:class:`FloorSums`' sums over some batches, picklable, to merge those of several
    processes (:mod:`fxnumeric.distributed`)."""

    clip_noise: float = 0.0
    input_energy: float = 0.0
    input_count: int = 0
    input_steps: float = 0.0
    channel_error: torch.Tensor | None = None
    channel_count: int = 0
    channels_differ: bool = False
    """Batches gave outputs of different channel counts: no per-channel offset is measured
    (:meth:`FloorSums.update`)."""
    ranged_steps: float = 0.0
    """:attr:`FloorSums.ranged_steps`."""

    def __post_init__(self) -> None:
        # on the CPU whatever device the layer ran on: a pickled CUDA tensor comes back on
        # the device it left, and rank 0 of eight GPUs would add those of cuda:0 to cuda:7
        if self.channel_error is not None:
            object.__setattr__(self, "channel_error", self.channel_error.cpu())

    def merged(self, other: FloorState) -> FloorState:
        """Both states' batches: sums added, per-channel errors too; none once the two
        (or any batch of either) had other channel counts, as one process keeps them, in
        whatever order the batches came."""
        differ = self.channels_differ or other.channels_differ or (
            self.channel_error is not None and other.channel_error is not None
            and self.channel_error.shape != other.channel_error.shape)
        if differ:
            error, count = None, 0
        elif self.channel_error is None or other.channel_error is None:
            channel = self if self.channel_error is not None else other
            error, count = channel.channel_error, channel.channel_count
        else:
            error = self.channel_error + other.channel_error
            count = self.channel_count + other.channel_count
        return FloorState(self.clip_noise + other.clip_noise,
                          self.input_energy + other.input_energy,
                          self.input_count + other.input_count,
                          self.input_steps + other.input_steps, error, count, differ,
                          ranged_steps=self.ranged_steps + other.ranged_steps)


_CHUNK = 1 << 20


def _energy64(weight: torch.Tensor) -> float:
    """``sum(weight**2)`` in float64, a million values at a time: a float64 copy of a large
    weight and of its square at once (a quantize_dynamic lm_head, 49152 x 576: 450 MB) was
    compare's peak memory. Equal to the whole-tensor sum up to float64 addition order."""
    values = weight.detach().reshape(-1)
    return sum(float(values[start:start + _CHUNK].double().square().sum())
               for start in range(0, values.numel(), _CHUNK))

@dataclass
class FloorSums:
    """What a layer's floor and its verdict need, summed over batches (a few numbers per
    layer, plus one per output channel for the offset).

    Fed by the layer's shadow: the quantized output, the float twin's output and the input
    the twin read.
    """

    grid: QuantGrid | None = None
    dynamic: tuple[Any, ...] | None = None
    """How the layer rounds its input inside the op (:func:`fxnumeric.ops.dynamic_input`)."""
    input_scale: torch.Tensor | None = None
    """A factor per input channel the layer multiplies its input by before its quantized op
    (:func:`fxnumeric.flows.input_scale`): the input the sums read is scaled by it."""
    clip_noise: float = 0.0
    input_energy: float = 0.0
    input_count: int = 0
    input_steps: float = 0.0
    """Σ over calls and tokens of the squared step the input was quantized with."""
    ranged_steps: float = 0.0
    """For an input rounded on a fixed grid: what ``input_steps`` would be on a grid of as
    many steps over each call's own range (``±max|x|``), to tell a fixed scale that fits
    the values from one that does not."""
    channel_error: torch.Tensor | None = None
    channel_count: int = 0
    channels_differ: bool = False
    kind: str = ""
    """The layer's op kinds (``conv1d-relu``): where its output channels are
    (:func:`output_channel_dim`)."""
    window: tuple[Any, ...] | None = None
    """A conv's window (:func:`_window`): the input energy is then what its taps read, the
    padding's zeros included (``input_count`` counts taps): a 3x3 conv on a 1x1 map reads one
    live tap of nine, and its weight noise read 9 times too much (floor 31.7 dB against 35.2
    measured)."""

    @property
    def adds_over_rows(self) -> bool:
        """Whether an output's sums may be taken a block of rows at a time
        (:meth:`update_output`): its channels are its last dim at any rank (a linear's), so
        the rows (the leading dims, flattened) are what the per-channel error sums over."""
        return all(output_channel_dim(self.kind, n) == n - 1 for n in range(2, 6))

    def update(self, quant: torch.Tensor, ref: torch.Tensor, inputs: tuple[Any, ...]) -> None:
        """Add one call: ``quant`` (dequantized, as the shadow metrics read it) against the
        float twin ``ref``; ``inputs[0]`` is the activation the layer read."""
        self.update_input(inputs)
        self.update_output(quant, ref)

    def update_input(self, inputs: tuple[Any, ...]) -> None:
        """Add the input of one call (``inputs[0]``, the activation the layer read): its
        energy, and the steps a per-call quantize of it took. Read on the whole input: a
        per-tensor dynamic step is the range of the whole."""
        # read in the values' own precision, summed as metrics sum (fxnumeric.metrics.energy):
        # float64 copies of the output, its twin and their error (and of the input) made
        # this a third of compare on mobilenet_v2
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_floating_point():
            x = _scaled(inputs[0].detach(), self.input_scale)
            taps = _tap_energy(x, self.window) if self.window is not None else None
            if taps is not None:
                self.input_energy += taps[0]
                self.input_count += taps[1]
            else:
                self.input_energy += energy(x)
                self.input_count += x.numel()
            if self.dynamic is not None and x.numel():
                self.input_steps += _input_steps(x, *self.dynamic)
                if self.dynamic[0] == "fixed":
                    low, high = self.dynamic[2:]
                    levels = (high - low) / self.dynamic[1] - 1
                    self.ranged_steps += _input_steps(x, "tensor-symmetric", levels)

    def update_output(self, quant: torch.Tensor, ref: torch.Tensor) -> None:
        """Add the output of one call, or of a block of its rows (a Linear's shadow computed
        a block at a time, :class:`fxnumeric.instrument.graph.RowShadow`): every sum here is
        over output values (the clipping's noise), or over the dims other than the channel's
        (the signed error per channel, the last dim of a linear's), so the blocks' sums are
        the whole's, up to the order of additions."""
        if self.grid is not None:
            low, high = self.grid.bounds()
            lo, hi = aminmax(ref)
            if lo < low or hi > high:
                wide = _wide(ref)
                self.clip_noise += energy(wide - wide.clamp(low, high))
        if quant.shape == ref.shape and ref.dim() >= 2 and not self.channels_differ:
            # a signed sum per output channel over the other dims (torch sums float32
            # pairwise: relative 1e-8 here)
            channel = output_channel_dim(self.kind, ref.dim())
            others = tuple(d for d in range(ref.dim()) if d != channel)
            sums = (_wide(quant) - _wide(ref)).sum(dim=others).double()
            if not bool(sums.isfinite().all()):
                # float32 sums past 3.4e38 (a corrupted scale: weights of 1e38) read inf, and
                # the per-channel share of the error an "inf%": sum those again in float64
                sums = (quant.double() - ref.double()).sum(dim=others)
            if self.channel_error is not None and self.channel_error.shape != sums.shape:
                # no channel is one across these batches (the kind does not say where the
                # channels are, and the dim read varies: a sequence length): no offset. Kept
                # alike in any batch order, so data-parallel runs merge to the same
                self.channel_error, self.channel_count, self.channels_differ = None, 0, True
                return
            if self.channel_error is None:
                self.channel_error = sums
            else:
                self.channel_error += sums.to(self.channel_error.device)  # loaded: CPU
            self.channel_count += ref.numel() // ref.shape[channel]

    def state(self) -> FloorState:
        """The sums so far (:class:`FloorState`: the fields of that name)."""
        return FloorState(**{f.name: getattr(self, f.name) for f in fields(FloorState)})

    def load(self, state: FloorState) -> None:
        """Put sums back (those of several processes, merged)."""
        for f in fields(FloorState):
            setattr(self, f.name, getattr(state, f.name))

    def input_noise(self, weight_energy: float | None) -> float:
        """The output noise of the input's own rounding inside the op, through the weights."""
        if not self.input_steps or weight_energy is None:
            return 0.0
        return self.input_steps * weight_energy / 12

    def offset_noise(self) -> float:
        """Error power a constant per output channel explains (a lost bias, a zero point)."""
        if self.channel_error is None or not self.channel_count:
            return 0.0
        return float(self.channel_error.square().sum()) / self.channel_count

    def input_mean_square(self) -> float | None:
        return self.input_energy / self.input_count if self.input_count else None


def output_channel_dim(kind: str, ndim: int) -> int:
    """The dim of an ``ndim``-D output of an op of ``kind`` (``conv1d-relu``) holding its
    channels: dim 1 of a batched conv of any spatial rank, transposed or not (``(N, C, L)``,
    ``(N, C, H, W)``, ``(N, C, D, H, W)``; dim 0 unbatched) and of a batch norm; the last of
    a linear. An op whose kind does not say (an ``add``) is read as an image or volume of
    channels at dim 1 when 4-D or 5-D, else as features in the last dim.

    Example:
        >>> output_channel_dim("conv1d-relu", 3), output_channel_dim("linear", 3)
        (1, 2)
    """
    head = kind.split("-", 1)[0]
    spatial = re.fullmatch(r"conv(?:_transpose)?([123])d", head)
    if spatial:
        return max(ndim - int(spatial.group(1)) - 1, 0)
    if head == "batch_norm":
        return 1
    if head == "linear":
        return ndim - 1
    return 1 if ndim in (4, 5) else ndim - 1


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is in half precision (an error of bfloat16 values is not)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _tap_energy(x: torch.Tensor, window: tuple[Any, ...]) -> tuple[float, int] | None:
    """``(Σ over output positions and taps of x², how many (position, channel, tap) terms)``
    of a conv's window over its (batched) input ``x``, the zero padding included; ``None``
    where ``x`` is not a batched input of that rank.

    An input value is read by as many (output position, tap) pairs as windows cover it,
    which depends on its position alone, one spatial dim at a time (:func:`_coverage`): one
    pass over ``x`` (the energy at each position) and a weighted sum, not a window sum."""
    rank, kernel, stride, padding, dilation = window
    if x.dim() != rank + 2:
        return None
    covers = [_coverage(*spec) for spec in zip(x.shape[2:], kernel, stride, padding, dilation,
                                                strict=True)]
    if any(c is None for c in covers):
        return None
    power = x.float().square().sum(dim=(0, 1))  # the energy at each position
    weight = covers[0][0]
    for cover, _ in covers[1:]:
        weight = weight.unsqueeze(-1) * cover
    outputs = math.prod(count for _, count in covers)
    return (float((power.double() * weight.to(power.device)).sum()),
            x.shape[0] * outputs * x.shape[1] * math.prod(kernel))


@functools.lru_cache(maxsize=256)
def _coverage(length: int, kernel: int, stride: int, padding: Any, dilation: int,
              ) -> tuple[torch.Tensor, int] | None:
    """How many (output position, tap) pairs of a 1-D window read each of ``length`` input
    positions (float64), and how many output positions there are; ``None`` for a padding
    given by name."""
    if not isinstance(padding, int):
        return None
    outputs = (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if outputs <= 0:
        return None
    cover = torch.zeros(length, dtype=torch.float64)
    starts = torch.arange(outputs) * stride - padding
    for k in range(kernel):
        index = starts + k * dilation
        index = index[(index >= 0) & (index < length)]
        cover.index_add_(0, index, torch.ones(len(index), dtype=torch.float64))
    return cover, outputs


def _scaled(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` times a factor per channel of its last dim (or one factor), as a linear's op
    scales its input (torchao's ``act_pre_scale``); ``x`` when ``scale`` fits no such dim."""
    if scale is None or (scale.numel() != 1 and scale.numel() != x.shape[-1]):
        return x
    return x * scale.to(device=x.device, dtype=x.dtype).reshape(-1)


def _input_steps(x: torch.Tensor, granularity: str, levels: float, *fixed: float) -> float:
    """Σ over the tokens of ``x`` of the squared step it is rounded with (the maxima read
    in ``x``'s dtype, exactly; the steps in float64), for a granularity of
    :func:`fxnumeric.ops.dynamic_input`. On a fixed grid (``("fixed", step, low, high)``:
    ``levels`` is the step) each value's own rounding and clipping error ``e`` is known, and
    counts as ``12 e² / fan_in`` (the term is read through the weight's energy over 12,
    :meth:`FloorSums.input_noise`: ``‖W‖² / fan_in`` is its mean column's)."""
    rows = x.reshape(-1, x.shape[-1])
    if granularity == "token":
        return float(((2 * rows.abs().amax(dim=1).double()) / levels).square().sum())
    if granularity == "token-range":
        low = rows.amin(dim=1).clamp(max=0).double()
        high = rows.amax(dim=1).clamp(min=0).double()
        return float(((high - low) / levels).square().sum())
    if granularity == "fixed":  # the grid is known: each value's own error, exactly
        low, high = fixed
        wide = _wide(rows)
        integers = (wide / levels).round().clamp(round(low / levels + 0.5),
                                                 round(high / levels - 0.5))
        return 12 * energy(wide - integers * levels) / x.shape[-1]
    tokens = rows.shape[0]
    if granularity == "tensor-symmetric":
        return tokens * (2 * float(x.abs().max()) / levels) ** 2
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    return tokens * ((high - low) / levels) ** 2


def output_rounding(count: int, grid: QuantGrid, signal: float | None = None) -> float:
    """The noise rounding ``count`` output values of energy ``signal`` onto ``grid`` adds:
    ``step² / 12`` per value, but never more than ``signal``. Zero is on the grid (an affine
    grid holds it exactly), so rounding moves a value by no more than the value itself: a
    step coarser than the values rounds them to zero, an SQNR of 0 dB, not the -20 dB that
    ``step² / 12`` reads for a step 35 times their RMS."""
    rounding = count * grid.scale ** 2 / 12
    return rounding if signal is None else min(rounding, signal)


def floor_noise(count: int, *, grid: QuantGrid | None = None, clip_noise: float = 0.0,
                weight_step_sq: float | None = None, fan_in: int | None = None,
                input_mean_square: float | None = None, input_noise: float = 0.0,
                signal: float | None = None) -> float | None:
    """The noise power (summed over ``count`` outputs of energy ``signal``) a layer's grids
    allow; ``None`` when no grid of it is known (see :func:`floor_sqnr`)."""
    noise = clip_noise + input_noise
    known = input_noise > 0
    if grid is not None:
        noise += output_rounding(count, grid, signal)
        known = True
    if weight_step_sq is not None and fan_in and input_mean_square is not None:
        noise += count * fan_in * input_mean_square * weight_step_sq / 12
        known = True
    return noise if known and count else None


def floor_sqnr(signal: float, count: int, *, grid: QuantGrid | None = None,
               clip_noise: float = 0.0, weight_step_sq: float | None = None,
               fan_in: int | None = None, input_mean_square: float | None = None,
               input_noise: float = 0.0) -> float | None:
    """The SQNR (dB) a layer's own grids allow, over ``count`` output values of energy
    ``signal`` (see the module docstring); ``None`` when no grid of it is known.

    >>> round(floor_sqnr(1000.0, 1000, grid=QuantGrid(0.01, 0, -128, 127)), 2)  # rms 1, step 0.01
    50.79
    >>> floor_sqnr(1000.0, 1000, grid=QuantGrid(10.0, 0, -128, 127))  # step 10x the rms: all 0
    0.0
    """
    noise = floor_noise(count, grid=grid, clip_noise=clip_noise, weight_step_sq=weight_step_sq,
                        fan_in=fan_in, input_mean_square=input_mean_square,
                        input_noise=input_noise, signal=signal)
    if noise is None:
        return None
    return db(signal, noise)


@dataclass(frozen=True)
class FloorVerdict:
    """A layer's shadow SQNR against its floor.

    Attributes:
        state: ``"below"`` (broken: more than :data:`FLOOR_MARGIN_DB` under its floor),
            ``"at"`` (within :data:`AT_FLOOR_DB`: as good as its grids allow) or ``"above"``
            (between, or better than the noise model expects).
        cause: ``"offset"`` (below its floor, and most of its error is a constant per output
            channel: a lost bias, a wrong zero point), ``"scale"`` (below its floor
            otherwise: its error exceeds what its steps allow), ``"clipping"`` (not below,
            but most of what its floor allows is clipping: its output range is too narrow) or
            ``"coarse"`` (not below: its output step is coarser than its values, which round
            to zero or near it) or ``"input"`` (not below, but most of what its floor allows is
            its input's rounding and clipping on a grid fixed at conversion: a static
            activation scale, too coarse or too narrow for the values);
            ``""`` when its floor is rounding (more bits, not a fix, would help).
        text: one sentence for a person.
    """

    state: str
    cause: str = ""
    text: str = ""


def judge(shadow_sqnr: float | None, floor: float | None, *, clip_share: float = 0.0,
          offset_share: float = 0.0, coarse: str = "", fixed_input: str = "",
          ) -> FloorVerdict | None:
    """Place a layer against its floor; ``None`` when either number is missing, NaN, or the
    shadow SQNR is ``-inf`` (Inf in the quantized output, or no float signal: a gap from that
    measures no scale, and the report says where NaN/Inf appears instead).

    Args:
        shadow_sqnr: the layer's measured local SQNR (dB).
        floor: its floor (dB).
        clip_share: the fraction of its floor's noise that is clipping.
        offset_share: the fraction of its measured error power that a constant per output
            channel explains.
        coarse: when its output step is too coarse for its values (its rounding is capped at
            their energy, :func:`output_rounding`), the step against their RMS, for the text.
        fixed_input: when most of its floor's noise is its input's rounding on a grid fixed
            at conversion (a static activation scale), that grid's step and share, for the text.

    >>> judge(20.0, 40.0, offset_share=0.9).cause
    'offset'
    >>> judge(39.0, 40.0).state, judge(39.0, 40.0, clip_share=0.8).cause
    ('at', 'clipping')
    """
    if shadow_sqnr is None or floor is None or math.isnan(floor) or not shadow_sqnr > -math.inf:
        return None
    gap = floor - shadow_sqnr
    if gap > FLOOR_MARGIN_DB:
        if offset_share > 0.5:
            return FloorVerdict("below", "offset", (
                f"{gap:.1f} dB below its floor, and {100 * offset_share:.0f}% of its error is a "
                "constant per output channel: a lost bias or a wrong zero point"))
        return FloorVerdict("below", "scale", (
            f"{gap:.1f} dB below its floor: its error exceeds what its steps allow (a wrong "
            "scale, for the output or the weights)"))
    state = "at" if abs(gap) <= AT_FLOOR_DB else "above"
    if coarse:
        return FloorVerdict(state, "coarse", (
            f"its output step is too coarse for its values ({coarse}): it rounds them to zero "
            "or near it (a scale held up by a lower bound, as an observer's eps, or "
            "calibrated on larger values)"))
    if fixed_input:
        return FloorVerdict(state, "input", (
            f"its input is rounded on a grid fixed at conversion ({fixed_input}), and most of "
            "what its floor allows is that rounding and its clipping: a static activation "
            "scale too coarse or too narrow for its values (recalibrate it on representative "
            "data)"))
    if clip_share > 0.5:
        return FloorVerdict(state, "clipping", (
            f"{100 * clip_share:.0f}% of what its floor allows is clipping: its output range is "
            "too narrow for its values (recalibrate on representative data)"))
    if state == "at":
        return FloorVerdict("at", "", "at its floor: as good as its grids allow (more bits, "
                                      "not a fix, would help)")
    return FloorVerdict(state)


def unexplained(cause: str, weight_sqnr: float | None, local_sqnr: float | None) -> bool:
    """Whether a layer below its floor for no offset (``cause`` ``"scale"``, :func:`judge`)
    has weights that dequantize more than :data:`FLOOR_MARGIN_DB` above the error it adds: its
    weights do not explain the gap, nor do its scales, which the floor is computed from; the
    quantized op computes something other than its float twin (torch's x86 quantized
    ``ConvTranspose1d``: -2.5 dB against a floor of 35.9 dB, weights at 47.9 dB).

    >>> unexplained("scale", 47.9, -2.5), unexplained("scale", 30.0, 28.0)
    (True, False)
    """
    return (cause == "scale" and weight_sqnr is not None and local_sqnr is not None
            and weight_sqnr - local_sqnr > FLOOR_MARGIN_DB)


def floor_sums(region: Any, pair: Any) -> FloorSums:
    """The sums of a layer's floor, with what its graph says: its output grid (the quantize
    after it in reference FX and pt2e graphs; a quantized tensor's own grid is read when it is
    computed) and how it quantizes its input per call (dynamic quantization)."""
    module = layer_module(region, pair)
    dynamic = dynamic_input(module) if module is not None else None
    return FloorSums(grid_before(region.quant_view, region.output_nodes(pair)[1]),
                     dynamic or _graph_dynamic_input(region, pair), kind=pair.kind,
                     window=_window(module) if module is not None else None,
                     input_scale=flows.input_scale(module) if module is not None else None)


def _graph_dynamic_input(region: Any, pair: Any) -> tuple[str, float] | None:
    """How the graph quantizes a layer's input per call in front of it, as
    :func:`fxnumeric.ops.dynamic_input` answers for a module: a pt2e dynamic quantize
    (``choose_qparams.tensor``, then ``quantize_per_tensor.tensor(x, scale, zero_point,
    quant_min, quant_max, dtype)``: the range of ``x`` and 0 over ``quant_max - quant_min``
    steps), or a reference FX graph's ``torch.quantize_per_tensor_dynamic(x, dtype,
    reduce_range)``. The layer's shadow reads the value before it (it owns that rounding);
    without it in the floor, a dynamic pt2e Linear read 14.6 dB below a floor it was at."""
    qv = region.quant_view
    for node in region.chain(pair, "quant"):
        for read in node.all_input_nodes:
            if not is_dequantize(qv, read) or not read.all_input_nodes:
                continue
            quantize = read.all_input_nodes[0]
            if not qv.is_dynamic_quantize(quantize):
                continue
            name = getattr(quantize.target, "__name__", "")
            if name == "quantize_per_tensor_dynamic":
                dtype, reduce = (list(quantize.args[1:3]) + [False])[:2]
                levels = QRANGE.get(dtype, (0, 255))
                return "tensor", float((levels[1] - levels[0]) // (2 if reduce else 1))
            bounds = quantize.args[3:5]
            if name.startswith("quantize_per_tensor") and all(isinstance(b, int) for b in bounds):
                return "tensor", float(bounds[1] - bounds[0])
    return None


def layer_floor(region: Any, pair: Any, sums: FloorSums, *, signal: float, noise: float,
                count: int, read: torch.Tensor | None = None,
                ) -> tuple[float | None, FloorVerdict | None]:
    """A layer's floor SQNR and its verdict, from its sums and its measured local error
    (``signal``: energy of the float twin's output; ``noise``: of the error; ``count``
    values); ``read``: its quantized weight if read already (:func:`layer_weight_steps`)."""
    if not count:
        return None, None
    steps = layer_weight_steps(region, pair, read)
    step_sq, fan_in, weight_energy = steps if steps is not None else (None, None, None)
    grids = {"grid": sums.grid, "clip_noise": sums.clip_noise, "weight_step_sq": step_sq,
             "fan_in": fan_in, "input_mean_square": sums.input_mean_square(),
             "input_noise": sums.input_noise(weight_energy)}
    floor = floor_sqnr(signal, count, **grids)
    if floor is None:
        return None, None
    allowed = floor_noise(count, **grids, signal=signal)
    local = db(signal, noise)
    grid = sums.grid
    coarse = (f"step {grid.scale:.3g} against an RMS of {math.sqrt(signal / count):.3g}"
              if grid is not None and output_rounding(count, grid) >= signal else "")
    fixed = ""
    if sums.dynamic is not None and sums.dynamic[0] == "fixed" and allowed:
        share = grids["input_noise"] / allowed
        # a fixed scale costing 6 dB more than each call's own range would: it does not fit
        if share > 0.5 and sums.input_steps > 4 * sums.ranged_steps:
            fixed = f"step {sums.dynamic[1]:.3g}, {100 * share:.0f}% of its floor's noise"
    verdict = judge(local, floor, clip_share=sums.clip_noise / allowed if allowed else 0.0,
                    offset_share=sums.offset_noise() / noise if noise else 0.0, coarse=coarse,
                    fixed_input=fixed)
    return floor, verdict
