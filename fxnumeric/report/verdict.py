"""Is there a culprit? Name a layer only when it stands out from the rest.

The shadow SQNR of a layer is the error it adds by itself (its float twin fed the same
dequantized input). The layer with the lowest shadow SQNR always exists; it is a *culprit* only
when it is separated from every other layer by more than two things:

* a margin that means something in dB, :data:`CULPRIT_MARGIN_DB` (6 dB: the culprit adds at
  least four times the noise power of any other layer, one bit's worth). Healthy int8 layers
  differ by 10-15 dB among themselves (a conv reads 31-35 dB, an add 40-48 dB), so the lowest
  of sixty such layers sits a fraction of a dB below the next: it is the bottom of a spread,
  not a fault. A layer with a wrong scale, a weight step 40x too coarse or a lost bias reads
  15-30 dB below the rest.
* the batch-to-batch noise: each row keeps the spread of its per-batch SQNR
  (:class:`fxnumeric.metrics.Spread`); the gap between the two layers' *mean per-batch* SQNR
  (the statistic the noise describes) must exceed :data:`NOISE_SIGMAS` standard errors of the
  difference, ``sqrt(se_lowest**2 + se_next**2)``, and be at least the margin too (treating the
  two layers as independent overstates the noise when they rise and fall together: the rule
  errs towards naming no one). The pooled gap alone is not enough: one odd batch (a single
  sample with a large value) pulls a pooled SQNR, summed over every batch's energy, far below
  the layer's typical value, and a healthy layer read as a culprit. With one batch there is no
  spread: the margin alone decides and the verdict says that the noise is unknown (so it does
  in a report saved before rows kept their spread, whatever its number of batches).

A spread was chosen over a bootstrap interval because it streams (four floats per row, flat
memory over any number of batches) and needs no stored per-batch values.

A quantize is its reader's: a row that holds only the rounding its readers asked for (an op
computing in float whose value they read quantized, :attr:`ReportRow.rounded_for`) is ranked
as those readers' error, and they are named; keeping the op that row belongs to float would
not remove the rounding (an X86 GELU in front of a Linear with an outlier input channel named
the GELU, where keeping it float left the output at 19.69 dB and keeping the Linear float gave
39.98 dB). A layer read from several rows (its own, its input quantize's) stands at the lowest.

When no single layer stands out, the lowest two or three may stand out *together* (two faulty
layers): they are named as a group, with no single culprit. Otherwise the error is spread: the
verdict says over how many layers, in what range, which layers are within noise of the lowest,
and how far the output reads below every layer (not read from a float output that collapsed:
the verdict says it collapsed instead). Such an output is not called accumulation: one layer's
small error amplified by the layers after it reads the same in shadow SQNRs (each layer's error
against its own output), and only quantizing layers alone (:func:`fxnumeric.sensitivity`) tells
the two apart. NaN/Inf inside a model poison the sums: no
culprit is named from them. Nor where a quantized layer returns another shape than its float
twin fed the same input (torch's 4-bit quantized ``Embedding`` does): that layer is broken,
its error is not measured, and every layer after it reads what it returned.

An error at the level of float32's rounding is no error: a layer whose shadow SQNR reads
:data:`~fxnumeric.metrics.ROUNDING_SQNR_DB` (114.4 dB, :func:`fxnumeric.metrics.rounding_sqnr`:
float32's ``eps`` with a margin of 4 bits) or more computes what its float twin computes, up to
the order its sums are taken in (an fp16 dynamic Linear whose weights fp16 holds exactly reads
145 dB). It is neither a culprit nor one of the layers an error is spread over; when every
layer is such, the verdict is ``"no error"``. The numbers in the rows are left as measured.

A layer whose weight SQNR reads below :data:`~fxnumeric.metrics.TWIN_WEIGHT_SQNR_DB` (0 dB: its
quantized weight is not a copy of its float twin's) is named with the pairing called suspect
(:func:`suspect_pairing`): its float twin may be another layer (a model renamed or missing a
layer that pairing could not tell), or its weights are broken. Either way its shadow SQNR does
not measure quantization: a hand-built model whose branch ``p1`` paired with the other
branch's float layer read -10.00 dB and was named culprit, where each branch reads 36.6-36.8 dB
against its own twin.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..metrics import ROUNDING_SQNR_DB, TWIN_WEIGHT_SQNR_DB

if TYPE_CHECKING:
    from .data import Report, ReportRow

__all__ = ["Verdict", "verdict", "adds_error", "blamed", "compares_detections", "suspect_pairing",
           "CULPRIT_MARGIN_DB", "NOISE_SIGMAS", "MAX_GROUP", "ACCUMULATION_DB"]

CULPRIT_MARGIN_DB = 6.0
"""How far (dB of shadow SQNR) a culprit must sit below every other layer: 4x the noise power."""

NOISE_SIGMAS = 3.0
"""How many standard errors of the difference a gap must exceed to be more than batch noise."""

MAX_GROUP = 3
"""The most layers that can stand out together; more than that is a spread."""

ACCUMULATION_DB = 3.0
"""Output SQNR this far below the lowest shadow SQNR: the error grows past any layer's own
(accumulated, or one layer's amplified downstream: :data:`_GROWS`)."""


@dataclass(frozen=True)
class Verdict:
    """What a report concludes about where error enters.

    Attributes:
        kind: ``"culprit"`` (one layer stands out), ``"group"`` (two or three stand out
            together), ``"spread"`` (none stands out), ``"poisoned"`` (NaN/Inf in the
            sums), ``"mismatch"`` (a quantized layer returns another shape than its float
            twin fed the same input), ``"no shadows"`` (local error not measured),
            ``"no error"`` (no layer adds measurable error of its own: every shadow SQNR is
            ``inf`` or at float32's rounding, :func:`adds_error`, and so does the output),
            ``"unlocated"`` (no layer adds measurable error, yet the output does: it enters
            where no row compares it, an unpaired node or code inside a module compared
            whole).
        culprit: the layer that stands out, or ``None``.
        standouts: the layers that stand out (the culprit, the group, or the layers whose
            shapes differ); ``()`` otherwise.
        ties: layers within batch noise of the lowest (including it); ``()`` when there are
            none or the noise is unknown (one batch, or no spread saved).
        layers: how many layers add measurable error of their own (:func:`adds_error`).
        low: the lowest shadow SQNR in dB (``None`` without any).
        high: the highest finite shadow SQNR in dB.
        gap: dB between the last layer that stands out (or the lowest) and the next one up.
        noise: the noise that gap was held against (``NOISE_SIGMAS`` standard errors), in dB;
            ``None`` with one batch, or rows without a spread (an older report file).
        text: the verdict in words, as the summary shows it.
    """

    kind: str
    culprit: str | None
    standouts: tuple[str, ...]
    ties: tuple[str, ...]
    layers: int
    low: float | None
    high: float | None
    gap: float | None
    noise: float | None
    text: str


def adds_error(sqnr: float | None) -> bool:
    """Whether an SQNR (dB) measures an error: finite, and below float32's rounding
    (:data:`~fxnumeric.metrics.ROUNDING_SQNR_DB`); ``None`` and NaN do not.

    >>> adds_error(35.0), adds_error(145.4), adds_error(math.inf), adds_error(None)
    (True, False, False, False)
    """
    return sqnr is not None and not math.isnan(sqnr) and sqnr < ROUNDING_SQNR_DB


def suspect_pairing(row: ReportRow) -> str:
    """What to say of ``row`` whose weight SQNR reads below
    :data:`~fxnumeric.metrics.TWIN_WEIGHT_SQNR_DB`: its weights are not a quantized copy of
    its float twin's, so that twin is suspect; ``""`` for any other row."""
    weight = row.weight_sqnr
    if weight is None or math.isnan(weight) or weight >= TWIN_WEIGHT_SQNR_DB:
        return ""
    return (f"weight SQNR {weight:.2f} dB: its weights are not a quantized copy of its float "
            f"twin's (quantizing reads well above {TWIN_WEIGHT_SQNR_DB:g} dB), so the pairing is "
            f"suspect: another layer's float twin, or broken weights "
            f"(fxnumeric.match(float_model, quant_model).explain({row.name!r}))")


def _suspects(rows: list[ReportRow]) -> str:
    """The verdict's caveat for named layers whose pairing is suspect (:func:`suspect_pairing`)."""
    named = [r for r in rows if suspect_pairing(r)]
    if not named:
        return ""
    weights = ", ".join(f"{r.name} {r.weight_sqnr:.2f} dB" for r in named)
    return (f"; but the pairing is suspect: weight SQNR {weights}, where a quantized copy of a "
            f"float twin's weights reads well above {TWIN_WEIGHT_SQNR_DB:g} dB: "
            f"{'its' if len(named) == 1 else 'their'} float twin may be another layer (see "
            "the row's note)")


def _stderr(row: ReportRow) -> float | None:
    spread = row.spread.get("shadow_sqnr")
    return spread.stderr if spread is not None and spread.known else None


def _noise(a: ReportRow, b: ReportRow) -> float | None:
    """``NOISE_SIGMAS`` standard errors of the difference of two rows' shadow SQNR."""
    sa, sb = _stderr(a), _stderr(b)
    if sa is None or sb is None:
        return None
    return NOISE_SIGMAS * math.hypot(sa, sb)


def _separated(lower: ReportRow, upper: ReportRow) -> tuple[bool, float, float | None]:
    """Whether ``lower`` stands apart from ``upper``; the pooled gap and the noise (dB)."""
    gap = upper.shadow_sqnr - lower.shadow_sqnr  # type: ignore[operator]
    noise = _noise(lower, upper)
    if gap < CULPRIT_MARGIN_DB:
        return False, gap, noise
    if noise is None:
        return True, gap, noise
    typical = _mean(upper) - _mean(lower)  # the gap on the statistic the noise describes
    return typical >= CULPRIT_MARGIN_DB and typical > noise, gap, noise


def _noise_unknown(report: Report, rows: list[ReportRow]) -> str:
    """Why the batch noise of ``rows`` is unknown: one batch, no spread in the report (a file
    saved before rows kept one), or too few batches with a finite SQNR."""
    if report.batches <= 1:
        return "1 batch"
    if any("shadow_sqnr" not in r.spread for r in rows):
        return (f"{report.batches} batches, but no per-batch spread in this report (saved by an "
                "older fxnumeric)")
    return "under 2 batches with a finite shadow SQNR"


def _mean(row: ReportRow) -> float:
    spread = row.spread["shadow_sqnr"]  # known: _noise found both spreads
    return spread.mean


def _names(names: list[str] | tuple[str, ...], most: int = 3) -> str:
    """``a, b and c``; past ``most + 1`` names, ``a, b, c and 4 more``."""
    if len(names) > most + 1:
        return ", ".join(names[:most]) + f" and {len(names) - most} more"
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def compares_detections(part: str) -> bool:
    """Whether a model-output part (:attr:`~fxnumeric.report.Report.model_output_part`) is
    a detector's boxes (torchvision's detection models return ``[{"boxes", "labels",
    "scores"}, ...]``), which
    come sorted by score: compared index by index, a reorder among near-tied scores reads as
    error no layer made."""
    return part.endswith("['boxes']")


def _accumulation(report: Report, low: float) -> str:
    output = report.model_output.get("sqnr")
    if output is None or not math.isfinite(output) or output > low - ACCUMULATION_DB:
        return ""
    if report.output_degenerate:  # its SQNR measures nothing: no accumulation read from it
        return (f"; the output reads {output:.2f} dB, but its float signal collapsed: that "
                "SQNR measures nothing")
    if compares_detections(report.model_output_part):
        return (f"; the output reads {output:.2f} dB while no layer alone reads below "
                f"{low:.2f} dB, but it is detections compared index by index "
                f"(`output{report.model_output_part}`): boxes that come in another order "
                "among near-tied scores read as error, so this is not read as accumulation")
    unpaired = len(report.unmatched)
    if unpaired:  # an op no row compares may add it (`y * 0.5` on one side only)
        where = "the unpaired node" if unpaired == 1 else f"the {unpaired} unpaired nodes"
        return (f"; the output reads {output:.2f} dB while no layer alone reads below "
                f"{low:.2f} dB: {_GROWS}, or it enters at {where}, which no row "
                "compares (report.unmatched)")
    return (f"; the output reads {output:.2f} dB while no layer alone reads below {low:.2f} dB: "
            f"{_GROWS}")


_GROWS = ("the error grows past what any layer adds, accumulated over many layers or one "
          "layer's amplified downstream, which shadow SQNRs cannot tell apart "
          "(fxnumeric.sensitivity can: each layer quantized alone)")
"""Why an output reads below every layer's own SQNR. Shadow SQNRs hold each layer's error
against its own output, not against what it does to the model's: MiniLM under torchao's
Int8WeightOnlyConfig reads 23.65 dB at the output and 39.75 dB or more in every layer, and
was said to accumulate its error, where quantizing ``encoder.layer.0.output.dense`` alone
(shadow SQNR 45.8 dB) gives 23.41 dB and all but it 31.69 dB."""


def _outside(report: Report) -> str:
    """Where error no row measures can enter: the unpaired nodes, and the code of modules
    compared whole (their attention, say), for :func:`verdict`'s ``"unlocated"``."""
    unpaired = len(report.unmatched)
    return (f" ({unpaired} unpaired {'node' if unpaired == 1 else 'nodes'}: "
            "report.unmatched; or code inside a module compared whole)" if unpaired
            else " (code inside a module compared whole, or an op no row holds)")


@dataclass(frozen=True)
class _Layer:
    """A layer the verdict can blame, read from the lowest row that measures its error: its
    own row, or the row of an op whose value is handed on through the input quantize the
    layer asked for (:attr:`ReportRow.rounded_for`: keeping that op float leaves the
    rounding; keeping the layer float removes it). Quacks like a row for :func:`_separated`.
    """

    row: ReportRow
    names: tuple[str, ...]

    @property
    def shadow_sqnr(self) -> float | None:
        return self.row.shadow_sqnr

    @property
    def spread(self) -> dict:
        return self.row.spread

    @property
    def name(self) -> str:
        return _names(self.names)


def _ranked(rows: Iterable[ReportRow]) -> list[ReportRow]:
    """The live rows that add measurable error of their own, lowest shadow SQNR first."""
    return sorted((r for r in rows if not r.degenerate and adds_error(r.shadow_sqnr)),
                  key=lambda r: r.shadow_sqnr)  # type: ignore[arg-type, return-value]


def blamed(rows: Iterable[ReportRow]) -> list[_Layer]:
    """The layers to blame among ``rows``, lowest shadow SQNR first: each measured by the
    lowest row that holds its error, a row holding its readers' input quantize
    (``rounded_for``) standing for those readers; rows adding no measurable error and
    collapsed rows left out. ``.name`` and ``.shadow_sqnr`` read as a row's."""
    found: dict[tuple[str, ...], ReportRow] = {}
    for row in _ranked(rows):
        found.setdefault(row.rounded_for or (row.name,), row)
    return [_Layer(row, names) for names, row in found.items()]


def _handed(layer: _Layer) -> str:
    """Where the error of readers blamed for their input quantize was measured; ``""`` for a
    layer read from its own row."""
    row = layer.row
    if not row.rounded_for:
        return ""
    return (f"{'its' if len(layer.names) == 1 else 'their'} input quantize, measured in the row "
            f"of {row.name} ({row.kind}), which computes in float and hands on the rounding "
            f"{layer.name} asked for: keeping {row.name} float would not remove it")


def _who(layer: _Layer, kinds: dict[str, str]) -> str:
    """``name (kind, shadow SQNR x dB``, the open parenthesis the verdict's text goes on in."""
    low = layer.shadow_sqnr
    if not layer.row.rounded_for:
        return f"{layer.name} ({layer.row.kind}, shadow SQNR {low:.2f} dB"
    kind = "/".join(dict.fromkeys(kinds.get(n, "?") for n in layer.names))
    return f"{layer.name} ({kind}, shadow SQNR {low:.2f} dB of {_handed(layer)}"


def _within_noise(first: _Layer, layers: list[_Layer]) -> tuple[str, ...]:
    """The names of ``layers`` whose shadow SQNR is within the batch noise of ``first``'s,
    the lowest (``first`` among them)."""
    low = first.shadow_sqnr
    return tuple(dict.fromkeys(
        n for g in layers
        if g is first or (d := _noise(first, g)) is not None  # type: ignore[arg-type]
        and g.shadow_sqnr - low <= d  # type: ignore[operator]
        for n in g.names))


def verdict(report: Report) -> Verdict:
    """Apply the rule of this module to ``report`` (see the module docstring)."""
    live = [r for r in report.rows if not r.degenerate]
    poisoned = [r.name for r in live
                if any(v is not None and math.isnan(v) for v in (r.output_sqnr, r.shadow_sqnr))]
    if report.nonfinite or poisoned:
        where = "; ".join(f"first at {layer} in the {side} model"
                          for side, layer in report.nonfinite) or f"first at {poisoned[0]}"
        return Verdict("poisoned", None, (), (), 0, None, None, None, None,
                       f"no culprit named: NaN/Inf inside the model poison the sums ({where})")
    mismatched = [r for r in report.rows if r.shadow_shapes is not None]
    if mismatched:
        names = tuple(r.name for r in mismatched)
        float_shape, quant_shape = mismatched[0].shadow_shapes  # type: ignore[misc]
        return Verdict(
            "mismatch", None, names, (), 0, None, None, None, None,
            f"no culprit named: {_names(list(names))} "
            f"{'returns' if len(names) == 1 else 'return'} another shape than "
            f"{'its float twin' if len(names) == 1 else 'their float twins'} fed the same input "
            f"(float {float_shape} vs quantized {quant_shape} at {names[0]}): the quantized "
            "layer computes something else (or fxnumeric paired the wrong ops: "
            "fxnumeric.match(...).explain(name)), and every number after it measures that")
    if not any(r.shadow_sqnr is not None for r in report.rows):
        worst = report.worst_layer
        hint = f"; the largest output-SQNR drop is at {worst.name}" if worst else ""
        why = ("no layer could be shadowed (each row's note says why)"
               if "shadows" in report.comparisons else "add 'shadows' to comparisons")
        return Verdict("no shadows", None, (), (), 0, None, None, None, None,
                       "no culprit named: the error each layer adds was not measured "
                       f"({why}){hint}")
    ranked = _ranked(live)
    rounding = [r.name for r in live if r.shadow_sqnr is not None
                and math.isfinite(r.shadow_sqnr) and not adds_error(r.shadow_sqnr)]
    output = report.model_output.get("sqnr")
    # a collapsed row's SQNR measures nothing: the error may enter there, unread
    if (not ranked and output is not None and adds_error(output)
            and not report.output_degenerate and len(live) == len(report.rows)):
        return Verdict("unlocated", None, (), (), 0, None, None, None, None,
                       f"no culprit named: no compared layer adds measurable error of its own, "
                       f"yet the output reads {output:.2f} dB: the error enters where no row "
                       f"compares it{_outside(report)}")
    if not ranked:
        exact = (f" ({_names(rounding)} {'differs' if len(rounding) == 1 else 'differ'} from "
                 f"{'its float twin' if len(rounding) == 1 else 'their float twins'} only at "
                 f"float32 rounding, shadow SQNR {ROUNDING_SQNR_DB:.1f} dB or more)"
                 if rounding else "")
        return Verdict("no error", None, (), (), 0, None, None, None, None,
                       "no layer named as culprit: no layer adds measurable error of its own"
                       + exact)
    low, high = ranked[0].shadow_sqnr, ranked[-1].shadow_sqnr
    assert low is not None and high is not None
    kinds = {r.name: r.kind for r in report.rows}
    # a row holding its readers' input quantize blames them (ReportRow.rounded_for)
    layers = blamed(ranked)
    first = layers[0]
    if len(layers) == 1 and len(first.names) == 1:
        unpaired = len(report.unmatched)
        only = ("only layer that adds error of its own" if not unpaired else
                "only compared layer that adds error of its own; no row compares the "
                f"{'unpaired node' if unpaired == 1 else f'{unpaired} unpaired nodes'} "
                "(report.unmatched)")
        return Verdict("culprit", first.names[0], first.names, (), 1, low, high, None, None,
                       f"culprit: {_who(first, kinds)}), the "
                       f"{only}" + _suspects([first.row]) + _accumulation(report, low))
    for k in range(1, min(MAX_GROUP, len(layers) - 1) + 1):
        apart, gap, noise = _separated(layers[k - 1], layers[k])  # type: ignore[arg-type]
        if not apart:
            continue
        nxt = layers[k]
        if k == 1 and len(first.names) == 1:
            unknown = (f"; {_noise_unknown(report, [first.row, nxt.row])}: the batch noise "
                       "is unknown" if noise is None else "")
            return Verdict(
                "culprit", first.names[0], first.names, (), len(layers), low, high, gap, noise,
                f"culprit: {_who(first, kinds)}{'; ' if first.row.rounded_for else ', '}"
                f"{gap:.2f} dB "
                f"below any other layer; next {nxt.name} at {nxt.shadow_sqnr:.2f} dB{unknown})"
                + _suspects([first.row]) + _accumulation(report, low))
        group = layers[:k]
        names = tuple(dict.fromkeys(n for g in group for n in g.names))
        ties = _within_noise(first, group)
        within = (f"; {_names(list(ties))} are within noise of each other"
                  if len(ties) > 1 else "")
        where = "".join(f"; {g.name}: {g.shadow_sqnr:.2f} dB is {_handed(g)}"
                        for g in group if g.row.rounded_for)
        return Verdict(
            "group", None, names, ties if len(ties) > 1 else (), len(layers), low, high, gap,
            noise,
            f"no single culprit: {_names(list(names))} stand out together (shadow SQNR "
            f"{low:.2f}-{group[-1].shadow_sqnr:.2f} dB; the rest from {nxt.shadow_sqnr:.2f} dB)"
            f"{within}{where}" + _suspects([g.row for g in group]) + _accumulation(report, low))
    if len(layers) == 1:  # one rounding, several readers: nothing else to hold it against
        return Verdict(
            "group", None, first.names, (), 1, low, high, None, None,
            f"no single culprit: {first.name} stand out together ({_who(first, kinds)})"
            + _suspects([first.row]) + _accumulation(report, low))
    _, gap, noise = _separated(first, layers[1])  # type: ignore[arg-type]
    why = (f"within batch noise of ±{noise:.2f} dB (its per-batch values)"
           if noise is not None and gap >= CULPRIT_MARGIN_DB else
           f"a culprit needs a gap of {CULPRIT_MARGIN_DB:g} dB, and more than the batch noise")
    ties: tuple[str, ...] = ()
    if noise is not None:
        ties = _within_noise(first, layers)
    tie_text = ""
    if len(ties) > 1:
        tie_text = f"; {_names(list(ties))} are within noise"
    elif noise is None:
        tie_text = f"; {_noise_unknown(report, ranked)}: no spread across batches to tell near ties"
    return Verdict(
        "spread", None, (), ties if len(ties) > 1 else (), len(layers), low, high, gap, noise,
        f"no layer stands out: error is spread over {len(layers)} layers, shadow SQNR "
        f"{low:.2f}-{high:.2f} dB (the lowest, {first.name}, is {gap:.2f} dB below the next; "
        f"{why}){tie_text}" + (f"; {first.name}'s is {_handed(first)}" if first.row.rounded_for
                               else "") + _accumulation(report, low))
