"""Several quantized variants in one report: which is best, where each loses, aligned layers.

``compare(float_model, {"fx": q1, "pt2e": q2, "dynamic": q3}, data)`` returns the first
variant's report with every variant's own report in :attr:`fxnumeric.Report.variants` and
their layers aligned in :attr:`fxnumeric.Report.aligned`. This module answers what every
rendering of such a report asks (:mod:`fxnumeric.report.render` draws the answers):

* **the best variant** (:func:`best_variant`), judged by the model output, the measure the
  user's accuracy follows: the lowest mean per-token KL when every variant has one (a
  language model's logits), else the highest model output SQNR. A variant whose value is
  ``nan``, whose float output collapsed (its SQNR measures nothing), or that quantized nothing
  (:func:`quantized_nothing`: its output is the float model's) is never best; a tie goes to
  the variant named first.
* **where a variant loses** (:func:`where_it_loses`): its culprit, or the layers that stand
  out together (:mod:`fxnumeric.report.verdict`); when none stands out, its three lowest shadow
  SQNRs (the error is spread); without shadows, its largest drop of output SQNR.
* **the aligned layers** (:func:`aligned_layers`): one :class:`AlignedLayer` per float value
  compared, in graph order, with each variant's row there. A layer that only some variants
  quantize (``nn.Linear`` under dynamic quantization, every op under FX) has rows in those
  only. It is labelled with the name most variants give it (the first variant's on a tie);
  a variant that names it otherwise keeps its own name in its row: an eager model wrapped in
  ``QuantWrapper`` says ``module.fc1``, and FX's fused ``fc1`` (``linear-relu``) compares the
  value the others' ``relu`` does, so it sits in that layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..numbers import fixed
from .verdict import blamed

if TYPE_CHECKING:
    from .data import Report, ReportRow

__all__ = ["AlignedLayer", "aligned_layers", "best_variant", "ranking", "where_it_loses",
           "output_text", "variants_summary", "quantized_nothing", "no_best_text"]

_WORST_SHOWN = 3  # lowest shadow SQNRs named when a variant's error is spread


@dataclass(frozen=True)
class AlignedLayer:
    """One layer of a multi-variant report: its label (the name most variants give it), the
    kind of the row so named, and each variant's row there."""

    name: str
    kind: str
    rows: dict[str, ReportRow]
    """``{variant: row}`` for the variants that have the layer, in the report's order."""

    def value(self, variant: str, attr: str) -> float | None:
        """``getattr(row, attr)`` of ``variant``'s row (``None`` when it has no row)."""
        row = self.rows.get(variant)
        return None if row is None else getattr(row, attr)


def aligned_layers(report: Report) -> list[AlignedLayer]:
    """The layers of a multi-variant report in graph order (``report.aligned``; a report
    built by hand without it aligns by row name, each variant's order kept). A name
    ``aligned`` holds that its variant has no row for is passed over."""
    names = list(report.variants)
    aligned = report.aligned
    if not aligned or any(len(layer) != len(names) for layer in aligned):
        aligned = _by_name(report)
    by_name = {v: {r.name: r for r in report.variants[v].rows} for v in names}
    out = []
    for layer in aligned:
        rows = {v: by_name[v][row] for v, row in zip(names, layer, strict=True)
                if row is not None and row in by_name[v]}  # an edited file: what is there
        if not rows:
            continue
        said = [row.name for row in rows.values()]
        label = max(said, key=said.count)  # the first of the most common names
        out.append(AlignedLayer(label, next(r.kind for r in rows.values() if r.name == label),
                                rows))
    return out


def _by_name(report: Report) -> tuple[tuple[str | None, ...], ...]:
    order: list[str] = []
    for variant in report.variants.values():
        after = -1
        for row in variant.rows:
            if row.name not in order:
                order.insert(after + 1, row.name)
            after = order.index(row.name)
    held = [{r.name for r in v.rows} for v in report.variants.values()]
    return tuple(tuple(name if name in rows else None for rows in held) for name in order)


def ranking(report: Report) -> tuple[str, bool] | None:
    """The model output measure variants are ranked by, and whether higher is better:
    ``("kl", False)`` when every variant has a per-token KL, else ``("sqnr", True)``;
    ``None`` when no variant has either."""
    reports = list(report.variants.values())
    if reports and all("kl" in r.model_output for r in reports):
        return "kl", False
    if any("sqnr" in r.model_output for r in reports):
        return "sqnr", True
    return None


def _score(variant: Report, measure: str) -> float | None:
    value = variant.model_output.get(measure)
    if (value is None or math.isnan(value) or (measure == "sqnr" and variant.output_degenerate)
            or quantized_nothing(variant)):
        return None
    return value


def quantized_nothing(variant: Report) -> bool:
    """Whether a variant has no quantized layer and returns the float model's output
    exactly (a recipe that matched none of the model's layers: torchao's ``quantize_`` on
    GPT-2's ``Conv1D`` layers): it is the float model, not a quantized variant to rank. A
    variant that only simulates quantization (fake-quants before ``convert``) has no quantized
    layer either, but its output differs, and it is ranked."""
    out = variant.model_output
    identical = out.get("kl") == 0.0 if "kl" in out else out.get("sqnr") == math.inf
    return identical and not any(row.quantized for row in variant.rows)


