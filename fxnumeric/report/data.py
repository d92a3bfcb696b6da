"""Stage 6, report: what :func:`fxnumeric.compare` found, as data.

A :class:`Report` is a frozen dataclass of :class:`ReportRow` s; nothing in it prints
tensors. It answers the questions (is there a culprit, which layer is worst, in what order to
show the rows, is a row's signal too small to measure); the culprit rule lives in
:mod:`fxnumeric.report.verdict`; every rendering (tables, CSV, HTML, notebook display) lives
in :mod:`fxnumeric.report.render`, and the methods here only delegate to them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import InputError
from ..floor import FLOOR_MARGIN_DB, unexplained
from ..metrics import Spread
from ..numbers import a_count, fixed
from . import persist
from .render import (
    TABLE_FORMATS,
    block_table,
    report_csv,
    report_fragment,
    report_page,
    report_table,
    worst_first_key,
)
from .variants import best_variant, variants_summary
from .verdict import (
    Verdict,
    adds_error,
    blamed,
    compares_detections,
    suspect_pairing,
    verdict,
)

if TYPE_CHECKING:
    from .diff import ReportDiff

__all__ = ["Report", "ReportRow", "BlockRow", "WeightHistogram", "TABLE_FORMATS",
           "DEGENERATE_RMS_RATIO", "BELOW_FLOOR_DB", "Spread", "Verdict", "activation_scale",
           "compares_detections"]

_SORT_KEYS = ("graph", "output_sqnr", "shadow_sqnr", "weight_sqnr")
_WORST_FIRST = ("shadow_sqnr", "output_sqnr", "weight_sqnr")
_LABELS = {"shadow_sqnr": "shadow SQNR", "output_sqnr": "output SQNR", "weight_sqnr": "weight SQNR"}

DEGENERATE_RMS_RATIO = 1e-6
"""A float activation is "collapsed" when its RMS is exactly zero or below this fraction of
the largest activation upstream of it (:func:`activation_scale` of the float RMS of its own
row and of the rows whose values reach it; for the model output, of every row and itself).
Its SQNR, cosine and MSE then measure nothing.

Relative, because everything it guards is scale-invariant: fed inputs 1e-8 times smaller
(biases scaled alike), a model computes the same activations 1e-8 times smaller, and a
weight-only quantized one reads the same SQNRs and the same culprit. An absolute floor
called every layer of it collapsed. What makes an SQNR unreadable is a signal tiny against
the values around it: a dead ReLU's zeros, ``l1(x) - l2(x)`` of two equal branches. What is
left of such a signal in float32 is rounding residue, about eps (1.2e-7) times its operands,
so a ratio of 1e-6 (8 eps) tells residue from signal; and no quantization grid spanning
the model's values (a step of 1/255 of its range at 8 bits, 1/65535 at 16) resolves it.

