"""Stage 3, instrument: loggers and shadows change no output and no user model."""

from __future__ import annotations

import copy
import math
import operator
from typing import NamedTuple

import pytest
import torch
import torch.ao.ns._numeric_suite as tns
import torch.ao.quantization as tq
import torch.fx as fx
import torch.nn as nn
from _models import Scaled

import fxnumeric as ns
from fxnumeric import sqnr
from fxnumeric.semantics import overwrites


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: (v.dequantize() if v.is_quantized else v).clone() for k, v in model.state_dict().items()
                  if isinstance(v, torch.Tensor)},
        "keys": list(model.state_dict().keys()),
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "dict": sorted(model.__dict__),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_same(before: dict, after: dict) -> None:
    assert before["keys"] == after["keys"]
    assert before["modules"] == after["modules"]
    assert before["training"] == after["training"]
    assert before["dict"] == after["dict"]
    assert before["hooks"] == after["hooks"]
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        a2 = a.dequantize() if a.is_quantized else a
        b2 = b.dequantize() if b.is_quantized else b
        return torch.equal(a2, b2)
    return all(_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(params=["eager_static", "fx_static", "dynamic_lstm"])
def pair(request, make_resnet18_pair, make_fx_resnet18_pair, make_lstm_pair):
    if request.param == "eager_static":
        f, q, data = make_resnet18_pair()
        return f, q, (data[0][0],)
    if request.param == "fx_static":
        f, q, data = make_fx_resnet18_pair()
        return f, q, (data[0][0],)
    f, q, inp, hidden = make_lstm_pair()
    return f, q, (inp, hidden)


def test_loggers_and_shadows_keep_outputs_bit_identical(pair):
    float_model, qmodel, args = pair
    with torch.no_grad():
        ref_f, ref_q = float_model(*args), qmodel(*args)
        float_gm, quant_gm = ns.add_loggers(float_model, qmodel)
        assert _equal(float_gm(*args), ref_f) and _equal(quant_gm(*args), ref_q)
        shadow_gm, skipped = ns.add_shadows(float_model, qmodel)
        assert not skipped
        assert _equal(shadow_gm(*args), ref_q)
    assert len(ns.loggers_of(quant_gm)) == len({p.name for p in ns.match(float_model, qmodel).pairs})


def test_public_calls_leave_the_models_untouched(pair):
    float_model, qmodel, args = pair
    before_f, before_q = _snapshot(float_model), _snapshot(qmodel)
    with torch.no_grad():
        out_q = qmodel(*args)
    ns.match(float_model, qmodel)
    ns.add_loggers(float_model, qmodel)
    ns.add_shadows(float_model, qmodel)
    ns.compare_weights(float_model, qmodel)
    ns.extract_weights(ns.match(float_model, qmodel))
    ns.compare_model_outputs(float_model, qmodel, *args)
    ns.compare_model_stub(float_model, qmodel, [nn.Conv2d, nn.Linear, nn.LSTM], *args)
    ns.compare(float_model, qmodel, [args])
    ns.trace(float_model)
    _assert_same(before_f, _snapshot(float_model))
    _assert_same(before_q, _snapshot(qmodel))
    with torch.no_grad():
        assert _equal(qmodel(*args), out_q)


def test_shadows_cover_add_pool_flatten_and_measure_local_error(make_fx_resnet18_pair):
    float_model, qmodel, data = make_fx_resnet18_pair()
    gm, skipped = ns.add_shadows(float_model, qmodel)
    assert skipped == {}
    gm(data[0][0])
    stats = {name: lg.stats for name, lg in ns.loggers_of(gm).items()}
    for name in ("add_relu", "maxpool", "avgpool", "flatten", "fc", "conv1"):
        s = stats[name]
        assert len(s["float"]) == 1 and s["float"][0].shape == s["quantized"][0].shape
        assert sqnr(s["float"][0], s["quantized"][0]) > 20, name


def test_prepare_twice_does_not_stack_and_remove_restores(make_resnet18_pair):
    float_model, qmodel, data = make_resnet18_pair()
    x = data[0][0]
    before = _snapshot(qmodel)
    with torch.no_grad():
        ref = qmodel(x)
    ns.prepare_model_outputs(float_model, qmodel)
    ns.prepare_model_outputs(float_model, qmodel)
    float_model(x)
    out = qmodel(x)
    assert torch.equal(out, ref)
    acts = ns.get_matching_activations(float_model, qmodel)
    assert all(len(v["float"]) == 1 and len(v["quantized"]) == 1 for v in acts.values())
    ns.remove_instrumentation(float_model)
    ns.remove_instrumentation(qmodel)
    _assert_same(before, _snapshot(qmodel))
    with pytest.raises(ns.InstrumentationError, match="not prepared"):
        ns.get_matching_activations(float_model, qmodel)


def test_logger_of_an_op_overwritten_in_place_keeps_its_value():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.fc(x))

    torch.manual_seed(0)
    f = Net().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    x = torch.randn(3, 4)
    float_gm, _ = ns.add_loggers(f, q, select=["fc"])
    float_gm(x)
    logged = ns.loggers_of(float_gm)["fc"].stats["tensor_val"][0]
    assert torch.equal(logged, f.fc(x)) and (logged < 0).any()


