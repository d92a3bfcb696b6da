"""The flow hooks, and fxnumeric without torchao installed."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

import fxnumeric as fxn
from fxnumeric import flows

try:  # tests/ on sys.path (pytest's default rootdir-based import mode)
    from _models import QatFunctional, functional_values, module_inputs, qat_functional_pair
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests._models import (
        QatFunctional,
        functional_values,
        module_inputs,
        qat_functional_pair,
    )


def test_every_stage_consults_the_same_flows():
    assert [f.name for f in flows.FLOWS] == ["pt2e", "torchao", "fx"]
    # hooks answer None for what is not theirs: a plain FX graph is untouched
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert flows.normalise_model(model, "float") is model
    gm = fxn.trace(model)
    assert all(flows.pair_name(n) is None for n in gm.graph.nodes)
    assert flows.comparable_weight(model[0].weight) is model[0].weight


def test_without_torchao_everything_else_works(tmp_path):
    script = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torchao", "model_explorer"):
                    raise ImportError(f"No module named {name!r} (blocked)")
                return None

        sys.meta_path.insert(0, Block())
        import copy, torch
        import fxnumeric as fxn
        from torch.ao.quantization import quantize_dynamic
        f = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        q = quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
        report = fxn.compare(f, q, [torch.randn(2, 8)])
        report.to_model_explorer(sys.argv[1])
        ep = torch.export.export(f, (torch.randn(2, 8),))
        assert len(fxn.match(ep, ep.module()).pairs) == 2  # pt2e capture needs no torchao
        from fxnumeric.models import quantize_pt2e
        try:
            quantize_pt2e(f, [torch.randn(2, 8)])
        except fxn.InputError as exc:
            assert "fxnumeric[torchao]" in str(exc)
        else:
            raise SystemExit("quantize_pt2e ran without torchao")
        assert not any(m.split(".")[0] == "torchao" for m in sys.modules)
        print("ok", len(report.rows))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["ok", "2"]


def _qat_prepared(f, data):
    """``f`` prepared for QAT by FX (x86), calibrated on ``data``, its scales then fixed:
    every forward computes alike."""
    import copy

    import torch.ao.quantization as tq
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    prepared = prepare_qat_fx(copy.deepcopy(f).train(), tq.get_default_qat_qconfig_mapping("x86"),
                              (data[0],)).eval()
    for x in data:
        prepared(x)
    prepared.apply(tq.disable_observer)
    return prepared


def test_a_qat_prepared_layer_is_read_after_its_output_fake_quantize():
    """A prepare_qat_fx model's fc2 row read 25.3 dB, before fc2's output fake-quantize,
    where its output, the model's, reads 19.0 dB (read by hand); eager prepare_qat's row
    reads after it, as a converted model's quantized op includes its output quantize."""

    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.fc2(torch.tanh(self.fc1(x)))

    torch.manual_seed(0)
    f = Net().eval()
    data = [torch.randn(8, 16) for _ in range(4)]
    prepared = _qat_prepared(f, data)
    with torch.no_grad():
        ref = torch.cat([f(x) for x in data]).double()
        out = torch.cat([prepared(x) for x in data]).double()
    want = 10 * math.log10(float(ref.square().sum() / (ref - out).square().sum()))
    report = fxn.compare(f, prepared, data, progress=False)
    assert report.row("fc2").output_sqnr == pytest.approx(want, abs=1e-6)
    assert report.model_output["sqnr"] == pytest.approx(want, abs=1e-6)


def test_a_layer_kept_float_in_a_qat_prepared_model_hands_on_its_fake_quantized_value():
    """prepare_qat_fx fake-quantizes a layer kept float (qconfig None) for the quantized
    layer after it, which is shadowed from that value: row 0 read inf and the fake-quant was
    in no row (layer 1 was named the only layer adding error). Oracle: what layer 1 reads in
    the prepared model (an fx Interpreter) against the float layer 0."""
    import copy

    import torch
    from torch import nn
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).eval()
    x = torch.randn(3, 8)
    mapping = get_default_qat_qconfig_mapping("x86").set_module_name("0", None)
    prepared = prepare_qat_fx(copy.deepcopy(f).train(), mapping, (x,))
    prepared(x)
    prepared.eval()
    read = module_inputs(prepared, x)
    with torch.no_grad():
        ref = f[0](x).double()
    want = 10 * math.log10(float(ref.square().sum() / (ref - read["1"].double()).square().sum()))
    row = fxn.compare(f, prepared, [x], progress=False).row("0")
    assert row.output_sqnr == pytest.approx(want, abs=1e-3) and want < 60
    assert row.shadow["sqnr"] == pytest.approx(want, abs=1e-3)


