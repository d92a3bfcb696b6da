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

import itertools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._tensors import detach, first_output
from .capture import LeafSpec
from .distributed import ONE_PROCESS, Ranks, data_parallel
from .errors import FxNumericWarning, InputError
from .guards import contents
from .instrument import Instrumented, instrument, resolve_matching
from .loggers import Logger
from .match import Matching, Pair
from .metrics import BUILTIN_METRICS, Accumulator, MetricFn, prepare_actual
from .progress import Progress, phase
from .report import Report, ReportRow, WeightHistogram
from .run import (
    check_batch,
    check_data,
    check_devices,
    nonfinite_inputs,
    pick_inputs,
    run_model,
)
from .weights import pair_weights

__all__ = ["compare", "COMPARISONS"]

COMPARISONS = ("weights", "outputs", "shadows")


class _QuantValue:
    """A pair's quantized output in the current batch, dequantized once with its energy.

    The output comparator and the shadow of a pair both read it; sharing saves one
    dequantize and one reduction per pair and batch (metrics are memory-bound).
    """

    def __init__(self, precision: torch.dtype) -> None:
        self.precision = precision
        self._seen: Any = None
        self._value: tuple[torch.Tensor, float] | None = None

    def get(self, x: Any) -> tuple[Any, float | None]:
        if not isinstance(x, torch.Tensor):
            return x, None
        if x is not self._seen:
            self._seen, self._value = x, prepare_actual(x, self.precision)
        assert self._value is not None
        return self._value

    def clear(self) -> None:
        self._seen = self._value = None


class _FloatOutputs(Logger):
    """Keeps the float outputs of the current batch, in call order, for the quantized twin."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[Any] = []

    def forward(self, x: Any) -> None:
        self.pending.append(detach(first_output(x)))


class _CompareToFloat(Logger):
    """Compares each quantized output with the float twin's pending output."""

    def __init__(self, twin: _FloatOutputs, acc: Accumulator, value: _QuantValue) -> None:
        super().__init__()
        self.twin = [twin]  # a list, so the twin is not registered as a submodule
        self.acc = acc
        self.value = value

    def forward(self, x: Any) -> None:
        pending = self.twin[0].pending
        if pending:
            actual, energy = self.value.get(first_output(x))
            self.acc.update(pending.pop(0), actual, actual_energy=energy)


class _ShadowMetrics(Logger):
    def __init__(self, acc: Accumulator, value: _QuantValue) -> None:
        super().__init__()
        self.acc = acc
        self.value = value

    def forward(self, x: Any, y: Any) -> None:  # type: ignore[override]
        actual, energy = self.value.get(first_output(x))
        self.acc.update(first_output(y), actual, actual_energy=energy)


MetricSpec = Iterable[str | MetricFn] | dict[str, MetricFn] | None


def _resolve_metrics(metrics: MetricSpec) -> tuple[list[str], dict[str, MetricFn]]:
    if metrics is None:
        return list(BUILTIN_METRICS), {}
    if isinstance(metrics, dict):
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
            custom[name] = m
            names.append(name)
        else:
            raise InputError(f"metrics entries must be names or functions, got {m!r}")
    return names, custom


def _histogram(ref: torch.Tensor, actual: torch.Tensor, bins: int = 60) -> WeightHistogram:
    # float32 is exact enough for bin counts and halves the transient memory of float64
    r = ref.detach().float().flatten()
    a = (actual.dequantize() if actual.is_quantized else actual).detach().float().flatten()
    lo, hi = float(min(r.min(), a.min())), float(max(r.max(), a.max()))
    if lo == hi:
        hi = lo + 1.0
    return WeightHistogram(
        lo, hi,
        tuple(int(c) for c in torch.histc(r, bins, lo, hi)),
        tuple(int(c) for c in torch.histc(a, bins, lo, hi)),
    )


