"""Stage 6, report: what :func:`fxnumeric.compare` found, as tables, JSON, CSV and HTML.

A :class:`Report` is a frozen dataclass of :class:`ReportRow` s; nothing in it prints
tensors. Rendering is tabulate straight from the rows; the HTML page is self-contained
(inline SVG charts, no plotting library needed).
"""

from __future__ import annotations

import csv
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tabulate import tabulate

__all__ = ["Report", "ReportRow", "WeightHistogram", "TABLE_FORMATS"]

TABLE_FORMATS = ("simple", "plain", "github", "markdown", "grid", "pipe")
_SORT_KEYS = ("graph", "output_sqnr", "shadow_sqnr", "weight_sqnr")


@dataclass(frozen=True)
class WeightHistogram:
    """Histogram of a layer's float and dequantized quantized weights over the same bins."""

    low: float
    high: float
    float_counts: tuple[int, ...]
    quant_counts: tuple[int, ...]


@dataclass(frozen=True)
class ReportRow:
    """Metrics for one paired layer.

    ``output`` holds the cumulative metrics (both models fed the same input, so the error
    accumulated up to this layer); ``shadow`` the local ones (this quantized op against its
    float twin fed the same dequantized input: the error this layer adds).
    """

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
    weight_histogram: WeightHistogram | None = field(default=None, repr=False)
    activations: tuple | None = field(default=None, repr=False)

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


def _num(x: float | None) -> Any:
    """JSON-safe number: inf/nan become strings, None stays None."""
    if x is None:
        return None
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _sort_value(x: float | None) -> float:
    return math.inf if x is None or math.isnan(x) else x