def test_custom_logger_that_returns_none_cannot_change_outputs(make_lstm_pair):
    float_model, qmodel, inp, hidden = make_lstm_pair()

    class Silent(ns.Logger):
        def forward(self, x):
            self.stats.setdefault("calls", 0)
            self.stats["calls"] += 1

    f_gm, q_gm = ns.add_loggers(float_model, qmodel, Silent)
    with torch.no_grad():
        assert _equal(q_gm(inp, hidden), qmodel(inp, hidden))
    assert ns.loggers_of(q_gm)["rnn"].stats == {"calls": 1}


def test_bad_logger_class_is_reported():
    f = nn.Sequential(nn.Linear(2, 2)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    with pytest.raises(ns.InstrumentationError, match="not a logger"):
        ns.add_loggers(f, q, nn.Identity)
    with pytest.raises(ns.InstrumentationError, match="no pair is named"):
        ns.add_loggers(f, q, select=["nope"])


def test_shadow_module_and_get_logger_dict_on_plain_module_trees():
    """The eager-style Shadow wrapper works as torch's, and get_logger_dict walks Logger children."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(4, 4)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    holder = nn.Sequential(ns.Shadow(q[0], f[0], ns.ShadowLogger))
    x = torch.randn(3, 4)
    assert torch.equal(holder(x), q[0](x))
    stats = ns.get_logger_dict(holder)
    assert list(stats) == ["0.stats"]
    assert torch.equal(stats["0.stats"]["float"][0], f[0](x).detach())
    assert stats["0.stats"]["quantized"][0].shape == (3, 4)  # whole batch kept
    assert ns.get_logger_dict(holder, prefix="model") == {"model.0.stats": stats["0.stats"]}


def test_shadows_share_pure_float_modules_and_copy_stateful_ones():
    """A shadow calls the float model's own eval-mode torch modules (no copy of the weights),
    but copies observers and fake-quants, whose statistics running it must not change."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    x = torch.randn(2, 3, 10, 10)
    shadowed, _ = ns.add_shadows(f, convert_fx(_prepared(f, x)))
    shared = {id(m) for m in shadowed.modules()}
    assert id(f[0]) in shared and id(f[2]) in shared  # no copy of pure modules

    qat = prepare_qat_fx(copy.deepcopy(f).train(), get_default_qat_qconfig_mapping("x86"), (x,))
    qat(x)
    qat.eval()
    converted = convert_fx(copy.deepcopy(qat))
    before = {k: v.clone() for k, v in qat.state_dict().items() if isinstance(v, torch.Tensor)}
    shadowed, skipped = ns.add_shadows(qat, converted)
    assert not skipped
    with torch.no_grad():
        shadowed(x * 3)  # new ranges: an observer that ran would move
    after = qat.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not ({id(m) for m in qat.modules() if list(m.buffers())} & {id(m) for m in shadowed.modules()})


def _prepared(f: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    p = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (x,))
    p(x)
    return p


def test_loggers_and_shadows_survive_dead_code_elimination(make_fx_resnet18_pair):
    """Observer calls are side effects torch.fx knows of: a dead-code pass keeps them."""
    f, q, data = make_fx_resnet18_pair()
    x = data[0][0]
    float_gm, quant_gm = ns.add_loggers(f, q)
    shadowed, _ = ns.add_shadows(f, q)
    for gm in (float_gm, quant_gm, shadowed):
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        assert len(gm.graph.nodes) == before  # nothing an observer needs was removed
    with torch.no_grad():
        assert torch.equal(quant_gm(x), q(x)) and torch.equal(shadowed(x), q(x))
        float_gm(x)
    logged = ns.loggers_of(quant_gm)
    assert logged and all(len(lg.stats["tensor_val"]) == 1 for lg in logged.values())
    assert all(len(lg.stats["float"]) == 1 for lg in ns.loggers_of(shadowed).values())


# ------------------------------------------------ writes into a logged value through an alias
#
# docs/eager_compat.md row 18: a logger keeps the value as the op returned it, whatever writes
# into it afterwards. The oracle is the op itself, run by hand on the same input.

_ALIASES = {
    "identity": lambda m, y: m.identity(y),
    "dropout": lambda m, y: m.drop(y),  # nn.Dropout in eval: the identity
    "F.dropout": lambda m, y: torch.nn.functional.dropout(y, 0.5, training=False),
    "contiguous": lambda m, y: y.contiguous(),
    "detach": lambda m, y: y.detach(),
    "to": lambda m, y: y.to(torch.float32),
    "float": lambda m, y: y.float(),
    "type_as": lambda m, y: y.type_as(y),
    "view": lambda m, y: y.view(-1),  # handled before: the same rule
}


class _WritesThrough(nn.Module):
    """``fc``'s output handed on by an alias, which is then clamped in place."""

    def __init__(self, via: str) -> None:
        super().__init__()
        self.fc, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.identity, self.drop = nn.Identity(), nn.Dropout(0.5)
        self.via = via

    def forward(self, x):
        y = _ALIASES[self.via](self, self.fc(x))
        y.clamp_(0, 0.1)
        return self.fc2(y.reshape(x.shape))


def _dynamic(f: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})