def compare(
    float_model: nn.Module,
    quant_model: nn.Module,
    data: Iterable[Any],
    *,
    comparisons: Iterable[str] = COMPARISONS,
    metrics: MetricSpec = None,
    keep_activations: bool = False,
    matching: Matching | None = None,
    leaf_modules: Iterable[LeafSpec] | None = None,
    progress: bool | None = None,
    max_batches: int | None = None,
    precision: torch.dtype = torch.float32,
    inputs: int | Callable[[Any], Any] | None = None,
    capture: str = "fx",
    distributed: bool | None = None,
) -> Report:
    """Compare a float model with its quantized counterpart, layer by layer, over ``data``.

    Args:
        float_model: the float model (not modified).
        quant_model: the quantized model (not modified).
        data: an iterable of batches (a DataLoader works); each batch is a tensor, a tuple
            of positional inputs or a dict of keyword inputs (``{"input_ids": ids,
            "attention_mask": mask}``). A single tensor is one batch. For a labelled
            DataLoader that yields ``(x, label)``, pass ``inputs=0``.
        comparisons: any of ``"weights"``, ``"outputs"`` (cumulative error: both models
            run on the same input) and ``"shadows"`` (local error: each quantized op against
            its float twin fed the same dequantized input).
        metrics: built-in metric names (``sqnr``, ``cosine``, ``mse``, ``max_abs_error``)
            and/or functions ``fn(ref, actual) -> float`` (or a ``{name: fn}`` dict, added to
            the built-ins). User metrics are averaged over batches.
        keep_activations: keep every logged ``(float, quantized)`` tensor pair in
            ``row.activations`` (memory then grows with the data).
        matching: a :func:`fxnumeric.match` result to reuse; it must have been built from
            ``float_model`` and ``quant_model``.
        leaf_modules: module types or names to keep whole when tracing.
        progress: show progress on stderr: tracing and pairing, the batches, the weight
            comparison (default: when stderr is a terminal or in a Jupyter notebook).
        max_batches: stop after this many batches.
        precision: dtype of the per-batch reductions; sums over batches are always float64
            (see :mod:`fxnumeric.metrics`). ``torch.float64`` is exact and about six times
            slower per activation.
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
            each rank compares all of its ``data`` alone.

    Returns:
        A :class:`fxnumeric.Report` with one row per paired layer.

    Raises:
        InputError: before any batch runs, when ``data`` is not an iterable of batches, a
            batch is ``None``, a string, a number or empty, the models have no op in common
            (nothing paired) or the "float" model is quantized too (the quantized model
            passed twice). A batch holding NaN/Inf is not an error: it is left out of every
            metric with a :class:`fxnumeric.FxNumericWarning`, and ``Report.notes`` says which.

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
    ranks = data_parallel(distributed, data)
    if ranks.rank:
        progress = False  # one progress bar per terminal: rank 0's
    if float_model is quant_model and float_model is not None:
        raise InputError(
            f"the same {type(float_model).__name__} object was passed as float_model and "
            "quant_model: compare needs the float model and the quantized model made from "
            "it.\nFix: keep the float model before quantizing (float_model = "
            "copy.deepcopy(model) before prepare / quantize_dynamic) and pass both")
    total = _length(data, max_batches)
    example, data = _first_batch(data, inputs)
    check_batch(example, 0)  # before tracing: the first batch is checked before any work
    if matching is not None:
        example = None  # captured already; else torch.export's example, how modules are called
    plan = _plan(float_model, quant_model, comparisons, metrics, keep_activations, matching,
                 leaf_modules, precision, progress, capture, example)
    ran = _run(plan, data, progress, max_batches, inputs, total, ranks)
    return _collect(plan, ran, progress)


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


def _plan(float_model: nn.Module, quant_model: nn.Module, comparisons: Iterable[str],
          metrics: MetricSpec, keep: bool,
          matching: Matching | None, leaf_modules: Iterable[LeafSpec] | None,
          precision: torch.dtype, progress: bool | None = None, capture: str = "fx",
          example_inputs: Any = None) -> _Plan:
    """Validate the options, match, and build one instrumented graph per side."""
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
    _check_pairable(matching)
    outputs = {p.name: Accumulator(custom, keep, precision) for p in matching.pairs}
    shadows = {p.name: Accumulator(custom, keep, precision) for p in matching.pairs}
    twins: list[_FloatOutputs] = []
    values = {p.name: _QuantValue(precision) for p in matching.pairs}

    def output_observers(pair: Pair) -> tuple[nn.Module, nn.Module]:
        twin = _FloatOutputs()
        twins.append(twin)
        return twin, _CompareToFloat(twin, outputs[pair.name], values[pair.name])

    def shadow_observer(pair: Pair) -> nn.Module:
        return _ShadowMetrics(shadows[pair.name], values[pair.name])

    # each batch runs each model once: the quantized graph holds both the output
    # comparators and the shadows
    built = instrument(
        matching,
        outputs=output_observers if "outputs" in wanted else None,
        shadows=shadow_observer if "shadows" in wanted else None,
    )
    return _Plan(matching, wanted, names, built,
                 outputs if "outputs" in wanted else {}, shadows if "shadows" in wanted else {},
                 Accumulator(custom, precision=precision), twins, list(values.values()))


def _check_pairable(matching: Matching) -> None:
    """Refuse, before any batch runs, a pair of models that cannot be compared layer by layer."""
    # the input's quantize pairs with the input of any model: it says nothing about the pair
    if all(p.kind in ("quantize", "dequantize") for p in matching.pairs):
        float_name = type(matching.float_model).__name__ if matching.float_model else "float"
        quant_name = type(matching.quant_model).__name__ if matching.quant_model else "quantized"
        raise InputError(
            f"nothing paired: no compute op of the float model ({float_name}) was found in the "
            f"quantized model ({quant_name}); {len(matching.unmatched_float)} float and "
            f"{len(matching.unmatched_quant)} quantized nodes are unpaired. They do not look "
            "like a float model and the quantized model made from it, and no layer can be "
            "compared.\nFix: pass the float model the quantized one was made from; "
            "fxnumeric.match(float_model, quant_model).table() lists what each side holds")
    found = [contents(region.float_view) for region in matching.regions]
    if any(c.quantizes for c in found):
        ops = [n for c in found for n in c.quantized_ops or c.quantize_nodes]
        shown = ", ".join(f"`{n}`" for n in ops[:3]) + (", ..." if len(ops) > 3 else "")
        raise InputError(
            f"the float model is quantized too: it computes {len(ops)} quantized ops or "
            f"quantize nodes ({shown}); compare measures a quantized model against the float "
            "model it was made from (against another quantized one, its shadows run quantized "
            "ops on float input or read nonsense). Was the quantized model passed twice?\n"
            "Fix: compare(float_model, quant_model, data) "
            "with the float model the quantized one was made from (keep a copy.deepcopy of "
            "it before prepare / convert / quantize_dynamic)")


def _length(data: Iterable[Any], max_batches: int | None) -> int | None:
    """How many batches will be read, when ``data`` says (for the progress bar)."""
    if isinstance(data, torch.Tensor):  # one tensor is one batch, not a batch per row
        return 1
    total = len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    return total


@dataclass(frozen=True)
class _Ran:
    """What :func:`_run` fed: batches compared, and the indices of those left out (NaN/Inf)."""

    batches: int
    skipped: tuple[int, ...]


def _run(plan: _Plan, data: Iterable[Any], progress: bool | None,
         max_batches: int | None, inputs: int | Callable[[Any], Any] | None = None,
         total: int | None = None, ranks: Ranks = ONE_PROCESS) -> _Ran:
    """Feed every batch (this rank's share) to both instrumented models; a batch holding
    NaN/Inf is left out. Under torch.distributed the ranks' sums are merged at the end."""
    float_gm, quant_gm = plan.built.float_model, plan.built.quant_model
    if isinstance(data, torch.Tensor):  # one tensor is one batch, not a batch per row
        data = [data]
    accumulators = [*plan.outputs.values(), *plan.shadows.values(), plan.model]
    bar = Progress(ranks.count(total), "comparing batches", progress)
    batches = 0
    skipped: list[int] = []
    try:
        for index, batch in ranks.share(enumerate(data), accumulators):
            if max_batches is not None and index >= max_batches:
                break
            model_inputs = pick_inputs(batch, inputs)  # a dict is passed as keyword inputs
            check_batch(model_inputs, index)
            if nonfinite_inputs(model_inputs):
                skipped.append(index)
                warnings.warn(f"batch {index} holds NaN/Inf: it is left out of every metric "
                              "(Report.notes lists the batches left out)",
                              FxNumericWarning, stacklevel=3)
                bar.update()
                continue
            if batches == 0:
                check_devices(plan.matching.float_model or float_gm,
                              plan.matching.quant_model or quant_gm, model_inputs)
                float_out = _first_run(float_gm, model_inputs, batch, inputs)
            else:
                float_out = run_model(float_gm, model_inputs, which="float")
            quant_out = run_model(quant_gm, model_inputs, which="quantized")
            plan.model.update(first_output(float_out), first_output(quant_out))
            for twin in plan.twins:
                twin.pending.clear()
            for value in plan.values:
                value.clear()
            for acc in accumulators:
                acc.end_batch()
            batches += 1
            bar.update()
    finally:
        bar.close()
    batches, skipped = ranks.reduce(accumulators, batches, skipped)
    if batches == 0 and skipped:
        raise InputError(f"every batch holds NaN/Inf ({len(skipped)} batches): nothing is left "
                         "to compare.\nFix: clean the data (torch.isfinite(x).all() per batch) "
                         "or check the preprocessing that produces it")
    if batches == 0:
        raise InputError("data yielded no batches: pass an iterable of input tensors "
                         "(or tuples of inputs)")
    return _Ran(batches, skipped)


def _collect(plan: _Plan, ran: _Ran, progress: bool | None = None) -> Report:
    """One report row per pair name, from the accumulators and the weights."""
    matching = plan.matching
    # reduced as they come: one layer's weights alive at a time (dequantized, offloaded ones)
    weights: dict[str, tuple[list[str], Accumulator, WeightHistogram]] = {}
    if "weights" in plan.comparisons:
        with phase("comparing weights", progress):
            for pair, key, fw, qw in pair_weights(matching):
                if pair.name not in weights:  # weights are small: exact float64 sums
                    weights[pair.name] = ([], Accumulator(precision=torch.float64),
                                          _histogram(fw, qw))
                weights[pair.name][0].append(key)
                weights[pair.name][1].update(fw, qw)
    rows = []
    seen: set[str] = set()
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
            weight_sqnr=w_acc.value("sqnr") if w_acc else None,
            output=oa.values(plan.metrics) if oa and oa.batches else {},
            shadow=sa.values(plan.metrics) if sa and sa.batches else {},
            weight_keys=tuple(keys),
            float_nodes=p.float_nodes,
            quant_nodes=p.quant_nodes,
            note=_note(oa, sa, plan.built.skipped.get(p.name)),
            weight_histogram=hist,
            activations=tuple(oa.kept) if oa is not None and oa.kept is not None else None,
            float_rms=_rms(oa if oa and oa.batches else sa),
            spread={key: spread for key, acc in (("output_sqnr", oa), ("shadow_sqnr", sa))
                    if acc is not None and (spread := acc.spread()) is not None},
        ))
    nonfinite = _first_nonfinite(plan)
    return Report(
        rows=tuple(rows),
        metrics=tuple(plan.metrics),
        comparisons=plan.comparisons,
        batches=ran.batches,
        model_output=plan.model.values(plan.metrics),
        unmatched=tuple((u.node, "float", u.reason) for u in matching.unmatched_float)
        + tuple((u.node, "quantized", u.reason) for u in matching.unmatched_quant),
        torch_version=torch.__version__,
        notes=(("the quantized model has no quantized op: nothing was quantized, coverage n/a",)
               if matching.nothing_quantized else ())
        + tuple(f"capture ({side}): {note}" for side, note in matching.capture_notes)
        + _skipped_note(ran) + _nonfinite_note(nonfinite),
        model_output_rms=_rms(plan.model),
        skipped_batches=ran.skipped,
        nonfinite=nonfinite,
    )


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


