"""Each layer against its own floor (issue 17): the SQNR its own grids allow.

The floor is read another way (the uniform-noise formula computed by hand from the layer's
scales and its input), healthy layers of every flow sit near it, and each planted fault lands
where the physics says: a lost bias far below its floor (a per-channel offset), a narrow output
range at a floor made of clipping, a coarse weight step at its (lower) floor.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fxnumeric as ns
from fxnumeric.floor import FLOOR_MARGIN_DB, FloorSums, judge
from fxnumeric.ops import dynamic_input

sys.path.insert(0, str(Path(__file__).parent))
from _flow_pairs import FLOWS  # noqa: E402
from _models import dynamic_mlp_with_bias  # noqa: E402
from test_verdict import FAULTS, _data, _dynamic_pair, _eager_pair, _fx_pair  # noqa: E402


def test_the_floor_of_a_dynamic_linear_is_the_formula_computed_by_hand():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(32, 16)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    x = torch.randn(8, 32)
    report = ns.compare(f, q, [x], progress=False)
    row = report.row("0")
    weight = q[0].weight()  # per-tensor qint8
    step_w = weight.q_scale()
    with torch.no_grad():
        y = f(x).double()
    # the weights' rounding: each output gets fan_in * E[x^2] * step_w^2 / 12
    weight_noise = y.numel() * 32 * float(x.double().square().mean()) * step_w ** 2 / 12
    # the input quantized per call to quint8 with reduce_range: 127 steps over [min, max]
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    step_x = (high - low) / 127
    input_noise = 8 * step_x ** 2 * float(weight.dequantize().double().square().sum()) / 12
    expected = 10 * math.log10(float(y.square().sum()) / (weight_noise + input_noise))
    assert row.floor_sqnr == pytest.approx(expected, abs=1e-6)
    assert abs(row.shadow_sqnr - row.floor_sqnr) < 3  # a healthy layer sits at its floor


def _round_per_call(x: torch.Tensor, levels: float | None) -> torch.Tensor:
    """``x`` as an op that quantizes it per call sees it: affine over ``[min(x, 0),
    max(x, 0)]`` in ``levels`` steps (``None``: not quantized)."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if levels is None or high == low:
        return x
    step = (high - low) / levels
    zero = round(-low / step)
    return ((x / step).round() + zero).clamp(0, levels).sub(zero).mul(step)


