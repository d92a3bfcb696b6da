"""Matcher coverage: every quantized compute op paired, on the models users quantize.

The fast subset runs by default; ``pytest -m slow`` runs the rest of the zoo.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.ao.quantization import (
    QConfigMapping,
    default_eval_fn,
    get_default_qconfig,
    get_default_qconfig_mapping,
    quantize,
)
from torch.ao.quantization.quantize_fx import convert_fx, convert_to_reference_fx, prepare_fx

import fxnumeric as ns

_KW = {"googlenet": {"aux_logits": False, "init_weights": False},
       "inception_v3": {"aux_logits": False, "init_weights": False}}
_SIZE = {"inception_v3": 80}

FX_FAST = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "googlenet", "shufflenet_v2_x0_5",
           "mnasnet0_5", "squeezenet1_1", "regnet_x_400mf", "efficientnet_b0", "alexnet"]
FX_SLOW = ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v3_large", "mnasnet1_0",
           "efficientnet_v2_s", "regnet_y_400mf", "densenet121", "vgg11", "vgg11_bn", "squeezenet1_0",
           "shufflenet_v2_x1_0", "inception_v3"]
EAGER_FAST = ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5", "googlenet"]
EAGER_SLOW = ["resnet50", "mobilenet_v3_large", "inception_v3", "resnext101_32x8d"]


def _input(name: str) -> torch.Tensor:
    size = _SIZE.get(name, 64)
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def _assert_full(m: ns.Matching) -> None:
    missed = [u for u in m.unmatched_quant if u.quantized]
    assert m.coverage == 1.0, missed[:3]
    assert not m.unmatched_float, m.unmatched_float[:3]
    assert not m.unmatched_quant, m.unmatched_quant[:3]


def _fx(name: str) -> None:
    torch.manual_seed(0)
    float_model = getattr(torchvision.models, name)(weights=None, **_KW.get(name, {})).eval()
    x = _input(name)
    prepared = prepare_fx(copy.deepcopy(float_model), get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    for convert in (convert_fx, convert_to_reference_fx):
        qmodel = convert(copy.deepcopy(prepared))
        m = ns.match(float_model, qmodel)
        _assert_full(m)
        _assert_instrumentation_changes_nothing(float_model, qmodel, m, x)


def _assert_instrumentation_changes_nothing(float_model, qmodel, m, x) -> None:
    with torch.no_grad():
        ref_f, ref_q = float_model(x), qmodel(x)
        float_gm, quant_gm = ns.add_loggers(float_model, qmodel, matching=m)
        shadow_gm, skipped = ns.add_shadows(float_model, qmodel, matching=m)
        assert not skipped
        assert torch.equal(float_gm(x), ref_f)
        assert torch.equal(quant_gm(x), ref_q) and torch.equal(shadow_gm(x), ref_q)


def _eager(name: str) -> None:
    torch.manual_seed(0)
    unfused = getattr(torchvision.models.quantization, name)(weights=None, quantize=False, **_KW.get(name, {})).eval()
    fused = copy.deepcopy(unfused)
    fused.fuse_model()
    fused.qconfig = get_default_qconfig("x86")
    qmodel = quantize(fused, default_eval_fn, [[(_input(name), None)]], inplace=False)
    for float_model in (fused, unfused):
        m = ns.match(float_model, qmodel)
        _assert_full(m)
        _assert_instrumentation_changes_nothing(float_model, qmodel, m, _input(name))


@pytest.mark.parametrize("name", FX_FAST)
def test_fx_quantized_torchvision(name):
    _fx(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", FX_SLOW)
def test_fx_quantized_torchvision_slow(name):
    _fx(name)


@pytest.mark.parametrize("name", EAGER_FAST)
def test_eager_quantized_torchvision_fused_and_unfused(name):
    _eager(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", EAGER_SLOW)
def test_eager_quantized_torchvision_slow(name):
    _eager(name)


def test_partial_quantization_pairs_float_ops_too():
    torch.manual_seed(0)
    float_model = torchvision.models.resnet18(weights=None).eval()
    x = _input("resnet18")
    qconfig = QConfigMapping().set_global(get_default_qconfig("x86")).set_module_name("layer4", None).set_module_name("fc", None)
    prepared = prepare_fx(copy.deepcopy(float_model), qconfig, (x,))
    prepared(x)
    qmodel = convert_fx(prepared)
    m = ns.match(float_model, qmodel)
    _assert_full(m)
    left_float = {p.name for p in m.pairs if not p.quantized}
    assert {"layer4.0.conv1", "layer4.1.conv2", "add_7", "fc"} <= left_float
    report = ns.compare(float_model, qmodel, [x], comparisons=["shadows"], matching=m)
    assert report.row("add_7").shadow_sqnr == math.inf  # float vs float: no error added
    assert report.row("layer4.0.conv1").shadow_sqnr > 80  # only BN-folding rounding


class _Attention(nn.Module):
    """A transformer block in plain tensor ops: Linear, LayerNorm, softmax attention, GELU MLP."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.blocks = nn.Sequential(_Attention(), _Attention())
        self.head = nn.Linear(32, 5)

    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids)).mean(1))


