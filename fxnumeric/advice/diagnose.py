"""Why a layer is bad: the usual causes of quantization error, measured per layer, with fixes.

For each op a :func:`fxnumeric.compare` report has a row for (the quantized layers, and the
ops left in float, such as a ``sub`` between two quantized branches; a module called twice
has a row per call site, ``fc2`` and ``fc2#2``, each reading its own call's values), over
the data; the weights, clipping and noise flags are those of the ops computing in quantized
form:

* **weights** (the module's, shared by its call sites; a pt2e graph's read off the
  ``dequantize`` that makes it): range utilisation (the fraction of the integer grid a
  typical output channel's weights span: median over channels of ``range_c / (scale_c *
  (qmax - qmin))``) and channel outliers (max / median of the channel ranges). One
  per-tensor scale for channels whose ranges differ tenfold leaves most channels a few
  levels. Channels whose weights are all zero (pruned rows) are left out of both:
  quantization keeps them exact, and per-channel scales would change nothing for them.
  Weights that dequantize to exactly the float ones (their quantization adds no error) get
  no weight fix. An op with several weight matrices (an LSTM's, per layer, direction and
  input) shows its worst one, by name.
* **activation clipping**: the fraction of the layer's float output (its float twin fed the
  quantized model's inputs) outside the range its quantized output can represent.
* **noise vs step**: the rms of the local error (quantized layer vs its float twin on the same
  input) in units of the output's quantization step. Rounding alone gives white noise of
  ``step / sqrt(12)``, 0.29 steps; far above that means clipping or error from the weights;
  at that level but with a low local SQNR, the step is too coarse for the signal (a few
  outliers set the range).
* **error amplification**: cumulative SQNR (the quantized model vs the float model at this
  op) against local SQNR (the error this op adds) and against the cumulative SQNR of the
  values it reads, and the first op where the cumulative SQNR falls below a threshold. Ops
  left in float count: a float ``sub`` of two nearly equal quantized branches adds no error
  of its own but cancels their signal, not their errors, so the relative error jumps at the
  ``sub``, and the flag names it rather than the layer after it. A product (``mul``,
  ``matmul``, ``div``) adds the relative errors of its factors by nature: two factors at
  22 dB give 19 dB, which is what it is held to, not 22 dB. On a model captured through its
  module tree, the values crossing into a region are traced to the op that computed them by
  one float run (:func:`fxnumeric.dataflow.value_sources`); a value the untraced code
  computed (a decoder layer's residual add) has no row, and the op reading it no input SQNR.
  A residual branch whose ``add`` dilutes its error is not that first op (keeping MiniLM's
  first ``attention.output.dense``, at 19.4 dB under its add's 29.5, float took the output
  from 8.38 to 8.33 dB). Every other op that amplifies the error it reads more than 3 dB is
  flagged too, below the threshold, or above it once the model falls below it somewhere
  (MiniLM's float output LayerNorms, 22.6 -> 10.8 dB): :meth:`Diagnosis.amplified` ranks
  them.

A quantize is its reader's. Where an op computes in float and its row holds only the input
quantize its readers asked for (X86InductorQuantizer's Linear quantizes its input: the row of a
``cat`` or GELU in front of it is read after that quantize; :attr:`LayerDiagnosis.rounded_for`),
what the row measures is the readers' input rounding: its clipping, noise and floor flags go on
the readers' entries, saying where they were measured, with keeping the readers float as the
fix, and so does the amplification flag where that rounding is what puts the op first below
the threshold. The op itself is told that keeping it float would not remove the error
(``readers_quantize``), as the report's verdict blames those readers. Under X86 QAT, a ``cat``
in front of ``l1`` clipping 8.3% of l1's input was told "keep the layer float" and "keep this
layer or the ones before it float": re-quantized, l1 float takes the output from 20.44 to
45.30 dB, the layers before the ``cat`` float leave it at 20.44 dB.

Each flag names the usual fix: per-channel weights, a histogram observer, recalibration,
keeping the layer float (:func:`fxnumeric.advise`), cross-layer equalization.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .._collector import defers_collection
from .._tensors import detach, first_output
from ..dataflow import model_inputs, op_reads, value_sources
from ..errors import InputError
from ..floor import (
    FloorSums,
    FloorVerdict,
    floor_sums,
    functional_weight_grid,
    layer_floor,
    layer_module,
    unexplained,
)
from ..flows.torchao import is_torchao_tensor, per_row_setting
from ..guards import check_pairable, warn_foreign_weights
from ..instrument import instrument, resolve_matching
from ..loggers import Logger
from ..match import Matching, Pair
from ..metrics import db, sqnr
from ..numbers import a_number
from ..pairing import op_name
from ..progress import Progress
from ..report import Report
from ..report.render import text_table
from ..routing import Routes, hook_watched, watch
from ..run import check_devices, keeps_buffers, model_batches, run_blaming_inside, run_model
from ..semantics import QRANGE, QuantGrid, WeightGrid, grid_before
from ..storage import is_dynamic_module
from ..weights import pair_weights
from .hybrid import called_whole, module_path

__all__ = ["diagnose", "Diagnosis", "LayerDiagnosis", "Flag", "annotate", "WHITE_NOISE_STEPS"]

WHITE_NOISE_STEPS = 1 / math.sqrt(12)
"""rms of uniform rounding noise, in quantization steps (0.289)."""



@dataclass(frozen=True)
class Flag:
    """One reason a layer is bad: a short code, what was measured, and the usual fix."""

    code: str
    text: str
    fix: str

    def __str__(self) -> str:
        return f"{self.text}. Fix: {self.fix}."


@dataclass(frozen=True)
class LayerDiagnosis:
    """The measurements behind the flags of one op (``None`` where they do not apply).

    Attributes:
        name: the call site's (pair) name, as the :func:`fxnumeric.compare` report's row:
            ``fc2`` and ``fc2#2`` for a module called twice, each measured apart.
        module: the float model's module path, shared by the module's call sites (so are
            its weight figures: one weight).
        kind: op kinds.
        per_channel: whether the weights are quantized per channel. The weight figures are
            those of the op's worst quantized weight matrix where it has several (an LSTM:
            ``weight_matrix`` names it).
        weight_utilisation: median over output channels of the fraction of the integer grid
            the channel's weights span; all-zero channels left out (``None`` when every
            channel is).
        channel_outlier_ratio: max / median of the output channels' weight ranges, all-zero
            channels left out (``None`` when every channel is).
        clipped: fraction of the layer's float output outside its quantized output range.
        noise_steps: rms of the local error in output quantization steps (white rounding
            noise: 0.289).
        local_sqnr: dB, the quantized layer against its float twin on the same input.
        cumulative_sqnr: dB, the quantized model against the float model at this layer.
        flags: what is wrong, each with its fix.
        quantized: whether the op computes in quantized form: a quantized layer, an input
            quantize, an op handing on quantized tensors (a quantized ``max_pool2d``). False
            for an op computing in float in both models (a ``sub`` or ``add`` under dynamic
            quantization or between dequantized values, an ``nn.Embedding`` left float),
            which carries only the amplification and NaN/Inf flags; and for an op whose
            output's quantize is only its readers' request (:attr:`rounded_for`: an X86
            pt2e ``cat`` or GELU in front of a Linear), which computes in float too.
        inputs: the ops (:attr:`call_site`) whose values this op reads, in order: on a model
            captured through its module tree too, where a value crosses from one region into
            another (:func:`fxnumeric.dataflow.value_sources`).
        input_sqnr: dB, the cumulative SQNR of the values this op reads: the energies and
            errors of the ``inputs`` pooled, with a model input read as it is counting its
            energy and no error. ``None`` when it reads no value at all, or one without a
            measurement: a value the untraced code between regions computed (a decoder
            layer's residual add), whose error no row measures (never pooled over the
            others alone). ``input_sqnr - cumulative_sqnr`` is what this op does to the
            error it reads: a float ``sub`` of nearly equal values loses tens of dB there.
    """

    name: str
    module: str
    kind: str
    per_channel: bool | None = None
    weight_utilisation: float | None = None
    channel_outlier_ratio: float | None = None
    clipped: float | None = None
    noise_steps: float | None = None
    local_sqnr: float | None = None
    cumulative_sqnr: float | None = None
    flags: tuple[Flag, ...] = ()
    floor_sqnr: float | None = None
    """dB, the SQNR the layer's own grids allow (:mod:`fxnumeric.floor`)."""
    floor: FloorVerdict | None = field(default=None, repr=False)
    """Where the layer stands against its floor."""
    quantized: bool = True
    inputs: tuple[str, ...] = ()
    input_sqnr: float | None = None
    weight_matrix: str | None = None
    """Which of the op's weight matrices the weight figures are of, for an op with several (an
    LSTM's ``weight_ih_l1_reverse``): the worst quantized one; ``None`` for one weight."""
    zero_channels: int | None = None
    """How many output channels of that weight are all zero (pruned rows), of
    ``weight_channels``; left out of the utilisation and the outlier ratio."""
    weight_channels: int | None = None
    """How many output channels that weight has."""
    weight_sqnr: float | None = None
    """dB, the dequantized weight against the float one, of the matrix the weight figures are
    of (:attr:`weight_matrix`); ``None`` without weights."""
    weight_exact: bool | None = None
    """Whether the quantized weights dequantize to exactly the float ones (their quantization
    adds no error, and no weight fix is given); ``None`` without weights."""
    weight_setting: str | None = None
    """The setting of the flow the op came from that quantizes its weights per channel, which
    the weight flags' fix names: ``per_channel_dynamic_qconfig`` for ``quantize_dynamic``
    (whose default is per-tensor), the config's ``granularity=PerRow()`` for torchao's
    ``quantize_``, a per-channel weight spec for a pt2e quantizer, ``per_channel_weight_observer``
    for the static eager and FX flows; ``None`` without quantized weights."""
    float_weight_nonfinite: bool = False
    """Whether a float weight of the op holds NaN/Inf (the float model's own, not an
    overflow)."""
    expected_sqnr: float | None = None
    """dB, the cumulative SQNR the op's output has by nature with the errors it reads carried
    through, which the amplification flag holds it to: ``input_sqnr``, except for a product
    (``mul``, ``matmul``, ``div``), whose factors' relative errors add: ``-10 log10(sum of
    10^(-SQNR_i / 10))`` over the values it reads (two at 22 dB: 19 dB)."""
    stray: str | None = None
    """The quantized op, one the float model does not have, whose value this op reads in
    place of the value its float twin reads (``mul_1``, where only the quantized model
    computes ``y * 0.5``): the op and its shadow read it (:attr:`fxnumeric.instrument.
    Instrumented.strays`). ``input_sqnr`` is then ``None``: the float ``inputs`` are not what
    it reads, and no row measures the error that op adds."""
    input_quantize: tuple[tuple[str, float], ...] = ()
    """``(op, local SQNR dB)`` for each op among ``inputs`` whose row holds this op's own input
    quantize (:meth:`fxnumeric.match.Region.rounded_for`: a float GELU's value rounded for the
    X86 Linear reading it): that op's local error is this op's input rounding, which keeping
    this op float removes."""
    rounded_for: tuple[str, ...] = ()
    """The ops (:attr:`call_site`) whose own input quantize this op's row holds
    (:meth:`fxnumeric.match.Region.rounded_for`, the report's ``row.rounded_for``: a float
    GELU's or ``cat``'s value rounded for the X86 Linear reading it). This op then computes in
    float (``quantized`` is False) and its local error is their input rounding: the clipping,
    noise and floor flags measured in its row, and the amplification flag where that rounding
    is what puts it first below the threshold, are on their entries, saying where they were
    measured, with keeping them float as the fix; this op's flag (``readers_quantize``) says
    keeping it float would not remove that error, as the report's verdict blames them."""
    site: str = field(default="", repr=False)
    """:attr:`call_site` as :func:`diagnose` named it (``""``: from ``module`` and ``name``)."""

    @property
    def call_site(self) -> str:
        """The module path with the call site's number, as the report numbers its rows
        (``fc2#2``); the module path for an op's first or only call site. An op of a module
        that computes several ops itself (a GELU's ``mul`` and ``pow``, an RMSNorm's) is
        named by its pair name instead (``pow_1``, ``norm.mul#2``): the module path would
        name them all alike."""
        return self.site or self.module + self.name[len(op_name(self.name)):]

    @property
    def amplification(self) -> float | None:
        """dB by which the accumulated error exceeds this layer's own (local - cumulative)."""
        if self.local_sqnr is None or self.cumulative_sqnr is None:
            return None
        if math.isinf(self.local_sqnr) and math.isinf(self.cumulative_sqnr):
            return 0.0
        return self.local_sqnr - self.cumulative_sqnr


