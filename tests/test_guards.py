"""Guards: swapped, unconverted and unquantized pairs are caught by what the graphs contain."""

from __future__ import annotations

import copy
import math
import re
import types
import warnings

import pytest
import torch
import torch.nn as nn
from _models import UntracedGated
from torch.ao import quantization as tq
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

import fxnumeric as ns
from fxnumeric.guards import contents

_NOTHING = "the quantized model has no quantized op"


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.relu(self.conv(self.quant(x)))
        return self.dequant(self.fc(x.mean((2, 3))))


def _data():
    gen = torch.Generator().manual_seed(0)
    return [torch.rand(2, 3, 8, 8, generator=gen) for _ in range(2)]


def _eager_pair():
    torch.manual_seed(0)
    f = _Net().eval()
    prepared = copy.deepcopy(f)
    prepared.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(prepared, inplace=True)
    for x in _data():
        prepared(x)
    unconverted = copy.deepcopy(prepared)
    return f, tq.convert(prepared), unconverted


def _no_guard_warning(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=_NOTHING)
        return fn(*args, **kwargs)


def test_unquantized_model_warns_and_names_no_culprit():
    f, _, _ = _eager_pair()
    with pytest.warns(ns.FxNumericWarning, match="no quantized op .all 4 ops are float.*Coverage is n/a"):
        report = ns.compare(f, copy.deepcopy(f), _data())
    assert report.model_output["sqnr"] == math.inf
    assert report.worst_layer is None  # every layer adds 0 error: no culprit at inf dB
    assert "most error enters" not in report.summary()
    assert any("nothing was quantized" in n for n in report.notes)
    assert "note: the quantized model has no quantized op" in report.table()
    with pytest.warns(ns.FxNumericWarning, match=_NOTHING):
        m = ns.match(f, copy.deepcopy(f))
    assert "coverage of quantized ops n/a" in m.table() and "100%" not in m.table()


