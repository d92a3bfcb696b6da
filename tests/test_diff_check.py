"""Report.diff and the gate (fxnumeric check, fxnumeric.testing) on real and planted reports."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxnumeric as ns
from fxnumeric.cli import main
from fxnumeric.errors import InputError
from fxnumeric.report import Report, ReportRow
from fxnumeric.report.check import Thresholds
from fxnumeric.testing import assert_report, check_report


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        enc=nn.Sequential(OrderedDict(fc1=nn.Linear(16, 32), relu=nn.ReLU(),
                                      fc2=nn.Linear(32, 32))),
        head=nn.Linear(32, 8),
    )).eval()


@pytest.fixture(scope="module")
def reports() -> tuple[Report, Report]:
    """A dynamic-quantized MLP, and the same with ``enc.fc2``'s weight quantized 16x coarser."""
    float_model = _mlp()
    good = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear})
    bad = copy.deepcopy(good)
    weight = bad.enc.fc2.weight()
    coarse = torch.quantize_per_tensor(weight.dequantize(), weight.q_scale() * 16, 0, torch.qint8)
    bad.enc.fc2.set_weight_bias(coarse, bad.enc.fc2.bias())
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 16, generator=gen) for _ in range(3)]
    return ns.compare(float_model, good, data), ns.compare(float_model, bad, data)


# ---------------------------------------------------------------- diff


def test_diff_flags_the_layer_whose_weight_was_made_coarser(reports):
    old, new = reports
    d = old.diff(new, tolerance_db=1.0)
    assert d.regressed and not d.new_layers and not d.vanished_layers
    flagged = {(c.layer, c.metric) for c in d.regressions}
    assert {("enc.fc2", "weight_sqnr"), ("enc.fc2", "shadow.sqnr"), ("enc.fc2", "output.sqnr"),
            (None, "sqnr")} <= flagged
    assert {layer for layer, _ in flagged} <= {"enc.fc2", "head", None}
    weight = d.change("enc.fc2", "weight_sqnr")
    assert weight.old == old.row("enc.fc2").weight_sqnr and weight.new == new.row("enc.fc2").weight_sqnr
    assert weight.change == pytest.approx(weight.new - weight.old) and weight.change < -15
    # upstream of the change nothing moves, bit for bit
    upstream = [c for c in d.changes if c.layer in ("enc.fc1", "enc.relu")]
    assert upstream and all(c.change == 0.0 and not c.regression for c in upstream)
    assert d.change("enc.fc1", "output.cosine").old == old.row("enc.fc1").cosine
    assert not old.diff(old).changes[0].regression
    assert not old.diff(Report.from_json(old.to_json())).regressed
    assert all(c.change == 0.0 for c in old.diff(Report.from_json(old.to_json())).changes)


def test_diff_table_and_page_name_the_regression(reports, tmp_path):
    old, new = reports
    d = old.diff(new)
    text = d.table()
    line = next(x for x in text.splitlines() if x.startswith("enc.fc2") and "shadow SQNR" in x)
    assert line.rstrip().endswith("REGRESSION")
    assert "enc.fc1" not in text  # unchanged metrics are counted, not listed
    assert "metrics unchanged (not shown)" in text and "enc.fc1" in d.table(changed_only=False)
    assert text.splitlines()[-1] == d.summary()
    assert d.summary().startswith("4 layers in both reports; ")
    assert "regressions beyond tolerance: model output SQNR: " in d.summary()
    page = d.to_html(tmp_path / "diff.html").read_text()
    assert page.startswith("<!doctype html>") and "table.fxn tr.worst" in page
    assert page.count("<tr class='worst'>") == 2 * len(d.regressions)  # both tables
    assert "<script" not in page and "http" not in page


def _report(rows, model_output) -> Report:
    return Report(tuple(rows), ("sqnr", "cosine"), ("weights", "outputs", "shadows"), 1,
                  model_output)


def _row(name, shadow=30.0, output=None, **kw) -> ReportRow:
    return ReportRow(name, "linear", True, 40.0, {"sqnr": 30.0 if output is None else output,
                                                  "cosine": 0.999}, {"sqnr": shadow}, **kw)


