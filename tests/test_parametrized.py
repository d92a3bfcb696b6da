"""A parametrized float layer (``torch.nn.utils.parametrizations``: weight_norm,
spectral_norm, orthogonal) is the layer it parametrizes: it pairs, and its weight is the one
it computes with. Oracles: forward hooks on the plain models, the effective weight read
directly, and torch's eager suite."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from _hooked import hooked_sqnr, pooled_sqnr
from torch.ao.ns import _numeric_suite as torch_ns
from torch.ao.quantization import quantize_dynamic
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import fxnumeric as ns

_PARAMETRIZE = {"weight_norm": weight_norm, "spectral_norm": spectral_norm,
                "orthogonal": orthogonal}


def _pair(how: str) -> tuple[nn.Module, nn.Module]:
    """A float model whose first Linear is parametrized, and the model quantize_dynamic makes
    of the same effective weights (it refuses a parametrized Linear itself)."""
    torch.manual_seed(1)
    f = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    _PARAMETRIZE[how](f[0])
    f.eval()
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        plain[0].weight.copy_(f[0].weight)
        plain[0].bias.copy_(f[0].bias)
        plain[2].load_state_dict(f[2].state_dict())
    return f, quantize_dynamic(plain, {nn.Linear})


def _data():
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(4, 8, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("how", list(_PARAMETRIZE))
def test_parametrized_linear_pairs_as_a_linear_with_its_effective_weight(how):
    f, q = _pair(how)
    matching = ns.match(f, q)
    assert [(p.kind, p.float_nodes, p.quant_nodes) for p in matching.pairs][0] == (
        "linear", ("_0",), ("_0",))
    assert not matching.unmatched_float and not matching.unmatched_quant
    report = ns.compare(f, q, _data())
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["0", "1", "2"]
    effective = pooled_sqnr([(f[0].weight.detach(), q[0].weight().dequantize())])
    assert rows["0"].weight_sqnr == pytest.approx(effective, abs=1e-6)
    # the first layer reads the model input: its output and shadow SQNR are one number
    hooked = hooked_sqnr(f, q, "0", _data())
    assert rows["0"].output["sqnr"] == pytest.approx(hooked, abs=1e-5)
    assert rows["0"].shadow["sqnr"] == pytest.approx(hooked, abs=1e-5)
    weights = ns.compare_weights(f, q)["0._packed_params._packed_params"]
    assert torch.equal(weights["float"], f[0].weight.detach())
    assert len(ns.sensitivity(f, q, _data()).layers) == 2


def test_eager_outputs_log_the_parametrized_layer_as_torchs_suite_does():
    f, q = _pair("spectral_norm")
    x = _data()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        want = torch_ns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), x)
    got = ns.compare_model_outputs(f, q, x)
    assert list(got) == list(want) == ["0.stats", "2.stats"]
    for side in ("float", "quantized"):
        assert torch.equal(got["0.stats"][side][0], want["0.stats"][side][0])


def test_state_dicts_pairing_tensors_of_other_shapes_warn_naming_the_keys():
    f, q = _pair("spectral_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torchs = torch_ns.compare_weights(f.state_dict(), q.state_dict())
    # torch's suite pairs the float bias with the quantized weight
    assert torchs["0._packed_params._packed_params"]["float"].shape == (8,)
    with pytest.warns(ns.FxNumericWarning, match=(
            r"`0\._packed_params\._packed_params` \[8, 8\] against float `0\.bias` \[8\]\)\. "
            r"The float state dict holds `0`'s weight parametrized "
            r"\(`0\.parametrizations\.weight\.original`: [^)]*\): the weight the layer "
            r"computes with is not in it\. Fix: compare the two models")):
        got = ns.compare_weights(f.state_dict(), q.state_dict())
    assert list(got) == ["2._packed_params._packed_params"]
    assert torch.equal(got["2._packed_params._packed_params"]["float"], f[2].weight)
