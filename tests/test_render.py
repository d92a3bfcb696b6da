"""Rendering: the SVG chart stays readable from 10 to 500 layers; tables; notebook displays."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import replace
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


def _size(svg: ET.Element) -> tuple[int, int]:
    """The drawing's width and height: its viewBox (the SVG itself is 100% of the page)."""
    _, _, width, height = (int(float(v)) for v in svg.get("viewBox").split())
    return width, height


def _labels(svg: ET.Element) -> list[ET.Element]:
    return [t for t in svg.iter(f"{SVG}text") if t.get("class") == "xlabel"]


@pytest.mark.parametrize("n", [10, 33, 61, 100, 119, 200, 500])
def test_x_labels_fit_inside_the_svg_and_never_overlap(n):
    svg = _svg(_rows(n))
    _, height = _size(svg)
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
    start = page.index("<table class='fxn fxn-sortable'>")  # the layers' table
    table = page[start:page.index("</table>", start) + 8]
    root = ET.fromstring(table)
    headers = [th.get("class") for th in root.iter("th")]
    first_row = [td.get("class") for td in root.find("tbody").find("tr").iter("td")]
    assert headers == first_row
    assert headers[:4] == ["num", None, None, "num"]  # #; layer, kind left; weight SQNR right


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
    live = ReportRow("a", "conv2d", True, 40.0, {"sqnr": 30.0}, {"sqnr": 35.0}, float_rms=0.5,
                     reference_rms=0.5)
    dead = ReportRow("b", "conv2d", True, 40.0, {"sqnr": 0.0}, {"sqnr": 0.0}, float_rms=3e-10,
                     reference_rms=0.5)
    report = Report((live, dead), ("sqnr",), ("weights", "outputs", "shadows"), 1,
                    {"sqnr": 0.0}, model_output_rms=3e-10)
    assert report.worst_layer is live
    assert ("float signal collapsed (RMS 3.0e-10 < 1e-06 x the largest activation upstream, "
            "0.5)" in dead.notes)
    summary = report.summary()
    assert report.activation_rms == 0.5
    assert ("model output SQNR 0.00 dB (meaningless: float output collapsed, RMS 3.0e-10 < "
            "1e-06 x the model's largest activation, 0.5)" in summary)
    assert ("float signal collapsed in 1 layer (RMS 0 or < 1e-06 x the largest activation "
            "upstream): b; its SQNR means nothing" in summary)
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
    width, height = _size(svg)
    # fixed pixels for the screenshot: the page's SVG is as wide as its container
    svg_text = svg_text.replace("width='100%' ", f"width='{width}' height='{height}' ", 1)
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


def test_weights_rounded_to_zero_are_blamed_not_hidden_as_a_collapse():
    """Weights of 1e-9 make activations of ~1e-10, a billionth of the last Linear's output
    (its bias). Judged against that later layer, layers 0 and 1 read "collapsed" and no layer
    was named; but a signal is judged against what lies upstream of it (here nothing: the
    model input has no row), and layer 0's quantized weights are really all zero (torch's
    smallest weight step is float32's eps, 1.2e-7): 0 dB, cosine 0, and it is the culprit."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        f[0].weight.mul_(1e-9)
        f[0].bias.zero_()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    report = ns.compare(f, q, [torch.randn(4, 16) for _ in range(2)])
    first = report.row("0")
    assert int(torch.count_nonzero(q[0].weight().int_repr())) == 0  # rounded to zero
    assert first.output_sqnr == 0.0 and first.cosine == 0.0 and first.weight_sqnr == 0.0
    assert 0 < first.float_rms < 1e-6 * report.activation_rms  # tiny against a later layer
    assert first.reference_rms == first.float_rms  # nothing upstream: judged against itself
    assert report.row("1").reference_rms == first.float_rms  # the ReLU reads layer 0
    assert not report.degenerate_rows and "collapsed" not in report.table()
    assert report.culprit == "0" and report.worst_layer is first
    assert report.to_dict()["layers"][0]["degenerate"] is False


# ---------------------------------------------------------------- a report that says what to do


def _planted_report():
    """A dynamic MLP whose middle Linear lost its bias: a culprit that stands out."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 8)).eval()
    with torch.no_grad():
        for m in f:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(-0.5, 0.5)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    mid = q[2]
    mid.set_weight_bias(mid.weight(), torch.zeros_like(mid.bias()))
    gen = torch.Generator().manual_seed(1)
    return ns.compare(f, q, [torch.randn(8, 16, generator=gen) for _ in range(4)])