@dataclass(frozen=True)
class Diagnosis:
    """:func:`diagnose`'s result: one :class:`LayerDiagnosis` per op of the report.

    Attributes:
        layers: the quantized layers and the ops left in float, in graph order.
        threshold_db: the cumulative-SQNR threshold used for the amplification flag.
        first_below: the first op (:attr:`LayerDiagnosis.call_site`) whose cumulative SQNR
            is below ``threshold_db``, an op left in float included: where its value is
            measured. An op whose row holds its readers' input quantize
            (:attr:`LayerDiagnosis.rounded_for`) and gets there by that rounding leaves the
            amplification flag to those readers. A residual branch whose ``add`` dilutes its
            error (every reader an ``add`` more than 3 dB above it, whose other input is at
            the add's SQNR or above) is passed over: the stream does not fall there.
        batches: how many batches were run.
    """

    layers: tuple[LayerDiagnosis, ...] = field(repr=False)
    threshold_db: float
    first_below: str | None
    batches: int
    nonfinite: str | None = None
    """The first layer (:attr:`LayerDiagnosis.call_site`) whose values held NaN/Inf: it
    carries the only flag, ``nonfinite``; the sums of the layers after it are poisoned, so
    nothing is drawn from them."""
    foreign: str = ""
    """Why the quantized model's weights do not look made from the float model's (weight SQNR
    below 0 dB on most layers; also warned), ``""`` when they do."""
    whole: tuple[tuple[str, str], ...] = ()
    """``(layer, why)`` for layers that are a module called whole although it holds quantized
    layers (a decoder layer dispatched by accelerate with ``preload_module_classes``): its
    quantized layers are diagnosed together, as one layer
    (:func:`fxnumeric.advice.hybrid.called_whole`)."""

    def __repr__(self) -> str:
        flagged = [d.call_site for d in self.flagged()]
        return (f"Diagnosis(layers={len(self.layers)}, flagged={flagged[:5]}"
                f"{' ...' if len(flagged) > 5 else ''}, first_below={self.first_below!r}"
                + (f", nonfinite={self.nonfinite!r})" if self.nonfinite else ")"))

    def flagged(self) -> list[LayerDiagnosis]:
        """The layers with at least one flag, in graph order."""
        return [d for d in self.layers if d.flags]

    def layer(self, name: str) -> LayerDiagnosis:
        """The entry for layer ``name``: a pair name, as the report names its row, or a
        :attr:`LayerDiagnosis.call_site`.

        A module called several times has an entry per call site: its module path is its
        first call's (``fc2``), ``fc2#2`` its second, as in the report;
        :meth:`call_sites` gives them all.
        """
        for d in self.layers:
            if name in (d.name, d.call_site):
                return d
        raise InputError(f"no layer {name!r} in this diagnosis")

    def amplified(self) -> list[tuple[str, float]]:
        """``(call_site, dB)`` of the ops flagged for making the error they read larger,
        largest first: by how many dB their cumulative SQNR falls below what the values they
        read carry through them (:attr:`LayerDiagnosis.expected_sqnr` - ``cumulative_sqnr``).
        On a residual encoder these are the float LayerNorms and activations the stream
        crosses (MiniLM under quantize_dynamic: its first output LayerNorm, 11.8 dB)."""
        found = [(d.call_site, d.expected_sqnr - d.cumulative_sqnr) for d in self.layers
                 if any(f.code == "amplification" for f in d.flags) and _amplifies(d)
                 and d.expected_sqnr is not None and d.cumulative_sqnr is not None]
        return sorted(found, key=lambda item: -item[1])

    def call_sites(self, module: str) -> list[LayerDiagnosis]:
        """The entries of module path ``module``, in graph order: one per call site, or
        per op of a module that computes several itself."""
        return [d for d in self.layers if d.module == module]

    def text(self) -> str:
        """A short paragraph per flagged layer: what is wrong and the usual fix."""
        notes = f"{self.foreign}\n" if self.foreign else ""
        notes += "".join(f"{name} is {why}\n" for name, why in self.whole)
        if not self.flagged():
            return notes + "no layer flagged"
        head = (f"NaN/Inf first appears at {self.nonfinite}: the layers after it read poisoned "
                "values, so none of them is flagged\n" if self.nonfinite else "")
        amplified = self.amplified()
        if len(amplified) > 1:
            head += ("the error grows most at (dB the cumulative SQNR falls beyond what the "
                     "values read carry): " + ", ".join(f"{site} {drop:.1f}"
                                                       for site, drop in amplified[:5])
                     + (" ..." if len(amplified) > 5 else "") + "\n")
        return notes + head + "\n".join(
            f"{d.call_site} ({d.kind}):\n" + "\n".join(f"  - {f}" for f in d.flags)
            for d in self.flagged()
        )

    def table(self, tablefmt: str = "simple") -> str:
        """The measurements as a table, one row per layer."""
        rows = [(d.call_site, d.kind, _pc(d.per_channel), d.weight_utilisation,
                 d.channel_outlier_ratio, d.clipped, d.noise_steps, d.local_sqnr,
                 d.floor_sqnr, d.input_sqnr, d.cumulative_sqnr,
                 ", ".join(f.code for f in d.flags))
                for d in self.layers]
        headers = ("layer", "kind", "weights", "w util", "ch max/med", "clipped",
                   "err rms/step", "local SQNR", "floor SQNR", "input SQNR", "cum. SQNR",
                   "flags")
        return text_table(rows, headers, tablefmt, floatfmt=".3g", missingval="-")