@dataclass(frozen=True)
class Report:
    """Per-layer comparison of a float model and its quantized counterpart."""

    rows: tuple[ReportRow, ...]
    metrics: tuple[str, ...]
    comparisons: tuple[str, ...]
    batches: int
    model_output: dict[str, float]
    unmatched: tuple[tuple[str, str, str], ...] = ()
    torch_version: str = ""

    # ------------------------------------------------------------------ queries
    def row(self, name: str) -> ReportRow:
        """The row called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row named {name!r}")

    @property
    def worst_layer(self) -> ReportRow | None:
        """Where the most error enters: lowest shadow SQNR, else the largest output-SQNR drop."""
        with_shadow = [r for r in self.rows if r.shadow_sqnr is not None and not math.isnan(r.shadow_sqnr)]
        if with_shadow:
            return min(with_shadow, key=lambda r: r.shadow_sqnr)
        best, prev = None, None
        drop_best = -math.inf
        for r in self.rows:
            s = r.output_sqnr
            if s is None or math.isnan(s):
                continue
            if prev is not None and math.isfinite(prev) and prev - s > drop_best:
                best, drop_best = r, prev - s
            prev = s
        return best

    def summary(self) -> str:
        """One line: batches, overall output SQNR, where most error enters."""
        parts = [f"{self.batches} batches", f"{len(self.rows)} layers"]
        overall = self.model_output.get("sqnr")
        if overall is not None:
            parts.append(f"model output SQNR {overall:.2f} dB")
        worst = self.worst_layer
        if worst is not None:
            how = (f"shadow SQNR {worst.shadow_sqnr:.2f} dB" if worst.shadow_sqnr is not None
                   else f"output SQNR {worst.output_sqnr:.2f} dB")
            parts.append(f"most error enters at {worst.name} ({worst.kind}, {how})")
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} nodes unpaired")
        return "; ".join(parts)

    def sorted_rows(self, sort: str = "graph", top_k: int | None = None) -> list[ReportRow]:
        """Rows in graph order, or worst first by ``output_sqnr``/``shadow_sqnr``/``weight_sqnr``."""
        if sort not in _SORT_KEYS:
            from .errors import InputError

            raise InputError(f"sort must be one of {', '.join(_SORT_KEYS)}, got {sort!r}")
        rows = list(self.rows)
        if sort != "graph":
            rows.sort(key=lambda r: _sort_value(getattr(r, sort)))
        return rows[:top_k] if top_k is not None else rows

    # ------------------------------------------------------------------ rendering
    def _columns(self) -> list[tuple[str, Any]]:
        cols: list[tuple[str, Any]] = [("layer", lambda r: r.name), ("kind", lambda r: r.kind)]
        if "weights" in self.comparisons:
            cols.append(("weight SQNR", lambda r: r.weight_sqnr))
        if "outputs" in self.comparisons:
            for m in self.metrics:
                label = "output SQNR" if m == "sqnr" else m
                cols.append((label, lambda r, m=m: r.output.get(m)))
        if "shadows" in self.comparisons:
            cols.append(("shadow SQNR", lambda r: r.shadow.get("sqnr")))
            for m in self.metrics:
                if m != "sqnr" and m not in ("cosine", "mse", "max_abs_error"):
                    cols.append((f"shadow {m}", lambda r, m=m: r.shadow.get(m)))
        cols.append(("note", lambda r: r.note))
        return cols

    def table(self, tablefmt: str = "simple", *, sort: str = "graph", top_k: int | None = None) -> str:
        """Render the rows with tabulate, followed by the summary line.

        Args:
            tablefmt: any tabulate format (``simple``, ``plain``, ``github``, ``markdown`` ...).
            sort: ``graph`` order, or worst first by ``output_sqnr``, ``shadow_sqnr`` or
                ``weight_sqnr``.
            top_k: keep only the first ``k`` rows after sorting.
        """
        if tablefmt == "markdown":
            tablefmt = "pipe"
        cols = self._columns()
        rows = [[fn(r) for _, fn in cols] for r in self.sorted_rows(sort, top_k)]
        return tabulate(rows, headers=[c for c, _ in cols], tablefmt=tablefmt, floatfmt=".4g", missingval="-") + "\n" + self.summary()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe: inf and nan are strings)."""
        return {
            "summary": self.summary(),
            "batches": self.batches,
            "comparisons": list(self.comparisons),
            "metrics": list(self.metrics),
            "torch_version": self.torch_version,
            "model_output": {k: _num(v) for k, v in self.model_output.items()},
            "worst_layer": self.worst_layer.name if self.worst_layer else None,
            "layers": [
                {
                    "name": r.name, "kind": r.kind, "quantized": r.quantized,
                    "weight_sqnr": _num(r.weight_sqnr), "weight_keys": list(r.weight_keys),
                    "output": {k: _num(v) for k, v in r.output.items()},
                    "shadow": {k: _num(v) for k, v in r.shadow.items()},
                    "float_nodes": list(r.float_nodes), "quant_nodes": list(r.quant_nodes),
                    "note": r.note,
                }
                for r in self.rows
            ],
            "unmatched": [{"node": n, "side": s, "reason": why} for n, s, why in self.unmatched],
        }

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        """Return the report as JSON; also write it to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_csv(self, path: str | Path) -> Path:
        """Write one CSV row per layer (metrics as columns) and return the path."""
        cols = self._columns()
        path = Path(path)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([c for c, _ in cols])
            for r in self.rows:
                writer.writerow(["" if v is None else v for v in (fn(r) for _, fn in cols)])
        return path

    def to_html(self, path: str | Path, *, histogram_layers: list[str] | int = 3) -> Path:
        """Write a self-contained HTML page: summary, SQNR chart, weight histograms, table.

        Args:
            path: where to write.
            histogram_layers: layer names to draw weight histograms for, or ``k`` for the
                ``k`` layers with the lowest weight SQNR.
        """
        if isinstance(histogram_layers, int):
            chosen = [r for r in self.sorted_rows("weight_sqnr") if r.weight_histogram is not None][:histogram_layers]
        else:
            chosen = [self.row(n) for n in histogram_layers]
        missing = [r.name for r in chosen if r.weight_histogram is None]
        parts = [
            "<!doctype html><html><head><meta charset='utf-8'><title>fxnumeric report</title>",
            "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
            "td:first-child,td:nth-child(2){text-align:left}.legend span{margin-right:1.5em}</style></head><body>",
            "<h1>fxnumeric report</h1>",
            f"<p>{html.escape(self.summary())}</p>",
            f"<p>torch {html.escape(self.torch_version)}; comparisons: {html.escape(', '.join(self.comparisons))}</p>",
            "<h2>SQNR per layer</h2>",
            "<p class='legend'><span style='color:#1f77b4'>&#9632; output SQNR (cumulative)</span>"
            "<span style='color:#d62728'>&#9632; shadow SQNR (local)</span>"
            "<span style='color:#2ca02c'>&#9632; weight SQNR</span></p>",
            _sqnr_chart(self.rows),
            "<h2>Weight histograms</h2>",
        ]
        if missing:
            parts.append(f"<p>No weights to draw for: {html.escape(', '.join(missing))}.</p>")
        if not chosen:
            parts.append("<p>No weight comparison in this report (run compare with comparisons including 'weights').</p>")
        for r in chosen:
            if r.weight_histogram is not None:
                parts.append(f"<h3>{html.escape(r.name)} (weight SQNR {r.weight_sqnr:.2f} dB)</h3>")
                parts.append(_histogram_svg(r.weight_histogram))
        parts.append("<h2>Layers</h2>")
        parts.append(_html_table(self))
        parts.append("</body></html>")
        path = Path(path)
        path.write_text("\n".join(parts))
        return path


def _html_table(report: Report) -> str:
    cols = report._columns()
    rows = [[fn(r) for _, fn in cols] for r in report.rows]
    return tabulate(rows, headers=[c for c, _ in cols], tablefmt="html", floatfmt=".4g", missingval="-")


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _sqnr_chart(rows: tuple[ReportRow, ...], width: int = 1100, height: int = 320) -> str:
    series = {
        "#1f77b4": [_finite(r.output_sqnr) for r in rows],
        "#d62728": [_finite(r.shadow_sqnr) for r in rows],
        "#2ca02c": [_finite(r.weight_sqnr) for r in rows],
    }
    values = [v for s in series.values() for v in s if v is not None]
    if not values or len(rows) < 1:
        return "<p>No finite SQNR values to plot.</p>"
    lo, hi = min(0.0, min(values)), max(values) + 5
    pad = 40
    n = max(len(rows) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad + i * (width - 2 * pad) / n, height - pad - (v - lo) * (height - 2 * pad) / (hi - lo)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' aria-label='SQNR per layer'>",
           f"<line x1='{pad}' y1='{height - pad}' x2='{width - pad}' y2='{height - pad}' stroke='#888'/>",
           f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{height - pad}' stroke='#888'/>"]
    for tick in range(int(lo // 10 * 10), int(hi) + 1, 10):
        _, y = xy(0, tick)
        out.append(f"<text x='4' y='{y + 4:.1f}' font-size='10'>{tick} dB</text>")
        out.append(f"<line x1='{pad}' y1='{y:.1f}' x2='{width - pad}' y2='{y:.1f}' stroke='#eee'/>")
    for color, vals in series.items():
        pts = " ".join(f"{x:.1f},{y:.1f}" for i, v in enumerate(vals) if v is not None for x, y in [xy(i, v)])
        if pts:
            out.append(f"<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{pts}'/>")
    for i, r in enumerate(rows):
        if r.output_sqnr is not None or r.shadow_sqnr is not None:
            x, _ = xy(i, lo)
            out.append(f"<title>{html.escape(r.name)}</title>")
            if len(rows) <= 60 or i % max(1, len(rows) // 60) == 0:
                out.append(f"<text x='{x:.1f}' y='{height - pad + 12}' font-size='8' transform='rotate(60 {x:.1f} {height - pad + 12})'>{html.escape(r.name)}</text>")
    out.append("</svg>")
    return "\n".join(out)


def _histogram_svg(h: WeightHistogram, width: int = 520, height: int = 160) -> str:
    peak = max(max(h.float_counts, default=0), max(h.quant_counts, default=0), 1)
    bins = len(h.float_counts)
    bw = (width - 20) / max(bins, 1)
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height + 20}'>"]
    for counts, color, offset in ((h.float_counts, "#1f77b4", 0.0), (h.quant_counts, "#ff7f0e", bw / 2)):
        for i, c in enumerate(counts):
            bh = c * height / peak
            out.append(f"<rect x='{10 + i * bw + offset:.1f}' y='{height - bh:.1f}' width='{bw / 2:.1f}' height='{bh:.1f}' fill='{color}'/>")
    out.append(f"<text x='10' y='{height + 15}' font-size='10'>{h.low:.3g}</text>")
    out.append(f"<text x='{width - 60}' y='{height + 15}' font-size='10'>{h.high:.3g}</text>")
    out.append(f"<text x='{width / 2 - 60:.0f}' y='{height + 15}' font-size='10'>float (blue) vs quantized (orange)</text>")
    out.append("</svg>")
    return "\n".join(out)