class _TreeOnly(nn.Module):
    """torch.fx cannot trace the root (it branches on a value): captured through the module
    tree, its parts are ``proj`` (linear), ``mlp`` (linear, relu, add) and ``out`` (linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.mlp = _MlpWithResidual()
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.mlp(self.proj(x))
        return self.out(h) if h.sum() > 0 else self.out(-h)


class _MlpWithResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


def test_the_unquantized_warning_counts_the_ops_of_a_model_captured_through_the_module_tree():
    # it counted the one op that calls the model whole: "all 1 ops are float" over 5 rows
    # (GPT-2: 32)
    torch.manual_seed(0)
    f = _TreeOnly().eval()
    data = [torch.randn(2, 8, generator=torch.Generator().manual_seed(1))]
    with pytest.warns(ns.FxNumericWarning) as caught:
        report = ns.compare(f, copy.deepcopy(f), data, progress=False)
    assert [str(w.message).split(").")[0] for w in caught if w.category is ns.FxNumericWarning
            ] == [f"{_NOTHING} (all 5 ops are float"]
    assert len(report.rows) == 5
    with pytest.warns(ns.FxNumericWarning, match=r"all 5 ops are float"):
        assert ns.match(f, copy.deepcopy(f)).untraced  # captured through the module tree
    assert sorted(r.name for r in report.rows) == ["mlp.add", "mlp.fc", "mlp.relu", "out", "proj"]


def test_prepared_but_not_converted_is_an_error():
    f, _, unconverted = _eager_pair()
    with pytest.raises(ns.InputError, match=r"prepared but not converted: it has \d+ observers"):
        ns.compare(f, unconverted, _data())
    prepared_fx = prepare_fx(copy.deepcopy(f), tq.get_default_qconfig_mapping("x86"), (_data()[0],))
    with pytest.raises(ns.InputError, match="call convert .eager. or convert_fx") as info:
        ns.match(f, prepared_fx)
    assert "`activation_post_process_0`" in str(info.value)


@pytest.mark.parametrize("call", ["compare", "compare_model_outputs", "match"])
def test_swapped_models_are_an_error_with_a_short_message(call):
    f, q, _ = _eager_pair()
    x = _data()[0]
    run = {
        "compare": lambda: ns.compare(q, f, [x]),
        "compare_model_outputs": lambda: ns.compare_model_outputs(q, f, x),
        "match": lambda: ns.match(q, f),
    }[call]
    with pytest.raises(ns.InputError, match="look swapped: the float model has 2 quantized ops") \
            as info:
        run()
    assert len(str(info.value)) < 300 and "Fix: pass the float model first" in str(info.value)


def test_swapped_state_dicts_are_an_error():
    f, q, _ = _eager_pair()
    with pytest.raises(ns.InputError, match="float state dict holds \\d+ quantized tensors"):
        ns.compare_weights(q.state_dict(), f.state_dict())
    dyn = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    with pytest.raises(ns.InputError, match="look swapped"):
        ns.compare_weights(dyn.state_dict(), f.state_dict())
    assert list(_no_guard_warning(ns.compare_weights, f.state_dict(), dyn.state_dict()))


def test_legit_pairs_pass_without_warning():
    f, q, _ = _eager_pair()
    x = _data()[0]
    _no_guard_warning(ns.match, f, q).check()
    example = (x,)
    fx_q = convert_fx(_calibrated(prepare_fx(copy.deepcopy(f), tq.get_default_qconfig_mapping(
        "x86"), example)))
    assert _no_guard_warning(ns.match, f, fx_q).coverage == 1.0
    for dtype in (torch.qint8, torch.float16):
        dyn = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear}, dtype=dtype)
        assert _no_guard_warning(ns.match, f, dyn).coverage == 1.0
    # a QAT-prepared float side (fake-quants in the float graph) against its converted form
    qat = prepare_qat_fx(copy.deepcopy(f).train(), tq.get_default_qat_qconfig_mapping("x86"),
                         example)
    _calibrated(qat)
    qat.eval()
    assert _no_guard_warning(ns.match, qat, convert_fx(copy.deepcopy(qat))).pairs
    # partially quantized: only the conv
    partial = copy.deepcopy(f)
    partial.qconfig = None
    partial.conv.qconfig = tq.get_default_qconfig("x86")
    partial = tq.convert(_calibrated(tq.prepare(partial)))
    assert contents(ns.GraphView(ns.trace(partial))).quantized_ops == ("conv",)


def test_a_qat_model_before_convert_is_said_to_simulate_quantization():
    # a prepare_qat_fx model (fake-quants on, in eval mode) was noted "nothing was
    # quantized", and sensitivity refused it with no word of QAT or convert_fx
    f = _Net().eval()
    qat = prepare_qat_fx(copy.deepcopy(f).train(), tq.get_default_qat_qconfig_mapping("x86"),
                         (_data()[0],))
    _calibrated(qat).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ns.FxNumericWarning)
        report = ns.compare(f, qat, _data(), progress=False)
    assert re.search(r"simulates quantization with \d+ fake-quants .a QAT model before convert",
                     " ".join(report.notes))
    assert not any("nothing was quantized" in n for n in report.notes)
    with pytest.raises(ns.InputError, match=r"(?s)QAT model before convert.*convert_fx"):
        ns.sensitivity(f, qat, _data(), "sqnr", progress=False)


def _calibrated(model):
    with torch.no_grad():
        for x in _data():
            model(x)
    return model


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.5)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.bn(self.drop(self.fc1(x))))


def _each_call(f, q, data):
    """compare, diagnose and sensitivity of the pair: every call the guards stand before."""
    return (lambda: ns.compare(f, q, data, progress=False),
            lambda: ns.diagnose(f, q, data, progress=False),
            lambda: ns.sensitivity(f, q, data, "sqnr", progress=False))


def test_a_model_in_training_mode_is_refused_and_left_as_it_was():
    # in training mode the BatchNorm normalised with batch statistics and dropout zeroed
    # values: compare named `bn` the culprit at 4 dB, and updated the user's running mean
    torch.manual_seed(0)
    f = _Noisy().eval()
    q = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(4, 16) for _ in range(2)]
    f.train()
    before = copy.deepcopy(f.state_dict())
    for call in _each_call(f, q, data):
        with pytest.raises(ns.InputError, match=r"(?s)float model is in training mode: `drop` "
                                                r"\(Dropout\) and 1 more.*float_model\.eval\(\)"):
            call()
    assert all(torch.equal(v, f.state_dict()[k]) for k, v in before.items())
    f.eval()
    q.train()
    with pytest.raises(ns.InputError, match="quantized model is in training mode: `drop`"):
        ns.compare(f, q, data, progress=False)
    q.eval()
    assert ns.compare(f, q, data, progress=False).batches == 2


class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.nn.functional.dropout(torch.relu(self.fc1(x)), 0.5, self.training))


def test_a_graph_traced_in_training_mode_is_refused_whatever_mode_the_model_is_in():
    # F.dropout(x, p, self.training) has no module to see: compare read 7.4 dB (37.0 dB in
    # eval mode) and summed dropout noise into "error accumulates"
    torch.manual_seed(0)
    f = _FunctionalDropout().eval()
    data = [torch.randn(16, 16) for _ in range(2)]
    q = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    assert ns.compare(f, q, data, progress=False).batches == 2
    f.train()
    for call in _each_call(f, q, data):
        with pytest.raises(ns.InputError, match=r"(?s)the float graph runs `dropout` .*training: "
                                                r"True.*Fix: call \.eval\(\)"):
            call()
    # a graph traced in training mode keeps its dropout after model.eval()
    matching = ns.match(f, q)
    f.eval()
    with pytest.raises(ns.InputError, match="the float graph runs `dropout`"):
        ns.compare(None, None, data, matching=matching, progress=False)
    # exported in training mode: aten.dropout(x, 0.5, True), no module left to see
    exported = torch.export.export(_FunctionalDropout().train(), (data[0],)).module()
    with pytest.raises(ns.InputError, match=r"the float graph runs `dropout` \(.*aten\.dropout"):
        ns.compare(exported, q, data, progress=False)


class _ConvBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_program_exported_in_training_mode_is_refused_and_left_as_it_was():
    # an ExportedProgram is no nn.Module: compare took one exported in training mode (its
    # BatchNorm an aten.batch_norm with training=True), read batch statistics and updated the
    # program's running mean and variance and num_batches_tracked (0 -> 3), with no note
    torch.manual_seed(0)
    data = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    q = tq.quantize_dynamic(_ConvBn().eval(), {nn.Linear})
    program = torch.export.export(_ConvBn().train(), (data[0],))
    before = {k: v.clone() for k, v in program.state_dict.items()}
    for call in _each_call(program, q, data):
        with pytest.raises(ns.InputError, match=r"(?s)the float graph runs `batch_norm` \(.*aten"
                                                r"\.batch_norm.*True.*Fix: call \.eval\(\)"):
            call()
    assert all(torch.equal(v, program.state_dict[k]) for k, v in before.items())


def test_buffers_written_without_a_version_bump_are_put_back():
    # a BatchNorm in training mode updates running_mean/var in its kernel without moving their
    # version counter: buffers_kept, which put back only buffers whose version moved, left
    # them changed; an ExportedProgram's buffers were not kept at all
    from fxnumeric.run import buffers_kept

    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    model = _ConvBn().train()
    program = torch.export.export(_ConvBn().train(), (x,))
    runs = program.module()
    oracle = [{k: v.clone() for k, v in model.state_dict().items()},
              {k: v.clone() for k, v in program.state_dict.items()}]
    version = model.bn.running_mean._version
    with buffers_kept(model, program):
        model(x)
        runs(x)
        assert model.bn.running_mean._version == version  # the write the counter misses
        assert not torch.equal(model.bn.running_mean, oracle[0]["bn.running_mean"])
        assert not torch.equal(program.state_dict["bn.running_var"], oracle[1]["bn.running_var"])
    for held, before in zip((model.state_dict(), program.state_dict), oracle, strict=True):
        changed = [k for k, v in before.items() if not torch.equal(v, held[k])]
        assert not changed, changed


class _HeldDropout(nn.Module):
    """Drops out as transformers' layers do: the probability a float of its own (or of its
    config), the dropout functional, no dropout module to see."""

    def __init__(self, p: float, *, in_config: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        if in_config:
            self.config = types.SimpleNamespace(hidden_dropout=p, use_dropout=True)
        else:
            self.dropout, self.drop_last = p, True  # a flag named for dropping is no probability

    def forward(self, x):
        p = self.config.hidden_dropout if hasattr(self, "config") else self.dropout
        return torch.nn.functional.dropout(torch.relu(self.fc(x)), p, self.training)


@pytest.mark.parametrize("in_config", [False, True], ids=["held", "config"])
def test_a_module_kept_whole_that_drops_out_in_training_mode_is_refused(in_config):
    # kept whole, its F.dropout is never traced, and no module of it is a dropout: compare
    # read the dropout noise, 8.64 dB then 9.25 dB on two identical calls (39.60 dB in eval)
    torch.manual_seed(0)
    f = nn.Sequential(_HeldDropout(0.25, in_config=in_config), nn.Linear(16, 8)).eval()
    q = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(16, 16) for _ in range(2)]
    matching = ns.match(f, q, leaf_modules=[_HeldDropout])
    held = "whose config declares hidden_dropout=0.25" if in_config else "with dropout=0.25"
    f.train()
    for call in (lambda: ns.compare(f, q, data, matching=matching, progress=False),
                 lambda: ns.diagnose(f, q, data, matching=matching, progress=False),
                 lambda: ns.sensitivity(f, q, data, "sqnr", matching=matching, progress=False)):
        with pytest.raises(ns.InputError, match=rf"(?s)float model is in training mode: `0` "
                                                rf"\(_HeldDropout {held}\) computes.*"
                                                rf"float_model\.eval\(\)"):
            call()
    f.eval()
    with torch.no_grad():
        ref = torch.cat([f(x) for x in data]).double()
        out = torch.cat([q(x) for x in data]).double()
    expected = float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))
    report = ns.compare(f, q, data, matching=matching, progress=False)
    assert report.model_output["sqnr"] == pytest.approx(expected, rel=1e-6)
    # at p = 0 it computes alike in either mode: training mode alone is no reason to refuse
    for block in (f[0], q[0]):
        if in_config:
            block.config.hidden_dropout = 0.0
        else:
            block.dropout = 0.0
    f.train()
    q.train()
    report = ns.compare(f, q, data, matching=matching, progress=False)
    assert report.model_output["sqnr"] == pytest.approx(expected, rel=1e-6)


def test_modules_that_compute_alike_in_training_mode_pass():
    # torch's quantized Dropout is the identity in either mode; a dropout of p=0 and a
    # BatchNorm without running statistics too
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.0), nn.BatchNorm1d(8, track_running_stats=False),
                      nn.Dropout(0.2), nn.Linear(8, 4)).eval()
    data = [torch.randn(4, 8)]
    prepared = prepare_fx(copy.deepcopy(f), tq.get_default_qconfig_mapping("x86"), (data[0],))
    prepared(data[0])
    q = convert_fx(prepared).train()
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") and m.training
               for m in q.modules())
    f[1].train()
    f[2].train()
    report = ns.compare(f, q, data, progress=False)
    assert report.batches == 1 and report.rows


def _gated_pair():
    torch.manual_seed(0)
    f = UntracedGated().eval()
    prepared = copy.deepcopy(f)
    prepared.qconfig = tq.get_default_qconfig("fbgemm")
    tq.prepare(prepared, inplace=True)
    return f, tq.convert(_calibrated(prepared))


def _hooked_sqnr(f: nn.Module, q: nn.Module, path: str, x: torch.Tensor) -> float:
    """The SQNR of ``path``'s quantized output against its float one, read by forward hooks."""
    outputs = {}
    for side, model in (("float", f), ("quant", q)):
        module = model.get_submodule(path)
        handle = module.register_forward_hook(
            lambda _m, _a, out, side=side: outputs.__setitem__(side, out.clone()))
        with torch.no_grad():
            model(x)
        handle.remove()
    ref = outputs["float"].double()
    actual = outputs["quant"].dequantize().double()
    return 10 * math.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())