def test_llm_keys_may_be_absent_and_are_judged_when_present():
    old = _report([_row("a")], {"sqnr": 20.0, "kl": 0.10, "top1_agreement": 0.90})
    worse = _report([_row("a")], {"sqnr": 20.0, "kl": 0.25, "top1_agreement": 0.85})
    d = old.diff(worse)
    assert [c.metric for c in d.regressions] == ["kl", "top1_agreement"]
    assert d.change(None, "kl").change == pytest.approx(0.15)
    assert not old.diff(worse, tolerance_kl=0.2, tolerance_top1=0.1).regressed
    plain = _report([_row("a")], {"sqnr": 20.0})
    added = plain.diff(old)  # an LLM run adds kl: listed, not judged
    assert not added.regressed and added.change(None, "kl").old is None
    assert not old.diff(plain).regressed and old.diff(plain).change(None, "kl").new is None
    with pytest.raises(InputError, match=r"no 'kl' for layer 'a' in this diff; it holds: .*"
                                         r"output\.sqnr.*Fix:"):
        old.diff(plain).change("a", "kl")


@pytest.mark.parametrize("old_value, new_value, regression", [
    (30.0, 29.6, False),  # within 0.5 dB
    (30.0, 29.0, True),
    (math.inf, 60.0, True),  # identical before, not now
    (math.inf, math.inf, False),
    (-math.inf, -math.inf, False),
    (30.0, math.nan, True),
    (math.nan, 10.0, False),  # nothing to lose
    (20.0, 45.0, False),
])
def test_sqnr_regression_rules(old_value, new_value, regression):
    d = _report([_row("a", old_value)], {}).diff(_report([_row("a", new_value)], {}))
    assert d.change("a", "shadow.sqnr").regression is regression


def test_a_nan_that_stayed_nan_is_unchanged():
    """Reports compare NaN equal to NaN; the diff listed a report against itself with every
    NaN metric as changed (nan -> nan, change nan)."""
    r = _report([_row("a", math.nan, output=math.nan), _row("b")], {"sqnr": math.nan})
    d = r.diff(Report.from_json(r.to_json()))
    assert [c.change for c in d.changes] == [0.0] * len(d.changes)
    assert "metrics unchanged" in d.table() and "nan" not in d.table()
    assert math.isnan(r.diff(_report([_row("a", 30.0), _row("b")], {"sqnr": 1.0}))
                      .change("a", "shadow.sqnr").old)


def test_cosine_collapsed_rows_new_and_vanished_layers():
    collapsed = {"float_rms": 1e-9, "reference_rms": 1.0}  # a billionth of the model's scale
    old = _report([_row("a"), _row("b"), _row("c", **collapsed)], {"cosine": 0.999})
    new = _report([_row("a", output=20.0), _row("d"), _row("c", shadow=1.0, **collapsed)],
                  {"cosine": 0.99})
    d = old.diff(new)
    assert d.new_layers == ("d",) and d.vanished_layers == ("b",)
    assert {(c.layer, c.metric) for c in d.regressions} == {(None, "cosine"), ("a", "output.sqnr")}
    assert d.change("c", "shadow.sqnr").change == -29.0  # listed; a collapsed row is not judged
    assert "new layers: d" in d.table() and "vanished layers: b" in d.table()
    with pytest.raises(InputError, match="the sqnr tolerance must be >= 0"):
        old.diff(new, tolerance_db=-1)


def test_cli_diff_exit_status_formats_and_errors(reports, tmp_path, capsys):
    old, new = reports
    a, b = old.to_json(tmp_path / "old.json"), new.to_json(tmp_path / "new.json")
    assert a and b
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "old.json")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "4 layers in both reports; no regression beyond tolerance")
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "; enc.fc2 weight SQNR: " in out.splitlines()[-1]
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--tolerance",
                 "100", "--tolerance-cosine", "1"]) == 0
    capsys.readouterr()
    html = tmp_path / "d.html"
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--format",
                 "html", "--out", str(html)]) == 1
    assert capsys.readouterr().out.startswith(f"wrote {html}\n") and "REGRESSION" in html.read_text()
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json"), "--format",
                 "html"]) == 2
    assert "add -o FILE" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("junk")
    assert main(["diff", str(tmp_path / "junk.json"), str(tmp_path / "new.json")]) == 2
    assert capsys.readouterr().err.startswith(f"fxnumeric: error: {tmp_path / 'junk.json'} is not JSON")
    with pytest.raises(SystemExit) as info:
        main(["diff", "a.json", "b.json", "--tolerance", "-1"])
    assert info.value.code == 2 and "expected a number >= 0" in capsys.readouterr().err


