"""Two reports side by side: what changed per layer and model output, and what regressed.

:meth:`fxnumeric.Report.diff` (``old.diff(new)``) and ``fxnumeric diff old.json new.json``
call :func:`diff_reports`. Layers pair by name, and so do blocks (:attr:`Report.blocks`: decoder
layers, ResNet stages). Every metric of a layer present in both reports is listed (weight SQNR,
the qparams floor, each output and shadow metric), every metric of a block present in both
(each output and shadow metric, and the SQNR entering it: the output SQNR of the block before,
judged there, so listed and never judged), and every model output metric (``sqnr``,
``cosine``, ``kl``, ``top1_agreement``, ...). A change is a **regression** when it goes the bad
way by more than its tolerance:

================  ===============  ==========================================
measure           worse when       tolerance
================  ===============  ==========================================
``sqnr`` (any)    it falls         ``tolerance_db`` (dB)
``cosine``        it falls         ``tolerance_cosine``
``kl``            it rises         ``tolerance_kl`` (nats)
``top1_agreement``  it falls       ``tolerance_top1`` (fraction of tokens)
================  ===============  ==========================================

Other metrics (``mse``, ``max_abs_error``, user metrics) are listed, never judged: their
scale is the model's. A value that becomes ``nan`` is a regression; one that leaves ``inf``
(identical outputs) for any finite value falls by ``inf`` dB. A metric only one report holds
(``kl`` before an LLM run added it, shadows turned off) is listed with ``None`` on the other
side and never judged, and rows (layers or blocks) whose float signal collapsed
(:attr:`ReportRow.degenerate`, :attr:`BlockRow.degenerate`) in either report are never judged
either: their numbers measure nothing. Nor is the model output when the two reports read
different parts of it (:attr:`Report.model_output_part`: a model that returns several tensors
and changed which comes first): its changes are listed, and
:attr:`ReportDiff.model_output_parts` says which parts were read.

Reports of several quantized variants (:attr:`fxnumeric.Report.variants`) diff variant by
variant: each variant both reports hold against itself, its changes carrying its name
(:attr:`MetricChange.variant`), its layers and blocks listed as ``variant: layer``; the
variants only one report holds are listed as new or vanished. A report of one quantized model
against one of several variants: ``variant=`` names which of them it is (the report of one
model does not know which of your variants it was made from), and the others are listed as
new (or vanished); a report of one variant pairs with the other without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from .data import BlockRow, Report, ReportRow

__all__ = ["ReportDiff", "MetricChange", "diff_reports"]

_HIGHER_IS_BETTER = {"sqnr": True, "cosine": True, "top1_agreement": True, "kl": False}
_ROW_SCALARS = {"weight_sqnr": "sqnr", "floor_sqnr": "floor"}  # row field: the measure it is
_ROW_DICTS = ("output", "shadow")
_BLOCK_SCALARS = {"entering": "entering"}  # block field: the measure it is (never judged)


@dataclass(frozen=True)
class MetricChange:
    """One metric of one layer (``layer=None``: the model output) in the old and new report.

    ``metric`` is ``weight_sqnr``, ``floor_sqnr``, ``output.<name>`` or ``shadow.<name>`` for a
    layer, ``entering``, ``output.<name>`` or ``shadow.<name>`` for a block (``block`` is
    true, and ``layer`` is the block's name), the ``model_output`` key (``sqnr``, ``kl`` ...)
    for the model output. ``old`` or ``new`` is ``None`` where that report does not hold the
    metric. ``variant`` names the quantized variant of a multi-variant report (``None``
    otherwise).
    """

    layer: str | None
    metric: str
    old: float | None
    new: float | None
    regression: bool = False
    variant: str | None = None
    block: bool = False

    @property
    def measure(self) -> str:
        """What is measured, without where: ``sqnr``, ``cosine``, ``kl``, ``floor``,
        ``entering`` ..."""
        scalars = _BLOCK_SCALARS if self.block else _ROW_SCALARS
        if self.metric in scalars:
            return scalars[self.metric]
        return self.metric.rpartition(".")[2]

    @property
    def change(self) -> float | None:
        """``new - old`` (0 for equal values, inf and NaN included: a NaN that stayed NaN is
        unchanged, as reports compare; None when either is missing)."""
        if self.old is None or self.new is None:
            return None
        if self.old == self.new or (math.isnan(self.old) and math.isnan(self.new)):
            return 0.0
        return self.new - self.old

    @property
    def label(self) -> str:
        """``output SQNR``, ``shadow cosine``, ``weight SQNR``, ``kl``, ``block output SQNR``,
        ``block entering SQNR`` ... as tables show it."""
        where, _, what = self.metric.rpartition(".")
        if self.block and self.metric in _BLOCK_SCALARS:
            where, what = self.metric, "sqnr"
        elif not self.block and self.metric in _ROW_SCALARS:
            where, what = self.metric.split("_")
        what = "SQNR" if what == "sqnr" else what
        label = f"{where} {what}" if where else what
        return f"block {label}" if self.block else label

    def __str__(self) -> str:
        def v(x: float | None) -> str:
            return "-" if x is None else f"{x:.4g}"

        unit = " dB" if self.measure in ("sqnr", "floor", "entering") else ""
        change = "" if self.change is None else f" ({self.change:+.4g}{unit})"
        where = f"{self.variant}: " if self.variant is not None else ""
        return (f"{where}{self.layer if self.layer is not None else 'model output'} "
                f"{self.label}: {v(self.old)} -> {v(self.new)}{unit}{change}")


@dataclass(frozen=True)
class ReportDiff:
    """What changed from an old report to a new one, and which changes are regressions.

    ``changes`` lists the model output first, then every layer present in both reports
    (``layers``), in the new report's order, then every block present in both (``blocks``);
    ``new_layers`` and ``new_blocks`` are only in the new report, ``vanished_layers`` and
    ``vanished_blocks`` only in the old one. Build it with :meth:`fxnumeric.Report.diff`.

    Example:
        >>> from fxnumeric.report import Report, ReportRow
        >>> def report(shadow):
        ...     row = ReportRow("fc", "linear", True, 40.0, {"sqnr": 30.0}, {"sqnr": shadow})
        ...     return Report((row,), ("sqnr",), ("outputs", "shadows"), 1, {"sqnr": 30.0})
        >>> d = report(35.0).diff(report(31.0), tolerance_db=1.0)
        >>> d.regressed, [str(c) for c in d.regressions]
        (True, ['fc shadow SQNR: 35 -> 31 dB (-4 dB)'])
    """

    changes: tuple[MetricChange, ...]
    new_layers: tuple[str, ...] = ()
    vanished_layers: tuple[str, ...] = ()
    tolerance_db: float = 0.5
    tolerance_cosine: float = 1e-3
    tolerance_kl: float = 0.01
    tolerance_top1: float = 0.01
    new_variants: tuple[str, ...] = ()
    """Quantized variants only the new report holds (multi-variant reports)."""
    vanished_variants: tuple[str, ...] = ()
    """Quantized variants only the old report holds."""
    layers: tuple[str, ...] = ()
    """The layers both reports hold (``variant: layer`` with variants), metrics or not."""
    blocks: tuple[str, ...] = ()
    """The blocks both reports hold (``variant: block`` with variants)."""
    new_blocks: tuple[str, ...] = ()
    """Blocks only the new report holds."""
    vanished_blocks: tuple[str, ...] = ()
    """Blocks only the old report holds."""
    model_output_parts: tuple[str, str] | None = None
    """``(old, new)`` :attr:`~fxnumeric.Report.model_output_part` when the two reports read
    different parts of the model's output (``""``: its only tensor); the model output's
    changes are then not judged: they compare two different tensors."""

    @property
    def regressions(self) -> tuple[MetricChange, ...]:
        """The changes worse than their tolerance, in the order of :attr:`changes`."""
        return tuple(c for c in self.changes if c.regression)

    @property
    def regressed(self) -> bool:
        """Whether any metric regressed beyond its tolerance."""
        return any(c.regression for c in self.changes)

    @property
    def model_output(self) -> tuple[MetricChange, ...]:
        """The model output's changes."""
        return tuple(c for c in self.changes if c.layer is None)

    def change(self, layer: str | None, metric: str, variant: str | None = None) -> MetricChange:
        """The change of ``metric`` at ``layer`` (``None``: the model output), in ``variant``
        for multi-variant reports (default: the first variant holding it).

        Raises:
            InputError: no such layer and metric in both reports.
        """
        for c in self.changes:
            if c.layer == layer and c.metric == metric and variant in (None, c.variant):
                return c
        held = sorted({c.metric for c in self.changes if c.layer == layer})
        where = "the model output" if layer is None else f"layer {layer!r}"
        raise InputError(f"no {metric!r} for {where} in this diff; it holds: "
                         f"{', '.join(held) or 'nothing (not a layer of both reports)'}. "
                         "Fix: pick one of those (ReportDiff.table(changed_only=False) "
                         "lists every change)")

    @property
    def tolerances(self) -> str:
        """The tolerances, as one phrase."""
        return (f"{self.tolerance_db:g} dB SQNR, {self.tolerance_cosine:g} cosine, "
                f"{self.tolerance_kl:g} KL, {self.tolerance_top1:g} top-1 agreement")

    def summary(self) -> str:
        """One line: how many layers (and blocks) compared, new, vanished, and the
        regressions."""
        layers = len(self.layers)
        variants = len({c.variant for c in self.changes if c.variant is not None})
        blocks = (f" and {len(self.blocks)} block{'s' if len(self.blocks) != 1 else ''}"
                  if self.blocks else "")
        parts = [f"{layers} layer{'s' if layers != 1 else ''}{blocks} in both reports"
                 + (f" (over {variants} variants)" if variants > 1 else "")]
        if self.new_variants:
            parts.append(f"new variants: {_names(self.new_variants)}")
        if self.vanished_variants:
            parts.append(f"vanished variants: {_names(self.vanished_variants)}")
        if self.new_layers:
            parts.append(f"{len(self.new_layers)} new ({_names(self.new_layers)})")
        if self.vanished_layers:
            parts.append(f"{len(self.vanished_layers)} vanished ({_names(self.vanished_layers)})")
        for what, names in (("new", self.new_blocks), ("vanished", self.vanished_blocks)):
            if names:
                parts.append(f"{len(names)} {what} block{'s' if len(names) > 1 else ''} "
                             f"({_names(names)})")
        worse = self.regressions
        if worse:
            listed = "; ".join(str(c) for c in worse[:4]) + (" ..." if len(worse) > 4 else "")
            parts.append(f"{len(worse)} regression{'s' if len(worse) > 1 else ''} beyond "
                         f"tolerance: {listed}")
        else:
            parts.append("no regression beyond tolerance")
        if self.model_output_parts is not None:
            old, new = (f"`output{part}`" if part else "the model's only output"
                        for part in self.model_output_parts)
            parts.append(f"model output not judged: the old report read {old}, the new one "
                         f"{new}")
        return "; ".join(parts)

    def table(self, tablefmt: str = "simple", *, changed_only: bool = True) -> str:
        """A tabulate table of the changes (regressions marked), then the summary line.

        Args:
            tablefmt: any tabulate format.
            changed_only: leave out metrics whose value did not change at all.
        """
        from .render import diff_table

        return diff_table(self, tablefmt, changed_only=changed_only)

    def to_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML page (styled like the report page) and return the path."""
        from .render import diff_page

        path = Path(path)
        path.write_text(diff_page(self))
        return path

    def __repr__(self) -> str:
        return f"<ReportDiff: {self.summary()}>"


def _names(names: tuple[str, ...], most: int = 5) -> str:
    return ", ".join(names[:most]) + (" ..." if len(names) > most else "")


def _row_metrics(row: ReportRow) -> dict[str, float | None]:
    values: dict[str, float | None] = {k: getattr(row, k, None) for k in _ROW_SCALARS}
    for part in _ROW_DICTS:
        values.update({f"{part}.{k}": v for k, v in getattr(row, part).items()})
    return values


def _block_metrics(block: BlockRow) -> dict[str, float | None]:
    values: dict[str, float | None] = {k: getattr(block, k) for k in _BLOCK_SCALARS}
    for part in _ROW_DICTS:
        values.update({f"{part}.{k}": v for k, v in getattr(block, part).items()})
    return values


def _worse(measure: str, old: float | None, new: float | None, tolerance: float | None) -> bool:
    """Whether ``new`` is worse than ``old`` by more than ``tolerance`` (None: not judged)."""
    if tolerance is None or old is None or new is None or measure not in _HIGHER_IS_BETTER:
        return False
    if math.isnan(new) or math.isnan(old):
        return math.isnan(new) and not math.isnan(old)
    if old == new:
        return False
    loss = old - new if _HIGHER_IS_BETTER[measure] else new - old
    return loss > tolerance


def diff_reports(old: Report, new: Report, *, tolerance_db: float = 0.5,
                 tolerance_cosine: float = 1e-3, tolerance_kl: float = 0.01,
                 tolerance_top1: float = 0.01, variant: str | None = None) -> ReportDiff:
    """Compare ``old`` with ``new`` metric by metric; see the module docstring for the rules.

    ``variant``: with one report of a single quantized model and the other of several
    variants, the variant the single one is.

    Raises:
        InputError: a negative or nan tolerance; a single report against several variants
            without ``variant`` (or with one the other report does not hold); ``variant``
            where not exactly one report holds variants.
    """
    tolerances = {"sqnr": tolerance_db, "cosine": tolerance_cosine, "kl": tolerance_kl,
                  "top1_agreement": tolerance_top1}
    for name, value in tolerances.items():
        if not value >= 0:
            raise InputError(f"the {name} tolerance must be >= 0, got {value!r}")
    if variant is not None and bool(old.variants) == bool(new.variants):
        held = "both hold variants, diffed variant by variant" if old.variants else (
            "each is of a single quantized model")
        raise InputError(
            f"variant={variant!r} says which variant a report of a single quantized model is, "
            f"against a report of several; these two reports {held}.\nFix: leave variant out "
            "(fxnumeric diff without --variant)")
    if old.variants or new.variants:
        return _diff_variants(old, new, variant, tolerance_db=tolerance_db,
                              tolerance_cosine=tolerance_cosine, tolerance_kl=tolerance_kl,
                              tolerance_top1=tolerance_top1)

    def changes(layer: str | None, old_values: dict, new_values: dict,
                judged: bool, block: bool = False) -> list[MetricChange]:
        out = []
        for metric in dict.fromkeys([*old_values, *new_values]):
            o, n = old_values.get(metric), new_values.get(metric)
            if o is None and n is None:
                continue
            c = MetricChange(layer, metric, o, n, block=block)
            regression = judged and _worse(c.measure, o, n, tolerances.get(c.measure))
            out.append(replace(c, regression=regression))
        return out

    def by_name(olds: Sequence[Any], news: Sequence[Any], metrics: Callable[[Any], dict],
                block: bool = False) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """Add the changes of the rows (layers or blocks) both hold, by name, to ``found``;
        ``(names in both, new names, vanished names)``. A collapsed row is not judged."""
        before = {r.name: r for r in olds}
        after = {r.name for r in news}
        for row in news:
            if row.name in before:
                prev = before[row.name]
                found.extend(changes(row.name, metrics(prev), metrics(row),
                                     judged=not (row.degenerate or prev.degenerate),
                                     block=block))
        return (tuple(r.name for r in news if r.name in before),
                tuple(r.name for r in news if r.name not in before),
                tuple(r.name for r in olds if r.name not in after))

    parts = (old.model_output_part, new.model_output_part)
    found = changes(None, old.model_output, new.model_output,
                    judged=not (old.output_degenerate or new.output_degenerate)
                    and parts[0] == parts[1])
    layers, new_layers, vanished_layers = by_name(old.rows, new.rows, _row_metrics)
    blocks, new_blocks, vanished_blocks = by_name(old.blocks, new.blocks, _block_metrics,
                                                  block=True)
    return ReportDiff(
        changes=tuple(found), new_layers=new_layers, vanished_layers=vanished_layers,
        tolerance_db=tolerance_db, tolerance_cosine=tolerance_cosine,
        tolerance_kl=tolerance_kl, tolerance_top1=tolerance_top1,
        layers=layers, blocks=blocks, new_blocks=new_blocks, vanished_blocks=vanished_blocks,
        model_output_parts=parts if parts[0] != parts[1] else None,
    )


def _diff_variants(old: Report, new: Report, variant: str | None,
                   **tolerances: float) -> ReportDiff:
    """:func:`diff_reports` of reports of which one at least holds variants (module docstring)."""
    def alone(report: Report) -> dict[str, Report]:
        """A report's variants; one of a single quantized model is the variant named
        ``variant`` of the other (its only one, unnamed)."""
        if report.variants:
            return dict(report.variants)
        names = list((old if report is new else new).variants)
        if variant is None and len(names) == 1:
            return {names[0]: report}
        if variant not in names:
            raise InputError(
                f"one report holds {len(names)} variants ({', '.join(names)}) and the other a "
                "single quantized model, which does not record which of them it is"
                + (f"; variant={variant!r} is none of them" if variant is not None else "")
                + f". Say which: diff(..., variant={names[0]!r}) (fxnumeric diff --variant "
                f"{names[0]})")
        return {variant: report}

    olds, news = alone(old), alone(new)
    changes: list[MetricChange] = []
    named: dict[str, list[str]] = {key: [] for key in _NAMED}
    for name, after in news.items():
        before = olds.get(name)
        if before is None:
            continue
        found = diff_reports(before, after, **tolerances)
        changes += [replace(c, variant=name) for c in found.changes]
        for key in _NAMED:
            named[key] += [f"{name}: {layer}" for layer in getattr(found, key)]
    return ReportDiff(
        changes=tuple(changes), **{key: tuple(v) for key, v in named.items()},
        new_variants=tuple(n for n in news if n not in olds),
        vanished_variants=tuple(n for n in olds if n not in news), **tolerances)


_NAMED = ("layers", "new_layers", "vanished_layers", "blocks", "new_blocks", "vanished_blocks")
"""ReportDiff's fields of layer and block names (``variant: name`` with variants)."""