def _gates(kind: str, xw: torch.Tensor, hw: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
    """One step of a recurrent cell from its two linear outputs (torch's gate order)."""
    if kind in ("LSTM", "LSTMCell"):
        i, f, g, o = (xw + hw).chunk(4, -1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        return o.sigmoid() * c.tanh(), c
    if kind in ("GRU", "GRUCell"):
        (xr, xz, xn), (hr, hz, hn) = xw.chunk(3, -1), hw.chunk(3, -1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        return (1 - z) * (xn + r * hn).tanh() + z * h, c
    return (xw + hw).tanh(), c  # RNNCell


def _recurrent_by_hand(kind, float_layer, weights, x, levels):
    """The dynamic layer's output computed directly: its (dequantized) weights, the float
    layer's biases, the input rounded per call (a whole sequence at once, as torch's CPU
    kernel does) and the hidden state rounded before each step's hidden linear."""
    suffix = "_l0" if kind in ("LSTM", "GRU") else ""
    w_ih, w_hh = (weights[f"weight_{n}{suffix}"] for n in ("ih", "hh"))
    w_ih, w_hh = (w.dequantize() if w.is_quantized else w for w in (w_ih, w_hh))
    b_ih, b_hh = (getattr(float_layer, f"bias_{n}{suffix}").detach() for n in ("ih", "hh"))
    xw = _round_per_call(x, levels) @ w_ih.T + b_ih
    steps = xw.unbind(0) if suffix else (xw,)
    h = c = torch.zeros(x.shape[-2], float_layer.hidden_size)
    outs = []
    for step in steps:
        h, c = _gates(kind, step, _round_per_call(h, levels) @ w_hh.T + b_hh, h, c)
        outs.append(h)
    return torch.stack(outs) if suffix else h


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "LSTMCell", "GRUCell", "RNNCell"])
def test_the_input_term_of_a_dynamic_recurrent_layer_is_the_step_torch_rounds_with(kind, dtype):
    """torch's int8 dynamic LSTM, GRU and cells quantize their input per call, with
    ``reduce_range`` (127 steps), as the Linear does; their float16 forms do not. The step
    ``dynamic_input`` reports reproduces their output by hand, and it is the one the floor's
    input term sums (``Σ_tokens Δ_x²``)."""
    torch.manual_seed(0)
    float_layer = getattr(nn, kind)(16, 12).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation
        q = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(float_layer)), {type(float_layer)}, dtype=dtype)[0]
    x = 3 * torch.randn(5, 4, 16) if kind in ("LSTM", "GRU") else 3 * torch.randn(4, 16)
    how = dynamic_input(q)
    if dtype == torch.float16:
        assert how is None
    else:
        assert how == ("tensor", 127.0)
    levels = how[1] if how is not None else None
    with torch.no_grad():
        out = q(x)
        out = out[0] if isinstance(out, tuple) else out
        by_hand = _recurrent_by_hand(kind, float_layer, q.get_weight(), x, levels)
        unrounded = _recurrent_by_hand(kind, float_layer, q.get_weight(), x, None)
    assert torch.allclose(out, by_hand, atol=1e-5), float((out - by_hand).abs().max())
    if dtype == torch.qint8:  # the input's rounding shows: the step is not a no-op
        assert not torch.allclose(out, unrounded, atol=1e-3)
    sums = FloorSums(dynamic=how)
    sums.update(out, out, (x,))
    tokens = x.numel() // x.shape[-1]
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    expected = tokens * ((high - low) / 127) ** 2 if dtype == torch.qint8 else 0.0
    assert sums.input_steps == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("flow", ["eager", "fx", "reference_fx", "dynamic", "qat", "pt2e",
                                  "torchao"])
def test_healthy_layers_sit_near_their_floor(flow):
    pair = FLOWS[flow]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ns.compare(pair.float_model, pair.quant_model, pair.batches, progress=False)
    judged = [r for r in report.rows if r.floor_sqnr is not None and r.shadow_sqnr is not None
              and math.isfinite(r.shadow_sqnr)]
    assert judged, flow
    for r in judged:
        assert not r.below_floor, (r.name, r.shadow_sqnr, r.floor_sqnr)
        assert r.shadow_sqnr - r.floor_sqnr < 8, (r.name, r.shadow_sqnr, r.floor_sqnr)


@pytest.mark.parametrize("flow,layer", [("fx", "convs.1"), ("eager", "fc")])
def test_planted_faults_land_where_the_physics_says(flow, layer):
    for fault, expect in (("lost bias", ("below", "offset")),
                          ("narrow output", ("at", "clipping")),
                          ("coarse weight", ("not below", ""))):
        f, q = _fx_pair() if flow == "fx" else _eager_pair()
        FAULTS[fault](q, layer)
        row = ns.compare(f, q, _data(), progress=False).row(layer)
        state, cause = expect
        if state == "below":
            assert row.below_floor, (fault, row.shadow_sqnr, row.floor_sqnr)
            assert row.floor_sqnr - row.shadow_sqnr > FLOOR_MARGIN_DB
        else:
            assert not row.below_floor, (fault, row.shadow_sqnr, row.floor_sqnr)
        assert row.floor_cause == cause, fault


@pytest.mark.parametrize("layer", ["2", "6"])
def test_a_lost_bias_in_a_dynamic_model_is_below_its_floor(layer):
    f, q = _dynamic_pair()
    FAULTS["lost bias"](q, layer)
    report = ns.compare(f, q, _data(shape=(8, 64)), progress=False)
    row = report.row(layer)
    assert row.below_floor and row.floor_cause == "offset"
    assert "lost bias" in row.notes
    assert [r.name for r in report.rows if r.below_floor] == [layer]