# ---------------------------------------------------------------- check


def test_flags_check_the_model_output_and_every_layer(reports):
    _, new = reports
    shadow = new.row("enc.fc2").shadow_sqnr
    limit = round(shadow + 1.0)
    result = check_report(new, min_output_sqnr=1.0, min_shadow_sqnr=limit)
    assert not result.passed and result.checks == 1 + 4  # relu's shadow SQNR is inf
    lines = result.text().splitlines()
    assert f"FAIL [layers] min_shadow_sqnr = {limit:g}: enc.fc2 shadow SQNR {shadow:.4g} dB < {limit:g} dB" in lines
    assert lines[-1] == "1 of 5 checks failed"
    assert all(f.layer is not None and f.value < limit for f in result.failures)
    ok = check_report(new, min_output_sqnr=new.model_output["sqnr"] - 1, min_weight_sqnr=1)
    assert ok.passed and ok.checks == 1 + 3 and ok.text() == "all 4 checks passed"  # 3 weights


_TOML = """
[model_output]
min_sqnr = 1.0
max_mse = 1.0

[layers]
min_weight_sqnr = 1.0

[layers."enc.*"]
min_shadow_sqnr = {enc}

[layers.'re:head|enc\\.fc1']
min_output_cosine = 0.5
"""


def test_toml_thresholds_with_pattern_sections(reports, tmp_path):
    old, new = reports
    enc = round(new.row("enc.fc2").shadow_sqnr + 1)
    path = tmp_path / "quant.toml"
    path.write_text(_TOML.format(enc=enc))
    t = Thresholds.from_toml(path)
    assert t.layers == {"*": {"min_weight_sqnr": 1.0}, "enc.*": {"min_shadow_sqnr": float(enc)},
                        r"re:head|enc\.fc1": {"min_output_cosine": 0.5}}
    bad = check_report(new, path)
    assert [(f.section, f.layer) for f in bad.failures] == [('layers."enc.*"', "enc.fc2")]
    assert bad.checks == 2 + 3 + 3 + 2  # model output, weights, enc.* shadows, cosines
    assert check_report(old, path).passed
    # keywords are added and win over the file
    assert check_report(new, path, min_output_sqnr=200).failures[0].key == "min_sqnr"


def test_pattern_without_a_layer_unmeasured_metrics_floor_and_nan_fail(tmp_path):
    rows = [_row("a", shadow=40.0, floor_sqnr=42.0), _row("b", shadow=30.0, floor_sqnr=40.0),
            _row("c", shadow=math.nan), _row("d", float_rms=1e-9, reference_rms=1.0, shadow=1.0),
            _row("e", floor_sqnr=None)]
    report = _report(rows, {"sqnr": 20.0, "cosine": 0.99})
    t = Thresholds({"max_kl": 0.1}, {"*": {"max_below_floor": 3.0, "min_shadow_sqnr": 25.0},
                                     "nope.*": {"min_shadow_sqnr": 1.0}})
    result = check_report(report, t)
    assert [str(f) for f in result.failures] == [
        "[model_output] max_kl = 0.1: model output kl not measured in this report (it holds "
        "sqnr, cosine)",
        "[layers] max_below_floor = 3: b shadow SQNR below its floor_sqnr by 10 dB > 3 dB",
        "[layers] min_shadow_sqnr = 25: c shadow SQNR nan dB < 25 dB",
        "[layers.\"nope.*\"]: the pattern 'nope.*' matches no layer of the report",
    ]
    assert result.skipped == ("d",) and result.checks == 1 + 2 + 4 + 1
    assert result.text().endswith("4 of 8 checks failed (1 layers with a collapsed float "
                                  "signal not judged: d)")
    no_shadows = dataclasses.replace(report, rows=tuple(dataclasses.replace(r, shadow={})
                                                        for r in rows))
    assert str(check_report(no_shadows, min_shadow_sqnr=1).failures[0]) == (
        "[layers] min_shadow_sqnr = 1: no layer has shadow SQNR measured (comparisons: "
        "weights, outputs, shadows)")


