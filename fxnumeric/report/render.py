"""Rendering, in one place: tables (tabulate), CSV, the HTML page and notebook displays.

:class:`fxnumeric.Report` and :class:`fxnumeric.Matching` hold data; their ``table``,
``to_csv``, ``to_html`` and ``_repr_html_`` methods call the functions here.

The SQNR chart is inline SVG drawn here (no plotting library, no script) and stays readable
from 10 to 500 layers:

* the bottom margin is computed from the longest label, so rotated labels are never clipped;
* labels are thinned by pixel pitch (one label per ``_LABEL_PITCH`` pixels), never overlap;
* each layer has a hover band whose ``<title>`` is its tooltip (name, kind, every SQNR);
  the chart's own ``<title>`` comes first, so it names the chart, not a layer;
* a line breaks where a value is missing (no weight line across layers without weights);
* the y axis stops at a robust top (90th percentile + 20 dB) so a 140 dB spike does not
  squash the 20-40 dB band; values above it, and ``inf``, sit as triangles on the top edge,
  ``-inf`` on the bottom edge, each with its value in the tooltip.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

if TYPE_CHECKING:
    from ..advice.search import Sensitivity
    from ..match import Matching
    from .data import Report, ReportRow, WeightHistogram
    from .diff import MetricChange, ReportDiff

__all__ = [
    "report_columns", "report_table", "report_csv", "report_page", "report_fragment",
    "matching_table", "matching_fragment", "sqnr_chart", "histogram_svg", "html_table",
    "sensitivity_svg", "sensitivity_section", "sensitivity_page", "diff_table", "diff_page",
]

Column = tuple[str, Callable[["ReportRow"], Any], bool]  # header, value, numeric

_SERIES = (  # attribute, label, colour
    ("output_sqnr", "output SQNR (cumulative)", "#1f77b4"),
    ("shadow_sqnr", "shadow SQNR (local)", "#d62728"),
    ("weight_sqnr", "weight SQNR", "#2ca02c"),
)
_FONT = 10  # px, chart labels
_LABEL_PITCH = _FONT + 3  # px between two x labels at least
_CHAR_W = 0.62 * _FONT  # px, a generous average glyph width for sans-serif
_MAX_LABEL = 40  # characters; longer names are shortened (the tooltip has them whole)


# ---------------------------------------------------------------- report tables


def report_columns(report: Report) -> list[Column]:
    """The report's columns: layer, kind, then what its comparisons measured, then notes."""
    cols: list[Column] = [("layer", lambda r: r.name, False), ("kind", lambda r: r.kind, False)]
    if "weights" in report.comparisons:
        cols.append(("weight SQNR", lambda r: r.weight_sqnr, True))
    if "outputs" in report.comparisons:
        for m in report.metrics:
            label = "output SQNR" if m == "sqnr" else m
            cols.append((label, lambda r, m=m: r.output.get(m), True))
    if "shadows" in report.comparisons:
        cols.append(("shadow SQNR", lambda r: r.shadow.get("sqnr"), True))
        for m in report.metrics:
            if m != "sqnr" and m not in ("cosine", "mse", "max_abs_error"):
                cols.append((f"shadow {m}", lambda r, m=m: r.shadow.get(m), True))
    if any(r.flags for r in report.rows):  # set by fxnumeric.diagnose's annotate()
        cols.append(("flags", lambda r: ", ".join(r.flags), False))
    cols.append(("note", lambda r: r.notes, False))
    return cols


def report_table(report: Report, tablefmt: str = "simple", *, sort: str | None = None,
                 top_k: int | None = None) -> str:
    """The rows as a tabulate table, then ``note:`` lines, then the summary (last line)."""
    if tablefmt == "markdown":
        tablefmt = "pipe"
    _, fallback = report.sort_key(sort, top_k)
    cols = report_columns(report)
    rows = [[fn(r) for _, fn, _ in cols] for r in report.sorted_rows(sort, top_k)]
    lines = [tabulate(rows, headers=[c for c, _, _ in cols], tablefmt=tablefmt, floatfmt=".4g",
                      missingval="-")]
    lines += [f"note: {n}" for n in (*report.notes, *([fallback] if fallback else []))]
    lines.append(report.summary())
    return "\n".join(lines)