@pytest.mark.parametrize("via", list(_ALIASES))
def test_a_write_through_an_alias_of_a_logged_value_leaves_the_logged_value(via):
    """Before, a write through an alias that is the tensor itself (nn.Identity, eval dropout,
    ``.contiguous()``, ``.to(same dtype)`` ...) reached the logged value: fc.stats held the
    clamped output (max 0.1) on both sides, and compare_model_stub's quantized entry too."""
    torch.manual_seed(0)
    f = _WritesThrough(via).eval()
    q = _dynamic(f)
    x = torch.randn(3, 4)
    with torch.no_grad():
        float_fc, quant_fc = f.fc(x), q.fc(x)
        want = q(x)
    assert float_fc.max() > 0.1  # the clamp changes it
    outputs = ns.compare_model_outputs(f, q, x)["fc.stats"]
    assert torch.equal(outputs["float"][0], float_fc)
    assert torch.equal(outputs["quantized"][0], quant_fc)
    stub = ns.compare_model_stub(f, q, [nn.Linear], x)["fc.stats"]
    assert torch.equal(stub["quantized"][0], quant_fc)
    assert torch.equal(stub["float"][0], float_fc)  # the shadow reads x, as fc does
    shadowed, _ = ns.add_shadows(f, q)
    with torch.no_grad():
        assert torch.equal(shadowed(x), want)  # the copies change nothing the model computes
    # torch's eager suite keeps the tensor itself: the clamped value (row 18)
    f_eager, q_eager = copy.deepcopy(f), copy.deepcopy(q)
    eager = tns.compare_model_outputs(f_eager, q_eager, x)["fc.stats"]
    assert torch.equal(eager["float"][0], float_fc.clamp(0, 0.1))


