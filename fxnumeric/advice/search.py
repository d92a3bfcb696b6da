"""From "where" to "what to do": per-layer sensitivity and which layers to keep in float.

Both run *hybrid* models (:mod:`fxnumeric.advice.hybrid`): the float graph with one layer quantized,
or the quantized graph with some layers float, made from the two models the user already has.
Nothing is re-quantized, so a hybrid costs one forward pass; in a model of blocks called as
modules (a decoder's layers), the blocks before its first swapped layer are replayed from a
hybrid that ran them (:mod:`fxnumeric.advice.replay`), so it costs the blocks from there on.

:func:`sensitivity` measures, for each layer, the end metric of "only this layer quantized"
and of "all but this layer quantized". :func:`advise` searches for the smallest set of layers
to keep float so that the end metric reaches a target: it ranks layers by sensitivity, then
adds layers one at a time, each step verifying the best few candidates on the real hybrid and
keeping the one that helps most. Ranking alone is not the answer (errors interact); the
verified curve is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import nn
from torch.ao.quantization.quantization_mappings import (
    get_default_dynamic_quant_module_mappings,
)

from .. import flows
from .._tensors import after_loss, dequantize_all, model_output, output_part, part_note
from ..capture.export import is_export_graph
from ..capture.wrappers import model_to_compare
from ..errors import (
    FxNumericError,
    FxNumericWarning,
    InputError,
    InstrumentationError,
    about_variant,
)
from ..flows.torchao import quantized_paths, quantized_weights
from ..guards import check_pairable, check_variants, warn_foreign_weights
from ..instrument import resolve_matching
from ..llm_metrics import (
    LogitsAccumulator,
    LogitsReader,
    logits_reader,
    looks_like_logits,
    output_mask,
    single_logit,
)
from ..match import Matching
from ..metrics import ROUNDING_SQNR_DB, cosine, sqnr
from ..numbers import a_count, a_number, shown, shown_apart, unit
from ..ops import is_quantized_module
from ..pairing import op_name
from ..progress import Progress
from ..report.render import tabulate_format, text_table
from ..run import check_devices, keeps_buffers, numbered_batches
from ..storage import dynamic_weight_dtype, is_dynamic_module, module_weights
from ..weights import transposed_linear, weight_sqnrs
from .diagnose import MAKES_NONFINITE, MAKES_NONFINITE_FIX
from .hybrid import (
    HybridFailure,
    HybridRunner,
    Swap,
    called_whole,
    function_target,
    module_calls,
    module_path,
    whole_of,
)
from .mixed import FLOAT, advise_variants, check_variant
from .replay import BlockReplay

__all__ = ["sensitivity", "advise", "Sensitivity", "LayerSensitivity", "Advice", "END_METRICS"]

_log = logging.getLogger(__name__)

REPLAY_MIN_BYTES = 64 << 20
"""Block outputs kept for replay (:mod:`fxnumeric.advice.replay`): at least this, else a
quarter of the float model's parameter bytes."""

EndMetric = Callable[[torch.Tensor, torch.Tensor], float]
"""Called as ``fn(float_output, candidate_output) -> float``, higher is better; the outputs of
all batches are concatenated along dim 0 (so a metric can take the worst sample). Batches whose
outputs differ beyond dim 0 (images of several sizes) cannot be: the built-in metrics read
them, a custom one gets an :class:`~fxnumeric.InputError`."""