def test_a_float_quantstub_lets_the_first_qat_layer_pair():
    """A float model with a QuantStub against its prepare_qat_fx model, whose input quantize
    is a fake-quantize: the first layer after the stub was left unpaired ("no float op of
    kind linear consumes the float counterpart `x`"), on torchvision's quantizable models
    too. Oracle: fc1's value after its output fake-quantize, read by a hook."""
    import torch
    import torch.ao.quantization as tq
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, x):
            return self.dequant(self.fc2(torch.tanh(self.fc1(self.quant(x)))))

    torch.manual_seed(0)
    f = Net().eval()
    data = [torch.randn(8, 16) for _ in range(3)]
    prepared = _qat_prepared(f, data)
    fc1 = next(n for n in prepared.graph.nodes if n.target == "fc1")
    (after,) = fc1.users
    seen = []
    hook = prepared.get_submodule(after.target).register_forward_hook(
        lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        for x in data:
            prepared(x)
        ref = torch.cat([f.fc1(x) for x in data]).double()
    hook.remove()
    out = torch.cat(seen).double()
    want = 10 * math.log10(float(ref.square().sum() / (ref - out).square().sum()))
    report = fxn.compare(f, prepared, data, progress=False)
    assert report.row("fc1").output_sqnr == pytest.approx(want, abs=1e-6)
    assert not report.unmatched


class _ConvNet:
    """A conv-relu-flatten-linear model, its FX-prepared form with fake-quants (QAT trained a
    step, or ``prepare_fx`` with a fake-quant qconfig), and an fx ``Interpreter`` oracle."""

    @staticmethod
    def float_model():
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv, self.relu, self.fc = nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(288, 10)

            def forward(self, x):
                return self.fc(torch.flatten(self.relu(self.conv(x)), 1))

        torch.manual_seed(0)
        return Net().eval()

    @staticmethod
    def prepared(f, x, how):
        """``f`` prepared on ``x`` by ``prepare_qat_fx`` (one SGD step taken) or ``prepare_fx``,
        with fbgemm's QAT qconfig (fused moving-average fake-quants, observers left on)."""
        import copy

        import torch
        import torch.ao.quantization as tq
        from torch.ao.quantization.quantize_fx import prepare_fx, prepare_qat_fx

        mapping = tq.get_default_qat_qconfig_mapping("fbgemm")
        if how == "prepare_fx":
            prepared = prepare_fx(copy.deepcopy(f), mapping, (x,))
            prepared(x)
        else:
            prepared = prepare_qat_fx(copy.deepcopy(f).train(), mapping, (x,))
            opt = torch.optim.SGD(prepared.parameters(), lr=1e-3)
            prepared(x).square().mean().backward()
            opt.step()
        return prepared.eval()

    @staticmethod
    def oracle(f, prepared, batches):
        """Output and shadow SQNR per row, read by an fx ``Interpreter`` running a copy of
        ``prepared`` with its observers off: the float model's values against the fake-quant
        each value goes through, the input's included (its own error is its output's)."""
        import copy

        import torch
        import torch.ao.quantization as tq

        qat = copy.deepcopy(prepared)
        qat.apply(tq.disable_observer)
        seen: dict[str, list] = {}

        class Reader(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                seen.setdefault(n.name, []).append(out.detach())
                return out

        fq = {n.args[0].name: n.name for n in qat.graph.nodes
              if n.op == "call_module" and isinstance(qat.get_submodule(n.target),
                                                        tq.FakeQuantizeBase)}
        ref: dict[str, list] = {"x.quantize": [], "conv": [], "fc": []}
        shadow: dict[str, list] = {"conv": [], "fc": []}
        with torch.no_grad():
            for x in batches:
                Reader(qat).run(x)
                conv = f.relu(f.conv(x))
                ref["x.quantize"].append(x)
                ref["conv"].append(conv)
                ref["fc"].append(f.fc(torch.flatten(conv, 1)))
            # the float twins on the values the prepared model gave them
            shadow["conv"] = [f.relu(f.conv(v)) for v in seen[fq["x"]]]
            shadow["fc"] = [f.fc(v) for v in seen[fq["flatten"]]]
        after = {"x.quantize": fq["x"], "conv": fq["conv"], "fc": fq["fc"]}
        out = {row: fxn.sqnr(torch.cat(ref[row]), torch.cat(seen[after[row]])) for row in ref}
        own = {row: fxn.sqnr(torch.cat(shadow[row]), torch.cat(seen[after[row]]))
               for row in shadow}
        return out, own


@pytest.mark.parametrize("how", ["prepare_qat_fx", "prepare_fx"])
def test_an_fx_prepared_models_fake_quants_belong_to_rows_as_convert_fxs_quantizes_do(how):
    """The fake-quant of the model input was plumbing, in no row, and (prepare_fx with a
    fake-quant qconfig, whose layers hold no weight fake-quant) a layer's output fake-quant
    was read after the layer, in no row either: the prepare_fx model's output read 20.6 dB
    while fc read 28.9 dB and the verdict named x.quantize (34.7 dB) "the only layer that
    adds error of its own". Now x.quantize is a row and conv and fc are read after their
    output fake-quants, each as the oracle reads it."""
    import copy

    import torch
    from torch.ao.quantization.quantize_fx import convert_fx

    f = _ConvNet.float_model()
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    prepared = _ConvNet.prepared(f, batches[0], how)
    before = {k: v.clone() for k, v in prepared.state_dict().items()}
    report = fxn.compare(f, prepared, batches[1:], progress=False)
    assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in before.items())
    out, own = _ConvNet.oracle(f, prepared, batches[1:])
    read = {r.name: r.output_sqnr for r in report.rows if r.name in out}
    assert read == pytest.approx(out, abs=1e-4)
    assert report.row("x.quantize").shadow_sqnr == pytest.approx(out["x.quantize"], abs=1e-4)
    for row in ("conv", "fc"):
        assert report.row(row).shadow_sqnr == pytest.approx(own[row], abs=1e-4), row
    assert report.model_output["sqnr"] == pytest.approx(out["fc"], abs=1e-4)
    assert report.culprit is None  # fc and conv add more than the input's quantize
    if how == "prepare_qat_fx":
        # convert_fx's quantize of the input uses the fake-quant's scale: the same row
        converted_model = convert_fx(copy.deepcopy(prepared))
        converted = fxn.compare(f, converted_model, batches[1:], progress=False)
        assert converted.row("x.quantize").output_sqnr == pytest.approx(out["x.quantize"],
                                                                        abs=1e-4)
        # the QAT model as the float side of its converted form (a pair matching.md lists):
        # its fake-quants are quantizes there too, yet it is no "quantized float model", and
        # the layer reading one is shadowed on its input's counterpart
        qat_side = fxn.compare(prepared, converted_model, batches[1:], progress=False)
        assert [r.name for r in qat_side.rows if r.shadow_sqnr is None] == []
        # its layers are read after their output fake-quants, the values it hands on (as
        # eager prepare_qat's, whose fake-quants run inside them): fc read 29.11 dB before
        # its own, where the two models' outputs (fc's) read 20.26 dB
        qat = copy.deepcopy(prepared)
        qat.apply(torch.ao.quantization.disable_observer)
        with torch.no_grad():
            want = fxn.sqnr(torch.cat([qat(x) for x in batches[1:]]).double(),
                            torch.cat([converted_model(x) for x in batches[1:]]).double())
        assert qat_side.row("fc").output_sqnr == pytest.approx(want, abs=1e-4)


def test_the_verdict_names_a_prepare_qat_fx_models_input_fake_quant_where_error_enters():
    # the input fake-quant's range narrowed to 30% (its running min/max: the fused
    # fake-quant recomputes its scale from them on every call), as one calibrated on quieter
    # data than it reads; read as plumbing, its 8.8 dB was in no row and the verdict named no
    # culprit, or conv (whose output inherits it)
    import torch

    f = _ConvNet.float_model()
    batches = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    prepared = _ConvNet.prepared(f, batches[0], "prepare_qat_fx")
    observer = prepared.get_submodule(next(n.target for n in prepared.graph.nodes
                                           if n.op == "call_module")).activation_post_process
    observer.min_val.mul_(0.3)
    observer.max_val.mul_(0.3)
    report = fxn.compare(f, prepared, batches[1:], progress=False)
    out, own = _ConvNet.oracle(f, prepared, batches[1:])
    assert out["x.quantize"] < 10 and min(own.values()) > 30
    assert report.row("x.quantize").output_sqnr == pytest.approx(out["x.quantize"], abs=1e-4)
    assert report.culprit == "x.quantize"
    assert "culprit: x.quantize" in report.summary()


def test_a_reference_dynamic_layer_owns_the_quantize_of_its_input():
    # convert_to_reference_fx under a dynamic qconfig quantizes each Linear's input per call
    # (quantize_per_tensor_dynamic, then dequantize): the Linear's shadow reads the value
    # before it, as convert_fx's dynamic Linear (which rounds inside) has it. Fed the
    # dequantized value, the later Linears' shadows left their input's rounding out, and
    # the model input's quantize, alone with a row, was named the culprit
    import copy

    import torch
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 8), torch.nn.GELU(),
                                torch.nn.Linear(8, 4)).eval()
    data = [torch.randn(2, 5, 8) for _ in range(3)]
    mapping = QConfigMapping().set_global(default_dynamic_qconfig)
    quant = convert_to_reference_fx(prepare_fx(copy.deepcopy(model), mapping, (data[0],)))
    report = fxn.compare(model, quant, data, progress=False)
    assert [r.name for r in report.rows] == ["0", "1", "2", "3", "4"]
    values: dict[str, list] = {}

    class Values(torch.fx.Interpreter):
        def run_node(self, n):
            values.setdefault(n.name, []).append(out := super().run_node(n))
            return out

    with torch.no_grad():
        for x in data:
            Values(quant).run(x)
        for node in quant.graph.nodes:
            if node.op != "call_module" or node.target not in ("0", "2", "4"):
                continue
            quantize = node.args[0].args[0]  # dequantize(quantize_per_tensor_dynamic(v))
            assert quantize.target == torch.quantize_per_tensor_dynamic
            read = values[quantize.args[0].name]
            oracle = fxn.sqnr(torch.cat([model[int(node.target)](v) for v in read]),
                              torch.cat(values[node.name]))
            assert report.row(node.target).shadow_sqnr == pytest.approx(oracle, abs=1e-4)


