"""Stage 5, compare: per-layer metrics for a float/quantized pair over many batches, in one call.

For each batch the float graph runs first; its loggers keep only that batch's outputs. The
quantized graph runs next; each of its loggers compares its output with the float twin's and
adds to running sums (:class:`fxnumeric.metrics.Accumulator`), then the float outputs are
dropped. Shadows compare each quantized op with a copy of its float subgraph fed the same
dequantized input. Peak memory is one batch of activations, whatever the number of batches.

Nothing runs on input that cannot give honest numbers: ``data`` and the first batch are checked
before tracing (:func:`fxnumeric.run.check_data`, :func:`fxnumeric.run.check_batch`), a pair of
models with no op in common or a quantized model passed as the float one is refused before any
batch runs, and a batch holding NaN/Inf is left out of every metric with a warning. NaN/Inf
that a model produces itself is traced to the first layer where it appears, on each side.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._collector import defers_collection
from ._tensors import (
    after_loss,
    copy_values,
    detach,
    first_output,
    model_output,
    output_part,
    part_note,
    version,
)
from .blocks import Block, find_blocks
from .capture import LeafSpec
from .dataflow import upstream_ops
from .distributed import ONE_PROCESS, Ranks, data_parallel
from .errors import FxNumericWarning, InputError, about_variant
from .floor import FloorState, FloorSums, floor_sums, layer_floor
from .guards import check_pairable, check_variants, contents, warn_foreign_weights
from .instrument import Instrumented, instrument, observe_values, resolve_matching
from .llm_metrics import (
    LLM_METRICS,
    LogitsAccumulator,
    LogitsReader,
    LogitsState,
    logits_reader,
    looks_like_logits,
    output_mask,
)
from .lockstep import Lockstep
from .loggers import Logger
from .match import Matching, Pair
from .metrics import (
    BUILTIN_METRICS,
    Accumulator,
    AccumulatorState,
    MetricFn,
    aminmax,
    check_precision,
    histogram_counts,
    prepare_actual,
)
from .pairing import op_name
from .progress import Progress, phase
from .report import BlockRow, Report, ReportRow, WeightHistogram, activation_scale
from .report.verdict import compares_detections
from .routing import Routes, hook_calls, hook_watched, watch
from .rows import LinearRows
from .run import (
    as_batches,
    check_batch,
    check_data,
    check_devices,
    check_max_batches,
    keeps_buffers,
    no_batches,
    nonfinite_inputs,
    pick_inputs,
    put_back,
    run_blaming_inside,
    run_model,
    saved_buffers,
)
from .semantics import QuantGrid, output_bound
from .weights import pair_weights

__all__ = ["compare", "COMPARISONS"]

COMPARISONS = ("weights", "outputs", "shadows", "blocks")


class _QuantValue:
    """A pair's quantized output in the current batch, dequantized once with its energy.

    The output comparator and the shadow of a pair both read it; sharing saves one
    dequantize and one reduction per pair and batch (metrics are memory-bound). Nothing here
    keeps the output alive: it is held by a weak reference, and its dequantized (or float32)
    copy is dropped when the output dies, so a batch's outputs are freed as the model frees
    them (held to the end of the batch, they took compare's peak with shadows on one
    512-token SmolLM2 sequence from 763 to 980 MiB).
    """

    def __init__(self, precision: torch.dtype) -> None:
        self.precision = precision
        self._seen: weakref.ref[torch.Tensor] | None = None
        self._copy: torch.Tensor | None = None  # when reading made one
        self._energy: float | None = None

    def get(self, x: Any) -> tuple[Any, float | None]:
        if not isinstance(x, torch.Tensor):
            return x, None
        if self._seen is None or self._seen() is not x:
            value, self._energy = prepare_actual(x, self.precision)
            self._copy = None if value is x else value
            self._seen = weakref.ref(x, self._dropped)
        return (x if self._copy is None else self._copy), self._energy

    def _dropped(self, ref: weakref.ref[torch.Tensor]) -> None:
        if ref is self._seen:
            self.clear()

    def clear(self) -> None:
        self._seen = self._copy = self._energy = None


class _FloatOutputs(Logger):
    """Keeps the float outputs of the current batch, in call order, for the quantized twin.

    A value a submodule returns may be written into by the model's own code before the
    quantized side compares it (Falcon's ``mlp_output += attention_output``). It is not
    copied up front (every value a region returns, a 512-token SmolLM2's 96 MiB logits
    among them): its version counter, read when it is kept and again when it is compared,
    says whether it was written into; the twin then keeps copies from there on (``copies``)
    and the comparator skips the stale value (``overwritten``; :func:`_run` runs a first batch
    that saw one again).
    """

    checks_overwrites = True  # instrument.graph: no copy of a value the region returns
    takes_linear = True  # instrument.graph: a Linear's output comes with its call

    def __init__(self, turn: _Turn | None = None, by_rows: bool = False) -> None:
        super().__init__()
        self.by_rows = by_rows
        """Whether a large Linear's output is kept as its rows (:class:`LinearRows`): its
        comparator's sums add up over rows (no custom metric, no kept tensors)."""
        self.pending: list[Any] = []
        self.versions: list[int | None] = []
        self.copies = False
        self.overwritten = False
        self.misrouted = False
        """Set once a call of this batch was misrouted (:mod:`fxnumeric.routing`): the float
        and quantized calls after it are out of step too, so the batch's are left out."""
        self.turn = turn if turn is not None else _Turn()

    def forward(self, x: Any, *call: Any) -> None:
        output = first_output(x)
        value = detach(output)
        if call and self.by_rows:  # (linear module or None for F.linear, args, kwargs)
            linear, args, kwargs = call
            # of the output itself (not the detached alias), which the model may return
            rows = LinearRows.of(output, F.linear if linear is None else linear, args, kwargs)
            if rows is not None:
                self.turn.as_rows.append(rows)
                value = rows  # the output itself is not held: rows are computed when read
        self.add(value)

    def add(self, value: Any) -> None:
        """Keep ``value``: a copy once values were seen overwritten, or when it keeps no
        version (a tensor made under ``torch.inference_mode``)."""
        kept = version(value)
        if self.copies or (kept is None and isinstance(value, torch.Tensor)):
            value = copy_values(value)
            kept = version(value)
        self.pending.append(value)
        self.versions.append(kept)
        if self.turn.lockstep is not None:
            self.turn.lockstep.produced(value)

    def take(self) -> tuple[Any, bool]:
        """The oldest value kept, and whether it is still as the layer made it."""
        value, kept = self.pending.pop(0), self.versions.pop(0)
        fresh = kept is None or version(value) == kept
        self.overwritten |= not fresh
        return value, fresh

    def clear(self) -> None:
        self.pending.clear()
        self.versions.clear()
        self.misrouted = False


class _Turn:
    """The batch's :class:`~fxnumeric.lockstep.Lockstep`, which bounds the float values held,
    shared by a plan's float twins and set once per batch (``None``: the float model runs
    whole first, as several variants' shared float model does)."""

    lockstep: Lockstep | None = None
    as_rows: list[LinearRows]
    """The float values of the batch the twins keep as rows (large Linears' outputs)."""

    def __init__(self) -> None:
        self.as_rows = []


class _CompareToFloat(Logger):
    """Compares each quantized output with the float twin's pending output (not when the
    module running the layer routed its rows unlike the float model: ``routes``)."""

    def __init__(self, twin: _FloatOutputs, acc: Accumulator, value: _QuantValue,
                 routes: Routes | None = None) -> None:
        super().__init__()
        self.twin = [twin]  # a list, so the twin is not registered as a submodule
        self.acc = acc
        self.value = value
        self.routes = routes
        self.reads_at_call = acc.kept is None  # sums it, keeps nothing (see instrument.graph)

    def forward(self, x: Any) -> None:
        twin = self.twin[0]
        lockstep = twin.turn.lockstep
        if twin.misrouted or (self.routes is not None and self.routes.misrouted):
            self._left_out(twin, lockstep)
            return
        if not twin.pending and lockstep is not None:
            lockstep.need(twin)  # the float model runs until it has this value
        if twin.pending:
            ref, fresh = twin.take()
            if fresh:
                if lockstep is not None:
                    lockstep.reading(ref)
                actual, energy = self.value.get(first_output(x))
                self.acc.update(ref, actual, actual_energy=energy)
            else:  # written into since the layer returned it: not what it computed
                self.acc.overwritten += 1
            if lockstep is not None:
                lockstep.consumed(ref)

    def _left_out(self, twin: _FloatOutputs, lockstep: Lockstep | None) -> None:
        """A misrouted call: the float value it would read, if made yet, is dropped unread
        (the rest of the batch's are dropped at its end)."""
        if not twin.misrouted:
            twin.misrouted = True
            self.acc.misrouted += 1
        if twin.pending:
            ref, _ = twin.take()
            if lockstep is not None:
                lockstep.consumed(ref)


class _ShadowMetrics(Logger):
    """Compares a quantized output with its float twin's (the shadow); for a quantized layer
    it also sums what the layer's floor needs (:class:`fxnumeric.floor.FloorSums`)."""

    def __init__(self, acc: Accumulator, value: _QuantValue, floor: FloorSums | None) -> None:
        super().__init__()
        self.acc = acc
        self.value = value
        self.floor = floor
        self.takes_inputs = floor is not None  # the shadow hands over what it read
        self.reads_at_call = acc.kept is None
        # a large Linear's shadow may come a block of rows at a time (RowShadow): sums add
        # up over rows; kept tensors and custom metrics (a mean per call) do not
        self.takes_rows = acc.additive and (floor is None or floor.adds_over_rows)

    def forward(self, x: Any, y: Any, *inputs: Any) -> None:  # type: ignore[override]
        quant, ref = first_output(x), first_output(y)
        actual, energy = self.value.get(quant)
        self.acc.update(ref, actual, actual_energy=energy)
        floor = self.floor
        if floor is not None and isinstance(ref, torch.Tensor) and isinstance(actual,
                                                                            torch.Tensor):
            if floor.grid is None and isinstance(quant, torch.Tensor) and quant.is_quantized:
                floor.grid = QuantGrid.of(quant)  # the output step the op itself produced
            floor.update(actual, ref, inputs)

    def observe_rows(self, x: torch.Tensor, blocks: Iterator[tuple[int, torch.Tensor]],
                     *inputs: Any) -> None:
        """Compare quantized output ``x`` with its float twin given a block of rows at a time
        (:class:`fxnumeric.instrument.graph.RowShadow`): one batch of the accumulator, the
        floor's input read once, its output sums added block by block."""
        actual, energy = self.value.get(x)
        floor = self.floor
        if floor is not None:
            if floor.grid is None and x.is_quantized:
                floor.grid = QuantGrid.of(x)
            floor.update_input(inputs)
        rows = actual.flatten(0, -2)

        def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for start, ref in blocks:
                part = rows[start:start + ref.shape[0]]
                if floor is not None:
                    floor.update_output(part, ref)
                yield ref, part
                del ref, part  # before the next block is computed

        self.acc.update_rows(pairs(), actual_energy=energy)


MetricSpec = Iterable[str | MetricFn] | dict[str, MetricFn] | None


def _resolve_metrics(metrics: MetricSpec) -> tuple[list[str], dict[str, MetricFn]]:
    if metrics is None:
        return list(BUILTIN_METRICS), {}
    if isinstance(metrics, dict):
        for name in metrics:
            _check_custom_name(name, set())
        return list(BUILTIN_METRICS) + list(metrics), dict(metrics)
    names: list[str] = []
    custom: dict[str, MetricFn] = {}
    for m in metrics:
        if isinstance(m, str):
            if m not in BUILTIN_METRICS:
                raise InputError(f"unknown metric {m!r}; built-in metrics are "
                                 f"{', '.join(BUILTIN_METRICS)}, or pass a function "
                                 "(ref, actual) -> float")
            names.append(m)
        elif callable(m):
            name = getattr(m, "__name__", f"metric_{len(custom)}")
            _check_custom_name(name, custom)
            custom[name] = m
            names.append(name)
        else:
            raise InputError(f"metrics entries must be names or functions, got {m!r}")
    return names, custom


def _check_custom_name(name: Any, taken: Mapping[str, Any] | set[str]) -> None:
    """A custom metric's name must be a string no built-in, no LLM output metric and no
    other metric has: one would silently replace the other's column (the model output's
    ``kl`` would read the LLM metric, not the user's)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"a custom metric's name must be a non-empty string, got {name!r}")
    if name in BUILTIN_METRICS or name in LLM_METRICS or name in taken:
        what = ("a built-in metric" if name in BUILTIN_METRICS else
                "an LLM output metric" if name in LLM_METRICS else "another metric's name")
        raise InputError(
            f"custom metric name {name!r} is {what}: its column would replace the other's.\n"
            "Fix: pass metrics as a dict with names of your own, e.g. metrics={"
            f"'my_{name.strip('<>')}': fn}}")


def _finite_values(x: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``x`` and its range; only its finite values when it holds NaN/Inf (a weight that
    dequantizes to NaN: torchao's float8 on a CPU), which the histogram leaves out and the
    row's note reports."""
    low, high = aminmax(x) if x.numel() else (0.0, 0.0)
    if math.isfinite(low) and math.isfinite(high):
        return x, low, high
    kept = x[torch.isfinite(x)]
    return kept, *(aminmax(kept) if kept.numel() else (0.0, 0.0))


def _histogram(matrices: list[tuple[torch.Tensor, torch.Tensor]], bins: int = 60
               ) -> WeightHistogram:
    """One histogram of a layer's ``(float, quantized)`` weight matrices together (an LSTM's
    eight: it showed ``weight_ih_l0`` alone), over the range of them all."""
    # read in the weights' own dtype, converted a chunk at a time (histogram_counts): a float32
    # copy of a bfloat16 model's 49152 x 576 embedding, twice, was most of compare's peak
    read = [(_finite_values(ref.detach()),
             _finite_values(actual.dequantize() if actual.is_quantized else actual.detach()))
            for ref, actual in matrices]
    lo = min(min(r_lo, a_lo) for (_, r_lo, _), (_, a_lo, _) in read)
    hi = max(max(r_hi, a_hi) for (_, _, r_hi), (_, _, a_hi) in read)
    if lo == hi:
        hi = lo + 1.0
    float_counts, quant_counts = [0] * bins, [0] * bins
    for (r, _, _), (a, _, _) in read:
        counts = histogram_counts(r, bins, lo, hi)
        # a layer left float has one weight on both sides (an LLM's tied embedding, 28M values)
        same = a.shape == r.shape and a.dtype == r.dtype and bool(torch.equal(a, r))
        for total, add in ((float_counts, counts),
                           (quant_counts, counts if same else histogram_counts(a, bins, lo, hi))):
            total[:] = [t + c for t, c in zip(total, add, strict=True)]
    return WeightHistogram(lo, hi, tuple(float_counts), tuple(quant_counts))


_WEIGHT_CHUNK = 1 << 20


def _add_weights(acc: Accumulator, float_weight: torch.Tensor,
                 quant_weight: torch.Tensor) -> None:
    """Add one weight pair to ``acc`` (float64), a chunk of values at a time: a float64 copy
    of a large weight, of its twin and of their difference at once (680 MB for a 49152 x 576
    embedding) was most of compare's peak memory on an LLM. The sums are the same up to the
    order of float64 additions."""
    fw = float_weight.detach()
    qw = quant_weight.dequantize() if quant_weight.is_quantized else quant_weight.detach()
    if fw.shape != qw.shape or fw.numel() <= _WEIGHT_CHUNK:
        acc.update(fw, qw)
        return
    fw, qw = fw.reshape(-1), qw.reshape(-1)
    for start in range(0, fw.numel(), _WEIGHT_CHUNK):
        acc.update(fw[start:start + _WEIGHT_CHUNK], qw[start:start + _WEIGHT_CHUNK])


@keeps_buffers
@defers_collection
def compare(
    float_model: nn.Module,
    quant_model: nn.Module | Mapping[str, nn.Module],
    data: Iterable[Any],
    *,
    comparisons: Iterable[str] = COMPARISONS,
    metrics: MetricSpec = None,
    keep_activations: bool = False,
    matching: Matching | Mapping[str, Matching] | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
    progress: bool | None = None,
    max_batches: int | None = None,
    precision: torch.dtype = torch.float32,
    inputs: int | Callable[[Any], Any] | None = None,
    capture: str = "auto",
    distributed: bool | None = None,
) -> Report:
    """Compare a float model with its quantized counterpart, layer by layer, over ``data``.

    Args:
        float_model: the float model (not modified).
        quant_model: the quantized model (not modified), or several quantized variants of
            the float model, ``{"fx": q1, "pt2e": q2, "dynamic": q3}``: the float model then
            runs once per batch (once per float capture, see *Variants* below) and each
            variant against it.
        data: an iterable of batches (a DataLoader works); each batch is a tensor, a tuple
            of positional inputs or a dict of keyword inputs (``{"input_ids": ids,
            "attention_mask": mask}``). A single tensor is one batch. For a labelled
            DataLoader that yields ``(x, label)``, pass ``inputs=0``.
        comparisons: any of ``"weights"``, ``"outputs"`` (cumulative error: both models
            run on the same input), ``"shadows"`` (local error: each quantized op against
            its float twin fed the same dequantized input) and ``"blocks"`` (what enters each
            block and what it adds: ``Report.blocks``); default :data:`COMPARISONS`, all four.
        metrics: built-in metric names (``sqnr``, ``cosine``, ``mse``, ``max_abs_error``)
            and/or functions ``fn(ref, actual) -> float`` (or a ``{name: fn}`` dict, added to
            the built-ins). User metrics are averaged over batches.
        keep_activations: keep every logged ``(float, quantized)`` tensor pair in
            ``row.activations`` (memory then grows with the data).
        matching: a :func:`fxnumeric.match` result to reuse; it must have been built from
            ``float_model`` and ``quant_model`` (with variants: ``{name: matching}`` for
            some or all of them). One made without example inputs of a model captured
            through the module tree (``match(f, q)`` of a Hugging Face model) is put in the
            order the quantized model runs its pairs on the first batch, so the rows are in
            run order either way (:func:`fxnumeric.match.with_recorded_run`).
        leaf_modules: module types or names to keep whole when tracing.
        progress: show progress on stderr: tracing and pairing, the batches, the weight
            comparison (default: when stderr is a terminal or in a Jupyter notebook).
        max_batches: stop after this many batches (a positive int; None: every batch).
        precision: dtype of the per-batch reductions, ``torch.float32`` or ``torch.float64``
            (:data:`fxnumeric.metrics.PRECISIONS`; not the models' dtype: half-precision
            activations are read in float32); sums over batches are always float64 (see
            :mod:`fxnumeric.metrics`). ``torch.float64`` is exact and about six times slower
            per activation.
        inputs: what of each batch the models take: an index (``inputs=0`` feeds
            ``batch[0]``, dropping the labels of a ``(x, label)`` loader) or a function
            ``inputs(batch)`` returning the input or a tuple of inputs. Default: the whole
            batch.
        capture: ``"fx"``, ``"export"`` or ``"auto"``, as in :func:`fxnumeric.match`; the
            first batch is the example input of the capture (for ``torch.export``, whose graph
            is specialised to its shapes, so every batch must have them; for a model torch.fx
            cannot trace whole, it records how each submodule is called, so that modules with
            optional arguments are traced too). Ignored when ``matching`` is given: it was
            captured already.
        distributed: data-parallel over a ``torch.distributed`` process group (``torchrun``):
            every rank passes the same models and ``data``, rank ``r`` of ``N`` runs the
            batches ``i % N == r``, the sums are merged, and every rank returns the same
            report, equal to a one-process run over all batches (:mod:`fxnumeric.distributed`).
            ``None`` (default): when a group of two or more ranks is initialised; ``False``:
            each rank compares all of its ``data`` alone. Every rank must then call
            compare: pass ``False`` for a call on one rank only (``if rank == 0``), which
            would otherwise wait for the others until the process group's timeout.

    Returns:
        A :class:`fxnumeric.Report` with one row per paired layer.

    Variants:
        With a dict of quantized models, the report is the first variant's report with
        ``report.variants`` holding each variant's own report (equal to comparing it alone)
        and ``report.aligned`` their layers aligned by the float value each compares; its
        table, CSV, HTML and summary show a column group (a chart line) per variant and name
        the best variant. Variants whose float graphs are one capture (the same regions, the
        same node names: an ``nn.Module`` float model against FX, eager, dynamic, torchao and
        pt2e variants alike) share one float model instrumented for all of them; a variant
        whose float capture differs gets a float run of its own, and ``report.notes`` says so.
        Names are non-empty strings other than ``"float"`` and ``"quantized"``, what
        :func:`fxnumeric.advise` names its choices
        (:data:`fxnumeric.guards.RESERVED_VARIANT_NAMES`).

    Raises:
        InputError: before any batch runs, when ``data`` is not an iterable of batches, a
            batch is ``None``, a string, a number or empty, ``precision`` is neither
            ``torch.float32`` nor ``torch.float64``, the models have no op in common
            (nothing paired) or the "float" model is quantized too (the quantized model
            passed twice). A batch holding NaN/Inf (of a sparse tensor, in its stored
            values) is not an error: it is left out of every
            metric with a :class:`fxnumeric.FxNumericWarning`, and ``Report.notes`` says which.
            Nor is a quantized model whose weights do not look made from the float model's
            (weight SQNR below 0 dB on most quantized layers: another seed or checkpoint): a
            warning, and a note.

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> f = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        >>> q = quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
        >>> report = compare(f, q, [torch.randn(4, 8) for _ in range(3)])
        >>> [row.name for row in report.rows], report.batches
        (['0', '1'], 3)
    """
    check_data(data)
    check_max_batches(max_batches)
    check_precision(precision)
    data = as_batches(data)  # one tensor, or one dict of keyword inputs, is one batch
    ranks = data_parallel(distributed, data)
    if ranks.rank:
        progress = False  # one progress bar per terminal: rank 0's
    if isinstance(quant_model, Mapping):
        return _compare_variants(
            float_model, quant_model, data, comparisons=comparisons, metrics=metrics,
            keep_activations=keep_activations, matching=matching, leaf_modules=leaf_modules,
            progress=progress, max_batches=max_batches, precision=precision, inputs=inputs,
            capture=capture, ranks=ranks)
    if isinstance(matching, Mapping):
        raise InputError("matching is a dict of variants' matchings, but quant_model is one "
                         "model.\nFix: pass matching=fxnumeric.match(float_model, quant_model)"
                         ", or quant_model={name: model} beside the dict")
    if float_model is quant_model and float_model is not None:
        raise InputError(
            f"the same {type(float_model).__name__} object was passed as float_model and "
            "quant_model: compare needs the float model and the quantized model made from "
            "it.\nFix: keep the float model before quantizing (float_model = "
            "copy.deepcopy(model) before prepare / quantize_dynamic) and pass both")
    total = _length(data, max_batches)
    example, data = _first_batch(data, inputs, max_batches)
    plan = _plan(float_model, quant_model, comparisons, metrics, keep_activations, matching,
                 leaf_modules, precision, progress, capture, example)
    ran = _run(plan, data, progress, max_batches, inputs, total, ranks)
    return _collect(plan, ran, progress)


@dataclass
class _FirstPart:
    """Where the compared model output sits in what the float model returns, and how many
    tensors that holds (:func:`~fxnumeric._tensors.output_part`; ``None`` before a batch ran),
    read on the batch of the lowest index compared. Its own merged state
    (:meth:`fxnumeric.distributed.Ranks.reduce`): a rank that ran no batch (its one batch held
    NaN) reports what the others read, as one process over every batch would."""

    index: int | None = None
    part: tuple[str, int] | None = None
    returned: str = ""
    """The type of what the float model returned (``"tuple"``), for a note when it holds no
    tensor."""
    loss: bool = False
    """Whether it returned a scalar loss first, which the part read skips."""

    def see(self, index: int, float_out: Any) -> None:
        """Read ``float_out``, what the float model returned on batch ``index``, if it is the
        first batch."""
        if self.part is None:
            self.index, self.part = index, output_part(float_out)
            self.returned = type(float_out).__name__
            self.loss = after_loss(float_out) is not float_out

    def state(self) -> _FirstPart:
        return _FirstPart(self.index, self.part, self.returned, self.loss)

    def load(self, state: _FirstPart) -> None:
        self.index, self.part, self.returned = state.index, state.part, state.returned
        self.loss = state.loss

    def merged(self, other: _FirstPart) -> _FirstPart:
        """The part read on the earlier batch of the two."""
        if self.index is None or (other.index is not None and other.index < self.index):
            return other
        return self


@dataclass
class _Padding:
    """The padding the model output's metrics left out: the batch's ``attention_mask``, where
    it fits the output's rows (:func:`~fxnumeric.llm_metrics.output_mask`), so that the
    model output (hidden states or logits) is read over real tokens only, as the LLM metrics
    are. Its own merged state (:meth:`fxnumeric.distributed.Ranks.reduce`)."""

    positions: int = 0
    """Rows of the model output whose batch's mask fit them."""
    padded: int = 0
    """Of those, the padding, left out."""
    unfit: int = 0
    """Batches whose mask held padding and did not fit: every position read."""
    unfit_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    """The first such batch's mask shape and the output's rows."""
    unfit_batch: int = -1

    def see(self, float_value: Any, quant_value: Any, batch: Any, reader: LogitsReader,
            index: int) -> torch.Tensor | None:
        """The real tokens of the model output of batch ``index`` (``None``: every position
        counts), as :meth:`Accumulator.update` takes them (``rows``)."""
        if not (_real_values(float_value) and _real_values(quant_value)
                and float_value.shape == quant_value.shape and float_value.dim() >= 2):
            return None
        real, unfit = output_mask(float_value, batch, reader)
        if unfit is not None:
            self.unfit += 1
            if self.unfit_shapes is None:
                self.unfit_shapes = (tuple(unfit.shape), tuple(float_value.shape[:-1]))
                self.unfit_batch = index
        if real is None:
            return None
        self.positions += real.numel()
        self.padded += real.numel() - int(real.sum())
        return real

    def state(self) -> _Padding:
        return dataclasses.replace(self)

    def load(self, state: _Padding) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(state, f.name))

    def merged(self, other: _Padding) -> _Padding:
        """Counts added; the unfit shapes of the earlier batch."""
        first = (other if other.unfit_shapes is not None and (
            self.unfit_shapes is None or 0 <= other.unfit_batch < self.unfit_batch) else self)
        return _Padding(self.positions + other.positions, self.padded + other.padded,
                        self.unfit + other.unfit, first.unfit_shapes, first.unfit_batch)