def _pc(per_channel: bool | None) -> str | None:
    return None if per_channel is None else ("per-channel" if per_channel else "per-tensor")


class _Sums:
    """Float64 sums over batches for one layer."""

    def __init__(self) -> None:
        self.local_signal = self.local_noise = self.cum_signal = self.cum_noise = 0.0
        self.count = 0
        self.clipped = 0
        self.steps: set[float] = set()
        self.quantized = False
        self.calls = 0
        # calls whose float model value is the same rows' (not routed otherwise: routing)
        self.cum_calls = 0
        # calls whose values held NaN/Inf: quantized output, float twin, float model
        self.quant_nonfinite = self.local_nonfinite = self.float_nonfinite = 0

    def update(self, local: Any, quant_value: Any, float_value: Any,
               grid: QuantGrid | None, routed_alike: bool = True) -> None:
        """One call's values: the float twin's output ``local``, the quantized output, the
        float model's output there, and the output's quantization grid (if known);
        ``routed_alike``: False where the module running the op routed its rows unlike the
        float model (:mod:`fxnumeric.routing`), whose value there is then other rows'."""
        q, local, float_value = (first_output(v) for v in (quant_value, local, float_value))
        if not all(isinstance(v, torch.Tensor) for v in (q, local, float_value)):
            return
        if isinstance(q, torch.Tensor) and q.is_quantized:
            grid = QuantGrid.of(q) or grid
        deq = q.dequantize().double() if q.is_quantized else q.double()
        # an op computing as its twin does is observed twice (its own output is the twin's)
        local = (local.dequantize() if local.is_quantized else local).double()
        if deq.shape != local.shape or float_value.shape != deq.shape:
            return
        self.calls += 1
        self.quant_nonfinite += not bool(deq.isfinite().all())
        self.local_nonfinite += not bool(local.isfinite().all())
        self.float_nonfinite += not bool(float_value.isfinite().all())
        self.local_signal += float(local.square().sum())
        self.local_noise += float((deq - local).square().sum())
        if routed_alike:
            self.cum_calls += 1
            self.cum_signal += float(float_value.double().square().sum())
            self.cum_noise += float((deq - float_value.double()).square().sum())
        self.count += local.numel()
        if grid is not None:
            self.quantized = True
            low, high = grid.bounds()
            self.clipped += int(((local < low) | (local > high)).sum())
            self.steps.add(grid.scale)


_NO_TURN = SimpleNamespace(lockstep=None)
"""What :class:`~fxnumeric.routing.Routes` asks of a batch's turn: diagnose runs the float
model whole before the quantized one, so a quantized call never waits for its float twin."""


class _FloatValues(Logger):
    """Keeps the float model's values of the current batch, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def forward(self, x: Any) -> None:
        self.pending.append(detach(x))


class _LocalError(Logger):
    """Fed ``(quantized output, float twin output, *inputs)`` by the layer's shadow; adds to
    the sums, and to what the layer's floor needs (``floor``: ``None`` for an op left in
    float, which has no floor; ``grid``: its output grid then, if it has one)."""

    def __init__(self, sums: _Sums, twin: _FloatValues, floor: FloorSums | None,
                 grid: QuantGrid | None = None, routes: Routes | None = None) -> None:
        super().__init__()
        self.sums, self.floor, self.grid = sums, floor, grid
        self.routes = [routes] if routes is not None else []  # a list: not a submodule
        # without a floor it needs no inputs, and an op that computes as its float twin does
        # is then not run again (its local error is none), as compare's shadows are
        self.takes_inputs = floor is not None
        self.twin = [twin]  # a list, so the twin is not registered as a submodule

    def forward(self, x: Any, y: Any, *inputs: Any) -> None:  # type: ignore[override]
        pending = self.twin[0].pending
        if pending:
            self.sums.update(y, x, pending.pop(0), self.floor.grid if self.floor else self.grid,
                             routed_alike=not any(r.misrouted for r in self.routes))
        if self.floor is None:
            return
        quant, ref = first_output(x), first_output(y)
        if isinstance(quant, torch.Tensor) and isinstance(ref, torch.Tensor):
            if self.floor.grid is None and quant.is_quantized:
                self.floor.grid = QuantGrid.of(quant)
            deq = quant.dequantize() if quant.is_quantized else quant
            self.floor.update(deq, ref, inputs)


@dataclass(frozen=True)
class _WeightStats:
    """What :func:`_weight_stats` reads of one weight matrix."""

    per_channel: bool | None = None
    utilisation: float | None = None  # over the channels that are not all zero
    outliers: float | None = None  # max / median range of those channels
    zero_channels: int | None = None
    channels: int | None = None
    exact: bool | None = None  # dequantizes to exactly the float weight
    nonfinite: bool = False  # the float weight holds NaN/Inf
    sqnr: float | None = None  # of the dequantized weight against the float one (dB)


def _worse(stats: _WeightStats, than: _WeightStats) -> bool:
    """Whether one weight matrix is worse quantized than another: one its quantization
    changes against one it keeps exact, else the smaller range utilisation (the fewer levels
    a typical channel keeps), else the larger outlier ratio."""
    if stats.nonfinite != than.nonfinite:
        return stats.nonfinite
    if (stats.exact is False) != (than.exact is False):
        return stats.exact is False
    util, other_util = stats.utilisation, than.utilisation
    if util is not None and other_util is not None and util != other_util:
        return util < other_util
    return (stats.outliers or 0.0) > (than.outliers or 0.0)


def _weight_stats(fw: torch.Tensor, qw: torch.Tensor, grid: WeightGrid | None = None,
                  ) -> _WeightStats:
    """Range use and channel outliers of ``qw`` against the float weight ``fw``, over the
    output channels whose weights are not all zero: a pruned row is exact under any scale,
    and its zero range made the median range 0 and the outlier ratio ``inf``. ``grid``: the
    grid of a ``qw`` that arrives dequantized: a pt2e graph's weight, read from the graph; a
    torchao weight, read from its tensor's scale (per tensor, per row, or per group: then
    per-channel without a utilisation, as any scales not one per output channel)."""
    w = fw.detach().double()
    w = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    ranges = w.amax(dim=1).clamp(min=0) - w.amin(dim=1).clamp(max=0)
    live = ranges > 0  # NaN ranges (a corrupt weight) read as not live
    stats = _WeightStats(zero_channels=int((ranges == 0).sum()), channels=len(ranges),
                         nonfinite=not bool(torch.isfinite(w).all()))
    if bool(live.any()):
        median = float(ranges[live].median())
        stats = dataclasses.replace(stats, outliers=float(ranges[live].max()) / median)
    deq = (qw.dequantize() if qw.is_quantized else qw).detach().double()
    if deq.numel() == w.numel():  # an fp16 weight too: exact when fp16 holds it
        stats = dataclasses.replace(stats, exact=bool(torch.equal(deq.reshape(w.shape), w)),
                                    sqnr=sqnr(w, deq.reshape(w.shape)))
    if qw.is_quantized:
        qmin, qmax = QRANGE.get(qw.dtype, (-128, 127))
        per_channel = qw.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric)
        # per channel, float zero points too (a quantized Embedding's
        # per_channel_affine_float_qparams)
        axis = qw.q_per_channel_axis() if per_channel else None
        scales: Any = qw.q_per_channel_scales().double() if per_channel else qw.q_scale()
    elif grid is not None:
        qmin, qmax, axis = grid.qmin, grid.qmax, grid.axis
        per_channel = axis is not None
        scales = grid.scales if per_channel else float(grid.scales[0])
    else:
        return stats
    if per_channel and (axis != 0 or scales.numel() != len(ranges)):
        return dataclasses.replace(stats, per_channel=True)
    util = (ranges / (scales * (qmax - qmin)))[live]
    return dataclasses.replace(stats, per_channel=per_channel, utilisation=float(
        util.median()) if len(util) else None)


_STATIC_PER_CHANNEL = "per_channel_weight_observer (the x86/fbgemm default qconfig's)"
"""The per-channel setting of torch's static flows (eager ``convert``, ``convert_fx``)."""