def _rms(acc: Accumulator | None) -> float | None:
    """Root mean square of the float (reference) tensors an accumulator has seen."""
    if acc is None or not acc.batches or not acc.count:
        return None
    return (acc.signal / acc.count) ** 0.5


def _first_batch(data: Iterable[Any], inputs: int | Callable[[Any], Any] | None,
                 ) -> tuple[Any, Iterable[Any]]:
    """The model inputs of the first batch (checked before tracing; the capture's example),
    and ``data`` still whole (an iterator is chained back together)."""
    empty = ("data yielded no batches: pass an iterable of input tensors (or tuples of "
             "inputs)")
    if isinstance(data, torch.Tensor):
        return data, data
    if isinstance(data, (list, tuple)):
        if not data:
            raise InputError(empty)
        return pick_inputs(data[0], inputs), data
    iterator = iter(data)
    try:
        first = next(iterator)
    except StopIteration:
        raise InputError(empty) from None
    return pick_inputs(first, inputs), itertools.chain([first], iterator)


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


def _note(oa: Accumulator | None, sa: Accumulator | None, skipped: str | None) -> str:
    notes = []
    for label, acc in (("output", oa), ("shadow", sa)):
        if acc is None:
            continue
        if acc.shape_mismatch:
            float_shape, quant_shape = acc.shape_mismatch
            notes.append(f"{label} shapes differ: float {float_shape} vs quantized {quant_shape}")
        if acc.nonfinite_batches:
            notes.append(f"{label}: NaN/Inf in {acc.nonfinite_batches} batches")
    if skipped:
        notes.append(f"no shadow: {skipped}")
    return "; ".join(notes)

