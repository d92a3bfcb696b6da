"""Every feature on every flow and capture (issue 16): one small pair per flow
(``tests/_flow_pairs.py``), each feature parametrised across all of them.

Flows: eager, FX, reference FX, dynamic, QAT, pt2e, ``capture="export"``, torchao
``quantize_``, and models torch.fx cannot trace whole (Hugging Face BERT, GPT-2, Llama under
torchao, T5), fed dict batches with an attention mask. Where a feature claims a value, the test
reads it another way: the model output SQNR from the two models run directly, the quantized
model's end metric in sensitivity and advise from the same, diagnose's local SQNR from
compare's shadow SQNR, a one-layer advice from sensitivity's hybrid.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import fxnumeric as ns
from fxnumeric._tensors import first_output
from fxnumeric.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from _flow_pairs import FLOWS  # noqa: E402

pytest.importorskip("torchao")
pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=list(FLOWS))
def flow(request):
    return request.param, FLOWS[request.param]()


def _call(model, batch):
    with torch.no_grad():
        if isinstance(batch, dict):
            return model(**batch)
        return model(batch)


def _direct_sqnr(pair) -> float:
    signal = noise = 0.0
    for batch in pair.batches:
        ref = first_output(_call(pair.float_model, batch)).double()
        actual = first_output(_call(pair.quant_model, batch))
        actual = (actual.dequantize() if actual.is_quantized else actual).double()
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        if mask is not None and tuple(ref.shape[:2]) == tuple(mask.shape) and ref.dim() > 2:
            real = mask.bool()  # the model output reads real tokens only
            ref, actual = ref[real], actual[real]
        signal += float(ref.square().sum())
        noise += float((ref - actual).square().sum())
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@pytest.fixture(scope="module")
def report(flow):
    _, pair = flow
    return ns.compare(pair.float_model, pair.quant_model, pair.batches, capture=pair.capture)


def test_compare_pairs_layers_and_reads_the_model_output_as_the_models_give_it(flow, report):
    name, pair = flow
    names = [r.name for r in report.rows]
    assert names and len(names) == len(set(names)), names  # one row per call site
    quantized = [r for r in report.rows if r.quantized]
    assert quantized, name
    assert all(r.output_sqnr is not None and not math.isnan(r.output_sqnr) for r in quantized)
    assert sum(r.shadow_sqnr is not None for r in quantized) >= len(quantized) / 2
    assert report.model_output["sqnr"] == pytest.approx(_direct_sqnr(pair), abs=1e-3)


def test_turns_between_the_two_forwards_change_no_number(flow, report, monkeypatch):
    # with a budget of one byte the quantized model runs in turns with the float one
    # (fxnumeric.lockstep) at every value: the report must be the sequential run's
    import importlib

    compare_module = importlib.import_module("fxnumeric.compare")
    monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 1)
    monkeypatch.setattr(compare_module, "LOCKSTEP_SHARE", 1 << 60)
    name, pair = flow
    turns = ns.compare(pair.float_model, pair.quant_model, pair.batches, capture=pair.capture,
                       progress=False)
    assert [r.name for r in turns.rows] == [r.name for r in report.rows], name
    for a, b in zip(turns.rows, report.rows, strict=True):
        assert (a.output, a.shadow, a.floor_sqnr) == (b.output, b.shadow, b.floor_sqnr), a.name
    assert turns.model_output == report.model_output
    assert [(b.name, b.output, b.shadow) for b in turns.blocks] == \
        [(b.name, b.output, b.shadow) for b in report.blocks]


def test_compare_weights_pairs_every_quantized_weight(flow):
    name, pair = flow
    weights = ns.compare_weights(pair.float_model, pair.quant_model)
    assert weights, name
    for key, entry in weights.items():
        float_w, quant_w = entry["float"], entry["quantized"]
        quant_w = quant_w.dequantize() if quant_w.is_quantized else quant_w
        assert ns.sqnr(float_w, quant_w) > 15, key


def test_the_eager_api_logs_outputs_and_shadows(flow):
    name, pair = flow
    batch = pair.batches[0]
    f, q = pair.float_model, pair.quant_model
    outputs = ns.compare_model_outputs(f, q, batch)
    assert outputs, name
    for key, entry in outputs.items():
        assert len(entry["float"]) == len(entry["quantized"]) >= 1, key
    stubs = ns.compare_model_stub(f, q, [torch.nn.Linear, torch.nn.Conv2d], batch)
    # every flow quantizes its Linears or convs: something is shadowed (the plain float
    # module against its pt2e model shadowed nothing before)
    assert stubs, name
    assert all(len(v["float"]) == len(v["quantized"]) for v in stubs.values())


def test_sensitivity_and_advise_run_hybrids_of_every_capture(flow, report):
    name, pair = flow
    sens = ns.sensitivity(pair.float_model, pair.quant_model, pair.batches, metric="sqnr",
                          progress=False)
    assert sens.layers, name
    # the quantized model's end metric, read from the two models run directly
    assert sens.quantized == pytest.approx(_direct_sqnr(pair), abs=1e-3)
    for layer in sens.layers:
        assert not math.isnan(layer.only) and not math.isnan(layer.all_but), layer
    best = sens.ranking()[0]
    target = sens.layer(best).all_but
    advice = ns.advise(pair.float_model, pair.quant_model, pair.batches, metric="sqnr",
                       target=target, max_float_layers=1, progress=False)
    assert advice.curve[0] == pytest.approx(sens.quantized, abs=1e-6)
    # keeping the most sensitive layer float is the hybrid sensitivity measured
    assert advice.reached and advice.value == pytest.approx(target, abs=1e-6)


def test_diagnose_reads_each_layers_local_error_as_compare_does(flow, report):
    name, pair = flow
    diagnosis = ns.diagnose(pair.float_model, pair.quant_model, pair.batches, progress=False)
    assert diagnosis.layers, name
    names = {r.name for r in report.rows}
    for d in diagnosis.layers:
        row = report.row(d.name)
        single = f"{d.name}#2" not in names  # a layer called twice sums both call sites
        if row.shadow_sqnr is not None and d.local_sqnr is not None and single:
            assert d.local_sqnr == pytest.approx(row.shadow_sqnr, abs=0.01), d.name


def test_reports_render_and_round_trip(flow, report, tmp_path):
    assert report.table()
    assert report.to_html(tmp_path / "r.html").read_text().lower().startswith("<!doctype html>")
    assert ns.Report.from_json(report.to_json()) == report


def test_the_cli_reports_and_advises(flow, tmp_path, monkeypatch, capsys):
    name, pair = flow
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    spec = f"_flow_pairs:make_{name}"
    out = tmp_path / "r.json"
    status = main(["report", "--model", spec, *pair.cli, "--batches", "2", "--json", str(out)]
                  + (["--capture", pair.capture] if pair.capture != "fx" else []))
    assert status == 0, capsys.readouterr().err
    assert ns.Report.from_json(out).rows
    status = main(["advise", "--model", spec, *pair.cli, "--batches", "2", "--metric", "sqnr",
                   "--target", "-1000"]
                  + (["--capture", pair.capture] if pair.capture != "fx" else []))
    assert status == 0, capsys.readouterr().err


def test_no_call_changes_the_users_models(flow):
    """Every feature above leaves the models as they were: parameters, modules, hooks."""
    name, pair = flow
    f, q = pair.float_model, pair.quant_model

    def state(model):
        modules = dict(model.named_modules())
        return ({k: type(m) for k, m in modules.items()},
                sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules.values()),
                {k: v.clone() if isinstance(v, torch.Tensor) else v
                 for k, v in model.state_dict().items()})

    before = (state(f), state(q))
    ns.compare(f, q, pair.batches[:1], capture=pair.capture)
    ns.advise(f, q, pair.batches[:1], metric="sqnr", target=math.inf, max_float_layers=1,
              progress=False)
    after = (state(f), state(q))
    for (types_b, hooks_b, sd_b), (types_a, hooks_a, sd_a) in zip(before, after, strict=True):
        assert types_a == types_b and hooks_a == hooks_b
        for key, value in sd_b.items():
            if type(value) in (torch.Tensor, torch.nn.Parameter) and not value.is_quantized:
                assert torch.equal(value, sd_a[key]), key