def test_diagnose_flags_a_layer_below_its_floor():
    f, q = _fx_pair()
    FAULTS["lost bias"](q, "convs.1")
    diagnosis = ns.diagnose(f, q, _data(), progress=False)
    d = diagnosis.layer("convs.1")
    assert d.floor is not None and d.floor.state == "below" and d.floor.cause == "offset"
    assert any(flag.code == "below_floor_offset" for flag in d.flags)
    assert "bias" in diagnosis.text()
    healthy = [x for x in diagnosis.layers if x.name != "convs.1" and x.floor is not None]
    assert healthy and all(x.floor.state != "below" for x in healthy)


def test_judge_says_which():
    assert judge(None, 30.0) is None
    assert judge(20.0, 30.0).cause == "scale"
    assert judge(20.0, 30.0, offset_share=0.8).state == "below"
    assert judge(29.0, 30.0, clip_share=0.9).cause == "clipping"
    assert judge(34.0, 30.0).state == "above"


def test_a_fused_dynamic_linear_relu_has_the_floor_of_a_dynamic_linear():
    """FX dynamic quantization fuses linear-relu into torch's dynamic ``LinearReLU``, which
    quantizes its input per call as the dynamic Linear it derives from. Its floor was read
    as a static layer's (no input term): 45.59 dB against a shadow of 38.54, and diagnose
    flagged the healthy layer as broken."""
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    mapping = QConfigMapping().set_global(default_dynamic_qconfig)
    q = convert_fx(prepare_fx(copy.deepcopy(f), mapping, (x,)))
    assert isinstance(q.get_submodule("0"), torch.ao.nn.intrinsic.quantized.dynamic.LinearReLU)
    row = ns.compare(f, q, [x], progress=False).row("0")
    weight = q.get_submodule("0").weight()
    with torch.no_grad():
        y = f[1](f[0](x)).double()
    weight_noise = y.numel() * 16 * float(x.double().square().mean()) * weight.q_scale() ** 2 / 12
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    input_noise = (8 * ((high - low) / 127) ** 2
                   * float(weight.dequantize().double().square().sum()) / 12)
    expected = 10 * math.log10(float(y.square().sum()) / (weight_noise + input_noise))
    assert row.floor_sqnr == pytest.approx(expected, abs=1e-6)
    assert ns.diagnose(f, q, [x, torch.randn(8, 16)], progress=False).flagged() == []