_DYNAMIC_PER_CHANNEL = (
    "quantize_dynamic(model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}) "
    "(its default, default_dynamic_qconfig, is per-tensor)")
"""The per-channel setting of ``quantize_dynamic`` (its Linear, LSTM, GRU ...)."""

_PT2E_PER_CHANNEL = (
    "a weight QuantizationSpec with qscheme=torch.per_channel_symmetric and ch_axis=0 in the "
    "quantizer's config (X86InductorQuantizer's default config has it)")
"""The per-channel setting of a pt2e quantizer (a functional op's weight in the graph)."""


def _per_channel_setting(module: Any) -> str:
    """What quantizes the weights of the quantized ``module`` per channel in the flow it came
    from; ``module`` ``None``: a functional op of an exported graph (pt2e)."""
    if module is None:
        return _PT2E_PER_CHANNEL
    weight = getattr(module, "weight", None)
    if is_torchao_tensor(weight):
        return per_row_setting(weight)
    return _DYNAMIC_PER_CHANNEL if is_dynamic_module(module) else _STATIC_PER_CHANNEL


def _in_matrix(d: LayerDiagnosis) -> str:
    """Which matrix the weight figures come from, for an op with several; else empty."""
    return f" in `{d.weight_matrix}`" if d.weight_matrix else ""


def _db_below(value: float, threshold: float) -> str:
    """``value`` to one decimal, or as many more as it takes not to read as ``threshold`` (a
    cumulative SQNR of 19.988 dB read "(20.0 dB) is below 20 dB")."""
    for digits in range(1, 7):
        text = f"{value:.{digits}f}"
        if float(text) != threshold:
            return text
    return f"{value:.7g}"


def _flags(d: LayerDiagnosis, first_below: bool, threshold_db: float,
           stays: bool = True, falls: bool = False, before: tuple[str, ...] = (),
           ) -> tuple[Flag, ...]:
    """The causes of a quantized layer, then the amplification flag if ``d`` is the first op
    below the threshold (an op left in float, too), or another op that amplifies the error
    it reads (:func:`_amplifies`), not a residual branch its add dilutes (``stays``): below
    the threshold, or above it in a model whose stream ``falls`` below it somewhere. An op
    holding its readers' input quantize is flagged by :func:`_holder_flags` instead."""
    flags = _layer_flags(d) if d.quantized else []
    cumulative = d.cumulative_sqnr
    if cumulative is not None and (first_below or (
            stays and (cumulative < threshold_db or falls) and _amplifies(d))):
        flags.append(_amplification_flag(d, cumulative, threshold_db, first_below, before))
    return tuple(flags)


def _quantized_before(name: str, reads: dict[str, Any], quantized: Callable[[str], bool],
                      ) -> list[str]:
    """The quantized ops whose values the op ``name`` reads directly or through one op left
    in float, in reading order: what keeping "the layers before it" float means for an op
    that computes in float (MiniLM's output LayerNorm reads ``output.dense`` through the
    residual ``add``; kept float, the model output goes from 8.38 to 9.88 dB under
    quantize_dynamic, 15.07 to 22.54 dB under torchao)."""
    found: list[str] = []
    for source in reads[name].ops:
        step = [source] if quantized(source) else [
            n for n in reads[source].ops if quantized(n)]
        found += [n for n in step if n not in found]
    return found


def _amplifies(d: LayerDiagnosis) -> bool:
    """Whether ``d`` makes the error it reads larger relative to its output by more than
    :data:`_AMPLIFIED_DB`, beyond what it costs by nature (:attr:`LayerDiagnosis.
    expected_sqnr`) and beyond its own error: a float LayerNorm taking MiniLM's residual
    stream from 22.6 to 10.8 dB."""
    amp, cumulative, expected = d.amplification, d.cumulative_sqnr, d.expected_sqnr
    return (amp is not None and amp > _AMPLIFIED_DB and d.stray is None
            and d.input_sqnr is not None and expected is not None and cumulative is not None
            and expected - cumulative > _AMPLIFIED_DB)


def _restored_branches(layers: list[str], reads: dict[str, Any], sums: dict[str, _Sums],
                       kinds: dict[str, str]) -> set[str]:
    """The ops on a residual branch whose add dilutes their error: every op reading their
    value is an ``add`` more than :data:`_AMPLIFIED_DB` above them whose other input (the
    residual stream: another op, or a model input) is at the add's cumulative SQNR or above.
    Such an op is not where the stream falls (MiniLM under quantize_dynamic: its first
    ``attention.output.dense`` at 19.4 dB, its add at 29.5; kept float, the model output goes
    from 8.38 to 8.33 dB; under torchao, ``layer.3.attention.output.dense`` at 13.8 dB, its
    add at 19.8, kept float 15.07 -> 15.05 dB): the add is. Two branches added (neither of
    them the stream) are not."""
    def cumulative(name: str) -> float | None:
        s = sums[name]
        return db(s.cum_signal, s.cum_noise) if s.cum_calls else None

    def dilutes(add: str, branch: float, name: str) -> bool:
        at = cumulative(add)
        if kinds[add] != "add" or at is None or at - branch <= _AMPLIFIED_DB:
            return False
        return bool(reads[add].model_inputs) or any(
            (c := cumulative(other)) is not None and c >= at
            for other in reads[add].ops if other != name)

    readers: dict[str, list[str]] = {}
    for name in layers:
        for source in reads[name].ops:
            readers.setdefault(source, []).append(name)
    return {name for name, by in readers.items()
            if (branch := cumulative(name)) is not None
            and all(dilutes(add, branch, name) for add in by)}


