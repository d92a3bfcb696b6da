"""The graph view: one condensed picture per side, built once by match() and read by every stage."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

import fxnumeric as ns
from fxnumeric import GraphView

try:  # tests/ on sys.path (pytest's default rootdir-based import mode)
    from _models import module_inputs
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests._models import module_inputs


class _ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.drop(self.relu(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def _fx_pair(reference: bool = False):
    torch.manual_seed(0)
    f = _ConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    q = convert_to_reference_fx(prepared) if reference else convert_fx(prepared)
    return f, q, x


def test_view_condenses_plumbing_and_resolves_producers():
    view = GraphView(ns.trace(_ConvNet().eval()))
    drop = view.node("drop")
    assert not view.is_op(drop)
    assert view.producer(drop) is view.node("relu")
    assert [n.name for n in view.consumers(view.node("relu"))] == ["mean"]
    assert [n.name for n in view.inputs(view.node("mean"))] == ["relu"]
    assert view.op_class(view.node("conv")).kind == "conv2d"
    assert [n.name for n in view.ops()] == ["conv", "relu", "mean", "fc"]
    assert [view.position(n) for n in view.nodes] == list(range(len(view.nodes)))
    # the networkx graph is the same condensed graph
    assert set(view.graph.successors(view.node("relu"))) == {view.node("mean")}


def test_matching_owns_the_views_and_answers_lookups():
    f, q, _ = _fx_pair()
    m = ns.match(f, q)
    assert m.quant_graph is q  # a GraphModule is read as it is, not copied
    assert m.float_view.gm is m.float_graph and m.quant_view.gm is m.quant_graph
    for p in m.pairs:
        assert m.pair(p.name) is p
        for n in p.quant_nodes:
            assert m.pair_of(m.quant_view.node(n)) is p
        for n in p.float_nodes:  # a model input stays an input (the input quantize's pair)
            node = m.float_view.node(n)
            assert m.pair_of(node) is (None if node.op == "placeholder" else p)
        float_out, quant_out = m.output_nodes(p)
        assert float_out.name == p.float_nodes[-1]
        assert m.float_counterpart(m.quant_view.node(p.quant_nodes[-1])) is float_out
    conv = m.pair("conv")  # conv-relu, fused by convert_fx
    assert m.quant_counterpart(m.output_nodes(conv)[0]).name == conv.quant_nodes[-1]
    assert m.quant_counterpart(m.float_view.node("conv")) is None  # inside the fused chain


def test_reference_models_are_observed_after_their_output_quantize():
    f, q, x = _fx_pair(reference=True)
    m = ns.match(f, q)
    conv = m.pair("conv")
    _, quant_out = m.output_nodes(conv)
    # conv -> quantize_per_tensor -> dequantize -> relu: the value relu reads is quantized
    assert quant_out.name != conv.quant_nodes[-1]
    assert m.quant_view.op_class(quant_out).role in ("optional", "plumbing")
    float_gm, quant_gm = ns.add_loggers(f, q, matching=m)
    float_gm(x)
    quant_gm(x)
    logged = ns.loggers_of(quant_gm)["conv"].stats["tensor_val"][0]
    values = logged.dequantize() if logged.is_quantized else logged
    quantize = quant_out if quant_out.op == "call_function" and "quantize" in str(quant_out.target) \
        else quant_out.args[0]
    scale = float(getattr(q, quantize.args[1].target))
    # the logged value lies on the output quantizer's grid: it is what the next op reads
    assert torch.allclose(values / scale, (values / scale).round(), atol=1e-3)
    float_logged = ns.loggers_of(float_gm)["conv"].stats["tensor_val"][0]
    assert not torch.allclose(float_logged / scale, (float_logged / scale).round(), atol=1e-3)


def test_instrument_is_the_one_building_block(make_fx_resnet18_pair):
    f, q, data = make_fx_resnet18_pair()
    x = data[0][0]
    m = ns.match(f, q)
    built = ns.instrument(
        m, outputs=lambda p: (ns.OutputLogger(), ns.OutputLogger()),
        shadows=lambda p: ns.ShadowLogger(), select=lambda p, _: p.quantized)
    names = {p.name for p in m.pairs if p.quantized}
    assert set(built.float_observers) == set(built.quant_observers) == names
    assert set(built.shadow_observers) | set(built.skipped) == names
    with torch.no_grad():
        assert torch.equal(built.quant_model(x), q(x))
        built.float_model(x)
    for name in built.shadow_observers:
        stats = built.shadow_observers[name].stats
        assert len(stats["float"]) == len(stats["quantized"]) >= 1
        assert ns.sqnr(stats["float"][0], stats["quantized"][0]) > 10
    # a shadow-only instrumentation leaves the float side alone: the float model as captured
    assert ns.instrument(m, shadows=lambda p: ns.ShadowLogger()).float_model is m.float_graph


def test_a_matching_from_other_models_is_an_error(make_lstm_pair):
    f, q, _, _ = make_lstm_pair()
    m = ns.match(f, q)
    other_f, other_q, _, _ = make_lstm_pair()
    with pytest.raises(ns.InstrumentationError, match="not the one `matching` was built from"):
        ns.add_loggers(other_f, q, matching=m)
    with pytest.raises(ns.InstrumentationError, match="quantized model passed is not the one"):
        ns.add_shadows(f, other_q, matching=m)
    with pytest.raises(ns.InstrumentationError, match="not the one"):
        ns.compare(f, other_q, [torch.zeros(1)], matching=m)
    float_gm, quant_gm = ns.add_loggers(None, None, matching=m)  # the matching alone is enough
    assert set(ns.loggers_of(quant_gm)) == {p.name for p in m.pairs}


def test_nothing_is_stored_on_user_models(make_resnet18_pair):
    f, q, data = make_resnet18_pair()
    before = (sorted(f.__dict__), sorted(q.__dict__))
    ns.compare_model_outputs(f, q, data[0][0])
    ns.prepare_model_outputs(f, q)
    assert sorted(q.__dict__) == sorted(before[1] + ["forward"])  # the in-place forward only
    ns.remove_instrumentation(f)
    ns.remove_instrumentation(q)
    assert (sorted(f.__dict__), sorted(q.__dict__)) == before


def test_a_layer_left_float_hands_on_the_value_the_next_quantized_layer_reads():
    # convert_fx quantizes the float layer's output for the next quantized layer; that
    # layer's shadow reads the rounded value, so the rounding is the float layer's: observed
    # before the quantize (as until the sweep's finding F1), its row read inf and the
    # rounding was in no row
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    qconfig = get_default_qconfig_mapping("x86").set_module_name("0", None)
    prepared = prepare_fx(copy.deepcopy(f), qconfig, (x,))
    prepared(x)
    q = convert_fx(prepared)
    m = ns.match(f, q)
    first = m.pair("0")
    assert not first.quantized
    _, quant_out = m.output_nodes(first)
    assert quant_out.target is torch.quantize_per_tensor
    assert quant_out.args[0].name == first.quant_nodes[-1]
    # the oracle: what the quantized model's second Linear reads (an fx Interpreter)
    read = module_inputs(q, x)
    with torch.no_grad():
        ref = f[0](x).double()
    error = (ref - read["1"].dequantize().double()).square().sum()
    direct = float(10 * torch.log10(ref.square().sum() / error))
    row = ns.compare(f, q, [x], progress=False).row("0")
    assert row.output_sqnr == pytest.approx(direct, abs=1e-3) and direct < 60
    assert row.shadow["sqnr"] == pytest.approx(direct, abs=1e-3)  # the layer itself is exact
