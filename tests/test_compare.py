"""Stages 5 and 6, compare and report: per-layer metrics in one call, rendered for people."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn as nn

import fxnumeric as ns


def _dynamic_pair(seed: int = 0):
    torch.manual_seed(seed)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    return f, torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})


def test_metrics_match_hand_computation():
    ref = torch.tensor([3.0, 4.0, 0.0])
    act = torch.tensor([3.0, 4.5, 0.0])
    assert ns.sqnr(ref, act) == pytest.approx(10 * math.log10(25 / 0.25))
    assert ns.mse(ref, act) == pytest.approx(0.25 / 3)
    assert ns.max_abs_error(ref, act) == pytest.approx(0.5)
    assert ns.cosine(ref, act) == pytest.approx(float(torch.nn.functional.cosine_similarity(ref, act, dim=0)))
    assert ns.sqnr(ref, ref) == math.inf
    assert ns.sqnr(torch.zeros(3), torch.ones(3)) == -math.inf
    assert ns.cosine(torch.zeros(3), torch.zeros(3)) == 1.0
    assert math.isnan(ns.sqnr(torch.tensor([float("nan")]), torch.tensor([1.0])))
    assert math.isnan(ns.max_abs_error(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0])))


def test_compare_rows_agree_with_eager_style_results(make_resnet18_pair):
    float_model, qmodel, data = make_resnet18_pair()
    batches = [x for x, _ in data]
    report = ns.compare(float_model, qmodel, batches)
    assert report.batches == 2 and len(report.rows) == 33
    acts = ns.compare_model_outputs(float_model, qmodel, batches[0])
    acc_ref = torch.cat([acts["layer1.0.conv1.stats"]["float"][0].flatten()])
    # accumulated over two batches, so recompute over both with the eager-style call
    second = ns.compare_model_outputs(float_model, qmodel, batches[1])
    f = torch.cat([acc_ref, second["layer1.0.conv1.stats"]["float"][0].flatten()])
    q = torch.cat([acts["layer1.0.conv1.stats"]["quantized"][0].dequantize().flatten(),
                   second["layer1.0.conv1.stats"]["quantized"][0].dequantize().flatten()])
    # float32 per-batch reductions (the default) agree with float64 to ~1e-8 dB here ...
    assert report.row("layer1.0.conv1").output_sqnr == pytest.approx(ns.sqnr(f, q), rel=1e-6)
    # ... and precision=float64 is exact
    exact = ns.compare(float_model, qmodel, batches, comparisons=["outputs"], precision=torch.float64)
    assert exact.row("layer1.0.conv1").output_sqnr == pytest.approx(ns.sqnr(f, q), rel=1e-12)
    weights = ns.compare_weights(float_model, qmodel)
    assert report.row("conv1").weight_sqnr == pytest.approx(ns.sqnr(weights["conv1.weight"]["float"], weights["conv1.weight"]["quantized"]))
    stubs = ns.compare_model_stub(float_model, qmodel, [nn.Conv2d], batches[0])
    s = stubs["layer4.1.conv2.stats"]
    assert ns.sqnr(s["float"][0], s["quantized"][0]) == pytest.approx(
        ns.compare(float_model, qmodel, batches[:1], comparisons=["shadows"]).row("layer4.1.conv2").shadow_sqnr)
    row = report.row("layer4.1.conv2")
    assert row.shadow_sqnr is not None and row.shadow_sqnr > row.output_sqnr  # local error < accumulated
    assert report.worst_layer.name == min(
        (r for r in report.rows if r.shadow_sqnr is not None), key=lambda r: r.shadow_sqnr).name


def test_selectable_comparisons_and_custom_metric():
    f, q = _dynamic_pair()
    data = [torch.randn(4, 16) for _ in range(3)]

    def l1(ref, actual):
        return float((ref - actual).abs().mean())

    report = ns.compare(f, q, data, comparisons=["outputs"], metrics=["sqnr", l1])
    assert report.metrics == ("sqnr", "l1")
    row = report.row("0")
    assert row.weight_sqnr is None and row.shadow == {}
    assert set(row.output) == {"sqnr", "l1"} and row.output["l1"] > 0
    assert "shadow SQNR" not in report.table() and "l1" in report.table()
    with pytest.raises(ns.InputError, match="unknown metric 'psnr'"):
        ns.compare(f, q, data, metrics=["psnr"])
    # names that collide silently dropped a metric (two lambdas) or showed the built-in
    # under a custom function's name
    def sqnr(ref, actual):
        return 0.0

    for metrics in ([lambda r, a: 0.0, lambda r, a: 1.0], [sqnr], {"sqnr": l1}):
        with pytest.raises(ns.InputError, match=r"custom metric name .* is (a built-in|another)"):
            ns.compare(f, q, data, metrics=metrics)
    with pytest.raises(ns.InputError, match="unknown comparisons"):
        ns.compare(f, q, data, comparisons=["activations"])


def test_identical_models_give_infinite_sqnr_everywhere():
    f, _ = _dynamic_pair()
    report = ns.compare(f, copy.deepcopy(f), [torch.randn(2, 16)])
    assert all(r.output_sqnr == math.inf and r.shadow_sqnr == math.inf for r in report.rows)
    assert report.model_output["sqnr"] == math.inf


def test_bad_data_is_reported():
    f, q = _dynamic_pair()
    with pytest.raises(ns.InputError, match="data yielded no batches"):
        ns.compare(f, q, [])
    with pytest.raises(ns.InputError, match=r"float model failed on the input \(Tensor\[4, 3\]"):
        ns.compare(f, q, [torch.randn(4, 3)])


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x, y):
        return self.a(x) + self.b(y)


def test_data_given_as_one_batch_or_a_used_up_iterator_is_explained():
    f = _TwoInputs().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    batch = (torch.randn(4, 16), torch.randn(4, 8))
    with pytest.raises(ns.InputError, match=r"one batch of several inputs is `\[\(x, y\)\]`"):
        ns.compare(f, q, batch, progress=False)  # read as two batches of one input each
    batches = iter([batch])
    report = ns.compare(f, q, batches, progress=False)
    assert report.batches == 1
    for call in (ns.compare, ns.sensitivity):
        with pytest.raises(ns.InputError, match="It is an iterator .* read to its end"):
            call(f, q, batches, progress=False)
    with pytest.raises(ns.InputError, match="no batches: pass an iterable[^.]*$"):
        ns.compare(f, q, [], progress=False)  # a list is no iterator: no such hint
    with pytest.raises(ns.InputError, match="max_batches=0: pass a positive number"):
        ns.compare(f, q, iter([batch]), max_batches=0, progress=False)  # not the data's fault


def test_keep_activations_and_bounded_state():
    f, q = _dynamic_pair()
    data = [torch.randn(2, 16) for _ in range(5)]
    light = ns.compare(f, q, data)
    assert all(r.activations is None for r in light.rows)
    heavy = ns.compare(f, q, data, keep_activations=True)
    assert len(heavy.row("0").activations) == 5


def test_renderings(tmp_path, make_lstm_pair):
    float_model, qmodel, inp, hidden = make_lstm_pair()
    report = ns.compare(float_model, qmodel, [(inp, hidden)] * 2)
    for fmt in ("plain", "github", "markdown"):
        text = report.table(tablefmt=fmt)
        assert "rnn" in text and text.splitlines()[-1] == report.summary()
    top = report.table(sort="output_sqnr", top_k=2).splitlines()
    # the notes (the LSTM returns (output, (h, c)): which of them is compared), header,
    # rule, two rows, summary
    assert report.model_output_part == "[0]"
    assert len(top) == len(report.notes) + 2 + 2 + 1
    data = json.loads(report.to_json())
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["encoder"]["output"]["sqnr"] == "inf"
    assert data["worst_layer"] == report.worst_layer.name
    rows = list(csv.DictReader(report.to_csv(tmp_path / "r.csv").open()))
    # a row per layer, then the model output's
    assert [r["layer"] for r in rows] == [r.name for r in report.rows] + ["(model output)"]
    assert float(rows[-1]["output_sqnr"]) == pytest.approx(report.model_output["sqnr"])
    page = report.to_html(tmp_path / "r.html").read_text()
    assert page.count("<svg") >= 2 and "rnn._all_weight_values" not in page  # histograms are per layer
    assert "<polyline" in page and report.summary().split(";")[0] in page
    with pytest.raises(ns.InputError, match="sort must be one of"):
        report.table(sort="name")


@pytest.mark.parametrize("which", ["eager", "fx"])
def test_every_metric_agrees_with_float64_to_1e6(which, make_resnet18_pair, make_fx_resnet18_pair):
    """The float32 per-batch path (shared dequantized outputs included) loses no accuracy."""
    f, q, data = make_resnet18_pair() if which == "eager" else make_fx_resnet18_pair()
    batches = [x for x, _ in data]
    m = ns.match(f, q)
    fast = ns.compare(f, q, batches, matching=m, comparisons=("outputs", "shadows"))
    exact = ns.compare(f, q, batches, matching=m, comparisons=("outputs", "shadows"),
                       precision=torch.float64)
    compared = 0
    for r_fast, r_exact in zip(fast.rows, exact.rows, strict=True):
        for side in ("output", "shadow"):
            for metric, value in getattr(r_exact, side).items():
                got = getattr(r_fast, side)[metric]
                if math.isfinite(value):
                    assert got == pytest.approx(value, rel=1e-6, abs=1e-12), (r_fast.name, side, metric)
                    compared += 1
    assert compared > 100


def test_an_unknown_row_is_an_input_error_naming_the_rows():
    f, q = _dynamic_pair()
    report = ns.compare(f, q, [torch.randn(2, 16)])
    with pytest.raises(ns.InputError, match=r"no row named 'fc'; rows are: 0, 1, 2"):
        report.row("fc")


class _Kept(nn.Module):
    """A detector's last step: the values above a threshold (how many is data-dependent)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.threshold = threshold

    def forward(self, x):
        y = self.fc(x)
        return y[y > self.threshold]


