"""compare (weights): float and quantized weights paired through the graph."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import fxnumeric as ns
from fxnumeric import sqnr

try:  # tests/ on sys.path (pytest's default rootdir-based import mode)
    from _models import ScaledLinear, conv1d_as_linear
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests._models import ScaledLinear, conv1d_as_linear


def test_unfused_float_weights_are_bn_folded(make_resnet18_pair, make_resnet18_unfused_pair):
    fused, qmodel, _ = make_resnet18_pair()
    unfused, _, _ = make_resnet18_unfused_pair()
    ours = ns.compare_weights(unfused, qmodel)
    by_name = ns.compare_weights(fused.state_dict(), qmodel.state_dict())
    assert list(ours) == list(by_name)
    for key in ("conv1.weight", "layer2.0.downsample.0.weight", "fc._packed_params._packed_params"):
        assert torch.allclose(ours[key]["float"], by_name[key]["float"], atol=1e-6), key
        assert torch.equal(ours[key]["quantized"].int_repr(), by_name[key]["quantized"].int_repr())
    # the raw (unfolded) conv weight is a different tensor: name matching would compare it
    assert not torch.allclose(unfused.conv1.weight, ours["conv1.weight"]["float"])


def test_dynamic_gru_weights_are_paired_per_layer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.fc = nn.GRU(8, 16, 2), nn.Linear(16, 4)

        def forward(self, x):
            return self.fc(self.gru(x)[0])

    torch.manual_seed(0)
    f = Net().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.GRU, nn.Linear})
    w = ns.compare_weights(f, q)
    assert list(w) == [
        "gru._all_weight_values.0.param.weight_ih", "gru._all_weight_values.0.param.weight_hh",
        "gru._all_weight_values.1.param.weight_ih", "gru._all_weight_values.1.param.weight_hh",
        "fc._packed_params._packed_params",
    ]
    assert torch.equal(w["gru._all_weight_values.1.param.weight_hh"]["float"], f.gru.weight_hh_l1)
    assert all(sqnr(v["float"], v["quantized"]) > 35 for v in w.values())
    assert list(ns.compare_model_outputs(f, q, torch.randn(5, 3, 8))) == ["gru.stats", "fc.stats"]


def test_fx_quantized_weights_and_stubs(make_fx_resnet18_pair):
    float_model, qmodel, data = make_fx_resnet18_pair()
    w = ns.compare_weights(float_model, qmodel)
    assert len(w) == 21 and list(w)[0] == "conv1.weight" and list(w)[-1] == "fc._packed_params._packed_params"
    assert all(sqnr(v["float"], v["quantized"]) > 30 for v in w.values())
    stubs = ns.compare_model_stub(float_model, qmodel, [nn.Conv2d, nn.Linear], data[0][0])
    assert len(stubs) == 21 and "layer4.1.conv2.stats" in stubs
    s = stubs["conv1.stats"]
    assert s["float"][0].shape == s["quantized"][0].shape and sqnr(s["float"][0], s["quantized"][0]) > 25


class _Functional(nn.Module):
    """Weights held as plain parameters and used through functional ops."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.lw = nn.Parameter(torch.randn(16, 8 * 6 * 6))
        self.lb = nn.Parameter(torch.randn(16))

    def forward(self, x):
        x = torch.relu(nn.functional.conv2d(x, self.w, None, [1, 1], [0, 0], [1, 1], 1))
        return nn.functional.linear(x.flatten(1), self.lw, self.lb)


@pytest.mark.parametrize("dynamic", [False, True])
def test_functional_weights_of_convert_fx_are_compared(dynamic):
    """convert_fx turns F.conv2d / F.linear into quantized ops reading packed weights through
    get_attr: they had no weight comparison. Oracles: torch's FX Numeric Suite
    (extract_weights) for the static pair; for the dynamic one, which it cannot pair
    (GraphMatchingException: "not related"), the packed weight unpacked directly."""
    from torch.ao.ns import _numeric_suite_fx as ns_fx
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig
    from torch.ao.quantization import get_default_qconfig_mapping as mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = _Functional().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qconfig = QConfigMapping().set_global(default_dynamic_qconfig) if dynamic else mapping("x86")
    prepared = prepare_fx(copy.deepcopy(f), qconfig, (x,))
    prepared(x)
    q = convert_fx(prepared)
    ours = ns.extract_weights(ns.match(f, q))
    quantized = {k: v for k, v in ours.items() if v["quantized"].is_quantized}
    if dynamic:
        (packed,) = [n.args[1].target for n in q.graph.nodes
                     if n.target is torch.ops.quantized.linear_dynamic]
        unpacked = torch.ops.quantized.linear_unpack(getattr(q, packed))[0]
        expected = {"linear.weight": (f.lw, unpacked)}
    else:
        theirs = ns_fx.extract_weights("float", f, "quantized", q)
        expected = {f"{'conv2d' if 'conv' in name else name}.weight":
                    (entry["weight"]["float"][0]["values"][0],
                     entry["weight"]["quantized"][0]["values"][0])
                    for name, entry in theirs.items()}
    assert sorted(quantized) == sorted(expected) == (
        ["linear.weight"] if dynamic else ["conv2d.weight", "linear.weight"])
    for key, (float_weight, quant_weight) in expected.items():
        assert torch.equal(quantized[key]["float"], float_weight)
        assert torch.equal(quantized[key]["quantized"].int_repr(), quant_weight.int_repr())
    report = ns.compare(f, q, [(x,)], comparisons=("weights",))
    assert report.row("linear").weight_sqnr == pytest.approx(
        sqnr(f.lw, expected["linear.weight"][1].dequantize()), rel=1e-6)