def test_dynamic_transformer_encoder_in_plain_ops():
    torch.manual_seed(0)
    f = _Encoder().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    m = ns.match(f, q)
    _assert_full(m)
    assert sum(p.quantized for p in m.pairs) == 9  # qkv, proj, ff1, ff2 per block, and the head
    report = ns.compare(f, q, [torch.randint(0, 50, (2, 7))])
    assert report.row("blocks.1.ff2").shadow_sqnr > 30


def test_torch_transformer_encoder_is_one_op_and_its_run_failure_is_reported():
    te = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2).eval()
    qte = torch.ao.quantization.quantize_dynamic(copy.deepcopy(te), {nn.Linear})
    m = ns.match(te, qte)
    assert [(p.kind, p.float_nodes) for p in m.pairs] == [("transformer_encoder", ("root",))]
    # torch 2.14's fast path cannot run dynamically quantized Linear weights
    with pytest.raises(ns.InputError, match="quantized model failed on the input"):
        ns.compare_model_outputs(te, qte, torch.randn(2, 5, 32))


def test_qat_models_pair_with_their_converted_form():
    """Eager QAT (fused ConvBnReLU2d modules carrying the BN) and FX QAT, against convert."""
    from torch.ao.quantization import get_default_qat_qconfig
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    x = _input("mobilenet_v2")
    qat = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False).train()
    qat.fuse_model(is_qat=True)
    qat.qconfig = get_default_qat_qconfig("x86")
    torch.ao.quantization.prepare_qat(qat, inplace=True)
    qat(torch.rand(2, 3, 64, 64))
    qat.eval()
    converted = torch.ao.quantization.convert(copy.deepcopy(qat))
    m = ns.match(qat, converted)
    _assert_full(m)
    assert m.pair("features.0.0").float_nodes == ("features_0_0",)  # ConvBnReLU2d, BN folded
    weights = ns.compare_weights(qat, converted)
    w = weights["features.0.0.weight"]
    assert w["float"].shape == w["quantized"].shape and ns.sqnr(w["float"], w["quantized"]) > 25

    fx_qat = prepare_qat_fx(copy.deepcopy(torchvision.models.resnet18(weights=None).train()),
                            get_default_qconfig_mapping("x86"), (x,))
    fx_qat(x)
    fx_qat.eval()
    _assert_full(ns.match(fx_qat, convert_fx(copy.deepcopy(fx_qat))))


def test_dead_float_nodes_are_explained():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            out, _ = self.lstm(x)  # the state is never used: convert_fx drops it
            return self.fc(out)

    from torch.ao.quantization import default_dynamic_qconfig

    f = Net().eval()
    x = torch.randn(3, 2, 8)
    qmodel = convert_fx(prepare_fx(copy.deepcopy(f), QConfigMapping().set_global(default_dynamic_qconfig), (x,)))
    m = ns.match(f, qmodel)
    assert m.coverage == 1.0 and not m.unmatched_quant
    assert [(u.node, u.reason) for u in m.unmatched_float] == [
        ("getitem_1", "its result is never used (dead code the quantized graph dropped), so there is nothing to compare")]


def test_float16_dynamic_quantization(make_lstm_pair):
    float_model, _, inp, hidden = make_lstm_pair()
    q16 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.LSTM, nn.Linear}, dtype=torch.float16)
    m = ns.match(float_model, q16)
    _assert_full(m)
    weights = ns.compare_weights(float_model, q16)
    assert "decoder._packed_params._packed_params" in weights
    assert ns.sqnr(weights["decoder._packed_params._packed_params"]["float"],
                   weights["decoder._packed_params._packed_params"]["quantized"]) > 60
    report = ns.compare(float_model, q16, [(inp, hidden)])
    assert report.row("decoder").shadow_sqnr > 60
