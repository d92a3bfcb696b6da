"""Why a layer is bad: each measurement checked against the same quantity computed by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from _models import embedding_pair
from torch.ao.quantization import QConfigMapping, default_qconfig, get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxnumeric
from fxnumeric.advice.diagnose import WHITE_NOISE_STEPS, annotate, diagnose


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _data() -> list[torch.Tensor]:
    return [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def _fx(float_model: nn.Module, mapping: QConfigMapping) -> nn.Module:
    data = _data()
    prepared = prepare_fx(copy.deepcopy(float_model), mapping, (data[0],))
    for batch in data:
        prepared(batch)
    return convert_fx(prepared)


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def test_per_tensor_weights_with_an_outlier_channel_are_flagged() -> None:
    float_model = _mlp()
    with torch.no_grad():
        float_model.fc2.weight[3] *= 40  # one output channel 40x wider than the rest
    q = _fx(float_model, QConfigMapping().set_global(default_qconfig))  # per-tensor weights
    d = diagnose(float_model, q, _data())
    fc2 = d.layer("fc2")
    w = float_model.fc2.weight.detach().double()
    ranges = w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)
    assert fc2.per_channel is False
    assert fc2.channel_outlier_ratio == pytest.approx(float(ranges.max() / ranges.median()))
    scale = q.fc2.weight().q_scale()
    assert fc2.weight_utilisation == pytest.approx(float((ranges / (scale * 255)).median()))
    assert [f.code for f in fc2.flags][:1] == ["weight_outliers"]
    assert "per-channel weights" in fc2.flags[0].fix
    assert "weight_outliers" not in [f.code for f in d.layer("fc1").flags]
    assert "fc2 (linear):" in d.text() and "Fix: per-channel weights" in d.text()


def test_embeddings_with_float_zero_points_are_read_per_channel() -> None:
    # a quantized Embedding's weight is per_channel_affine_float_qparams: diagnose raised
    # torch's "Expected quantizer->qscheme() == kPerTensorAffine" reading it per tensor
    float_model, q, data = embedding_pair(torch.ao.quantization.float_qparams_weight_only_qconfig)
    d = diagnose(float_model, q, data)
    for name in ("bag", "emb"):
        w = getattr(float_model, name).weight.detach().double()
        ranges = w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)
        qw = getattr(q, name).weight()
        assert qw.qscheme() == torch.per_channel_affine_float_qparams
        layer = d.layer(name)
        scales = qw.q_per_channel_scales().double()
        assert layer.per_channel is True
        assert layer.weight_utilisation == pytest.approx(
            float((ranges / (scales * 255)).median()))


def test_clipping_and_noise_in_steps_match_the_layer_run_by_hand() -> None:
    float_model = _mlp()
    q = _fx(float_model, get_default_qconfig_mapping("x86"))
    q.fc2.scale = q.fc2.scale / 8  # output range 8x too narrow: most large outputs clip
    data = _data()
    d = diagnose(float_model, q, data)
    clipped = total = 0
    noise = 0.0
    scale, zp = q.fc2.scale, q.fc2.zero_point
    low, high = (0 - zp - 0.5) * scale, (255 - zp + 0.5) * scale
    with torch.no_grad():
        for x in data:
            qx = torch.quantize_per_tensor(x, float(q.fc1_input_scale_0),
                                           int(q.fc1_input_zero_point_0), torch.quint8)
            h = torch.relu(q.fc1(qx).dequantize())
            qh = torch.quantize_per_tensor(h, float(q._scale_0), int(q._zero_point_0), torch.quint8)
            local = float_model.fc2(qh.dequantize()).double()  # the float twin, same input
            out = q.fc2(qh).dequantize().double()
            clipped += int(((local < low) | (local > high)).sum())
            noise += float((out - local).square().sum())
            total += local.numel()
    fc2 = d.layer("fc2")
    assert fc2.clipped == clipped / total > 0.01
    assert fc2.noise_steps == pytest.approx(math.sqrt(noise / total) / scale, rel=1e-9)
    assert fc2.noise_steps > 1.0
    assert {"clipping", "noise"} <= {f.code for f in fc2.flags}


def test_a_healthy_layer_shows_white_rounding_noise() -> None:
    float_model = _mlp()
    q = _fx(float_model, get_default_qconfig_mapping("x86"))
    d = diagnose(float_model, q, _data())
    for name in ("fc1", "fc2"):
        layer = d.layer(name)
        assert layer.clipped < 1e-3  # the calibration range covers the data: next to no clipping
        assert 0.7 * WHITE_NOISE_STEPS < layer.noise_steps < 1.3 * WHITE_NOISE_STEPS
        assert layer.per_channel is True
        assert not [f for f in layer.flags if f.code in ("clipping", "noise", "weight_outliers")]


def test_cumulative_and_local_sqnr_and_the_first_layer_below_threshold() -> None:
    float_model = _mlp()
    q = _fx(float_model, get_default_qconfig_mapping("x86"))
    data = _data()
    report = fxnumeric.compare(float_model, q, data, comparisons=("outputs",), metrics=["sqnr"])
    d = diagnose(float_model, q, data, threshold_db=1000)
    assert d.first_below == "fc1"
    assert [f.code for f in d.layer("fc1").flags] == ["amplification"]
    for name in ("fc1", "fc2", "fc3"):
        expected = report.row(name).output_sqnr
        assert d.layer(name).cumulative_sqnr == pytest.approx(expected, abs=1e-3)
    fc1 = d.layer("fc1")
    assert fc1.amplification == pytest.approx(fc1.local_sqnr - fc1.cumulative_sqnr)
    assert diagnose(float_model, q, data, threshold_db=-1000).first_below is None


def test_annotate_puts_flags_in_the_report() -> None:
    float_model = _mlp()
    with torch.no_grad():
        float_model.fc2.weight[3] *= 40
    q = _fx(float_model, QConfigMapping().set_global(default_qconfig))
    data = _data()
    report = annotate(fxnumeric.compare(float_model, q, data), diagnose(float_model, q, data))
    assert "weight_outliers" in report.row("fc2").flags
    assert "flags" in report.table().splitlines()[0]
    rows = {r["name"]: r for r in report.to_dict()["layers"]}
    assert "weight_outliers" in rows["fc2"]["flags"]


def test_an_unrelated_pair_is_refused_as_compare_refuses_it():
    # diagnose said "no layer flagged" where compare says nothing paired
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 8)).eval()
    other = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 8)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(other), {nn.Linear})
    data = [torch.randn(4, 16) for _ in range(2)]
    for call in (fxnumeric.compare, diagnose):
        with pytest.raises(fxnumeric.InputError, match="nothing paired"):
            call(f, q, data, progress=False)


def test_nan_made_by_a_quantized_layer_is_named_there_and_nothing_is_drawn_after_it():
    """A quantized bias holding NaN: the layer after it read -1.9 dB cumulative from poisoned
    sums and was flagged "first layer below 20 dB ... mostly this layer's own error"."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    weight, bias = q[2]._packed_params._weight_bias()
    bias = bias.clone()
    bias[3] = float("nan")
    q[2]._packed_params.set_weight_bias(weight, bias)
    data = _data()
    with torch.no_grad():  # the oracle: the quantized layer's own output, read by hand
        calls = [q[2](torch.relu(q[0](x))) for x in data]
    assert all(not c.isfinite().all() for c in calls)
    d = diagnose(f, q, data)
    assert d.nonfinite == "2" and [x.module for x in d.flagged()] == ["2"]
    assert [flag.code for flag in d.layer("2").flags] == ["nonfinite"]
    assert "holds NaN/Inf in 3 of 3 calls while its float twin" in d.text()
    assert d.first_below is None  # not drawn from the poisoned layers after it
    assert d.text().startswith("NaN/Inf first appears at 2")
    assert diagnose(f, torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(f), {nn.Linear}), data).nonfinite is None


def test_a_value_just_below_the_threshold_does_not_read_as_the_threshold():
    # "first layer where the cumulative SQNR (20.0 dB) is below 20 dB" for 19.988 dB
    from fxnumeric.advice.diagnose import _db_below

    assert [_db_below(v, 20.0) for v in (19.988, 15.23, 19.99999)] == ["19.99", "15.2",
                                                                       "19.99999"]