def _real_values(x: Any) -> bool:
    return isinstance(x, LinearRows) or (isinstance(x, torch.Tensor)
                                         and (x.is_floating_point() or x.is_quantized))


@dataclass
class _Plan:
    """Everything :func:`compare` decided before the first batch."""

    matching: Matching
    comparisons: tuple[str, ...]
    metrics: list[str]
    built: Instrumented
    outputs: dict[str, Accumulator]
    shadows: dict[str, Accumulator]
    model: Accumulator
    twins: list[_FloatOutputs]
    values: list[_QuantValue]
    floors: dict[str, FloorSums]
    logits: LogitsAccumulator
    reader: LogitsReader
    """How the model's logits line up with its batches (:func:`logits_reader`, of the float
    model, else the quantized one)."""
    blocks: list[tuple[Block, Accumulator, Accumulator]]
    float_twins: list[tuple[tuple[str, str, int], _FloatOutputs]] = field(default_factory=list)
    """The float twins of the pairs' and blocks' outputs, each with the float value it
    observes (region path, node name, call site), to be observed in a float model shared by
    several variants (``shared_float``; otherwise ``built.float_model`` observes them)."""
    turn: _Turn = field(default_factory=_Turn)
    """Shared by :attr:`twins`: the batch's lockstep."""
    lockstep_budget: int = 0
    """Bytes of float values the float model may hold ahead of the quantized one
    (:func:`_lockstep_budget`)."""
    routes: dict[str, Routes] = field(default_factory=dict)
    """The routes watched (:mod:`fxnumeric.routing`), by the name of each pair inside."""
    output_part: _FirstPart = field(default_factory=_FirstPart)
    """Where the compared model output sits in what the float model returns, and how many
    tensors that holds, read on the first batch compared."""
    padding: _Padding = field(default_factory=_Padding)
    """The padded positions the model output's metrics left out."""

    @property
    def watched(self) -> list[Routes]:
        """Each of :attr:`routes` once (one per module watched)."""
        return list({id(r): r for r in self.routes.values()}.values())


