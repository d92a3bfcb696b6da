"""Metrics between a reference (float) tensor and an actual (quantized) one.

Every metric takes ``(ref, actual)``. Each batch is reduced to a few sums (signal and noise
energy, the actual tensor's energy, the largest error) and the sums are accumulated over
batches in float64, so the value for 500 batches is exact, not an average of per-batch
values, and memory does not grow with the number of batches.

The per-batch reductions run in ``precision`` (float32 by default, the precision of the
activations themselves; relative error of a sum of squares about 1e-6 at any size,
:func:`energy`, far below what moves an SQNR in dB): a float64 pass over every activation
costs about six times as much (4.0 against 0.6 ms for a 32x112x112 output on one core) and
made :func:`fxnumeric.compare` several times slower than the models it compares. Pass
``precision=torch.float64`` for float64 throughout.

Accumulators filled in separate processes (data-parallel :func:`fxnumeric.compare`, one share of
the batches per rank) combine exactly: :meth:`Accumulator.state` is a picklable snapshot of the
sums, :meth:`AccumulatorState.merged` adds two (maxima by ``max``, the per-batch spread by the
parallel-variance formula of Chan, Golub and LeVeque), :meth:`Accumulator.load` puts the result
back. Merged in any grouping, the sums equal one accumulator's that saw every batch, up to the
order of float64 additions (relative 1e-16).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import rows as linear_rows
from .errors import InputError, InternalError

__all__ = [
    "sqnr", "cosine", "mse", "max_abs_error", "MetricFn", "Accumulator", "BUILTIN_METRICS",
    "prepare_actual", "Spread", "AccumulatorState", "WelfordState", "aminmax",
    "histogram_counts", "energy", "db", "rounding_sqnr", "ROUNDING_MARGIN_BITS",
    "ROUNDING_SQNR_DB", "TWIN_WEIGHT_SQNR_DB", "PRECISIONS", "check_precision",
]

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
"""A user metric, called as ``fn(ref, actual)`` with float64 tensors; returns a float. A
complex value comes as its (real, imaginary) pairs (:func:`torch.view_as_real`: a last
dimension of 2)."""

BUILTIN_METRICS = ("sqnr", "cosine", "mse", "max_abs_error")

PRECISIONS = (torch.float32, torch.float64)
"""The dtypes the per-batch reductions may run in (``precision``). Not float16 or bfloat16:
both activations would be rounded to it before their difference is taken, and an error
below about 50 dB (bfloat16) or 60 dB (float16) drowns in that rounding (a float32 model's
shadow SQNR of 73.6 dB read 60.6 dB with ``precision=torch.bfloat16``); half-precision
activations are read in float32 with the default."""


def check_precision(precision: Any) -> None:
    """Raise :class:`InputError` unless ``precision`` is one of :data:`PRECISIONS`.

    >>> check_precision(torch.bfloat16)
    Traceback (most recent call last):
    ...
    fxnumeric.errors.InputError: precision=torch.bfloat16: pass torch.float32 (the default; ...
    """
    if any(precision is p for p in PRECISIONS):
        return
    raise InputError(
        f"precision={precision!r}: pass torch.float32 (the default; float16 and bfloat16 "
        "activations are read in float32 too) or torch.float64 (exact, about six times "
        "slower). precision is the dtype the per-batch sums are reduced in, not the models' "
        "dtype: in a half-precision or integer dtype the error between the models would be "
        "rounded away or not computed at all")


def _as_float(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` dequantized and, if it is not already, in ``dtype`` (layout kept: no copy). A
    complex tensor is read as its (real, imaginary) pairs (:func:`torch.view_as_real`, a last
    dimension of 2): its energy is ``sum(|z|^2)``, no part dropped."""
    if x.is_quantized:
        x = x.dequantize()
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x.resolve_conj())
    return x if x.dtype == dtype else x.to(dtype)