class _Static(nn.Module):
    """``dequant(fc(quant(x)))``, clamped in place after the DeQuantStub."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.dequant(self.fc(self.quant(x)))
        y.clamp_(0, 0.1)
        return y


def _static_pair() -> tuple[nn.Module, nn.Module]:
    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(0)
    f = _Static().eval()
    q = copy.deepcopy(f)
    q.qconfig = tq.get_default_qconfig("fbgemm")
    tq.prepare(q, inplace=True)
    q(torch.randn(8, 4))
    return f, tq.convert(q)


def test_a_write_after_the_dequantstub_leaves_the_float_value_logged():
    """The float model's DeQuantStub hands fc's output on as it is. Before: fc.stats float
    held the clamped value (max 0.1000 against fc's 0.8), by compare_model_outputs and by
    prepare_model_outputs alike."""
    f, q = _static_pair()
    x = torch.randn(3, 4)
    with torch.no_grad():
        float_fc = f.fc(x)
    assert float_fc.max() > 0.1
    assert torch.equal(ns.compare_model_outputs(f, q, x)["fc.stats"]["float"][0], float_fc)
    ns.prepare_model_outputs(f, q)
    f(x.clone())
    q(x.clone())
    logged = ns.get_matching_activations(f, q)["fc.stats"]
    assert torch.equal(logged["float"][0], float_fc)
    with torch.no_grad():
        quant_fc = q.fc(q.quant(x))
    assert torch.equal(logged["quantized"][0].dequantize(), quant_fc.dequantize())


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_compare_copies_a_value_written_through_an_alias_up_front():
    """compare()'s float twins read version counters and ran the first batch again when a
    value they held was written into (the float model ran twice); the graph's own writes,
    through aliases too, are now seen before running, by the rule the loggers use. The
    oracle: SQNR of fc's outputs computed by hand."""
    torch.manual_seed(0)
    f = _WritesThrough("contiguous").eval()
    q = _dynamic(f)
    x = torch.randn(3, 4)
    with torch.no_grad():
        want = sqnr(f.fc(x), q.fc(x))
    calls = []
    handle = f.fc.register_forward_hook(lambda *_: calls.append(1))
    try:
        report = ns.compare(f, q, [x], comparisons=("outputs",))
    finally:
        handle.remove()
    row = report.row("fc")
    assert math.isclose(row.output["sqnr"], float(want), rel_tol=1e-4)
    assert len(calls) == 1  # no second run of the batch


def test_item_assignment_is_a_write_into_the_value():
    """``y[:, 0] = 0`` (traced as ``y.__setitem__``, or ``operator.setitem``) writes into
    ``y``. Before, fc.stats kept the assigned tensor on both sides."""
    g = fx.Graph()
    y = g.placeholder("y")
    assigned = g.call_function(operator.setitem, (y, 0, 0.0))
    method = g.call_method("__setitem__", (y, 0, 0.0))
    g.output(y)
    assert overwrites(assigned, y, {}) and overwrites(method, y, {})

    class Assigns(nn.Module):
        def __init__(self, through_view: bool) -> None:
            super().__init__()
            self.fc, self.through_view = nn.Linear(4, 4), through_view

        def forward(self, x):
            y = self.fc(x)
            target = y.view(-1) if self.through_view else y
            target.__setitem__(0, 0.0)  # what torch.fx records of `target[0] = 0.0`
            return y * 2

    x = torch.randn(3, 4)
    for through_view in (False, True):
        torch.manual_seed(0)
        f = Assigns(through_view).eval()
        q = _dynamic(f)
        with torch.no_grad():
            float_fc, quant_fc = f.fc(x), q.fc(x)
        logged = ns.compare_model_outputs(f, q, x)["fc.stats"]
        assert torch.equal(logged["float"][0], float_fc), through_view
        assert torch.equal(logged["quantized"][0], quant_fc), through_view


def test_a_write_through_out_is_a_write_into_the_value():
    """``torch.add(y, 1, out=y)`` after fc: the logged fc read fc's output plus one."""

    class Adds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            torch.add(y, 1, out=y)
            return y * 2

    torch.manual_seed(0)
    f = Adds().eval()
    q = _dynamic(f)
    x = torch.randn(3, 4)
    with torch.no_grad():
        float_fc, quant_fc = f.fc(x), q.fc(x)
        logged = ns.compare_model_outputs(f, q, x)["fc.stats"]
    assert torch.equal(logged["float"][0], float_fc)
    assert torch.equal(logged["quantized"][0], quant_fc)


class _Returns(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.fc(x))


def test_a_write_into_the_returned_output_leaves_the_logged_value():
    """The caller of a prepared model (or of add_loggers' models) receives the output, and
    may post-process it in place. Before, ``out = f(x); out.mul_(0)`` turned the logged float
    fc to zeros (and the quantized one, and the shadow's quantized entry)."""
    torch.manual_seed(0)
    f = _Returns().eval()
    q = _dynamic(f)
    x = torch.randn(3, 4)
    with torch.no_grad():
        float_fc, quant_fc = f.fc(x), q.fc(x)
    ns.prepare_model_outputs(f, q)
    f(x).mul_(0)
    q(x).mul_(0)
    logged = ns.get_matching_activations(f, q)["fc.stats"]
    assert torch.equal(logged["float"][0], float_fc)
    assert torch.equal(logged["quantized"][0], quant_fc)
    ns.remove_instrumentation(f)
    ns.remove_instrumentation(q)

    ns.prepare_model_with_stubs(f, q, [nn.Linear], ns.ShadowLogger)
    q(x).mul_(0)
    stub = ns.get_logger_dict(q)["fc.stats"]
    assert torch.equal(stub["quantized"][0], quant_fc)
    assert torch.equal(stub["float"][0], float_fc)
    ns.remove_instrumentation(q)

    float_gm, quant_gm = ns.add_loggers(f, q)
    float_gm(x).mul_(0)
    assert torch.equal(ns.loggers_of(float_gm)["fc"].stats["tensor_val"][0], float_fc)


class _Out(NamedTuple):
    y: torch.Tensor


class _ReturnsInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return _Out(self.fc(x))  # torch.fx records a call of `_Out`, not the output's args


def test_a_write_into_a_value_returned_inside_a_named_tuple_leaves_the_logged_value():
    """A value returned inside a NamedTuple (a Hugging Face ModelOutput alike) reaches the
    caller through the class call torch.fx records: ``out.y.mul_(0)`` zeroed the logged fc on
    both sides, where a dict or a list was copied."""
    torch.manual_seed(0)
    f = _ReturnsInside().eval()
    q = _dynamic(f)
    x = torch.randn(3, 4)
    with torch.no_grad():
        float_fc, quant_fc = f.fc(x), q.fc(x)
    ns.prepare_model_outputs(f, q)
    f(x).y.mul_(0)
    q(x).y.mul_(0)
    logged = ns.get_matching_activations(f, q)["fc.stats"]
    assert torch.equal(logged["float"][0], float_fc)
    assert torch.equal(logged["quantized"][0], quant_fc)


def test_a_logger_that_raises_is_named_not_the_input():
    """A custom logger that raises was reported as ``InputError: the float model failed on
    the input ... Check the input shape, dtype and device``."""

    class Boom(ns.OutputLogger):
        def forward(self, x):
            raise ValueError("boom from my logger")

    class BoomShadow(ns.ShadowLogger):
        def forward(self, x, y):
            raise KeyError("shadow boom")

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(4, 4)).eval()
    q = _dynamic(f)
    x = torch.randn(2, 4)
    with pytest.raises(ns.InstrumentationError,
                       match=r"logger Boom .*logging the float model's `0` raised ValueError: "
                             r"boom from my logger") as raised:
        ns.compare_model_outputs(f, q, x, logger_cls=Boom)
    assert isinstance(raised.value.__cause__, ValueError)
    assert "input shape" not in str(raised.value)
    with pytest.raises(ns.InstrumentationError,
                       match=r"logger BoomShadow .*the shadow of the quantized model's `0` "
                             r"raised KeyError") as raised:
        ns.compare_model_stub(f, q, [nn.Linear], x, logger_cls=BoomShadow)
    assert isinstance(raised.value.__cause__, KeyError)
    ns.prepare_model_outputs(f, q, Boom)  # the user runs the model: the same error
    with pytest.raises(ns.InstrumentationError, match="logger Boom"):
        q(x)