def _layer_flags(d: LayerDiagnosis, reader: str | None = None) -> list[Flag]:
    """What the layer's own quantization does wrong: its floor, weights, clipping, noise.

    ``reader``: ``d`` is an op whose row holds the input quantize of the layer ``reader``
    (:attr:`LayerDiagnosis.rounded_for`), and the flags are ``reader``'s, for its entry: each
    says where it was measured, and that keeping ``reader`` float is the fix."""
    flags: list[Flag] = []
    layer, outputs, grid = "the layer", "the layer's outputs", "its quantized range"
    at, step = "", "output step"
    if reader is not None:
        layer, outputs = f"`{reader}`", f"the values `{reader}` reads"
        grid, step = "its input quantize's range", "input step"
        at = (f"at its input quantize (measured in the row of `{d.call_site}`, which computes "
              f"in float and hands on its value rounded for `{reader}`): ")
    verdict = d.floor
    unexplained = _unexplained(d)
    if unexplained:
        flags.append(Flag(
            "below_floor_unexplained",
            f"local SQNR {d.local_sqnr:.1f} dB, its own grids allow {d.floor_sqnr:.1f} dB "
            f"(its output and weight steps, with its clipping), and its dequantized "
            f"weights{_in_matrix(d)} read {d.weight_sqnr:.1f} dB against the float ones: "
            "neither its scales nor its "
            "weights explain the error, so the quantized op computes something other than its "
            "float twin on its own input and weights (a kernel fault, or a scale or zero point "
            "applied inside the op that its qparams do not show)",
            "compare the quantized op with its float twin run on its dequantized input and "
            "weight, under another quantized engine too (torch.backends.quantized.engine); "
            "keep the layer float (fxnumeric.advise)",
        ))
    elif verdict is not None and verdict.state == "below":
        flags.append(Flag(
            f"below_floor_{verdict.cause}",
            f"{at}local SQNR {d.local_sqnr:.1f} dB, its own grids allow {d.floor_sqnr:.1f} dB: "
            + verdict.text,
            "recalibrate its input quantize" if reader is not None else
            {"offset": "restore the bias (or zero point) the quantized layer lost; compare its "
                       "bias with the float one",
             "scale": "requantize with qparams that fit its values (recalibrate; per-channel "
                      "weights)"}.get(verdict.cause, "recalibrate"),
        ))
    outliers = d.channel_outlier_ratio
    rounded = d.per_channel is False and d.weight_exact is not True  # exact: nothing to fix
    zeros = (f" ({d.zero_channels} of {d.weight_channels} channels are all zero and left out)"
             if d.zero_channels else "")
    if rounded and outliers is not None and outliers > 10:
        flags.append(Flag(
            "weight_outliers",
            f"weight channel ranges differ {d.channel_outlier_ratio:.0f}x under one per-tensor "
            f"scale{_in_matrix(d)}: a typical channel spans {_pct(d.weight_utilisation)} of the "
            f"integer grid{zeros}",
            f"per-channel weights: {d.weight_setting or _STATIC_PER_CHANNEL}",
        ))
    elif rounded and d.weight_utilisation is not None and d.weight_utilisation < 0.1:
        flags.append(Flag(
            "weight_range",
            f"a typical weight channel{_in_matrix(d)} spans only {_pct(d.weight_utilisation)} of "
            f"the integer grid{zeros}",
            f"per-channel weights: {d.weight_setting or _STATIC_PER_CHANNEL}",
        ))
    if d.clipped is not None and d.clipped > 1e-3:
        flags.append(Flag(
            "clipping",
            f"{at}{_pct(d.clipped)} of {outputs} fall outside {grid} and are clipped",
            "recalibrate on data covering this range (a histogram observer if the tail is rare), "
            f"or keep {layer} float",
        ))
    weighted = d.weight_exact is False  # weights whose quantization changes them
    if d.noise_steps is not None and d.noise_steps > 1.0 and not unexplained:
        # (below a floor that holds its clipping and weights: neither is the cause)
        flags.append(Flag(
            "noise",
            f"{at}local error rms is {d.noise_steps:.2f} {step}s, far above rounding noise "
            f"({WHITE_NOISE_STEPS:.2f}): "
            + ("clipping or the weights' quantization" if weighted else "clipping")
            + f", not the {step}",
            ("per-channel weights or recalibration" if weighted and not d.per_channel else
             "recalibration on representative data") + f"; keep {layer} float if it persists",
        ))
    elif (d.noise_steps is not None and d.noise_steps < 0.6 and d.local_sqnr is not None
          and d.local_sqnr < 20):
        flags.append(Flag(
            "coarse_step",
            f"{at}the error is rounding noise ({d.noise_steps:.2f} steps) but the step is coarse "
            "for "
            f"the signal (local SQNR {d.local_sqnr:.1f} dB): a few outliers set the range",
            "a histogram observer if the layer has a MinMax one (the x86/fbgemm defaults "
            f"already use it); else keep {layer} float, or equalization to spread the outliers",
        ))
    return flags


def _holder_flags(d: LayerDiagnosis, first_below: bool, threshold_db: float,
                  ) -> tuple[list[Flag], list[tuple[str, Flag]]]:
    """The flags of an op whose row holds its readers' input quantize
    (:attr:`LayerDiagnosis.rounded_for`: it computes in float, and what its row measures is
    the rounding they asked for), as ``(its own, [(reader, flag), ...])``: the clipping,
    noise and floor flags of that rounding go to each reader, as does the amplification flag
    where that rounding is what puts the op first below ``threshold_db``; the op itself is
    told that keeping it float would not remove them. As the report's verdict blames those
    readers (:func:`fxnumeric.report.verdict.blamed`)."""
    readers = d.rounded_for
    theirs = [(r, f) for r in readers for f in _layer_flags(d, reader=r)]
    own: list[Flag] = []
    cumulative, amp = d.cumulative_sqnr, d.amplification
    if first_below and cumulative is not None:
        if amp is None or d.local_sqnr is None or amp <= _AMPLIFIED_DB:  # the rounding's
            theirs += [(r, _rounding_amplification_flag(d, r, cumulative, threshold_db))
                       for r in readers]
        else:  # from before it, or grown across it: its own message (it computes in float)
            own.append(_amplification_flag(d, cumulative, threshold_db))
    if theirs:
        names = " and ".join(f"`{r}`" for r in readers)
        one = len(readers) == 1
        measured = (f"local SQNR {d.local_sqnr:.1f} dB" if d.local_sqnr is not None
                    else "its error")
        if d.clipped:
            measured += f", {_pct(d.clipped)} clipped"
        own.insert(0, Flag(
            "readers_quantize",
            f"its row holds the input quantize {names} asked for: `{d.call_site}` computes in "
            f"float and hands on its value rounded for {'it' if one else 'them'}, so the error "
            f"measured here ({measured}) is {names}'s input rounding, flagged on "
            f"{'its' if one else 'their'} entr{'y' if one else 'ies'}; keeping "
            f"`{d.call_site}` float would not remove it",
            f"keep {names} float (fxnumeric.advise), or recalibrate "
            f"{'its' if one else 'their'} input quantize",
        ))
    return own, theirs


def _rounding_amplification_flag(d: LayerDiagnosis, reader: str, cumulative: float,
                                 threshold_db: float) -> Flag:
    """The amplification flag of ``reader`` whose input quantize, held in the row of ``d``,
    is where the cumulative SQNR first falls below ``threshold_db`` (``cumulative``)."""
    local = d.local_sqnr
    assert local is not None
    read = (f"; the values `{d.call_site}` reads are at {d.input_sqnr:.1f} dB, and that "
            f"rounding (local SQNR {local:.1f} dB) takes them there"
            if d.input_sqnr is not None else f"; that rounding's local SQNR is {local:.1f} dB")
    return Flag(
        "amplification",
        f"`{reader}`'s input quantize is where the cumulative SQNR first falls below "
        f"{threshold_db:g} dB ({_db_below(cumulative, threshold_db)} dB, measured in the row "
        f"of `{d.call_site}`, which computes in float and hands on its value rounded for "
        f"`{reader}`){read}",
        f"keep `{reader}` float (fxnumeric.advise), or recalibrate its input quantize on data "
        f"covering its range; keeping `{d.call_site}` or the layers before it float would not "
        "remove that rounding",
    )


