"""Several quantized variants in one report (issue 18, item 1): ``compare(f, {name: q}, data)``.

Real pairs from several flows against one float model: every variant's report equals the one
comparing it alone (every metric to 1e-6, notes too), the float model runs once per batch for
the variants of one float capture, rows align by the float value they compare, and every
rendering, the JSON round trip, diff, check and the CLI handle the variants.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib
import io
import json
import math
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

import fxnumeric as ns
import fxnumeric.testing
from fxnumeric.cli import main
from fxnumeric.instrument import observe_values
from fxnumeric.models import _quantize, torchao_config, untied_linears
from fxnumeric.report.render import variants_chart

sys.path.insert(0, str(Path(__file__).parent))
from _flow_pairs import MLP, EagerNet, _images, _pt2e, _vectors  # noqa: E402
from _models import CallsTwice

pytest.importorskip("torchao")

compare_module = importlib.import_module("fxnumeric.compare")  # the module, not the function


# ---------------------------------------------------------------- helpers


def _close(a, b, where: str = "report") -> None:
    """``a`` equals ``b``, floats to 1e-6 (relative, absolute below 1), nan equal to nan."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, float) and isinstance(b, float), f"{where}: {a!r} != {b!r}"
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), f"{where}: {a!r} != {b!r}"
        elif math.isinf(a) or math.isinf(b):
            assert a == b, f"{where}: {a!r} != {b!r}"
        else:
            assert abs(a - b) <= 1e-6 * max(1.0, abs(a)), f"{where}: {a!r} != {b!r}"
    elif dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            if f.name != "activations":
                _close(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture
def float_runs(monkeypatch):
    """Counts the float and quantized model runs of ``compare``."""
    calls: Counter[str] = Counter()
    original = compare_module.run_model

    def run_model(model, batch, *, which="model"):
        calls["float" if which == "float" else "quantized"] += 1
        return original(model, batch, which=which)

    monkeypatch.setattr(compare_module, "run_model", run_model)
    return calls


def _mlp_variants():
    """One MLP quantized by five flows: FX, eager static (QuantWrapper), dynamic, pt2e and
    torchao int8 dynamic."""
    torch.manual_seed(0)
    f = MLP().eval()
    data = _vectors()
    variants = {mode: _quantize(f, mode, data) for mode in ("fx", "static", "dynamic")}
    variants["pt2e"] = _pt2e(f, data)
    variants["int8-dynamic"] = _quantize(f, "int8-dynamic", data)
    return f, variants, data


def _cnn_variants():
    """A CNN with eager stubs (conv-relu, a FloatFunctional add, pool, Linear) quantized by
    eager static, FX, dynamic (its Linear only) and pt2e."""
    torch.manual_seed(0)
    f = EagerNet().eval()
    data = _images()
    q_eager = copy.deepcopy(f)
    q_eager.qconfig = torch.ao.quantization.default_qconfig
    torch.ao.quantization.prepare(q_eager, inplace=True)
    with torch.no_grad():
        for batch in data:
            q_eager(batch)
    torch.ao.quantization.convert(q_eager, inplace=True)
    return f, {"eager": q_eager, "fx": _quantize(f, "fx", data),
               "dynamic": _quantize(f, "dynamic", data), "pt2e": _pt2e(f, data)}, data


@pytest.fixture(scope="module")
def mlp():
    f, variants, data = _mlp_variants()
    return f, variants, data, ns.compare(f, variants, data)


# ---------------------------------------------------------------- equal to comparing alone


@pytest.mark.parametrize("build", [_mlp_variants, _cnn_variants], ids=["mlp", "cnn"])
def test_each_variant_equals_comparing_it_alone_with_one_float_run_per_batch(build, float_runs):
    f, variants, data = build()
    report = ns.compare(f, variants, data)
    assert float_runs["float"] == len(data)  # not once per variant
    assert float_runs["quantized"] == len(data) * len(variants)
    assert list(report.variants) == list(variants)
    for name, q in variants.items():
        alone = ns.compare(f, q, data)
        _close(report.variants[name], alone, name)
        assert report.variants[name].notes == alone.notes
    first = next(iter(variants))
    assert dataclasses.replace(report, variants={}, aligned=()) == report.variants[first]
    assert not any("float model ran" in n for n in report.notes)  # one capture: one float run


def test_llm_variants_keep_their_llm_metrics_and_the_best_is_the_lowest_kl(float_runs):
    pytest.importorskip("transformers")
    from torchao.quantization import quantize_

    from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches

    f = tiny_llama()
    data = tiny_llm_batches()
    variants = {}
    for mode in ("int4-weight-only", "int8-weight-only"):
        q = copy.deepcopy(f)
        quantize_(q, torchao_config(mode), filter_fn=untied_linears(q))
        variants[mode] = q
    report = ns.compare(f, variants, data)
    assert float_runs["float"] == len(data)
    for name, q in variants.items():
        alone = ns.compare(f, q, data)
        _close(report.variants[name], alone, name)
        assert {"kl", "top1_agreement", "ppl_quantized"} <= set(alone.model_output)
        assert len(report.variants[name].blocks) == 2  # tiny Llama: its two decoder layers
    kl = {name: r.model_output["kl"] for name, r in report.variants.items()}
    assert kl["int8-weight-only"] < kl["int4-weight-only"]
    assert report.best_variant == "int8-weight-only"  # by KL, the LLM measure
    assert f"best: int8-weight-only (per-token KL {kl['int8-weight-only']:.4g} nats" in (
        report.summary())


def test_a_variant_of_another_float_capture_runs_its_own_float_model_and_says_so(float_runs):
    torch.manual_seed(0)
    f = MLP().eval()
    data = _vectors()
    q_fx, q_pt2e = _quantize(f, "fx", data), _pt2e(f, data)
    exported = ns.match(f, q_pt2e, data[0], capture="export")  # ATen node names: not fx's
    report = ns.compare(f, {"fx": q_fx, "pt2e": q_pt2e}, data, matching={"pt2e": exported})
    assert float_runs["float"] == 2 * len(data)
    assert any("the float model ran 2 times per batch" in n for n in report.notes)
    _close(report.variants["pt2e"], ns.compare(f, q_pt2e, data, capture="export"), "pt2e")
    _close(report.variants["fx"], ns.compare(f, q_fx, data), "fx")
    names = [dict(zip(report.variants, layer, strict=True)) for layer in report.aligned]
    assert {"fx": "fc3", "pt2e": "fc3"} in names  # aligned by name across captures


def test_variants_of_a_module_tree_capture_share_its_call_sites(float_runs):
    torch.manual_seed(0)
    f = CallsTwice().eval()
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    variants = {"dynamic": _quantize(f, "dynamic", data),
                "int8-dynamic": _quantize(f, "int8-dynamic", data)}
    report = ns.compare(f, variants, data)
    assert float_runs["float"] == len(data)
    assert report.aligned == (("fc", "fc"), ("fc#2", "fc#2"), ("out", "out"))
    for name, q in variants.items():
        _close(report.variants[name], ns.compare(f, q, data), name)


# ---------------------------------------------------------------- alignment


def test_rows_align_by_the_float_value_they_compare(mlp):
    _, _, _, report = mlp
    assert list(report.variants) == ["fx", "static", "dynamic", "pt2e", "int8-dynamic"]
    # FX fuses linear-relu (its fc1 compares relu's value); eager wraps in QuantWrapper;
    # dynamic and torchao leave the input and the ReLUs' own quantization out
    assert report.aligned == (
        ("x.quantize", "x.quantize", None, "x.quantize", None),
        (None, "module.fc1", "fc1", "fc1", "fc1"),
        ("fc1", "module.relu", "relu", "relu", "relu"),
        (None, "module.fc2", "fc2", "fc2", "fc2"),
        ("fc2", "module.relu#2", "relu#2", "relu#2", "relu#2"),
        ("fc3", "module.fc3", "fc3", "fc3", "fc3"),
    )
    layers = ns.report.variants.aligned_layers(report)
    assert [layer.name for layer in layers] == ["x.quantize", "fc1", "relu", "fc2", "relu#2",
                                                "fc3"]  # the name most variants give it
    assert layers[2].rows["fx"].kind == "linear-relu" and layers[2].kind == "relu"


def test_observe_values_instruments_named_values_and_refuses_unknown_ones():
    torch.manual_seed(0)
    f = MLP().eval()
    m = ns.match(f, _quantize(f, "dynamic", _vectors()))
    seen = ns.OutputLogger()
    model = observe_values(m, "float", {("", "relu", 0): seen})
    x = torch.randn(2, 16)
    assert torch.equal(model(x), f(x))
    assert torch.equal(seen.stats["tensor_val"][0], torch.relu(f.fc1(x)))
    with pytest.raises(ns.InstrumentationError, match="no node 'nope' at ''"):
        observe_values(m, "float", {("", "nope", 0): seen})
    with pytest.raises(ns.InstrumentationError, match="no call site 1 at '' .it has 1."):
        observe_values(m, "float", {("", "relu", 1): seen})


# ---------------------------------------------------------------- summary and renderings


def test_the_summary_names_the_best_variant_and_where_each_loses(mlp):
    _, variants, _, report = mlp
    sqnr = {name: r.model_output["sqnr"] for name, r in report.variants.items()}
    best = max(sqnr, key=sqnr.get)
    assert report.best_variant == best
    summary = report.summary()
    assert summary.startswith("5 variants (fx, static, dynamic, pt2e, int8-dynamic); 3 batches; "
                              "6 layers aligned; best: " + best)
    for name, r in report.variants.items():
        v = r.verdict
        expected = (v.culprit if v.kind == "culprit" else v.standouts[0] if v.standouts
                    else min((row for row in r.rows if row.shadow_sqnr is not None),
                             key=lambda row: row.shadow_sqnr).name)
        part = f"; {name} (model output SQNR {sqnr[name]:.2f} dB): "
        assert part in summary and expected in summary.split(part)[1].split("; ")[0]
    assert json.loads(report.to_json())["best_variant"] == best


def test_table_csv_html_and_notebook_show_a_column_group_per_variant(mlp, tmp_path):
    _, variants, _, report = mlp
    text = report.table()
    header = text.splitlines()[0].split()
    assert header[:2] == ["layer", "kind"] and header.count("fx") == 2  # output, shadow
    assert "model output:" in text and text.splitlines()[-1] == report.summary()
    assert str(report) == text
    md = report.table("github", sort="shadow_sqnr", top_k=2).splitlines()
    # header, rule, two rows; a blank line and "model output:"; its header, rule and five
    # rows; the summary
    assert "| fx output SQNR" in md[0] and len(md) == 2 + 2 + 2 + 2 + 5 + 1
    rows = list(csv.DictReader(io.StringIO(report.to_csv(tmp_path / "r.csv").read_text())))
    assert [r["layer"] for r in rows] == ["x.quantize", "fc1", "relu", "fc2", "relu#2", "fc3",
                                          "(model output)"]
    assert rows[1]["fx_output_sqnr"] == "" and rows[1]["static_layer"] == "module.fc1"
    assert float(rows[2]["dynamic_output_sqnr"]) == report.variants["dynamic"].row(
        "relu").output_sqnr
    assert float(rows[-1]["pt2e_output_sqnr"]) == report.variants["pt2e"].model_output["sqnr"]
    page = report.to_html(tmp_path / "r.html").read_text()
    assert page.count("<details>") == len(variants) and "Best: " + report.best_variant in page
    assert report._repr_html_().count("<svg") == 2  # output and shadow SQNR, a line per variant


def test_the_chart_draws_one_line_per_variant_with_a_legend(mlp):
    _, variants, _, report = mlp
    svg = ET.fromstring(variants_chart(report, "output_sqnr"))
    ns_svg = "{http://www.w3.org/2000/svg}"
    legend = [t.text for t in svg.iter(f"{ns_svg}text") if t.text in variants]
    assert legend == list(variants)
    colours = {p.get("stroke") for p in svg.iter(f"{ns_svg}polyline")}
    assert len(colours) == len(variants)  # each variant's line in its own colour
    _, _, width, _ = (float(v) for v in svg.get("viewBox").split())
    assert all(float(r.get("x")) + 10 <= width for r in svg.iter(f"{ns_svg}rect")
               if r.get("class") != "col")


def test_the_legend_wraps_when_variants_do_not_fit_one_line(mlp):
    _, _, _, report = mlp
    many = dataclasses.replace(report, variants={f"{name} with a long recipe name {i}": v
                                                 for i, (name, v) in
                                                 enumerate(report.variants.items())},
                               aligned=())
    svg = ET.fromstring(variants_chart(many, "output_sqnr"))
    rects = [r for r in svg.iter("{http://www.w3.org/2000/svg}rect") if r.get("class") != "col"]
    assert len({r.get("y") for r in rects}) > 1  # more than one legend line
    _, _, width, _ = (float(v) for v in svg.get("viewBox").split())
    assert max(float(r.get("x")) for r in rects) < width - 100


def test_a_multi_variant_report_round_trips_through_json_and_a_single_one_is_unchanged(mlp):
    f, variants, data, report = mlp
    loaded = ns.Report.from_json(report.to_json())
    assert loaded == report and loaded.table() == report.table()
    single = ns.compare(f, variants["fx"], data)
    data_single = json.loads(single.to_json())
    assert "variants" not in data_single and "aligned" not in data_single
    assert "best_variant" not in data_single
    assert ns.Report.from_json(single.to_json()) == single


def test_model_explorer_overlays_are_written_per_variant(mlp, tmp_path):
    _, variants, _, report = mlp
    written = report.to_model_explorer(tmp_path)
    assert {p.parent.name for p in written.values()} == set(variants)
    assert "output SQNR (dB), fx" in written


# ---------------------------------------------------------------- diff and check


def _broken_dynamic(variants):
    """The dynamic variant with fc2's bias moved by 0.5: a planted regression."""
    q = copy.deepcopy(variants["dynamic"])
    weight, bias = q.fc2._packed_params._weight_bias()
    q.fc2.set_weight_bias(weight, bias + 0.5)
    return q


def test_diff_goes_variant_by_variant_and_catches_a_regression_in_one(mlp, tmp_path):
    f, variants, data, report = mlp
    later = ns.compare(f, {**variants, "dynamic": _broken_dynamic(variants)}, data)
    diff = report.diff(later)
    assert diff.regressed and {c.variant for c in diff.regressions} == {"dynamic"}
    assert diff.change("fc2", "shadow.sqnr", "dynamic").regression
    assert not diff.change("module.fc2", "shadow.sqnr", "static").regression
    assert "dynamic: fc2 output SQNR" in diff.summary()
    assert diff.table().splitlines()[0].split()[0] == "variant"
    fewer = ns.compare(f, {k: variants[k] for k in ("fx", "dynamic")}, data)
    assert report.diff(fewer).vanished_variants == ("static", "pt2e", "int8-dynamic")
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    report.to_json(old)
    later.to_json(new)
    assert main(["diff", str(old), str(new)]) == 1
    assert main(["diff", str(old), str(old)]) == 0
    # a report of one quantized model against several: which variant it is must be said (it
    # was compared with the first one, whatever it had been made from)
    alone = ns.compare(f, variants["dynamic"], data)
    with pytest.raises(ns.InputError, match=r"5 variants \(fx, static.*Say which: diff"):
        alone.diff(report)
    against = alone.diff(report, variant="dynamic")
    assert not against.regressed and {c.variant for c in against.changes} == {"dynamic"}
    assert all(c.change == 0 for c in against.changes if c.metric != "batches")
    assert set(against.new_variants) == set(variants) - {"dynamic"}
    single = tmp_path / "single.json"
    alone.to_json(single)
    assert main(["diff", str(single), str(old)]) == 2
    assert main(["diff", str(single), str(old), "--variant", "dynamic"]) == 0
    # two reports of several variants diff variant by variant: variant= was ignored
    with pytest.raises(ns.InputError, match="variant='dynamic' says which variant .* both "
                                            "hold variants"):
        report.diff(later, variant="dynamic")


def test_check_applies_every_threshold_to_every_variant(mlp, tmp_path):
    f, variants, data, report = mlp
    later = ns.compare(f, {**variants, "dynamic": _broken_dynamic(variants)}, data)
    result = fxnumeric.testing.check_report(later, min_shadow_sqnr=20)
    assert not result.passed
    assert [str(x) for x in result.failures] == [
        "dynamic: [layers] min_shadow_sqnr = 20: fc2 shadow SQNR "
        f"{later.variants['dynamic'].row('fc2').shadow_sqnr:.4g} dB < 20 dB"]
    assert fxnumeric.testing.check_report(report, min_shadow_sqnr=20, min_output_sqnr=20).passed
    # x.quantize is FX's, eager's and pt2e's only: the pattern is answered, so it passes
    toml = tmp_path / "t.toml"
    toml.write_text('[layers."x.*"]\nmin_shadow_sqnr = 20\n[layers."nope*"]\nmin_shadow_sqnr = 1\n')
    found = fxnumeric.testing.check_report(report, toml)
    assert [str(x) for x in found.failures] == [
        "[layers.\"nope*\"]: the pattern 'nope*' matches no layer of the report (in any variant)"]
    # a threshold some variants cannot answer for want of the metric (x.quantize has no
    # weight) and the others for want of a layer is answered by none: it fails (it passed
    # with 0 checks, the two reasons counted apart)
    toml.write_text('[layers."x.*"]\nmin_weight_sqnr = 99\n')
    found = fxnumeric.testing.check_report(report, toml)
    assert not found.passed and found.checks == 1
    assert [str(x) for x in found.failures] == [
        '[layers."x.*"] min_weight_sqnr = 99: no layer it matches has weight SQNR measured '
        "(comparisons: weights, outputs, shadows, blocks) (in any variant)"]
    saved = tmp_path / "r.json"
    later.to_json(saved)
    assert main(["check", str(saved), "--min-shadow-sqnr", "20"]) == 1


# ---------------------------------------------------------------- errors


def test_mistakes_are_input_errors_that_name_the_variant(mlp):
    f, variants, data, _ = mlp
    with pytest.raises(ns.InputError, match="empty dict"):
        ns.compare(f, {}, data)
    with pytest.raises(ns.InputError, match="variant 'same' is the float model object"):
        ns.compare(f, {"same": f}, data)
    with pytest.raises(ns.InputError, match="matching must be one too"):
        ns.compare(f, {"fx": variants["fx"]}, data, matching=ns.match(f, variants["fx"]))
    with pytest.raises(ns.InputError, match="matching names 'other', which is not a variant"):
        ns.compare(f, {"fx": variants["fx"]}, data,
                   matching={"other": ns.match(f, variants["fx"])})
    with pytest.raises(ns.InputError, match="matching is a dict of variants' matchings"):
        ns.compare(f, variants["fx"], data, matching={"fx": ns.match(f, variants["fx"])})
    unrelated = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Conv2d(16, 4, 1)).eval(),
                                                       {nn.Linear})
    with pytest.raises(ns.InputError, match="variant 'odd': .*nothing paired"), pytest.warns(
            ns.FxNumericWarning, match="^variant 'odd': the quantized model has no quantized op"):
        ns.compare(f, {"fx": variants["fx"], "odd": unrelated}, data)