def report_csv(report: Report) -> str:
    """One CSV row per layer, metrics as columns (empty cells where nothing was measured)."""
    cols = report_columns(report)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([c for c, _, _ in cols])
    for r in report.rows:
        writer.writerow(["" if v is None else v for v in (fn(r) for _, fn, _ in cols)])
    return out.getvalue()


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool],
               row_classes: Sequence[str] | None = None) -> str:
    """An HTML table whose headers are aligned like their cells (numbers right, text left)."""
    def cls(i: int) -> str:
        return " class='num'" if numeric[i] else ""

    out = ["<table class='fxn'><thead><tr>"
           + "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(headers))
           + "</tr></thead><tbody>"]
    for k, row in enumerate(rows):
        rc = row_classes[k] if row_classes else ""
        out.append((f"<tr class='{rc}'>" if rc else "<tr>")
                   + "".join(f"<td{cls(i)}>{html.escape(_cell(v))}</td>" for i, v in enumerate(row))
                   + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _report_html_table(report: Report, rows: Sequence[ReportRow]) -> str:
    cols = report_columns(report)
    worst = report.worst_layer
    classes = ["worst" if r is worst else "collapsed" if r.degenerate else "" for r in rows]
    return html_table([c for c, _, _ in cols], [[fn(r) for _, fn, _ in cols] for r in rows],
                      [num for _, _, num in cols], classes)


_PAGE_CSS = "body{font-family:sans-serif;margin:2em;max-width:1200px}"
_CSS = (  # scoped to fxnumeric's own elements, so a notebook's styles are left alone
    "table.fxn{border-collapse:collapse;font-size:12px}"
    "table.fxn td,table.fxn th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
    "table.fxn .num{text-align:right;font-variant-numeric:tabular-nums}"
    "table.fxn tr.worst{background:#fde0dc}table.fxn tr.collapsed{color:#999}"
    ".fxn-chart{overflow-x:auto}"
)


def _notes_html(report: Report) -> str:
    return "".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in report.notes)


def report_page(report: Report, *, histogram_layers: list[str] | int = 3,
                sensitivity: Sensitivity | None = None) -> str:
    """The self-contained HTML page: summary, notes, SQNR chart, the sensitivity section
    (when given), weight histograms, table."""
    if isinstance(histogram_layers, int):
        chosen = [r for r in report.sorted_rows("weight_sqnr")
                  if r.weight_histogram is not None][:histogram_layers]
    else:
        chosen = [report.row(n) for n in histogram_layers]
    missing = [r.name for r in chosen if r.weight_histogram is None]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fxnumeric report</title>",
        f"<style>{_PAGE_CSS}{_CSS}</style></head><body>",
        "<h1>fxnumeric report</h1>",
        f"<p>{html.escape(report.summary())}</p>",
        _notes_html(report),
        f"<p>torch {html.escape(report.torch_version)}; comparisons: "
        f"{html.escape(', '.join(report.comparisons))}</p>",
        "<h2>SQNR per layer</h2>",
        "<p>Hover over a layer for its values. Where the red line dips, error enters; where "
        "only the blue line falls, it is inherited.</p>",
        f"<div class='fxn-chart'>{sqnr_chart(report.rows)}</div>",
        sensitivity_section(sensitivity) if sensitivity is not None else "",
        "<h2>Weight histograms</h2>",
    ]
    if missing:
        parts.append(f"<p>No weights to draw for: {html.escape(', '.join(missing))}.</p>")
    if not chosen:
        parts.append("<p>No weight comparison in this report (run compare with comparisons "
                     "including 'weights').</p>")
    for r in chosen:
        if r.weight_histogram is not None:
            parts.append(f"<h3>{html.escape(r.name)} (weight SQNR {_cell(r.weight_sqnr)} dB)</h3>")
            parts.append(histogram_svg(r.weight_histogram))
    parts += ["<h2>Layers</h2>", _report_html_table(report, report.rows), "</body></html>"]
    return "\n".join(parts)


def report_fragment(report: Report, *, max_rows: int = 200) -> str:
    """What a notebook shows for a report: summary, notes, the chart and the table."""
    rows = list(report.rows)
    more = len(rows) - max_rows
    tail = (f"<p>... {more} more layers: report.table() or report.to_html(path) shows all.</p>"
            if more > 0 else "")
    return (f"<div><style>{_CSS}</style>"
            f"<p><b>fxnumeric report</b>: {html.escape(report.summary())}</p>"
            f"{_notes_html(report)}<div class='fxn-chart'>{sqnr_chart(report.rows)}</div>"
            f"{_report_html_table(report, rows[:max_rows])}{tail}</div>")