def _plan(float_model: nn.Module, quant_model: nn.Module, comparisons: Iterable[str],
          metrics: MetricSpec, keep: bool,
          matching: Matching | None, leaf_modules: Iterable[LeafSpec] | None,
          precision: torch.dtype, progress: bool | None = None, capture: str = "auto",
          example_inputs: Any = None, shared_float: bool = False) -> _Plan:
    """Validate the options, match, and build one instrumented graph per side (the quantized
    side only with ``shared_float``: the float twins are observed by :func:`_float_groups`)."""
    wanted = tuple(comparisons)
    unknown = set(wanted) - set(COMPARISONS)
    if unknown:
        raise InputError(f"unknown comparisons {sorted(unknown)}; "
                         f"choose from {', '.join(COMPARISONS)}")
    names, custom = _resolve_metrics(metrics)
    with phase("tracing and pairing the models", False if matching is not None else progress):
        matching = resolve_matching(float_model, quant_model, matching, leaf_modules,
                                    capture=capture, example_inputs=example_inputs,
                                    validate=False)
    check_pairable(matching)
    outputs = {p.name: Accumulator(custom, keep, precision) for p in matching.pairs}
    shadows = {p.name: Accumulator(custom, keep, precision) for p in matching.pairs}
    floors = {p.name: floor_sums(matching.region_of(p), p) for p in matching.pairs
              if p.quantized}
    twins: list[_FloatOutputs] = []
    float_twins: list[tuple[tuple[str, str, int], _FloatOutputs]] = []
    turn = _Turn()
    values = {p.name: _QuantValue(precision) for p in matching.pairs}
    routes, watched = watch(matching, turn) if "outputs" in wanted else ({}, [])

    def output_observers(pair: Pair) -> tuple[nn.Module | None, nn.Module]:
        twin = _FloatOutputs(turn, by_rows=outputs[pair.name].additive)
        twins.append(twin)
        region = matching.region_of(pair)
        float_twins.append(((region.float_path, region.output_nodes(pair)[0].name,
                             region.call_site(pair)), twin))
        return (None if shared_float else twin), _CompareToFloat(
            twin, outputs[pair.name], values[pair.name], routes.get(pair.name))

    def shadow_observer(pair: Pair) -> nn.Module:
        return _ShadowMetrics(shadows[pair.name], values[pair.name], floors.get(pair.name))

    blocks = [(b, Accumulator(custom, precision=precision),
               Accumulator(custom, precision=precision))
              for b in (find_blocks(matching) if "blocks" in wanted else ())]
    block_accs = {b.name: (out, shadow) for b, out, shadow in blocks}

    def block_observers(block: Block) -> tuple[nn.Module | None, nn.Module, nn.Module]:
        twin, value = _FloatOutputs(turn), _QuantValue(precision)
        twins.append(twin)
        float_twins.append(((block.region.float_path, block.float_out.name, block.site), twin))
        values[f"block {block.name}"] = value
        out, shadow = block_accs[block.name]
        return ((None if shared_float else twin), _CompareToFloat(twin, out, value),
                _ShadowMetrics(shadow, value, None))

    # each batch runs each model once: the quantized graph holds the output comparators, the
    # shadows and the blocks' observers
    # the models as matched (torch.compile's and DataParallel's wrappers taken off)
    model, quant = matching.float_model, matching.quant_model
    built = instrument(
        matching,
        outputs=output_observers if "outputs" in wanted else None,
        shadows=shadow_observer if "shadows" in wanted else None,
        blocks=[b for b, _, _ in blocks], block_observers=block_observers,
    )
    # a shared float model: _float_groups hooks it
    hook_watched(watched, None if shared_float else built.float_model, built.quant_model,
                 matching)
    return _Plan(matching, wanted, names, built,
                 outputs if "outputs" in wanted else {}, shadows if "shadows" in wanted else {},
                 Accumulator(custom, precision=precision), twins, list(values.values()),
                 floors if "shadows" in wanted else {}, LogitsAccumulator(),
                 logits_reader(model, quant), blocks, float_twins, turn,
                 _lockstep_budget(model), routes=routes)