# ---------------------------------------------------------------- the CLI


def test_cli_report_takes_several_modes_pt2e_among_them(tmp_path, capsys):
    saved = tmp_path / "r.json"
    assert main(["report", "--model", "_flow_pairs:MLP", "--quant", "fx,pt2e,dynamic",
                 "--input-shape", "4,16", "--batches", "2", "--no-progress",
                 "--json", str(saved)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:5] == ["layer", "kind", "fx", "fx", "pt2e"]
    assert "3 variants (fx, pt2e, dynamic); 2 batches" in out.splitlines()[-1]
    loaded = ns.Report.from_json(saved)
    assert list(loaded.variants) == ["fx", "pt2e", "dynamic"] and loaded.best_variant
    assert not any("float model ran" in n for n in loaded.notes)  # pt2e shares the float run
    assert main(["report", "--model", "_flow_pairs:MLP", "--quant", "fx,dynamic",
                 "--input-shape", "4,16", "--batches", "2", "--no-progress", "--format", "csv",
                 "-o", str(tmp_path / "r.csv")]) == 0
    assert "fx_output_sqnr" in (tmp_path / "r.csv").read_text().splitlines()[0]


def test_cli_advise_chooses_among_modes_pt2e_among_them(capsys):
    assert main(["advise", "--model", "_flow_pairs:MLP", "--quant", "fx,pt2e", "--input-shape",
                 "4,16", "--batches", "2", "--no-progress", "--target", "30"]) == 0
    out = capsys.readouterr().out
    assert "the variants come from fx+pt2e" in out and ": pt2e" in out


def test_cli_help_example_quantizes_static_after_other_modes(tmp_path, capsys):
    """--help's `--quant fx,pt2e,static` exited 2: the float model was loaded for the first mode
    (plain resnet18) and static quantized it eagerly, its `out += identity` then adding
    quantized tensors. With static among the modes, torchvision's quantizable model (the same
    weights) is the float model of every variant."""
    from fxnumeric.models import build_pair, calibrate_batchnorm, load_float_model, random_batches

    shape = (1, 3, 16, 16)
    common = ["report", "--model", "torchvision:resnet18", "--input-shape", "1,3,16,16",
              "--batches", "1", "--comparisons", "outputs", "--no-progress"]
    saved = {mode: tmp_path / f"{mode}.json" for mode in ("fx,pt2e,static", "static")}
    for mode, path in saved.items():
        assert main([*common, "--quant", mode, "--json", str(path)]) == 0, mode
        assert "Traceback" not in capsys.readouterr().err
    variants = ns.Report.from_json(saved["fx,pt2e,static"]).variants
    assert list(variants) == ["fx", "pt2e", "static"]
    static = ns.Report.from_json(saved["static"])
    # the oracle: the static pair the single mode builds, run by hand on the command's batch
    built = build_pair("torchvision:resnet18", "static", random_batches(shape, 2, seed=1))
    x = random_batches(shape, 1, seed=0)[0]
    with torch.no_grad():
        ref, actual = built.float_model(x).double(), built.quant_model(x).double()
    sqnr = 10 * math.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())
    # compare sums in float32, to 1e-6 relative (metrics.energy); this float64 oracle read
    # 1.06e-6 dB apart once the whole suite had run before it
    assert variants["static"].model_output["sqnr"] == pytest.approx(sqnr, rel=1e-6)
    assert variants["static"].model_output == static.model_output
    assert [(r.name, r.output) for r in variants["static"].rows] == [
        (r.name, r.output) for r in static.rows]
    # the quantizable model is the plain one's float function: fx and pt2e quantize the
    # same float model as alone
    plain = load_float_model("torchvision:resnet18", "fx")
    calibrate_batchnorm(plain, shape)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).double(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("argv, message", [
    (["report", "--quant", "fx,dynamic", "--why"], "--why looks into one quantized model"),
    (["report", "--quant", "fx,fx"], "names a mode twice"),
    (["match", "--quant", "fx,dynamic"], "several modes are for `fxnumeric report`"),
])
def test_cli_mistakes_with_several_modes_exit_2(argv, message, capsys):
    command, rest = argv[0], argv[1:]
    assert main([command, "--model", "_flow_pairs:MLP", "--input-shape", "4,16",
                 "--no-progress", *rest]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_int4_leaves_float_the_linears_its_groups_of_32_do_not_divide():
    """--quant int4-weight-only on a Linear(10, 32) stopped the CLI with an internal error
    (torchao's AssertionError on the group size); it is left float, with a warning naming it,
    and the other Linears are quantized as quantize_ quantizes them alone."""
    from torchao.quantization import quantize_

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    with pytest.warns(ns.FxNumericWarning, match=r"groups of 32 input features; 1 Linear "
                                                 r"cannot .* stays float: 0 \(10 input"):
        q = _quantize(f, "int4-weight-only", [torch.randn(4, 10)])
    assert torch.equal(q[0].weight, f[0].weight)  # float, the float model's values
    alone = copy.deepcopy(f[2])
    quantize_(alone, torchao_config("int4-weight-only"), filter_fn=None)
    assert type(q[2].weight) is type(alone.weight) is not nn.Parameter
    assert torch.equal(q[2].weight.dequantize(), alone.weight.dequantize())
    assert type(f[2].weight) is nn.Parameter  # the float model is untouched


def test_a_variant_that_quantized_nothing_is_not_ranked_but_a_fake_quant_one_is():
    """A recipe that matches none of the model's layers leaves the float model: its KL is 0 /
    its SQNR inf, and naming it best would send the user to an unquantized model."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    f = MLP().eval()
    data = _vectors()
    qat = prepare_qat_fx(copy.deepcopy(f).train(), get_default_qat_qconfig_mapping("x86"),
                         (data[0],))
    with torch.no_grad():
        for batch in data:
            qat(batch)  # observers see the data: the fake-quants round from here on
    variants = {"none": torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Conv2d}),
                "dynamic": _quantize(f, "dynamic", data), "qat": qat.eval()}
    report = ns.compare(f, variants, data)
    none = report.variants["none"]
    assert none.model_output["sqnr"] == math.inf and not any(r.quantized for r in none.rows)
    qat_report = report.variants["qat"]
    assert not any(r.quantized for r in qat_report.rows)  # fake-quants: rounded, not quantized
    # the ranking, by model output SQNR, of the variants that quantize something
    sqnr = {n: report.variants[n].model_output["sqnr"] for n in ("dynamic", "qat")}
    assert all(math.isfinite(v) for v in sqnr.values())
    best = max(sqnr, key=sqnr.get)
    assert report.best_variant == best
    assert ns.report.variants.standings(report) == sorted(sqnr.items(), key=lambda kv: -kv[1])
    assert "none quantized nothing, not ranked" in report.summary()
    table = report.table()
    rank_row = next(line for line in table.splitlines() if line.startswith("none "))
    assert rank_row.rstrip().endswith("quantized nothing")
    alone = ns.compare(f, {"none": variants["none"], "also": copy.deepcopy(f)}, data)
    assert alone.best_variant is None
    assert "no best variant: no variant quantized anything" in alone.summary()
    page = alone._repr_html_()
    assert "Best:" not in page and "No best variant: no variant quantized anything" in page


def test_a_poisoned_layer_leads_a_multi_variant_table_worst_first_as_in_one_report():
    # NaN is the worst value a row can hold: one report's rows put it first, the variants'
    # table put it last (behind every number), so top_k hid the layer that was poisoned
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)]).eval()
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    data = [torch.randn(4, 8) for _ in range(2)]
    report = ns.compare(model, {"a": quant, "b": copy.deepcopy(quant)}, data, progress=False)

    def poisoned(r):  # NaN in layer 3's shadow SQNR of variant a only
        return dataclasses.replace(r, rows=tuple(
            dataclasses.replace(x, shadow={**x.shadow, "sqnr": math.nan}) if x.name == "3"
            else x for x in r.rows))

    variants = {"a": poisoned(report.variants["a"]), "b": report.variants["b"]}
    both = dataclasses.replace(report, variants=variants)
    assert variants["a"].sorted_rows(top_k=2)[0].name == "3"  # one report: NaN first
    lines = both.table(top_k=2).splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("---"))
    assert lines[rule + 1].split()[0] == "3"
    others = [r.name for r in report.variants["b"].rows if r.name != "3"]
    assert lines[rule + 2].split()[0] == min(others, key=lambda n: min(
        v.row(n).shadow_sqnr for v in report.variants.values()))  # then the lowest number