def test_an_empty_or_resized_model_output_is_not_compared_and_says_why():
    """A detector that keeps no box returns empty tensors: the model output read SQNR inf
    (a perfect match of nothing) and MSE nan. Nothing compared is NaN, and the notes and the
    summary say why; so for outputs whose sizes differ between the models."""
    torch.manual_seed(0)
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    empty = _Kept(100.0).eval()
    report = ns.compare(empty, torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(empty), {nn.Linear}), xs)
    assert all(math.isnan(v) for v in report.model_output.values())
    assert "the model output held no values (empty tensors): nothing to compare" in report.notes
    assert "model output not compared (see notes)" in report.summary()
    assert math.isfinite(report.row("fc").output_sqnr)  # the layers are compared as ever
    # `y > threshold` is a mask: it read SQNR inf, and a signal "collapsed" when all False
    mask = report.row("gt")
    assert mask.output_sqnr is None and mask.shadow_sqnr is None and not mask.degenerate
    assert mask.note == ("boolean or integer values (a mask, indices): no rounding error to "
                         "measure; all 96 equal")  # 3 batches of 4x8 values, all below 100
    assert "collapsed" not in report.summary()
    kept = _Kept(0.3).eval()
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(kept), {nn.Linear})
    quant.threshold = 0.0  # keeps more values than the float model
    resized = ns.compare(kept, quant, xs)
    assert math.isnan(resized.model_output["sqnr"])
    # how many of the masks' values differ, counted directly
    with torch.no_grad():
        differ = sum(int(((kept.fc(x) > 0.3) != (quant.fc(x) > 0.0)).sum()) for x in xs)
    assert 0 < differ < 96
    assert resized.row("gt").note.endswith(f"; {differ} of 96 differ ({100 * differ / 96:.1f}%)")
    assert any(n.startswith("model output shapes differ") for n in resized.notes)
    assert "model output not compared" in resized.summary()