def test_the_page_opens_with_the_verdict_and_the_next_call(tmp_path):
    report = _planted_report()
    assert report.culprit == "2"
    page = report.to_html(tmp_path / "r.html").read_text()
    body = page[page.index("<body>"):]
    assert body.index("<div class='fxn-verdict culprit'>") < body.index("<svg")
    assert "<p class='headline'>Culprit: 2</p>" in page
    assert "<b>Next:</b> Find out why 2 loses accuracy" in page
    assert "fxnumeric.diagnose(float_model, quant_model, data).text()" in page
    # the lost bias, read against the layer's own floor: far below it, a constant offset
    row = report.row("2")
    assert row.below_floor and row.floor_cause == "offset"
    assert not any(r.below_floor for r in report.rows if r.name != "2")
    assert "lost bias" in row.notes and "below floor" in page.lower()
    spread = Report(tuple(replace(r, shadow={"sqnr": 30.0 + i / 10})
                          for i, r in enumerate(report.rows)),
                    report.metrics, report.comparisons, 4, {"sqnr": 12.0})
    page = spread.to_html(tmp_path / "s.html").read_text()
    assert "<p class='headline'>No culprit: the error is spread over 5 layers</p>" in page
    assert ("fxnumeric.advise(float_model, quant_model, data, metric=&#x27;sqnr&#x27;, "
            "target=20)") in page


def test_layers_below_their_floor_are_shown_only_when_the_floor_is_known(tmp_path):
    report = _planted_report()
    above = {"0": None, "2": 10.0, "4": 1.0}  # floor - shadow SQNR, dB; the ReLUs: none
    floors = tuple(replace(r, floor_sqnr=r.shadow_sqnr + above[r.name]
                           if above.get(r.name) is not None else None) for r in report.rows)
    floored = replace(report, rows=floors)
    below = [r.name for r in floored.rows if r.below_floor]
    assert below == ["2"]  # 10 dB below its floor; layer 4 is 1 dB below: at its floor
    page = floored.to_html(tmp_path / "f.html").read_text()
    assert "1 layer reads far below the SQNR its own qparams allow" in page
    row = floored.row("2")
    assert (f"<li>2: shadow SQNR {row.shadow_sqnr:.4g} dB, floor {row.floor_sqnr:.4g} dB</li>"
            in page)
    assert "Grey, dashed: the floor SQNR" in page
    chart = ET.fromstring(sqnr_chart(floored.rows))  # the floor on the chart, in grey
    assert "floor SQNR (its qparams allow)" in [t.text for t in chart.iter(f"{SVG}text")]
    assert len([c for c in chart.iter(f"{SVG}circle") if c.get("fill") == "#7f7f7f"]) == 2
    assert "below floor: shadow SQNR" in floored.row("2").notes
    assert "floor SQNR" in floored.table() and "1 layer far below its floor SQNR: 2" \
        in floored.summary()


def test_the_chart_fills_the_page_width_and_has_a_legend_sentence(tmp_path):
    report = _planted_report()
    page = report.to_html(tmp_path / "r.html").read_text()
    svg = ET.fromstring(sqnr_chart(report.rows))
    assert svg.get("width") == "100%" and svg.get("height") is None
    assert svg.get("viewBox") == "0 0 1100 " + str(_size(svg)[1])
    assert ".fxn-chart svg{display:block;width:100%;height:auto}" in page
    assert "max-width:1200px" not in page
    for sentence in ("Blue: output SQNR</span>, the error accumulated up to the layer",
                     "Red: shadow SQNR</span>, the error the layer adds by itself",
                     "Green: weight SQNR</span>, the rounding of its weights alone"):
        assert sentence in page


