"""Rendering, in one place: tables (tabulate), CSV, the HTML page and notebook displays.

:class:`fxnumeric.Report` and :class:`fxnumeric.Matching` hold data; their ``table``,
``to_csv``, ``to_html`` and ``_repr_html_`` methods call the functions here.

The page opens with the verdict (:attr:`fxnumeric.Report.verdict`: the culprit, or that the
error is spread; the layers below their floor; the next call to make), its table sorts when a
header is clicked (a few lines of inline script, no external resource), and the CSV carries
every metric of every comparison, the spread, the floor and the notes.

The SQNR chart is inline SVG drawn here (no plotting library, no script); it scales to the
width of the page (``width='100%'`` over a ``viewBox``) and stays readable from 10 to 500 layers:

* the bottom margin is computed from the longest label, so rotated labels are never clipped;
* labels are thinned by pixel pitch (one label per ``_LABEL_PITCH`` pixels), never overlap;
* each layer has a hover band whose ``<title>`` is its tooltip (name, kind, every SQNR);
  the chart's own ``<title>`` comes first, so it names the chart, not a layer;
* a line breaks where a value is missing (no weight line across layers without weights);
* the y axis stops at a robust top (90th percentile + 20 dB) so a 140 dB spike does not
  squash the 20-40 dB band; values above it, and ``inf``, sit as triangles on the top edge,
  ``-inf`` on the bottom edge, each with its value in the tooltip;
* the floor SQNR (what each layer's qparams allow) is a dashed grey line, when it is known.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tabulate import tabulate, tabulate_formats

from ..errors import InputError
from ..numbers import shown, shown_apart
from .variants import (
    AlignedLayer,
    aligned_layers,
    no_best_text,
    output_text,
    quantized_nothing,
    standings,
    where_it_loses,
)

if TYPE_CHECKING:
    from ..advice.search import Sensitivity
    from ..match import Matching
    from .data import Report, ReportRow, WeightHistogram
    from .diff import MetricChange, ReportDiff

__all__ = [
    "report_columns", "report_table", "report_csv", "csv_columns", "report_page",
    "report_fragment", "verdict_html", "next_step",
    "matching_table", "matching_fragment", "sqnr_chart", "histogram_svg", "html_table",
    "sensitivity_svg", "sensitivity_section", "sensitivity_page", "diff_table", "diff_page",
    "line_chart", "variants_table", "variants_csv", "variants_page", "variants_fragment",
    "variants_chart",
]

Column = tuple[str, Callable[["ReportRow"], Any], bool]  # header, value, numeric

_SERIES = (  # attribute, label, colour
    ("output_sqnr", "output SQNR (cumulative)", "#1f77b4"),
    ("shadow_sqnr", "shadow SQNR (local)", "#d62728"),
    ("weight_sqnr", "weight SQNR", "#2ca02c"),
)
_FLOOR = ("floor_sqnr", "floor SQNR (its qparams allow)", "#7f7f7f")


TABLE_FORMATS = ("simple", "plain", "github", "markdown", "grid", "pipe")
"""The table formats the docs show; every other format of tabulate's works too
(``tabulate.tabulate_formats``: ``rst``, ``latex``, ``html`` ...)."""


def text_table(rows: Iterable[Sequence[Any]], headers: Sequence[str], tablefmt: str = "simple",
               *, apart: bool = False, **options: Any) -> str:
    """``tabulate(rows, headers, ...)`` in ``tablefmt`` (:func:`tabulate_format`), where a
    column of text stays as written: tabulate reads strings that look like numbers as numbers
    and rewrites them, and the layers of an ``nn.Sequential`` read ``0.0``, ``0.10`` (shown
    ``0`` and ``0.1``, the name of another layer). Values are handed over as numbers, so only
    the columns holding nothing but text are kept from its parsing. A column where a value
    would read as 1 at ``floatfmt`` while it is not (a cosine of 0.99996 read "1", as if
    exact) shows its values with the digits that tell them from 1 (:func:`shown`); with
    ``apart``, every column of numbers shows them with the digits that tell them from each
    other (:func:`shown_apart`: a ranking of cosines 0.99984 and 0.99982 read 0.9998 twice)."""
    rows = [list(r) for r in rows]
    columns = len(rows[0]) if rows else 0
    fmt = options.get("floatfmt", "g")
    aligned: list[str] = ["global"] * columns
    for i in range(columns):
        values = [r[i] for r in rows if isinstance(r[i], float) and math.isfinite(r[i])]
        if apart and values:
            shown_as = dict(zip(values, shown_apart(values), strict=True))
        elif any(v != 1.0 and format(v, fmt) == "1" for v in values):
            shown_as = {v: shown(v) for v in values}
        else:
            continue
        for r in rows:
            if isinstance(r[i], float):
                r[i] = shown_as.get(r[i], str(r[i]))  # nan, inf as Python writes them
        aligned[i] = "decimal"
    text = [i for i in range(columns)
            if all(r[i] is None or isinstance(r[i], str) for r in rows)]
    return tabulate(rows, headers=headers, tablefmt=tabulate_format(tablefmt),
                    disable_numparse=text, colalign=aligned, **options)


def tabulate_format(tablefmt: str) -> str:
    """The tabulate name of ``tablefmt`` (``markdown`` is tabulate's ``pipe``).

    Raises:
        InputError: for a format tabulate does not know, which it would silently draw as
            ``simple``.
    """
    if tablefmt == "markdown":
        return "pipe"
    if tablefmt not in tabulate_formats:
        raise InputError(f"unknown table format {tablefmt!r}: use one of "
                         f"{', '.join(TABLE_FORMATS)}, or another of tabulate's formats "
                         f"({', '.join(f for f in tabulate_formats if f not in TABLE_FORMATS)})")
    return tablefmt


def _series(rows: Sequence[ReportRow]) -> tuple[tuple[str, str, str], ...]:
    """The chart's lines: output, shadow and weight SQNR, and the floor when it is known."""
    return _SERIES + ((_FLOOR,) if any(r.floor_sqnr is not None for r in rows) else ())
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
        if any(_known(r, "shadow_sqnr") for r in report.rows):
            cols.append(("shadow ±dB", lambda r: _std(r, "shadow_sqnr"), True))
        for m in report.metrics:
            if m != "sqnr" and m not in ("cosine", "mse", "max_abs_error"):
                cols.append((f"shadow {m}", lambda r, m=m: r.shadow.get(m), True))
    if any(r.floor_sqnr is not None for r in report.rows):
        cols.append(("floor SQNR", lambda r: r.floor_sqnr, True))
    if any(r.flags for r in report.rows):  # set by fxnumeric.diagnose's annotate()
        cols.append(("flags", lambda r: ", ".join(r.flags), False))
    cols.append(("note", lambda r: r.notes, False))
    return cols


def _known(row: ReportRow, key: str) -> bool:
    spread = row.spread.get(key)
    return spread is not None and spread.known


def _std(row: ReportRow, key: str) -> float | None:
    """The batch-to-batch standard deviation of a row's SQNR (``None`` with one batch)."""
    return row.spread[key].std if _known(row, key) else None


def report_table(report: Report, tablefmt: str = "simple", *, sort: str | None = None,
                 top_k: int | None = None) -> str:
    """The rows as a tabulate table, then ``note:`` lines, then the summary (last line)
    (with variants: :func:`variants_table`)."""
    if report.variants:
        return variants_table(report, tablefmt, sort=sort, top_k=top_k)
    tablefmt = tabulate_format(tablefmt)
    _, fallback = report.sort_key(sort, top_k)
    cols = report_columns(report)
    rows = [[fn(r) for _, fn, _ in cols] for r in report.sorted_rows(sort, top_k)]
    lines = [text_table(rows, [c for c, _, _ in cols], tablefmt, floatfmt=".4g",
                        missingval="-")]
    lines += [f"note: {n}" for n in (*report.notes, *([fallback] if fallback else []))]
    lines.append(report.summary())
    return "\n".join(lines)


_BLOCK_HEADERS = ("block", "kind", "layers", "entering SQNR", "shadow SQNR (adds)",
                  "output SQNR (leaves)", "note")


def _block_cells(b: Any) -> list[Any]:
    return [b.name, b.kind, len(b.layers), b.entering, b.shadow_sqnr, b.output_sqnr, b.notes]


def block_table(report: Report, tablefmt: str = "simple") -> str:
    """The report's blocks as a table: the error entering each (the block before it leaves
    it), what the block adds by itself (its float twin fed its quantized input), and what
    leaves it. Empty when the model has no repeated blocks. With variants, each variant's
    table under its name."""
    tablefmt = tabulate_format(tablefmt)  # refused even when there is nothing to draw
    if report.variants:
        return "\n\n".join(f"blocks of {name}:\n{table}" for name, v in report.variants.items()
                           if (table := block_table(v, tablefmt)))
    if not report.blocks:
        return ""
    return text_table([_block_cells(b) for b in report.blocks], _BLOCK_HEADERS, tablefmt,
                      floatfmt=".4g", missingval="-")


def _blocks_html(report: Report) -> str:
    """The blocks, each with its layers under it (folded)."""
    if not report.blocks:
        return ""
    rows = {r.name: r for r in report.rows}
    cols = report_columns(report)
    parts = ["<h2>Blocks</h2>",
             "<p>Each block's <b>entering</b> SQNR is the output SQNR of the block before it "
             "in its container (the error that reaches it; none for the first), its "
             "<b>shadow</b> SQNR the error it adds by itself "
             "(the float block fed the quantized block's input), its <b>output</b> SQNR the "
             "error that leaves it. Open a block for its layers, in the order it runs them.</p>",
             html_table(_BLOCK_HEADERS, [_block_cells(b) for b in report.blocks],
                        [False, False, True, True, True, True, False],
                        ["collapsed" if b.degenerate else "" for b in report.blocks])]
    for b in report.blocks:
        layers = [rows[n] for n in b.layers if n in rows]
        shadow = "-" if b.shadow_sqnr is None else f"{b.shadow_sqnr:.2f} dB"
        if b.degenerate:
            shadow += " (meaningless: float signal collapsed)"
        parts.append(
            f"<details><summary>{html.escape(b.name)} ({html.escape(b.kind)}): adds "
            f"{shadow}, {len(layers)} layers</summary>"
            + html_table([c for c, _, _ in cols], [[fn(r) for _, fn, _ in cols] for r in layers],
                         [num for _, _, num in cols])
            + "</details>")
    return "\n".join(parts)


def csv_columns(report: Report) -> list[tuple[str, Callable[[ReportRow], Any]]]:
    """Every number the report holds per layer, as ``(column, value)``; names are snake_case.

    ``layer, kind, quantized``; ``weight_sqnr`` (with weights); ``output_<metric>`` and
    ``output_sqnr_mean/std/low/high`` (with outputs); the same with ``shadow_`` (with shadows);
    ``floor_sqnr, below_floor, floor_cause, float_rms, reference_rms, degenerate, flags, note``
    (``degenerate``: ``float_rms`` zero or under ``DEGENERATE_RMS_RATIO`` x ``reference_rms``).
    """
    cols: list[tuple[str, Callable[[ReportRow], Any]]] = [
        ("layer", lambda r: r.name), ("kind", lambda r: r.kind),
        ("quantized", lambda r: r.quantized)]
    if "weights" in report.comparisons:
        cols.append(("weight_sqnr", lambda r: r.weight_sqnr))
    for side, comparison in (("output", "outputs"), ("shadow", "shadows")):
        if comparison not in report.comparisons:
            continue
        for m in report.metrics:
            cols.append((f"{side}_{m}", lambda r, m=m, side=side: getattr(r, side).get(m)))
        for stat in ("mean", "std", "low", "high"):
            cols.append((f"{side}_sqnr_{stat}", lambda r, key=f"{side}_sqnr", stat=stat:
                         getattr(r.spread[key], stat) if key in r.spread else None))
    cols += [("floor_sqnr", lambda r: r.floor_sqnr), ("below_floor", lambda r: r.below_floor),
             ("floor_cause", lambda r: r.floor_cause),
             ("float_rms", lambda r: r.float_rms), ("reference_rms", lambda r: r.reference_rms),
             ("degenerate", lambda r: r.degenerate),
             ("flags", lambda r: " ".join(r.flags)), ("note", lambda r: r.notes)]
    return cols


def report_csv(report: Report) -> str:
    """One CSV row per layer with every metric of every comparison (:func:`csv_columns`);
    empty cells where nothing was measured, ``inf``/``nan`` as Python writes them. A last row,
    ``(model output)``, holds the model output's metrics: its ``output_<metric>`` cells, and
    the columns only it has (a language model's ``kl``, ``kl_p99``, ``kl_max``,
    ``top1_agreement``, ``ppl_float``, ``ppl_quantized``). Rows only: the report's own notes
    are in the table, the HTML page and the JSON. With variants: :func:`variants_csv`."""
    if report.variants:
        return variants_csv(report)
    cols = csv_columns(report)
    extra = [k for k in report.model_output if k not in report.metrics]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([c for c, _ in cols] + extra)
    for r in report.rows:
        writer.writerow(["" if v is None else v for v in (fn(r) for _, fn in cols)]
                        + [""] * len(extra))
    model = {"layer": "(model output)", "kind": "output",
             **{f"output_{m}": report.model_output.get(m) for m in report.metrics}}
    writer.writerow(["" if model.get(c) is None else model[c] for c, _ in cols]
                    + [report.model_output[k] for k in extra])
    return out.getvalue()


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _sort_value(v: Any) -> str:
    """What a numeric cell sorts by (``data-v``): JavaScript's number syntax; missing last,
    NaN (a poisoned layer) first, as :meth:`fxnumeric.Report.sorted_rows` orders them."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "Infinity"
    if math.isnan(v):
        return "-Infinity"
    return repr(float(v)).replace("inf", "Infinity")


def html_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool],
               row_classes: Sequence[str] | None = None, *, sortable: bool = False) -> str:
    """An HTML table whose headers are aligned like their cells (numbers right, text left).

    ``sortable``: a click on a header sorts the rows by that column (numbers by value, with
    missing values last; a second click reverses); the page needs :data:`SORT_SCRIPT` once.
    """
    def cls(i: int) -> str:
        return " class='num'" if numeric[i] else ""

    def cell(i: int, v: Any) -> str:
        key = f" data-v='{_sort_value(v)}'" if sortable and numeric[i] else ""
        return f"<td{cls(i)}{key}>{html.escape(_cell(v))}</td>"

    table_cls = "fxn fxn-sortable" if sortable else "fxn"
    hint = " title='click to sort'" if sortable else ""
    out = [f"<table class='{table_cls}'><thead><tr>"
           + "".join(f"<th{cls(i)}{hint}>{html.escape(h)}</th>" for i, h in enumerate(headers))
           + "</tr></thead><tbody>"]
    for k, row in enumerate(rows):
        rc = row_classes[k] if row_classes else ""
        out.append((f"<tr class='{rc}'>" if rc else "<tr>")
                   + "".join(cell(i, v) for i, v in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


SORT_SCRIPT = """<script>
(function () {
  document.querySelectorAll("table.fxn-sortable").forEach(function (table) {
    if (table.dataset.fxnSort) { return; }  // a notebook may run this once per output
    table.dataset.fxnSort = "1";
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.style.cursor = "pointer";
      th.addEventListener("click", function () {
        var numeric = th.classList.contains("num");
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var key = function (row) {
          var cell = row.cells[col];
          return numeric ? parseFloat(cell.dataset.v) : cell.textContent;
        };
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          return (x < y ? -1 : x > y ? 1 : 0) * dir;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
</script>"""
"""Sorts every ``table.fxn-sortable`` of the page by the clicked header (once per table)."""


def _report_html_table(report: Report, rows: Sequence[ReportRow]) -> str:
    """The report's table with a ``#`` column (graph order, so a sort can be undone)."""
    cols = report_columns(report)
    standouts = set(report.verdict.standouts)
    index = {id(r): i for i, r in enumerate(report.rows)}
    classes = ["worst" if r.name in standouts else "collapsed" if r.degenerate
               else "belowfloor" if r.below_floor else "" for r in rows]
    return html_table(["#"] + [c for c, _, _ in cols],
                      [[index[id(r)], *(fn(r) for _, fn, _ in cols)] for r in rows],
                      [True] + [num for _, _, num in cols], classes, sortable=True)


_PAGE_CSS = "body{font-family:sans-serif;margin:2em}p,ul{max-width:75em}"
_CSS = (  # scoped to fxnumeric's own elements, so a notebook's styles are left alone
    "table.fxn{border-collapse:collapse;font-size:12px}"
    "table.fxn td,table.fxn th{border:1px solid #ccc;padding:2px 6px;text-align:left}"
    "table.fxn .num{text-align:right;font-variant-numeric:tabular-nums}"
    "table.fxn tr.worst{background:#fde0dc}table.fxn tr.collapsed{color:#999}"
    "table.fxn tr.belowfloor{background:#fff3cd}"
    "table.fxn-sortable th[aria-sort=ascending]::after{content:' \\25B2'}"
    "table.fxn-sortable th[aria-sort=descending]::after{content:' \\25BC'}"
    ".fxn-chart{overflow-x:auto}.fxn-chart svg{display:block;width:100%;height:auto}"
    ".fxn-verdict{border-left:6px solid #888;background:#f6f6f6;padding:.4em 1em;margin:1em 0}"
    ".fxn-verdict.culprit,.fxn-verdict.group,.fxn-verdict.poisoned{border-color:#d62728}"
    ".fxn-verdict.spread{border-color:#1f77b4}"
    ".fxn-verdict .headline{font-size:1.25em;font-weight:bold}"
    ".fxn-verdict pre{background:#fff;border:1px solid #ddd;padding:.4em;overflow-x:auto}"
)


def _advise_target(report: Report) -> int:
    """A round target for ``advise``: the output SQNR plus about 6 dB (one bit), at least 20."""
    output = report.model_output.get("sqnr")
    if output is None or not math.isfinite(output):
        return 20
    return max(20, 5 * math.ceil((output + 6) / 5))


def next_step(report: Report) -> tuple[str, str]:
    """What to run next, as ``(why, code)``: the call that answers the verdict's question."""
    v = report.verdict
    call = "float_model, quant_model, data"
    target = _advise_target(report)
    advise = (f"fxnumeric.advise({call}, metric='sqnr', target={target})\n"
              f"# or: fxnumeric advise --model ... --quant ... --target {target}   "
              "(same --model and --quant as this report)")
    below = [r.name for r in report.rows if r.below_floor]
    if v.kind == "poisoned":
        return ("Fix the NaN/Inf first: the notes say where it appears; the other numbers "
                "cannot be trusted until then.",
                "torch.isfinite(x).all()  # on each batch, and on each layer's output")
    if v.kind == "mismatch":
        shown = ", ".join(v.standouts[:3]) + (" ..." if len(v.standouts) > 3 else "")
        return (f"Fix {shown} first: its quantized form returns another shape than the float "
                "layer. Keep it float or quantize it with a config its module supports.",
                f"fxnumeric.match(float_model, quant_model).explain({v.standouts[0]!r})")
    if v.kind == "no shadows":
        return ("Measure the error each layer adds by itself to find a culprit.",
                f"fxnumeric.compare({call}, comparisons=('weights', 'outputs', 'shadows'))")
    if v.kind in ("culprit", "group") or below:
        names = list(v.standouts) or below
        shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        return (f"Find out why {shown} loses accuracy (output scale, clipping, weight step, "
                "bias), then fix its qparams or keep it float.",
                f"fxnumeric.diagnose({call}).text()\n{advise}")
    if v.kind == "unlocated":
        return ("Find where the error enters: no compared layer adds it. Read the unpaired "
                "nodes, or compare the modules compared whole layer by layer.",
                "fxnumeric.match(float_model, quant_model).table()")
    if v.kind == "spread":
        return ("No layer stands out by the error it adds itself: the error accumulates over "
                "many layers, or one layer's is amplified downstream, which quantizing each "
                "layer alone tells apart (sensitivity). Keep the few layers that matter most "
                f"in float until the output reaches a target ({target} dB here).",
                f"fxnumeric.sensitivity({call}, metric='sqnr').table()\n{advise}")
    return ("Nothing to fix at the layer level.", f"print(fxnumeric.compare({call}))")


def _headline(report: Report) -> str:
    v = report.verdict
    if v.kind == "culprit":
        return f"Culprit: {v.culprit}"
    if v.kind == "group":
        return f"{' and '.join(v.standouts)} stand out together"
    if v.kind == "spread":
        return f"No culprit: the error is spread over {v.layers} layers"
    if v.kind == "poisoned":
        return "No culprit: NaN/Inf inside the model"
    if v.kind == "mismatch":
        return f"No culprit named: {v.standouts[0]} returns another shape than its float twin"
    if v.kind == "no shadows":
        return "No culprit named: local error not measured"
    if v.kind == "unlocated":
        return "No culprit named: the error enters where no layer is compared"
    return "No layer adds measurable error"


def verdict_html(report: Report) -> str:
    """The page's opening: the verdict, the layers below their floor, the next call to make."""
    v = report.verdict
    parts = [f"<div class='fxn-verdict {v.kind.replace(' ', '-')}'>",
             f"<p class='headline'>{html.escape(_headline(report))}</p>",
             f"<p>{html.escape(v.text[:1].upper() + v.text[1:])}.</p>"]
    below = [r for r in report.rows if r.below_floor]
    if below:
        items = "".join(f"<li>{html.escape(r.name)}: shadow SQNR {_cell(r.shadow_sqnr)} dB, "
                        f"floor {_cell(r.floor_sqnr)} dB</li>" for r in below[:10])
        more = f"<li>... and {len(below) - 10} more</li>" if len(below) > 10 else ""
        one = len(below) == 1
        parts.append(f"<p>{len(below)} {'layer reads' if one else 'layers read'} far below the "
                     f"SQNR {'its' if one else 'their'} own qparams allow (the floor): "
                     f"something beyond rounding is wrong.</p><ul>{items}{more}</ul>")
    why, code = next_step(report)
    parts.append(f"<p><b>Next:</b> {html.escape(why)}</p><pre>{html.escape(code)}</pre></div>")
    return "".join(parts)


def _legend(rows: Sequence[ReportRow]) -> str:
    floor = (" <span style='color:#7f7f7f'>Grey, dashed: the floor SQNR</span>, what the "
             "layer's own qparams allow (its output and weight steps against its signal); a "
             "red point far below it is a broken layer, one on it needs more bits."
             if any(r.floor_sqnr is not None for r in rows) else "")
    return ("<p><span style='color:#1f77b4'>Blue: output SQNR</span>, the error accumulated "
            "up to the layer (both models fed the same input). "
            "<span style='color:#d62728'>Red: shadow SQNR</span>, the error the layer adds by "
            "itself (its float twin fed the same dequantized input). "
            "<span style='color:#2ca02c'>Green: weight SQNR</span>, the rounding of its "
            "weights alone. Higher is better; one bit is worth about 6 dB. Where the red line "
            f"dips, error enters; where only the blue line falls, it is inherited.{floor} "
            "Hover over a layer for its values.</p>")


def _notes_html(report: Report) -> str:
    return "".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in report.notes)


def report_page(report: Report, *, histogram_layers: list[str] | int = 3,
                sensitivity: Sensitivity | None = None) -> str:
    """The self-contained HTML page: summary, notes, SQNR chart, the sensitivity section
    (when given), weight histograms, table (with variants: :func:`variants_page`)."""
    if report.variants:
        return variants_page(report, histogram_layers=histogram_layers, sensitivity=sensitivity)
    _check_histogram_layers(histogram_layers, [report])
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
        verdict_html(report),
        f"<p>{html.escape(report.summary(verdict=False))}</p>",
        _notes_html(report),
        f"<p>torch {html.escape(report.torch_version)}; comparisons: "
        f"{html.escape(', '.join(report.comparisons))}</p>",
        "<h2>SQNR per layer</h2>",
        _legend(report.rows),
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
    parts += [_blocks_html(report), "<h2>Layers</h2>",
              "<p>Click a column header to sort by it (again to reverse); # restores graph "
              "order. Highlighted: the layers that stand out (red), below their floor "
              "(yellow); greyed: collapsed signals (a float RMS of 0, or under a millionth of the "
              "largest activation upstream).</p>",
              _report_html_table(report, report.rows), SORT_SCRIPT, "</body></html>"]
    return "\n".join(parts)


def report_fragment(report: Report, *, max_rows: int = 200) -> str:
    """What a notebook shows for a report: summary, notes, the chart and the table."""
    if report.variants:
        return variants_fragment(report, max_rows=max_rows)
    rows = list(report.rows)
    more = len(rows) - max_rows
    tail = (f"<p>... {more} more layers: report.table() or report.to_html(path) shows all.</p>"
            if more > 0 else "")
    return (f"<div><style>{_CSS}</style>{verdict_html(report)}"
            f"<p><b>fxnumeric report</b>: {html.escape(report.summary(verdict=False))}</p>"
            f"{_notes_html(report)}<div class='fxn-chart'>{sqnr_chart(report.rows)}</div>"
            f"{_report_html_table(report, rows[:max_rows])}{tail}{SORT_SCRIPT}</div>")


# ---------------------------------------------------------------- several variants
#
# A report of compare(float_model, {"fx": q1, "dynamic": q2}, data): each rendering shows the
# aligned layers (fxnumeric.report.variants) with a column group, or a chart line, per variant.

_VARIANT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
                    "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
_VARIANT_METRICS = (  # comparison, row attribute, label
    ("weights", "weight_sqnr", "weight SQNR"),
    ("outputs", "output_sqnr", "output SQNR"),
    ("shadows", "shadow_sqnr", "shadow SQNR"),
)
# tabulate formats that draw a two-line header (variant over metric) as one header row
_STACKED_HEADERS = frozenset({
    "simple", "plain", "grid", "simple_grid", "rounded_grid", "heavy_grid", "mixed_grid",
    "double_grid", "fancy_grid", "outline", "simple_outline", "rounded_outline",
    "heavy_outline", "mixed_outline", "double_outline", "fancy_outline", "psql", "pretty",
    "presto"})


def _variant_colour(index: int) -> str:
    return _VARIANT_COLOURS[index % len(_VARIANT_COLOURS)]


def _variant_metrics(report: Report) -> list[tuple[str, str]]:
    """``(row attribute, label)`` of the SQNRs each variant's column group shows."""
    return [(attr, label) for comparison, attr, label in _VARIANT_METRICS
            if comparison in report.comparisons]


def worst_first_key(x: float | None) -> tuple[int, float]:
    """The sort key of a value, worst first: NaN and ``-inf`` (a poisoned layer: Inf in a
    layer's output reads ``-inf``, NaN in the layers after it) before every number, in graph
    order among themselves, so the layer where Inf starts leads; a missing value after."""
    if x is None:
        return 2, 0.0
    return (0, 0.0) if math.isnan(x) or x == -math.inf else (1, x)


def _variant_layers(report: Report, sort: str | None = None,
                    top_k: int | None = None) -> tuple[list[AlignedLayer], str]:
    """The aligned layers in graph order, or worst first by the worst value any variant
    has there (the column as :meth:`Report.sort_key` picks it, NaN and ``-inf`` first as in
    one report's rows: :func:`worst_first_key`); layers whose float signal collapsed last."""
    key, fallback = report.sort_key(sort, top_k)
    layers = aligned_layers(report)
    if key != "graph":
        def worst(layer: AlignedLayer) -> tuple[bool, tuple[int, float]]:
            return (all(r.degenerate for r in layer.rows.values()),
                    min(worst_first_key(getattr(row, key)) for row in layer.rows.values()))

        layers.sort(key=worst)
    return (layers[:top_k] if top_k is not None else layers), fallback


def _layer_note(layer: AlignedLayer) -> str:
    """Each variant's own name for the layer (where it differs from the label), and notes."""
    parts = []
    for variant, row in layer.rows.items():
        said = [f"named {row.name}"] if row.name != layer.name else []
        if row.notes:
            said.append(row.notes)
        if said:
            parts.append(f"{variant}: {'; '.join(said)}")
    return " | ".join(parts)


def _variant_notes(report: Report) -> list[str]:
    """The notes, each once: those every variant has, the comparison's own (float runs not
    shared), then each variant's own, prefixed with its name."""
    reports = list(report.variants.values())
    shared = [n for n in reports[0].notes if all(n in r.notes for r in reports)]
    own = [n for n in report.notes if n not in reports[0].notes]
    for name, r in report.variants.items():
        own += [f"{name}: {n}" for n in r.notes if n not in shared]
    return shared + own


def _model_output_table(report: Report) -> tuple[list[str], list[list[Any]]]:
    """Headers, and a row per variant: its model output's metrics and its rank."""
    keys: list[str] = []
    for r in report.variants.values():
        keys += [k for k in r.model_output if k not in keys]
    ranked = [name for name, _ in standings(report)]
    headers = ["variant", *("output SQNR" if k == "sqnr" else k for k in keys), "rank"]
    rows = [[name, *(r.model_output.get(k) for k in keys),
             (f"{ranked.index(name) + 1}" + (" (best)" if ranked.index(name) == 0 else ""))
             if name in ranked else "quantized nothing" if quantized_nothing(r) else "-"]
            for name, r in report.variants.items()]
    return headers, rows


def variants_table(report: Report, tablefmt: str = "simple", *, sort: str | None = None,
                   top_k: int | None = None) -> str:
    """A multi-variant report as text: the aligned layers with a column group per variant
    (output and shadow SQNR; weight SQNR when nothing else was compared), the model output
    per variant, ``note:`` lines, then the summary (last line)."""
    tablefmt = tabulate_format(tablefmt)
    joint = "\n" if tablefmt in _STACKED_HEADERS else " "
    # output and shadow SQNR: what differs between recipes; weights are in the CSV and HTML
    metrics = [m for m in _variant_metrics(report) if m[0] != "weight_sqnr"] or (
        _variant_metrics(report))
    layers, fallback = _variant_layers(report, sort, top_k)
    headers = ["layer", "kind"] + [f"{v}{joint}{label}" for v in report.variants
                                   for _, label in metrics] + ["note"]
    rows = [[layer.name, layer.kind,
             *(layer.value(v, attr) for v in report.variants for attr, _ in metrics),
             _layer_note(layer)] for layer in layers]
    out_headers, out_rows = _model_output_table(report)
    lines = [text_table(rows, headers, tablefmt, floatfmt=".4g", missingval="-"),
             "", "model output:",
             text_table(out_rows, out_headers, tablefmt, floatfmt=".4g", missingval="-")]
    lines += [f"note: {n}" for n in (*_variant_notes(report), *([fallback] if fallback else []))]
    lines.append(report.summary())
    return "\n".join(lines)


def variants_csv(report: Report) -> str:
    """One CSV row per aligned layer: ``layer`` and ``kind`` (its label), then every column
    of :func:`csv_columns` for each variant, prefixed with the variant's name (``fx_layer``,
    ``fx_output_sqnr``, ``dynamic_shadow_sqnr`` ...), empty where a variant has no such layer.
    A last row, ``(model output)``, holds each variant's model output metrics
    (``fx_output_sqnr`` ..., and ``fx_kl`` ... for a language model)."""
    names = list(report.variants)
    columns = {v: csv_columns(report.variants[v]) for v in names}
    extra = {v: [k for k in report.variants[v].model_output if k not in report.metrics]
             for v in names}
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["layer", "kind"] + [f"{v}_{c}" for v in names for c, _ in columns[v]]
                    + [f"{v}_{k}" for v in names for k in extra[v]])
    width = sum(len(extra[v]) for v in names)
    for layer in aligned_layers(report):
        cells: list[Any] = [layer.name, layer.kind]
        for v in names:
            row = layer.rows.get(v)
            cells += [None if row is None else fn(row) for _, fn in columns[v]]
        writer.writerow(["" if c is None else c for c in cells] + [""] * width)
    cells = ["(model output)", "output"]
    for v in names:
        model = report.variants[v].model_output
        cells += [model.get(c[len("output_"):]) if c.startswith("output_")
                  and c[len("output_"):] in report.metrics else None for c, _ in columns[v]]
    cells += [report.variants[v].model_output[k] for v in names for k in extra[v]]
    writer.writerow(["" if c is None else c for c in cells])
    return out.getvalue()


def _variant_tooltip(layer: AlignedLayer, metrics: list[tuple[str, str]],
                     names: list[str]) -> str:
    lines = [f"{layer.name} ({layer.kind})"]
    for v in names:
        row = layer.rows.get(v)
        if row is None:
            lines.append(f"{v}: no such layer")
            continue
        named = f" [{row.name}]" if row.name != layer.name else ""
        lines.append(f"{v}{named}: " + ", ".join(f"{label} {_db_text(getattr(row, attr))}"
                                                  for attr, label in metrics))
    return html.escape("\n".join(lines))


def variants_chart(report: Report, attr: str = "shadow_sqnr", width: int = 1100,
                   plot_height: int = 260) -> str:
    """SVG line chart of one SQNR (``output_sqnr``, ``shadow_sqnr``, ``weight_sqnr``) per
    aligned layer, one line per variant in its own colour (dashed past ten variants), broken
    where a variant has no such layer; the legend names the variants."""
    names = list(report.variants)
    layers = aligned_layers(report)
    series = [(v, _variant_colour(i), [layer.value(v, attr) for layer in layers],
               i >= len(_VARIANT_COLOURS)) for i, v in enumerate(names)]
    metrics = _variant_metrics(report)
    return line_chart([layer.name for layer in layers], series,
                      [_variant_tooltip(layer, metrics, names) for layer in layers],
                      width=width, plot_height=plot_height)


def _variants_verdict_html(report: Report) -> str:
    """The page's opening: the best variant, and where each variant loses."""
    ranked = standings(report)
    headline = f"Best: {ranked[0][0]}" if ranked else no_best_text(report).capitalize()
    items = "".join(f"<li><b>{html.escape(name)}</b> ({html.escape(output_text(r))}): "
                    f"{html.escape(where_it_loses(r))}</li>"
                    for name, r in report.variants.items())
    return (f"<div class='fxn-verdict variants'><p class='headline'>{html.escape(headline)}</p>"
            f"<ul>{items}</ul><p>Ranked by the model output: per-token KL when every variant "
            "has it, else output SQNR. Each variant's own verdict, chart and table are at the "
            "end of the page.</p></div>")


def _variants_html_table(report: Report, layers: Sequence[AlignedLayer]) -> str:
    names = list(report.variants)
    metrics = _variant_metrics(report)
    headers = ["#", "layer", "kind", *(f"{v} {label}" for v in names for _, label in metrics),
               "note"]
    rows = [[i, layer.name, layer.kind,
             *(layer.value(v, attr) for v in names for attr, _ in metrics), _layer_note(layer)]
            for i, layer in enumerate(layers)]
    numeric = [True, False, False] + [True] * (len(names) * len(metrics)) + [False]
    classes = ["collapsed" if all(r.degenerate for r in layer.rows.values()) else ""
               for layer in layers]
    return html_table(headers, rows, numeric, classes, sortable=True)


def _variants_legend(report: Report) -> str:
    names = ", ".join(f"<span style='color:{_variant_colour(i)}'>{html.escape(v)}</span>"
                      for i, v in enumerate(report.variants))
    return (f"<p>One line per variant ({names}) over the layers aligned by the float value "
            "they compare; a line breaks where a variant has no such layer (left in float, or "
            "fused into another). Output SQNR is the error accumulated up to the layer, shadow "
            "SQNR the error the layer adds by itself. Higher is better; one bit is worth about "
            "6 dB. Hover over a layer for every variant's values.</p>")


def _variants_charts(report: Report) -> str:
    parts = []
    for attr, label in _variant_metrics(report):
        if attr == "weight_sqnr":
            continue  # in the table and in each variant's own chart
        parts.append(f"<h3>{label}</h3><div class='fxn-chart'>{variants_chart(report, attr)}"
                     "</div>")
    return "".join(parts)


def _model_output_html(report: Report) -> str:
    headers, rows = _model_output_table(report)
    return html_table(headers, rows, [False] + [True] * (len(headers) - 2) + [False])


def _check_histogram_layers(histogram_layers: Any, reports: Sequence[Report]) -> None:
    """Refuse a ``histogram_layers`` the page would draw wrong without a word: a count below 1
    (a slice ``[:-1]`` drew all layers but one), a name no report has a row of (with variants,
    one that no variant has: a variant without it skips it), or neither a count nor names.

    Raises:
        InputError: naming what was passed and what ``to_html`` takes.
    """
    takes = ("histogram_layers takes a count k >= 1 (the k layers with the lowest weight SQNR) "
             "or a list of layer names ([] for none)")
    if isinstance(histogram_layers, int) and not isinstance(histogram_layers, bool):
        if histogram_layers < 1:
            raise InputError(f"histogram_layers={histogram_layers}: {takes}")
        return
    if isinstance(histogram_layers, (str, bytes)) or not isinstance(histogram_layers, Iterable):
        raise InputError(f"histogram_layers={histogram_layers!r}: {takes}")
    names = {r.name for report in reports for r in report.rows}
    for name in histogram_layers:
        if name in names:
            continue
        if len(reports) == 1:
            reports[0].row(name)  # raises, naming the rows there are
        shown = ", ".join(sorted(names)[:8]) + (" ..." if len(names) > 8 else "")
        raise InputError(f"histogram_layers names {name!r}, which is a row of no variant; "
                         f"rows are: {shown} (see Report.table())")


def _variant_histograms(variant: Report, histogram_layers: list[str] | int) -> str:
    if isinstance(histogram_layers, int):
        chosen = [r for r in variant.sorted_rows("weight_sqnr")
                  if r.weight_histogram is not None][:histogram_layers]
    else:
        chosen = [r for r in variant.rows
                  if r.name in histogram_layers and r.weight_histogram is not None]
    return "".join(f"<h4>{html.escape(r.name)} (weight SQNR {_cell(r.weight_sqnr)} dB)</h4>"
                   + histogram_svg(r.weight_histogram)  # type: ignore[arg-type]
                   for r in chosen)


def variants_page(report: Report, *, histogram_layers: list[str] | int = 3,
                  sensitivity: Sensitivity | None = None) -> str:
    """The self-contained HTML page of a multi-variant report: the best variant and where each
    loses, notes, the model output per variant, a chart per SQNR with a line per variant, the
    aligned table (a column group per variant), then each variant's own report (verdict,
    chart, weight histograms, blocks, table), each opening on a click."""
    _check_histogram_layers(histogram_layers, list(report.variants.values()))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fxnumeric report</title>",
        f"<style>{_PAGE_CSS}{_CSS}</style></head><body>",
        f"<h1>fxnumeric report: {len(report.variants)} variants</h1>",
        _variants_verdict_html(report),
        f"<p>{html.escape(report.summary(verdict=False))}</p>",
        "".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in _variant_notes(report)),
        f"<p>torch {html.escape(report.torch_version)}; comparisons: "
        f"{html.escape(', '.join(report.comparisons))}</p>",
        "<h2>Model output</h2>", _model_output_html(report),
        "<h2>SQNR per layer</h2>", _variants_legend(report), _variants_charts(report),
        sensitivity_section(sensitivity) if sensitivity is not None else "",
        "<h2>Layers</h2>",
        "<p>Click a column header to sort by it (again to reverse); # restores graph order. "
        "A dash: the variant has no such layer.</p>",
        _variants_html_table(report, aligned_layers(report)),
        "<h2>Each variant</h2>",
    ]
    for name, r in report.variants.items():
        parts.append(
            f"<details><summary><b>{html.escape(name)}</b>: {html.escape(_headline(r))}"
            f"</summary>{verdict_html(r)}<p>{html.escape(r.summary(verdict=False))}</p>"
            f"{_legend(r.rows)}<div class='fxn-chart'>{sqnr_chart(r.rows)}</div>"
            f"{_variant_histograms(r, histogram_layers)}{_blocks_html(r)}"
            f"{_report_html_table(r, r.rows)}</details>")
    parts += [SORT_SCRIPT, "</body></html>"]
    return "\n".join(parts)


def variants_fragment(report: Report, *, max_rows: int = 200) -> str:
    """What a notebook shows for a multi-variant report: the best variant and where each
    loses, the model output per variant, the charts and the aligned table."""
    layers = aligned_layers(report)
    more = len(layers) - max_rows
    tail = (f"<p>... {more} more layers: report.table() or report.to_html(path) shows all.</p>"
            if more > 0 else "")
    notes = "".join(f"<p><b>Note:</b> {html.escape(n)}</p>" for n in _variant_notes(report))
    return (f"<div><style>{_CSS}</style>{_variants_verdict_html(report)}"
            f"<p><b>fxnumeric report</b>: {html.escape(report.summary(verdict=False))}</p>"
            f"{notes}{_model_output_html(report)}{_variants_charts(report)}"
            f"{_variants_html_table(report, layers[:max_rows])}{tail}{SORT_SCRIPT}</div>")


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
    tablefmt = tabulate_format(tablefmt)
    text = text_table(_matching_rows(m), _matching_headers(m), tablefmt)
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
    return text_table(rows, ("float", "kind", "quantized", ""), tablefmt)


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
    lines += [f"{label}: {_db_text(getattr(r, attr))}" for attr, label, _ in (*_SERIES, _FLOOR)
              if getattr(r, attr) is not None]
    spread = r.spread.get("shadow_sqnr")
    if spread is not None and spread.known:
        lines.append(f"shadow SQNR over {spread.batches} batches: {spread.low:.2f} to "
                     f"{spread.high:.2f} dB (std {spread.std:.2f})")
    if r.notes:
        lines.append(r.notes)
    return html.escape("\n".join(lines))


def sqnr_chart(rows: Sequence[ReportRow], width: int = 1100, plot_height: int = 260) -> str:
    """SVG line chart of output, shadow and weight SQNR (and the floor, when known) per layer,
    in graph order. ``width`` is the width of the drawing (its ``viewBox``); on a page the SVG
    scales to the width of its container."""
    series = [(label, colour, [getattr(r, attr) for r in rows], attr == "floor_sqnr")
              for attr, label, colour in _series(rows)]
    return line_chart([r.name for r in rows], series, [_tooltip(r) for r in rows],
                      width=width, plot_height=plot_height)


Series = tuple[str, str, Sequence[float | None], bool]
"""One line of :func:`line_chart`: ``(legend label, colour, value per layer, dashed)``."""


def _legend_layout(labels: Sequence[str], left: int, right_edge: int,
                   ) -> tuple[list[tuple[float, int]], int]:
    """Where each legend entry sits, ``(x, line)``, wrapping onto a new line before an entry
    that would cross ``right_edge``; and how many lines there are."""
    places: list[tuple[float, int]] = []
    lx, line = left, 0
    for label in labels:
        wide = 24 + int(len(label) * _CHAR_W * 1.1)
        if lx > left and lx + wide - 10 > right_edge:
            lx, line = left, line + 1
        places.append((lx, line))
        lx += wide
    return places, line + 1


def line_chart(names: Sequence[str], series: Sequence[Series], tooltips: Sequence[str], *,
               width: int = 1100, plot_height: int = 260) -> str:
    """SVG line chart of SQNR values (dB) per layer, in graph order, one line per series, with
    the readability rules of the module docstring (``tooltips`` are escaped already). The
    legend wraps onto more lines when its entries do not fit in one."""
    n = len(names)
    values = [v for _, _, vs, _ in series for v in vs]
    if not any(v is not None and not math.isnan(v) for v in values):
        return "<p>No SQNR values to plot.</p>"
    lo, hi = _y_range([v for v in values if v is not None])
    above = f"above {hi:g} dB (inf: identical)"
    left, right = 56, 24
    places, lines = _legend_layout([label for label, _, _, _ in series] + [above], left,
                                   width - right)
    top = 44 + 16 * (lines - 1)
    label_chars = max((len(_label(name)) for name in names), default=0)
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
        f"<svg xmlns='http://www.w3.org/2000/svg' class='fxn-sqnr' width='100%' "
        f"viewBox='0 0 {width} {height}' preserveAspectRatio='xMinYMin meet' "
        f"style='min-width:{int(width * 0.7)}px' font-family='sans-serif' "
        f"role='img' aria-label='SQNR per layer'>",
        "<title>SQNR per layer (dB)</title>",
        "<style>.col{fill:#000;fill-opacity:0}.col:hover{fill-opacity:.07}</style>",
    ]
    # legend, in the top margin
    for (label, colour, _, _), (lx, line) in zip(series, places, strict=False):
        y = 8 + 16 * line
        out.append(f"<rect x='{lx}' y='{y}' width='10' height='10' fill='{colour}'/>"
                   f"<text x='{lx + 14}' y='{y + 9}' font-size='{_FONT + 1}'>"
                   f"{html.escape(label)}</text>")
    lx, line = places[-1]
    y = 18 + 16 * line
    out.append(f"<path d='M{lx} {y} l5 -9 l5 9 z' fill='#555'/><text x='{lx + 14}' y='{y - 1}' "
               f"font-size='{_FONT + 1}'>{above}</text>")
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
    for _, colour, series_values, dashed in series:
        dash = " stroke-dasharray='5 3'" if dashed else ""
        run: list[str] = []
        runs: list[list[str]] = []
        for i, v in enumerate(series_values):
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
                out.append(f"<polyline fill='none' stroke='{colour}' stroke-width='1.5'{dash} "
                           f"points='{' '.join(pts)}'/>")
            if dots or len(pts) == 1:
                for pt in pts:
                    x, y = pt.split(",")
                    out.append(f"<circle cx='{x}' cy='{y}' r='{2 if dots else 2.5}' "
                               f"fill='{colour}'/>")
    # x labels, thinned by pitch; rotated to read upwards, ending at the axis
    for i, name in enumerate(names):
        if i % stride:
            continue
        x, y = x_of(i), y0 + 8
        out.append(f"<text class='xlabel' x='{x:.1f}' y='{y}' font-size='{_FONT}' "
                   f"text-anchor='end' dy='0.35em' transform='rotate(-90 {x:.1f} {y})'>"
                   f"{html.escape(_label(name))}</text>")
    # hover bands with the tooltips, on top of everything
    for i, tip in enumerate(tooltips):
        out.append(f"<rect class='col' x='{left + i * pitch:.1f}' y='{top}' "
                   f"width='{pitch:.2f}' height='{plot_height}'>"
                   f"<title>{tip}</title></rect>")
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


_UNITS = {"sqnr": "dB", "kl": "nats"}


def metric_label(metric: str) -> str:
    """A metric's name with its unit: ``sqnr (dB)``, ``kl (nats)``, ``cosine``."""
    unit = _UNITS.get(metric)
    return f"{metric} ({unit})" if unit else metric


def _svg_frame(width: int, height: int, left: int, top: int, plot_w: int, plot_height: int,
               y_label: str) -> list[str]:
    """The opening of a chart's SVG: the element, the plot's box, the rotated y-axis label."""
    return [f"<svg xmlns='http://www.w3.org/2000/svg' width='100%' "
            f"viewBox='0 0 {width} {height}' preserveAspectRatio='xMinYMin meet' "
            "font-family='sans-serif' font-size='10'>",
            f"<rect x='{left}' y='{top}' width='{plot_w}' height='{plot_height}' fill='none' "
            "stroke='#999'/>",
            f"<text x='14' y='{top + plot_height / 2:.1f}' text-anchor='middle' "
            f"transform='rotate(-90 14 {top + plot_height / 2:.1f})'>"
            f"{html.escape(y_label)}</text>"]


def sensitivity_svg(sens: Sensitivity, width: int = 1100, plot_height: int = 260) -> str:
    """An inline SVG chart of a :class:`Sensitivity`: both hybrids per layer, in graph order.

    Blue: the quantized model with only this layer float (higher: floating it helps more);
    red: the float model with only this layer quantized (lower: it hurts more); dashed: the
    quantized model. Non-finite values (an exact output gives ``inf`` dB) sit on the top edge.
    The drawing scales to the page's width (``viewBox``); the y axis carries the metric's unit.
    """
    layers = sens.layers
    series = [("#1f77b4", [s.all_but for s in layers]), ("#d62728", [s.only for s in layers])]
    values = [v for _, vs in series for v in vs if math.isfinite(v)]
    values += [sens.quantized] if math.isfinite(sens.quantized) else []
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = (high - low) * 0.05 or 1.0
    low, high = low - pad, high + pad
    label_h = min(200, 7 * max((len(s.module) for s in layers), default=4))
    left, top = 70, 10
    plot_w = width - left - 80  # room for the last rotated labels
    step = plot_w / max(len(layers), 1)
    height = top + plot_height + label_h + 10

    def x(i: int) -> float:
        return left + step * (i + 0.5)

    def y(v: float) -> float:
        if not math.isfinite(v):
            return top if v > 0 or math.isnan(v) else top + plot_height
        return top + plot_height * (high - v) / (high - low)

    parts = _svg_frame(width, height, left, top, plot_w, plot_height,
                       metric_label(sens.metric))
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


def _sensitivity_table(sens: Sensitivity) -> str:
    rows = [sens.layer(n) for n in sens.ranking()]
    label = metric_label(sens.metric)
    both = not all(math.isnan(s.only) for s in sens.layers)
    headers = ["layer", "kind", *([f"only this quantized: {label}"] if both else []),
               f"all but this quantized: {label}"]
    cells = [[s.module, s.kind, *([s.only] if both else []), s.all_but] for s in rows]
    return html_table(headers, cells, [False, False, *([True] if both else []), True],
                      sortable=True)


def sensitivity_section(sens: Sensitivity) -> str:
    """The sensitivity part of a page: heading, what was measured, chart, sortable table."""
    unit = _UNITS.get(sens.metric, "")
    named, why = sens.most_sensitive(), sens.fewer_named()
    best = (f"the layers whose float version helps most: {', '.join(named)}"
            + (f" ({why})" if why else "") if named else f"no layer named: {why}")
    return (
        "<h2>Sensitivity</h2>"
        f"<p>The quantized model reads {html.escape(sens.metric)} {sens.quantized:.4g} {unit} "
        f"over {sens.batches} batches; {html.escape(best)}. "
        f"Each of the {len(sens.layers)} layers' end metric "
        "with <span style='color:#1f77b4'>&#9679; all but this layer quantized</span> and "
        "<span style='color:#d62728'>&#9679; only this layer quantized</span>; dashed: the "
        "quantized model.</p>"
        f"<div class='fxn-chart'>{sensitivity_svg(sens)}</div>{_sensitivity_table(sens)}"
    )


def sensitivity_page(sens: Sensitivity) -> str:
    """A self-contained HTML page for a :class:`fxnumeric.Sensitivity`."""
    return ("<!doctype html><html><head><meta charset='utf-8'><title>fxnumeric sensitivity"
            f"</title><style>{_PAGE_CSS}{_CSS}</style></head><body>"
            f"{sensitivity_section(sens)}{SORT_SCRIPT}</body></html>\n")


def advice_svg(advice: Any, width: int = 1100, plot_height: int = 260) -> str:
    """The advice's curve: the metric after each layer kept float (one quantized model), or,
    with several variants, the Pareto front of average weight bits against the metric; the
    target dashed, the chosen point ringed."""
    if advice.variants:
        points = list(advice.front)
        xs_label = "average weight bits"
        chosen = (advice.bits, advice.value)
    else:
        points = [(float(i), v) for i, v in enumerate(advice.curve)]
        xs_label = "layers kept float"
        chosen = (float(len(advice.curve) - 1), advice.value)
    finite = [(px, py) for px, py in points if math.isfinite(py)]
    ys = [py for _, py in finite] + ([advice.target] if math.isfinite(advice.target) else [])
    low, high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = (high - low) * 0.05 or 1.0
    low, high = low - pad, high + pad
    xs = [px for px, _ in finite] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    x1 = x1 if x1 > x0 else x0 + 1
    left, top, bottom = 70, 10, 40
    plot_w = width - left - 20
    height = top + plot_height + bottom

    def x(v: float) -> float:
        return left + plot_w * (v - x0) / (x1 - x0)

    def y(v: float) -> float:
        if not math.isfinite(v):
            return top if v > 0 else top + plot_height
        return top + plot_height * (high - v) / (high - low)

    parts = [*_svg_frame(width, height, left, top, plot_w, plot_height,
                         metric_label(advice.metric)),
             f"<text x='{left + plot_w / 2:.1f}' y='{height - 6}' text-anchor='middle'>"
             f"{xs_label}</text>"]
    for k in range(5):
        v = low + (high - low) * k / 4
        parts.append(f"<text x='{left - 4}' y='{y(v) + 3:.1f}' text-anchor='end'>{v:.4g}</text>")
        xv = x0 + (x1 - x0) * k / 4
        parts.append(f"<text x='{x(xv):.1f}' y='{top + plot_height + 14}' "
                     f"text-anchor='middle'>{xv:.3g}</text>")
    if math.isfinite(advice.target):
        parts.append(f"<line x1='{left}' x2='{left + plot_w}' y1='{y(advice.target):.1f}' "
                     f"y2='{y(advice.target):.1f}' stroke='#555' stroke-dasharray='4 3'>"
                     f"<title>target {advice.target:g}</title></line>")
    line = " ".join(f"{x(px):.1f},{y(py):.1f}" for px, py in points)
    parts.append(f"<polyline points='{line}' fill='none' stroke='#1f77b4'/>")
    for px, py in points:
        parts.append(f"<circle cx='{x(px):.1f}' cy='{y(py):.1f}' r='3' fill='#1f77b4'>"
                     f"<title>{px:.4g}: {py:.4g}</title></circle>")
    if chosen[0] is not None and math.isfinite(chosen[1]):
        parts.append(f"<circle cx='{x(chosen[0]):.1f}' cy='{y(chosen[1]):.1f}' r='7' "
                     "fill='none' stroke='#d62728' stroke-width='2'><title>chosen</title>"
                     "</circle>")
    parts.append("</svg>")
    return "".join(parts)


def advice_page(advice: Any) -> str:
    """A self-contained HTML page for an :class:`fxnumeric.Advice`: what it found, its curve
    (the Pareto front with several variants), its steps or assignment, what to feed back."""
    label = metric_label(advice.metric)
    if advice.variants:
        counts: dict[str, int] = {}
        for choice in advice.assignment.values():
            counts[choice] = counts.get(choice, 0) + 1
        table = html_table(["layer", "takes"], sorted(advice.assignment.items()),
                           [False, False], sortable=True)
        table = (html_table(["average weight bits", label], list(advice.front), [True, True])
                 + "<h3>Assignment</h3>" + table)
        heading = "Which precision each layer should take"
    else:
        rows = [[0, "(quantized model)", advice.curve[0]]] + [
            [i + 1, name, v] for i, (name, v) in
            enumerate(zip(advice.keep_float, advice.curve[1:], strict=True))]
        table = html_table(["step", "keep float", label], rows, [True, False, True])
        heading = "Which layers to keep float"
    feed = advice.summary().split("\n\n", 2)
    lines = feed[2] if len(feed) > 2 else ""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>fxnumeric advice</title>"
        f"<style>{_PAGE_CSS}{_CSS}</style></head><body>"
        f"<h1>{heading}</h1><p class='headline'>{html.escape(advice.message)}</p>"
        f"<div class='fxn-chart'>{advice_svg(advice)}</div>{table}"
        + (f"<h2>What to feed back</h2><pre>{html.escape(lines)}</pre>" if lines else "")
        + (sensitivity_section(advice.sensitivity) if advice.sensitivity is not None
           and advice.sensitivity.layers else "")
        + f"{SORT_SCRIPT}</body></html>\n"
    )


# ---------------------------------------------------------------- diffs (Report.diff)

_DIFF_HEADERS = ("layer", "metric", "old", "new", "change", "")
_DIFF_NUMERIC = (False, False, True, True, True, False)


def _diff_rows(diff: ReportDiff, changed_only: bool) -> tuple[list[MetricChange], int]:
    """The changes to show (every regression, the rest unless unchanged) and how many are not."""
    shown = [c for c in diff.changes
             if c.regression or not changed_only or c.change is None or c.change != 0.0]
    return shown, len(diff.changes) - len(shown)


def _diff_cells(c: MetricChange, variants: bool = False) -> list[Any]:
    return ([c.variant] if variants else []) + [
        c.layer if c.layer is not None else "(model output)", c.label, c.old, c.new,
        c.change, "REGRESSION" if c.regression else ""]


def _diff_headers(diff: ReportDiff) -> tuple[tuple[str, ...], tuple[bool, ...], bool]:
    """The diff table's headers and which are numeric; a variant column for variants."""
    variants = any(c.variant is not None for c in diff.changes)
    if not variants:
        return _DIFF_HEADERS, _DIFF_NUMERIC, False
    return ("variant", *_DIFF_HEADERS), (False, *_DIFF_NUMERIC), True


def _diff_layer_lines(diff: ReportDiff) -> list[str]:
    lines = [f"new layers: {', '.join(diff.new_layers)}"] if diff.new_layers else []
    if diff.vanished_layers:
        lines.append(f"vanished layers: {', '.join(diff.vanished_layers)}")
    if diff.new_blocks:
        lines.append(f"new blocks: {', '.join(diff.new_blocks)}")
    if diff.vanished_blocks:
        lines.append(f"vanished blocks: {', '.join(diff.vanished_blocks)}")
    if diff.new_variants:
        lines.append(f"new variants: {', '.join(diff.new_variants)}")
    if diff.vanished_variants:
        lines.append(f"vanished variants: {', '.join(diff.vanished_variants)}")
    return lines


def diff_table(diff: ReportDiff, tablefmt: str = "simple", *, changed_only: bool = True) -> str:
    """The changes as a tabulate table (regressions marked), new and vanished layers, the
    tolerances, then the summary (last line)."""
    tablefmt = tabulate_format(tablefmt)
    shown, hidden = _diff_rows(diff, changed_only)
    headers, _, variants = _diff_headers(diff)
    lines = [text_table([_diff_cells(c, variants) for c in shown], headers, tablefmt,
                        floatfmt=".4g", missingval="-")] if shown else []
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
    headers, numeric, variants = _diff_headers(diff)

    def table(changes: Sequence[MetricChange]) -> str:
        return html_table(headers, [_diff_cells(c, variants) for c in changes], numeric,
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
    for title, names in (("New layers", diff.new_layers),
                         ("Vanished layers", diff.vanished_layers),
                         ("New blocks", diff.new_blocks),
                         ("Vanished blocks", diff.vanished_blocks),
                         ("New variants", diff.new_variants),
                         ("Vanished variants", diff.vanished_variants)):
        if names:
            parts.append(f"<h2>{title} ({len(names)})</h2><p>{html.escape(', '.join(names))}</p>")
    parts.append("<h2>Changes</h2>")
    if hidden:
        parts.append(f"<p>{hidden} metrics unchanged" + (" (not shown).</p>" if shown else ".</p>"))
    parts += [table(shown) if shown else "", "</body></html>"]
    return "\n".join(parts)