def _unexplained(d: LayerDiagnosis) -> bool:
    """Whether ``d`` is below its floor (:mod:`fxnumeric.floor`: the error its output and
    weight grids and its clipping allow) without an offset, while its weights dequantize
    more than the floor's margin above the error it adds: its weights do not explain the
    gap, nor do its scales, which the floor is computed from. x86's quantized
    ``ConvTranspose1d`` reads -2.5 dB against a floor of 35.9 dB with weights at 47.9 dB (the
    module against ``F.conv_transpose1d`` on its own dequantized input and weight: -2.3 dB),
    and was said to have "a wrong scale, for the output or the weights. Fix: ... per-channel
    weights"."""
    verdict = d.floor
    return (verdict is not None and verdict.state == "below"
            and unexplained(verdict.cause, d.weight_sqnr, d.local_sqnr))


_CANCELLING = ("add", "sub")
"""Op kinds whose output can be far smaller than their inputs, and their errors not."""

_AMPLIFIED_DB = 3.0
"""dB by which the error must exceed what an op's own error explains (or grow across the op
beyond what it costs by nature, :attr:`LayerDiagnosis.expected_sqnr`) to be read as
amplified: twice the error energy."""

_PRODUCTS = ("mul", "matmul", "div")
"""Op kinds whose output's relative error is the sum of their inputs' (to first order)."""


def _amplification_flag(d: LayerDiagnosis, cumulative: float, threshold_db: float,
                        first: bool = True, before: tuple[str, ...] = ()) -> Flag:
    """Why the first op below the threshold (``cumulative``: its cumulative SQNR) is there:
    its own error, or the error it reads made larger relative to its output; for another op
    below it (not ``first``), that it makes the error it reads larger (:func:`_amplifies`).
    ``before``: the quantized layers an op left in float reads through at most one float op
    (:func:`_quantized_before`), named in its fix."""
    if first:
        head = (f"`{d.call_site}` is the first op where the cumulative SQNR "
                f"({_db_below(cumulative, threshold_db)} dB) is below {threshold_db:g} dB")
    elif cumulative < threshold_db:
        head = (f"`{d.call_site}` is below {threshold_db:g} dB (cumulative SQNR "
                f"{_db_below(cumulative, threshold_db)} dB)")
    else:  # on the way to the first op below the threshold: its drop is carried there
        head = (f"`{d.call_site}` is above {threshold_db:g} dB (cumulative SQNR "
                f"{cumulative:.1f} dB), but the error it makes larger here is carried to "
                f"where the model falls below {threshold_db:g} dB")
    amp, local, read, expected = d.amplification, d.local_sqnr, d.input_sqnr, d.expected_sqnr
    inputs = ", ".join(d.inputs)
    product = ""
    if read is not None and expected is not None and expected < read:
        product = (f"; a product adds its factors' relative errors, which puts it at "
                   f"{expected:.1f} dB by nature")
    if amp is None or local is None or amp <= _AMPLIFIED_DB:
        why = "; mostly its own error"
    elif d.stray is not None:
        # its float twin reads `fcs.1`, but it reads the value of an op only the quantized
        # model has: the drop from `fcs.1` to here is that op's, not an amplification
        why = (f"; the error comes from before it: it reads `{d.stray}`, which the quantized "
               f"model computes and the float model does not (in place of the value of "
               f"{', '.join(d.inputs) or 'its float twin'}), so the error may enter there, "
               f"which no row compares; `{d.call_site}` adds {_own_error(local)}")
    elif read is not None and expected is not None and expected - cumulative > _AMPLIFIED_DB:
        own = ("computes in float in both models and adds " if not d.quantized else "adds ")
        own += f"{'no' if math.isinf(local) else 'little'} error of its own"
        if d.input_quantize:  # the error it reads is its own input rounding, in another row
            own += " past its input quantize"
        why = (f": it falls there from {read:.1f} dB in the values it reads ({inputs}), yet "
               f"`{d.call_site}` {own} (local SQNR {local:.1f} dB): it amplifies the error it "
               f"reads {expected - cumulative:.1f} dB"
               + (f" beyond the {read - expected:.1f} dB a product costs by nature"
                  if product else "")
               + (", as a difference of nearly equal values does (the signal cancels, the "
                  "errors do not)" if d.kind in _CANCELLING else ""))
    elif read is not None:
        why = (f"; the error comes from before it: the values it reads ({inputs}) are at "
               f"{read:.1f} dB already{product}, `{d.call_site}` adds {_own_error(local)}")
    else:  # it reads a value no row measures (computed by code between the regions)
        why = (f"; the error comes from before it: `{d.call_site}` adds {_own_error(local)}. "
               "What it reads is computed by code fxnumeric does not trace (between the "
               "captured regions), whose error no row measures: whether the error grows "
               "across it, or before it, is not known")
    if d.input_quantize and read is not None:
        ops = " and ".join(f"`{op}`" for op, _ in d.input_quantize)
        held = ", ".join(f"`{op}` {sqnr:.1f} dB" for op, sqnr in d.input_quantize)
        why += (f". The values it reads carry its own input quantize: the local error of {ops} "
                f"(local SQNR {held}) is that rounding, {ops} computing in float and "
                f"`{d.call_site}` asking to read the value quantized. Keeping `{d.call_site}` "
                f"float removes it; keeping {ops} float does not")
    if d.stray is not None and amp is not None and amp > _AMPLIFIED_DB:
        fix = (f"check `{d.stray}`, which only the quantized model computes (report.unmatched, "
               "Matching.explain): the drop may be its, which keeping layers float does not "
               "remove")
    elif d.quantized:
        fix = ("keep this layer or the ones before it float (fxnumeric.advise), or cross-layer "
               "equalization")
    else:
        named = (", " + ", ".join(f"`{n}`" for n in before) + " (the quantized layers it "
                 "reads through at most one float op; fxnumeric.advise measures which help; "
                 if before else " (fxnumeric.advise; ")
        fix = (f"keep the layers before it float{named}`{d.call_site}` computes in float "
               "already), so that the values it reads carry less error"
               + ("; or rewrite the model so that it does not subtract nearly equal quantized "
                  "values" if d.kind in _CANCELLING else ""))
    return Flag("amplification", head + why, fix)


def _own_error(local: float) -> str:
    """How much error an op adds of its own, for a message: none, or a little."""
    if math.isinf(local):
        return "no error of its own (local SQNR inf dB)"
    return f"little (local SQNR {local:.1f} dB)"


MAKES_NONFINITE = "the quantized layer makes them"
"""What a quantized layer whose output holds NaN/Inf from finite input is told (its float
twin's stays finite): diagnose's flag and sensitivity's and advise's note say it alike."""

MAKES_NONFINITE_FIX = (
    "check its quantized weight, bias and scales for NaN/Inf or a zero scale; in float16 (or "
    "bfloat16) its quantized kernel may overflow where the float layer does not (float16 ends "
    "at 65504): keep it float, or compute in float32 (quantize a float32 copy of the model, "
    "model.float()); or requantize it")
"""What to do about such a layer (:data:`MAKES_NONFINITE`)."""


