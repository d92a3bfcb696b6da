"""Wrapped models: torch.compile's and DataParallel's wrappers compare the module inside
(numbers equal to the plain model's, read by forward hooks), TorchScript is refused with
the fix."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from _hooked import hooked_sqnr
from torch.ao.ns import _numeric_suite as torch_ns
from torch.ao.quantization import quantize_dynamic

import fxnumeric as ns


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())


def _pair():
    torch.manual_seed(0)
    f = _Mlp().eval()
    return f, quantize_dynamic(copy.deepcopy(f), {nn.Linear})


def _data():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 8, generator=gen) for _ in range(3)]


def _compiled(model: nn.Module) -> nn.Module:
    return torch.compile(model)  # not run: fxnumeric reads the module it wraps


_WRAPS = {
    "compile float": (lambda f, q: (_compiled(f), q), ("float",)),
    "compile quantized": (lambda f, q: (f, _compiled(q)), ("quantized",)),
    "compile both": (lambda f, q: (_compiled(f), _compiled(q)), ("float", "quantized")),
    "DataParallel float": (lambda f, q: (nn.DataParallel(f), q), ("float",)),
    "DataParallel both": (lambda f, q: (nn.DataParallel(f), nn.DataParallel(q)),
                          ("float", "quantized")),
    "DataParallel of compiled": (lambda f, q: (nn.DataParallel(_compiled(f)), q), ("float",)),
}


@pytest.mark.parametrize("case", list(_WRAPS))
def test_compare_reads_the_wrapped_module(case):
    f, q = _pair()
    wrap, sides = _WRAPS[case]
    wf, wq = wrap(f, q)
    report = ns.compare(wf, wq, _data())
    rows = {r.name: r for r in report.rows}
    assert [r for r in rows if r.startswith("fc")] == ["fc1", "fc2"]
    for name in ("fc1", "fc2"):
        want = hooked_sqnr(f, q, name, _data())
        assert rows[name].output["sqnr"] == pytest.approx(want, abs=1e-5)
    wrapped = [n for n in report.notes if "compared the module it wraps" in n]
    assert [n.split(")")[0] for n in wrapped] == [f"capture ({s}" for s in sides]
    path = "module._orig_mod" if "of compiled" in case else (
        "_orig_mod" if "compile" in case else "module")
    assert f"`model.{path}`" in wrapped[0]


def test_matching_of_a_wrapper_is_reused_and_holds_the_inner_module():
    f, q = _pair()
    cf = _compiled(f)
    matching = ns.match(cf, q)
    assert matching.float_model is f
    report = ns.compare(cf, q, _data(), matching=matching)
    want = hooked_sqnr(f, q, "fc1", _data())
    assert report.rows[0].output["sqnr"] == pytest.approx(want, abs=1e-5)


def test_sensitivity_advise_and_diagnose_take_a_compiled_model():
    f, q = _pair()
    cf, data = _compiled(f), _data()
    plain = ns.sensitivity(f, q, data)
    wrapped = ns.sensitivity(cf, _compiled(q), data)
    assert len(plain.layers) == 2 and wrapped.layers == plain.layers
    assert ns.diagnose(cf, q, data).table() == ns.diagnose(f, q, data).table()
    advised = ns.advise(nn.DataParallel(f), q, data, metric="sqnr", target=60.0)
    want = ns.advise(f, q, data, metric="sqnr", target=60.0)
    assert (advised.keep_float, advised.curve) == (want.keep_float, want.curve)


def test_eager_calls_take_a_wrapper_as_torchs_suite_takes_the_plain_model():
    f, q = _pair()
    x = _data()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        want = torch_ns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), x)
    got = ns.compare_model_outputs(_compiled(f), nn.DataParallel(q), x)
    assert list(got) == list(want) == ["fc1.stats", "fc2.stats"]
    for key in want:
        for side in ("float", "quantized"):
            assert torch.equal(got[key][side][0], want[key][side][0])
    weights = ns.compare_weights(_compiled(f), q)
    assert list(weights) == ["fc1._packed_params._packed_params",
                             "fc2._packed_params._packed_params"]


def test_in_place_calls_refuse_a_wrapper_naming_the_module_inside():
    f, q = _pair()
    with pytest.raises(ns.InputError, match=r"Fix: pass `float_module\._orig_mod`"):
        ns.prepare_model_outputs(_compiled(f), q)
    with pytest.raises(ns.InputError, match=r"Fix: pass `q_module\.module`"):
        ns.prepare_model_with_stubs(f, nn.DataParallel(q), [nn.Linear], ns.ShadowLogger)
    assert "forward" not in f.__dict__ and "forward" not in q.__dict__


@pytest.mark.parametrize("side", ["float", "quantized"])
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_with_the_fix(side, how):
    f, q = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        jit = (torch.jit.script if how == "script"
               else lambda m: torch.jit.trace(m, _data()[0]))
        f, q = (jit(f), q) if side == "float" else (f, jit(q))
    made = f"torch.jit.{how}"
    for call in (lambda: ns.compare(f, q, _data()), lambda: ns.match(f, q),
                 lambda: ns.sensitivity(f, q, _data()),
                 lambda: ns.compare_model_outputs(f, q, _data()[0])):
        with pytest.raises(ns.InputError, match=rf"the {side} model is a TorchScript .*"
                                                rf"\(made by {made}\).*\nFix: pass the nn.Module"):
            call()