def test_a_qat_float_models_floatfunctional_rows_read_what_the_qat_model_hands_on():
    """An eager prepare_qat model against its converted model: a FloatFunctional's row read
    the float side before its activation_post_process (the fake-quantize convert turns into
    the op's output scale), a value the QAT model never hands on: ``add`` read 27.80 dB
    against the QAT model's own value's 29.83 dB, and its shadow 30.68 dB where the converted
    add computes exactly what the QAT add does (inf), with a clipping verdict on a range the
    QAT model clips to as well. Oracle: forward hooks on both models' activation_post_process
    (``add_scalar``, which torch never fake-quantizes: conv3's input), and torch's eager
    ``Shadow`` of each FloatFunctional, one sample at a time (it keeps sample 0)."""
    import copy

    import torch
    import torch.ao.ns._numeric_suite as tns

    qat, q, x = qat_functional_pair()
    float_values, quant_values = functional_values(qat, x), functional_values(q, x)
    shadows: dict[str, dict[str, list]] = {}
    for sample in x.split(1):
        eager = tns.compare_model_stub(copy.deepcopy(qat), copy.deepcopy(q),
                                       [torch.ao.nn.quantized.FloatFunctional], sample)
        for name in QatFunctional.OBSERVED:
            for side, values in eager[f"{name}.stats"].items():
                shadows.setdefault(name, {}).setdefault(side, []).append(
                    values[0].dequantize())
    report = fxn.compare(qat, q, [x], progress=False)
    for name in (*QatFunctional.OBSERVED, "add_scalar"):
        want = fxn.sqnr(float_values[name][-1].double(), quant_values[name][-1].double())
        assert report.row(name).output_sqnr == pytest.approx(want, abs=1e-4), name
    for name, sides in shadows.items():
        want = fxn.sqnr(torch.cat(sides["float"]).double(),
                        torch.cat(sides["quantized"]).double())
        assert report.row(name).shadow_sqnr == pytest.approx(want, abs=1e-4), name
    assert report.row("add").shadow_sqnr == math.inf