def _nonfinite_flag(s: _Sums, float_weight: bool = False) -> Flag | None:
    """Where a layer's values hold NaN/Inf, and from which side, if they do
    (``float_weight``: the layer's float weight holds NaN/Inf itself)."""
    if not (s.quant_nonfinite or s.local_nonfinite or s.float_nonfinite):
        return None
    of = f"of {s.calls} calls"
    if s.quant_nonfinite and not s.local_nonfinite:
        return Flag("nonfinite",
                    f"the quantized layer's output holds NaN/Inf in {s.quant_nonfinite} {of} "
                    f"while its float twin, fed the same input, stays finite: {MAKES_NONFINITE}",
                    MAKES_NONFINITE_FIX)
    if s.local_nonfinite and s.quant_nonfinite:
        return Flag("nonfinite",
                    f"the values this layer reads already hold NaN/Inf ({s.quant_nonfinite} "
                    f"{of}): an op before it, not compared here, made them",
                    "compare() names the first op where NaN/Inf appears on each side")
    if s.local_nonfinite and float_weight:
        return Flag("nonfinite",
                    f"its float weight holds NaN/Inf: its float twin, fed the quantized layer's "
                    f"input, gives NaN/Inf in {s.local_nonfinite} {of} where the quantized layer "
                    "does not",
                    "check the float model's weights (a corrupt checkpoint, a diverged training "
                    "step): the quantized model was made from other values")
    if s.local_nonfinite:
        return Flag("nonfinite",
                    f"its float twin, fed the quantized layer's input, gives NaN/Inf in "
                    f"{s.local_nonfinite} {of} where the quantized layer does not (a float "
                    "overflow, or a float bias or parameter holding NaN/Inf)",
                    "check the float layer's parameters for NaN/Inf, and the layer on inputs of "
                    "this range (its dtype, an overflow)")
    return Flag("nonfinite",
                f"the float model's own output here holds NaN/Inf in {s.float_nonfinite} {of}",
                "check the data and the float model: the quantized model is not the cause")


def _pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.2g}%"


def _pooled_sqnr(read: list[_Sums], input_energy: float, complete: bool) -> float | None:
    """The cumulative SQNR of the values an op reads together (their energies and errors
    summed; ``input_energy``: that of the model inputs it reads, which carry no error), or
    ``None`` without values, with one not measured, or not ``complete`` (a value no row
    measures: pooled over the others alone, it would read too clean or too noisy)."""
    if not complete or not all(s.cum_calls for s in read) or not (read or input_energy):
        return None
    return db(sum(s.cum_signal for s in read) + input_energy, sum(s.cum_noise for s in read))


def _product_sqnr(read: list[_Sums], complete: bool) -> float | None:
    """The SQNR a product of the values read has with their relative errors added (to first
    order, independent errors): ``1 / sum(1 / SQNR_i)`` in linear terms; the model inputs
    among its factors add none."""
    if not complete or not all(s.cum_calls for s in read):
        return None
    return db(1.0, sum(s.cum_noise / s.cum_signal if s.cum_signal else math.inf
                       for s in read if s.cum_noise))