Upstream, because a signal is tiny against the values it was computed from: a later layer
with a gain of 1e8 (one that outputs physical units), or another branch, says nothing about
it, and judged against those a layer with a 14 dB SQNR read collapsed and was never named.
The largest upstream rather than the row's direct inputs, and rather than a median, which a
collapse spreading through most layers drags down with it (a Linear whose weights are 1e-9
shrinks every layer after it: each is judged against the activations before that Linear).
Not past an op whose output is bounded whatever its input (a ``ReLU6``, a sigmoid:
:func:`fxnumeric.semantics.output_bound`): its output is judged against what is upstream of it
no larger than its bound, and its readers against that; a ``ReLU6`` of inputs of RMS 1e7
outputs RMS 4, computed, not residue.
A row with no known upstream row is judged against itself: collapsed only at exactly zero.
Where the data flow is not traced (between the regions of a model captured through its
module tree), every row run before counts as upstream (:func:`fxnumeric.dataflow.upstream_ops`)."""

BELOW_FLOOR_DB = FLOOR_MARGIN_DB
"""A layer whose shadow SQNR reads this far below its ``floor_sqnr`` (four times the noise
power its own qparams allow; the noise model is an expectation) is shown "below floor":
something beyond rounding is wrong with it."""


def activation_scale(rms_values: Iterable[float | None]) -> float | None:
    """The scale a float RMS is judged against: the largest finite RMS of ``rms_values`` (a
    row's own and its upstream rows' float RMS), ``None`` when none is known.

    A non-finite RMS (a float model that overflows) is left out: against ``inf`` every layer
    would read collapsed, and the NaN/Inf notes already say what is wrong.

    Example:
        >>> activation_scale([0.5, None, float("inf"), 2e-9, 3.0])
        3.0
    """
    finite = [v for v in rms_values if v is not None and math.isfinite(v)]
    return max(finite) if finite else None


def _collapsed(rms: float | None, scale: float | None) -> bool:
    """Whether an RMS is collapsed against the activation it is judged against (see
    :data:`DEGENERATE_RMS_RATIO`): exact zero always, anything else only against a known
    scale."""
    if rms is None:
        return False
    return rms == 0.0 or (scale is not None and rms < DEGENERATE_RMS_RATIO * scale)


def _collapse_text(rms: float, scale: float | None, against: str) -> str:
    """``RMS 3.0e-10 < 1e-06 x the largest activation upstream, 0.31`` (or ``RMS 0``): the
    relative rule, read; ``against`` names what ``scale`` is."""
    if rms == 0.0:
        return "RMS 0"
    return f"RMS {rms:.1e} < {DEGENERATE_RMS_RATIO:g} x {against}, {scale:.2g}"


_UPSTREAM = "the largest activation upstream"
_WHOLE_MODEL = "the model's largest activation"


_AS_SAVED = "as the older fxnumeric that saved this report judged"


def _collapse_note(row: ReportRow | BlockRow) -> str:
    """What a layer or block row whose float signal collapsed says of it (``""`` when it did
    not: :attr:`ReportRow.degenerate`)."""
    if not row.degenerate:
        return ""
    if row.legacy_degenerate is not None:
        rms = "unknown" if row.float_rms is None else f"{row.float_rms:.1e}"
        return f"float signal collapsed (RMS {rms}, {_AS_SAVED} it): SQNR meaningless"
    assert row.float_rms is not None
    return (f"float signal collapsed ({_collapse_text(row.float_rms, row.reference_rms, _UPSTREAM)}"
            "): SQNR meaningless")


_FLOOR_CAUSES = {
    "clipping": "clipping: its output range is too narrow for its values",
    "offset": "a constant error per output channel: a lost bias or a wrong zero point",
    "scale": "its error exceeds what its steps allow: a wrong output or weight scale",
    "coarse": "an output step coarser than its values, which round to zero or near it",
    "input": ("its input's rounding on an activation scale fixed at conversion (a static "
              "scale, torchao's act_quant_scale): recalibrate it on representative data"),
}


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN: a report that holds NaN (a poisoned layer) equals its
    JSON round trip, as every other report does."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name))
            for f in dataclasses.fields(a) if f.compare)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same(x, y) for x, y in zip(a, b, strict=True)))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(
            torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    return bool(a == b)


def _eq(self: Any, other: Any) -> bool:
    return _same(self, other) if type(other) is type(self) else NotImplemented


@dataclass(frozen=True)
class WeightHistogram:
    """Histogram of a layer's float and dequantized quantized weights over the same bins."""

    low: float
    high: float
    float_counts: tuple[int, ...]
    quant_counts: tuple[int, ...]


@dataclass(frozen=True)
class BlockRow:
    """A block of the model (a decoder layer, a BERT layer, a ResNet stage: see
    :mod:`fxnumeric.blocks`) and the error around it.

    ``output`` holds the metrics at the block's output (the error that leaves it, accumulated
    from the start); ``shadow`` those of the block's shadow (the float block fed the quantized
    block's input: the error the block adds by itself); ``entering`` is the output SQNR of the
    block that ran before it in its container, ``layers.2`` for ``layers.3`` (the error that
    enters it; ``None`` for the first of each: a CLIP's vision tower, a decoder's first
    layer, read nothing from the text tower or the encoder's last layer).

    ``float_rms`` is the root mean square of the float block's output over all batches, judged
    against ``reference_rms`` as a layer row's is (:attr:`degenerate`): a block whose float
    signal collapsed has SQNRs that measure nothing, as its layers' do.
    """

    __eq__ = _eq  # NaN equals NaN (see _same)

    name: str
    kind: str
    layers: tuple[str, ...]
    output: dict[str, float]
    shadow: dict[str, float]
    entering: float | None = None
    note: str = ""
    float_rms: float | None = None
    reference_rms: float | None = None
    """What ``float_rms`` is judged against: the largest float RMS among the block's output
    and the activations upstream of its layers (their rows' ``reference_rms``;
    :data:`DEGENERATE_RMS_RATIO`). ``None``: unknown, and only an RMS of exactly zero reads
    collapsed."""
    legacy_degenerate: bool | None = field(default=None, repr=False,
                                           metadata={"json_omit_default": True})
    """As :attr:`ReportRow.legacy_degenerate`: the collapse an older report file saved."""

    _JSON_DERIVED: ClassVar[dict[str, Callable[[BlockRow], Any]]] = {
        "degenerate": lambda b: b.degenerate,
    }

    @property
    def output_sqnr(self) -> float | None:
        return self.output.get("sqnr")

    @property
    def shadow_sqnr(self) -> float | None:
        return self.shadow.get("sqnr")

    @property
    def degenerate(self) -> bool:
        """Whether the float block's output collapsed, by the rule of
        :attr:`ReportRow.degenerate`."""
        if self.legacy_degenerate is not None:
            return self.legacy_degenerate
        return _collapsed(self.float_rms, self.reference_rms)

    @property
    def notes(self) -> str:
        """``note`` plus what the row's numbers cannot tell (a collapsed signal)."""
        return "; ".join(n for n in (self.note, _collapse_note(self)) if n)