def _both_complex(ref: torch.Tensor, actual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref`` and ``actual``, complex both when either is (a real one's imaginary part 0)."""
    if ref.is_complex() == actual.is_complex():
        return ref, actual
    real, other = (actual, ref) if ref.is_complex() else (ref, actual)
    real = (real.dequantize() if real.is_quantized else real).detach().to(other.dtype)
    return (other, real) if ref.is_complex() else (real, other)


_ROW = 4096
_ONE_NORM = 1 << 16  # up to this many values one norm is within 1e-6


def energy(x: torch.Tensor) -> float:
    """``sum(x**2)`` of a float tensor to about 1e-6 relative, whatever its size, in its own
    precision (float16 and bfloat16 are read as float32).

    One ``vector_norm`` of a whole float32 tensor accumulates in float32 lanes and loses
    precision with size: relative 2e-5 at a million values, 1e-3 at 12.8 million (a
    32x32x112x112 activation), against float64. Norms of rows of 4096 values in memory order,
    and the norm of those norms, stay within 1e-6 (1e-8 on most data) and run as fast (1.8 ms
    for 12.8 million values on one core), with no temporary the size of ``x``
    (``(x * x).sum()`` is as exact but allocates one: 27 ms at that size). A tensor with gaps
    (a slice) is copied first.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    total = _energy(x)
    if math.isinf(total) and x.dtype != torch.float64 and bool(torch.isfinite(x).all()):
        # finite values past 1.8e19 square beyond float32: read in float64, a chunk at a time
        flat = x.reshape(-1)
        total = math.fsum(_energy(chunk.double()) for chunk in flat.split(_ONE_NORM))
    return total


def _energy(x: torch.Tensor) -> float:
    if x.numel() <= _ONE_NORM:
        return float(torch.linalg.vector_norm(x)) ** 2
    flat = _dense_view(x)
    if flat is None:
        flat = x.contiguous().view(-1)
    whole = flat.numel() // _ROW * _ROW
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, _ROW), dim=1)
    total = float(torch.linalg.vector_norm(rows)) ** 2  # a few thousand rows at most
    if whole < flat.numel():
        total += float(torch.linalg.vector_norm(flat[whole:])) ** 2
    return total


_UPDATE_CHUNK = 1 << 22
"""Values past which a tensor's sums are taken a chunk at a time. An LLM's logits (512 tokens
x 49152 words: 96 MiB in float32) are read so: a whole-tensor error, and the float32 copies
of bfloat16 logits, added three logits' worth to compare's peak memory."""

_CHUNK = 1 << 20
"""Values per chunk (4 MiB in float32)."""


_CANCELLATION = 1e-3
"""Below this fraction of ``signal + actual energy + noise``, ``sum(ref * actual)`` read from
the three sums keeps fewer than three digits (each sum is exact to about 1e-6): it is summed
directly instead (:func:`_dot`)."""


def _dot(ref: torch.Tensor, actual: torch.Tensor, signal: float, actual_energy: float,
         noise: float, precision: torch.dtype) -> float:
    """``sum(ref * actual)``: from the energies, ``(signal + actual_energy - noise) / 2``, at
    no cost, where that keeps its digits; summed in float64 where the three nearly cancel
    (an actual output far smaller than the float one: input far outside the calibrated range
    clips it; read from the energies a cosine of 0.77 read 2e-8)."""
    total = signal + actual_energy + noise
    dot = (signal + actual_energy - noise) / 2
    if not math.isfinite(total) or abs(dot) >= _CANCELLATION * total:
        return dot
    if _by_chunks(ref, actual, precision):
        pairs = zip(_chunks(ref, precision), _chunks(actual, precision), strict=True)
        return math.fsum(float(torch.dot(r.double(), a.double())) for r, a in pairs)
    r, a = _as_float(ref, torch.float64), _as_float(actual, torch.float64)
    return float(torch.dot(r.reshape(-1), a.reshape(-1)))


def _chunked(x: torch.Tensor) -> bool:
    """Whether ``x``'s sums are taken a chunk at a time: large, contiguous, not quantized."""
    return x.numel() > _UPDATE_CHUNK and not x.is_quantized and x.is_contiguous()


def _by_chunks(ref: torch.Tensor, actual: torch.Tensor, precision: torch.dtype) -> bool:
    """Whether one update's sums are taken a chunk at a time: both large (:func:`_chunked`),
    or both past :data:`_CHUNK` values where reading them whole would copy either into
    ``precision`` (one block of the rows of a 512-token SmolLM2's bfloat16 logits, 4.2M
    values, read whole made two float32 copies and their error: 48 MiB; by chunks, the RSS
    while the logits are read went from 136-151 to 105-113 MiB above compare's start)."""
    if _chunked(ref) and _chunked(actual):
        return True
    return (ref.numel() > _CHUNK and (ref.dtype != precision or actual.dtype != precision)
            and all(not x.is_quantized and x.is_contiguous() for x in (ref, actual)))


def _chunks(x: torch.Tensor, precision: torch.dtype) -> Iterator[torch.Tensor]:
    """``x``'s values in memory order, a chunk at a time, each in ``precision``.

    A chunk that needs converting is written into one buffer, reused for the next chunk (read
    each chunk before asking for the next). A new tensor per chunk was not memory reused: in
    the thread that runs the quantized model in turns (:mod:`fxnumeric.lockstep`), glibc's
    per-thread heap kept each chunk's pages, so that one comparison of a 512-token
    SmolLM2's bfloat16 logits added 112 MiB to compare's peak.
    """
    flat = x.detach()
    if flat.is_complex():  # (real, imaginary) pairs, as _as_float reads it
        flat = torch.view_as_real(flat.resolve_conj())
    flat = flat.reshape(-1)
    buffer: torch.Tensor | None = None
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if chunk.dtype == precision:
            yield chunk
            continue
        if buffer is None:
            buffer = torch.empty(chunk.numel(), dtype=precision, device=chunk.device)
        out = buffer[:chunk.numel()]
        out.copy_(chunk)  # as chunk.to(precision)
        yield out


def prepare_actual(actual: torch.Tensor, precision: torch.dtype) -> tuple[torch.Tensor, float]:
    """``actual`` as :class:`Accumulator` reads it (dequantized, in ``precision``) and its
    energy, for an actual tensor compared with several references. A large tensor is kept as
    it is (:meth:`Accumulator.update` reads it a chunk at a time), its energy summed by
    chunks."""
    if _discrete(actual):
        return actual.detach(), 0.0  # a mask: Accumulator.update leaves it out
    if actual.is_complex():  # kept complex: Accumulator.update reads it by (real, imaginary)
        return actual.detach(), energy(_as_float(actual, precision))
    if _chunked(actual):
        return actual.detach(), math.fsum(energy(c) for c in _chunks(actual, precision))
    a = _as_float(actual, precision)
    return a, energy(a)


def _dense_view(x: torch.Tensor) -> torch.Tensor | None:
    """``x``'s values as a 1-D view in memory order, or ``None`` if ``x`` has gaps."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(-1)
    order = sorted(range(x.dim()), key=lambda d: (-x.stride(d), -x.shape[d]))
    dense = x.permute(order)
    return dense.view(-1) if dense.is_contiguous() else None


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values as a 1-D tensor in memory order (a view unless ``x`` has gaps).

    A whole-tensor reduction through a channels-last tensor's logical order is ten times
    slower than through its memory (``aminmax`` of a 96x112x112 activation: 1.15 against
    0.13 ms); the order of the values does not matter to a minimum or a histogram.
    """
    flat = _dense_view(x)
    return flat if flat is not None else x.reshape(-1)


def aminmax(x: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of a non-empty tensor, read in memory order (exact in any order)."""
    low, high = torch.aminmax(_memory_order(x))
    return float(low), float(high)


_HISTOGRAM_CHUNK = 1 << 18
_HALF_OR_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT32_MAX = torch.finfo(torch.float32).max


def histogram_counts(x: torch.Tensor, bins: int, low: float, high: float) -> list[int]:
    """``torch.histc(x.float(), bins, low, high)`` as integers, bit for bit, for a float32,
    bfloat16 or float16 ``x`` whose values all lie in ``[low, high]`` (``low < high``;
    anything else goes to histc), read a chunk at a time (no float32 copy of ``x``).

    histc is a scalar loop (about 10 ns a value: 0.3 s for SmolLM2's 49152 x 576 embedding,
    2.7 s for all its weights); this computes histc's own bin index,
    ``int((x - low) * bins / (high - low))`` in float32 with the top edge in the last bin,
    with vector ops, and counts a chunk at a time (no index tensor the size of the weight).
    A range so wide that ``(high - low) * bins`` passes float32's largest value (weights of
    1e38 behind a corrupted scale) is binned in float64 instead, where histc itself overflows
    and puts every value in the first bin.

    >>> histogram_counts(torch.tensor([0.0, 0.5, 1.0, 0.25]), 2, 0.0, 1.0)
    [2, 2]
    """
    values = _memory_order(x.detach())
    # histc's width is high - low in the tensor's dtype
    width = float(torch.tensor(high, dtype=torch.float32) - torch.tensor(low, dtype=torch.float32))
    if values.dtype not in _HALF_OR_FLOAT or not (math.isfinite(low) and math.isfinite(high)):
        return [int(c) for c in torch.histc(values.float(), bins, low, high)]
    if not width * bins <= _FLOAT32_MAX:
        # a range past 1e36 (a corrupted scale): ``(x - low) * bins`` overflows float32 to inf,
        # histc's too (every value lands in bin 0); float64 bins them where they are
        index = ((values.double() - low) * (bins / (high - low))).long().clamp_(0, bins - 1)
        return torch.bincount(index.reshape(-1), minlength=bins).tolist()
    total = torch.zeros(bins, dtype=torch.int64)
    chunk = min(values.numel(), _HISTOGRAM_CHUNK)
    scaled = torch.empty(chunk)
    index = torch.empty(chunk, dtype=torch.int32)
    for start in range(0, values.numel(), chunk):
        part = values[start:start + chunk]
        s, i = scaled[:part.numel()], index[:part.numel()]
        s.copy_(part)  # bfloat16 and float16 are read as float32, exactly, as .float() would
        s.sub_(low).mul_(float(bins)).div_(width)
        i.copy_(s)  # truncation toward zero, as histc's static_cast
        total += torch.bincount(i.clamp_(max=bins - 1), minlength=bins)
    return total.tolist()


def db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` of two energies (sums of squares): ``inf`` without noise,
    ``-inf`` without signal or for infinite noise beside a finite signal, ``nan`` when either
    is NaN or both are infinite.

    >>> db(100.0, 1.0), db(1.0, 0.0), db(0.0, 1.0), db(1.0, math.inf)
    (20.0, inf, -inf, -inf)
    """
    if math.isnan(signal) or math.isnan(noise) or (math.isinf(signal) and math.isinf(noise)):
        return math.nan
    if noise == 0:
        return math.inf
    ratio = signal / noise
    if ratio == 0:  # no signal, infinite noise, or a quotient below float64's range
        return -math.inf
    return 10.0 * math.log10(ratio)


ROUNDING_MARGIN_BITS = 4
"""How many bits below a dtype's precision an error must reach to be more than rounding."""


def rounding_sqnr(dtype: torch.dtype = torch.float32) -> float:
    """The SQNR (dB) above which two tensors of ``dtype`` differ by rounding alone, not error.

    ``20 log10(1 / eps) - 20 log10(2 ** ROUNDING_MARGIN_BITS)``, ``eps`` being
    ``torch.finfo(dtype).eps``: an error whose RMS is 16 units of the dtype's precision
    (``eps``, 1.2e-7 for float32) against the signal's. One rounding of each value reads about
    149 dB in float32 (RMS ``eps / (2 sqrt 3)``); a dot product of ``K`` terms summed in another
    order (another kernel, fp16 weights that hold the float weights exactly) adds about
    ``10 log10 K`` dB of rounding more, so a margin of 4 bits (24 dB) keeps sums over some
    thousand terms above it. No 8- or 16-bit quantization comes near: int8 reads 30-50 dB,
    int16 and float16 below 100 dB.

    >>> round(rounding_sqnr(), 1), round(rounding_sqnr(torch.float64), 1)
    (114.4, 289.0)
    """
    return -20.0 * math.log10(torch.finfo(dtype).eps) - 20.0 * math.log10(
        2.0 ** ROUNDING_MARGIN_BITS)


ROUNDING_SQNR_DB = rounding_sqnr(torch.float32)
"""Float32's :func:`rounding_sqnr` (114.4 dB): the precision activations are compared in."""

TWIN_WEIGHT_SQNR_DB = 0.0
"""Weight SQNR (dB) below which a quantized weight is not a copy of a float weight: the error
is larger than the weight. Quantizing a weight reads well above (about 6 dB a bit: int8 near
40 dB, int4 near 20, 2 bits still above 10); another tensor of the same shape and scale reads
about -3 dB (the difference of two independent weights has twice the energy of one). Pairing
reads it to tell a quantized layer's float twin (:mod:`fxnumeric.pairing`), the verdict to
call a pairing suspect (:mod:`fxnumeric.report.verdict`)."""


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref-actual)^2))``.

    ``inf`` when the tensors are identical, ``-inf`` for a zero signal with nonzero noise,
    ``nan`` when either holds NaN.

    >>> sqnr(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    inf
    >>> round(sqnr(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])), 2)
    20.0
    """
    return _one("sqnr", ref, actual)


def cosine(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 for two zero tensors)."""
    return _one("cosine", ref, actual)