def test_a_functional_conv1d_weight_has_the_float_weights_shape():
    """torch packs a 1d convolution as a 2d one: unpacked, its weight is [out, in, 1, k]
    against the float [out, in, k] (the weight SQNR read NaN). Oracle: conv1d_unpack."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    class Conv1d(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3))

        def forward(self, x):
            return nn.functional.conv1d(x, self.w, None, [1], [0], [1], 1)

    torch.manual_seed(0)
    f = Conv1d().eval()
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    q = convert_fx(prepared)
    (packed,) = [n.args[1].target for n in q.graph.nodes
                 if n.target is torch.ops.quantized.conv1d]
    expected = torch.ops.quantized.conv1d_unpack(getattr(q, packed))[0]
    assert expected.shape == f.w.shape
    ours = ns.extract_weights(ns.match(f, q))["conv1d.weight"]
    assert torch.equal(ours["quantized"].int_repr(), expected.int_repr())
    report = ns.compare(f, q, [(x,)], comparisons=("weights",))
    assert report.row("conv1d").weight_sqnr == pytest.approx(
        sqnr(f.w, expected.dequantize()), rel=1e-6)


def test_gpt2_conv1d_weights_are_read_as_the_linear_they_became():
    """GPT-2's Conv1D stores its weight (in, out); converted to nn.Linear (out, in) before
    quantizing, its weight SQNR compared the two layouts as they are: nan for c_attn (other
    shapes), -2.8 dB for the square c_proj. Oracle: the dequantized Linear weight."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=1, n_head=4,
                                     n_positions=32)
    torch.manual_seed(0)
    f = transformers.GPT2LMHeadModel(config).eval()
    q = torch.ao.quantization.quantize_dynamic(conv1d_as_linear(copy.deepcopy(f)), {nn.Linear})
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    report = ns.compare(f, q, [{"input_ids": ids}], comparisons=("weights",), progress=False)
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                 "transformer.h.0.mlp.c_fc"):
        wf = f.get_submodule(name).weight.t().double()
        wq = q.get_submodule(name).weight().dequantize().double()
        want = 10 * math.log10(float((wf ** 2).sum() / ((wf - wq) ** 2).sum()))
        assert report.row(name).weight_sqnr == pytest.approx(want, abs=1e-6), name
    # diagnose reads output channels as rows: the (out, in) layout
    d = ns.diagnose(f, q, [{"input_ids": ids}], progress=False)
    w = f.get_submodule("transformer.h.0.mlp.c_fc").weight.t().double()
    ranges = w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)
    assert d.layer("transformer.h.0.mlp.c_fc").channel_outlier_ratio == pytest.approx(
        float(ranges.max() / ranges.median()))


def test_a_float16_reference_linear_shows_the_weight_it_computes_with():
    """convert_to_reference_fx under float16_dynamic_qconfig: the reference Linear computes
    with get_weight(), the float weight itself (its output equals the float layer's), where
    get_quantized_weight() is a float16 copy: weight SQNR read 73.7 dB of error the model does
    not have."""
    from torch.ao.quantization import QConfigMapping, float16_dynamic_qconfig
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8)).eval()
    data = [torch.randn(8, 16) for _ in range(2)]
    prepared = prepare_fx(copy.deepcopy(f), QConfigMapping().set_global(float16_dynamic_qconfig),
                          (data[0],))
    ref = convert_to_reference_fx(prepared)
    layer = ref.get_submodule("2")
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), f[2](x))  # the oracle: it computes as the float layer
    report = ns.compare(f, ref, data, progress=False)
    assert report.row("2").weight_sqnr == math.inf
    weights = ns.compare_weights(f, ref)
    assert torch.equal(weights["2.weight"]["quantized"], f[2].weight)