def test_print_report_prints_the_table_and_repr_stays_short(capsys):
    report = _planted_report()
    print(report)
    out = capsys.readouterr().out
    assert out.rstrip("\n") == report.table()
    assert out.splitlines()[0].split()[:2] == ["layer", "kind"]
    assert out.rstrip("\n").splitlines()[-1] == report.summary()
    assert repr(report).startswith("<Report: 4 batches; 5 layers") and "\n" not in repr(report)


def test_the_csv_carries_every_metric_of_every_comparison(tmp_path):
    import csv as csv_module

    report = _planted_report()
    rows = list(csv_module.DictReader(report.to_csv(tmp_path / "r.csv").open()))
    assert rows.pop()["layer"] == "(model output)"  # the last row: the model output's metrics
    for side in ("output", "shadow"):
        for metric in ("sqnr", "cosine", "mse", "max_abs_error"):
            column = f"{side}_{metric}"
            assert [float(r[column]) for r in rows] == pytest.approx(
                [getattr(r, side)[metric] for r in report.rows], nan_ok=True), column
        for stat in ("mean", "std", "low", "high"):
            assert f"{side}_sqnr_{stat}" in rows[0]
    mid = rows[2]
    spread = report.row("2").spread["shadow_sqnr"]
    assert float(mid["shadow_sqnr_std"]) == pytest.approx(spread.std)
    assert float(mid["weight_sqnr"]) == pytest.approx(report.row("2").weight_sqnr)
    assert {"floor_sqnr", "below_floor", "float_rms", "flags", "note"} <= set(rows[0])
    # the lost bias, against its own floor
    assert float(mid["floor_sqnr"]) > 40 and mid["below_floor"] == "True"
    assert mid["floor_cause"] == "offset"


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the page's script")
def test_a_click_on_a_header_sorts_the_table(tmp_path):
    """The page's own script, run by node against a small DOM built from the page's table."""
    from fxnumeric.report.render import SORT_SCRIPT

    report = _planted_report()
    page = report.to_html(tmp_path / "r.html").read_text()
    table = ET.fromstring(page[page.index("<table class='fxn fxn-sortable'>"):
                               page.index("</table>") + 8])
    heads = [th.text for th in table.iter("th")]
    cells = [[(td.text or "", td.get("data-v")) for td in tr.iter("td")]
             for tr in table.find("tbody").iter("tr")]
    script = SORT_SCRIPT.removeprefix("<script>").removesuffix("</script>")
    dom = """
    function El(text, v) { this.textContent = text; this.dataset = v === null ? {} : {v: v};
      this.attrs = {}; this.style = {}; this.handlers = {}; this.cls = []; }
    El.prototype.getAttribute = function (k) { return k in this.attrs ? this.attrs[k] : null; };
    El.prototype.setAttribute = function (k, v) { this.attrs[k] = v; };
    El.prototype.removeAttribute = function (k) { delete this.attrs[k]; };
    El.prototype.addEventListener = function (e, f) { this.handlers[e] = f; };
    El.prototype.classList = null;
    const heads = HEADS.map(function (h) { const th = new El(h, null);
      th.classList = {contains: function (c) { return c === "num" && NUMERIC.includes(h); }};
      return th; });
    const body = {rows: CELLS.map(function (row) {
      return {cells: row.map(function (c) { return new El(c[0], c[1]); })}; }),
      appendChild: function (r) { this.rows = this.rows.filter(x => x !== r); this.rows.push(r); }};
    const table = {dataset: {}, tHead: {rows: [{cells: heads}]}, tBodies: [body]};
    const document = {querySelectorAll: function () { return [table]; }};
    SCRIPT
    function order() { return body.rows.map(r => r.cells[1].textContent).join(","); }
    const col = HEADS.indexOf("shadow SQNR");
    heads[col].handlers.click(); const up = order();
    heads[col].handlers.click(); const down = order();
    heads[0].handlers.click(); const graph = order();
    console.log(JSON.stringify([up, down, graph, heads[0].getAttribute("aria-sort")]));
    """
    numeric = [th.text for th in table.iter("th") if th.get("class") == "num"]
    program = (dom.replace("HEADS", json.dumps(heads)).replace("NUMERIC", json.dumps(numeric))
               .replace("CELLS", json.dumps(cells)).replace("SCRIPT", script))
    (tmp_path / "sort.js").write_text(program)
    out = subprocess.run(["node", str(tmp_path / "sort.js")], capture_output=True, text=True,
                         check=True).stdout
    up, down, graph, state = json.loads(out)
    shadow = {r.name: r.shadow_sqnr for r in report.rows}  # inf for the ReLUs
    assert [shadow[n] for n in up.split(",")] == sorted(shadow.values())
    assert [shadow[n] for n in down.split(",")] == sorted(shadow.values(), reverse=True)
    assert graph.split(",") == [r.name for r in report.rows] and state == "ascending"