@pytest.mark.parametrize("text, message", [
    ("[layers]\nmin_shadw_sqnr = 20\n",
     r"\[layers\] 'min_shadw_sqnr': not a layer threshold; they are min_shadow_sqnr, .*Fix:"),
    ("[model]\nmin_sqnr = 20\n", r"unknown section \[model\]; the sections are"),
    ("[model_output]\nsqnr = 20\n", r"'sqnr': keys are min_<metric> or max_<metric>"),
    ("[model_output]\nmin_sqnr = \"high\"\n", r"\[model_output\] min_sqnr must be a number"),
    ("[layers.'re:(']\nmin_shadow_sqnr = 1\n", r"not a regular expression"),
    ("[layers\nmin_sqnr = 1\n", r"is not TOML: .*line 1"),
    ("layers = 3\n", r"layers must be a table \(\[layers\]\), got 3"),
])
def test_bad_threshold_files_are_input_errors(tmp_path, text, message):
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        Thresholds.from_toml(path)


def test_without_tomllib_or_tomli_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(InputError, match=r"needs tomllib \(Python 3\.11 and later\) or tomli\. "
                                         r"Fix: use Python 3\.11\+, or pip install tomli"):
        Thresholds.from_toml(tmp_path / "t.toml")


def test_nothing_to_check_and_missing_files():
    report = _report([_row("a")], {"sqnr": 20.0})
    with pytest.raises(InputError, match="nothing to check: no threshold given"):
        check_report(report)
    with pytest.raises(InputError, match="no thresholds file 'nope.toml'"):
        check_report(report, "nope.toml")


def test_assert_report_fails_with_the_failure_lines(reports, tmp_path):
    _, new = reports
    new.to_json(tmp_path / "r.json")
    shadow = new.row("enc.fc2").shadow_sqnr
    with pytest.raises(AssertionError) as info:
        assert_report(tmp_path / "r.json", min_shadow_sqnr=30, min_output_sqnr=1)
    assert str(info.value).splitlines() == [
        f"FAIL [layers] min_shadow_sqnr = 30: enc.fc2 shadow SQNR {shadow:.4g} dB < 30 dB",
        "1 of 5 checks failed",
    ]
    assert assert_report(new, min_shadow_sqnr=1).passed


def test_cli_check_exit_status(reports, tmp_path, capsys):
    old, new = reports
    old.to_json(tmp_path / "old.json")
    new.to_json(tmp_path / "new.json")
    (tmp_path / "q.toml").write_text("[layers]\nmin_shadow_sqnr = 30\n")
    assert main(["check", str(tmp_path / "old.json"), "--thresholds", str(tmp_path / "q.toml"),
                 "--min-output-sqnr", "10"]) == 0
    assert capsys.readouterr().out == "all 5 checks passed\n"
    assert main(["check", str(tmp_path / "new.json"), "--thresholds",
                 str(tmp_path / "q.toml")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("FAIL [layers] min_shadow_sqnr = 30: enc.fc2 shadow SQNR ")
    assert out[-1] == "1 of 4 checks failed"
    (tmp_path / "bad.toml").write_text("[layers]\nmin_shadw_sqnr = 30\n")
    assert main(["check", str(tmp_path / "new.json"), "--thresholds",
                 str(tmp_path / "bad.toml")]) == 2
    assert "not a layer threshold" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "new.json")]) == 2
    assert "nothing to check" in capsys.readouterr().err


def _deep_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