LOCKSTEP_SHARE = 4
"""The float values held ahead of the quantized model: about 1/4 of the float model's
parameter bytes (128 MiB of SmolLM2's 513 MiB in float32), or :data:`LOCKSTEP_MIN` bytes if
more. Past it the quantized model runs in turns with the float one, in a helper thread
(:mod:`fxnumeric.lockstep`), which costs time: a batch of four 22-token sentences holds 40
MiB (bfloat16) and runs as before; so does one 224-px image through a torchvision CNN (15-71
MiB: resnet18 to resnet50, 54 MiB for an FX-quantized mobilenet_v2), where turns cost a fifth
of compare's time (a thread of its own allocates from a glibc heap of its own)."""
LOCKSTEP_MIN = 64 << 20


def _lockstep_budget(model: nn.Module | None) -> int:
    params = sum(p.numel() * p.element_size()
                 for p in (model.parameters() if model is not None else ()))
    return max(LOCKSTEP_MIN, params // LOCKSTEP_SHARE)


def _llm_update(plan: _Plan, float_logits: Any, quant_out: Any, batch: Any, index: int
                ) -> None:
    """Per-token KL, top-1 agreement and perplexity, when the float model returned logits
    (``float_logits``, :func:`_float_end`; batch ``index`` of the data)."""
    if float_logits is None:
        return
    quant_logits = looks_like_logits(quant_out, batch, plan.reader.vocab_size)
    if quant_logits is None or quant_logits.shape != float_logits.shape:
        return
    plan.logits.update_batch(float_logits, quant_logits, batch, plan.reader, index)


def _length(data: Iterable[Any], max_batches: int | None) -> int | None:
    """How many batches will be read, when ``data`` says (for the progress bar)."""
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    return total


@dataclass(frozen=True)
class _Ran:
    """What :func:`_run` fed: batches compared, and the indices of those left out (NaN/Inf)."""

    batches: int
    skipped: tuple[int, ...]


def _accumulators(plan: _Plan) -> list[Accumulator]:
    """The plan's per-batch sums (layer outputs, shadows, the model output, blocks)."""
    return [*plan.outputs.values(), *plan.shadows.values(), plan.model,
            *(acc for _, out, shadow in plan.blocks for acc in (out, shadow))]


def _mergeable(plan: _Plan) -> list[Any]:
    """Every sum over batches a plan holds, which ranks merge (:meth:`Ranks.reduce`)."""
    return [*_accumulators(plan), plan.logits, *plan.floors.values(), plan.output_part,
            plan.padding]


def _feed(data: Iterable[Any], step: Callable[[int, int, Any, Any], None],
          mergeable: list[Any], progress: bool | None, max_batches: int | None,
          inputs: int | Callable[[Any], Any] | None, total: int | None, ranks: Ranks,
          capture: list[str]) -> _Ran:
    """Call ``step(batches_so_far, index, model_inputs, batch)`` on every batch of this rank's
    share (``index``: its place in the data); a batch holding NaN/Inf is left out. Under
    torch.distributed the ranks check that they hold the same ``capture``
    (:func:`_capture_lines`), and their sums (``mergeable``) are merged at the end."""
    bar = Progress(ranks.count(total), "comparing batches", progress)
    batches = 0
    skipped: list[int] = []
    try:
        # islice: no batch past the last one is read off the caller's iterator
        wanted = data if max_batches is None else itertools.islice(data, max_batches)
        for index, batch in ranks.share(enumerate(wanted), mergeable, capture):
            model_inputs = pick_inputs(batch, inputs)  # a dict is passed as keyword inputs
            check_batch(model_inputs, index)
            where = nonfinite_inputs(model_inputs)
            if where:
                skipped.append(index)
                warnings.warn(f"batch {index} holds NaN/Inf (in {', '.join(where)}): it is left "
                              "out of every metric (Report.notes lists the batches left out)",
                              FxNumericWarning, stacklevel=4)
                bar.update()
                continue
            step(batches, index, model_inputs, batch)
            batches += 1
            bar.update()
    finally:
        bar.close()
    batches, skipped = ranks.reduce(mergeable, batches, skipped)
    if batches == 0 and skipped:
        raise InputError(f"every batch holds NaN/Inf ({len(skipped)} batches): nothing is left "
                         "to compare.\nFix: clean the data (torch.isfinite(x).all() per batch) "
                         "or check the preprocessing that produces it")
    if batches == 0:  # data is compare's chain of the user's batches, its first one read
        raise no_batches()
    return _Ran(batches, skipped)


def _run(plan: _Plan, data: Iterable[Any], progress: bool | None,
         max_batches: int | None, inputs: int | Callable[[Any], Any] | None = None,
         total: int | None = None, ranks: Ranks = ONE_PROCESS) -> _Ran:
    """Feed every batch to both instrumented models (:func:`_feed`)."""
    float_gm, quant_gm = plan.built.float_model, plan.built.quant_model

    def step(done: int, index: int, model_inputs: Any, batch: Any) -> None:
        # the models' state as the first batch found it, for its run again
        kept = saved_buffers(float_gm, quant_gm) if done == 0 else []
        if done == 0:
            check_devices(_or_graph(plan.matching.float_model, float_gm),
                          _or_graph(plan.matching.quant_model, quant_gm), model_inputs)
        # past a budget of float values held, the quantized model runs in turns with the
        # float one (fxnumeric.lockstep), each value held until its comparator reads it
        lockstep = Lockstep(lambda: _quant_run(plan, "", model_inputs), plan.lockstep_budget)
        plan.turn.lockstep = lockstep
        try:
            try:
                float_out = (_first_run(float_gm, model_inputs, batch, inputs) if done == 0
                             else run_model(float_gm, model_inputs, which="float"))
                # what the model-output metrics read of it: its logits as rows where a twin
                # holds them so, and the output itself dropped before the quantized forward
                float_end = _float_end(plan, float_out, model_inputs, index, by_rows=True)
                del float_out
            except BaseException:
                lockstep.close()
                raise
            quant_out = lockstep.finish()
        finally:
            plan.turn.lockstep = None
            plan.turn.as_rows.clear()
        _end_batch(plan, float_end, quant_out, model_inputs, index)
        if _copy_overwritten([plan], first=done == 0):
            put_back(kept)  # a running average updated in place moves once per batch
            step(done, index, model_inputs, batch)

    return _feed(data, step, _mergeable(plan), progress, max_batches, inputs, total, ranks,
                 _capture_lines(plan) if ranks.parallel else [])


def _or_graph(model: nn.Module | None, graph: nn.Module) -> nn.Module:
    """``model``, or the graph run for it when the matching holds none. Not ``model or
    graph``: a module's truth is its ``len()`` where it defines one (torch.compile's wrapper
    forwards ``len()`` to a model without it, which raises)."""
    return graph if model is None else model


def _capture_lines(plan: _Plan, variant: str = "") -> list[str]:
    """What ranks must hold alike for their sums to merge, one line each: the pairs (name,
    kind) and both models' parameters (name, shape; no values: cheap at any model size)."""
    matching = plan.matching
    where = f" of variant {variant!r}" if variant else ""
    lines = [f"pair {p.name!r} ({p.kind}){where}" for p in matching.pairs]
    for side, model in (("float", matching.module("float")),
                        ("quantized", matching.module("quant"))):
        if model is not None:
            lines += [f"{side} parameter {name!r} of shape {tuple(param.shape)}{where}"
                      for name, param in model.named_parameters()]
    return lines


def _copy_overwritten(plans: Iterable[_Plan], first: bool) -> bool:
    """After a batch: twins that saw a value written into keep copies from now on. Whether
    the batch must run again: the ``first`` one, whose sums are then emptied (a later batch's
    stale values are left out, and noted: :attr:`Accumulator.overwritten`)."""
    plans = list(plans)
    seen = False
    for plan in plans:
        for twin in plan.twins:
            if twin.overwritten:
                twin.copies, twin.overwritten, seen = True, False, True
    if seen and first:
        for plan in plans:
            for acc in _accumulators(plan):
                acc.load(AccumulatorState())
                if acc.kept is not None:
                    acc.kept.clear()
            plan.logits.load(LogitsState())
            plan.padding.load(_Padding())
            for sums in plan.floors.values():
                sums.load(FloorState())
    return seen and first


def _collect(plan: _Plan, ran: _Ran, progress: bool | None = None, stacklevel: int = 5,
             ) -> Report:
    """One report row per pair name, from the accumulators and the weights; a warning about
    them points ``stacklevel`` frames up (the caller of ``compare``)."""
    matching = plan.matching
    # reduced as they come: one layer's weights alive at a time (dequantized, offloaded ones)
    weights: dict[str, tuple[list[str], Accumulator, WeightHistogram]] = {}
    floors: dict[str, dict[str, Any]] = {}
    unread: dict[str, str] = {}  # why a row's weights could not be compared
    inside: dict[str, list[str]] = {}  # a module called whole: the layers its row compares
    first: dict[str, Pair] = {}  # a row's floor is its name's first pair's
    for p in matching.pairs:
        first.setdefault(p.name, p)
    if "weights" in plan.comparisons:
        with phase("comparing weights", progress):
            # pair_weights yields an op's weights one after another (an LSTM's matrices): one
            # op's alive together, binned into one histogram
            for _, op_weights in itertools.groupby(pair_weights(
                    matching, as_computed=True,
                    unread=lambda pair, why: unread.setdefault(pair.name, why)),
                    key=lambda w: id(w.pair)):
                layer = list(op_weights)
                pair = layer[0].pair
                if pair.name not in weights:  # exact float64 sums
                    weights[pair.name] = ([], Accumulator(precision=torch.float64), _histogram(
                        [(w.float_weight, w.quant_weight) for w in layer]))
                if first.get(pair.name) is pair and pair.name not in floors:
                    # the floor reads the quantized weight too: from here, not unpacked again
                    # (not a module called whole: its first layer's weight is not the op's)
                    floors[pair.name] = _floor(
                        matching, pair, plan.shadows.get(pair.name), plan.floors.get(pair.name),
                        None if layer[0].layer else layer[0].quant_weight)
                for w in layer:
                    weights[pair.name][0].append(w.key)
                    if w.layer and w.layer not in inside.get(pair.name, ()):
                        inside.setdefault(pair.name, []).append(w.layer)
                    # a layer left float shows no weight SQNR: none summed. A module called
                    # whole holding quantized layers (w.layer) is quantized however deep they
                    # sit (ops.is_quantized_module looks at its children only)
                    if pair.quantized or w.layer:
                        _add_weights(weights[pair.name][1], w.float_weight, w.quant_weight)
    rows = []
    seen: set[str] = set()
    # a block's layers are the ops that ran in it (find_blocks), named so or not: convert_fx
    # names ResNet's residual add after its quantized op (add_relu)
    block_by_layer = {name: b.name for b, _, _ in plan.blocks for name in b.layers}
    for p in matching.pairs:
        if p.name in seen:
            continue
        seen.add(p.name)
        keys, w_acc, hist = weights.get(p.name, ((), None, None))
        oa, sa = plan.outputs.get(p.name), plan.shadows.get(p.name)
        rows.append(ReportRow(
            name=p.name,
            kind=p.kind,
            quantized=p.quantized,
            # a layer left float has the float weight: nothing to compare (not an inf SQNR)
            weight_sqnr=(w_acc.value("sqnr") if w_acc and (p.quantized or p.name in inside)
                         else None),
            output=oa.values(plan.metrics) if oa and oa.batches else {},
            shadow=sa.values(plan.metrics) if sa and sa.batches else {},
            weight_keys=tuple(keys),
            float_nodes=p.float_nodes,
            quant_nodes=p.quant_nodes,
            note=_note(oa, sa, plan.built.skipped.get(p.name), w_acc,
                       plan.routes.get(p.name), unread.get(p.name), inside.get(p.name),
                       plan.built.strays.get(p.name), plan.built.bypassed.get(p.name),
                       float_weight=(_float_weight(p) if p.quantized and w_acc is not None
                                     and w_acc.value("sqnr") == math.inf else "")),
            weight_histogram=hist,
            activations=tuple(oa.kept) if oa is not None and oa.kept is not None else None,
            float_rms=_rms(oa if oa and oa.batches else sa),
            spread={key: spread for key, acc in (("output_sqnr", oa), ("shadow_sqnr", sa))
                    if acc is not None and (spread := acc.spread()) is not None},
            **(floors[p.name] if p.name in floors
               else _floor(matching, p, sa, plan.floors.get(p.name))),
            block=block_by_layer.get(p.name, ""),
            shadow_shapes=sa.shape_mismatch if sa is not None else None,
            rounded_for=tuple(r.name for r in matching.region_of(p).rounded_for(p)),
        ))
    nonfinite = _first_nonfinite(plan)
    judged, output_reference, upstream = _judged_against_upstream(rows, matching)
    # read from the rows' weight SQNR (comparisons with "weights"): the weights not read again
    foreign = warn_foreign_weights(
        ((r.name, r.weight_sqnr) for r in rows if r.weight_sqnr is not None),
        "the quantized model's weights", "Every metric then measures two different models, "
        "not the quantization error", stacklevel=stacklevel)
    return Report(
        rows=judged,
        metrics=tuple(plan.metrics),
        comparisons=plan.comparisons,
        batches=ran.batches,
        model_output={**plan.model.values(plan.metrics),
                      **(plan.logits.values() if plan.logits.tokens else {})},
        unmatched=tuple((u.node, "float", u.reason) for u in matching.unmatched_float)
        + tuple((u.node, "quantized", u.reason) for u in matching.unmatched_quant),
        torch_version=torch.__version__,
        notes=_nothing_quantized_note(matching)
        + tuple(f"capture ({side}): {note}" for side, note in matching.capture_notes)
        + _model_output_note(plan) + _output_part_note(plan) + _no_token_note(plan)
        + _no_perplexity_note(plan) + _no_target_note(plan) + _unplaced_target_note(plan)
        + _unfit_mask_note(plan)
        + _skipped_note(ran)
        + _nonfinite_note(nonfinite) + ((foreign.partition("\n")[0],) if foreign else ())
        + _padding_note(plan),
        model_output_rms=_rms(plan.model),
        model_output_reference_rms=activation_scale([output_reference, _rms(plan.model)]),
        skipped_batches=ran.skipped,
        nonfinite=nonfinite,
        blocks=_block_rows(plan, judged, upstream),
        logits_per=plan.logits.logits_per,
        model_output_part=_compared_part(plan),
    )


def _compared_part(plan: _Plan) -> str:
    """:attr:`Report.model_output_part`: where the compared tensor sits, when the model
    returns more than one."""
    path, tensors = plan.output_part.part or ("", 1)
    return path if tensors > 1 else ""


def _output_part_note(plan: _Plan) -> tuple[str, ...]:
    """What of the model's return value the model-output metrics read, when it holds more
    than one tensor (a detector's boxes of the first image, RAFT's first flow estimate)."""
    part = _compared_part(plan)
    if not part:
        return ()
    _, tensors = plan.output_part.part  # type: ignore[misc]
    note = part_note(part, tensors, plan.output_part.loss, "the metrics read")
    if compares_detections(part):
        note += (" (detections, compared index by index: boxes that come in another order "
                 "among near-tied scores read as error no layer made)")
    return (note,)


def _judged_against_upstream(rows: list[ReportRow], matching: Matching,
                             ) -> tuple[tuple[ReportRow, ...], float | None,
                                        dict[str, frozenset[str]]]:
    """``rows``, each with the activation its float RMS is judged against
    (``reference_rms``, see :data:`~fxnumeric.report.DEGENERATE_RMS_RATIO`): the largest
    float RMS among the row itself and the rows upstream of it (:func:`upstream_ops`); and
    the largest activation reaching the model output, judged alike
    (``Report.model_output_reference_rms``); and the ops upstream of each, as judged.

    Upstream only: SQNR is scale-invariant, so a layer's signal is tiny against the values
    it was computed from, not against a later layer with a gain of 1e8 or another branch.
    And not past an op whose output is bounded whatever its input (a ``ReLU6``, a sigmoid:
    :func:`~fxnumeric.semantics.output_bound`): inputs of RMS 1e7 leave a ``ReLU6``'s output
    of RMS 4 computed, not collapsed, so the bounded op is judged against what is upstream of
    it no larger than its bound, and its readers against its own reference.
    Carried by each row, so that ``ReportRow.degenerate`` reads the row alone.
    """
    rms_of: dict[str, list[float | None]] = {}  # an op's float RMS at each of its call sites
    for r in rows:
        rms_of.setdefault(op_name(r.name), []).append(r.float_rms)
    bound = _output_bounds(matching)
    upstream = upstream_ops(matching, stop=bound)
    reach: dict[str, float | None] = {}  # a bounded op's reference, as its readers see it

    def above(op: str, seen: frozenset[str]) -> float | None:
        """The largest activation upstream of ``op``, as much of it as reaches ``op``."""
        scale = activation_scale(itertools.chain.from_iterable(
            [through(up, seen | {op})] if up in bound else rms_of.get(up, ())
            for up in upstream.get(op, ()) if up not in seen))
        return scale if scale is None or op not in bound else min(scale, bound[op])

    def through(op: str, seen: frozenset[str]) -> float | None:
        if op not in reach:
            reach[op] = activation_scale([*rms_of.get(op, ()), above(op, seen)])
        return reach[op]

    # the model output is read after the ops no other op reads (or by untraced code after
    # them: judged against more, never less)
    last = [through(op, frozenset()) for op in _unread(upstream, upstream)]
    return tuple(
        dataclasses.replace(r, reference_rms=activation_scale(
            [r.float_rms, above(op_name(r.name), frozenset())]))
        for r in rows), activation_scale(last), upstream


def _output_bounds(matching: Matching) -> dict[str, float]:
    """The ops (by :func:`op_name`) whose float output is bounded whatever their input, with
    the bound (:func:`~fxnumeric.semantics.output_bound`), at every call site."""
    bounds: dict[str, float | None] = {}
    for pair in matching.pairs:
        region = matching.region_of(pair)
        chain = region.chain(pair, "float")
        bound = output_bound(region.float_view, chain[-1]) if chain else None
        name = op_name(pair.name)
        known = bounds.get(name, bound)
        bounds[name] = None if bound is None or known is None else max(bound, known)
    return {name: bound for name, bound in bounds.items() if bound is not None}


def _no_token_note(plan: _Plan) -> tuple[str, ...]:
    """A note when the model returned logits but no batch held a real token."""
    if not plan.logits.batches or plan.logits.tokens:
        return ()
    return ("the model returns logits, but no batch holds a real token (every attention_mask "
            "is all 0): no per-token KL, top-1 agreement or perplexity",)


def _no_perplexity_note(plan: _Plan) -> tuple[str, ...]:
    """A note when a model of unknown kind returned logits of real tokens but had no
    perplexity: its ``input_ids`` are next tokens only if it is a causal LM, which nothing
    said (:func:`fxnumeric.llm_metrics.predicts_next_token`)."""
    if (plan.reader.next_token is not None or plan.logits.logits_per != "token"
            or not plan.logits.tokens or plan.logits.targets):
        return ()
    return ("no perplexity: nothing tells whether the model predicts the next token (it has "
            "no can_generate(), as a transformers model has), so its input_ids are not read "
            "as targets. Fix: put labels in the batch, or give a causal LM of your own a "
            "can_generate() method returning True",)


def _no_target_note(plan: _Plan) -> tuple[str, ...]:
    """A note when batches came with targets but none of their real tokens had one."""
    if not plan.logits.labelled or plan.logits.targets or not plan.logits.tokens:
        return ()
    return ("no perplexity: the batches give targets, but none of their real tokens has one "
            "(every label is -100, or each sequence is one token, with no next token to "
            "score)",)


def _unplaced_target_note(plan: _Plan) -> tuple[str, ...]:
    """A note when a batch's targets could not be lined up with its logits, which leaves
    the report without perplexity (:attr:`fxnumeric.llm_metrics.LogitsAccumulator.unplaced`)."""
    unplaced = plan.logits.unplaced
    if not unplaced:
        return ()
    return (f"no perplexity: {unplaced} batch{'es' if unplaced != 1 else ''} gave targets "
            "that cannot be lined up with the logits' positions (labels of another length, or a "
            "logits_to_keep of positions that do not run in a row), and a perplexity of the "
            "other batches alone would read other tokens than the KL. Fix: labels as long as "
            "input_ids, logits_to_keep as an int, or no logits_to_keep",)


def _unfit_mask_note(plan: _Plan) -> tuple[str, ...]:
    """A note when a batch's attention_mask held padding and did not fit the positions of
    the logits (:attr:`fxnumeric.llm_metrics.LogitsAccumulator.unfit_masks`) or of the model
    output (:attr:`_Padding.unfit`)."""
    padding = plan.padding
    if plan.logits.unfit_masks and plan.logits.unfit_shapes is not None:
        (mask, lead), unfit, what = (plan.logits.unfit_shapes, plan.logits.unfit_masks,
                                     "the logits'")
        batches = plan.logits.batches
        read = ("the model output's metrics, the per-token KL and top-1 agreement"
                if padding.unfit else "the per-token KL and top-1 agreement")
    elif padding.unfit and padding.unfit_shapes is not None:
        (mask, lead), unfit, what = padding.unfit_shapes, padding.unfit, "the model output's"
        batches = plan.model.batches
        read = "the model output's metrics"
    else:
        return ()
    return (f"attention_mask {list(mask)} does not fit {what} positions {list(lead)} "
            f"({unfit} of {batches} batches) and the model "
            "gives no mask of its own for them (as a Hugging Face speech model's "
            f"_get_feature_vector_attention_mask does): it was not used, so {read} read "
            "every position, padding included. Fix: batches without padding",)


def _padding_note(plan: _Plan) -> tuple[str, ...]:
    """A note when the model output's metrics left padding out (:class:`_Padding`): the
    layer rows read every position."""
    padding = plan.padding
    if not padding.padded:
        return ()
    share = padding.padded / padding.positions
    return (f"model output: its metrics read real tokens only (attention_mask): "
            f"{padding.padded} of its {padding.positions} positions ({share:.0%}) are padding, "
            "left out; the layer and block rows read every position, padding included, so "
            "the model output's values are not the last layer's",)


def _block_rows(plan: _Plan, layer_rows: Iterable[ReportRow],
                upstream: Mapping[str, frozenset[str]]) -> tuple[BlockRow, ...]:
    """One row per block, with the output SQNR of the block that ran before it in its
    container (``layers.2`` before ``layers.3``, ResNet's ``layer1`` before ``layer2``) as
    what enters it; ``None`` for the first of each (a CLIP's vision tower does not read its
    text tower's last layer, nor a BART decoder's first layer the encoder's last).

    A block's float RMS is judged as a layer's is (``BlockRow.degenerate``), against the
    largest activation upstream of it: its own output's and the ``reference_rms`` of its
    layers that no other of its layers reads (``layer_rows``, judged already), which hold
    everything upstream of each that reaches the block's output (``upstream``, as judged:
    not past an op whose output is bounded, a ``ReLU6`` ending the block)."""
    reference = {r.name: r.reference_rms for r in layer_rows}
    rows: list[BlockRow] = []
    leaving: dict[str, BlockRow] = {}  # by container: the last block so far
    for block, out, shadow in plan.blocks:
        container = block.name.rpartition(".")[0]
        before = leaving.get(container)
        float_rms = _rms(out if out.batches else shadow)
        note = _note(out, shadow, plan.built.skipped.get(block.name))
        if before is not None and before.degenerate:
            note = "; ".join(n for n in (note, f"entering SQNR meaningless: {before.name}'s "
                                         "float signal collapsed") if n)
        rows.append(BlockRow(
            block.name, block.kind, block.layers,
            out.values(plan.metrics) if out.batches else {},
            shadow.values(plan.metrics) if shadow.batches else {},
            before.output_sqnr if before is not None else None, note=note,
            float_rms=float_rms,
            reference_rms=activation_scale([float_rms, *_last_references(
                block.layers, reference, upstream)])))
        leaving[container] = rows[-1]
    return tuple(rows)


def _last_references(layers: Iterable[str], reference: Mapping[str, float | None],
                     upstream: Mapping[str, frozenset[str]]) -> list[float | None]:
    """The ``reference`` of each of ``layers`` that no other of them reads (``upstream``,
    by op name): what reaches the output of the block they make up."""
    ops = {name: op_name(name) for name in layers}
    last = set(_unread(ops.values(), upstream))
    return [reference.get(name) for name, op in ops.items() if op in last]


def _unread(ops: Iterable[str], upstream: Mapping[str, frozenset[str]]) -> list[str]:
    """Of ``ops`` (op names), those no other of them reads (``upstream``: the ops upstream of
    each): the last ones, whose values reach what follows them."""
    ops = list(ops)
    read = {up for op in ops for up in upstream.get(op, ()) if up != op}
    return [op for op in ops if op not in read]


def _floor(matching: Matching, pair: Pair, shadow: Accumulator | None,
           sums: FloorSums | None, read: torch.Tensor | None = None) -> dict[str, Any]:
    """``floor_sqnr`` and ``floor_cause`` of a quantized layer (see :mod:`fxnumeric.floor`);
    ``read``: its quantized weight, if the weight comparison has read it."""
    if shadow is None or sums is None or not shadow.batches:
        return {}
    floor, verdict = layer_floor(matching.region_of(pair), pair, sums, signal=shadow.signal,
                                 noise=shadow.noise, count=shadow.count, read=read)
    if floor is None:
        return {}
    return {"floor_sqnr": floor, "floor_cause": verdict.cause if verdict is not None else ""}


def _nothing_quantized_note(matching: Matching) -> tuple[str, ...]:
    """The note for a quantized model with no quantized op: nothing was quantized, or it
    simulates quantization with fake-quants (a QAT model before ``convert``), whose rows
    read the fake-quantized values but whose layers do not count as quantized."""
    if not matching.nothing_quantized:
        return ()
    fake_quants = sum(len(contents(r.quant_view).fake_quants) for r in matching.regions)
    if not fake_quants:
        return ("the quantized model has no quantized op: nothing was quantized, coverage n/a",)
    return (f"the quantized model has no quantized op: it simulates quantization with "
            f"{fake_quants} fake-quants (a QAT model before convert / convert_fx), whose "
            "values the rows read, but none of its layers counts as quantized: coverage n/a, "
            "and sensitivity and advise need the converted model",)


def _skipped_note(ran: _Ran) -> tuple[str, ...]:
    if not ran.skipped:
        return ()
    shown = ", ".join(map(str, ran.skipped[:10])) + (", ..." if len(ran.skipped) > 10 else "")
    total = ran.batches + len(ran.skipped)
    return (f"{len(ran.skipped)} of {total} batches left out of every metric: their input "
            f"holds NaN/Inf (batch {shown})",)


def _first_nonfinite(plan: _Plan) -> tuple[tuple[str, str], ...]:
    """``(model side, layer)`` where NaN/Inf first appears in graph order, for each side.

    Read from the output comparisons (float model against quantized model); from the shadows
    when outputs were not compared. A side whose layers stayed finite while its model output
    did not is named ``"model output"`` (NaN/Inf made by an op that is not paired).
    """
    accs = plan.outputs or plan.shadows
    first: dict[str, str] = {}
    for pair in plan.matching.pairs:
        acc = accs.get(pair.name)
        if acc is None:
            continue
        if acc.actual_nonfinite and "quantized" not in first:
            first["quantized"] = pair.name
        if acc.ref_nonfinite and "float" not in first:
            first["float"] = pair.name
    for side, count in (("quantized", plan.model.actual_nonfinite),
                        ("float", plan.model.ref_nonfinite)):
        if count and side not in first:
            first[side] = "model output"
    return tuple((side, first[side]) for side in ("quantized", "float") if side in first)


def _nonfinite_note(nonfinite: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    if not nonfinite:
        return ()
    at = dict(nonfinite)
    if len(at) == 2:
        where = (f"at {at['quantized']} in the quantized model and at {at['float']} in the "
                 "float model")
    else:
        ((side, layer),) = nonfinite
        other = "float" if side == "quantized" else "quantized"
        where = f"at {layer} in the {side} model ({other} model: finite)"
    return (f"NaN/Inf first appears {where}: the metrics after it are poisoned",)


def _model_output_note(plan: _Plan) -> tuple[str, ...]:
    """Why the model output was not compared, in some batches or all: its shapes differed
    (a detector keeping a different number of boxes), it held no values, or no tensor (of
    the float model's output, or of the quantized one's where the float one has it)."""
    acc = plan.model
    notes = []
    path, tensors = plan.output_part.part or ("", 1)
    if not tensors:
        notes.append(f"the model output is not compared: what the float model returns (a "
                     f"{plan.output_part.returned}) holds no tensor")
    elif (plan.output_part.part is not None and not acc.batches and not acc.discrete
          and not acc.shape_mismatch):
        notes.append(f"the model output is not compared: the quantized model returns no tensor "
                     f"where the float model returns one (`output{path}`)")
    if acc.shape_mismatch:
        float_shape, quant_shape = acc.shape_mismatch
        notes.append(f"model output shapes differ (float {float_shape} vs quantized "
                     f"{quant_shape}): the batches where they do are not compared")
    if acc.batches and not acc.count and plan.padding.padded == plan.padding.positions > 0:
        notes.append("the model output has no real token to read: every position is padding "
                     "(attention_mask all 0), so its metrics are NaN")
    elif acc.batches and not acc.count:
        notes.append("the model output held no values (empty tensors): nothing to compare")
    if acc.discrete and not acc.batches:
        notes.append("the model output is boolean or integer values: nothing to compare")
    return tuple(notes)


def _rms(acc: Accumulator | None) -> float | None:
    """Root mean square of the float (reference) tensors an accumulator has seen."""
    if acc is None or not acc.batches or not acc.count:
        return None
    return (acc.signal / acc.count) ** 0.5


def _first_batch(data: Iterable[Any], inputs: int | Callable[[Any], Any] | None,
                 max_batches: int | None = None) -> tuple[Any, Iterable[Any]]:
    """The model inputs of the first batch without NaN/Inf (checked before tracing; the
    capture's example), and ``data`` still whole (an iterator's batches read ahead are
    chained back).

    A batch holding NaN/Inf is left out of every metric when the batches run, so it is not
    the example either: a capture that runs it (the module tree of a Hugging Face model)
    would fail in a quantized op on NaN (``ChooseQuantizationParams``) instead.

    Raises:
        InputError: no batch, or every batch (of the first ``max_batches``) holds NaN/Inf.
    """
    if isinstance(data, (list, tuple)):
        if not data:
            raise no_batches(data)
        ahead: Iterable[Any] = data
    else:
        ahead = iter(data)
    read: list[Any] = []
    example = None
    # islice: no batch past the last one is read off the caller's iterator
    for index, batch in enumerate(itertools.islice(ahead, max_batches)):
        read.append(batch)
        model_inputs = pick_inputs(batch, inputs)
        check_batch(model_inputs, index)  # the first batch is checked before any work
        if not nonfinite_inputs(model_inputs):
            example = model_inputs
            break
    if not read:
        raise no_batches(data)
    if example is None:
        raise InputError(f"every batch holds NaN/Inf ({len(read)} batches): nothing is left "
                         "to compare.\nFix: clean the data (torch.isfinite(x).all() per batch) "
                         "or check the preprocessing that produces it")
    if isinstance(data, (list, tuple)):
        return example, data
    return example, itertools.chain(read, ahead)


def _looks_labelled(batch: Any) -> bool:
    """A ``(x, label)`` pair: two items, the second a tensor of integer class ids."""
    return (isinstance(batch, (tuple, list)) and len(batch) == 2
            and isinstance(batch[1], torch.Tensor) and batch[1].ndim <= 1
            and not batch[1].is_floating_point())


def _first_run(float_gm: nn.Module, model_inputs: Any, batch: Any, inputs: Any) -> Any:
    """Run the first batch; if it is rejected and looks like ``(x, label)``, suggest inputs=."""
    try:
        return run_model(float_gm, model_inputs, which="float")
    except InputError as exc:
        if inputs is None and _looks_labelled(batch):
            raise InputError(
                f"{exc.args[0].splitlines()[0]}\nThe batch looks like (inputs, labels) from a "
                "labelled DataLoader. Fix: compare(..., inputs=0) feeds only batch[0] to the "
                "models (or pass inputs=lambda batch: ...)."
            ) from exc
        raise


_PYTHON_VALUES = frozenset({"NoneType", "bool", "int", "float", "complex", "str", "list",
                            "tuple", "dict", "slice", "ellipsis", "device", "dtype", "Size"})
"""Types of the values an op on Python values (not on activations) computes."""


def _non_tensor_note(name: str) -> str:
    """The note of a row whose values were never tensors: of type ``name`` (the first seen)."""
    if name not in _PYTHON_VALUES:
        return f"its value is a {name}, not a tensor: nothing to compare"
    what = "None" if name == "NoneType" else f"a Python {name}"
    return (f"computes {what}, not a tensor: nothing to compare (an op on Python values, such "
            "as a scalar read from a dict, arithmetic on an int argument or a list's append, "
            "not on activations)")


def _differ(acc: Accumulator | None) -> str:
    """How many of the integer values compared differ (a router's picks), if any were."""
    if acc is None or not acc.discrete_values:
        return ""
    if not acc.discrete_differ:
        return f"; all {acc.discrete_values} equal"
    return (f"; {acc.discrete_differ} of {acc.discrete_values} differ "
            f"({100 * acc.discrete_differ / acc.discrete_values:.1f}%)")


def _float_weight(pair: Pair) -> str:
    """Why a quantized op computes with its float twin's weight, as far as its kind and call
    site tell: a quantized norm takes its weight in float (FX, eager); a later call of a
    module (``conv#2``) is one whose weight torchao's convert_pt2e leaves float; otherwise the
    quantizer did not quantize it (XNNPACKQuantizer annotates no ConvTranspose weight)."""
    if "norm" in pair.kind:
        return f"torch's quantized {pair.kind} takes its weight in float"
    if "#" in pair.name:
        return ("torchao's convert_pt2e leaves the weight of a module's second and later calls "
                "float")
    return "its quantizer left the weight float"


def _note(oa: Accumulator | None, sa: Accumulator | None, skipped: str | None,
          weights: Accumulator | None = None, routes: Routes | None = None,
          unread_weight: str | None = None, inside: list[str] | None = None,
          stray: tuple[str, str] | None = None,
          bypassed: tuple[str, str] | None = None, float_weight: str = "") -> str:
    notes = []
    if float_weight:  # its weight SQNR reads inf, truly: say why rather than leave it unexplained
        notes.append("weight not quantized: the quantized op computes with a weight equal to the "
                     f"float one ({float_weight}), so only its activations are quantized")
    if stray is not None and sa is not None:
        notes.append(f"reads quantized `{stray[0]}`, which has no float counterpart, where the "
                     f"float model reads `{stray[1]}`; so does its shadow: the error "
                     f"`{stray[0]}` adds is in no row")
    if bypassed is not None and sa is not None:
        notes.append(f"its float twin reads `{bypassed[1]}`, from float ops the quantized model "
                     f"lacks (unpaired), where it reads quantized `{bypassed[0]}`; its shadow "
                     "reads that too: its output SQNR compares two different computations")
    if inside:
        notes.append(f"called whole: the weights of its layers {', '.join(inside)} compare "
                     "here, their outputs not one by one")
    if unread_weight:
        notes.append(f"weights not compared: {unread_weight}")
    ran = oa is not None and not oa.batches and not (sa is not None and sa.batches)
    if ran and oa.non_tensor and not oa.discrete:
        notes.append(_non_tensor_note(oa.non_tensor))
    elif ran and not (oa.discrete or oa.shape_mismatch or oa.misrouted or oa.overwritten):
        notes.append("never ran on the data: nothing to compare (a module the model holds but "
                     "does not call, such as a tied embedding it runs under another name)")
    if any(acc is not None and acc.discrete and not acc.batches for acc in (oa, sa)):
        notes.append("boolean or integer values (a mask, indices): no rounding error to "
                     "measure" + _differ(oa))
    if weights is not None and weights.nonfinite_batches:
        sides = [side for side, count in (("float", weights.ref_nonfinite),
                                          ("quantized", weights.actual_nonfinite)) if count]
        notes.append(" and ".join(sides) + " weight holds NaN/Inf")
    for label, acc in (("output", oa), ("shadow", sa)):
        if acc is None:
            continue
        if acc.shape_mismatch:
            float_shape, quant_shape = acc.shape_mismatch
            notes.append(f"{label} shapes differ: float {float_shape} vs quantized {quant_shape}")
        if acc.nonfinite_batches:
            notes.append(f"{label}: NaN/Inf in {acc.nonfinite_batches} batches")
        if acc.overwritten:
            notes.append(f"{label}: {acc.overwritten} batches left out (the model's code wrote "
                         "into the float value before it was compared)")
        if acc.misrouted and routes is not None:
            notes.append(
                f"{label}: {acc.misrouted} batches left out: `{routes.float_path}` routed its "
                "rows unlike the float model (its index inputs or boxes differ: other experts "
                "or proposals, or their order), so a row would be another token or region on "
                "each side; the shadow compares alike rows")
    if skipped:
        notes.append(f"no shadow: {skipped}")
    return "; ".join(notes)



# ---------------------------------------------------------------- several quantized variants
#
# compare(float_model, {"fx": q1, "dynamic": q2}, data): each variant is planned as compare
# plans one pair (its own matching, accumulators, instrumented quantized model), except that its
# float twins are not observed in a float model of its own. Variants whose float graphs are one
# capture share one float model observing the float values all of them compare, and it runs
# once per batch; each variant's report is then collected as compare collects one.


class _FloatFanout(Logger):
    """Hands a float value to the twin of every variant's pair that compares it."""

    def __init__(self) -> None:
        super().__init__()
        self.twins: list[_FloatOutputs] = []  # a plain list: the twins are not submodules

    checks_overwrites = True  # each twin reads the value's version (_FloatOutputs)

    def forward(self, x: Any) -> None:
        value = detach(first_output(x))
        for twin in self.twins:
            twin.add(value)


@dataclass
class _FloatGroup:
    """Variants whose matchings captured the float model alike, and the one float model
    (instrumented for all of them) that runs for them."""

    names: list[str]
    matching: Matching
    """The first variant's matching: whose float capture the shared model is built from."""
    model: nn.Module | None = None


def _compare_variants(float_model: nn.Module, variants: Mapping[str, nn.Module],
                      data: Iterable[Any], *, comparisons: Iterable[str], metrics: MetricSpec,
                      keep_activations: bool, matching: Matching | Mapping[str, Matching] | None,
                      leaf_modules: Iterable[LeafSpec] | None, progress: bool | None,
                      max_batches: int | None, precision: torch.dtype,
                      inputs: int | Callable[[Any], Any] | None, capture: str,
                      ranks: Ranks = ONE_PROCESS) -> Report:
    """:func:`compare` of several quantized variants of ``float_model`` (see its *Variants*)."""
    matchings = _variant_matchings(float_model, variants, matching)
    total = _length(data, max_batches)
    example, data = _first_batch(data, inputs, max_batches)
    comparisons = tuple(comparisons)
    plans: dict[str, _Plan] = {}
    for name, quant_model in variants.items():
        given = matchings.get(name)
        with about_variant(name):
            plans[name] = _plan(float_model, quant_model, comparisons, metrics, keep_activations,
                                given, leaf_modules, precision, progress, capture,
                                example, shared_float=True)
    groups = _float_groups(plans)
    ran = _run_variants(plans, groups, data, progress, max_batches, inputs, total, ranks)
    reports = {}
    for name, plan in plans.items():
        with about_variant(name):
            reports[name] = _collect(plan, ran, progress, stacklevel=6)
    first = reports[next(iter(reports))]
    return dataclasses.replace(first, notes=first.notes + _groups_note(groups),
                               variants=reports, aligned=_align(reports, plans, groups))


def _variant_matchings(float_model: nn.Module, variants: Mapping[str, nn.Module],
                       matching: Matching | Mapping[str, Matching] | None,
                       ) -> Mapping[str, Matching]:
    """Check the variants (and the matchings given for them) before any work."""
    check_variants(float_model, variants)
    if matching is None:
        return {}
    if not isinstance(matching, Mapping):
        raise InputError("quant_model is a dict of variants, so matching must be one too: "
                         "{name: fxnumeric.match(float_model, variant)} for some or all of "
                         "them")
    unknown = [name for name in matching if name not in variants]
    if unknown:
        raise InputError(f"matching names {unknown[0]!r}, which is not a variant; variants "
                         f"are {', '.join(map(repr, variants))}")
    return matching


def _float_capture(matching: Matching) -> tuple[Any, ...]:
    """What two matchings' float graphs must share to be one capture: the regions (float path
    and scope, call sites) and each one's nodes (name, op, target). torch.fx names the nodes
    of two captures of one model alike, so variants of one float model mostly share it."""
    return tuple(sorted(((r.float_path, r.float_scope, r.whole_module, r.call_sites,
                          tuple((n.name, n.op, n.target) for n in r.float_view.gm.graph.nodes))
                         for r in matching.regions), key=lambda region: region[0]))


def _float_groups(plans: dict[str, _Plan]) -> list[_FloatGroup]:
    """The variants grouped by float capture, each group with its instrumented float model:
    one copy of each region's float graph observing the float values every variant of the
    group compares (found by region path and node name, as in
    :meth:`fxnumeric.advice.hybrid.HybridRunner._onto_float_base`)."""
    groups: dict[tuple[Any, ...], _FloatGroup] = {}
    for name, plan in plans.items():
        key = _float_capture(plan.matching)
        if key in groups:
            groups[key].names.append(name)
        else:
            groups[key] = _FloatGroup([name], plan.matching)
    for group in groups.values():
        fanouts: dict[tuple[str, str, int], _FloatFanout] = {}
        for name in group.names:
            plan = plans[name]
            for value, twin in plan.float_twins:
                fanouts.setdefault(value, _FloatFanout()).twins.append(twin)
        own = [b.region for name in group.names for b, _, _ in plans[name].blocks
               if b.own_region]  # blocks kept whole: regions of their own, by path
        group.model = observe_values(group.matching, "float", fanouts,
                                     regions={r.float_path: r for r in own}.values())
        watched: dict[str, list[Routes]] = {}
        for name in group.names:
            for r in plans[name].watched:
                watched.setdefault(r.float_path, []).append(r)
        for path, routes in watched.items():
            hook_calls(group.model, group.matching.float_model, path, routes, "float")
    return list(groups.values())


def _groups_note(groups: list[_FloatGroup]) -> tuple[str, ...]:
    if len(groups) < 2:
        return ()
    listed = "; ".join(", ".join(g.names) for g in groups)
    return (f"the float model ran {len(groups)} times per batch, once per float capture "
            f"({listed}): these variants' matchings captured it differently (other regions "
            "or node names, e.g. torch.export against torch.fx), so they cannot share its "
            "values; variants of one capture share one float run",)


def _run_variants(plans: dict[str, _Plan], groups: list[_FloatGroup], data: Iterable[Any],
                  progress: bool | None, max_batches: int | None,
                  inputs: int | Callable[[Any], Any] | None, total: int | None,
                  ranks: Ranks = ONE_PROCESS) -> _Ran:
    """:func:`_run` for several variants: per batch, each group's float model runs once, then
    the quantized model of each variant of the group against its values (every variant's sums
    merged under torch.distributed)."""

    def step(done: int, index: int, model_inputs: Any, batch: Any) -> None:
        kept = saved_buffers(*(g.model for g in groups if g.model is not None),
                             *(p.built.quant_model for p in plans.values())) if done == 0 else []
        for group in groups:
            assert group.model is not None
            if done == 0:
                for name in group.names:
                    check_devices(_or_graph(plans[name].matching.float_model, group.model),
                                  _or_graph(plans[name].matching.quant_model,
                                            plans[name].built.quant_model), model_inputs)
                float_out = _first_run(group.model, model_inputs, batch, inputs)
            else:
                float_out = run_model(group.model, model_inputs, which="float")
            for name in group.names:
                plan = plans[name]
                _end_batch(plan, _float_end(plan, float_out, model_inputs, index),
                           _quant_run(plan, name, model_inputs), model_inputs, index)
        if _copy_overwritten(plans.values(), first=done == 0):
            put_back(kept)
            step(done, index, model_inputs, batch)

    mergeable = [acc for plan in plans.values() for acc in _mergeable(plan)]
    capture = ([line for name, plan in plans.items() for line in _capture_lines(plan, name)]
               if ranks.parallel else [])
    return _feed(data, step, mergeable, progress, max_batches, inputs, total, ranks, capture)


def _quant_run(plan: _Plan, name: str, model_inputs: Any) -> Any:
    """A plan's quantized model on a batch whose float values its twins hold or will be
    handed (``name``: the variant's, "" for a compare of one quantized model).

    Raises:
        InputError: the model failed on the batch; where its input is finite and NaN/Inf
            appeared inside the quantized model before it failed, naming that op, read as
            every report reads it (:func:`_first_nonfinite`: the comparisons of the ops that
            ran before the failure) rather than the input.
    """
    def made_inside() -> tuple[str, str] | None:
        at = dict(_first_nonfinite(plan)).get("quantized")
        if at is None or at == "model output":
            return None
        return at, next((p.kind for p in plan.matching.pairs if p.name == at), "")

    return run_blaming_inside(run_model, plan.built.quant_model, model_inputs,
                              f"quantized ({name})" if name else "quantized", made_inside)


@dataclass(frozen=True)
class _FloatEnd:
    """What the batch's model-output metrics read of the float model's output
    (:func:`_float_end`): the value compared (:func:`model_output`) and the logits (``None``
    when it holds none), each a tensor or :class:`LinearRows`."""

    value: Any
    logits: Any


def _float_end(plan: _Plan, float_out: Any, batch: Any, index: int,
               by_rows: bool = False) -> _FloatEnd:
    """What :func:`_end_batch` reads of ``float_out``, what the float model returned on batch
    ``index``. With ``by_rows``, a value a float twin keeps as rows (the logits a large
    ``lm_head`` made) is read from those rows: the caller can then drop ``float_out`` before
    the quantized forward, which otherwise ran with both models' logits alive (two 96 MiB
    tensors for a 512-token SmolLM2 sequence in float32)."""
    plan.output_part.see(index, float_out)
    value = model_output(float_out)
    logits = looks_like_logits(float_out, batch, plan.reader.vocab_size)
    if by_rows and plan.model.additive:
        for rows in plan.turn.as_rows:
            value = rows if rows.stands_for(value) else value
            logits = rows if rows.stands_for(logits) else logits
    return _FloatEnd(value, logits)


def _end_batch(plan: _Plan, float_end: _FloatEnd, quant_out: Any, model_inputs: Any,
               index: int) -> None:
    """The batch's model-output sums, and every accumulator's batch closed (batch ``index``
    of the data)."""
    float_value, quant_value = float_end.value, model_output(quant_out)
    # real tokens only, where the batch's attention_mask fits the output's rows
    rows = plan.padding.see(float_value, quant_value, model_inputs, plan.reader, index)
    plan.model.update(float_value, quant_value, rows=rows)
    _llm_update(plan, float_end.logits, quant_out, model_inputs, index)
    for twin in plan.twins:
        twin.clear()
    for value in plan.values:
        value.clear()
    for routes in plan.watched:
        routes.clear()
    for acc in _accumulators(plan):
        acc.end_batch(index)


def _align(reports: dict[str, Report], plans: dict[str, _Plan],
           groups: list[_FloatGroup]) -> tuple[tuple[str | None, ...], ...]:
    """The variants' rows aligned: one entry per float value compared (the region path, call
    site and float output node of a capture), each holding every variant's row name there (``None``
    where a variant has none). Entries of the first float capture are in its run order (its
    matching's pairs' order: each call of a region where it runs, then graph order);
    rows of variants of another capture align with them by name, and a row matching none sits
    just before the entry its variant's next row is in (after its previous one, at the end)."""
    group_of = {name: i for i, group in enumerate(groups) for name in group.names}
    entries: list[dict[str, str]] = []
    # (where the call runs, node) in the first capture: Matching.run_position, graph order
    position: list[tuple[tuple[int, int, int], int]] = []
    by_value: dict[tuple[int, str, int, str], int] = {}
    by_name: dict[str, list[int]] = {}
    first = groups[0].matching
    regions = {r.float_path: i for i, r in enumerate(first.regions)}
    order: list[int] = []
    for name in sorted(reports, key=lambda n: group_of[n] > 0):  # the first capture first
        matching, group = plans[name].matching, group_of[name]
        if group > 0 and not order:
            order = sorted(range(len(entries)), key=position.__getitem__)  # stable on ties
        pending: list[int] = []  # new entries waiting for the next row that has a place
        for row in reports[name].rows:
            pair = matching.pair(row.name)
            region = matching.region_of(pair)
            node, site = region.output_nodes(pair)[0].name, region.call_site(pair)
            value = (group, region.float_path, site, node)
            found = by_value.get(value)
            if found is None or name in entries[found]:
                found = next((i for i in by_name.get(row.name, ()) if name not in entries[i]
                              and all(group_of[v] != group for v in entries[i])), None)
            if found is None:
                found = len(entries)
                entries.append({})
                if group == 0:
                    base = first.regions[regions[region.float_path]]
                    position.append((first.run_position(base, site),
                                     base.float_view.position(base.float_view.node(node))))
                else:
                    pending.append(found)
            elif pending:
                at = order.index(found)
                order[at:at] = pending
                pending = []
            entries[found][name] = row.name
            by_value.setdefault(value, found)
            by_name.setdefault(row.name, []).append(found)
        order += pending
    if len(groups) == 1:
        order = sorted(range(len(entries)), key=position.__getitem__)  # stable on ties
    return tuple(tuple(entries[i].get(name) for name in reports) for i in order)
