"""Rendering: the SVG chart stays readable from 10 to 500 layers; tables; notebook displays."""

from __future__ import annotations

import copy
import math
import random
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fxnumeric as ns
from fxnumeric.report import Report, ReportRow, WeightHistogram
from fxnumeric.report.render import _CHAR_W, _FONT, histogram_svg, sqnr_chart

SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = Path("/usr/bin/chromium")


def _rows(n: int, seed: int = 0) -> tuple[ReportRow, ...]:
    """n layers: SQNRs in 20-45 dB, weights on two layers of three, one 140 dB spike,
    one inf (identical), one -inf (zero signal), long names."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        shadow = 140.0 if i == 5 else math.inf if i == 7 else rng.uniform(25, 40)
        output = -math.inf if i == 9 else 40 - 15 * i / n
        weight = rng.uniform(35, 45) if i % 3 != 2 else None
        rows.append(ReportRow(f"features.{i}.conv.{i % 4}.block_{i}", "conv2d", True, weight,
                              {"sqnr": output}, {"sqnr": shadow}))
    return tuple(rows)


def _svg(rows) -> ET.Element:
    return ET.fromstring(sqnr_chart(rows))


def _labels(svg: ET.Element) -> list[ET.Element]:
    return [t for t in svg.iter(f"{SVG}text") if t.get("class") == "xlabel"]


@pytest.mark.parametrize("n", [10, 33, 61, 100, 119, 200, 500])
def test_x_labels_fit_inside_the_svg_and_never_overlap(n):
    svg = _svg(_rows(n))
    height = float(svg.get("height"))
    labels = _labels(svg)
    assert labels and labels[0].text == "features.0.conv.0.block_0"
    for t in labels:  # rotated to read upwards: the text runs down from its anchor
        assert float(t.get("y")) + len(t.text) * _CHAR_W <= height
    xs = [float(t.get("x")) for t in labels]
    gaps = [b - a for a, b in zip(xs, xs[1:], strict=False)]
    assert min(gaps) >= _FONT + 2  # never overlapping
    # thinned by pixel pitch, not by a fixed divisor: every layer labelled while they fit
    # (up to 78 in 1100 px), otherwise labels at most two label-heights apart
    assert len(labels) == n if n <= 78 else max(gaps) < 2 * (_FONT + 3)


def test_every_layer_has_a_tooltip_inside_a_mark_and_the_first_title_names_the_chart():
    rows = _rows(40)
    svg = _svg(rows)
    children = list(svg)
    assert children[0].tag == f"{SVG}title" and children[0].text.startswith("SQNR per layer")
    parents = {child: parent for parent in svg.iter() for child in parent}
    tips = [t for t in svg.iter(f"{SVG}title") if t is not children[0]]
    assert all(parents[t].tag == f"{SVG}rect" for t in tips)
    assert [t.text.splitlines()[0] for t in tips] == [f"{r.name} (conv2d)" for r in rows]
    assert "shadow SQNR (local): inf (identical)" in tips[7].text
    assert "shadow SQNR (local): 140.00 dB" in tips[5].text
    assert "output SQNR (cumulative): -inf (zero signal)" in tips[9].text


def test_lines_break_where_values_are_missing_and_off_axis_values_are_marked():
    rows = _rows(30)
    svg = _svg(rows)
    green = [p for p in svg.iter(f"{SVG}polyline") if p.get("stroke") == "#2ca02c"]
    # weights on layers 0,1 / 3,4 / ...: ten runs of two points, none bridging a gap
    assert len(green) == 10 and all(len(p.get("points").split()) == 2 for p in green)
    red_over = [p for p in svg.iter(f"{SVG}path")
                if p.get("class") == "over" and p.get("fill") == "#d62728"]
    assert len(red_over) == 2  # the 140 dB spike and the inf
    # and no line runs through them: a line is drawn only between values on the axis
    off_axis = {p.get("d").split()[0][1:] for p in red_over}  # x - 4 of each triangle
    red_xs = {float(pt.split(",")[0]) for p in svg.iter(f"{SVG}polyline")
              if p.get("stroke") == "#d62728" for pt in p.get("points").split()}
    assert not {round(float(x) + 4, 1) for x in off_axis} & {round(x, 1) for x in red_xs}
    assert [p for p in svg.iter(f"{SVG}path") if p.get("class") == "under"]  # the -inf


def test_a_spike_does_not_squash_the_band_that_matters():
    svg = _svg(_rows(50))
    ticks = [float(t.text.split()[0]) for t in svg.iter(f"{SVG}text")
             if t.text and t.text.endswith(" dB") and t.get("text-anchor") == "end"]
    assert max(ticks) <= 70  # not 140: the 20-45 dB band keeps most of the height


def test_histograms_have_axes_and_a_constant_tensor_is_said_in_words():
    h = WeightHistogram(-0.5, 0.5, (1, 4, 10, 4, 1), (0, 5, 10, 5, 0))
    svg = ET.fromstring(histogram_svg(h))
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert {"0", "5", "10"} <= set(texts) and "count" in texts  # a y axis with counts
    assert {"-0.5", "0", "0.5"} <= set(texts) and "weight value" in texts
    ones = WeightHistogram(1.0, 2.0, (64,) + (0,) * 59, (64,) + (0,) * 59)
    assert histogram_svg(ones).startswith("<p>All 64 weights fall in one bin near 1")


def _small_report():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    return f, q, ns.compare(f, q, [torch.randn(4, 16) for _ in range(2)])


def test_html_table_headers_align_like_their_cells(tmp_path):
    _, _, report = _small_report()
    page = report.to_html(tmp_path / "r.html").read_text()
    table = page[page.index("<table class='fxn'>"):page.index("</table>") + 8]
    root = ET.fromstring(table)
    headers = [th.get("class") for th in root.iter("th")]
    first_row = [td.get("class") for td in root.find("tbody").find("tr").iter("td")]
    assert headers == first_row
    assert headers[:3] == [None, None, "num"]  # layer, kind left; weight SQNR right


def test_repr_is_short_and_notebooks_get_html():
    f, q, report = _small_report()
    assert len(repr(report)) < 300 and repr(report).startswith("<Report: 2 batches; 3 layers")
    frag = report._repr_html_()
    assert "<svg" in frag and "<table" in frag and "fxnumeric report" in frag
    m = ns.match(f, q)
    assert repr(m) == ("<Matching: 3 pairs, 0 float and 0 quantized nodes unpaired, "
                       "coverage of quantized ops 100%>")
    assert "<table" in m._repr_html_() and "linear" in m._repr_html_()
    assert len(repr(report.rows[0])) < 120


def test_collapsed_signal_is_called_out_and_never_the_culprit():
    live = ReportRow("a", "conv2d", True, 40.0, {"sqnr": 30.0}, {"sqnr": 35.0}, float_rms=0.5)
    dead = ReportRow("b", "conv2d", True, 40.0, {"sqnr": 0.0}, {"sqnr": 0.0}, float_rms=3e-10)
    report = Report((live, dead), ("sqnr",), ("weights", "outputs", "shadows"), 1,
                    {"sqnr": 0.0}, model_output_rms=3e-10)
    assert report.worst_layer is live
    assert "float signal collapsed (RMS 3.0e-10)" in dead.notes
    summary = report.summary()
    assert "model output SQNR 0.00 dB (meaningless: float output RMS 3.0e-10)" in summary
    assert "float signal collapsed in 1 layers" in summary
    assert [r.name for r in report.sorted_rows(top_k=2)] == ["a", "b"]  # collapsed rows last
    only_dead = Report((dead,), ("sqnr",), ("outputs", "shadows"), 1, {"sqnr": 0.0})
    assert only_dead.worst_layer is None and "no layer named as culprit" in only_dead.summary()


def test_top_k_alone_is_worst_first_and_a_missing_sort_column_says_so():
    _, _, report = _small_report()
    worst = sorted(report.rows, key=lambda r: r.shadow_sqnr)[:2]
    assert report.sorted_rows(top_k=2) == worst
    outputs_only = Report(report.rows, report.metrics, ("outputs",), 2, report.model_output)
    stripped = tuple(ReportRow(r.name, r.kind, r.quantized, None, r.output, {})
                     for r in report.rows)
    outputs_only = Report(stripped, report.metrics, ("outputs",), 2, report.model_output)
    text = outputs_only.table(sort="shadow_sqnr")
    assert ("note: no shadow SQNR in this report (comparisons: outputs): sorted by output SQNR"
            in text)
    by_output = sorted(stripped, key=lambda r: r.output_sqnr)
    assert outputs_only.sorted_rows("shadow_sqnr") == by_output


# ---------------------------------------------------------------- headless Chromium


def _screenshot(html_path: Path, png: Path, width: int, height: int, tmp: Path) -> None:
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars",
         f"--window-size={width},{height}", f"--screenshot={png}", html_path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )


def _ink_strips(columns: list[bool], gap: int = 3) -> int:
    """Runs of inked columns; blanks narrower than ``gap`` belong to one glyph."""
    strips, blank = 0, gap
    for ink in columns:
        if ink and blank >= gap:
            strips += 1
        blank = 0 if ink else blank + 1
    return strips


def _render(svg_text: str, width: int, height: int, tmp: Path, name: str):
    from PIL import Image

    page = tmp / f"{name}.html"
    page.write_text("<!doctype html><html><body style='margin:0;background:#fff'>"
                    f"{svg_text}</body></html>")
    png = tmp / f"{name}.png"
    _screenshot(page, png, width + 40, height + 40, tmp)
    return Image.open(png).convert("RGB")


def _dark(img, x: int, y: int) -> bool:
    r, g, b = img.getpixel((x, y))
    return r < 110 and g < 110 and b < 110


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
@pytest.mark.parametrize("n", [10, 100, 500])
def test_chart_renders_readably_in_chromium(n, tmp_path):
    """Nothing is clipped (a taller canvas shows no more ink) and each label is its own strip
    of ink (no two overlap)."""
    svg_text = sqnr_chart(_rows(n))
    svg = ET.fromstring(svg_text)
    width, height = int(svg.get("width")), int(svg.get("height"))
    tall = svg_text.replace(f"height='{height}' viewBox='0 0 {width} {height}'",
                            f"height='{height + 300}' viewBox='0 0 {width} {height + 300}'", 1)
    assert tall != svg_text
    img = _render(svg_text, width, height, tmp_path, "chart")
    ref = _render(tall, width, height + 300, tmp_path, "tall")
    ink = sum(_dark(img, x, y) for x in range(width) for y in range(height))
    ink_tall = sum(_dark(ref, x, y) for x in range(width) for y in range(height + 300))
    assert ink == ink_tall > 0
    labels = _labels(svg)
    axis_y = int(float(labels[0].get("y")))
    band = range(axis_y + 2, axis_y + 30)  # the first characters of every label
    left, right = int(float(labels[0].get("x"))) - 8, int(float(labels[-1].get("x"))) + 8
    columns = [any(_dark(img, x, y) for y in band) for x in range(left, right)]
    assert _ink_strips(columns) == len(labels)


def test_a_real_collapsed_signal_is_flagged_not_blamed():
    """Weights of 1e-9 make activations of ~1e-10: quantized to zero, 0 dB, cosine 0."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        f[0].weight.mul_(1e-9)
        f[0].bias.zero_()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    report = ns.compare(f, q, [torch.randn(4, 16) for _ in range(2)])
    first = report.row("0")
    assert first.output_sqnr == 0.0 and first.cosine == 0.0  # what used to be shown plainly
    assert first.degenerate and [r.name for r in report.degenerate_rows] == ["0", "1"]
    assert "float signal collapsed (RMS 5.6e-10): SQNR meaningless" in report.table()
    assert report.worst_layer is None  # not layer 0 at 0 dB
    assert "float signal collapsed in 2 layers" in report.summary()
    assert report.to_dict()["layers"][0]["degenerate"] is True