@pytest.mark.parametrize("leaf", ["gate", ""])
def test_a_float_module_kept_whole_holding_a_floatfunctional_is_float(leaf):
    """A FloatFunctional is float (torch keeps it among its quantized modules): a float
    module kept whole that holds one is not "quantized too". Oracle: forward hooks."""
    f, q = _gated_pair()
    x = _data()[0]
    report = _no_guard_warning(ns.compare, f, q, [x], leaf_modules=[leaf], progress=False)
    name = leaf or "root"
    assert report.row(name).output_sqnr == pytest.approx(_hooked_sqnr(f, q, leaf, x), rel=1e-6)
    matching = ns.match(f, q, x, leaf_modules=[leaf])
    ns.diagnose(f, q, [x], matching=matching, progress=False)
    found = ns.sensitivity(f, q, [x], "sqnr", matching=matching, progress=False)
    assert found.quantized == pytest.approx(_hooked_sqnr(f, q, "", x), rel=1e-6)


def test_quantizable_basic_blocks_kept_whole_are_compared_as_blocks(make_resnet18_pair):
    """torchvision's quantizable resnet18 with each QuantizableBasicBlock (which holds a
    FloatFunctional) kept whole: a row per block, read as forward hooks read it."""
    from torchvision.models.quantization.resnet import QuantizableBasicBlock

    f, q, _ = make_resnet18_pair()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    report = ns.compare(f, q, [x], leaf_modules=[QuantizableBasicBlock], progress=False)
    for block in ("layer1.0", "layer4.1"):
        assert report.row(block).output_sqnr == pytest.approx(_hooked_sqnr(f, q, block, x),
                                                              rel=1e-6)


class _UntracedMLP(nn.Module):
    """Linears in a float Sequential and a ModuleList, in code torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        if len(x) > 0:  # len() of a Proxy: torch.fx cannot trace the root
            x = self.mlp(x)
        return sum(head(x) for head in self.heads)


def test_swapped_untraceable_models_count_the_quantized_layers_they_hold():
    """The root torch.fx cannot trace is judged as one op calling the model whole: it read
    "the float model has 1 quantized ops (`root`)" for T5's 33 dynamic Linears."""
    torch.manual_seed(0)
    f = _UntracedMLP().eval()
    q = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    quantized = [name for name, m in q.named_modules()
                 if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert quantized == ["mlp.0", "mlp.2", "heads.0", "heads.1", "heads.2"]
    for call in (lambda: ns.compare(q, f, [torch.randn(2, 4)], progress=False),
                 lambda: ns.match(q, f)):
        with pytest.raises(ns.InputError, match=re.escape(
                f"the float model has {len(quantized)} quantized ops (`mlp.0`, `mlp.2`, "
                "`heads.0`, ...) and the quantized model none")):
            call()