def test_an_unknown_table_format_is_refused_naming_the_valid_ones():
    """tabulate draws a format it does not know as `simple`: `table("bogus")` was accepted."""
    f, q, report = _small_report()
    tables = {"Report.table": report.table, "Report.block_table": report.block_table,
              "ReportDiff.table": report.diff(report).table,
              "Matching.table": ns.match(f, q).table}
    for what, table in tables.items():
        with pytest.raises(ns.InputError, match="unknown table format 'bogus': use one of "
                           "simple, plain, github, markdown, grid, pipe, or another of "
                           "tabulate's formats .*rst"):
            table("bogus")
        assert table("markdown") == table("pipe"), what  # markdown is tabulate's pipe
    # any of tabulate's own formats still works: rst frames the header with "=" rules
    rule = report.table("rst").splitlines()[0]
    assert set(rule) == {"=", " "}


def _variants_report():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    every = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    first = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(f), {"0": torch.ao.quantization.default_dynamic_qconfig})
    variants = {"every": every, "first": first}
    return f, variants, ns.compare(f, variants, [torch.randn(4, 16) for _ in range(2)],
                                   progress=False)


def _weight_sqnr(float_linear: nn.Module, quant_linear: nn.Module) -> float:
    """The weight SQNR read directly: the float weight against the dequantized int8 one."""
    w, wq = float_linear.weight.double(), quant_linear.weight().dequantize().double()
    return 10 * math.log10(float(w.square().sum()) / float((w - wq).square().sum()))


@pytest.mark.parametrize("with_variants", [False, True], ids=["single", "variants"])
def test_histogram_layers_that_would_draw_the_wrong_thing_are_refused(with_variants, tmp_path):
    """A name of no layer was refused for one report and ignored with variants; -1 sliced
    ([:-1]: every layer but the last); a string drew nothing."""
    if with_variants:
        f, variants, report = _variants_report()
        q, heading = variants["every"], "<h4>"
    else:
        f, q, report = _small_report()
        heading = "<h3>"
    path = tmp_path / "r.html"
    with pytest.raises(ns.InputError, match="'no.such.layer'"):
        report.to_html(path, histogram_layers=["0", "no.such.layer"])
    for bad in (-1, 0, True, 1.5, "0", None):
        with pytest.raises(ns.InputError, match=r"histogram_layers takes a count k >= 1 .* "
                           r"or a list of layer names \(\[\] for none\)"):
            report.to_html(path, histogram_layers=bad)
    # what is accepted draws what it says: the lowest weight SQNR, read directly
    worst = min(("0", "2"), key=lambda n: _weight_sqnr(f.get_submodule(n), q.get_submodule(n)))
    page = report.to_html(path, histogram_layers=1).read_text()
    drawn = page[page.index(heading):].split(heading)[1:]
    assert drawn[0].startswith(f"{worst} (weight SQNR")
    assert len(drawn) == (2 if with_variants else 1)  # with variants: each variant's worst
    page = report.to_html(path, histogram_layers=[]).read_text()
    assert heading not in page
    page = report.to_html(path, histogram_layers=["2"]).read_text()
    assert page.count(f"{heading}2 (weight SQNR") == (2 if with_variants else 1)


