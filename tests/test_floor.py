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
from fxnumeric.floor import FLOOR_MARGIN_DB, judge

sys.path.insert(0, str(Path(__file__).parent))
from _flow_pairs import FLOWS  # noqa: E402
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