@keeps_buffers
@defers_collection
def diagnose(
    float_model: nn.Module,
    quant_model: nn.Module,
    data: Iterable[Any],
    *,
    threshold_db: float = 20.0,
    matching: Matching | None = None,
    progress: bool | None = None,
    inputs: int | Callable[[Any], Any] | None = None,
    capture: str = "auto",
) -> Diagnosis:
    """Measure why each quantized layer loses accuracy, and flag the usual causes.

    Each op's float twin (its shadow: the float subgraph fed the values the quantized model's
    op reads) gives the local error and the clipping; the float model at the same place gives
    the cumulative error; the weights give range use and outliers. The ops left in float get
    a row too, so that the error amplification is flagged where it happens (a float ``sub``
    cancelling two quantized branches), not at the next quantized layer. Every capture works
    alike (models torch.fx cannot trace whole included).

    Args:
        float_model: the float model (not modified).
        quant_model: the quantized model made from it (not modified).
        data: batches, as :func:`fxnumeric.compare` takes them (tensors, tuples of inputs,
            dicts of keyword inputs).
        threshold_db: cumulative SQNR below which the first such op is flagged.
        matching: a :func:`fxnumeric.match` result to reuse.
        progress: show progress over batches on stderr (default: on a terminal or notebook).
        inputs: what of each batch the models take, as in :func:`fxnumeric.compare`.
        capture: ``"fx"``, ``"export"`` or ``"auto"``, as in :func:`fxnumeric.compare`: the
            first batch is the example input of the capture (an exported graph is specialised
            to its shapes, so every batch must have them). Ignored when ``matching`` is given.

    Returns:
        A :class:`Diagnosis`; ``.text()`` explains each flagged layer, ``.table()`` shows the
        measurements, :func:`annotate` adds the flags to a :class:`fxnumeric.Report`.
    """
    threshold_db = a_number(threshold_db, "threshold_db",
                            "Fix: a cumulative SQNR in dB, e.g. threshold_db=20.0 (the default)")
    batches = model_batches(data, inputs)
    check_devices(float_model, quant_model, batches[0])
    matching = resolve_matching(float_model, quant_model, matching, None, capture=capture,
                                example_inputs=batches[0], validate=False)
    check_pairable(matching)  # as compare: an unrelated pair is refused, not "no layer flagged"
    # what crosses into each region (a model captured through its module tree), by one run
    # each call site apart, as the report's rows (`fc2`, `fc2#2`): a module called twice reads
    # other values, and is read by other ops, at each call
    reads = op_reads(matching, value_sources(matching, batches[0]), call_sites=True)
    read_inputs = {place for r in reads.values() for place in r.model_inputs}
    input_energy = dict.fromkeys(read_inputs, 0.0)
    layers = list(dict.fromkeys(p.name for p in matching.pairs))
    quantized = {p.name for p in matching.pairs if p.quantized}
    # an op left in float hands on the quantize in front of its quantized readers (a
    # quantized tensor, a grid's clipping) but computes in float all the same
    rounded_after = {p.name for p in matching.pairs if matching.region_of(p).hands_on_rounded(p)}
    # the ops whose rows hold a layer's own input quantize (its request), by that layer
    # and the other way: the readers whose input quantize an op's row holds, by that op
    rounded_for: dict[str, set[str]] = {}
    holds: dict[str, list[str]] = {}
    for p in matching.pairs:
        for reader in matching.region_of(p).rounded_for(p):
            rounded_for.setdefault(reader.name, set()).add(p.name)
            if reader.name not in holds.setdefault(p.name, []):
                holds[p.name].append(reader.name)
    sums = {name: _Sums() for name in layers}
    kinds = {p.name: p.kind for p in reversed(matching.pairs)}
    twins: list[_FloatValues] = []

    def outputs(pair: Pair) -> tuple[nn.Module, nn.Module]:
        twins.append(_FloatValues())
        return twins[-1], Logger()

    floors: dict[str, list[tuple[Pair, FloorSums]]] = {}

    def shadows(pair: Pair) -> nn.Module:
        twin = twins[-1]  # instrument builds a pair's output observers, then its shadow
        region = matching.region_of(pair)
        if not pair.quantized:  # no floor. An input quantize computing in float (pt2e's
            # quantize_per_tensor: no quantized tensor) has the grid its arguments say
            grid = (grid_before(region.quant_view, region.output_nodes(pair)[1])
                    if pair.kind == "quantize" else None)
            return _LocalError(sums[pair.name], twin, None, grid, routes.get(pair.name))
        sums_of_floor = floor_sums(region, pair)
        floors.setdefault(pair.name, []).append((pair, sums_of_floor))
        return _LocalError(sums[pair.name], twin, sums_of_floor, routes=routes.get(pair.name))

    # as compare's rows: the ops inside a module that routes rows (a mixture of experts, a
    # detector's box head) read no cumulative error from a call routed unlike the float one
    routes, watched = watch(matching, _NO_TURN)
    built = instrument(matching, outputs=outputs, shadows=shadows)
    hook_watched(watched, built.float_model, built.quant_model, matching)
    with Progress(len(batches), "diagnosing", progress) as bar:
        for batch in batches:
            run_model(built.float_model, batch, which="float")
            # NaN/Inf made inside? the sums say where, as below
            run_blaming_inside(run_model, built.quant_model, batch, "quantized",
                               lambda: next(((name, kinds[name]) for name in layers
                                             if sums[name].quant_nonfinite), None))
            for place, tensor in model_inputs(batch).items():
                if place in input_energy:
                    input_energy[place] += float(tensor.detach().double().square().sum())
            for twin in twins:
                twin.pending.clear()
            for _, _, watching in watched:
                watching.clear()
            bar.update()

    # an op with several weight matrices (an LSTM's, per layer, direction and gate input)
    # is judged by its worst one: one outlier row in one of them costs the whole layer. The
    # weights are the module's, shared by its call sites
    weights: dict[str, tuple[_WeightStats, str]] = {}
    settings: dict[str, str] = {}
    sqnrs: list[tuple[str, float]] = []
    for w in pair_weights(matching, as_computed=True):
        if w.pair.name not in settings:
            settings[w.pair.name] = _per_channel_setting(
                layer_module(matching.region_of(w.pair), w.pair))
        # a weight held in a graph (pt2e) arrives dequantized: its grid is its dequantize's;
        # a torchao one too: its grid is the tensor's scale, read before it was dequantized
        grid = (None if w.quant_weight.is_quantized
                else w.grid or functional_weight_grid(matching.region_of(w.pair), w.pair))
        name, stats = w.pair.name, _weight_stats(w.float_weight, w.quant_weight, grid)
        if name not in weights or _worse(stats, weights[name][0]):
            weights[name] = (stats, w.matrix)
        if stats.sqnr is not None:
            sqnrs.append((w.pair.name, stats.sqnr))
    # as compare, sensitivity and advise: a model of other weights is said, not diagnosed
    # as if its every layer were badly quantized
    foreign = warn_foreign_weights(sqnrs, "the quantized model's weights", "Every flag then "
                                   "describes two different models, not the quantization")
    paths = {name: module_path(matching, op_name(name)) for name in layers}
    ops_at: dict[str, set[str]] = {}
    for name, path in paths.items():
        ops_at.setdefault(path, set()).add(op_name(name))
    sites = {name: name if len(ops_at[path]) > 1 else path + name[len(op_name(name)):]
             for name, path in paths.items()}  # LayerDiagnosis.call_site
    restored = _restored_branches(layers, reads, sums, kinds)
    # once the stream falls below the threshold somewhere, every op on the way that made the
    # error it reads larger is flagged too, above the threshold as well: each such drop is
    # carried to the output (torchao MiniLM: its output LayerNorms lose 6.6, 4.7 and 8.2 dB
    # at 31-37 dB, and its first output.dense kept float lifts the output 15.1 -> 22.5 dB)
    falls = any(n not in restored and sums[n].cum_calls
                and db(sums[n].cum_signal, sums[n].cum_noise) < threshold_db for n in layers)
    diagnosed: list[LayerDiagnosis] = []
    first_below = nonfinite = None
    handed: dict[str, list[Flag]] = {}  # by reader: the flags its input quantize's row gave
    clean: set[str] = set()  # the entries before any NaN/Inf
    for name in layers:
        s = sums[name]
        stats, matrix = weights.get(name, (_WeightStats(), ""))
        step = next(iter(s.steps)) if len(s.steps) == 1 else None
        floor, floor_verdict = None, None
        if len(floors.get(name, ())) == 1:  # one pair: its floor is the row's
            pair, sums_of_floor = floors[name][0]
            floor, floor_verdict = layer_floor(matching.region_of(pair), pair, sums_of_floor,
                                               signal=s.local_signal, noise=s.local_noise,
                                               count=s.count)
        read = reads[name]
        read_sums, complete = [sums[n] for n in read.ops], not read.unresolved
        stray = built.strays.get(name)
        # reading an op the float model lacks, it does not read what `read` measures: the
        # drop from there would be that op's, not this one's amplification
        input_sqnr = None if stray is not None else _pooled_sqnr(
            read_sums, sum(input_energy[p] for p in read.model_inputs), complete)
        d = LayerDiagnosis(
            name=name, module=paths[name], site=sites[name], kind=kinds[name],
            per_channel=stats.per_channel, weight_utilisation=stats.utilisation,
            channel_outlier_ratio=stats.outliers, weight_matrix=matrix or None,
            zero_channels=stats.zero_channels, weight_channels=stats.channels,
            weight_exact=stats.exact, float_weight_nonfinite=stats.nonfinite,
            weight_setting=settings.get(name) if stats.per_channel is not None else None,
            weight_sqnr=stats.sqnr,
            clipped=s.clipped / s.count if s.quantized and s.count else None,
            noise_steps=math.sqrt(s.local_noise / s.count) / step if step and s.count else None,
            local_sqnr=db(s.local_signal, s.local_noise) if s.count else None,
            cumulative_sqnr=db(s.cum_signal, s.cum_noise) if s.cum_calls else None,
            floor_sqnr=floor, floor=floor_verdict,
            # an op whose row holds its readers' input quantize computes in float: that
            # rounding is theirs (flagged on them), not its own
            quantized=name not in holds and (
                name in quantized or kinds[name] == "quantize"
                or (s.quantized and name not in rounded_after)),
            rounded_for=tuple(sites[n] for n in holds.get(name, ())),
            inputs=tuple(sites[n] for n in read.ops),
            input_sqnr=input_sqnr,
            stray=stray[0] if stray is not None else None,
            input_quantize=tuple((sites[n], db(sums[n].local_signal, sums[n].local_noise))
                                 for n in read.ops
                                 if n in rounded_for.get(name, ()) and sums[n].count),
            expected_sqnr=(_product_sqnr(read_sums, complete)
                           if kinds[name] in _PRODUCTS and input_sqnr is not None
                           else input_sqnr),
        )
        if nonfinite is not None:  # poisoned sums: nothing to draw from them
            diagnosed.append(d)
            continue
        poisoned = _nonfinite_flag(s, stats.nonfinite)
        if poisoned is not None:
            nonfinite = d.call_site
            diagnosed.append(dataclasses.replace(d, flags=(poisoned,)))
            continue
        # a residual branch whose add dilutes its error is not where the model's values fall
        # below the threshold (MiniLM's attention.output.dense at 19.4 dB, its add at 29.5
        # dB: keeping it float took the output from 8.38 to 8.33 dB); its add is
        is_first = (first_below is None and d.cumulative_sqnr is not None
                    and d.cumulative_sqnr < threshold_db and name not in restored)
        if is_first:
            first_below = d.call_site
        if d.rounded_for:  # what its row measures is its readers' input quantize: theirs
            own, theirs = _holder_flags(d, is_first, threshold_db)
            for reader, flag in theirs:
                handed.setdefault(reader, []).append(flag)
            diagnosed.append(dataclasses.replace(d, flags=tuple(own)))
        else:
            diagnosed.append(dataclasses.replace(
                d, flags=_flags(d, is_first, threshold_db, name not in restored, falls, tuple(
                    sites[n] for n in _quantized_before(name, reads, quantized.__contains__)))))
        clean.add(d.call_site)
    # the flags measured in the row holding a reader's input quantize go on the reader's entry
    # (a reader after the first NaN/Inf is left unflagged, as every layer there is)
    diagnosed = [dataclasses.replace(d, flags=(*handed[d.call_site], *d.flags))
                 if d.call_site in handed and d.call_site in clean else d for d in diagnosed]
    return Diagnosis(tuple(diagnosed), threshold_db, first_below, len(batches), nonfinite,
                     foreign.partition("\n")[0], called_whole(matching, layers))


def annotate(report: Report, diagnosis: Diagnosis) -> Report:
    """``report`` with each row's ``flags`` set from ``diagnosis`` (a new Report)."""
    by_name = {d.name: d for d in diagnosis.layers}
    rows = tuple(
        dataclasses.replace(r, flags=tuple(f.code for f in by_name[r.name].flags))
        if r.name in by_name else r
        for r in report.rows
    )
    return dataclasses.replace(report, rows=rows)