def test_layer_names_that_read_as_numbers_are_shown_as_written_in_every_table():
    # the layers of nested nn.Sequentials are "0.0" ... "0.10": tabulate parsed the name
    # column as numbers and showed "0.0" as "0" and "0.10" as "0.1", another layer's name
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(*[nn.Linear(8, 8) for _ in range(11)]),
                          nn.Linear(8, 2)).eval()
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    data = [torch.randn(4, 8) for _ in range(2)]
    report = ns.compare(model, quant, data, progress=False)
    names = [r.name for r in report.rows]
    assert {"0.0", "0.1", "0.10", "1"} <= set(names)

    def first_column(table: str) -> list[str]:  # the cells below the header's rule
        lines = table.splitlines()
        rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
        return [line.split()[0] for line in lines[rule + 1:] if line.strip()]

    assert first_column(report.table())[:len(names)] == names
    twice = ns.compare(model, {"a": quant, "b": quant}, data, progress=False)
    assert first_column(twice.table())[:len(names)] == names
    diffed = [c for c in first_column(report.diff(report).table(changed_only=False))
              if c in names]  # one line per metric of a layer
    assert list(dict.fromkeys(diffed)) == names
    sensitivity = ns.sensitivity(model, quant, data, progress=False)
    assert sorted(first_column(sensitivity.table())[:len(names)]) == sorted(names)
    diagnosis = ns.diagnose(model, quant, data, progress=False)
    assert first_column(diagnosis.table())[:len(names)] == names
    assert "0.10" in first_column(ns.match(model, quant).table())


def test_a_value_near_1_is_never_shown_as_1():
    # a cosine of 0.99996 read "1" in the table and a top-1 agreement of 0.9996 "1.000" in
    # the summary, as if exact
    rows = (ReportRow("fc1", "linear", True, 48.0, {"sqnr": 41.0, "cosine": 0.99996},
                      {"sqnr": 41.0}, float_rms=1.0, reference_rms=1.0),
            ReportRow("fc2", "linear", True, 48.0, {"sqnr": 35.0, "cosine": 0.9871},
                      {"sqnr": 36.0}, float_rms=1.0, reference_rms=1.0),
            ReportRow("fc3", "linear", True, 48.0, {"sqnr": 35.0, "cosine": 1.0},
                      {"sqnr": 36.0}, float_rms=1.0, reference_rms=1.0))
    report = Report(rows, ("sqnr", "cosine"), ("weights", "outputs", "shadows"), 2,
                    {"sqnr": 30.0, "kl": 0.01, "kl_p99": 0.02, "kl_max": 0.05,
                     "top1_agreement": 0.9996}, model_output_rms=1.0)
    lines = report.table().splitlines()
    cosine = lines[0].split().index("cosine") - 2  # "weight SQNR", "output SQNR": 2 words
    cells = {line.split()[0]: line.split()[cosine] for line in lines[2:5]}
    assert cells == {"fc1": "0.99996", "fc2": "0.9871", "fc3": "1"}
    assert "top-1 agreement 0.9996" in report.summary()
    exact = dataclasses.replace(report, model_output={**report.model_output,
                                                      "top1_agreement": 1.0})
    assert "top-1 agreement 1.000" in exact.summary()


@pytest.mark.parametrize("top_k", [-1, 0, 2.5, True])
def test_top_k_is_a_count_of_at_least_one(top_k):
    # -1 silently dropped the last row, 0 drew an empty table, 2.5 raised a bare TypeError
    rows = tuple(ReportRow(f"fc{i}", "linear", True, 48.0, {"sqnr": 30.0 + i},
                           {"sqnr": 31.0 + i}) for i in range(3))
    report = Report(rows, ("sqnr",), ("weights", "outputs", "shadows"), 2, {"sqnr": 30.0})
    with pytest.raises(ns.InputError, match="top_k must be a whole number >= 1"):
        report.table(top_k=top_k)
    with pytest.raises(ns.InputError, match="top_k must be a whole number >= 1"):
        report.sorted_rows(top_k=top_k)
    assert [r.name for r in report.sorted_rows(top_k=2)] == ["fc0", "fc1"]