def _unranked(report: Report, name: str) -> str:
    """Why a variant has no rank, in a few words."""
    return ("quantized nothing, not ranked" if quantized_nothing(report.variants[name])
            else "not measured")


def no_best_text(report: Report) -> str:
    """Why a multi-variant report names no best variant."""
    if ranking(report) is not None and all(map(quantized_nothing, report.variants.values())):
        return "no best variant: no variant quantized anything"
    return "no best variant: no model output measured"


def standings(report: Report) -> list[tuple[str, float]]:
    """``(variant, value)`` of the ranking measure, best first (variants without one left
    out); a tie keeps the order of ``report.variants``."""
    found = ranking(report)
    if found is None:
        return []
    measure, higher = found
    scored = [(name, score) for name, v in report.variants.items()
              if (score := _score(v, measure)) is not None]
    return sorted(scored, key=lambda item: -item[1] if higher else item[1])


def best_variant(report: Report) -> str | None:
    """The best variant overall (see the module docstring), ``None`` when none is measured."""
    ranked = standings(report)
    return ranked[0][0] if ranked else None


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} dB"


def output_text(variant: Report) -> str:
    """A variant's model output in a few words: per-token KL and top-1 agreement for a
    language model, else output SQNR."""
    out = variant.model_output
    if "kl" in out:
        return (f"{variant.kl_label} {out['kl']:.4g} nats, top-1 agreement "
                f"{fixed(out.get('top1_agreement', math.nan))}")
    sqnr = out.get("sqnr")
    if sqnr is None:
        return "model output not compared"
    if variant.output_degenerate:
        return f"model output SQNR {sqnr:.2f} dB (meaningless: float output collapsed)"
    return f"model output SQNR {sqnr:.2f} dB"


def _names(names: list[str] | tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def where_it_loses(variant: Report) -> str:
    """Where one variant's report says accuracy is lost (see the module docstring)."""
    v = variant.verdict
    if v.kind in ("poisoned", "mismatch"):
        return v.text
    if v.kind == "culprit" and v.culprit is not None:
        return f"culprit {v.culprit} (shadow SQNR {_db(variant.row(v.culprit).shadow_sqnr)})"
    if v.kind == "group":
        high = variant.row(v.standouts[-1]).shadow_sqnr
        return (f"{_names(v.standouts)} stand out together (shadow SQNR {v.low:.2f}-"
                f"{_db(high)})")
    if v.kind == "spread":
        worst = ", ".join(f"{g.name} ({_db(g.shadow_sqnr)})"
                          for g in blamed(variant.rows)[:_WORST_SHOWN])
        return f"error spread over {v.layers} layers, lowest shadow SQNR at {worst}"
    if v.kind == "no shadows":
        worst_row = variant.worst_layer
        if worst_row is None:
            return "local error not measured"
        return (f"local error not measured; largest output-SQNR drop at {worst_row.name} "
                f"({_db(worst_row.output_sqnr)})")
    return "no layer adds measurable error of its own"


def _extras(variant: Report) -> str:
    """What else a variant's summary would say: layers below their floor, unpaired nodes."""
    parts = []
    below = [r.name for r in variant.rows if r.below_floor]
    if below:
        parts.append(f"{len(below)} far below their floor ({', '.join(below[:3])}"
                     + (" ...)" if len(below) > 3 else ")"))
    if variant.unmatched:
        parts.append(f"{len(variant.unmatched)} nodes unpaired")
    return "; " + "; ".join(parts) if parts else ""


def variants_summary(report: Report, *, where: bool = True) -> str:
    """One line for a multi-variant report: how many variants, batches and aligned layers,
    the best variant with every variant's model output, then (``where``) where each loses."""
    names = list(report.variants)
    left_out = (f" ({len(report.skipped_batches)} more left out: NaN/Inf in the input)"
                if report.skipped_batches else "")
    layers = len(aligned_layers(report))
    parts = [f"{len(names)} variants ({', '.join(names)})", f"{report.batches} batches{left_out}",
             f"{layers} layers aligned"]
    ranked = standings(report)
    measure = ranking(report)
    if ranked and measure is not None:
        best, value = ranked[0]
        unit, label = (" dB", "model output SQNR") if measure[0] == "sqnr" else (
            " nats", report.kl_label)
        others = ", ".join(f"{name} {v:.4g}{unit}" for name, v in ranked[1:])
        unranked = [n for n in names if n not in dict(ranked)]
        if unranked:
            others += (", " if others else "") + ", ".join(f"{n} {_unranked(report, n)}"
                                                            for n in unranked)
        parts.append(f"best: {best} ({label} {value:.4g}{unit}" + (f"; {others})" if others
                                                                   else ")"))
    else:
        parts.append(no_best_text(report))
    if where:
        parts += [f"{name} ({output_text(v)}): {where_it_loses(v)}{_extras(v)}"
                  for name, v in report.variants.items()]
    return "; ".join(parts)