class _Inputs(fx.Interpreter):
    """Runs a graph and keeps each ``aten.linear`` call's input and output."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target is torch.ops.aten.linear.default:
            self.seen.append((args[0], out))
        return out


def _quantized(model: nn.Module, flow: str, data: list[torch.Tensor]) -> nn.Module:
    """``model`` quantized by ``flow``: ``"dynamic"`` (qint8 Linears) or ``"fx_static"``
    (prepare_fx / convert_fx, fbgemm, calibrated on ``data``)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if flow == "dynamic":
        return tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    prepared = prepare_fx(model, get_default_qconfig_mapping("fbgemm"), (data[0],))
    for x in data:
        prepared(x)
    return convert_fx(prepared)


@pytest.mark.parametrize("flow", ["dynamic", "fx_static", "pt2e"])
def test_a_shadow_reads_what_the_quantized_op_reads_past_an_unpaired_op(flow):
    """The quantized model scales fc2's input by 0.5; the float model does not. fc2's shadow
    was fed the counterpart of its float input (the relu), so it measured the scaling as
    fc2's own error (7.30 dB) and the verdict named fc2 culprit. As torch's eager Shadow, it
    now reads what the quantized fc2 reads: the float fc2 fed the quantized fc2's own
    (dequantized) input, by forward hooks, is the oracle."""
    torch.manual_seed(0)
    f = Scaled().eval()
    scaled = Scaled(0.5).eval()
    scaled.load_state_dict(f.state_dict())
    data = [torch.randn(4, 16) for _ in range(4)]
    float_fc2 = f.fc2
    seen = []
    if flow == "pt2e":
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.testing.pt2e._xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )

        f = torch.export.export(f, (data[0],)).module()
        prepared = prepare_pt2e(torch.export.export(scaled, (data[0],)).module(),
                                XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
        for x in data:
            prepared(x)
        q = convert_pt2e(prepared)
        with torch.no_grad():
            for x in data:
                run = _Inputs(q)
                run.run(x)
                seen.append(run.seen[1])  # fc2's linear: what it reads, what it returns
    else:
        q = _quantized(scaled, flow, data)
        handle = q.fc2.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
        with torch.no_grad():
            for x in data:
                q(x)
        handle.remove()
    with torch.no_grad():
        pairs = [(float_fc2(i.dequantize() if i.is_quantized else i),
                  o.dequantize() if o.is_quantized else o) for i, o in seen]
    signal = sum(float((ref.double() ** 2).sum()) for ref, _ in pairs)
    noise = sum(float(((ref.double() - out.double()) ** 2).sum()) for ref, out in pairs)
    expected = 10 * math.log10(signal / noise)

    report = ns.compare(f, q, data)
    fc2 = report.row("fc2")
    assert fc2.shadow_sqnr == pytest.approx(expected, abs=1e-3)
    assert fc2.shadow_sqnr > 35  # 7.3 dB before: the scaling's error
    assert "reads quantized `mul" in fc2.note and "in no row" in fc2.note
    assert report.verdict.culprit != "fc2"
    assert "or it enters at the unpaired node" in report.summary()


class _Dropped(nn.Module):
    """fc2 reads the relu through an eval-mode dropout and ``.contiguous()`` (plumbing); with
    ``half``, a ``* 0.5`` before them."""

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.1)
        self.half = half

    def forward(self, x):
        y = torch.relu(self.fc1(x))
        if self.half:
            y = y * 0.5
        return self.fc2(self.drop(y).contiguous())