class _Cells(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.cell, self.gru = nn.Linear(4, 8), nn.LSTMCell(8, 8), nn.GRUCell(8, 8)

    def forward(self, x):
        h, c = self.cell(self.fc(x))
        return self.gru(h, c)


def test_a_dynamic_recurrent_cell_s_weights_are_compared():
    """A dynamic LSTMCell/GRUCell keeps its weights behind get_weight(), with no `weight`:
    their rows read no weight SQNR, as if the cells were float. Oracle: SQNR pooled over the
    float cell's weight_ih and weight_hh against get_weight()'s."""
    torch.manual_seed(0)
    f = _Cells().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f),
                                               {nn.Linear, nn.LSTMCell, nn.GRUCell})
    report = ns.compare(f, q, [torch.randn(2, 4)])
    for name in ("cell", "gru"):
        quantized = getattr(q, name).get_weight()
        signal = noise = 0.0
        for part in ("weight_ih", "weight_hh"):
            w, qw = getattr(getattr(f, name), part).double(), quantized[part].dequantize().double()
            signal += float(w.square().sum())
            noise += float((w - qw).square().sum())
        assert report.row(name).weight_sqnr == pytest.approx(10 * math.log10(signal / noise),
                                                             abs=1e-9)


def test_a_weight_of_1e38_behind_a_corrupted_scale_is_binned_and_diagnosed_where_it_lies():
    # compare raised torch's bare "bincount only supports ... non-negative" (the float32 bin
    # index overflowed), and diagnose read the error as "inf%" a lost bias
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8WeightOnlyConfig())
    with torch.no_grad():
        q[2].weight.scale[3] = 1e36  # one channel's weights reach 1.28e38, still finite
    data = [torch.randn(8, 16) for _ in range(2)]
    row = ns.compare(f, q, data, progress=False).row("2")
    fw, qw = f[2].weight.detach().double(), q[2].weight.dequantize().double()
    assert row.weight_sqnr == pytest.approx(
        10 * math.log10(float(fw.square().sum() / (qw - fw).square().sum())), rel=1e-9)
    hist = row.weight_histogram
    bins = len(hist.quant_counts)
    for weight, counts in ((fw, hist.float_counts), (qw, hist.quant_counts)):
        index = ((weight - hist.low) / (hist.high - hist.low) * bins).floor().clamp(0, bins - 1)
        assert list(counts) == torch.bincount(index.long().flatten(), minlength=bins).tolist()
    assert sum(hist.quant_counts[:bins // 2 - 1]) > 0  # channel 3's negative weights, far left
    assert row.below_floor and row.floor_cause == "scale"
    flag = next(x for x in ns.diagnose(f, q, data, progress=False).layer("2").flags
                if x.code.startswith("below_floor"))
    assert flag.code == "below_floor_scale" and "inf%" not in flag.text


def _pooled_sqnr(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """dB, float weights against quantized ones, energies and errors summed over the pairs."""
    signal = noise = 0.0
    for w, qw in pairs:
        w = w.detach().double()
        qw = (qw.dequantize() if qw.is_quantized else qw).detach().double()
        signal += float(w.square().sum())
        noise += float((w - qw).square().sum())
    return 10 * math.log10(signal / noise)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 8, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(16, 8)

    def forward(self, x):
        return self.gru(self.lstm(x)[0])[0]


def test_a_reference_lstm_and_gru_compare_the_weights_their_forward_computes_with():
    """convert_to_reference_fx under a dynamic qconfig: a reference LSTM/GRU holds neither
    `_all_weight_values` nor `get_quantized_weight`, and its row read no weight SQNR, no keys.
    Oracle: the float parameters against get_flat_weights(), the quantize-dequantized weights
    its forward runs with."""
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    torch.manual_seed(0)
    f = _Recurrent().eval()
    data = [torch.randn(5, 2, 16) for _ in range(2)]
    ref = convert_to_reference_fx(prepare_fx(
        copy.deepcopy(f), QConfigMapping().set_global(default_dynamic_qconfig), (data[0],)))
    report = ns.compare(f, ref, data, progress=False)
    weights = ns.compare_weights(f, ref)
    for name in ("lstm", "gru"):
        fmod, qmod = getattr(f, name), ref.get_submodule(name)
        flat = dict(zip(qmod._flat_weights_names, qmod.get_flat_weights(), strict=True))
        names = [n for n in fmod._flat_weights_names if n.startswith("weight")]
        row = report.row(name)
        assert row.weight_keys == tuple(f"{name}.{n}" for n in names)
        oracle = _pooled_sqnr([(getattr(fmod, n), flat[n]) for n in names])
        assert 40 < oracle < 60
        assert row.weight_sqnr == pytest.approx(oracle, abs=1e-9)
        assert row.note == ""
        for n in names:  # dequantized, each is the weight forward computes with
            assert torch.equal(weights[f"{name}.{n}"]["quantized"].dequantize(), flat[n])
            assert torch.equal(weights[f"{name}.{n}"]["float"], getattr(fmod, n))


def test_recurrent_weights_that_do_not_pair_one_to_one_say_why():
    """A quantized LSTM with other matrices than the float one's (a layer fewer): no weight
    SQNR, and a note saying why rather than a silently empty cell."""
    from torch.ao.nn.quantized.dynamic import LSTM as DynamicLSTM

    torch.manual_seed(0)
    f = _Recurrent().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.LSTM, nn.GRU})
    q.lstm = DynamicLSTM(16, 8, num_layers=1, bidirectional=True)
    report = ns.compare(f, q, [torch.randn(5, 2, 16)], progress=False)
    row = report.row("lstm")
    assert row.weight_sqnr is None and row.weight_keys == ()
    assert "weights not compared" in row.note and "one to one" in row.note
    assert "weight_ih_l1_reverse" in row.note
    assert report.row("gru").weight_sqnr is not None and report.row("gru").note == ""


def test_a_recurrent_layers_histogram_holds_every_matrix():
    # a 2-layer bidirectional LSTM has 8 weight matrices; its histogram showed weight_ih_l0
    # alone. The oracle: torch.histc over all of them, float and dequantized, in its range
    torch.manual_seed(0)
    f = nn.Sequential(nn.LSTM(6, 5, num_layers=2, bidirectional=True)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.LSTM})
    report = ns.compare(f, q, [torch.randn(3, 2, 6)], progress=False)
    hist = report.row("0").weight_histogram
    quantized = q[0]._weight_bias()["weight"]
    assert len(quantized) == 8
    floats = torch.cat([getattr(f[0], n).detach().flatten() for n in quantized])
    quants = torch.cat([w.dequantize().flatten() for w in quantized.values()])
    low = min(float(floats.min()), float(quants.min()))
    high = max(float(floats.max()), float(quants.max()))
    assert (hist.low, hist.high) == pytest.approx((low, high), abs=1e-7)
    assert list(hist.float_counts) == torch.histc(floats, 60, hist.low, hist.high).long().tolist()
    assert list(hist.quant_counts) == torch.histc(quants, 60, hist.low, hist.high).long().tolist()


