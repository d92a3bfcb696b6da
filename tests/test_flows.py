"""The flow hooks, and fxnumeric without torchao installed."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

import fxnumeric as fxn
from fxnumeric import flows


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