def mse(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Mean squared error."""
    return _one("mse", ref, actual)


def max_abs_error(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Largest absolute difference."""
    return _one("max_abs_error", ref, actual)


def _one(metric: str, ref: torch.Tensor, actual: torch.Tensor) -> float:
    """``metric`` of one pair of tensors, in float64 throughout."""
    acc = Accumulator(precision=torch.float64)
    acc.update(ref, actual)
    return acc.value(metric)


@dataclass(frozen=True)
class Spread:
    """How a metric in dB varies from batch to batch: the SQNR of each batch on its own.

    The pooled value of a report (all batches' sums together) is the number to read; the
    spread says how far it can be trusted. ``stderr`` is the standard error of the mean of the
    per-batch values, the noise of a comparison between two layers.

    Attributes:
        mean: mean of the per-batch values, in dB.
        std: their sample standard deviation (``nan`` with one batch: no spread is known).
        low: the lowest per-batch value.
        high: the highest per-batch value.
        batches: how many batches had a finite value (an exact batch, ``inf`` dB, is left out).

    Example:
        >>> s = Spread(mean=30.0, std=0.4, low=29.6, high=30.4, batches=4)
        >>> s.stderr, s.known
        (0.2, True)
    """

    mean: float
    std: float
    low: float
    high: float
    batches: int

    @property
    def known(self) -> bool:
        """Whether there are two batches or more, so that ``std`` means something."""
        return self.batches >= 2

    @property
    def stderr(self) -> float:
        """``std / sqrt(batches)``; ``nan`` with one batch."""
        return self.std / math.sqrt(self.batches) if self.known else math.nan


@dataclass(frozen=True)
class WelfordState:
    """A running mean and variance as numbers: count, mean, sum of squared deviations
    (``m2``), lowest and highest value.

    Example:
        >>> a, b = WelfordState(2, 1.0, 2.0, 0.0, 2.0), WelfordState(1, 4.0, 0.0, 4.0, 4.0)
        >>> a.merged(b)  # the values 0, 2 and 4
        WelfordState(n=3, mean=2.0, m2=8.0, low=0.0, high=4.0)
    """

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def merged(self, other: WelfordState) -> WelfordState:
        """Both sets of values together (Chan, Golub and LeVeque's pairwise update)."""
        if not other.n:
            return self
        if not self.n:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        return WelfordState(n, self.mean + delta * other.n / n,
                            self.m2 + other.m2 + delta * delta * self.n * other.n / n,
                            min(self.low, other.low), max(self.high, other.high))


class _Welford:
    """Running mean and variance (Welford, 1962: stable in one pass) plus min and max."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.low = math.inf
        self.high = -math.inf

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)
        self.low, self.high = min(self.low, x), max(self.high, x)

    def spread(self) -> Spread | None:
        if not self.n:
            return None
        std = math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else math.nan
        return Spread(self.mean, std, self.low, self.high, self.n)

    def state(self) -> WelfordState:
        return WelfordState(self.n, self.mean, self.m2, self.low, self.high)

    def load(self, state: WelfordState) -> None:
        self.n, self.mean, self.m2 = state.n, state.mean, state.m2
        self.low, self.high = state.low, state.high


def _max_nan(a: float, b: float) -> float:
    """``max`` in which NaN wins, as :meth:`Accumulator.update` keeps ``max_abs``."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _min_nan(a: float, b: float) -> float:
    """``min`` in which NaN wins."""
    return math.nan if math.isnan(a) or math.isnan(b) else min(a, b)


@dataclass(frozen=True)
class AccumulatorState:
    """Everything an :class:`Accumulator` has summed, as plain numbers (picklable, no tensors).

    Taken with :meth:`Accumulator.state` between batches, combined with :meth:`merged` and put
    back with :meth:`Accumulator.load`. Raw tensors kept with ``keep=True`` are not part of it.
    """

    signal: float = 0.0
    noise: float = 0.0
    dot: float = 0.0
    actual_energy: float = 0.0
    count: int = 0
    max_abs: float = 0.0
    batches: int = 0
    nonfinite_batches: int = 0
    ref_nonfinite: int = 0
    actual_nonfinite: int = 0
    custom_sums: tuple[tuple[str, float], ...] = ()
    sqnr_spread: WelfordState = WelfordState()
    shape_mismatch: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    shape_mismatch_batch: int = -1
    """The index of the batch ``shape_mismatch`` was seen in (:meth:`Accumulator.end_batch`),
    -1 when not told."""
    discrete: bool = False
    overwritten: int = 0
    misrouted: int = 0
    discrete_values: int = 0
    discrete_differ: int = 0
    non_tensor: str = ""
    """The type of a value seen that is not a tensor on one side or both (``"float"``,
    ``"NoneType"``): an op on Python values, ``""`` when none was seen."""

    def merged(self, other: AccumulatorState) -> AccumulatorState:
        """The sums over both states' batches: totals add, ``max_abs`` is the larger (NaN if
        either is), the spread combines, a shape mismatch is the one of the later batch (by
        the index given to :meth:`Accumulator.end_batch`; ``other``'s when neither was told),
        as one accumulator fed both states' batches in their order keeps the last it saw.

        Example:
            >>> a, b = Accumulator(), Accumulator()
            >>> a.update(torch.tensor([3.0]), torch.tensor([2.0]))
            >>> b.update(torch.tensor([4.0]), torch.tensor([4.5]))
            >>> both = Accumulator()
            >>> both.load(a.state().merged(b.state()))
            >>> round(both.value("sqnr"), 4), both.value("max_abs_error"), both.batches
            (13.0103, 1.0, 2)
        """
        custom = dict(self.custom_sums)
        for name, total in other.custom_sums:
            custom[name] = custom.get(name, 0.0) + total
        return AccumulatorState(
            signal=self.signal + other.signal,
            noise=self.noise + other.noise,
            dot=self.dot + other.dot,
            actual_energy=self.actual_energy + other.actual_energy,
            count=self.count + other.count,
            max_abs=_max_nan(self.max_abs, other.max_abs),
            batches=self.batches + other.batches,
            nonfinite_batches=self.nonfinite_batches + other.nonfinite_batches,
            ref_nonfinite=self.ref_nonfinite + other.ref_nonfinite,
            actual_nonfinite=self.actual_nonfinite + other.actual_nonfinite,
            custom_sums=tuple(custom.items()),
            sqnr_spread=self.sqnr_spread.merged(other.sqnr_spread),
            **_later_shape_mismatch(self, other),
            discrete=self.discrete or other.discrete,
            overwritten=self.overwritten + other.overwritten,
            misrouted=self.misrouted + other.misrouted,
            discrete_values=self.discrete_values + other.discrete_values,
            discrete_differ=self.discrete_differ + other.discrete_differ,
            non_tensor=self.non_tensor or other.non_tensor,
        )


def _later_shape_mismatch(a: AccumulatorState, b: AccumulatorState) -> dict[str, Any]:
    """The shape mismatch of the later batch of ``a`` and ``b`` (``b``'s on a tie: ``a``'s
    batches came first), as :class:`AccumulatorState` fields."""
    later = (b if b.shape_mismatch and (not a.shape_mismatch
                                        or b.shape_mismatch_batch >= a.shape_mismatch_batch)
             else a)
    return {"shape_mismatch": later.shape_mismatch,
            "shape_mismatch_batch": later.shape_mismatch_batch}


def _discrete(x: torch.Tensor) -> bool:
    """Whether ``x`` holds booleans or integers (a mask, indices), not values a quantizer
    rounds (a quantized tensor is one of those)."""
    return not (x.is_floating_point() or x.is_complex() or x.is_quantized)


def _checked(blocks: Iterable[tuple[torch.Tensor, torch.Tensor]]
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``blocks``, each refused unless both are floating and of one shape."""
    for ref, actual in blocks:
        if ref.shape != actual.shape or _discrete(ref) or _discrete(actual):
            raise InternalError(f"update_rows reads floating blocks of one shape, got "
                                f"{tuple(ref.shape)} and {tuple(actual.shape)}")
        yield ref, actual
        del ref, actual  # before the next block is made


def _row_chunks(ref: torch.Tensor, actual: torch.Tensor, index: torch.Tensor
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Rows ``index`` of two ``(rows, width)`` tensors, a chunk of at most :data:`_CHUNK`
    values at a time: a view where the chunk's rows are consecutive, else a copy of that
    chunk's rows alone."""
    for pick in _row_picks(index, max(1, _CHUNK // max(ref.shape[1], 1))):
        yield ref[pick], actual[pick]


def _row_picks(index: torch.Tensor, step: int) -> Iterator[slice | torch.Tensor]:
    """Rows ``index`` (ascending), ``step`` of them at a time: a slice where they are
    consecutive, else their indices."""
    for start in range(0, index.numel(), step):
        yield linear_rows.row_pick(index[start:start + step])


@dataclass(frozen=True)
class _Sums:
    """One update's sums (:meth:`Accumulator.update`): every field but the error's range
    is a sum over the values, so the sums of blocks of a tensor add up to the whole's."""

    signal: float
    noise: float
    actual_energy: float
    dot: float
    count: int
    low: float
    """The smallest error (``ref - actual``), the largest below: ``max_abs`` reads both."""
    high: float

    def plus(self, other: _Sums) -> _Sums:
        """Both blocks' sums (NaN wins the range, as ``max_abs`` keeps it)."""
        return _Sums(self.signal + other.signal, self.noise + other.noise,
                     self.actual_energy + other.actual_energy, self.dot + other.dot,
                     self.count + other.count, _min_nan(self.low, other.low),
                     _max_nan(self.high, other.high))


class Accumulator:
    """Running sums for the built-in metrics plus per-batch means of user metrics.

    Args:
        custom: user metrics by name, each ``fn(ref, actual) -> float``; their value over
            several batches is the mean of the per-batch values.
        keep: keep every ``(ref, actual)`` pair seen (for raw-activation access).

    Each :meth:`update` adds to the pooled sums. A caller that feeds batches calls
    :meth:`end_batch` after each one: the SQNR of that batch alone (all its updates: a module
    called twice per batch updates twice) then joins :meth:`spread`. ``ref_nonfinite`` and
    ``actual_nonfinite`` count the updates whose reference (float) or actual (quantized)
    tensor held NaN/Inf, so a report can say on which side a NaN appeared first. Booleans
    and integers on both sides (an attention mask, position ids, a router's expert ids) have
    no rounding error to measure: ``discrete`` says such values were seen, and of those of one
    shape on both sides ``discrete_differ`` of ``discrete_values`` differ. ``overwritten``
    counts the batches a caller left out because the reference was written into before it was
    compared (see :class:`fxnumeric.compare`'s float twins), ``misrouted`` those left out
    because the module running the layer routed its rows unlike the float model
    (:mod:`fxnumeric.routing`). ``non_tensor`` names the type of a value that was not a tensor
    (an op on Python values: a config scalar, ``8 - k``, ``list.append``), left uncompared.
    """

    def __init__(self, custom: dict[str, MetricFn] | None = None, keep: bool = False,
                 precision: torch.dtype = torch.float32) -> None:
        check_precision(precision)
        self.custom = dict(custom or {})
        self.precision = precision
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.actual_energy = 0.0
        self.count = 0
        self.max_abs = 0.0
        self.batches = 0
        self.nonfinite_batches = 0
        self.ref_nonfinite = 0
        self.actual_nonfinite = 0
        self._batch_signal = 0.0
        self._batch_noise = 0.0
        self._batch_updates = 0
        self._sqnr_spread = _Welford()
        self.custom_sums = {name: 0.0 for name in self.custom}
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep else None
        self.shape_mismatch: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.shape_mismatch_batch = -1  # the batch it was seen in (end_batch(index))
        self._batch_mismatch = False
        self.discrete = False
        self.overwritten = 0
        self.misrouted = 0
        self.discrete_values = 0
        self.discrete_differ = 0
        self.non_tensor = ""

    def update(self, ref: Any, actual: Any, *, actual_energy: float | None = None,
               rows: torch.Tensor | None = None) -> None:
        """Add one batch; non-tensor values are not compared (``non_tensor`` names their
        type).

        ``actual_energy``, when given, is ``sum(actual**2)`` already computed by
        :func:`prepare_actual` for an ``actual`` that several accumulators share.

        ``rows``, a boolean mask of the leading dims of two real tensors (``ref.shape[:k]``):
        only the rows where it is True count (a language model's real tokens, padding left
        out), every sum and metric read over them alone (:meth:`_add_rows`).

        ``ref`` may be a large Linear's output held as rows (:class:`fxnumeric.rows.LinearRows`):
        its sums are then taken a block of rows at a time, never made whole
        (:meth:`_update_by_rows`).
        """
        if isinstance(ref, linear_rows.LinearRows):
            self._update_by_rows(ref, actual, actual_energy, rows)
            return
        if not isinstance(ref, torch.Tensor) or not isinstance(actual, torch.Tensor):
            self.non_tensor = self.non_tensor or type(
                actual if isinstance(ref, torch.Tensor) else ref).__name__
            return
        if _discrete(ref) and _discrete(actual):
            self.discrete = True  # a mask: no rounding error to measure (its SQNR read inf)
            if ref.shape == actual.shape:  # but how many differ (experts a router picked)
                self.discrete_values += ref.numel()
                self.discrete_differ += int(torch.ne(ref, actual.to(ref.device)).sum())
            return
        if ref.shape != actual.shape:
            self.shape_mismatch = (tuple(ref.shape), tuple(actual.shape))
            self._batch_mismatch = True
            return
        ref, actual = _both_complex(ref, actual)
        if rows is not None and not ref.is_complex() and not bool(rows.all()):
            self._add_rows(ref, actual, rows)
            return
        if self.kept is not None:
            self.kept.append((ref.detach(), actual.detach()))
        self._add(self._sums(ref, actual, actual_energy))
        self._add_custom(ref, actual)

    def _update_by_rows(self, ref: linear_rows.LinearRows, actual: Any, actual_energy: float | None,
                        rows: torch.Tensor | None) -> None:
        """:meth:`update` with a reference held as rows: the sums of each block of
        :data:`fxnumeric.rows.ROW_BLOCK` values' worth of rows (real rows only, with
        ``rows``) added, as :meth:`update_rows` adds them. Where the sums do not add up over
        rows (custom metrics, kept tensors), or ``actual`` is no floating tensor of the
        reference's shape, the reference is made whole and read as any other."""
        if (not self.additive or not isinstance(actual, torch.Tensor) or _discrete(actual)
                or actual.is_complex() or tuple(actual.shape) != tuple(ref.shape)):
            self.update(ref.rows(slice(None)).reshape(ref.shape), actual,
                        actual_energy=actual_energy, rows=rows)
            return
        actual = actual.dequantize() if actual.is_quantized else actual
        flat = actual.reshape(-1, ref.shape[-1])
        real = rows is not None and not bool(rows.all())
        index = (rows.reshape(-1).nonzero().squeeze(1) if real and rows is not None
                 else torch.arange(flat.shape[0]))
        total = self._total((ref.rows(pick), flat[pick])
                            for pick in _row_picks(index, ref.block_rows))
        if total is None:
            total = _Sums(0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)
        elif actual_energy is not None and not real:  # the whole's, summed already
            total = dataclasses.replace(total, actual_energy=actual_energy)
        self._add(total)

    def _add_custom(self, ref: torch.Tensor, actual: torch.Tensor) -> None:
        """Add each custom metric's value of one update."""
        for name, fn in self.custom.items():
            try:
                self.custom_sums[name] += float(fn(_as_float(ref, torch.float64),
                                                   _as_float(actual, torch.float64)))
            except Exception as exc:
                raise InputError(
                    f"custom metric {name!r} failed: {type(exc).__name__}: {exc}; a metric is "
                    "called as fn(ref, actual) with float64 tensors and returns a float"
                ) from exc

    def _add_rows(self, ref: torch.Tensor, actual: torch.Tensor, rows: torch.Tensor) -> None:
        """:meth:`update` over the rows of ``ref`` and ``actual`` where ``rows`` (a boolean
        mask of their leading dims) is True: their sums a chunk of at most :data:`_CHUNK`
        values at a time (a view of the chunk's rows where they are consecutive, no padding
        among them; else a copy of that chunk's alone), never a copy of the whole tensors (a
        512-token LLM's logits are 96 MiB in float32). A custom metric, or raw tensors kept,
        read the real rows whole: a copy of them, ``(rows, width)``."""
        ref = ref.dequantize() if ref.is_quantized else ref
        actual = actual.dequantize() if actual.is_quantized else actual
        width = math.prod(ref.shape[rows.dim():])
        flat_ref, flat_actual = ref.reshape(-1, width), actual.reshape(-1, width)
        index = rows.reshape(-1).nonzero().squeeze(1).to(flat_ref.device)
        total = self._total(_row_chunks(flat_ref, flat_actual, index))
        whole = ((flat_ref[index], flat_actual[index]) if self.custom or self.kept is not None
                 else None)
        if self.kept is not None and whole is not None:
            self.kept.append((whole[0].detach(), whole[1].detach()))
        self._add(total if total is not None else _Sums(0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0))
        if whole is not None:
            self._add_custom(*whole)

    @property
    def additive(self) -> bool:
        """Whether one batch's sums can be taken a block of values at a time
        (:meth:`update_rows`): no custom metric (its value is a mean of per-update values, not
        a sum) and no kept tensors (a block is not the value a caller keeps)."""
        return not self.custom and self.kept is None

    def update_rows(self, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    actual_energy: float | None = None) -> None:
        """Add one batch given as ``(ref, actual)`` blocks of its values: the rows of a large
        Linear's output, its float twin computed a block of rows at a time (no float output
        the size of the whole is ever made, :class:`fxnumeric.instrument.graph.RowShadow`).

        The batch counts once, as one :meth:`update` of the whole would; its sums are the
        blocks' sums added (energies, the dot product, the value count: sums over values),
        its largest error the blocks' largest, equal to the whole's up to the order of float64
        additions. Each block is read before the next is asked for. ``actual_energy``: the
        whole actual tensor's, when :func:`prepare_actual` summed it already. Only for an
        :attr:`additive` accumulator, on floating blocks of one shape per pair.
        """
        if not self.additive:
            raise InternalError("update_rows sums blocks: an accumulator with custom metrics "
                                "or kept tensors needs the whole tensors (update)")
        total = self._total(_checked(blocks))
        if total is None:
            return
        if actual_energy is not None:
            total = dataclasses.replace(total, actual_energy=actual_energy)
        self._add(total)

    def _total(self, blocks: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> _Sums | None:
        """The sums of ``(ref, actual)`` blocks of one update's values, added (``None`` for
        no block); each block is read before the next is asked for."""
        total: _Sums | None = None
        for ref, actual in blocks:
            sums = self._sums(ref, actual, None)
            total = sums if total is None else total.plus(sums)
            del ref, actual, sums  # the block's values go before the next block is made
        return total

    def _sums(self, ref: torch.Tensor, actual: torch.Tensor, actual_energy: float | None
              ) -> _Sums:
        """The sums of one ``(ref, actual)`` pair of one shape, as :meth:`update` adds them."""
        if _by_chunks(ref, actual, self.precision) and not ref.is_complex():
            signal, noise, own_energy, low, high = self._chunk_sums(
                ref, actual, actual_energy is None)
        else:
            r, a = _as_float(ref, self.precision), _as_float(actual, self.precision)
            err = r - a
            signal, noise = energy(r), energy(err)
            own_energy = energy(a) if actual_energy is None else actual_energy
            if ref.is_complex():  # the error's modulus |z - w|, not a part's
                err = torch.linalg.vector_norm(err, dim=-1)
            low, high = aminmax(err) if err.numel() else (0.0, 0.0)  # in memory order
        if actual_energy is None:
            actual_energy = own_energy if own_energy is not None else 0.0  # summed when asked
        dot = _dot(ref, actual, signal, actual_energy, noise, self.precision)
        return _Sums(signal, noise, actual_energy, dot, ref.numel(), low, high)

    def _add(self, sums: _Sums) -> None:
        """Add one update's sums (a batch, or a call of a module called several times in it)."""
        self.batches += 1
        signal, noise, actual_energy = sums.signal, sums.noise, sums.actual_energy
        if not all(math.isfinite(v) for v in (signal, noise, actual_energy)):
            self.nonfinite_batches += 1  # NaN/Inf propagate into the sums: the metrics say so
            self.ref_nonfinite += not math.isfinite(signal)
            self.actual_nonfinite += not math.isfinite(actual_energy)
        self._batch_signal += signal
        self._batch_noise += noise
        self._batch_updates += 1
        self.signal += signal
        self.noise += noise
        self.dot += sums.dot
        self.actual_energy += actual_energy
        self.count += sums.count
        if sums.count:
            low, high = sums.low, sums.high
            batch_max = math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)
            nan = math.isnan(batch_max) or math.isnan(self.max_abs)
            self.max_abs = math.nan if nan else max(self.max_abs, batch_max)

    def _chunk_sums(self, ref: torch.Tensor, actual: torch.Tensor, actual_energy: bool
                    ) -> tuple[float, float, float | None, float, float]:
        """``(signal, noise, actual energy, min error, max error)`` of two large contiguous
        tensors of one shape, a chunk at a time (partial sums added in float64); the actual
        energy only when asked (``None`` otherwise: :func:`prepare_actual` summed it)."""
        signals, noises, energies = [], [], []
        low, high = math.inf, -math.inf
        errors: torch.Tensor | None = None  # one buffer for every chunk's error (_chunks)
        for r, a in zip(_chunks(ref, self.precision), _chunks(actual, self.precision),
                        strict=True):
            if errors is None:
                errors = torch.empty(r.numel(), dtype=r.dtype, device=r.device)
            err = torch.sub(r, a, out=errors[:r.numel()])
            signals.append(energy(r))
            noises.append(energy(err))
            if actual_energy:
                energies.append(energy(a))
            lo, hi = aminmax(err)
            low, high = _min_nan(low, lo), _max_nan(high, hi)
        return (math.fsum(signals), math.fsum(noises),
                math.fsum(energies) if actual_energy else None, low, high)

    def end_batch(self, index: int = -1) -> None:
        """Close the current batch: its own SQNR joins :meth:`spread` (when finite), and a
        shape mismatch seen in it is stamped with its ``index`` in the data, so that merging
        the states of processes that ran other batches keeps the later batch's
        (:meth:`AccumulatorState.merged`)."""
        if self._batch_mismatch:
            self.shape_mismatch_batch = index
            self._batch_mismatch = False
        if self._batch_updates:
            db_ = db(self._batch_signal, self._batch_noise)
            if math.isfinite(db_):
                self._sqnr_spread.add(db_)
        self._batch_signal = self._batch_noise = 0.0
        self._batch_updates = 0

    def spread(self) -> Spread | None:
        """The SQNR's spread over the batches closed by :meth:`end_batch` (``None``: none)."""
        return self._sqnr_spread.spread()

    def state(self) -> AccumulatorState:
        """The sums so far, as numbers; take it between batches (after :meth:`end_batch`)."""
        return AccumulatorState(
            signal=self.signal, noise=self.noise, dot=self.dot,
            actual_energy=self.actual_energy, count=self.count, max_abs=self.max_abs,
            batches=self.batches, nonfinite_batches=self.nonfinite_batches,
            ref_nonfinite=self.ref_nonfinite, actual_nonfinite=self.actual_nonfinite,
            custom_sums=tuple(self.custom_sums.items()),
            sqnr_spread=self._sqnr_spread.state(), shape_mismatch=self.shape_mismatch,
            shape_mismatch_batch=self.shape_mismatch_batch,
            discrete=self.discrete, overwritten=self.overwritten, misrouted=self.misrouted,
            discrete_values=self.discrete_values, discrete_differ=self.discrete_differ,
            non_tensor=self.non_tensor,
        )

    def load(self, state: AccumulatorState) -> None:
        """Replace the sums with ``state`` (the open batch, if any, is dropped; kept tensors
        and the metric functions stay)."""
        self.signal, self.noise, self.dot = state.signal, state.noise, state.dot
        self.actual_energy, self.count, self.max_abs = (state.actual_energy, state.count,
                                                        state.max_abs)
        self.batches, self.nonfinite_batches = state.batches, state.nonfinite_batches
        self.ref_nonfinite, self.actual_nonfinite = state.ref_nonfinite, state.actual_nonfinite
        self.custom_sums = {name: 0.0 for name in self.custom} | dict(state.custom_sums)
        self._sqnr_spread.load(state.sqnr_spread)
        self.shape_mismatch = state.shape_mismatch
        self.shape_mismatch_batch, self._batch_mismatch = state.shape_mismatch_batch, False
        self.discrete, self.overwritten = state.discrete, state.overwritten
        self.misrouted = state.misrouted
        self.discrete_values, self.discrete_differ = state.discrete_values, state.discrete_differ
        self.non_tensor = state.non_tensor
        self._batch_signal = self._batch_noise = 0.0
        self._batch_updates = 0

    def merge(self, other: Accumulator) -> None:
        """Add ``other``'s batches to this accumulator, as if it had seen them after its own
        (kept tensors too, when both keep them)."""
        self.load(self.state().merged(other.state()))
        if self.kept is not None and other.kept is not None:
            self.kept.extend(other.kept)

    def value(self, name: str) -> float:
        """The metric ``name`` over everything seen so far (``nan`` before any batch, and for
        the built-in metrics while every tensor seen was empty)."""
        if self.batches == 0:
            return math.nan
        if not self.count and name in BUILTIN_METRICS:
            return math.nan  # empty tensors: nothing was compared (not a perfect match)
        if name == "sqnr":
            return db(self.signal, self.noise)
        if name == "cosine":
            if math.isnan(self.dot):
                return math.nan
            denom = math.sqrt(self.signal) * math.sqrt(self.actual_energy)
            if denom == 0:
                return 1.0 if self.signal == self.actual_energy == 0 else 0.0
            # the three float64 sums round apart: an exact layer read 1.0000000000000002
            cos = self.dot / denom
            return cos if math.isnan(cos) else max(-1.0, min(1.0, cos))
        if name == "mse":
            return self.noise / self.count if self.count else math.nan
        if name == "max_abs_error":
            return self.max_abs
        if name in self.custom_sums:
            return self.custom_sums[name] / self.batches
        raise KeyError(name)

    def values(self, names: Iterable[str]) -> dict[str, float]:
        return {n: self.value(n) for n in names}