class _Pick(nn.Module):
    """A sequence classifier's pooling: one value per row at an index the input gives
    (transformers' ``logits[torch.arange(batch), sequence_lengths]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return y[torch.arange(x.shape[0]), x.argmax(dim=1)]


def test_a_getitem_with_a_tensor_index_pairs():
    """A getitem's index was compared as it is, and a tensor index is a node of each graph:
    never equal across them, so ``y[rows, cols]`` and ``y[y > t]`` went unpaired on identical
    graphs. Oracle: the picked values computed directly."""
    torch.manual_seed(0)
    model = _Pick().eval()
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(3))
    m = ns.match(model, quant)
    assert not m.unmatched_float and not m.unmatched_quant
    report = ns.compare(model, quant, [x])
    rows, cols = torch.arange(6), x.argmax(dim=1)
    with torch.no_grad():
        expected = ns.sqnr(model.fc(x)[rows, cols], quant.fc(x)[rows, cols])
    (picked,) = [r for r in report.rows if r.kind == "getitem"]
    assert picked.output_sqnr == pytest.approx(expected, abs=1e-4)
    assert report.model_output["sqnr"] == pytest.approx(expected, abs=1e-4)
    kept = ns.match(_Kept(0.3).eval(), torch.ao.quantization.quantize_dynamic(
        _Kept(0.3).eval(), {nn.Linear}))
    assert not kept.unmatched_float and "getitem" in {p.kind for p in kept.pairs}


def _shift_and_scale_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * 3 + 2,)


def _rescale_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 10 - 1


def test_hooks_on_the_model_itself_shape_rows_hybrids_and_diagnosis():
    """The model's own hooks (an input transform, an output rescale) run around every graph
    compare, sensitivity and diagnose run, as around ``model(x)``: torch.fx traces
    ``forward`` without them (before, row 0 read 41.9 dB for 48.98 dB on the true inputs).
    Oracle: the layers run by hand on the hooked input."""
    f, q = _dynamic_pair()
    for model in (f, q):
        model.register_forward_pre_hook(_shift_and_scale_input)
        model.register_forward_hook(_rescale_output)
    x = torch.randn(16, 16)
    given = x * 3 + 2
    float_hidden, quant_hidden = f[1](f[0](given)), q[1](q[0](given))

    def end(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return _rescale_output(f, (), head(hidden))

    float_out, quant_out = end(f[2], float_hidden), end(q[2], quant_hidden)
    report = ns.compare(f, q, [x])
    rows = {row.name: row for row in report.rows}
    assert rows["0"].output["sqnr"] == pytest.approx(ns.sqnr(f[0](given), q[0](given)), abs=1e-3)
    assert rows["2"].output["sqnr"] == pytest.approx(
        ns.sqnr(f[2](float_hidden), q[2](quant_hidden)), abs=1e-3)
    assert report.model_output["mse"] == pytest.approx(ns.mse(float_out, quant_out), rel=1e-4)

    sens = ns.sensitivity(f, q, [x])
    assert sens.quantized == pytest.approx(ns.sqnr(float_out, quant_out), abs=1e-3)
    only_first = end(f[2], f[1](q[0](given)))  # the float model with only layer 0 quantized
    only_last = end(q[2], float_hidden)
    assert sens.layer("0").only == pytest.approx(ns.sqnr(float_out, only_first), abs=1e-3)
    assert sens.layer("2").only == pytest.approx(ns.sqnr(float_out, only_last), abs=1e-3)

    diagnosis = {layer.name: layer for layer in ns.diagnose(f, q, [x]).layers}
    assert diagnosis["2"].local_sqnr == pytest.approx(  # the float twin on the quantized input
        ns.sqnr(f[2](quant_hidden), q[2](quant_hidden)), abs=1e-3)
    assert diagnosis["2"].cumulative_sqnr == pytest.approx(
        ns.sqnr(f[2](float_hidden), q[2](quant_hidden)), abs=1e-3)


@dataclasses.dataclass
class _HY:
    h: torch.Tensor
    y: torch.Tensor


class _Out:
    """An output object that is no dataclass: its tensors in attributes."""

    def __init__(self, h: torch.Tensor, y: torch.Tensor) -> None:
        self.h, self.y = h, y


class _TwoHeads(nn.Module):
    def __init__(self, returns) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)
        self.returns = returns

    def forward(self, x: torch.Tensor):
        h = self.a(x)
        return self.returns(h, self.b(h))


def _pooled_sqnr(pairs) -> float:
    """Oracle: SQNR of float64 sums over every (float, quantized) pair, |z|^2 for complex."""
    signal = sum(float(f.to(torch.complex128).abs().pow(2).sum()) for f, _ in pairs)
    noise = sum(float((f.to(torch.complex128) - q.to(torch.complex128)).abs().pow(2).sum())
                for f, q in pairs)
    return 10 * math.log10(signal / noise)


_OUTPUTS = {  # what forward returns, the tensor the oracle reads, model_output_part
    "dataclass": (lambda h, y: _HY(h, y), lambda o: o.h, ".h"),
    "object": (lambda h, y: _Out(h, y), lambda o: o.h, ".h"),
    "None first": (lambda h, y: (None, y), lambda o: o[1], ""),  # the one tensor: no part
    "dict of None first": (lambda h, y: {"aux": None, "out": [y, h]}, lambda o: o["out"][0],
                           "['out'][0]"),
}


@pytest.mark.parametrize("case", list(_OUTPUTS))
def test_the_model_output_is_the_first_tensor_the_output_holds(case):
    returns, pick, part = _OUTPUTS[case]
    torch.manual_seed(0)
    f = _TwoHeads(returns).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(4, 8) for _ in range(3)]
    with torch.no_grad():
        oracle = _pooled_sqnr([(pick(f(x)), pick(q(x))) for x in data])  # 40.31 / 38.17 dB
    report = ns.compare(f, q, data)
    # before: nan, "model output not compared (see notes)" and no note
    assert report.model_output["sqnr"] == pytest.approx(oracle, abs=1e-4)
    assert report.model_output_part == part
    assert not any("never ran" in r.note for r in report.rows)  # the dataclass row: it ran
    assert ns.advise(f, q, data, metric="sqnr", target=0).value == pytest.approx(oracle, abs=1e-4)


def test_a_model_output_holding_no_tensor_says_so():
    class Nothing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor):
            self.a(x)
            return {"n": 3, "names": ["x"]}

    f = Nothing().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    report = ns.compare(f, q, [torch.randn(2, 8)])
    assert "model output not compared (see notes)" in report.summary()
    assert "the model output is not compared: what the float model returns (a dict) holds no " \
           "tensor" in report.notes  # before: no note


def test_complex_values_are_compared_whole_not_by_their_real_part():
    torch.manual_seed(0)
    f = _TwoHeads(lambda h, y: torch.fft.fft(y)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(4, 8) for _ in range(3)]
    with torch.no_grad():
        pairs = [(f(x), q(x)) for x in data]
    oracle = _pooled_sqnr(pairs)  # 38.169 dB; the real part alone (before): 38.077
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "Casting complex values to real"
        report = ns.compare(f, q, data)
    assert report.model_output["sqnr"] == pytest.approx(oracle, abs=1e-4)
    assert report.row("fft_fft").output_sqnr == pytest.approx(oracle, abs=1e-4)
    ref, actual = (torch.cat(side) for side in zip(*pairs, strict=True))
    err = (ref.to(torch.complex128) - actual.to(torch.complex128))
    assert ns.sqnr(ref, actual) == pytest.approx(oracle, abs=1e-9)
    assert ns.mse(ref, actual) == pytest.approx(float(err.abs().pow(2).mean()), rel=1e-9)
    assert ns.max_abs_error(ref, actual) == pytest.approx(float(err.abs().max()), rel=1e-9)
    dot = torch.vdot(ref.to(torch.complex128).flatten(), actual.to(torch.complex128).flatten())
    cos = float(dot.real) / float(ref.to(torch.complex128).norm() * actual.to(torch.complex128).norm())
    assert ns.cosine(ref, actual) == pytest.approx(cos, rel=1e-9)
    # a real actual against a complex reference: its imaginary part is 0
    assert ns.sqnr(ref, actual.real) == pytest.approx(
        _pooled_sqnr([(ref, actual.real.to(torch.complex64))]), abs=1e-9)


class _PythonValues(nn.Module):
    """Ops on Python values beside the activations: a scalar read from a dict, ``8 - k`` on
    an int argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(6, 4)

    def forward(self, d, k):
        h = self.a(d["x"]) * d["scale"]
        return self.b(h[:, : 8 - k])


