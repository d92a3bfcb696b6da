"""Metrics between a reference (float) tensor and an actual (quantized) one.

Every metric takes ``(ref, actual)``; sums and products are accumulated in float64 (the
difference ``ref - actual`` is taken in the tensors' own precision, exact for float32 values
within a factor of two of each other). Over many batches the
built-in metrics are accumulated from sums (signal and noise energy, dot products, counts),
so the value for 500 batches is exact, not an average of per-batch values, and memory does
not grow with the number of batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["sqnr", "cosine", "mse", "max_abs_error", "MetricFn", "Accumulator", "BUILTIN_METRICS"]

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
"""A user metric, called as ``fn(ref, actual)`` with float64 tensors; returns a float."""

BUILTIN_METRICS = ("sqnr", "cosine", "mse", "max_abs_error")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """A real-valued, contiguous view of ``x`` (quantized convs return channels_last)."""
    if x.is_quantized:
        x = x.dequantize()
    x = x.detach()
    if not x.is_floating_point():
        x = x.double()
    return x.contiguous()


def _energy(x: torch.Tensor) -> float:
    """``sum(x**2)`` accumulated in float64."""
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def _db(signal: float, noise: float) -> float:
    if math.isnan(signal) or math.isnan(noise):
        return math.nan
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(sum(ref^2) / sum((ref-actual)^2))``.

    ``inf`` when the tensors are identical, ``-inf`` for a zero signal with nonzero noise,
    ``nan`` when either holds NaN.

    >>> sqnr(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    inf
    >>> round(sqnr(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5])), 2)
    20.0
    """
    acc = Accumulator()
    acc.update(ref, actual)
    return acc.value("sqnr")


def cosine(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors (1.0 for two zero tensors)."""
    acc = Accumulator()
    acc.update(ref, actual)
    return acc.value("cosine")


def mse(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Mean squared error."""
    acc = Accumulator()
    acc.update(ref, actual)
    return acc.value("mse")


def max_abs_error(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Largest absolute difference."""
    acc = Accumulator()
    acc.update(ref, actual)
    return acc.value("max_abs_error")


class Accumulator:
    """Running sums for the built-in metrics plus per-batch means of user metrics.

    Args:
        custom: user metrics by name, each ``fn(ref, actual) -> float``; their value over
            several batches is the mean of the per-batch values.
        keep: keep every ``(ref, actual)`` pair seen (for raw-activation access).
    """

    def __init__(self, custom: dict[str, MetricFn] | None = None, keep: bool = False) -> None:
        self.custom = dict(custom or {})
        self.signal = 0.0
        self.noise = 0.0
        self.dot = 0.0
        self.actual_energy = 0.0
        self.count = 0
        self.max_abs = 0.0
        self.batches = 0
        self.nonfinite_batches = 0
        self.custom_sums = {name: 0.0 for name in self.custom}
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if keep else None
        self.shape_mismatch: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def update(self, ref: Any, actual: Any) -> None:
        """Add one batch; non-tensor values are ignored."""
        if not isinstance(ref, torch.Tensor) or not isinstance(actual, torch.Tensor):
            return
        r, a = _as_float(ref), _as_float(actual)
        if r.shape != a.shape:
            self.shape_mismatch = (tuple(r.shape), tuple(a.shape))
            return
        if self.kept is not None:
            self.kept.append((ref.detach(), actual.detach()))
        self.batches += 1
        err = r - a
        signal, noise, actual_energy = _energy(r), _energy(err), _energy(a)
        if not all(math.isfinite(v) for v in (signal, noise, actual_energy)):
            self.nonfinite_batches += 1  # NaN/Inf propagate into the sums: the metrics say so
        self.signal += signal
        self.noise += noise
        self.dot += (signal + actual_energy - noise) / 2  # = sum(ref * actual)
        self.actual_energy += actual_energy
        self.count += r.numel()
        if r.numel():
            batch_max = float(torch.linalg.vector_norm(err, ord=math.inf))
            self.max_abs = math.nan if math.isnan(batch_max) or math.isnan(self.max_abs) else max(self.max_abs, batch_max)
        for name, fn in self.custom.items():
            try:
                self.custom_sums[name] += float(fn(r.double(), a.double()))
            except Exception as exc:
                from .errors import InputError

                raise InputError(f"custom metric {name!r} failed: {type(exc).__name__}: {exc}; "
                                 "a metric is called as fn(ref, actual) with float64 tensors and returns a float") from exc

    def value(self, name: str) -> float:
        """The metric ``name`` over everything seen so far (``nan`` before any batch)."""
        if self.batches == 0:
            return math.nan
        if name == "sqnr":
            return _db(self.signal, self.noise)
        if name == "cosine":
            if math.isnan(self.dot):
                return math.nan
            denom = math.sqrt(self.signal) * math.sqrt(self.actual_energy)
            if denom == 0:
                return 1.0 if self.signal == self.actual_energy == 0 else 0.0
            return self.dot / denom
        if name == "mse":
            return self.noise / self.count if self.count else math.nan
        if name == "max_abs_error":
            return self.max_abs
        if name in self.custom_sums:
            return self.custom_sums[name] / self.batches
        raise KeyError(name)

    def values(self, names: Iterable[str]) -> dict[str, float]:
        return {n: self.value(n) for n in names}