def _op_read(gm: fx.GraphModule, target: str) -> str:
    """The op whose value the call of module ``target`` reads, past eval-mode dropouts and
    ``.contiguous()``, read off the fx graph."""
    (node,) = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]
    read = node.args[0]
    while (read.op == "call_method" and read.target == "contiguous"
           or read.op == "call_module" and isinstance(gm.get_submodule(read.target), nn.Dropout)):
        read = read.args[0]
    return read.name


@pytest.mark.parametrize("flow", ["dynamic", "fx_static"])
@pytest.mark.parametrize("side", ["quant", "float"])
def test_an_unpaired_op_is_named_by_the_float_op_read_not_the_plumbing_after_it(flow, side):
    """fc2 reads the relu (or, the other way round, the float model's `* 0.5`) through a
    dropout and `.contiguous()`. Its note named the plumbing node its float input came
    through: "where the float model reads `contiguous`", and for a `* 0.5` only the float
    model has, "its float twin reads `contiguous`, from float ops the quantized model lacks",
    a node that is in no row and not unpaired. The note names the op whose value is read
    (the fx graph of the float model, walked past the plumbing), as the hybrid runner's
    strays do: the two read one derivation (`instrument.graph.stand_ins`)."""
    from fxnumeric.advice.hybrid import HybridRunner

    torch.manual_seed(0)
    f, other = _Dropped(half=side == "float").eval(), _Dropped(half=side == "quant").eval()
    other.load_state_dict(f.state_dict())
    data = [torch.randn(4, 16) for _ in range(3)]
    q = _quantized(other, flow, data)
    read = _op_read(fx.symbolic_trace(f), "fc2")
    assert read == ("relu" if side == "quant" else "mul")
    matching = ns.match(f, q, data[0])
    built = ns.instrument(matching, shadows=lambda p: ns.ShadowLogger())
    report = ns.compare(f, q, data, progress=False, matching=matching)
    note = report.row("fc2").note
    if side == "quant":  # only the quantized model has the mul
        ((op, float_op),) = built.strays.values()
        assert op.startswith("mul") and float_op == read and not built.bypassed
        assert f"reads quantized `{op}`, which has no float counterpart, where the float model " \
               f"reads `{read}`" in note
        assert HybridRunner(matching).strays == {"fc2": (op,)}
    else:
        ((op, float_op),) = built.bypassed.values()
        assert op == "relu" and float_op == read and not built.strays
        assert f"its float twin reads `{read}`, from float ops the quantized model lacks" in note
        assert (read, "float") in [(node, s) for node, s, _ in report.unmatched]
        assert HybridRunner(matching).strays == {}