def test_an_exact_layer_is_not_below_its_floor():
    # a dead ReLU before it: layer 4 returns its bias exactly, shadow and floor both inf;
    # floor - shadow read inf - inf = nan, which failed every threshold
    f = _deep_mlp()
    with torch.no_grad():
        f[2].bias.fill_(-100.0)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    report = ns.compare(f, q, [torch.randn(16, 16) for _ in range(3)], progress=False)
    row = report.row("4")
    assert math.isinf(row.shadow_sqnr) and not row.below_floor
    result = check_report(report, max_below_floor=3.0)
    assert result.passed, result
    planted = dataclasses.replace(report, rows=tuple(
        dataclasses.replace(r, shadow={**r.shadow, "sqnr": r.floor_sqnr - 5}) if r.name == "2"
        else r for r in report.rows))
    assert not check_report(planted, max_below_floor=3.0).passed  # a real gap still fails


def test_worst_first_puts_poisoned_layers_first():
    # a quantized bias holding NaN: table(top_k=3) listed an exact ReLU (inf) among the three
    # worst and hid layer 2, where the NaN starts
    f = _deep_mlp()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    weight, bias = q[2]._packed_params._weight_bias()
    bias = bias.clone()
    bias[3] = float("nan")
    q[2]._packed_params.set_weight_bias(weight, bias)
    report = ns.compare(f, q, [torch.randn(16, 16) for _ in range(3)], progress=False)
    poisoned = [r.name for r in report.rows if math.isnan(r.shadow_sqnr)]
    assert "2" in poisoned
    worst = report.sorted_rows(top_k=len(poisoned))
    assert sorted(r.name for r in worst) == sorted(poisoned)
    ranked = [r.shadow_sqnr for r in report.sorted_rows(sort="shadow_sqnr")]
    numbers = [v for v in ranked if v is not None and not math.isnan(v)]
    assert numbers == sorted(numbers) and all(math.isnan(v) for v in ranked[:len(poisoned)])


def test_the_summary_counts_one_regression_and_one_layer_in_the_singular(reports):
    """The diff's summary said "1 regressions"."""
    old, _ = reports
    worse = dataclasses.replace(old, rows=tuple(
        dataclasses.replace(r, shadow={**r.shadow, "sqnr": r.shadow["sqnr"] - 3})
        if r.name == "head" else r for r in old.rows))
    d = old.diff(worse, tolerance_db=1.0)
    assert [(c.layer, c.metric) for c in d.regressions] == [("head", "shadow.sqnr")]
    assert d.summary().endswith(
        f"; 1 regression beyond tolerance: {d.regressions[0]}")
    assert d.summary().startswith("4 layers in both reports; ")
    head = dataclasses.replace(old, rows=tuple(r for r in old.rows if r.name == "head"))
    assert head.diff(head).summary() == (
        "1 layer in both reports; no regression beyond tolerance")


# ---------------------------------------------------------------- diff of blocks


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(self.relu(self.fc1(x)))


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_Residual(), _Residual(), _Residual())
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


def _block_sqnrs(f, q, data):
    """The oracle, by forward hooks: each block's output SQNR (float block's output against the
    quantized block's) and shadow SQNR (the float block on the quantized block's input)."""
    def db(pairs):
        signal = sum(float(a.double().square().sum()) for a, _ in pairs)
        noise = sum(float((a.double() - b.double()).square().sum()) for a, b in pairs)
        return 10 * math.log10(signal / noise)

    names = [f"blocks.{i}" for i in range(3)]
    outputs, shadows, seen = {n: [] for n in names}, {n: [] for n in names}, {}
    hooks = [f.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(("f", n), o)) for n in names]
    hooks += [q.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen.__setitem__(("q", n), (a[0], o))) for n in names]
    with torch.no_grad():
        for x in data:
            f(x), q(x)
            for n in names:
                entering, q_out = seen[("q", n)]
                outputs[n].append((seen[("f", n)], q_out))
                shadows[n].append((f.get_submodule(n)(entering), q_out))
    for h in hooks:
        h.remove()
    return {n: (db(outputs[n]), db(shadows[n])) for n in names}