# ---------------------------------------------------------------- matching


def _matching_rows(m: Matching) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [
        (p.name, p.kind, ", ".join(p.float_nodes), ", ".join(p.quant_nodes), "")
        for p in m.pairs
    ]
    rows += [(u.node, u.kind, u.node, "-", u.reason) for u in m.unmatched_float]
    rows += [(u.node, u.kind, "-", u.node, u.reason) for u in m.unmatched_quant]
    if _shows_found_by(m):  # some pairs are modules paired whole: say how each was found
        found = [p.found_by for p in m.pairs] + ["-"] * (len(rows) - len(m.pairs))
        rows = [(*r[:4], how, r[4]) for r, how in zip(rows, found, strict=True)]
    return rows


_MATCH_HEADERS = ("name", "kind", "float nodes", "quantized nodes", "unpaired because")


def _shows_found_by(m: Matching) -> bool:
    return bool(m.untraced) or any(p.found_by != "graph" for p in m.pairs)


def _matching_headers(m: Matching) -> tuple[str, ...]:
    if not _shows_found_by(m):
        return _MATCH_HEADERS
    return (*_MATCH_HEADERS[:4], "found by", _MATCH_HEADERS[4])


def _kept_whole_text(m: Matching) -> str:
    """The modules torch.fx could not trace, for models captured through the module tree."""
    if not m.untraced:
        return ""
    names = ", ".join(f"`{path or '<root>'}`" for path, _ in m.untraced[:8])
    more = " ..." if len(m.untraced) > 8 else ""
    return (f"{len(m.untraced)} modules torch.fx could not trace are kept whole (their children "
            f"are compared, the code of their own forward is not): {names}{more}")


def matching_coverage_text(m: Matching) -> str:
    """``coverage of quantized ops 97%``, or ``n/a`` when the quantized graph has none."""
    if m.quantized_ops == 0:
        return "coverage of quantized ops n/a (the quantized model has no quantized op)"
    return f"coverage of quantized ops {m.coverage:.0%}"


def matching_summary(m: Matching) -> str:
    """One line: pairs, unpaired nodes, coverage."""
    return (f"{len(m.pairs)} pairs, {len(m.unmatched_float)} float and "
            f"{len(m.unmatched_quant)} quantized nodes unpaired, {matching_coverage_text(m)}")


def matching_table(m: Matching, tablefmt: str = "simple", *, around_misses: bool = False) -> str:
    """Pairs and misses as a tabulate table, the summary line, and optionally explanations."""
    text = tabulate(_matching_rows(m), headers=_matching_headers(m), tablefmt=tablefmt)
    text += "\n" + matching_summary(m)
    if m.untraced:
        text += "\n" + _kept_whole_text(m)
    for side, note in m.capture_notes:
        text += f"\ncapture ({side}): {note}"
    if around_misses:
        for u in (*m.unmatched_float, *m.unmatched_quant):
            text += f"\n\naround `{u.node}`:\n" + m.explain(u.node, tablefmt=tablefmt)
    return text


def explain_table(rows: Sequence[tuple[str, str, str, str]], tablefmt: str = "simple") -> str:
    """The rows of :meth:`Matching.explain` (float nodes, kind, quantized nodes, note)."""
    return tabulate(rows, headers=("float", "kind", "quantized", ""), tablefmt=tablefmt)


def matching_fragment(m: Matching) -> str:
    """What a notebook shows for a matching: the summary and the pairing table."""
    return (f"<div><style>{_CSS}</style>"
            f"<p><b>fxnumeric matching</b>: {html.escape(matching_summary(m))}</p>"
            + html_table(_matching_headers(m), _matching_rows(m),
                         [False] * len(_matching_headers(m))) + "</div>")


# ---------------------------------------------------------------- SVG charts


def _ceil10(v: float) -> float:
    return 10.0 * math.ceil(v / 10.0)


def _floor10(v: float) -> float:
    return 10.0 * math.floor(v / 10.0)