@dataclass(frozen=True)
class ReportRow:
    """Metrics for one paired layer.

    ``output`` holds the cumulative metrics (both models fed the same input, so the error
    accumulated up to this layer); ``shadow`` the local ones (this quantized op against its
    float twin fed the same dequantized input: the error this layer adds). ``float_rms`` is
    the root mean square of the float activation over all batches (``None`` when unknown).

    ``spread`` holds, for ``"output_sqnr"`` and ``"shadow_sqnr"``, how that SQNR varies from
    batch to batch (:class:`fxnumeric.metrics.Spread`: mean, std, lowest and highest of the
    per-batch values); the culprit rule (:mod:`fxnumeric.report.verdict`) holds the gap
    between layers against it. ``floor_sqnr`` is the SQNR the layer's own qparams allow
    (``None`` until something measures it); a shadow SQNR far below it means a broken layer.
    """

    __eq__ = _eq  # NaN equals NaN (see _same)

    name: str
    kind: str
    quantized: bool
    weight_sqnr: float | None
    output: dict[str, float]
    shadow: dict[str, float]
    weight_keys: tuple[str, ...] = ()
    float_nodes: tuple[str, ...] = ()
    quant_nodes: tuple[str, ...] = ()
    note: str = ""
    flags: tuple[str, ...] = ()
    """Why the layer is bad, as flag codes (``fxnumeric.advice.annotate`` sets them)."""
    weight_histogram: WeightHistogram | None = field(default=None, repr=False)
    activations: tuple | None = field(default=None, repr=False, metadata={"json": False})
    """Raw tensors, only with ``compare(..., keep_activations=True)``; never saved to JSON."""
    float_rms: float | None = None
    reference_rms: float | None = None
    """What ``float_rms`` is judged against: the largest float RMS among this row and the rows
    upstream of it, whose values reach it (:data:`DEGENERATE_RMS_RATIO`;
    :func:`fxnumeric.compare` sets it). ``None``: unknown, and only an RMS of exactly zero
    reads collapsed."""
    floor_sqnr: float | None = None
    """The SQNR this layer's own qparams allow (None when unknown; :mod:`fxnumeric.floor`)."""
    floor_cause: str = ""
    """What the floor says is wrong: ``"offset"`` (below its floor; a constant error per output
    channel: a lost bias, a wrong zero point), ``"scale"`` (below its floor otherwise),
    ``"clipping"`` (most of what its floor allows is clipping), ``"coarse"`` (an output step
    coarser than its values), ``"input"`` (most of what its floor allows is its input's
    rounding on a static activation scale); ``""`` for nothing wrong
    (:func:`fxnumeric.floor.judge`)."""
    spread: dict[str, Spread] = field(default_factory=dict, repr=False)
    """How ``output_sqnr`` and ``shadow_sqnr`` vary from batch to batch (see the class doc)."""
    block: str = ""
    """The block the layer sits in (``model.layers.3``; ``""`` for none)."""
    shadow_shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = field(
        default=None, metadata={"json_omit_default": True})
    """``(float twin's, quantized layer's)`` output shapes when they differ: fed the same
    input, the two compute different things, so no shadow was compared (``None`` otherwise)."""
    rounded_for: tuple[str, ...] = field(default=(), metadata={"json_omit_default": True})
    """The layers whose input quantize is all the error this row's shadow SQNR measures
    (:meth:`fxnumeric.match.Region.rounded_for`): this op computes what its float twin
    computes and hands its value on through a quantize its readers asked for (X86's Linear
    after a GELU). Kept float, those readers lose that rounding; this layer kept float keeps
    it. The verdict blames them, not this row. ``()``: the row's error is its own, or the
    graph does not say whose the quantize is."""
    legacy_degenerate: bool | None = field(default=None, repr=False,
                                           metadata={"json_omit_default": True})
    """Whether the float signal collapsed, as the report file this row was loaded from says:
    set only for a file of schema 1 written before ``reference_rms`` existed, whose
    fxnumeric judged an RMS below an absolute 1e-6 collapsed (``float_rms`` alone cannot
    say what that file concluded). ``None``: judged from ``float_rms`` and
    ``reference_rms`` (:attr:`degenerate`)."""

    _JSON_DERIVED: ClassVar[dict[str, Callable[[ReportRow], Any]]] = {
        "degenerate": lambda r: r.degenerate,
        "below_floor": lambda r: r.below_floor,
    }

    @property
    def below_floor(self) -> bool:
        """Whether the shadow SQNR reads :data:`BELOW_FLOOR_DB` or more below ``floor_sqnr``
        (``False`` when either is unknown, and for a shadow SQNR of NaN or ``-inf``: Inf in the
        quantized output, or no float signal, which its notes say instead; no scale explains
        them)."""
        s = self.shadow_sqnr
        return (self.floor_sqnr is not None and s is not None and s > -math.inf
                and s < self.floor_sqnr - BELOW_FLOOR_DB)

    @property
    def output_sqnr(self) -> float | None:
        return self.output.get("sqnr")

    @property
    def shadow_sqnr(self) -> float | None:
        return self.shadow.get("sqnr")

    @property
    def cosine(self) -> float | None:
        return self.output.get("cosine")

    @property
    def mse(self) -> float | None:
        return self.output.get("mse")

    @property
    def max_abs_error(self) -> float | None:
        return self.output.get("max_abs_error")

    @property
    def degenerate(self) -> bool:
        """Whether the float activation collapsed: its RMS is zero, or below
        :data:`DEGENERATE_RMS_RATIO` times ``reference_rms`` (the largest activation upstream);
        in a row loaded from an older file, what that file says (``legacy_degenerate``)."""
        if self.legacy_degenerate is not None:
            return self.legacy_degenerate
        return _collapsed(self.float_rms, self.reference_rms)

    @property
    def notes(self) -> str:
        """``note`` plus what the row's numbers cannot tell (a collapsed signal) or say
        beyond themselves (below its floor)."""
        parts = [n for n in (self.note, _collapse_note(self), suspect_pairing(self)) if n]
        if self.rounded_for:
            asks = "it asks" if len(self.rounded_for) == 1 else "they ask"
            parts.append(f"its shadow SQNR is the input quantize of "
                         f"{_some(list(self.rounded_for))}, which {asks} for (this op computes "
                         "in float)")
        why = _FLOOR_CAUSES.get(self.floor_cause, "")
        if unexplained(self.floor_cause, self.weight_sqnr, self.shadow_sqnr):
            why = (f"neither its steps nor its weights, which read {self.weight_sqnr:.2f} dB, "
                   "explain it: the quantized op computes something other than its float twin "
                   "on the same values (a kernel fault, or a scale applied inside the op; "
                   "fxnumeric.diagnose)")
        if self.below_floor:
            parts.append(f"below floor: shadow SQNR {self.shadow_sqnr:.2f} dB, its qparams "
                         f"allow {self.floor_sqnr:.2f} dB" + (f" ({why})" if why else ""))
        elif self.floor_cause in ("clipping", "coarse", "input"):
            parts.append(f"its floor is {self.floor_sqnr:.2f} dB because of {why}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        def db(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        return (f"ReportRow({self.name!r}, {self.kind}, weight {db(self.weight_sqnr)} dB, "
                f"output {db(self.output_sqnr)} dB, shadow {db(self.shadow_sqnr)} dB)")


def _some(names: list[str]) -> str:
    """The first three names, then how many more."""
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _upgrade_schema_1(data: dict[str, Any]) -> dict[str, Any]:
    """A report file of schema 1 in schema 2's layout (a new dict; ``data`` is left as is).

    Schema 2 changed what ``degenerate`` means: a float RMS tiny against the activations
    upstream of it (``reference_rms``), where the fxnumeric that wrote schema 1 files before
    ``reference_rms`` existed read an absolute RMS below 1e-6. Such a file's rows (layers and
    blocks, in every variant) keep the ``degenerate`` it saved, as ``legacy_degenerate``: a
    row the file calls collapsed stays collapsed, and none is named culprit that the file
    judged meaningless. A schema 1 file holding ``reference_rms`` was judged by the relative
    rule already, and loads unchanged.
    """
    def row(item: Any) -> Any:
        if (isinstance(item, dict) and "reference_rms" not in item
                and isinstance(item.get("degenerate"), bool)):
            return {**item, "legacy_degenerate": item["degenerate"]}
        return item

    out = dict(data)
    for key in ("layers", "blocks"):
        if isinstance(out.get(key), list):
            out[key] = [row(item) for item in out[key]]
    if isinstance(out.get("variants"), dict):
        out["variants"] = {name: _upgrade_schema_1(v) if isinstance(v, dict) else v
                           for name, v in out["variants"].items()}
    return out


_UPGRADES = {1: _upgrade_schema_1}
"""The function, by schema, that turns a report file of that schema into the next's layout
(:func:`fxnumeric.report.persist.load`)."""


@dataclass(frozen=True)
class Report:
    """Per-layer comparison of a float model and its quantized counterpart.

    ``notes`` are report-wide caveats (random weights, nothing quantized, batches left out,
    where NaN/Inf first appears) shown above the summary in every rendering;
    ``model_output_rms`` is the float model output's RMS. ``skipped_batches`` are the indices
    of the batches left out of every metric because their input held NaN/Inf; ``nonfinite``
    says where NaN/Inf first appears inside the models, as ``(model side, layer)`` pairs
    (``("quantized", "conv3")``), graph order.
    ``unmatched`` holds ``(node, side, reason)`` for every node that could not be paired.

    A report saves to JSON and loads back exactly (:meth:`to_json`, :meth:`from_json`; the
    schema is in ``docs/reports.md``), and two reports diff (:meth:`diff`).
    """

    __eq__ = _eq  # NaN equals NaN (see _same)

    rows: tuple[ReportRow, ...] = field(metadata={"json": "layers"})
    metrics: tuple[str, ...]
    comparisons: tuple[str, ...]
    batches: int = field(metadata={"json_min": 0})
    model_output: dict[str, float]
    """The metrics of the model output (its logits, else its first tensor), over the real
    tokens alone where the batch's ``attention_mask`` holds padding and fits the output's rows
    (a note then says how much was padding; the rows read every position)."""
    unmatched: tuple[tuple[str, str, str], ...] = field(
        default=(), metadata={"json_items": ("node", "side", "reason")})
    torch_version: str = ""
    notes: tuple[str, ...] = ()
    model_output_rms: float | None = None
    skipped_batches: tuple[int, ...] = ()
    nonfinite: tuple[tuple[str, str], ...] = ()
    blocks: tuple[BlockRow, ...] = ()
    """The model's blocks (decoder layers, BERT layers, ResNet stages), in the order they run,
    with the error entering, added in and leaving each (:class:`BlockRow`)."""
    logits_per: str = field(default="token", metadata={"json_omit_default": True,
                                                       "json_choices": ("token", "sample")})
    """What one row of the model's logits predicts, for the ``kl`` and ``top1_agreement`` of
    ``model_output``: ``"token"`` (a language model's next token, a token classifier's tag)
    or ``"sample"`` (a sequence or image classifier's ``(batch, n)`` logits: one KL per
    sample). Read by the summaries' wording (:meth:`kl_label`)."""
    variants: dict[str, Report] = field(default_factory=dict,
                                        metadata={"json_omit_default": True})
    """With several quantized variants (``compare(f, {"fx": q1, "dynamic": q2}, data)``):
    each variant's own report, in the order given, equal to comparing it alone. The report's
    other fields are then the first variant's (its rows, model output, verdict), with the
    comparison's notes added; its table, CSV, HTML and summary show every variant
    (:mod:`fxnumeric.report.variants`). Empty for a report of one quantized model."""
    aligned: tuple[tuple[str | None, ...], ...] = field(default=(),
                                                        metadata={"json_omit_default": True})
    """With ``variants``: their layers aligned by the float value each compares (the same
    float node, whatever each variant's matching names it), in graph order: per layer, each
    variant's row name in the order of ``variants``, ``None`` where it has no such layer."""
    model_output_part: str = field(default="", metadata={"json_omit_default": True})
    """Where the tensor ``model_output`` compares sits in what the model returns, when that
    holds more than one tensor (``"[0]['boxes']"``: a detector's boxes of the first image;
    see :func:`compares_detections`); ``""`` otherwise."""
    model_output_reference_rms: float | None = field(default=None,
                                                     metadata={"json_omit_default": True})
    """What ``model_output_rms`` is judged against (:attr:`activation_rms`): the largest float
    RMS among the output and the activations reaching it, not past an op whose output is
    bounded (:data:`DEGENERATE_RMS_RATIO`; :func:`fxnumeric.compare` sets it). ``None``:
    every row's and the output's (a report built by hand, or saved before it existed)."""

    _JSON_DERIVED: ClassVar[dict[str, Callable[[Report], Any]]] = {
        "summary": lambda r: r.summary(),
        "worst_layer": lambda r: r.worst_layer.name if r.worst_layer is not None else None,
        "culprit": lambda r: r.culprit,
        "verdict": lambda r: persist.to_data(r.verdict, Verdict),
        "best_variant": lambda r: r.best_variant if r.variants else persist.OMIT,
    }

    # ------------------------------------------------------------------ queries
    def row(self, name: str) -> ReportRow:
        """The row called ``name``.

        Raises:
            InputError: naming a few of the rows there are.
        """
        for r in self.rows:
            if r.name == name:
                return r
        names = ", ".join(r.name for r in self.rows[:8])
        more = " ..." if len(self.rows) > 8 else ""
        raise InputError(f"no row named {name!r}; rows are: {names}{more} (see Report.table())")

    @property
    def activation_rms(self) -> float | None:
        """What the model output is judged against: :attr:`model_output_reference_rms`, the
        largest activation reaching it, where known; else the largest finite float RMS of the
        model's layers and its output (:func:`activation_scale`). Each row is judged against
        its own upstream, ``ReportRow.reference_rms``."""
        if self.model_output_reference_rms is not None:
            return self.model_output_reference_rms
        return activation_scale([*(r.float_rms for r in self.rows), self.model_output_rms])

    @property
    def output_degenerate(self) -> bool:
        """Whether the float model output collapsed: its RMS is zero, or below
        :data:`DEGENERATE_RMS_RATIO` times :attr:`activation_rms`."""
        return _collapsed(self.model_output_rms, self.activation_rms)

    @property
    def degenerate_rows(self) -> tuple[ReportRow, ...]:
        """Rows whose float signal collapsed: their metrics measure nothing."""
        return tuple(r for r in self.rows if r.degenerate)

    @property
    def verdict(self) -> Verdict:
        """Whether one layer stands out, a few together, or the error is spread; see
        :mod:`fxnumeric.report.verdict` for the rule."""
        return verdict(self)

    @property
    def culprit(self) -> str | None:
        """The layer where error enters, when it stands out from every other layer by more
        than 6 dB and the batch noise; ``None`` otherwise (see :attr:`verdict`)."""
        return self.verdict.culprit

    @property
    def worst_layer(self) -> ReportRow | None:
        """The layer with the lowest shadow SQNR, else the largest output-SQNR drop, whether
        or not it stands out (:attr:`culprit` says whether it does).

        A quantize is its reader's, as in the verdict: when the lowest row holds only the
        input rounding its readers asked for (:attr:`ReportRow.rounded_for`, an op computing
        in float in front of them), the worst layer is its first reader's row, the layer
        whose float copy removes that error. Rows with a collapsed float signal are never
        chosen, nor a layer that adds no error at all (shadow SQNR ``inf``, or at float32's
        rounding: :func:`fxnumeric.report.verdict.adds_error`), nor an output-SQNR drop to
        such a value.
        """
        live = [r for r in self.rows if not r.degenerate]
        with_shadow = [r for r in live
                       if r.shadow_sqnr is not None and not math.isnan(r.shadow_sqnr)]
        if with_shadow:
            layers = blamed(live)
            if not layers:
                return None
            by_name = {r.name: r for r in live}
            return by_name.get(layers[0].names[0], layers[0].row)
        best, prev = None, None
        drop_best = 0.0
        for r in live:
            s = r.output_sqnr
            if s is None or math.isnan(s):
                continue
            if (prev is not None and math.isfinite(prev) and adds_error(s)
                    and prev - s > drop_best):
                best, drop_best = r, prev - s
            prev = s
        return best

    @property
    def best_variant(self) -> str | None:
        """With ``variants``: the best one overall (the lowest per-token KL when every variant
        has it, a language model's; else the highest model output SQNR), ``None`` without
        variants or values (see :mod:`fxnumeric.report.variants`)."""
        return best_variant(self) if self.variants else None

    @property
    def kl_label(self) -> str:
        """``"per-token KL"``, or ``"per-sample KL"`` for a classifier's logits
        (:attr:`logits_per`)."""
        return f"per-{self.logits_per} KL"

    def llm_summary(self) -> str:
        """The language-model metrics of the output, in words (``""`` when there are none):
        mean per-token (or per-sample) KL, its p99, top-1 agreement, perplexity float ->
        quantized."""
        out = self.model_output
        if "kl" not in out:
            return ""
        text = (f"{self.kl_label} {out['kl']:.4g} nats (p99 {out.get('kl_p99', math.nan):.3g}, "
                f"max {out.get('kl_max', math.nan):.3g}), top-1 agreement "
                f"{fixed(out.get('top1_agreement', math.nan))}")
        if "ppl_float" in out:
            text += (f", perplexity {out['ppl_float']:.3f} float -> "
                     f"{out.get('ppl_quantized', math.nan):.3f} quantized")
        return text

    def summary(self, *, verdict: bool = True) -> str:
        """One line: batches, overall output SQNR, the verdict (culprit, or spread error).

        ``verdict=False`` leaves the verdict out, for a page that shows it on its own. With
        ``variants``: which variant is best overall and where each loses
        (:func:`fxnumeric.report.variants.variants_summary`).
        """
        if self.variants:
            return variants_summary(self, where=verdict)
        left_out = (f" ({len(self.skipped_batches)} more left out: NaN/Inf in the input)"
                    if self.skipped_batches else "")
        parts = [f"{self.batches} batches{left_out}", f"{len(self.rows)} layers"]
        overall = self.model_output.get("sqnr")
        if overall is not None and math.isnan(overall) and self.model_output_rms is None:
            parts.append("model output not compared (see notes)")  # empty, or shapes differ
        elif overall is not None:
            parts.append(f"model output SQNR {overall:.2f} dB")
            if self.output_degenerate:
                rule = _collapse_text(self.model_output_rms, self.activation_rms,
                                      _UPSTREAM if self.model_output_reference_rms is not None
                                      else _WHOLE_MODEL)
                parts[-1] += f" (meaningless: float output collapsed, {rule})"
        llm = self.llm_summary()
        if llm:
            parts.append(llm)
        if self.rows and verdict:
            parts.append(self.verdict.text)
        below = [r.name for r in self.rows if r.below_floor]
        if below:
            parts.append(f"{len(below)} {'layer' if len(below) == 1 else 'layers'} far below "
                         f"{'its' if len(below) == 1 else 'their'} floor SQNR: {_some(below)}")
        dead = [r.name for r in self.degenerate_rows]
        if dead:
            one = len(dead) == 1
            judged = any(r.reference_rms is not None for r in self.degenerate_rows)
            rule = (f"{_AS_SAVED} them" if any(
                r.legacy_degenerate is not None for r in self.degenerate_rows)
                else f"RMS 0 or < {DEGENERATE_RMS_RATIO:g} x {_UPSTREAM}" if judged
                else "RMS 0")
            parts.append(f"float signal collapsed in {len(dead)} {'layer' if one else 'layers'} "
                         f"({rule}): {_some(dead)}; "
                         f"{'its SQNR means' if one else 'their SQNRs mean'} nothing")
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} nodes unpaired")
        return "; ".join(parts)

    def sort_key(self, sort: str | None = None, top_k: int | None = None) -> tuple[str, str]:
        """The column rows are ordered by, and a note when it is not the one asked for.

        ``sort=None`` means graph order, or worst first when ``top_k`` is given. A metric
        that this report does not hold (``shadow_sqnr`` without shadows) falls back to the
        first one it holds of shadow, output, weight SQNR, and the note says so.
        """
        if sort is not None and sort not in _SORT_KEYS:
            from ..errors import InputError

            raise InputError(f"sort must be one of {', '.join(_SORT_KEYS)}, got {sort!r}")
        if top_k is not None:  # -1 dropped the last row, 0 drew an empty table
            a_count(top_k, "top_k", 1)
        if sort is None:
            sort = "graph" if top_k is None else "worst"
        if sort == "graph":
            return "graph", ""
        present = [k for k in _WORST_FIRST if any(getattr(r, k) is not None for r in self.rows)]
        if sort == "worst":
            return (present[0], "") if present else ("graph", "")
        if sort in present:
            return sort, ""
        if not present:
            return "graph", f"no {_LABELS[sort]} in this report: rows in graph order"
        return present[0], (f"no {_LABELS[sort]} in this report (comparisons: "
                             f"{', '.join(self.comparisons)}): sorted by {_LABELS[present[0]]}")

    def sorted_rows(self, sort: str | None = None, top_k: int | None = None) -> list[ReportRow]:
        """Rows in graph order, or worst first (see :meth:`sort_key`); collapsed rows last."""
        key, _ = self.sort_key(sort, top_k)
        rows = list(self.rows)
        if key != "graph":
            rows.sort(key=lambda r: (r.degenerate, worst_first_key(getattr(r, key))))
        return rows[:top_k] if top_k is not None else rows

    def diff(self, new: Report, *, tolerance_db: float = 0.5, tolerance_cosine: float = 1e-3,
             tolerance_kl: float = 0.01, tolerance_top1: float = 0.01,
             variant: str | None = None) -> ReportDiff:
        """What changed from this (old) report to ``new``, and what regressed.

        Layers pair by name; every metric of both is listed, and a change is a regression
        when an SQNR falls by more than ``tolerance_db`` dB, a cosine by more than
        ``tolerance_cosine``, the model output's ``kl`` rises by more than ``tolerance_kl``
        or its ``top1_agreement`` falls by more than ``tolerance_top1`` (see
        :mod:`fxnumeric.report.diff`). ``variant`` names the variant a report of one quantized
        model is, against a report of several.

        Example:
            >>> old = Report.from_json("baseline.json")  # doctest: +SKIP
            >>> d = old.diff(Report.from_json("report.json"), tolerance_db=1.0)  # doctest: +SKIP
            >>> print(d.table())  # doctest: +SKIP
        """
        from .diff import diff_reports

        return diff_reports(self, new, tolerance_db=tolerance_db,
                            tolerance_cosine=tolerance_cosine, tolerance_kl=tolerance_kl,
                            tolerance_top1=tolerance_top1, variant=variant)

    # ------------------------------------------------------------------ rendering
    def table(self, tablefmt: str = "simple", *, sort: str | None = None,
              top_k: int | None = None) -> str:
        """Render the rows with tabulate, then the notes and the summary line (last).

        Args:
            tablefmt: one of :data:`TABLE_FORMATS` (``simple``, ``plain``, ``github``,
                ``markdown`` ...) or any other tabulate format.
            sort: ``graph`` order, or worst first by ``output_sqnr``, ``shadow_sqnr`` or
                ``weight_sqnr``. Default: graph order, or worst first when ``top_k`` is given.
            top_k: keep only the first ``k`` rows after sorting.

        Raises:
            InputError: for a format tabulate does not know (it would draw ``simple``).
        """
        return report_table(self, tablefmt, sort=sort, top_k=top_k)

    def block_table(self, tablefmt: str = "simple") -> str:
        """The blocks (decoder layers, BERT layers, ResNet stages) as a table: the error
        entering, added in and leaving each; ``""`` when the model has none. With variants,
        each variant's table under its name."""
        return block_table(self, tablefmt)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-safe data: every field but the raw ``activations`` (schema in
        ``docs/reports.md``); :meth:`from_dict` rebuilds the report exactly.

        Beside the fields (``rows`` under ``layers``) it holds ``schema``, the ``summary``
        line, ``worst_layer``, ``culprit``, the ``verdict`` and each row's ``degenerate`` and
        ``below_floor``, for people and scripts; inf and nan are the strings ``"inf"``,
        ``"-inf"``, ``"nan"``.

        Example:
            >>> row = ReportRow("fc", "linear", True, 41.5, {"sqnr": float("inf")}, {"sqnr": 25.0})
            >>> r = Report((row,), ("sqnr",), ("weights", "outputs", "shadows"), 2, {"sqnr": 30.0})
            >>> d = r.to_dict()
            >>> d["schema"], d["layers"][0]["output"], d["worst_layer"]
            (2, {'sqnr': 'inf'}, 'fc')
            >>> Report.from_dict(d) == r
            True
        """
        return {"schema": persist.SCHEMA, **persist.to_data(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict`'s data.

        Raises:
            InputError: a newer ``schema``, a missing or unknown key, a value of the wrong
                type (the message names the key's path, ``layers[3].output.sqnr``).
        """
        return persist.load(cls, data, upgrades=_UPGRADES)

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 2) -> str:
        """Return the report as strict JSON (see :meth:`to_dict`); also write it to ``path``.

        Floats are written with all their digits, so :meth:`from_json` gives back the same
        report, bit for bit. Lists of numbers stay on one line.
        """
        text = persist.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path) -> Report:
        """Load a report saved by :meth:`to_json` (or ``fxnumeric report --json FILE``).

        Args:
            source: JSON text (it starts with ``{``) or the path of a file holding it.

        Raises:
            InputError: the file is missing, not JSON, not a report, from a newer fxnumeric,
                or a value does not fit its field; the message says which.

        Example:
            >>> r = Report((), ("sqnr",), ("outputs",), 1, {"sqnr": float("nan")})
            >>> Report.from_json(r.to_json()).model_output
            {'sqnr': nan}
        """
        return persist.load(cls, source, upgrades=_UPGRADES)

    def to_csv(self, path: str | Path) -> Path:
        """Write one CSV row per layer (metrics as columns) and return the path."""
        path = Path(path)
        path.write_text(report_csv(self))
        return path

    def to_model_explorer(self, path: str | Path) -> dict[str, Path]:
        """Write Model Explorer node data (output SQNR and shadow SQNR overlays) into the
        directory ``path``; see :mod:`fxnumeric.report.overlays`.

        Returns ``{overlay name: file}``."""
        from .overlays import write_model_explorer

        return write_model_explorer(self, path)

    def to_html(self, path: str | Path, *, histogram_layers: list[str] | int = 3,
                sensitivity: Any = None) -> Path:
        """Write a self-contained HTML page: summary, SQNR chart, weight histograms, table.

        Args:
            path: where to write.
            histogram_layers: layer names to draw weight histograms for (``[]``: none), or
                ``k >= 1`` for the ``k`` layers with the lowest weight SQNR (of each variant).
            sensitivity: a :func:`fxnumeric.sensitivity` result to chart on the same page.

        Raises:
            InputError: for a count below 1, or a name that is a row of no report (with
                variants: of no variant).
        """
        path = Path(path)
        path.write_text(report_page(self, histogram_layers=histogram_layers,
                                    sensitivity=sensitivity))
        return path

    def _repr_html_(self) -> str:
        return report_fragment(self)

    def __str__(self) -> str:
        """The table, its notes and the summary, then the blocks' table when the model has
        repeated blocks: what ``print(report)`` shows."""
        blocks = self.block_table()
        return self.table() + (f"\n\n{blocks}" if blocks else "")

    def __repr__(self) -> str:
        return f"<Report: {self.summary()}>"