def test_diff_compares_blocks_and_flags_a_block_that_got_worse(tmp_path, capsys):
    torch.manual_seed(0)
    f = _Blocks().eval()
    good = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    bad = copy.deepcopy(good)
    weight = bad.blocks[1].fc2.weight()  # blocks.1's weights 32x coarser
    coarse = torch.quantize_per_tensor(weight.dequantize(), weight.q_scale() * 32, 0, torch.qint8)
    bad.blocks[1].fc2.set_weight_bias(coarse, bad.blocks[1].fc2.bias())
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    old, new = ns.compare(f, good, data, progress=False), ns.compare(f, bad, data, progress=False)
    assert [b.name for b in new.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    before, after = _block_sqnrs(f, good, data), _block_sqnrs(f, bad, data)
    d = old.diff(new, tolerance_db=1.0)
    assert [c.metric for c in d.regressions if c.layer == "blocks.1"] == [
        "output.sqnr", "shadow.sqnr"]  # [] before
    assert d.blocks == ("blocks.0", "blocks.1", "blocks.2") and len(d.layers) == len(new.rows)
    shadow = d.change("blocks.1", "shadow.sqnr")
    assert shadow.block and shadow.regression and shadow.label == "block shadow SQNR"
    assert shadow.old == pytest.approx(before["blocks.1"][1], abs=1e-3)
    assert shadow.new == pytest.approx(after["blocks.1"][1], abs=1e-3)
    assert shadow.change == pytest.approx(after["blocks.1"][1] - before["blocks.1"][1], abs=1e-3)
    assert shadow.change < -10  # listed nowhere before: the diff read no block
    for name in ("blocks.1", "blocks.2"):  # the error leaves blocks.1 and every block after it
        output = d.change(name, "output.sqnr")
        assert output.old == pytest.approx(before[name][0], abs=1e-3)
        assert output.new == pytest.approx(after[name][0], abs=1e-3)
        assert output.regression == (before[name][0] - after[name][0] > 1.0)
    # blocks.0 runs before the change: unchanged, bit for bit; its shadow equals the hooks'
    assert d.change("blocks.0", "shadow.sqnr").change == 0.0
    entering = d.change("blocks.2", "entering")  # blocks.1's output SQNR: listed, judged there
    assert entering.new == new.blocks[1].output_sqnr and not entering.regression
    assert re.search(r"\nblocks\.1 +block shadow SQNR .* REGRESSION\n", d.table())
    assert "3 blocks in both reports" in d.summary()
    # a change in the blocks alone regresses, and the CLI says so by its exit status
    blocks_only = dataclasses.replace(new, rows=old.rows, model_output=old.model_output)
    regressions = old.diff(blocks_only, tolerance_db=1.0).regressions
    assert regressions and all(c.block for c in regressions)
    old.to_json(tmp_path / "old.json")
    blocks_only.to_json(tmp_path / "new.json")
    assert main(["diff", str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    assert re.search(r"\nblocks\.1 +block shadow SQNR .* REGRESSION\n", capsys.readouterr().out)
    gone = dataclasses.replace(blocks_only, blocks=new.blocks[:2])
    assert old.diff(gone).vanished_blocks == ("blocks.2",)


def test_the_summary_counts_every_layer_both_reports_hold_metrics_or_not():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.Sigmoid(), nn.Linear(32, 8)).eval()
    data = [torch.randn(4, 16) for _ in range(2)]
    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (data[0],))
    for x in data:
        prepared(x)
    q = convert_fx(prepared)
    report = ns.compare(f, q, data, comparisons=["weights"], progress=False)
    names = [r.name for r in report.rows]
    assert len(names) == 4 and sum(r.weight_sqnr is not None for r in report.rows) == 2
    d = report.diff(report)
    assert d.summary().startswith("4 layers in both reports;")  # "2 layers" before
    assert d.layers == tuple(names)


class _TwoOutputs(nn.Module):
    """An MLP returning its logits and its hidden features, as a tuple or as a dict."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.as_dict = nn.Linear(16, 32), nn.Linear(32, 8), as_dict

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        logits = self.fc2(hidden)
        return {"scores": logits, "hidden": hidden} if self.as_dict else (logits, hidden)


def test_the_model_output_is_not_judged_across_different_parts_of_it():
    gen = torch.Generator().manual_seed(2)
    data = [torch.randn(4, 16, generator=gen) for _ in range(2)]

    def report(as_dict: bool, coarsen: float) -> Report:
        float_model = _TwoOutputs(as_dict).eval()
        quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear})
        weight = quant.fc2.weight()
        quant.fc2.set_weight_bias(torch.quantize_per_tensor(
            weight.dequantize(), weight.q_scale() * coarsen, 0, torch.qint8), quant.fc2.bias())
        return ns.compare(float_model, quant, data)

    good, bad, bad_dict = report(False, 1), report(False, 64), report(True, 64)
    assert (good.model_output_part, bad_dict.model_output_part) == ("[0]", "['scores']")
    # the same part of the output: the coarser fc2 is a regression of the model output
    same = good.diff(bad)
    assert same.model_output_parts is None
    assert same.change(None, "sqnr").regression
    assert same.change(None, "sqnr").old == good.model_output["sqnr"]
    # another part: the change is listed with both values, not judged, and the summary says why
    other = good.diff(bad_dict)
    assert other.model_output_parts == ("[0]", "['scores']")
    change = other.change(None, "sqnr")
    assert (change.old, change.new) == (good.model_output["sqnr"], bad_dict.model_output["sqnr"])
    assert change.new < change.old - 10 and not change.regression
    assert other.change("fc2", "shadow.sqnr").regression  # the layers are judged as before
    assert ("model output not judged: the old report read `output[0]`, the new one "
            "`output['scores']`") in other.summary()


def test_worst_first_leads_with_the_layer_where_inf_starts():
    # an Inf bias: its layer reads -inf and the layers after it NaN; table(top_k=2) listed two
    # of those NaN rows and hid the layer where it starts (the layers after it stay float: a
    # dynamic one would fail on the Inf)
    f = _deep_mlp()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {"0", "2"})
    weight, bias = q[2]._packed_params._weight_bias()
    bias = bias.clone()
    bias[3] = float("inf")
    q[2]._packed_params.set_weight_bias(weight, bias)
    gen = torch.Generator().manual_seed(0)
    report = ns.compare(f, q, [torch.randn(16, 16, generator=gen) for _ in range(3)],
                        progress=False)
    poisoned = [r.name for r in report.rows
                if r.shadow_sqnr is not None and not r.shadow_sqnr > -math.inf]
    assert report.row("2").shadow_sqnr == -math.inf and len(poisoned) > 2
    assert [r.name for r in report.sorted_rows(top_k=len(poisoned))] == poisoned  # graph order
    assert report.table(top_k=1).splitlines()[2].split()[0] == "2"


def test_a_failure_line_shows_the_digits_that_tell_the_value_from_its_limit():
    # 29.9996 dB against min_sqnr = 30 read "model output SQNR 30 dB < 30 dB"
    row = ReportRow("fc", "linear", True, 39.9996, {"sqnr": 34.9998}, {"sqnr": 34.99996},
                    float_rms=1.0, reference_rms=1.0)
    report = Report((row,), ("sqnr",), ("weights", "outputs", "shadows"), 2,
                    {"sqnr": 29.9996, "cosine": 0.99896, "kl": 0.10004,
                     "top1_agreement": 0.89996}, model_output_rms=1.0)
    lines = check_report(report, min_output_sqnr=30, min_output_cosine=0.999, max_kl=0.1,
                         min_top1_agreement=0.9, min_shadow_sqnr=35,
                         min_weight_sqnr=40).text().splitlines()
    assert lines[:6] == [
        "FAIL [model_output] min_sqnr = 30: model output SQNR 29.9996 dB < 30 dB",
        "FAIL [model_output] min_cosine = 0.999: model output cosine 0.99896 < 0.999",
        "FAIL [model_output] max_kl = 0.1: model output kl 0.10004 nats > 0.1 nats",
        "FAIL [model_output] min_top1_agreement = 0.9: model output top1_agreement 0.89996 < 0.9",
        "FAIL [layers] min_shadow_sqnr = 35: fc shadow SQNR 34.99996 dB < 35 dB",
        "FAIL [layers] min_weight_sqnr = 40: fc weight SQNR 39.9996 dB < 40 dB"]
    # each shown value still reads as the value it is, to 4 digits where nothing is near
    far = check_report(report, min_output_sqnr=31.5).text().splitlines()[0]
    assert far.endswith("model output SQNR 30 dB < 31.5 dB")