def min_cosine(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """The lowest cosine similarity over samples (dim 0) of two outputs; a sample that is all
    zeros in both reads 1 (the two agree exactly), as :func:`fxnumeric.metrics.cosine` reads
    two zero tensors (a final ReLU zeroing half the samples made every model read 0, the
    float model itself too).

    Raises:
        InputError: each sample holds a single value (see :func:`_per_sample`).
    """
    r, a = _per_sample(ref), _per_sample(actual)
    cos = torch.nn.functional.cosine_similarity(r, a, dim=1, eps=1e-30)
    both_zero = (r == 0).all(dim=1) & (a == 0).all(dim=1)
    return float(torch.where(both_zero, torch.ones_like(cos), cos).min())


def _per_sample(output: torch.Tensor) -> torch.Tensor:
    """``output`` as one row per sample (dim 0), in float64, for :func:`min_cosine`.

    Refused when each sample holds a single value (``(B, 1)``: a regressor's or a binary
    classifier's score; a 1-D output, whose dim 0 holds one value per sample too): the
    cosine of two numbers is +1 or -1 by their signs alone, so a model 12% off on every
    sample read 1, and an unbatched output whose cosine is 0.75 read -1.
    """
    rows = output.detach().double().reshape(output.shape[0] if output.dim() else 1, -1)
    if rows.shape[1] == 1:
        raise InputError(
            f"metric 'min_cosine' reads the cosine of each sample (dim 0) of the output, and "
            f"each sample of this output (shape {list(output.shape)}) holds a single value: "
            "the cosine of two numbers is +1 or -1 by their signs alone, whatever the error. "
            "A 1-D output is read as one value per sample too.\nFix: metric='sqnr' (or a "
            "function of your own, such as the largest relative error); for an unbatched "
            "output (one sample per batch), metric='cosine' reads the cosine of the whole "
            "output")
    return rows


END_METRICS: dict[str, EndMetric] = {"sqnr": sqnr, "cosine": cosine, "min_cosine": min_cosine}
"""Built-in end metrics on the whole output: output SQNR (dB), cosine of the whole output,
lowest per-sample cosine. The LLM metrics :data:`LLM_END_METRICS` are built in too."""

LLM_END_METRICS = {"kl": False, "top1_agreement": True}
"""Built-in end metrics of a language model's logits over real tokens (the batch's
``attention_mask``), read by :class:`fxnumeric.llm_metrics.LogitsAccumulator`: mean per-token
KL(float || candidate) in nats (lower is better) and top-1 token agreement (higher is
better). Each maps to whether higher is better."""


@dataclass(frozen=True)
class _Metric:
    """An end metric: its name, its direction, and how it reads one model's outputs."""

    name: str
    higher_is_better: bool
    fn: EndMetric | None = None  # on the outputs of all batches, concatenated
    reader: LogitsReader = LogitsReader()  # how the output's positions fit the batch

    def reference(self, output: Any, batch: Any) -> Any:
        """What of the float model's output the metric keeps for the comparisons."""
        if self.fn is not None:
            return self.read(output, batch)
        logits = looks_like_logits(output, batch, self.reader.vocab_size)
        if logits is not None:
            return logits.detach()
        scores = dequantize_all(model_output(output))  # no logits: say why, if it can be told
        if isinstance(scores, torch.Tensor) and single_logit(scores):
            raise InputError(
                f"metric {self.name!r} reads the logits as a distribution over their last "
                f"dim, and the model's logits have one value there (shape "
                f"{list(scores.shape)}: a regressor's, or a binary classifier's single "
                "score): over one class the softmax is 1 and the argmax 0 whatever the value, "
                "so 'kl' would read 0 and 'top1_agreement' 1 however far the quantized model "
                "is off.\nFix: metric='sqnr' (or a function "
                "of your own on the scores, such as the agreement of their signs for a binary "
                "classifier)")
        raise InputError(
            f"metric {self.name!r} reads logits, and the model output is not logits (an "
            "output with .logits, or a tensor whose last dim is the vocabulary); use "
            "'sqnr' or 'cosine' for other models"
        )

    def read(self, output: Any, batch: Any) -> torch.Tensor:
        """What a metric function reads of a model's ``output`` on ``batch``: for a built-in
        one, its padded positions zeroed where the batch's ``attention_mask`` fits its rows
        (:func:`~fxnumeric.llm_metrics.output_mask`, as compare's model output reads real
        tokens only): a zero in both outputs adds nothing to an SQNR, a cosine or a sample's
        cosine, which then read real tokens alone (NaN a model leaves at padding included).
        A function of your own gets the output as it is. Zeroing twice changes nothing."""
        out = _as_output(output)
        real = self.real_rows(out, batch)
        if real is None or bool(real.all()):
            return out
        return out.masked_fill(~real.reshape(*real.shape, *(1,) * (out.dim() - real.dim())),
                               0)

    def real_rows(self, out: torch.Tensor, batch: Any) -> torch.Tensor | None:
        """The rows of model output ``out`` a built-in metric reads (:meth:`read`): its real
        tokens, where the batch's ``attention_mask`` fits them; ``None``: every row."""
        if self.fn not in END_METRICS.values() or out.dim() < 2:
            return None
        return output_mask(out, batch, self.reader)[0]

    def start(self) -> _MetricRun:
        return _MetricRun(self)

    def utility(self, value: float) -> float:
        """``value`` as a number where higher is better (what the search maximises)."""
        if math.isnan(value):
            return -math.inf
        return value if self.higher_is_better else -value

    def meets(self, value: float, target: float) -> bool:
        return value >= target if self.higher_is_better else value <= target


class _MetricRun:
    """One candidate's metric over the batches, fed batch by batch."""

    def _by_batch(self, shapes: set[tuple[int, ...]]) -> float:
        """The built-in metrics over batches whose outputs differ beyond dim 0: SQNR and
        cosine of the whole output are sums, read off the outputs flattened; the lowest
        per-sample cosine is the lowest of each batch's. A custom metric, called on all
        batches' outputs at once, cannot be."""
        fn = self.metric.fn
        if fn is sqnr or fn is cosine:
            return float(fn(_flat(self.refs), _flat(self.outputs)))
        if fn is min_cosine:  # NaN wins, as torch's min reads it (Python's min may skip it)
            lowest = [min_cosine(r, o) for r, o in zip(self.refs, self.outputs, strict=True)]
            return math.nan if any(map(math.isnan, lowest)) else min(lowest)
        listed = ", ".join(str(list(s)) for s in sorted(shapes)[:3])
        raise InputError(
            f"metric {self.metric.name!r} is called with the outputs of all batches "
            f"concatenated along dim 0, and the batches' outputs differ beyond it ({listed}).\n"
            "Fix: batches of one size, or a built-in metric ('sqnr', 'cosine', 'min_cosine'), "
            "which read such batches")

    def __init__(self, metric: _Metric) -> None:
        self.metric = metric
        self.outputs: list[torch.Tensor] = []
        self.refs: list[torch.Tensor] = []
        self.logits = LogitsAccumulator() if metric.fn is None else None

    def add(self, reference: Any, output: Any, batch: Any) -> torch.Tensor:
        """Add a candidate's ``output`` on ``batch``; return what the metric read of it."""
        if self.logits is None:
            self.refs.append(reference)
            self.outputs.append(self.metric.read(output, batch))
            return self.outputs[-1]
        candidate = looks_like_logits(output, batch, self.metric.reader.vocab_size)
        if candidate is None:
            candidate = _as_output(output)
        self.logits.update_batch(reference, candidate.detach(), batch, self.metric.reader)
        if self.logits.unfit_masks and self.logits.unfit_shapes is not None:
            mask, lead = self.logits.unfit_shapes
            raise InputError(
                f"metric {self.metric.name!r} is read over real tokens, and the batch's "
                f"attention_mask {list(mask)} holds padding but does not fit the logits' "
                f"positions {list(lead)}, and the model gives no mask of its own for them (as a "
                "Hugging Face speech model's _get_feature_vector_attention_mask does): the "
                "metric would read padding as if it were real.\nFix: batches without padding, "
                "or metric='sqnr'")
        return candidate

    def value(self) -> float:
        if self.logits is not None:
            if not self.logits.tokens:
                raise InputError(
                    f"metric {self.metric.name!r} is read over real tokens, and no batch holds "
                    "one: every attention_mask is all 0. Fix: batches with real tokens (1 in "
                    "attention_mask where a token is not padding)")
            return float(self.logits.values()[self.metric.name])
        shapes = {tuple(o.shape[1:]) for o in self.refs}
        if len(shapes) > 1:  # batches of other sizes (images): no one tensor holds them all
            return self._by_batch(shapes)
        ref, candidate = _concat(self.refs), _concat(self.outputs)
        try:
            return float(self.metric.fn(ref, candidate))  # type: ignore[misc]
        except FxNumericError:
            raise  # a built-in metric refusing these outputs says why itself
        except Exception as exc:  # the user's metric: say which and on what
            raise InputError(
                f"metric {self.metric.name!r} failed on outputs of shape {list(ref.shape)}: "
                f"{type(exc).__name__}: {exc}. It is called as fn(float_output, "
                "candidate_output) with the outputs of all batches concatenated along dim 0, "
                "and must return a float."
            ) from exc


def _resolve_metric(metric: str | EndMetric, model: Any = None,
                    others: Iterable[Any] = ()) -> _Metric:
    """``metric`` as a :class:`_Metric`; an LLM metric reads the kind of ``model`` (the float
    model), else of ``others`` (the quantized models), to know what the logits predict."""
    if isinstance(metric, str):
        if metric in LLM_END_METRICS:
            return _Metric(metric, LLM_END_METRICS[metric], None,
                           logits_reader(model, *others))
        if metric not in END_METRICS:
            raise InputError(
                f"unknown metric {metric!r}; built-in end metrics are "
                f"{', '.join([*END_METRICS, *LLM_END_METRICS])}, or pass a function "
                "(float_output, candidate_output) -> float, higher is better"
            )
        return _Metric(metric, True, END_METRICS[metric], logits_reader(model, *others))
    if callable(metric):
        return _Metric(getattr(metric, "__name__", "metric"), True, metric)
    raise InputError(f"metric must be a name or a function, got {metric!r}")


def _made_nonfinite(reference: Any, read: Any) -> bool:
    """Whether ``read`` (what the metric read of a hybrid's output) holds NaN/Inf where
    ``reference`` (the float model's, as the metric keeps it) is finite; -inf logits both
    hold (a masked token) are not made by the hybrid."""
    if not isinstance(read, torch.Tensor) or not (read.is_floating_point() or read.is_complex()):
        return False
    if bool(torch.isfinite(read).all()):
        return False
    if isinstance(reference, torch.Tensor) and reference.shape == read.shape:
        return bool((torch.isfinite(reference) & ~torch.isfinite(read)).any())
    return True


def _nonfinite_note(found: Mapping[str, int]) -> tuple[str, ...]:
    """The note on the quantized layers ``found`` (``{module path: batch number}``) that made
    NaN/Inf from finite input where the float model's output is finite, in diagnose's words
    (:data:`~fxnumeric.advice.diagnose.MAKES_NONFINITE`); ``""`` stands for batches where no
    quantized layer was seen making them."""
    layers = {layer: number for layer, number in found.items() if layer}
    notes = []
    if layers:
        listed = ", ".join(f"`{layer}` (batch {number} of data)"
                           for layer, number in list(layers.items())[:5])
        more = f" and {len(layers) - 5} more" if len(layers) > 5 else ""
        one = len(layers) == 1
        notes.append(
            f"the quantized output of {listed}{more} holds NaN/Inf from finite input, where the "
            f"float model's output is finite: {MAKES_NONFINITE}, so every model that quantizes "
            f"{'it' if one else 'one of them'} reads a NaN or infinite metric. "
            f"Fix{'' if one else ', for each'}: {MAKES_NONFINITE_FIX}")
    if "" in found:
        notes.append(
            f"a hybrid's output holds NaN/Inf on batch {found['']} of data where the float "
            "model's is finite, and no quantized layer was seen making them from finite input "
            "(a float op fed a quantized layer's error, or an op that is not paired): "
            "fxnumeric.compare names where NaN/Inf first appears")
    return tuple(notes)


def _padding_note(padded: int, positions: int) -> str:
    """What a built-in end metric left out of the model output (:meth:`_Metric.read`)."""
    if not padded:
        return ""
    return (f"model output: the end metric reads real tokens only (attention_mask): {padded} "
            f"of its {positions} positions ({padded / positions:.0%}) are padding, left out")


def _flat(outputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([o.reshape(-1) for o in outputs])


def _concat(outputs: list[torch.Tensor]) -> torch.Tensor:
    if outputs[0].dim() == 0:
        return torch.stack(outputs)
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _as_output(value: Any) -> torch.Tensor:
    # what compare's model output reads: the logits, not the loss a labelled batch adds
    out = dequantize_all(model_output(value))
    if not isinstance(out, torch.Tensor):
        raise InputError(f"the model output is a {type(out).__name__}, not a tensor; the end "
                         "metric needs the model to return a tensor (or a tuple, dict or dataclass "
                         "holding one)")
    return out.detach()


Hybrid = tuple[str, tuple[Swap, ...]]
"""``(base, swaps)``: the ``base`` model (``"float"`` or ``"quant"``) with ``swaps`` applied."""


class _Search:
    """The models, the data and the metric of one sensitivity or advise call.

    ``quant_model`` may be ``{variant name: quantized model}``: every variant is matched
    against the float model on the first batch, and hybrids mix them (see
    :class:`~fxnumeric.advice.hybrid.HybridRunner`).
    """

    def __init__(self, float_model: nn.Module, quant_model: nn.Module | Mapping[str, nn.Module],
                 data: Iterable[Any], metric: str | EndMetric, matching: Matching | None,
                 progress: bool | None, inputs: int | Callable[[Any], Any] | None = None,
                 capture: str = "auto") -> None:
        # an ExportedProgram: its module; torch.compile's or DataParallel's: the one it wraps
        float_model = model_to_compare(float_model, "float")
        variants = {name: model_to_compare(model, "quantized")
                    for name, model in (quant_model.items() if isinstance(quant_model, Mapping)
                                        else [(None, quant_model)])}
        if isinstance(quant_model, Mapping):  # as compare's: names, models
            check_variants(float_model, variants)
        self.metric = _resolve_metric(metric, float_model, variants.values())
        self.metric_name = self.metric.name
        numbered = numbered_batches(data, inputs)
        self.batches = [batch for _, batch in numbered]
        self.batch_numbers = [index for index, _ in numbered]  # in data: what messages name
        for model in variants.values():
            check_devices(float_model, model, self.batches[0])
        matchings = {}
        for name, model in variants.items():
            with contextlib.nullcontext() if name is None else about_variant(name):
                matchings[name] = resolve_matching(
                    float_model, model, matching if name is None else None, None,
                    capture=capture, example_inputs=self.batches[0], validate=False)
                if name is not None:
                    check_variant(matchings[name])
                else:  # as a variant's: one of another seed is warned about
                    warn_foreign_weights(
                        weight_sqnrs(matchings[name]), "the quantized model's weights",
                        "Every hybrid mixes its layers with the float model's as if they were "
                        "the same model's", stacklevel=4)
                # as compare and diagnose: a quantized "float" model (the quantized model
                # passed twice) is refused, not measured at inf dB against itself
                check_pairable(matchings[name])
        self.matching = next(iter(matchings.values()))
        self.runner = HybridRunner(self.matching if None in matchings else matchings)
        self.progress = progress
        self.evaluations = 0
        self.failed: dict[str, str] = {}  # {hybrid: why}: hybrids an op of failed in
        self._references: list[Any] | None = None
        self._read_notes: tuple[str, ...] = ()
        # {layer (module path): batch number}: quantized layers whose output held NaN/Inf
        # from finite inputs in a hybrid whose output held them where the float model's did
        # not; a batch listed under "" is one where no quantized layer was seen making them
        self._nonfinite: dict[str, int] = {}
        self._watched: set[Hybrid] = set()
        self._bar: Progress | None = None  # one bar for the whole search, its total grows
        regions = {path for m in matchings.values() for r in m.regions
                   for path in (r.float_path, r.quant_path)}
        self.float_model = float_model
        self.replay = BlockReplay(float_model, regions, budget=max(
            REPLAY_MIN_BYTES, sum(p.numel() * p.element_size() for p in float_model.parameters())
            // 4))

    def close(self) -> None:
        """Finish the search's progress bar."""
        if self._bar is not None:
            self._bar.close()

    def references(self) -> list[Any]:
        """The float model's outputs, as the metric keeps them, per batch (computed once)."""
        if self._references is None:
            model = self.runner.captured("float")
            references, padded, positions = [], 0, 0
            for index, batch in enumerate(self.batches):
                output = self.runner.run(model, batch, "float")
                if index == 0:
                    part, tensors = output_part(output)
                    first = part_note(part, tensors, after_loss(output) is not output,
                                      "the end metric reads")
                real = (self.metric.real_rows(_as_output(output), batch)
                        if self.metric.fn is not None else None)
                if real is not None:
                    positions += real.numel()
                    padded += real.numel() - int(real.sum())
                references.append(self.metric.reference(output, batch))
            self._references = references
            self._read_notes = tuple(note for note in (first, _padding_note(padded, positions))
                                     if note)
            self._check_references(self._references)
            self.runner.probe(self.batches[0])  # the qparams crossing into quantized graphs
        return self._references

    @property
    def notes(self) -> tuple[str, ...]:
        """What the end metric reads of the model output, read with the references
        (:meth:`references`): one of several tensors it returns, its real tokens only; and
        which quantized layers made NaN/Inf where the float model's output is finite."""
        return self._read_notes + _nonfinite_note(self._nonfinite)

    def _watch(self, hybrid: Hybrid, index: int) -> None:
        """Find the quantized layers that make ``hybrid``'s output hold NaN/Inf on batch
        ``index`` (the float model's is finite there), once per hybrid."""
        if hybrid in self._watched:
            return
        self._watched.add(hybrid)
        number = self.batch_numbers[index]
        found = self.runner.made_nonfinite(*hybrid, self.batches[index])
        for layer in found or [""]:
            self._nonfinite.setdefault(layer, number)

    def float_value(self) -> float:
        """The metric of the float model against itself (its outputs, read as a hybrid's)."""
        run = self.metric.start()
        for reference, batch in zip(self.references(), self.batches, strict=True):
            run.add(reference, reference, batch)
        return run.value()

    def _check_references(self, references: list[Any]) -> None:
        """Refuse float outputs a built-in metric cannot be read against, before any hybrid
        runs: every hybrid would read NaN, ``inf`` or 1 against them, and the search would
        rank noise (or report a target "already reached").

        The LLM metrics are read as every hybrid reads them (:meth:`_poisoned_logits`): -inf
        logits mark a masked token, and padding positions, which they never read, may hold
        NaN. A function of the user's is warned about a collapsed output, not refused: it
        may read such outputs on purpose.
        """
        if self.metric.fn is None:
            poisoned = self._poisoned_logits(references)
            if poisoned:
                raise self._nonfinite_float_output(poisoned)
            return
        built_in = self.metric.fn in END_METRICS.values()
        if self.metric.fn is min_cosine:
            for reference in references:
                _per_sample(reference)
        nonfinite = self._nonfinite_references(references)
        if built_in and nonfinite:
            raise self._nonfinite_float_output(nonfinite)
        if not nonfinite and all(not bool(r.any()) for r in references):
            message = (f"the float model's output collapsed: it is all zeros on every batch "
                       f"(RMS 0), so {self.metric_name!r} of any model against it is "
                       "meaningless (an SQNR reads inf or -inf, a cosine 1 or 0), as compare "
                       "says of it ('meaningless: float output collapsed, RMS 0')")
            fix = ("Fix: data on which the float model's output is not all zeros, or check the "
                   "float model (a final ReLU whose input is always negative outputs only "
                   "zeros)")
            if built_in:
                raise InputError(f"{message}.\n{fix}")
            warnings.warn(f"{message}. {fix}", FxNumericWarning, stacklevel=2)

    def _poisoned_logits(self, references: list[Any]) -> list[int]:
        """The numbers (in ``data``) of the batches whose float logits make the LLM metric NaN
        by themselves: the metric of the float model against itself, read over the batch's
        real tokens as every hybrid's is (masked -inf logits and NaN at padding read 0)."""
        poisoned = []
        for number, reference, batch in zip(self.batch_numbers, references, self.batches,
                                            strict=True):
            run = self.metric.start()
            run.add(reference, reference, batch)
            if run.logits is not None and run.logits.tokens and math.isnan(run.value()):
                poisoned.append(number)
        return poisoned

    def _nonfinite_references(self, references: list[Any]) -> list[int]:
        """The numbers (in ``data``) of the batches whose float output holds NaN/Inf."""
        return [number for number, reference in zip(self.batch_numbers, references, strict=True)
                if isinstance(reference, torch.Tensor) and reference.is_floating_point()
                and not bool(torch.isfinite(reference).all())]

    def _nonfinite_float_output(self, numbers: list[int]) -> InputError:
        """The error for float outputs holding NaN/Inf on the batches ``numbers``: the inputs
        are finite (:func:`~fxnumeric.run.numbered_batches` left out the others), so the
        float model makes them itself."""
        shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
        one = len(numbers) == 1
        corrupt = [name for name, p in self.float_model.named_parameters()
                   if p.is_floating_point() and not bool(torch.isfinite(p).all())]
        if corrupt:  # not an overflow: the float model's own parameters hold them
            listed = ", ".join(corrupt[:5]) + (" ..." if len(corrupt) > 5 else "")
            return InputError(
                f"the float model's output holds NaN/Inf on batch{'' if one else 'es'} {shown} "
                f"of data, from finite input: {self.metric_name!r} of every model against it "
                f"is NaN, so nothing can be ranked or reached. The float model's own "
                f"parameter{'s' if len(corrupt) > 1 else ''} {listed} "
                f"{'hold' if len(corrupt) > 1 else 'holds'} NaN/Inf.\nFix: check the float "
                "model's weights (a corrupt checkpoint, a diverged training step); the "
                "quantized model was made from other values")
        return InputError(
            f"the float model's output holds NaN/Inf on batch{'' if one else 'es'} {shown} "
            f"of data, from finite input: {self.metric_name!r} of every model "
            "against it is NaN, so nothing can be ranked or reached. The float model "
            "makes them itself, typically overflowing float32 on inputs larger than it is "
            "meant for; fxnumeric.compare names the layer where NaN/Inf first appears.\n"
            f"Fix: leave {'that batch' if one else 'those batches'} out of data, or rescale "
            f"{'it' if one else 'them'} to the range the model is meant for")

    def evaluate(self, hybrids: Sequence[Hybrid], label: str) -> list[float]:
        """End metric of each ``(base, swaps)`` hybrid over all batches.

        Each hybrid model is assembled once and run on every batch; the float model's outputs
        are computed once per call of :func:`sensitivity` or :func:`advise`.
        """
        references = self.references()
        runner = self.runner
        models = [runner.model(base, swaps) for base, swaps in hybrids]
        runs = [self.metric.start() for _ in hybrids]
        if self._bar is None:
            self._bar = Progress(0, label, self.progress, unit="hybrid run")
        self._bar.extend(len(hybrids) * len(self.batches), label)
        where = [[(s, self.replay.block(s.base_graph.float_path)) for s in swaps]
                 for _, swaps in hybrids]
        failed: set[int] = set()
        nonfinite: dict[int, int] = {}  # {hybrid: first batch its output held NaN/Inf on}
        for i, (batch, reference) in enumerate(zip(self.batches, references, strict=True)):
            for k, (model, run, (base, swaps), placed) in enumerate(
                    zip(models, runs, hybrids, where, strict=True)):
                self._bar.update()
                if k in failed:
                    continue
                try:
                    output = self.replay.run(model, i, base, placed,
                                             lambda m, b=batch: runner.run(m, b))
                except HybridFailure as failure:
                    self._failed(base, swaps, self.batch_numbers[i], failure)
                    failed.add(k)
                    continue
                read = run.add(reference, output, batch)
                if k not in nonfinite and _made_nonfinite(reference, read):
                    nonfinite[k] = i
        self.evaluations += len(hybrids)
        for k, i in nonfinite.items():  # the error path: which quantized layers made them
            self._watch(hybrids[k], i)
        values = [math.nan if k in failed else run.value() for k, run in enumerate(runs)]
        everything = all(math.isnan(v) for v in values)
        for (base, swaps), value in zip(hybrids, values, strict=True):
            # a hybrid may compute NaN (it then ranks last), and so may the quantized model
            # (a layer whose weight dequantizes to NaN: keeping it float is the answer); the
            # float model may not, nor every hybrid with it
            if not swaps and math.isnan(value) and (base == "float" or everything):
                nonfinite = self._nonfinite_references(references)
                # a user's metric (the built-in ones refused such outputs before any hybrid
                # ran; logits may hold -inf on purpose, see _check_references)
                if nonfinite and self.metric.fn is not None:
                    raise self._nonfinite_float_output(nonfinite)
                side = "float" if base == "float" else "quantized"
                raise InputError(
                    f"metric {self.metric_name!r} is NaN on the {side} model itself, with no "
                    "layer swapped (and with any one layer swapped): nothing can be ranked or "
                    "reached against it. The metric "
                    "returned NaN, or the model's outputs hold NaN/Inf (fxnumeric.compare "
                    "says where they first appear).\nFix: a metric that returns a number "
                    "for these outputs, or data the model computes finite outputs on"
                )
        return values

    def _failed(self, base: str, swaps: tuple[Swap, ...], number: int,
                failure: HybridFailure) -> None:
        """Note that hybrid ``(base, swaps)`` failed in an op on batch ``number`` of data:
        its metric reads NaN, so it ranks last and a search does not take that step, as a
        hybrid computing NaN would. The quantized model itself failing is no hybrid's doing:
        an input error, as when it fails on the first batch (:meth:`HybridRunner.probe`)."""
        if not swaps:
            raise InputError(
                f"the {'float' if base == 'float' else 'quantized'} model failed on batch "
                f"{number} of data in {failure.op}: {failure.error}\nCheck that the model "
                "runs on this batch outside fxnumeric (its weights, its input shape and "
                "dtype): no layer was swapped." + (f" {failure.hint}" if failure.hint else "")
            ) from failure
        paths = list(dict.fromkeys(module_path(self.matching, s.name) for s in swaps))
        shown_paths = ", ".join(f"`{p}`" for p in paths)
        hybrid = (f"the float model with {shown_paths} quantized" if base == "float"
                  else f"the quantized model with {shown_paths} float")
        reason = (f"failed in {failure.op} on batch {number} of data: {failure.error}; "
                  f"{failure.why}")
        if hybrid not in self.failed:
            self.failed[hybrid] = reason
            warnings.warn(FxNumericWarning(
                f"{hybrid} {reason}.\nIts {self.metric_name!r} reads NaN: it ranks last (a "
                "search does not keep it)"), stacklevel=4)

    def layers(self, wanted: Iterable[str] | None, bases: tuple[str, ...]
               ) -> tuple[list[str], tuple[tuple[str, str], ...]]:
        """The layers to search (``wanted`` or all) that can be swapped, and why others cannot."""
        whole = whole_of(self.matching)
        if "" in whole:  # the model is one op: keeping it float is the float model
            why, fix = whole[""]
            raise InputError(
                f"the whole model is called as one op, because {why}: there is no layer to "
                "keep float or quantize alone, only the whole model (its hybrids are the float "
                "and the quantized model). fxnumeric.compare and diagnose compare it as one "
                f"op.\nFix: {fix}; then its layers are traced one by one")
        names = self.runner.layers if wanted is None else list(dict.fromkeys(wanted))
        unknown = [n for n in names if n not in self.runner.swappable]
        if unknown:
            raise InputError(f"no quantized layer is named {unknown[:5]}; layers are: "
                             f"{', '.join(self.runner.layers[:20])}")
        usable: list[str] = []
        skipped: list[tuple[str, str]] = []
        for name in names:
            try:
                for base in bases:
                    self.runner.swaps(name, base)
            except InstrumentationError as exc:
                _log.warning("layer %s is left out: %s", name, exc)
                skipped.append((name, str(exc)))
            else:
                usable.append(name)
        if not usable:
            if not skipped and not self.runner.layers:
                raise InputError(
                    "no quantized layer to swap: the quantized model computes nothing in "
                    "quantized form. Is it the model convert / convert_fx / quantize_dynamic / "
                    "quantize_ returned? A QAT model before convert (eager prepare_qat, "
                    "prepare_qat_fx: fake-quants, no quantized op) has none: pass what convert "
                    "/ convert_fx makes of it. fxnumeric.match(float_model, quant_model).table() "
                    "lists what each side holds"
                )
            raise InputError(
                "no quantized layer to swap: the matching paired no op that computes in "
                "quantized form" + (f" ({len(skipped)} could not be swapped)" if skipped else "")
                + "; see fxnumeric.match(float_model, quant_model).table()"
            )
        return usable, tuple(skipped)

    def swaps(self, names: Iterable[str], base: str) -> tuple[Swap, ...]:
        return tuple(s for n in names for s in self.runner.swaps(n, base))


def _names(layers: Iterable[str] | str) -> list[str]:
    """``layers=`` as a list of names: one name given as a string is that name (not its
    characters)."""
    if isinstance(layers, str):
        return [layers]
    try:
        names = list(layers)
    except TypeError:
        names = [layers]  # type: ignore[list-item]
    odd = [n for n in names if not isinstance(n, str)]
    if odd:
        raise InputError(f"layers= takes layer (pair) names, got {odd[:3]!r}. Fix: "
                         "layers=['lm_head', ...] (Sensitivity.layers[i].name gives them)")
    if not names:
        raise InputError("layers= selects no layer (an empty list): there is nothing to "
                         "measure. Fix: leave layers= out to take every quantized layer, or name "
                         "some: layers=['lm_head', ...] (Sensitivity.layers[i].name gives them)")
    return names


@dataclass(frozen=True)
class LayerSensitivity:
    """End metric of the two hybrids of one layer.

    Attributes:
        name: the layer (pair) name.
        module: the float model's module path of it.
        kind: op kinds, e.g. ``linear`` or ``conv2d-relu``.
        only: the float model with only this layer quantized.
        all_but: the quantized model with only this layer float.
    """

    name: str
    module: str
    kind: str
    only: float
    all_but: float


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivity: :func:`sensitivity`'s result.

    Attributes:
        metric: the end metric's name.
        quantized: the metric of the quantized model itself (float model's output as reference).
        layers: one entry per layer, in graph order.
        batches: how many batches were run.
    """

    metric: str
    quantized: float
    layers: tuple[LayerSensitivity, ...] = field(repr=False)
    batches: int = 0
    skipped: tuple[tuple[str, str], ...] = ()
    """``(layer, reason)`` for layers left out because they could not be swapped."""
    higher_is_better: bool = True
    """The metric's direction (``False`` for ``kl``)."""
    failed: tuple[tuple[str, str], ...] = ()
    """``(hybrid, reason)`` for hybrids an op failed in (NaN reaching a dynamic quantized
    Linear, which cannot quantize it): their metric reads NaN, so they rank last."""
    float_value: float = math.nan
    """The metric of the float model against itself (``inf`` for ``sqnr``, 1 for ``cosine``,
    0 for ``kl``): what ``only`` reads for a layer whose quantization changes nothing. NaN:
    not measured (:func:`advise` measures ``all_but`` alone)."""
    whole: tuple[tuple[str, str], ...] = ()
    """``(layer, why)`` for layers that are a module called whole although it holds quantized
    layers (a decoder layer dispatched by accelerate with ``preload_module_classes``): its
    quantized layers are one entry of :attr:`layers`, swapped together
    (:func:`fxnumeric.advice.hybrid.called_whole`)."""
    notes: tuple[str, ...] = ()
    """What the end metric reads of the model output, where that is not all of it: one of
    several tensors the model returns (a ``BertModel``'s ``last_hidden_state``, not its
    ``pooler_output``), its real tokens only (padding left out); and the quantized layers
    whose output held NaN/Inf from finite input where the float model's output is finite
    (a float16 kernel's overflow), in :func:`fxnumeric.diagnose`'s words, with the batch;
    :meth:`table` shows them."""

    def __repr__(self) -> str:
        named, why = self._most_sensitive()
        return (f"Sensitivity(metric={self.metric!r}, quantized={shown(self.quantized)}, "
                f"layers={len(self.layers)}, most sensitive={named}"
                + (f" ({why})" if why else "") + ")")

    def most_sensitive(self, k: int = 3) -> list[str]:
        """Up to ``k`` layers that matter most, in :meth:`ranking` order; fewer, or none,
        when fewer layers have an effect or the next ones tie.

        A layer has an effect when keeping it float makes the metric better than the
        quantized model's (``all_but`` against :attr:`quantized`) or quantizing it alone
        makes it worse than the float model's (``only`` against :attr:`float_value`). Values
        at float32's rounding count as no change: an SQNR of
        :data:`~fxnumeric.metrics.ROUNDING_SQNR_DB` or more reads as ``inf``, a cosine
        within the same error of 1 as 1 (other metrics are compared exactly). Layers whose
        values tie are not told apart by their order in the graph: a tie that the ``k``-th
        place would cut is left out whole (the repr says how many tie).
        """
        return self._most_sensitive(k)[0]

    def fewer_named(self, k: int = 3) -> str:
        """Why :meth:`most_sensitive` names fewer than ``k`` layers (``""``: it does not, or
        fewer layers have an effect and none ties)."""
        return self._most_sensitive(k)[1]

    def _most_sensitive(self, k: int = 3) -> tuple[list[str], str]:
        """:meth:`most_sensitive`, and :meth:`fewer_named`."""
        level = functools.partial(_rounded, self.metric)
        sign = 1.0 if self.higher_is_better else -1.0
        quantized, perfect = level(self.quantized), level(self.float_value)

        def better(a: float, b: float) -> bool:  # NaN (a failed hybrid) is better than nothing
            return not math.isnan(a) and (math.isnan(b) or sign * a > sign * b)

        def key(s: LayerSensitivity) -> tuple[float, float]:
            return (-_finite(sign * level(s.all_but)), _finite(sign * level(s.only)))

        effect = [s for s in self.layers
                  if better(level(s.all_but), quantized) or better(perfect, level(s.only))]
        effect.sort(key=key)
        named = effect[:k]
        if len(effect) > k and key(effect[k]) == key(named[-1]):
            tied = [s for s in effect if key(s) == key(named[-1])]
            named = [s for s in named if key(s) != key(named[-1])]
            return [s.name for s in named], (f"{len(tied)} more tie after them" if named
                                             else f"{len(tied)} layers tie")
        if not effect:
            rounding = ("; differences at float32 rounding read as none"
                        if self.metric in _ROUNDED else "")
            return [], (f"no layer's float version makes {self.metric!r} better, nor does "
                        f"quantizing one alone make it worse{rounding}")
        return [s.name for s in named], ""

    def ranking(self) -> list[str]:
        """Layer names, the one whose float version helps most first.

        Sorted by ``all_but`` (better first), ties broken by ``only`` (worse first); layers
        whose values are equal keep graph order, which ranks nothing (:meth:`most_sensitive`
        names only the layers that have an effect and do not tie).
        """
        sign = 1.0 if self.higher_is_better else -1.0
        order = sorted(self.layers,
                       key=lambda s: (-_finite(sign * s.all_but), _finite(sign * s.only)))
        return [s.name for s in order]

    def layer(self, name: str) -> LayerSensitivity:
        """The entry for layer ``name`` (pair name or module path)."""
        for s in self.layers:
            if name in (s.name, s.module):
                return s
        raise InputError(f"no layer {name!r} in this sensitivity result")

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page: the chart of both hybrids per layer and the table.

        ``Report.to_html(path, sensitivity=...)`` puts the same section in a report's page.
        """
        from ..report.render import sensitivity_page

        path = Path(path)
        path.write_text(sensitivity_page(self))
        return path

    def table(self, tablefmt: str = "simple", *, sort: bool = True,
              top_k: int | None = None) -> str:
        """The layers as a table, most sensitive first (``sort=False``: graph order)."""
        rows = [self.layer(n) for n in self.ranking()] if sort else list(self.layers)
        if top_k is not None:  # -1 dropped the last layer, 0 showed them all
            a_count(top_k, "top_k", 1)
        rows = rows[:top_k] if top_k else rows
        headers = ["layer", "kind", f"only this quantized ({self.metric})",
                   f"all but this quantized ({self.metric})"]
        table = [[s.module, s.kind, s.only, s.all_but] for s in rows]
        if self.layers and all(math.isnan(s.only) for s in self.layers):  # advise: all_but only
            del headers[2]
            table = [r[:2] + r[3:] for r in table]
        failed = "".join(f"\nnan: {hybrid} " + ("not measured" if why.startswith("not measured")
                                                   else "failed in an op") + " (see .failed)"
                         for hybrid, why in self.failed)
        return text_table(table, headers, tablefmt, apart=True, floatfmt=".4g") + (
            f"\nquantized model: {self.metric} {shown(self.quantized)}") + failed + "".join(
            f"\nnote: {note}" for note in self.notes)


def _finite(x: float) -> float:
    return -math.inf if math.isnan(x) else x


_ROUNDED = {"sqnr": ROUNDING_SQNR_DB,
            "cosine": 0.5 * 10 ** (-ROUNDING_SQNR_DB / 10),
            "min_cosine": 0.5 * 10 ** (-ROUNDING_SQNR_DB / 10)}
"""Per built-in metric, where float32's rounding lies: an SQNR at or above
:data:`~fxnumeric.metrics.ROUNDING_SQNR_DB`; a cosine within ``1 / (2 snr)`` of 1, what an
error orthogonal to the signal at that SQNR costs (``cos = 1 - |e|^2 / (2 |r|^2)``)."""


def _rounded(metric: str, value: float) -> float:
    """``value`` of ``metric`` with differences at float32's rounding read as none."""
    if metric == "sqnr" and value >= _ROUNDED["sqnr"]:
        return math.inf
    if metric in ("cosine", "min_cosine") and 0 <= 1 - value <= _ROUNDED[metric]:
        return 1.0
    return value


@keeps_buffers
def sensitivity(
    float_model: nn.Module,
    quant_model: nn.Module,
    data: Iterable[Any],
    metric: str | EndMetric = "sqnr",
    *,
    layers: Iterable[str] | str | None = None,
    matching: Matching | None = None,
    progress: bool | None = None,
    inputs: int | Callable[[Any], Any] | None = None,
    capture: str = "auto",
) -> Sensitivity:
    """Measure each layer's effect on the end metric, with two hybrid models per layer.

    For each paired quantized layer: *only this layer quantized* (the float graph with the
    layer's float subgraph replaced by its quantized subgraph, inputs quantized with the qparams
    the quantized model uses there) and *all but this layer quantized* (the quantized graph with
    the layer replaced by its float subgraph, dequantized before and quantized after with the
    qparams the quantized model already uses). Nothing is re-quantized.

    Args:
        float_model: the float model (not modified).
        quant_model: the quantized model made from it (eager, FX or dynamic; not modified).
        data: batches, as :func:`fxnumeric.compare` takes them (a tensor, a tuple of
            positional inputs or a dict of keyword inputs each); all are run for every hybrid.
        metric: ``"sqnr"``, ``"cosine"``, ``"min_cosine"`` or a function
            ``(float_output, candidate_output) -> float`` (higher is better), called once on
            the outputs of all batches concatenated along dim 0.
        layers: restrict to these layer (pair) names (one name: a string).
        matching: a :func:`fxnumeric.match` result to reuse.
        progress: show progress on stderr (default: when stderr is a terminal).
        inputs: what of each batch the models take, as in :func:`fxnumeric.compare`.
        capture: ``"fx"``, ``"export"`` or ``"auto"``, as in :func:`fxnumeric.compare`: the
            first batch is the example input of the capture (an exported graph is specialised
            to its shapes, so every batch must have them). Ignored when ``matching`` is given.

    Returns:
        A :class:`Sensitivity`.

    Example:
        >>> import copy, torch
        >>> from torch.ao.quantization import quantize_dynamic
        >>> torch.manual_seed(0) and None
        >>> f = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> q = quantize_dynamic(copy.deepcopy(f.eval()), {torch.nn.Linear})
        >>> s = sensitivity(f, q, [torch.randn(16, 8)], metric="cosine")
        >>> [layer.module for layer in s.layers]
        ['0', '2']
    """
    layers = None if layers is None else _names(layers)
    search = _Search(float_model, quant_model, data, metric, matching, progress, inputs,
                     capture)
    names, skipped = search.layers(layers, ("float", "quant"))
    hybrids: list[Hybrid] = [("quant", ())]
    for name in names:
        hybrids.append(("float", search.swaps([name], "float")))
        hybrids.append(("quant", search.swaps([name], "quant")))
    try:
        values = search.evaluate(hybrids, "sensitivity")
    finally:
        search.close()
    kinds = {p.name: p.kind for p in search.matching.pairs}
    unmeasured = set()
    for name in names:  # quantized alone, its input lands on a grid made for other values
        if op_name(name) in search.runner.stray_grids:
            unmeasured.add(name)
            ops = ", ".join(f"`{op}`" for op in search.runner.strays[op_name(name)])
            search.failed.setdefault(
                f"the float model with `{module_path(search.matching, name)}` quantized",
                f"not measured: the quantized layer reads the output of {ops}, which the "
                "float model does not compute, on that op's grid; fed the float input on that "
                "grid it would read the mismatch of the grids, not its own error")
    entries = tuple(
        LayerSensitivity(name, module_path(search.matching, name), kinds[name],
                         math.nan if name in unmeasured else values[1 + 2 * i],
                         values[2 + 2 * i])
        for i, name in enumerate(names)
    )
    return Sensitivity(search.metric_name, values[0], entries, len(search.batches), skipped,
                       search.metric.higher_is_better, tuple(search.failed.items()),
                       search.float_value(), called_whole(search.matching, names),
                       search.notes)


@dataclass(frozen=True)
class Advice:
    """Which layers to keep in float (with several variants, which variant or float each
    layer takes): :func:`advise`'s result.

    Attributes:
        keep_float: float-model module paths of the layers to keep float, in the order chosen
            (with several variants, those assigned ``"float"``).
        curve: the metric of the quantized model (``curve[0]``), then after keeping each of
            ``keep_float`` float in turn (``curve[i]``: the first ``i`` layers float). With
            several variants, the metric of each point of :attr:`front`, fewest bits first:
            its last is the best plan verified, not necessarily the one chosen.
        value: the metric of the advised plan (with one quantized model ``curve[-1]``).
        target: the target asked for.
        reached: whether ``value`` meets ``target``: ``value >= target``, or ``value <=
            target`` for a metric where lower is better (``"kl"``).
        metric: the end metric's name.
        message: one line saying what was found (and, if the target was missed, why).
        evaluations: how many hybrid models were run.
        seconds: how long the search took.
        functions: for each of ``keep_float`` that is a function op rather than a module
            (a residual ``add``), ``(module path, function, index)`` as FX's
            ``set_module_name_object_type_order`` names it; ``None`` for modules.
    """

    keep_float: tuple[str, ...]
    curve: tuple[float, ...]
    value: float
    target: float
    reached: bool
    metric: str
    message: str
    evaluations: int = 0
    seconds: float = 0.0
    sensitivity: Sensitivity | None = field(default=None, repr=False, compare=False)
    functions: tuple[tuple[str, Any, int] | None, ...] = field(default=(), repr=False)
    module_calls: tuple[tuple[tuple[str, type, int], ...], ...] = field(default=(), repr=False)
    """For each of ``keep_float``, the module calls FX fused into that function op (the
    ``relu`` module of an ``add_relu``) as ``(parent path, module type, index)``
    (:func:`fxnumeric.advice.hybrid.module_calls`): :meth:`qconfig_mapping` leaves them float
    too, or FX would quantize the fused op's output through them."""
    assignment: dict[str, str] = field(default_factory=dict, repr=False)
    """``{float module path: choice}`` of every layer searched: a variant's name, or
    ``"float"`` (with one quantized model its choices are ``"quantized"`` and ``"float"``)."""
    bits: float | None = None
    """Average weight bits of the assignment over the layers searched, weighted by size
    (nominal widths; see :mod:`fxnumeric.advice.mixed`), when every layer has a weight."""
    front: tuple[tuple[float, float], ...] = ()
    """``(bits, metric)`` of the verified assignments on the Pareto front, fewest bits first
    (several variants only)."""
    variants: tuple[str, ...] = ()
    """The variants' names, when advising among several."""
    unsearched: tuple[tuple[str, str], ...] = ()
    """``(op, reason)`` of the quantized ops the search over several variants does not choose
    a precision for, each with what it is in the plans it verified: as the variant it follows
    runs it (the variant of the layer it reads; an FX-quantized ``add`` or average pool, a
    layer left out by ``layers``), quantized, or float where that variant runs it float (see
    :func:`fxnumeric.advice.mixed._kept_quantized`); or float in every plan, as
    :meth:`to_torchao`'s ``FqnToConfig`` leaves it (a function reading several modules'
    weights)."""
    flow: str = ""
    """The quantization flow the quantized model came from (``"fx"``, ``"eager"``,
    ``"dynamic"``, ``"pt2e"``, ``"torchao"``; with several variants, their flows joined by
    ``+``, ``"dynamic+fx"``): :meth:`summary` shows that flow's lines."""
    dynamic: tuple[tuple[str, str], ...] = ()
    """``(module path, qconfig name)`` of every module ``quantize_dynamic`` quantized in the
    quantized model (``("lstm", "float16_dynamic_qconfig")``): what :meth:`dynamic_lines`
    quantizes again, less the layers kept float."""
    torchao_modules: tuple[str, ...] = ()
    """Module paths of every module ``quantize_`` quantized in the quantized model (a torchao
    model): what :meth:`torchao_keep_lines` quantizes again, less the layers kept float."""
    torchao_weights: tuple[tuple[str, str], ...] = ()
    """``(parameter path, kind)`` of every weight ``quantize_`` quantized in the quantized model
    (a torchao model), ``kind`` how it was quantized, as read from the weight
    (:func:`fxnumeric.flows.torchao.quantized_weights`): weights of several kinds came from
    several configs, and :meth:`torchao_keep_lines` names one config per kind."""
    failed: tuple[tuple[str, str], ...] = ()
    """``(hybrid, reason)`` for the hybrids of the search an op failed in (see
    :attr:`Sensitivity.failed`): their metric read NaN, so the search did not keep them."""
    notes: tuple[str, ...] = ()
    """What the end metric reads of the model output, where that is not all of it, and the
    quantized layers that made NaN/Inf (:attr:`Sensitivity.notes`); :meth:`summary` shows
    them."""
    converted: tuple[str, ...] = ()
    """Module paths of the layers the float model holds as transformers ``Conv1D`` (GPT-2)
    and the quantized model as ``nn.Linear``, converted to be quantized: the lines name them,
    and torchao and ``quantize_dynamic`` quantize them only once so converted (on the float
    model itself torchao's kernels fail on them and ``quantize_dynamic`` leaves them float).
    :meth:`to_torchao` and the lines warn; :meth:`summary` says so."""

    def to_torchao(self, configs: Mapping[str, Any]) -> Any:
        """A torchao ``FqnToConfig`` that applies the assignment with ``quantize_``.

        Args:
            configs: ``{variant name: torchao config}``, e.g. ``{"int4":
                IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
                "int8": Int8WeightOnlyConfig()}``. Layers assigned ``"float"`` are left out,
                so ``quantize_`` leaves them float.

        Returns:
            ``FqnToConfig({module path: config})``; apply it to a copy of the float model
            with ``quantize_(model, fqn_config, filter_fn=None)``.
        """
        try:
            from torchao.core.config import AOBaseConfig
            from torchao.quantization import FqnToConfig
        except ImportError as exc:
            raise InputError(f"to_torchao needs torchao ({exc}); pip install 'fxnumeric[torchao]'"
                             ) from exc
        missing = sorted({c for c in self.assignment.values() if c != "float"} - set(configs))
        if missing:
            raise InputError(f"no config for {missing}: pass one per variant the assignment "
                             f"uses ({', '.join(sorted(set(self.assignment.values())))})")
        used = {c for c in self.assignment.values() if c != "float"}
        wrong = {name: type(configs[name]).__name__ for name in sorted(used)
                 if not isinstance(configs[name], AOBaseConfig)}
        if wrong:  # quantize_ would fail on it later, far from here
            raise InputError(
                f"configs {wrong} are not torchao configs: pass one per variant, such as "
                "Int8WeightOnlyConfig() or IntxWeightOnlyConfig(weight_dtype=torch.int4, "
                "granularity=PerGroup(32)) (torchao.quantization)")
        self._warn_other_flow("this FqnToConfig", "torchao")
        self._warn_converted("this FqnToConfig")
        return FqnToConfig({path: configs[choice] for path, choice in self.assignment.items()
                            if choice != "float"})

    def _one_variant(self, what: str) -> None:
        """Refuse the float-fallback lines for an advice that assigns several variants."""
        if len(self.variants) > 1:
            raise InputError(
                f"{what} keeps layers float in one quantized model's flow; this advice assigns "
                f"one of {len(self.variants)} variants ({', '.join(self.variants)}) or float to "
                "each layer: apply it with advice.to_torchao(configs), or read "
                "advice.assignment")

    def _warn_other_flow(self, what: str, flow: str) -> None:
        """Warn when ``what`` applies the advice in ``flow`` and the quantized model came from
        another flow (when known): that flow quantizes differently (torchao's configs against
        torch's observers, dynamic against static), so the model it makes is not the one
        measured and may miss the target."""
        if self.flow in (flow, ""):
            return
        measured = "variants" if self.variants else "a quantized model"
        own = (None if len(self.variants) > 1
               else "advice.to_torchao(configs)" if self.variants and self.flow == "torchao"
               else _OWN_LINES.get(self.flow))
        fix = (f"use {own}, made for {self.flow}" if own
               else f"advise on {flow} {'variants' if self.variants else 'models'}")
        warnings.warn(FxNumericWarning(
            f"this assignment was verified on {measured} from {self.flow}, not {flow}: "
            f"{flow} quantizes differently, so the model made with {what} does not have the "
            f"{self.metric} found here ({shown(self.value, self.target)}).\nFix: {fix}, or "
            f"compare that model (fxnumeric.compare) before relying on it"),
            stacklevel=3)

    def _converted_text(self) -> str:
        """What :attr:`converted` means for the lines, in one sentence (``""``: nothing)."""
        if not self.converted:
            return ""
        some = ", ".join(self.converted[:3]) + (", ..." if len(self.converted) > 3 else "")
        return (f"{len(self.converted)} layers ({some}) are transformers Conv1D in the float "
                "model and nn.Linear in the quantized one: apply these lines to a copy of the "
                "float model with those layers converted to nn.Linear, as the quantized model "
                "was made (on the float model itself torchao fails on them and quantize_dynamic "
                "leaves them float)")

    def _warn_converted(self, what: str) -> None:
        """Warn that ``what`` applies to the float model only once its Conv1D layers are
        converted (:attr:`converted`)."""
        if self.converted:
            warnings.warn(FxNumericWarning(f"{what}: {self._converted_text()}"), stacklevel=3)

    def _targets(self) -> list[tuple[str, tuple[str, Any, int] | None]]:
        functions = self.functions or (None,) * len(self.keep_float)
        return list(zip(self.keep_float, functions, strict=True))

    def _kept(self, path: str) -> bool:
        """Whether module ``path`` stays float in the advised model: it or a module holding it
        is kept. A module torch.fx cannot trace is one layer (``enc``), and the hybrid that
        kept it float ran every module inside it (``enc.lstm``) float too. A function op kept
        float is named after the module whose weight it reads (torchao's ``F.linear(x,
        self.qkv.weight)`` is ``attn.qkv``): that module's weight is float, not the modules
        inside it."""
        return any(path == name or (function is None and path.startswith(f"{name}."))
                   for name, function in self._targets())

    def __repr__(self) -> str:
        value, target = shown(self.value, self.target), shown(self.target, self.value)
        if self.variants:
            counts: dict[str, int] = {}
            for choice in self.assignment.values():
                counts[choice] = counts.get(choice, 0) + 1
            return (f"Advice({counts}, bits={self.bits:.2f}, {self.metric}={value}, "
                    f"target={target}, reached={self.reached})")
        return (f"Advice(keep_float={list(self.keep_float)}, {self.metric}={value}, "
                f"target={target}, reached={self.reached})")

    def qconfig_mapping(self, base: Any = None) -> Any:
        """A ``QConfigMapping`` for ``prepare_fx`` with ``None`` for every layer to keep float.

        Args:
            base: the mapping the model was quantized with (copied, not modified); default
                ``get_default_qconfig_mapping()``.
        """
        self._one_variant("qconfig_mapping")
        self._warn_other_flow("this QConfigMapping", "fx")
        import copy

        from torch.ao.quantization import get_default_qconfig_mapping

        mapping = get_default_qconfig_mapping() if base is None else copy.deepcopy(base)
        for name, function in self._targets():
            if function is None:
                mapping.set_module_name(name, None)
            elif isinstance(function[1], str):  # a method: FX configures it by name only
                mapping.set_object_type(function[1], None)
            else:
                mapping.set_module_name_object_type_order(*function, None)
        for call in self._module_calls():
            mapping.set_module_name_object_type_order(*call, None)
        return mapping

    def _module_calls(self) -> list[tuple[str, type, int]]:
        return [call for calls in self.module_calls for call in calls]

    def fx_lines(self, mapping: str = "qconfig_mapping") -> str:
        """The ``QConfigMapping`` calls that :meth:`qconfig_mapping` makes, as source lines."""
        self._one_variant("fx_lines")
        self._warn_other_flow("these lines", "fx")
        lines = []
        for name, function in self._targets():
            if function is None:
                lines.append(f"{mapping}.set_module_name({name!r}, None)")
            elif isinstance(function[1], str):
                lines.append(f"{mapping}.set_object_type({function[1]!r}, None)  # {name}: FX "
                             f"names a method for every call, so every .{function[1]}() stays "
                             "float")
            else:
                scope, target, index = function
                lines.append(f"{mapping}.set_module_name_object_type_order({scope!r}, "
                             f"{_qualified(target)}, {index}, None)  # {name}")
        for (name, _), calls in zip(self._targets(), self.module_calls, strict=False):
            lines += [f"{mapping}.set_module_name_object_type_order({scope!r}, "
                      f"{_qualified(kind)}, {index}, None)  # {name}: its fused "
                      f"{kind.__name__} call" for scope, kind, index in calls]
        return "\n".join(lines)

    def eager_lines(self, model: str = "model") -> str:
        """The eager-mode assignments (before ``prepare``) that keep the layers float.

        In eager mode a float module between quantized ones also needs a ``DeQuantStub``
        before it and a ``QuantStub`` after it in the model's ``forward``.
        """
        self._one_variant("eager_lines")
        self._warn_other_flow("these lines", "eager")
        return "\n".join(
            f"{model}.get_submodule({name!r}).qconfig = None" if function is None
            else f"# {name}: a function op; in eager mode make it a FloatFunctional to configure it"
            for name, function in self._targets()
        )

    def pt2e_lines(self, quantizer: str = "quantizer",
                   method: str = "set_module_name_qconfig") -> str:
        """The pt2e quantizer calls (before ``prepare_pt2e``) that keep the layers float.

        A layer named after the module it runs in (an exported ``Conv2d``'s ``conv2d``) is
        named by that module, whose ops the quantizer then leaves float; an op inside a larger
        module (a residual ``add``) cannot be named alone and gets a comment.

        Args:
            quantizer: the quantizer's variable name.
            method: the quantizer's method that sets a module's config:
                ``X86InductorQuantizer.set_module_name_qconfig`` takes ``None`` (leave float).
                torchao's ``XNNPACKQuantizer.set_module_name`` refuses ``None`` ("not
                supported yet"): with it a module cannot be left float by name.
        """
        self._one_variant("pt2e_lines")
        self._warn_other_flow("these lines", "pt2e")
        return "\n".join(
            f"{quantizer}.{method}({name!r}, None)" if function is None or function[0] == name
            else f"# {name}: {_qualified(function[1])} inside "
                 f"{repr(function[0]) if function[0] else 'the model itself'} has no "
                 "module of its own to name"
            for name, function in self._targets()
        )

    def table(self, tablefmt: str = "simple") -> str:
        """The curve: the metric after each layer is kept float; with several variants, the
        Pareto front of the verified assignments (average weight bits against the metric)."""
        # the values as text, with the digits that tell them apart (tabulate would round
        # them all to its one floatfmt: cosines 0.99995 and 0.99998 both read "1")
        if self.variants:
            values = shown_apart([v for _, v in self.front], self.target)
            rows = [(f"{b:.4g}", v) for (b, _), v in zip(self.front, values, strict=True)]
            return tabulate(rows, headers=("average weight bits", self.metric),
                            tablefmt=tabulate_format(tablefmt), disable_numparse=True,
                            colalign=("decimal", "decimal"))
        values = shown_apart(self.curve, self.target)
        rows = [(step, name, value) for step, (name, value) in enumerate(
            zip(("(quantized model)", *self.keep_float), values, strict=True))]
        return tabulate(rows, headers=("step", "keep float", self.metric),
                        tablefmt=tabulate_format(tablefmt), disable_numparse=True,
                        colalign=("decimal", "left", "decimal"))

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page: what was found, the curve (with several
        variants, the Pareto front of average weight bits against the metric), the steps or
        the assignment, and what to feed back to the quantization flow."""
        from ..report.render import advice_page

        path = Path(path)
        path.write_text(advice_page(self))
        return path

    def torchao_lines(self, configs: str = "configs") -> str:
        """The assignment as the ``FqnToConfig`` that :meth:`to_torchao` builds, as source."""
        lines = ["FqnToConfig({"]
        lines += [f"    {path!r}: {configs}[{choice!r}]," for path, choice in
                  self.assignment.items() if choice != FLOAT]
        return "\n".join([*lines, "})"])

    def dynamic_lines(self, model: str = "model") -> str:
        """``quantize_dynamic`` keeping the layers float: the modules the quantized model has
        quantized, each with the qconfig of its dtype (int8, per channel, float16; an
        Embedding's weight-only one), less those kept and the modules inside them (a spec of
        module names rebuilds the advised model, whatever spec made the quantized one); with
        no module known, ``nn.Linear`` with the kept names mapped to ``None``.

        ``quantize_dynamic`` returns a quantized copy: the line assigns it to ``model`` when
        that is a name (``model = quantize_dynamic(model, {...})``; pasted bare, the call left
        the model float), else it is the call alone, an expression (``"copy.deepcopy(f)"``)."""
        self._one_variant("dynamic_lines")
        self._warn_other_flow("this line", "dynamic")
        self._warn_converted("this line")
        if self.dynamic:
            spec = ", ".join(f"{path!r}: {qconfig}" for path, qconfig in self.dynamic
                             if not self._kept(path))
            call = f"quantize_dynamic({model}, {{{spec}}})"
        else:
            names = ", ".join(f"{name!r}: None" for name, _ in self._targets())
            call = (f"quantize_dynamic({model}, {{torch.nn.Linear: default_dynamic_qconfig, "
                    f"{names}}})")
        return f"{model} = {call}" if model.isidentifier() else call

    def torchao_keep_lines(self, model: str = "model", config: str = "config") -> str:
        """torchao's ``quantize_`` leaving the layers float: it names the weights the quantized
        model has quantized (:attr:`torchao_weights`), less those of the layers kept (a
        function op's included: ``F.linear(x, self.qkv.weight)`` kept float is ``attn.qkv``)
        and of the modules inside them, so it rebuilds the advised model whatever
        ``filter_fn`` made the quantized one (a Linear it left float, as a tied ``lm_head``,
        stays float).

        With every weight of one kind and each a module's ``weight``, one ``quantize_(model,
        config, filter_fn=...)``. Otherwise an ``FqnToConfig`` keyed by path, with ``filter_fn=
        None``: weights of several kinds (a model made with an ``FqnToConfig`` mixing
        configs) need one config each, ``config_1``, ``config_2`` ..., which comment lines
        tie to a layer quantized with it and to the kind read from its weight (one config
        rebuilt another model: 7.09 dB where the advice measured 32.32); a weight that is no
        module's ``weight`` (``proj.w_in``) is named by its parameter path (a filter naming
        its module fails in torchao). With no weight known, every ``nn.Linear`` but the
        kept and those inside them."""
        self._one_variant("torchao_keep_lines")
        self._warn_other_flow("this line", "torchao")
        self._warn_converted("this line")
        weights = self.torchao_weights or tuple((f"{path}.weight" if path else "weight", "")
                                                for path in self.torchao_modules)
        if not weights:
            # "enc." starts "enc.proj.": a kept module's own and its submodules' names
            kept = tuple(f"{name}." for name, _ in self._targets())
            return (f"quantize_({model}, {config}, filter_fn=lambda m, fqn: isinstance(m, "
                    f"torch.nn.Linear) and not (fqn + '.').startswith({kept!r}))")
        rest = [(param.rpartition(".")[0], param.rpartition(".")[2], kind)
                for param, kind in weights if not self._kept(param.rpartition(".")[0])]
        if not rest:
            return f"# every module quantize_ quantized is kept float: leave {model} float"
        kinds = list(dict.fromkeys(kind for *_, kind in rest))
        if len(kinds) == 1 and all(attribute == "weight" for _, attribute, _ in rest):
            names = ", ".join(repr(path) for path in dict.fromkeys(p for p, *_ in rest))
            return f"quantize_({model}, {config}, filter_fn=lambda m, fqn: fqn in {{{names}}})"
        names = {kind: config if len(kinds) == 1 else f"{config}_{i}"
                 for i, kind in enumerate(kinds, 1)}
        keys = {path if attribute == "weight" else f"{path}.{attribute}": kind
                for path, attribute, kind in rest}
        lines = []
        if len(kinds) > 1:
            lines.append(f"# in the quantized model these layers hold {len(kinds)} kinds of "
                         f"torchao weight, made by {len(kinds)} configs: one config cannot "
                         "rebuild them")
        for kind, name in names.items():
            first = next(key for key, k in keys.items() if k == kind)
            lines.append(f"# {name}: the config {first!r} was quantized with ({kind})")
        entries = ", ".join(f"{key!r}: {names[kind]}" for key, kind in keys.items())
        lines.append(f"quantize_({model}, FqnToConfig({{{entries}}}), filter_fn=None)")
        return "\n".join(lines)

    def summary(self) -> str:
        """Message, curve and what to feed back to the quantization flow (the flow the
        quantized model came from, when known; every flow's otherwise)."""
        parts = [self.message, "", self.table()]
        if self.converted:
            parts += ["", f"note: {self._converted_text()}"]
        parts += [f"note: {note}" for note in self.notes]
        if self.variants and self.flow in ("torchao", ""):
            parts += ["", "torchao: quantize_(model, advice.to_torchao(configs), filter_fn=None) "
                      "with configs = {variant: its torchao config}, i.e.",
                      _indent(self.torchao_lines())]
            return "\n".join(parts)
        if self.variants:  # not torchao models: no FqnToConfig applies them
            parts += ["", f"per layer (the variants come from {self.flow}: quantize each layer "
                      "with its variant's settings in that flow):",
                      _indent("\n".join(f"{path}: {choice}"
                                         for path, choice in self.assignment.items()))]
            return "\n".join(parts)
        if not self.keep_float:
            return "\n".join(parts)
        # made only for the flows shown: another flow's lines warn that they are another flow's
        lines = {
            "fx": ("FX: prepare_fx(model, advice.qconfig_mapping(your_mapping), ...), i.e.",
                   self.fx_lines),
            "eager": ("eager (before prepare; a DeQuantStub/QuantStub pair around each):",
                      self.eager_lines),
            "dynamic": ("dynamic:", self.dynamic_lines),
            "pt2e": ("pt2e (X86InductorQuantizer, before prepare_pt2e; XNNPACKQuantizer "
                     "cannot leave a module float by name):", self.pt2e_lines),
            "torchao": ("torchao:", self.torchao_keep_lines),
        }
        chosen = [lines[self.flow]] if self.flow in lines else [
            lines[k] for k in ("fx", "eager", "pt2e")]
        parts.append("")
        for heading, make in chosen:
            parts += [heading, _indent(make())]
        return "\n".join(parts)


# The lines that apply an advice in the flow its quantized model came from.
_OWN_LINES = {"fx": "advice.qconfig_mapping(your_mapping)", "eager": "advice.eager_lines()",
              "dynamic": "advice.dynamic_lines()", "pt2e": "advice.pt2e_lines()",
              "torchao": "advice.torchao_keep_lines()"}


def _prune(search: _Search, chosen: list[str], curve: list[float],
           target: float) -> tuple[list[str], list[float]]:
    """Drop chosen layers the target does without, least useful first; re-measure the curve."""
    u = search.metric.utility
    gains = {n: u(curve[i + 1]) - u(curve[i]) for i, n in enumerate(chosen)}
    kept = list(chosen)
    for name in sorted(chosen, key=lambda n: gains[n]):
        rest = [n for n in kept if n != name]
        if not rest:
            break
        (value,) = search.evaluate([("quant", search.swaps(rest, "quant"))], "pruning")
        if search.metric.meets(value, target):
            kept = rest
    if kept == chosen:
        return chosen, curve
    prefixes = [("quant", search.swaps(kept[:i], "quant")) for i in range(1, len(kept) + 1)]
    return kept, [curve[0], *search.evaluate(prefixes, "final curve")]


def flow_of(model: Any) -> str:
    """The quantization flow ``model`` came from: ``"pt2e"`` (an exported graph), ``"fx"`` (a
    GraphModule), the flow that owns its quantized modules (``"torchao"``), ``"dynamic"``
    (torch's dynamic modules) or ``"eager"``; ``""`` when it holds no quantized module."""
    if is_export_graph(model):
        return "pt2e"
    if isinstance(model, torch.fx.GraphModule):
        return "fx"
    if not isinstance(model, nn.Module):
        return ""
    for module in model.modules():
        for flow in flows.FLOWS:
            if flow.is_quantized_module(module):
                return flow.name
    if any(is_dynamic_module(m) for m in model.modules()):
        return "dynamic"
    return "eager" if any(is_quantized_module(m) for m in model.modules()) else ""


def dynamic_spec(model: Any) -> tuple[tuple[str, str], ...]:
    """``(module path, qconfig name)`` of each module ``quantize_dynamic`` quantized in
    ``model``: ``float16_dynamic_qconfig`` for float16 weights, ``per_channel_dynamic_qconfig``
    for int8 weights per channel, ``default_dynamic_qconfig`` otherwise; a weight-only
    ``Embedding`` or ``EmbeddingBag`` (its weight per row with float qparams),
    ``float_qparams_weight_only_qconfig``, or ``..._4bit`` for its 4-bit form.

    Read from each module as built, whatever its kind keeps them in
    (:func:`fxnumeric.storage.dynamic_weight_dtype`; a recurrent layer's weights are one per
    gate matrix, :func:`fxnumeric.storage.module_weights`): a float16 LSTMCell read as int8,
    or a per-channel LSTM as per tensor, was rebuilt into another model than the advised one.
    The modules are those of every class ``quantize_dynamic`` makes (its default mapping's),
    not only the dynamic ones: an Embedding it quantized weight-only, left out, stayed float
    in the rebuilt model (37.54 dB where the advice measured 38.79).
    """
    if not isinstance(model, nn.Module) or isinstance(model, torch.fx.GraphModule):
        return ()
    made = tuple(set(get_default_dynamic_quant_module_mappings().values()))
    found: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if not isinstance(module, made):
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in found):
            continue  # a quantized module's own parts (an LSTM's packed weights)
        found.append((path, _dynamic_qconfig_name(module)))
    return tuple(found)


def _dynamic_qconfig_name(module: nn.Module) -> str:
    """The name of the ``torch.ao.quantization`` qconfig that made ``module`` (one of the
    classes ``quantize_dynamic`` makes) as it is: see :func:`dynamic_spec`."""
    if dynamic_weight_dtype(module) == torch.float16:
        return "float16_dynamic_qconfig"
    weights = [w for w in module_weights(module) if w.is_quantized]
    if any(w.qscheme() == torch.per_channel_affine_float_qparams for w in weights):
        # quantize_dynamic's Embedding/EmbeddingBag: weight only, 8 or 4 bits
        four_bit = any(w.dtype == torch.quint4x2 for w in weights)
        return f"float_qparams_weight_only_qconfig{'_4bit' if four_bit else ''}"
    per_channel = any(w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
                      for w in weights)
    return "per_channel_dynamic_qconfig" if per_channel else "default_dynamic_qconfig"


def converted_layers(float_model: nn.Module | None, quant_model: nn.Module | None
                     ) -> tuple[str, ...]:
    """Module paths the float model holds as transformers ``Conv1D`` and the quantized model,
    at the same path, as a module of another type (an ``nn.Linear``, quantized or not): see
    :attr:`Advice.converted`."""
    if float_model is None or quant_model is None:
        return ()
    quant = dict(quant_model.named_modules())
    return tuple(path for path, module in float_model.named_modules()
                 if transposed_linear(module) and path in quant
                 and not transposed_linear(quant[path]))


def _advise_variants(search: _Search, target: float, layers: Iterable[str] | None, prune: bool,
                     bits: str, started: float, flow: str, max_float: int | None) -> Advice:
    """:func:`advise` over several quantized variants (see :mod:`fxnumeric.advice.mixed`)."""
    if bits not in ("nominal", "stored"):
        raise InputError(f"bits must be 'nominal' or 'stored', got {bits!r}")
    found = advise_variants(search, target, nominal=bits == "nominal", layers=layers,
                            prune=prune, max_float=max_float)
    keep = tuple(path for path, choice in found["assignment"].items() if choice == FLOAT)
    return Advice(keep, found["curve"], found["value"], float(target), found["reached"],
                  search.metric_name, found["message"] + _failed_note(search), search.evaluations,
                  time.perf_counter() - started, assignment=found["assignment"],
                  bits=found["bits"], front=found["front"],
                  variants=tuple(search.runner.variants), flow=flow,
                  unsearched=found["unsearched"],
                  dynamic=(dynamic_spec(search.matching.quant_model)
                           if len(search.runner.variants) == 1 else ()),
                  torchao_modules=(quantized_paths(search.matching.quant_model)
                                   if len(search.runner.variants) == 1 else ()),
                  torchao_weights=(quantized_weights(search.matching.quant_model)
                                   if len(search.runner.variants) == 1 else ()),
                  failed=tuple(search.failed.items()), notes=search.notes,
                  converted=converted_layers(search.matching.float_model,
                                             search.matching.quant_model))


def _whole_note(whole: tuple[tuple[str, str], ...]) -> str:
    """The end of an advice's message when layers are modules called whole (``""`` when none
    is): which, and why (:attr:`Sensitivity.whole`)."""
    by_why: dict[str, list[str]] = {}
    for name, why in whole:
        by_why.setdefault(why, []).append(name)
    return "".join(f"; {', '.join(f'`{n}`' for n in names)} "
                   f"{'is' if len(names) == 1 else 'are each'} {why}"
                   for why, names in by_why.items())


def _failed_note(search: _Search) -> str:
    """The end of an advice's message when hybrids failed in an op (``""`` when none did)."""
    count = len(search.failed)
    return (f"; {count} hybrid{'s' if count > 1 else ''} failed in an op and read NaN "
            "(advice.failed)" if count else "")


def _qualified(target: Any) -> str:
    """``operator.add``, ``torch.add``, ``torch.matmul``: a function as source code names it
    (a method, whose target is its name, as ``.mean()``)."""
    if isinstance(target, str):
        return f".{target}()"
    name = getattr(target, "__name__", "")
    if isinstance(target, type) and getattr(nn, name, None) is target:
        return f"torch.nn.{name}"  # a module class, as torch.nn exports it
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._VariableFunctions": "torch"}.get(module, module)
    name = getattr(target, "__name__", repr(target))
    return f"{module}.{name}" if module else name


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@keeps_buffers
def advise(
    float_model: nn.Module,
    quant_model: nn.Module | Mapping[str, nn.Module],
    data: Iterable[Any],
    *,
    metric: str | EndMetric,
    target: float,
    max_float_layers: int | None = None,
    candidates: int | None = None,
    prune: bool = True,
    layers: Iterable[str] | str | None = None,
    matching: Matching | None = None,
    progress: bool | None = None,
    inputs: int | Callable[[Any], Any] | None = None,
    bits: str = "nominal",
    capture: str = "auto",
) -> Advice:
    """Find what to keep at higher precision so that the end metric reaches ``target``.

    With one quantized model: a small set of layers to keep float. Greedy forward selection
    verified on hybrids: layers are ranked by :func:`sensitivity` ("all but this layer
    quantized"); each step runs the quantized model with the layers chosen so far plus one of
    the ``candidates`` best-ranked remaining layers kept float, and keeps the candidate that
    gives the best metric. It stops when the metric reaches ``target``, after
    ``max_float_layers`` layers, or when no layer is left; then layers the target can do
    without are dropped again (``prune``).

    With several quantized variants (``{"int4": q4, "int8": q8}``): per layer, one of the
    variants or float, minimising the average weight bits subject to the target, every step
    verified on real hybrids (:mod:`fxnumeric.advice.mixed`). ``Advice.assignment``,
    ``Advice.bits``, ``Advice.front`` and ``Advice.to_torchao`` give the result.

    Args:
        float_model: the float model (not modified).
        quant_model: the quantized model made from it (not modified).
        data: batches, as :func:`fxnumeric.compare` takes them; every hybrid runs on all of
            them.
        metric: ``"sqnr"``, ``"cosine"``, ``"min_cosine"`` or a function
            ``(float_output, candidate_output) -> float``, higher is better (see
            :func:`sensitivity`).
        target: the metric value to reach.
        max_float_layers: keep at most this many layers float (with several variants too:
            0 chooses among the variants only).
        candidates: with one quantized model, how many top-ranked layers each step verifies
            (default 16; more: better choices, proportionally more hybrids run). The search
            over several variants measures every layer's next step, so it takes none.
        prune: once the target is reached, drop every chosen layer the target can do without
            (each drop verified), then measure the curve of what is left.
        layers: restrict the search to these layer (pair) names (one name: a string).
        matching: a :func:`fxnumeric.match` result to reuse.
        progress: show progress on stderr (default: when stderr is a terminal).
        inputs: what of each batch the models take, as in :func:`fxnumeric.compare`.
        bits: what a layer's weight costs with several variants: ``"nominal"`` (a packed
            format's width, scales and zero points included) or ``"stored"`` (what the
            tensors hold: torchao 0.18 keeps int4 values in whole bytes on CPU).
        capture: ``"fx"``, ``"export"`` or ``"auto"``, as in :func:`fxnumeric.compare`: the
            first batch is the example input of the capture (an exported graph is specialised
            to its shapes, so every batch must have them). Ignored when ``matching`` is given.

    Returns:
        An :class:`Advice`; when the target is not reached, ``reached`` is False, the message
        says so and the best set found is returned.
    """
    a_number(target, "target", "Fix: the metric's value to reach, e.g. target=30 (dB) for "
             "metric='sqnr', target=0.99 for 'top1_agreement'")
    if candidates is not None:
        a_count(candidates, "candidates", 1)
    if candidates is not None and isinstance(quant_model, Mapping):
        raise InputError("candidates applies to one quantized model (how many ranked layers "
                         "each step of the float-fallback search verifies); the search over "
                         "several variants measures every layer's next step: leave it out")
    if max_float_layers is not None:
        a_count(max_float_layers, "max_float_layers", 0)
    layers = None if layers is None else _names(layers)
    started = time.perf_counter()
    search = _Search(float_model, quant_model, data, metric, matching, progress, inputs,
                     capture)
    try:
        if isinstance(quant_model, Mapping):
            variant_flows = {flow_of(model) for model in quant_model.values()} - {""}
            return _advise_variants(search, target, layers, prune, bits, started,
                                    "+".join(sorted(variant_flows)), max_float_layers)
        return _advise_float(search, target, max_float_layers,
                             16 if candidates is None else candidates, prune, layers, started)
    finally:
        search.close()


def _advise_float(search: _Search, target: float, max_float_layers: int | None,
                  candidates: int, prune: bool, layers: Iterable[str] | None,
                  started: float) -> Advice:
    """:func:`advise` with one quantized model: which layers to keep float."""
    names, skipped = search.layers(layers, ("quant",))
    hybrids = [("quant", ())] + [("quant", search.swaps([n], "quant")) for n in names]
    values = search.evaluate(hybrids, "ranking layers")
    quantized = values[0]
    kinds = {p.name: p.kind for p in search.matching.pairs}
    sens = Sensitivity(search.metric_name, quantized, tuple(
        LayerSensitivity(n, module_path(search.matching, n), kinds[n], math.nan, v)
        for n, v in zip(names, values[1:], strict=True)
    ), len(search.batches), skipped, search.metric.higher_is_better, tuple(search.failed.items()),
        whole=called_whole(search.matching, names))
    u, meets = search.metric.utility, search.metric.meets
    priority = {n: u(v) for n, v in zip(names, values[1:], strict=True)}
    limit = len(names) if max_float_layers is None else min(max_float_layers, len(names))

    chosen: list[str] = []
    curve = [quantized]
    while not meets(curve[-1], target) and len(chosen) < limit:
        remaining = sorted((n for n in names if n not in chosen), key=lambda n: -priority[n])
        tried = remaining[:candidates]
        if len(chosen) == 0:  # measured in the ranking round already
            scores = [values[1 + names.index(n)] for n in tried]
        else:
            shared = search.swaps(chosen, "quant")
            scores = search.evaluate(
                [("quant", shared + search.swaps([n], "quant")) for n in tried],
                f"step {len(chosen) + 1}",
            )
        for n, v in zip(tried, scores, strict=True):
            priority[n] = u(v)
        best = max(range(len(tried)), key=lambda i: priority[tried[i]])
        chosen.append(tried[best])
        curve.append(scores[best])

    if prune and meets(curve[-1], target) and len(chosen) > 1:
        chosen, curve = _prune(search, chosen, curve, target)
    # short of the target a step can lower the metric (the best of the candidates is still
    # worse): the set returned is the best point of the curve, not its last
    best = max(range(len(curve)), key=lambda i: (u(curve[i]), -i))
    dropped = len(curve) - 1 - best
    chosen, curve = chosen[:best], curve[:best + 1]
    value = curve[-1]
    reached = meets(value, target)
    cmp = ">=" if search.metric.higher_is_better else "<="
    paths = tuple(module_path(search.matching, n) for n in chosen)
    functions = tuple(function_target(search.matching, n) for n in chosen)
    calls = tuple(module_calls(search.matching, n) for n in chosen)
    units = unit(search.metric_name)
    kept = f"{len(chosen)} of {len(names)} layer{'s' if len(names) != 1 else ''}"
    # with the digits the curve's table shows them (0.99985, not 0.9999 against 0.99995)
    texts = shown_apart(curve, target)
    if reached and not chosen:
        message = (f"the quantized model already reaches {search.metric_name} "
                   f"{texts[-1]}{units} {cmp} {target:g}{units}")
    elif reached:
        message = (f"keep {kept} float to reach {search.metric_name} {texts[-1]}{units} "
                   f"{cmp} {target:g}{units} (quantized: {texts[0]}{units})")
    else:
        # the search stopped at the limit or after every layer: what ``chosen`` was cut back
        # to (the best point of the curve) says neither
        why = (f"max_float_layers={max_float_layers} reached" if limit < len(names)
               else f"even with all {len(names)} layers float")
        message = (f"target {search.metric_name} {cmp} {target:g}{units} NOT reached ({why}): "
                   f"best found {texts[-1]}{units} with {kept} float "
                   f"(quantized: {texts[0]}{units})")
        if dropped:
            message += (f"; {dropped} more layer{'s' if dropped != 1 else ''} kept float after "
                        "those made it no better")
        strays: dict[str, str] = {}  # each op by its first reader, in graph order
        for layer, ops in search.runner.strays.items():
            for op in ops:
                strays.setdefault(op, layer)
        if strays:  # a `* 0.5` only the quantized model has: no layer kept float removes it
            message += ("; the quantized model computes ops the float model lacks, which every "
                        "hybrid keeps, and their error with them: "
                        + ", ".join(f"`{op}` (read by {layer})" for op, layer in strays.items())
                        + " (see report.unmatched)")
    if skipped:
        message += f"; {len(skipped)} layers could not be swapped (advice.sensitivity.skipped)"
    message += _whole_note(sens.whole) + _failed_note(search)
    return Advice(paths, tuple(curve), value, float(target), reached, search.metric_name, message,
                  search.evaluations, time.perf_counter() - started, sens,
                  functions if any(functions) else (),
                  module_calls=calls if any(calls) else (),
                  assignment={module_path(search.matching, n): FLOAT if n in chosen
                              else "quantized" for n in names},
                  flow=flow_of(search.matching.quant_model),
                  dynamic=dynamic_spec(search.matching.quant_model),
                  torchao_modules=quantized_paths(search.matching.quant_model),
                  torchao_weights=quantized_weights(search.matching.quant_model),
                  failed=tuple(search.failed.items()), notes=search.notes,
                  converted=converted_layers(search.matching.float_model,
                                             search.matching.quant_model))