def _y_range(values: list[float]) -> tuple[float, float]:
    """Axis bottom and top in dB: from min(0, lowest) to a top that ignores far outliers."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return 0.0, 50.0
    p90 = finite[min(len(finite) - 1, int(0.9 * len(finite)))]
    top = _ceil10(min(finite[-1], p90 + 20.0) + 1e-9)
    bottom = min(0.0, _floor10(finite[0]))
    return bottom, max(top, bottom + 10.0)


def _label(name: str) -> str:
    return name if len(name) <= _MAX_LABEL else name[: _MAX_LABEL - 1] + "\u2026"


def _db_text(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf (identical)" if v > 0 else "-inf (zero signal)"
    return f"{v:.2f} dB"


def _tooltip(r: ReportRow) -> str:
    lines = [f"{r.name} ({r.kind})"]
    lines += [f"{label}: {_db_text(getattr(r, attr))}" for attr, label, _ in _SERIES
              if getattr(r, attr) is not None]
    if r.notes:
        lines.append(r.notes)
    return html.escape("\n".join(lines))


def sqnr_chart(rows: Sequence[ReportRow], width: int = 1100, plot_height: int = 260) -> str:
    """SVG line chart of output, shadow and weight SQNR per layer, in graph order."""
    n = len(rows)
    values = [getattr(r, a) for r in rows for a, _, _ in _SERIES]
    if not any(v is not None and not math.isnan(v) for v in values):
        return "<p>No SQNR values to plot.</p>"
    lo, hi = _y_range([v for v in values if v is not None])
    left, right, top = 56, 24, 44
    label_chars = max((len(_label(r.name)) for r in rows), default=0)
    bottom = 12 + int(label_chars * _CHAR_W) + 8
    height = top + plot_height + bottom
    plot_w = width - left - right
    pitch = plot_w / max(n, 1)  # one column per layer; the point sits in its middle
    stride = max(1, math.ceil(_LABEL_PITCH / pitch))
    y0 = top + plot_height

    def x_of(i: int) -> float:
        return left + (i + 0.5) * pitch

    def y_of(v: float) -> float:
        v = min(max(v, lo), hi)
        return y0 - (v - lo) * plot_height / (hi - lo)

    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='fxn-sqnr' width='{width}' "
        f"height='{height}' viewBox='0 0 {width} {height}' font-family='sans-serif' "
        f"role='img' aria-label='SQNR per layer'>",
        "<title>SQNR per layer (dB)</title>",
        "<style>.col{fill:#000;fill-opacity:0}.col:hover{fill-opacity:.07}</style>",
    ]
    # legend, in the top margin
    lx = left
    for _, label, colour in _SERIES:
        out.append(f"<rect x='{lx}' y='8' width='10' height='10' fill='{colour}'/>"
                   f"<text x='{lx + 14}' y='17' font-size='{_FONT + 1}'>{label}</text>")
        lx += 24 + int(len(label) * _CHAR_W * 1.1)
    out.append(f"<path d='M{lx} 18 l5 -9 l5 9 z' fill='#555'/><text x='{lx + 14}' y='17' "
               f"font-size='{_FONT + 1}'>above {hi:g} dB (inf: identical)</text>")
    # axes and gridlines every 10 dB (every 20 when the range is wide)
    step = 10 if hi - lo <= 120 else 20
    tick = lo
    while tick <= hi + 1e-9:
        y = y_of(tick)
        out.append(f"<line x1='{left}' y1='{y:.1f}' x2='{width - right}' y2='{y:.1f}' "
                   f"stroke='#eee'/><text x='{left - 6}' y='{y + 3.5:.1f}' font-size='{_FONT}' "
                   f"text-anchor='end'>{tick:g} dB</text>")
        tick += step
    out.append(f"<line x1='{left}' y1='{y0}' x2='{width - right}' y2='{y0}' stroke='#888'/>"
               f"<line x1='{left}' y1='{top}' x2='{left}' y2='{y0}' stroke='#888'/>")
    # one polyline per run of on-axis values; a missing (None, nan) or off-axis value (inf,
    # above the top, below the bottom) ends a run, so no line claims a value it does not have;
    # off-axis values are triangles on the edge, and every on-axis value is a dot
    dots = n <= 150
    for attr, _, colour in _SERIES:
        run: list[str] = []
        runs: list[list[str]] = []
        for i, r in enumerate(rows):
            v = getattr(r, attr)
            on_axis = v is not None and lo <= v <= hi
            if not on_axis:
                if run:
                    runs.append(run)
                run = []
            if v is None or math.isnan(v):
                continue
            x = x_of(i)
            if v > hi:
                out.append(f"<path class='over' d='M{x - 4:.1f} {top + 7:.1f} "
                           f"l4 -7 l4 7 z' fill='{colour}'/>")
            elif v < lo:
                out.append(f"<path class='under' d='M{x - 4:.1f} {y0 - 7:.1f} l4 7 l4 -7 z' "
                           f"fill='{colour}'/>")
            else:
                run.append(f"{x:.1f},{y_of(v):.1f}")
        if run:
            runs.append(run)
        for pts in runs:
            if len(pts) > 1:
                out.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.5' "
                           f"points='{' '.join(pts)}'/>")
            if dots or len(pts) == 1:
                for pt in pts:
                    x, y = pt.split(",")
                    out.append(f"<circle cx='{x}' cy='{y}' r='{2 if dots else 2.5}' "
                               f"fill='{colour}'/>")
    # x labels, thinned by pitch; rotated to read upwards, ending at the axis
    for i, r in enumerate(rows):
        if i % stride:
            continue
        x, y = x_of(i), y0 + 8
        out.append(f"<text class='xlabel' x='{x:.1f}' y='{y}' font-size='{_FONT}' "
                   f"text-anchor='end' dy='0.35em' transform='rotate(-90 {x:.1f} {y})'>"
                   f"{html.escape(_label(r.name))}</text>")
    # hover bands with the tooltips, on top of everything
    for i, r in enumerate(rows):
        out.append(f"<rect class='col' x='{left + i * pitch:.1f}' y='{top}' "
                   f"width='{pitch:.2f}' height='{plot_height}'>"
                   f"<title>{_tooltip(r)}</title></rect>")
    if stride > 1:
        out.append(f"<text x='{width - right}' y='{top - 8}' font-size='{_FONT}' "
                   f"text-anchor='end' fill='#666'>{n} layers, 1 in {stride} labelled; hover "
                   "for the others</text>")
    out.append("</svg>")
    return "\n".join(out)


def histogram_svg(h: WeightHistogram, width: int = 560, plot_height: int = 150) -> str:
    """Float (blue) and dequantized quantized (orange) weights over the same bins, with axes."""
    bins = len(h.float_counts)
    occupied = {i for i, c in enumerate(h.float_counts) if c} | {
        i for i, c in enumerate(h.quant_counts) if c}
    if len(occupied) <= 1:
        return (f"<p>All {sum(h.float_counts)} weights fall in one bin near {h.low:.4g}: "
                "nothing to draw.</p>")
    peak = max(max(h.float_counts, default=0), max(h.quant_counts, default=0), 1)
    left, right, top, bottom = 56, 16, 24, 34
    plot_w = width - left - right
    height = top + plot_height + bottom
    y0 = top + plot_height
    bw = plot_w / max(bins, 1)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='fxn-hist' width='{width}' "
           f"height='{height}' font-family='sans-serif' role='img' "
           f"aria-label='weight histogram'><title>weight histogram</title>",
           f"<rect x='{left}' y='6' width='10' height='10' fill='#1f77b4'/>"
           f"<text x='{left + 14}' y='15' font-size='{_FONT}'>float</text>"
           f"<rect x='{left + 60}' y='6' width='10' height='10' fill='#ff7f0e'/>"
           f"<text x='{left + 74}' y='15' font-size='{_FONT}'>quantized (dequantized)</text>"]
    for frac in (0.0, 0.5, 1.0):
        y = y0 - frac * plot_height
        out.append(f"<line x1='{left}' y1='{y:.1f}' x2='{width - right}' y2='{y:.1f}' "
                   f"stroke='#eee'/><text x='{left - 6}' y='{y + 3.5:.1f}' font-size='{_FONT}' "
                   f"text-anchor='end'>{round(frac * peak):d}</text>")
    for counts, colour, offset in ((h.float_counts, "#1f77b4", 0.0),
                                   (h.quant_counts, "#ff7f0e", bw / 2)):
        for i, c in enumerate(counts):
            if c:
                bh = c * plot_height / peak
                out.append(f"<rect x='{left + i * bw + offset:.1f}' y='{y0 - bh:.1f}' "
                           f"width='{bw / 2:.2f}' height='{bh:.1f}' fill='{colour}'>"
                           f"<title>{c} weights</title></rect>")
    out.append(f"<line x1='{left}' y1='{y0}' x2='{width - right}' y2='{y0}' stroke='#888'/>"
               f"<line x1='{left}' y1='{top}' x2='{left}' y2='{y0}' stroke='#888'/>")
    ticks = [(h.low, "start"), (h.high, "end")]
    if h.low < 0 < h.high:
        ticks.append((0.0, "middle"))
    for v, anchor in ticks:
        x = left + (v - h.low) / (h.high - h.low) * plot_w
        out.append(f"<line x1='{x:.1f}' y1='{y0}' x2='{x:.1f}' y2='{y0 + 4}' stroke='#888'/>"
                   f"<text x='{x:.1f}' y='{y0 + 16}' font-size='{_FONT}' "
                   f"text-anchor='{anchor}'>{v:.3g}</text>")
    out.append(f"<text x='{left + plot_w / 2:.0f}' y='{height - 4}' font-size='{_FONT}' "
               "text-anchor='middle'>weight value</text>")
    out.append(f"<text x='12' y='{top + plot_height / 2:.0f}' font-size='{_FONT}' "
               f"text-anchor='middle' transform='rotate(-90 12 {top + plot_height / 2:.0f})'>"
               "count</text>")
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------- sensitivity (fxnumeric.advise)


def sensitivity_svg(sens: Sensitivity, width: int = 1100, plot_height: int = 260) -> str:
    """An inline SVG chart of a :class:`Sensitivity`: both hybrids per layer, in graph order.

    Blue: the quantized model with only this layer float (higher: floating it helps more);
    red: the float model with only this layer quantized (lower: it hurts more); dashed: the
    quantized model. Non-finite values (an exact output gives ``inf`` dB) sit on the top edge.
    """
    layers = sens.layers
    series = [("#1f77b4", [s.all_but for s in layers]), ("#d62728", [s.only for s in layers])]
    values = [v for _, vs in series for v in vs if math.isfinite(v)]
    values += [sens.quantized] if math.isfinite(sens.quantized) else []
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.05 or 1.0
    low, high = low - pad, high + pad
    label_h = min(200, 7 * max((len(s.module) for s in layers), default=4))
    left, top = 60, 10
    plot_w = width - left - 80  # room for the last rotated labels
    step = plot_w / max(len(layers), 1)

    def x(i: int) -> float:
        return left + step * (i + 0.5)

    def y(v: float) -> float:
        if not math.isfinite(v):
            return top if v > 0 or math.isnan(v) else top + plot_height
        return top + plot_height * (high - v) / (high - low)

    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' "
             f"height='{top + plot_height + label_h + 10}' font-family='sans-serif' "
             "font-size='10'>",
             f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_height}' fill='none' "
             "stroke='#999'/>"]
    for k in range(5):
        v = low + (high - low) * k / 4
        parts.append(f"<text x='{left - 4}' y='{y(v) + 3:.1f}' text-anchor='end'>{v:.4g}</text>")
    if math.isfinite(sens.quantized):
        parts.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{y(sens.quantized):.1f}' "
                     f"y2='{y(sens.quantized):.1f}' stroke='#555' stroke-dasharray='4 3'/>")
    for color, vs in series:
        for i, v in enumerate(vs):
            if math.isnan(v):
                continue
            name = html.escape(layers[i].module)
            parts.append(f"<circle cx='{x(i):.1f}' cy='{y(v):.1f}' r='3' fill='{color}'>"
                         f"<title>{name}: {v:.4g}</title></circle>")
    every = max(1, math.ceil(12 / step))  # keep labels 12 px apart
    for i, layer in enumerate(layers):
        if i % every == 0:
            ly = top + plot_height + 6
            parts.append(f"<text x='{x(i):.1f}' y='{ly}' transform='rotate(60 {x(i):.1f} {ly})'>"
                         f"{html.escape(layer.module)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def sensitivity_section(sens: Sensitivity) -> str:
    """The sensitivity part of a page: heading, legend, chart, table."""
    return (
        "<h2>Sensitivity</h2>"
        f"<p>{html.escape(repr(sens))}. Each layer's end metric ({html.escape(sens.metric)}) "
        "with <span style='color:#1f77b4'>&#9679; all but this layer quantized</span> and "
        "<span style='color:#d62728'>&#9679; only this layer quantized</span>; dashed: the "
        "quantized model.</p>"
        f"<div class='fxn-chart'>{sensitivity_svg(sens)}</div>{sens.table(tablefmt='html')}"
    )


def sensitivity_page(sens: Sensitivity) -> str:
    """A self-contained HTML page for a :class:`fxnumeric.Sensitivity`."""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>fxnumeric sensitivity"
            f"</title><style>{_PAGE_CSS}{_CSS}</style></head><body>"
            f"{sensitivity_section(sens)}</body></html>\n")


# ---------------------------------------------------------------- diffs (Report.diff)

_DIFF_HEADERS = ("layer", "metric", "old", "new", "change", "")
_DIFF_NUMERIC = (False, False, True, True, True, False)


def _diff_rows(diff: ReportDiff, changed_only: bool) -> tuple[list[MetricChange], int]:
    """The changes to show (every regression, the rest unless unchanged) and how many are not."""
    shown = [c for c in diff.changes
             if c.regression or not changed_only or c.change is None or c.change != 0.0]
    return shown, len(diff.changes) - len(shown)


def _diff_cells(c: MetricChange) -> list[Any]:
    return [c.layer if c.layer is not None else "(model output)", c.label, c.old, c.new,
            c.change, "REGRESSION" if c.regression else ""]


def _diff_layer_lines(diff: ReportDiff) -> list[str]:
    lines = [f"new layers: {', '.join(diff.new_layers)}"] if diff.new_layers else []
    if diff.vanished_layers:
        lines.append(f"vanished layers: {', '.join(diff.vanished_layers)}")
    return lines


def diff_table(diff: ReportDiff, tablefmt: str = "simple", *, changed_only: bool = True) -> str:
    """The changes as a tabulate table (regressions marked), new and vanished layers, the
    tolerances, then the summary (last line)."""
    if tablefmt == "markdown":
        tablefmt = "pipe"
    shown, hidden = _diff_rows(diff, changed_only)
    lines = [tabulate([_diff_cells(c) for c in shown], headers=_DIFF_HEADERS,
                      tablefmt=tablefmt, floatfmt=".4g", missingval="-")] if shown else []
    if hidden:
        lines.append(f"{hidden} metrics unchanged" + (" (not shown)" if shown else ""))
    lines += _diff_layer_lines(diff)
    lines.append(f"tolerances: {diff.tolerances}")
    lines.append(diff.summary())
    return "\n".join(lines)


def diff_page(diff: ReportDiff, *, changed_only: bool = True) -> str:
    """A self-contained HTML page for a :class:`~fxnumeric.report.diff.ReportDiff`, styled like
    the report page: summary, regressions, new and vanished layers, every change."""
    shown, hidden = _diff_rows(diff, changed_only)

    def table(changes: Sequence[MetricChange]) -> str:
        return html_table(_DIFF_HEADERS, [_diff_cells(c) for c in changes], _DIFF_NUMERIC,
                          ["worst" if c.regression else "" for c in changes])

    worse = diff.regressions
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fxnumeric diff</title>",
        f"<style>{_PAGE_CSS}{_CSS}</style></head><body>",
        "<h1>fxnumeric diff</h1>",
        f"<p>{html.escape(diff.summary())}</p>",
        f"<p>Tolerances: {html.escape(diff.tolerances)}.</p>",
        f"<h2>Regressions ({len(worse)})</h2>",
        table(worse) if worse else "<p>None beyond tolerance.</p>",
    ]
    for title, names in (("New layers", diff.new_layers), ("Vanished layers",
                                                           diff.vanished_layers)):
        if names:
            parts.append(f"<h2>{title} ({len(names)})</h2><p>{html.escape(', '.join(names))}</p>")
    parts.append("<h2>Changes</h2>")
    if hidden:
        parts.append(f"<p>{hidden} metrics unchanged" + (" (not shown).</p>" if shown else ".</p>"))
    parts += [table(shown) if shown else "", "</body></html>"]
    return "\n".join(parts)