def test_a_leaf_module_holding_a_quantized_linear_compares_its_weight():
    """leaf_modules=["block.inner"]: the module is one op, and the weights of the Linears inside
    it (one nested a level deeper, under a custom module counted as quantized for its
    child) used to be dropped without a word (weight_sqnr None, no note). Oracle: the SQNR of
    the two weights together, computed directly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(ScaledLinear(), nn.ReLU(), ScaledLinear()))
    model[1][0].fc = nn.Sequential(ScaledLinear())  # a Linear two custom modules down
    model.eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    report = ns.compare(model, q, [torch.randn(2, 8)], leaf_modules=["1"])
    inner = ("1.0.fc.0.fc", "1.2.fc")
    float_w = [model.get_submodule(p).weight.detach().double() for p in inner]
    quant_w = [q.get_submodule(p).weight().dequantize().double() for p in inner]
    signal = sum((w ** 2).sum() for w in float_w)
    noise = sum(((w - wq) ** 2).sum() for w, wq in zip(float_w, quant_w, strict=True))
    row = report.row("1")
    assert row.weight_sqnr == pytest.approx(10 * math.log10(signal / noise), rel=1e-9)
    assert row.weight_keys == tuple(f"{p}._packed_params._packed_params" for p in inner)
    assert "called whole: the weights of its layers 1.0.fc.0.fc, 1.2.fc compare here" in row.note
    assert not report.unmatched  # the user chose to keep it whole


def test_a_state_dict_of_a_data_parallel_model_is_named_with_the_one_to_pass():
    # every key of nn.DataParallel's state dict starts with `module.`: nothing paired, and the
    # warning sent the user to compare the models without saying why the names differ
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    wrapped = nn.DataParallel(f).state_dict()
    with pytest.warns(ns.FxNumericWarning, match=r"every key of the float state dict starts "
                      r"with `module\.` \(a DataParallel/DDP wrapper's\): pass the wrapped "
                      r"module's, float_model\.module\.state_dict\(\)"):
        assert ns.compare_weights(wrapped, q.state_dict()) == {}
    plain = ns.compare_weights(f.state_dict(), q.state_dict())  # the fix pairs both
    assert set(plain) == {"0._packed_params._packed_params", "2._packed_params._packed_params"}
    for key, pair in plain.items():
        layer = f.get_submodule(key.split(".")[0])
        assert torch.equal(pair["float"], layer.weight)