def test_ops_on_python_values_say_what_they_computed_not_that_they_never_ran():
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    f = _PythonValues().eval()
    q = quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gen = torch.Generator().manual_seed(1)
    data = [({"x": torch.randn(4, 8, generator=gen), "scale": 2.0}, 2) for _ in range(2)]
    # the oracle: what each node of the float graph computes, read by torch.fx's Interpreter
    values: dict[str, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = out = super().run_node(n)
            return out

    Recorder(ns.trace(f, which="float")).run(*data[0])
    report = ns.compare(f, q, data)
    python = {r.name: r.note for r in report.rows
              if r.name in values and not isinstance(values[r.name], torch.Tensor)}
    assert {name: type(values[name]).__name__ for name in python} == {
        "getitem_1": "float", "sub": "int"}
    assert python["getitem_1"].startswith("computes a Python float, not a tensor: nothing to "
                                          "compare (an op on Python values")
    assert python["sub"].startswith("computes a Python int, not a tensor")
    assert not any("never ran" in r.note for r in report.rows)


def test_precision_is_float32_or_float64_and_both_read_the_oracle():
    """precision is the dtype of the reductions: float32 and float64 read the float64 hook
    oracle; bfloat16 / float16 (both activations rounded before their difference: a 73.6 dB
    shadow read 60.6 dB) and an integer dtype (which failed inside the instrumented forward
    as 'a bug in fxnumeric') are refused before any batch runs, naming what to pass."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear}, dtype=torch.float16)
    batches = [torch.randn(8, 64) for _ in range(3)]
    seen: dict[str, list[torch.Tensor]] = {"f": [], "q": []}
    hooks = [f[2].register_forward_hook(lambda m, i, o: seen["f"].append(o.double())),
             q[2].register_forward_hook(lambda m, i, o: seen["q"].append(o.double()))]
    with torch.no_grad():
        for x in batches:
            f(x), q(x)
    for h in hooks:
        h.remove()
    ref, act = torch.cat(seen["f"]), torch.cat(seen["q"])
    oracle = 10 * math.log10(float((ref ** 2).sum() / ((act - ref) ** 2).sum()))
    assert oracle > 60  # float16 weights: an error bfloat16's rounding would swamp
    for precision in (torch.float32, torch.float64):
        report = ns.compare(f, q, batches, comparisons=["outputs"], precision=precision)
        assert report.row("2").output_sqnr == pytest.approx(oracle, rel=1e-6), precision
    for precision, shown in ((torch.bfloat16, "torch.bfloat16"), (torch.float16, "torch.float16"),
                             (torch.int8, "torch.int8"), ("float64", "'float64'")):
        with pytest.raises(ns.InputError, match=rf"precision={shown}: pass torch\.float32 "
                                                 r"\(the default; .*\) or torch\.float64"):
            ns.compare(f, q, batches, precision=precision)