def test_an_output_step_coarser_than_the_values_floors_at_0_db_and_says_so():
    # pt2e's x86 quantizer bounds every scale below by an eps of 2**-12: on activations ~35x
    # smaller than that step every value rounds to 0 (shadow 0.00 dB) while the floor's
    # step²/12 read -19.6 dB, so the layer sat "20 dB above its floor" with no word on why.
    # Planted here: an eager Linear whose output scale is 100x its largest output.
    # Oracle: the float twin's output rounded onto that grid by hand (all zeros: 0 dB).
    torch.manual_seed(0)
    f = nn.Sequential(torch.ao.quantization.QuantStub(), nn.Linear(16, 8),
                      torch.ao.quantization.DeQuantStub()).eval()
    f.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    data = [torch.randn(4, 16) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = torch.ao.quantization.prepare(copy.deepcopy(f))
        for x in data:
            p(x)
        q = torch.ao.quantization.convert(p)
    with torch.no_grad():
        largest = max(float(f(x).abs().max()) for x in data)
    q[1].scale = 100 * largest
    with torch.no_grad():
        y = torch.cat([f[1](q[0](x).dequantize()) for x in data]).double()  # the float twin
        rounded = torch.round(y / q[1].scale) * q[1].scale  # in range: no clipping
        assert bool((rounded == 0).all())  # every value rounds to zero on this grid
        assert all(bool((q(x) == 0).all()) for x in data)
    by_hand = 10 * math.log10(float(y.square().sum()) / float((y - rounded).square().sum()))
    assert by_hand == 0.0
    row = ns.compare(f, q, data, progress=False).row("1")
    assert row.shadow_sqnr == pytest.approx(by_hand, abs=1e-9)
    # the floor: what the grid allows, never below rounding every value to zero (the weight
    # step adds a little on top)
    assert by_hand - 1.0 < row.floor_sqnr <= by_hand
    assert not row.below_floor and row.floor_cause == "coarse"
    assert "output step coarser than its values, which round to zero" in row.notes


@pytest.mark.parametrize("kind,shape,channel", [
    ("conv1d", (4, 16, 30), 1), ("conv3d-relu", (2, 16, 3, 4, 5), 1),
    ("conv_transpose1d", (4, 16, 30), 1), ("conv1d", (16, 30), 0),
    ("linear", (4, 30, 16), 2), ("batch_norm", (4, 16, 30), 1)])
def test_the_offset_is_summed_per_output_channel_of_the_layer(kind, shape, channel):
    """A constant error per output channel is the offset, whatever the rank. It was summed
    over every dim but the last for any output not 4-D: a Conv1d's (N, C, L) per position,
    not per channel. Oracle: the error's mean per channel (its channel dim moved last),
    counted as FloorSums documents it: sum over channels of (sum of its errors)^2 / count."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(*shape, generator=g)
    shift = torch.randn(shape[channel], generator=g).reshape(
        [-1 if d == channel else 1 for d in range(len(shape))])
    quant = ref + shift + 0.01 * torch.randn(*shape, generator=g)
    sums = FloorSums(kind=kind)
    sums.update(quant, ref, ())
    sums.update(quant, ref, ())
    err = (quant - ref).double().movedim(channel, -1).reshape(-1, shape[channel])
    expected = float((2 * err.sum(0)).square().sum()) / (2 * err.shape[0])
    assert sums.offset_noise() == pytest.approx(expected, rel=1e-6)
    # nearly all of the error is that offset
    assert sums.offset_noise() / (2 * float(err.square().sum())) > 0.99


@pytest.mark.parametrize("conv,shape", [(nn.Conv1d(8, 16, 3), (4, 8, 40)),
                                        (nn.Conv3d(4, 8, 3), (2, 4, 6, 6, 6))])
def test_a_conv_of_any_rank_that_lost_its_bias_is_below_its_floor_for_an_offset(conv, shape):
    """A Conv1d or Conv3d whose quantized form lost its bias read floor_cause 'scale' (only a
    Conv2d's 'offset'). Oracle: the share of the error power that is a constant per output
    channel (dim 1), computed from the two models' outputs directly."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = nn.Sequential(conv).eval()
    with torch.no_grad():
        f[0].bias.uniform_(-1, 1)
    lost = copy.deepcopy(f)
    with torch.no_grad():
        lost[0].bias.zero_()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(*shape, generator=g) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecat.*")
        prepared = prepare_fx(lost, get_default_qconfig_mapping("fbgemm"), (data[0],))
        for x in data:
            prepared(x)
        q = convert_fx(prepared)
    row = ns.compare(f, q, data, progress=False).row("0")
    with torch.no_grad():
        err = torch.cat([(q(x) - f(x)).double().movedim(1, -1).reshape(-1, conv.out_channels)
                         for x in data])
    share = float(err.mean(0).square().sum() * err.shape[0] / err.square().sum())
    assert share > 0.9
    assert row.below_floor and row.floor_cause == "offset"


@pytest.mark.parametrize("flow", ["pt2e", "reference_fx"])
def test_a_graph_that_quantizes_the_input_per_call_puts_that_rounding_in_the_floor(flow):
    """A dynamic pt2e Linear (choose_qparams, quantize_per_tensor.tensor: 255 steps over
    [min(x, 0), max(x, 0)]) and a reference FX one (torch.quantize_per_tensor_dynamic,
    quint8 with reduce_range: 127 steps) round their input per call in the graph, in front
    of the op, not inside a module. The floor left that rounding out: the pt2e layer read
    14.6 dB below a floor it sits at. The formula computed by hand, as for torch's dynamic
    Linear above, is the oracle."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(32, 16)).eval()
    x = torch.randn(8, 32) * (1 + 10 * (torch.rand(8, 32) > 0.98))  # a few outliers
    if flow == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.testing.pt2e._xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        f = torch.export.export(f, (x,)).module()
        prepared = prepare_pt2e(copy.deepcopy(f), XNNPACKQuantizer().set_global(
            get_symmetric_quantization_config(is_dynamic=True)))
        prepared(x)
        q, levels = convert_pt2e(prepared), 255
        weight = next(n for n in q.graph.nodes if "dequantize_per_tensor.default" in str(n.target))
        step_w = float(weight.args[1])
        w = (getattr(q, weight.args[0].target).double() - weight.args[2]) * step_w
    else:
        from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig
        from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(f), QConfigMapping().set_global(
            default_dynamic_qconfig), (x,))
        prepared(x)
        q, levels = convert_to_reference_fx(prepared), 127
        qweight = q.get_submodule("0").get_quantized_weight()
        step_w, w = qweight.q_scale(), qweight.dequantize().double()
    report = ns.compare(f, q, [x], progress=False)
    row = report.row("0")
    with torch.no_grad():
        y = f(x).double()
    weight_noise = y.numel() * 32 * float(x.double().square().mean()) * step_w ** 2 / 12
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    input_noise = 8 * ((high - low) / levels) ** 2 * float(w.square().sum()) / 12
    expected = 10 * math.log10(float(y.square().sum()) / (weight_noise + input_noise))
    assert row.floor_sqnr == pytest.approx(expected, abs=1e-3)
    assert not row.below_floor and abs(row.shadow_sqnr - row.floor_sqnr) < 3


def test_a_convs_input_energy_is_what_its_taps_read_padding_included():
    """The weight term of the floor took each output to read fan_in live taps; a 3x3 conv
    padded by 1 on a 1x1 map reads one of nine, and the floor of resnet18's layer4 read
    31.7 dB against 35.2 measured. The taps' energy is torch's own unfold of the input."""
    from fxnumeric.floor import _tap_energy

    torch.manual_seed(0)
    for shape, kernel, stride, padding, dilation in (((2, 3, 1, 1), (3, 3), (1, 1), (1, 1), (1, 1)),
                                                     ((2, 4, 9, 7), (3, 3), (2, 2), (1, 1), (1, 1)),
                                                     ((1, 2, 8, 8), (3, 3), (1, 1), (2, 2), (2, 2))):
        x = torch.randn(shape)
        taps = torch.nn.functional.unfold(x.double(), kernel, dilation=dilation, padding=padding,
                                          stride=stride)
        energy, count = _tap_energy(x, (2, kernel, stride, padding, dilation))
        assert energy == pytest.approx(float(taps.square().sum()), rel=1e-5)
        assert count == taps.numel()


def test_a_padded_conv_on_a_small_map_sits_at_its_floor():
    """FX static conv 3x3, padding 1, on 1x1 maps (resnet18's layer4 at 32x32), its per-tensor
    weight step set by a corner tap that reads padding only: healthy, so at its floor (within
    the 3 dB an expectation allows), where the floor counting every tap as live read 9 dB
    below it."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(32, 32, 3, padding=1)).eval()
    with torch.no_grad():  # a corner tap, which reads padding only, sets the weight step
        f[2].weight[0, 0, 0, 0] = 30 * f[2].weight.abs().max()
    data = [torch.randn(8, 16, 1, 1) for _ in range(3)]
    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("qnnpack"), (data[0],))
    for x in data:
        prepared(x)
    q = convert_fx(prepared)
    row = ns.compare(f, q, data, progress=False).row("2")  # 23.1 dB; the old floor 13.9
    assert abs(row.shadow_sqnr - row.floor_sqnr) < 3, (row.shadow_sqnr, row.floor_sqnr)


def test_a_layer_that_makes_inf_is_not_called_below_its_floor():
    """An Inf in a quantized bias makes the shadow SQNR -inf: no scale explains that gap, so
    neither the row nor the summary calls it below its floor; the notes say where Inf is."""
    f, q = dynamic_mlp_with_bias(math.inf)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 16, generator=gen) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = ns.compare(f, q, data)
    row = report.row("2")
    with torch.no_grad():  # the oracle: the quantized layer's output holds Inf itself
        assert not torch.isfinite(q[:3](data[0])).all() and torch.isfinite(f[:3](data[0])).all()
    assert row.shadow_sqnr == -math.inf and row.floor_sqnr is not None
    assert not row.below_floor and row.floor_cause == ""
    assert "below floor" not in row.notes and "shadow: NaN/Inf in 3 batches" in row.notes
    assert "below its floor" not in report.summary()
    assert judge(-math.inf, 40.0) is None and judge(math.inf, 40.0).state == "above"
