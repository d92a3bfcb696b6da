"""Stage 2, match: which float ops pair with which quantized ops, and why misses happen."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from _models import Scaled
from torch.ao.quantization import DeQuantStub, QuantStub, default_eval_fn, default_qconfig, quantize

import fxnumeric as ns
from fxnumeric import sqnr


def _pairs(m: ns.Matching) -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    return {p.name: (p.kind, p.float_nodes, p.quant_nodes) for p in m.pairs}


def test_fused_eager_resnet18_pairs_one_to_one(make_resnet18_pair):
    float_model, qmodel, _ = make_resnet18_pair()
    m = ns.match(float_model, qmodel)
    pairs = _pairs(m)
    assert pairs["conv1"] == ("conv2d-relu", ("conv1",), ("conv1",))
    assert pairs["quant"] == ("quantize", ("quant",), ("quant",))
    assert pairs["layer1.0.add_relu"] == ("add-relu", ("add", "relu_1"), ("add_relu",))
    assert pairs["fc"] == ("linear", ("fc",), ("fc",))
    assert len(m.pairs) == 33 and not m.unmatched_float and not m.unmatched_quant
    assert m.coverage == 1.0


def test_unfused_float_pairs_conv_bn_relu_chains(make_resnet18_unfused_pair):
    float_model, qmodel, _ = make_resnet18_unfused_pair()
    pairs = _pairs(ns.match(float_model, qmodel))
    assert pairs["conv1"] == ("conv2d-relu", ("conv1", "bn1", "relu"), ("conv1",))
    assert pairs["layer2.0.downsample.0"][1] == ("layer2_0_downsample_0", "layer2_0_downsample_1")
    assert pairs["layer1.0.conv2"][1] == ("layer1_0_conv2", "layer1_0_bn2")


def test_fx_quantized_resnet18_pairs_functional_adds(make_fx_resnet18_pair):
    float_model, qmodel, _ = make_fx_resnet18_pair()
    m = ns.match(float_model, qmodel)
    pairs = _pairs(m)
    assert pairs["conv1"] == ("conv2d-relu", ("conv1", "bn1", "relu"), ("conv1",))
    # torchvision's BasicBlock: `out += identity; out = self.relu(out)` -> quantized.add_relu
    assert pairs["add_relu"] == ("add-relu", ("add", "layer1_0_relu_1"), ("add_relu",))
    assert m.coverage == 1.0 and not m.unmatched_float


def test_dynamic_lstm_pairs_tuple_outputs(make_lstm_pair):
    float_model, qmodel, *_ = make_lstm_pair()
    pairs = _pairs(ns.match(float_model, qmodel))
    assert pairs["rnn"] == ("lstm", ("rnn",), ("rnn",))
    assert pairs["getitem"] == ("getitem", ("getitem",), ("getitem",))
    assert pairs["getitem_1"] == ("getitem", ("getitem_1",), ("getitem_1",))
    assert [p.quantized for p in ns.match(float_model, qmodel).pairs] == [False, True, False, False, True]


class _Branches(nn.Module):
    """Two parallel branches with identical ops and shapes, differing only in weights."""

    def __init__(self, names=("left", "right")):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        setattr(self, names[0], nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
        setattr(self, names[1], nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
        self.names = names
        self.cat = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x):
        x = self.quant(x)
        a, b = getattr(self, self.names[0])(x), getattr(self, self.names[1])(x)
        return self.dequant(self.cat.cat([a, b * 1.0 if False else b], dim=1))


def _quantize_static(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.qconfig = default_qconfig
    return quantize(model, default_eval_fn, [[(x, None)]], inplace=False)


def test_symmetric_branches_pair_branch_to_branch():
    torch.manual_seed(0)
    float_model = _Branches().eval()
    with torch.no_grad():
        float_model.right[0].weight.mul_(-3.0)  # make the branches clearly different
    x = torch.rand(2, 3, 8, 8)
    qmodel = _quantize_static(copy.deepcopy(float_model), x)
    m = ns.match(float_model, qmodel)
    assert _pairs(m)["left.0"][1] == ("left_0",)
    assert _pairs(m)["right.0"][1] == ("right_0",)
    acts = ns.compare_model_outputs(float_model, qmodel, x)
    for key in ("left.0.stats", "right.0.stats"):
        assert sqnr(acts[key]["float"][0], acts[key]["quantized"][0]) > 25


def test_pairs_models_whose_names_differ():
    """Name-based pairing finds nothing here; the graph pairs every op."""
    torch.manual_seed(0)
    float_model = _Branches(("left", "right")).eval()
    x = torch.rand(2, 3, 8, 8)
    renamed = _Branches(("a_branch", "b_branch")).eval()
    renamed.load_state_dict({k.replace("left", "a_branch").replace("right", "b_branch"): v
                             for k, v in float_model.state_dict().items()})
    qmodel = _quantize_static(renamed, x)
    m = ns.match(float_model, qmodel)
    assert m.coverage == 1.0
    assert _pairs(m)["a_branch.0"][1] == ("left_0",)
    assert _pairs(m)["b_branch.0"][1] == ("right_0",)
    import torch.ao.ns._numeric_suite as torch_ns

    eager = torch_ns.compare_model_outputs(copy.deepcopy(float_model), copy.deepcopy(qmodel), x)
    ours = ns.compare_model_outputs(float_model, qmodel, x)
    assert "a_branch.0.stats" not in eager and "a_branch.0.stats" in ours
    assert torch.equal(ours["a_branch.0.stats"]["float"][0], float_model.left[0](x))


def test_unrelated_models_raise_match_error_listing_misses():
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    b = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()).eval(), {nn.Linear})
    m = ns.match(a, b)
    assert [u.node for u in m.unmatched_quant] == ["_0", "_1"]
    assert [u.node for u in m.unmatched_float] == ["_0", "_1"]
    with pytest.raises(ns.MatchError, match=r"quantized `_0` \(linear\): no float op of kind `linear`"):
        m.check()


@pytest.mark.filterwarnings("ignore::fxnumeric.FxNumericWarning")  # ReLU vs an add: float both
def test_different_input_counts_raise():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ns.MatchError, match="float model takes 1 inputs"):
        ns.match(nn.ReLU(), Two())


def test_register_op_lets_custom_ops_pair():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), Swish()

        def forward(self, x):
            return self.act(self.fc(x))

    f = Net().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    before = _pairs(ns.match(f, q))
    assert "act" not in before  # traced through: mul and sigmoid pair individually
    ns.register_op(Swish, "swish")
    try:
        after = _pairs(ns.match(f, q, leaf_modules=[Swish]))
        assert after["act"] == ("swish", ("act",), ("act",))
    finally:
        ns.unregister_op(Swish)


def test_table_lists_pairs_and_misses(make_lstm_pair):
    float_model, qmodel, *_ = make_lstm_pair()
    table = ns.match(float_model, qmodel).table(tablefmt="github")
    assert "| rnn " in table and "lstm" in table
    assert table.splitlines()[-1].startswith("5 pairs, 0 float and 0 quantized nodes unpaired")


def test_same_pairs_whatever_the_hash_seed():
    code = (
        "import warnings; warnings.filterwarnings('ignore');"
        "import torch, copy, fxnumeric as ns;"
        "from torch.ao.quantization import get_default_qconfig_mapping;"
        "from torch.ao.quantization.quantize_fx import prepare_fx, convert_fx;"
        "import torch.nn as nn;"
        "torch.manual_seed(0);"
        "br = lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1));"
        "M = type('M', (nn.Module,), {'__init__': lambda s: (nn.Module.__init__(s), [setattr(s, f'b{i}', br()) for i in range(4)])[0],"
        " 'forward': lambda s, x: torch.cat([s.b0(x), s.b1(x), s.b2(x), s.b3(x)], 1)});"
        "f = M().eval(); x = torch.rand(1, 3, 8, 8);"
        "p = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping('x86'), (x,)); p(x);"
        "print([(p.name, p.float_nodes, p.quant_nodes) for p in ns.match(f, convert_fx(p)).pairs])"
    )
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1 and "b3.2" in outs.pop()


def test_model_without_compute_ops_pairs_nothing_without_error():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    f = nn.Sequential(nn.Dropout(0.5)).eval()
    x = torch.randn(2, 3, 8, 8)
    p = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (x,))
    p(x)
    q = convert_fx(p)
    # nothing to compare but the quantize of the input, a row of its own
    assert [p.name for p in ns.match(f, q).check().pairs] == ["input.quantize"]
    assert ns.compare_model_outputs(f, q, x) == {}


def test_misses_explain_themselves_side_by_side(make_fx_resnet18_pair):
    float_model, qmodel, _ = make_fx_resnet18_pair()
    changed = copy.deepcopy(float_model)
    changed.layer3[1].relu = nn.GELU()  # the float graph changed after quantization
    m = ns.match(changed, qmodel)
    reasons = {u.node: u.reason for u in m.unmatched_float}
    assert reasons["layer3_1_conv1"].startswith(
        "quantized `layer3_1_conv1` (conv2d-relu) reads the same input, but the float ops from here "
        "compute conv2d -> batch_norm -> gelu")
    assert "which does not compute a `gelu`" in reasons["layer3_1_relu"]
    side = m.explain("layer3_1_conv1").splitlines()
    assert side[0].split() == ["float", "kind", "quantized"]
    rows = [line for line in side if "layer3_1_conv1" in line]
    assert any(line.startswith("-") and "<- unpaired" in line for line in rows)  # quantized side
    assert any(line.startswith("layer3_1_conv1") and "<- unpaired" in line for line in rows)  # float side
    assert any(line.startswith("layer3_1_conv2, layer3_1_bn2") for line in side)  # paired context
    assert "around `layer3_1_relu`:" in m.table(around_misses=True)
    with pytest.raises(ns.MatchError, match="no pair or unpaired node is called 'nope'"):
        m.explain("nope")
    with pytest.raises(ns.MatchError, match=r"quantized `layer3_1_conv1` \(conv2d-relu\)"):
        m.check()


def test_register_op_declares_a_custom_fusion():
    class Swish(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class LinearSwish(nn.Module):
        """A user's fused quantized kernel: dynamic-quantized linear followed by swish."""

        def __init__(self, linear):
            super().__init__()
            self.linear = torch.ao.nn.quantized.dynamic.Linear.from_float(linear)

        def forward(self, x):
            y = self.linear(x)
            return y * torch.sigmoid(y)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 4), Swish(), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.act(self.fc(x)))

    torch.manual_seed(0)
    f = Net().eval()
    q = copy.deepcopy(f)
    q.fc.qconfig = torch.ao.quantization.default_dynamic_qconfig
    q.fc, q.act = LinearSwish(q.fc), nn.Identity()
    ns.register_op(Swish, "swish")
    ns.register_op(LinearSwish, ("linear", "swish"))
    try:
        m = ns.match(f, q, leaf_modules=[Swish, LinearSwish])
        assert _pairs(m)["fc"] == ("linear-swish", ("fc", "act"), ("fc",))
        assert _pairs(m)["out"] == ("linear", ("out",), ("out",))
        x = torch.randn(3, 4)
        acts = ns.compare(f, q, [x], leaf_modules=[Swish, LinearSwish], comparisons=["outputs"])
        assert acts.row("fc").output_sqnr > 30
    finally:
        ns.unregister_op(Swish)
        ns.unregister_op(LinearSwish)


class _Plumbed(nn.Module):
    """``a`` reaches ``b`` and ``add`` through a view, a chunk, getitems and reshapes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.chunk(self.a(x).view(-1, 2, 8), 2, dim=1)
        return self.c(self.b(p.reshape(-1, 8)) + q.reshape(-1, 8))


class _Untraceable(_Plumbed):
    """Data-dependent control flow: captured through the module tree, one region per Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(x)
        if h.sum() > -1e9:
            h = h + self.a(x)[:, :8]
        return self.c(h)


class _Glued(_Plumbed):
    """Captured through the module tree: ``b`` reads a slice of ``a``'s output, ``c`` a value
    the untraced ``forward`` computes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > -1e9:
            g = self.b(h[:, 8:])
        return self.c(g + 1)


def test_a_value_crossing_into_a_region_is_traced_to_the_op_that_computed_it():
    """One float run says what each region input holds: an op's output (a slice of it too:
    the same memory), a model input, or a value no op computed."""
    from fxnumeric.dataflow import OpReads, feeding_ops, op_reads, value_sources

    f = _Glued().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    x = torch.randn(4, 8)
    m = ns.match(f, q, x)
    assert not m.whole_graph and feeding_ops(m) == {"a": (), "b": (), "c": ()}  # no graph says
    assert op_reads(m, value_sources(m, x)) == {
        "a": OpReads(model_inputs=("[0]",)), "b": OpReads(ops=("a",)),
        "c": OpReads(unresolved=("c.input_1",))}  # the leaf graph's placeholder
    m = ns.match(f, q, {"x": x})  # a keyword input is named so
    assert op_reads(m, value_sources(m, {"x": x}))["a"] == OpReads(model_inputs=("x",))
    f = _Written().eval()  # an op's output, then written in place by the untraced code
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    m = ns.match(f, q, x)
    assert op_reads(m, value_sources(m, x))["c"] == OpReads(unresolved=("c.input_1",))


class _Written(_Plumbed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(x)
        if h.sum() > -1e9:
            h += 1
        return self.c(h)


def test_feeding_and_upstream_ops_follow_the_float_data_flow():
    """Plumbing no pair owns is walked through; between regions whose glue code is not traced,
    every op run before counts as upstream, and none run after."""
    from fxnumeric.dataflow import feeding_ops, upstream_ops
    from fxnumeric.pairing import same_op

    plumbing = ("reshape", "chunk", "getitem")
    f = _Plumbed().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    m = ns.match(f, q, torch.randn(4, 8),  # plumbing left unpaired
                 node_match=lambda fa, qa: same_op(fa, qa) and fa["kind"] not in plumbing)
    assert len(m.unmatched_float) == 6 and [p.name for p in m.pairs] == ["a", "b", "add", "c"]
    assert feeding_ops(m) == {"a": (), "b": ("a",), "add": ("b", "a"), "c": ("add",)}
    assert upstream_ops(m) == {"a": set(), "b": {"a"}, "add": {"a", "b"},
                               "c": {"a", "b", "add"}}

    f = _Untraceable().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    m = ns.match(f, q, torch.randn(4, 8))
    assert [r.float_path for r in m.regions] == ["b", "a", "c"]  # in run order
    assert feeding_ops(m) == {"b": (), "a": (), "c": ()}  # region inputs: no graph says
    assert upstream_ops(m) == {"b": set(), "a": {"b"}, "c": {"b", "a"}}
    # without example inputs no order of calls is recorded: region order says nothing
    m = ns.match(f, q)
    assert not m.call_order and upstream_ops(m) == {"a": set(), "b": set(), "c": set()}


# ------------------------------------------------ weights as evidence where names do not tell


def _hooked(model: nn.Module, names: list[str], run) -> dict[str, list[torch.Tensor]]:
    """``{module path: [(input, output) per call]}``, dequantized, read by forward hooks."""
    seen: dict[str, list] = {n: [] for n in names}

    def plain(t):
        return t.dequantize() if t.is_quantized else t

    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: seen[n].append((plain(args[0]), plain(out)))) for n in names]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return seen


class _ThreeLinears(nn.Module):
    """``c(a(x)) + b(x)``: two parallel Linears of one shape, then a third on one branch."""

    def __init__(self):
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.ff = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x):
        x = self.quant(x)
        u, v = self.a(x), self.b(x)
        return self.dequant(self.ff.add(self.c(u), v))


class _Renamed(nn.Module):
    """The quantized ``_ThreeLinears`` under other names, its `b` branch called first."""

    def __init__(self, q: nn.Module):
        super().__init__()
        self.inp, self.out, self.sum = q.quant, q.dequant, q.ff
        self.p1, self.p2, self.p3 = q.b, q.a, q.c

    def forward(self, x):
        x = self.inp(x)
        v, u = self.p1(x), self.p2(x)
        return self.out(self.sum.add(self.p3(u), v))


def test_renamed_branches_called_in_another_order_pair_by_their_weights():
    """Ranked by graph position, quantized `p1` (float `b`) paired with float `a`: its rows
    read -10.01 dB (p1) and -0.43 dB (p2), `c`, the adds and `p3` went unpaired, and the
    verdict named p1 culprit. Its weight is a copy of `b`'s, not `a`'s: now every branch
    pairs with its twin and reads what hooks on the two read."""
    torch.manual_seed(0)
    f = _ThreeLinears().eval()
    with torch.no_grad():
        f.b.weight.mul_(3.0)
    data = [torch.randn(8, 16) for _ in range(3)]
    m = copy.deepcopy(f)
    m.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    q = _Renamed(quantize(m, lambda model, batches: [model(d) for d in batches], [data])).eval()
    matching = ns.match(f, q)
    assert {n: p[1] for n, p in _pairs(matching).items()} == {
        "inp": ("quant",), "p1": ("b",), "p2": ("a",), "p3": ("c",), "sum": ("add",)}
    assert matching.coverage == 1.0 and not matching.unmatched_float
    report = ns.compare(f, q, data, progress=False)
    floats = _hooked(f, ["a", "b", "c"], lambda: [f(d) for d in data])
    quants = _hooked(q, ["p1", "p2", "p3"], lambda: [q(d) for d in data])
    for quant, twin in (("p1", "b"), ("p2", "a"), ("p3", "c")):
        ref = torch.cat([o for _, o in floats[twin]])
        actual = torch.cat([o for _, o in quants[quant]])
        assert report.row(quant).output_sqnr == pytest.approx(sqnr(ref, actual), abs=1e-3)
        assert report.row(quant).output_sqnr > 30  # 33.61 (p1), 34.09 (p2), 32.62 (p3)
    assert report.culprit is None


class _Stack(nn.Module):
    """Linear-ReLU layers of one shape, then a classifier; ``skip`` leaves a layer out,
    ``twice`` calls the first layer a second time."""

    def __init__(self, skip: int | None = None, twice: bool = False):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.out = nn.Linear(16, 4)
        self.skip, self.twice = skip, twice

    def forward(self, x):
        for i, fc in enumerate(self.fcs):
            if i != self.skip:
                x = nn.functional.relu(fc(x))
            if self.twice and i == 0:
                x = nn.functional.relu(fc(x))
        return self.out(x)


def _stack_pair(**quantized_as) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """The float `_Stack`, and an FX-quantized copy of its weights computing ``quantized_as``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = _Stack().eval()
    data = [torch.randn(8, 16) for _ in range(3)]
    other = _Stack(**quantized_as).eval()
    other.load_state_dict(f.state_dict())
    prepared = prepare_fx(other, get_default_qconfig_mapping("x86"), (data[0],))
    for d in data:
        prepared(d)
    return f, convert_fx(prepared), data


def test_a_layer_the_quantized_model_skips_pairs_nothing_with_the_next_one():
    """The quantized model skips fcs.1: its fcs.2 was paired with float fcs.1 (the float op
    after fcs.0), reading weight -3.01 dB and shadow -1.18 dB, and was named culprit. Its
    weight is a copy of float fcs.2's: it pairs with that one, its shadow fed what it reads,
    and float fcs.1 is unpaired with the weights as the reason."""
    f, q, data = _stack_pair(skip=1)
    matching = ns.match(f, q)
    assert _pairs(matching)["fcs.2"] == ("linear-relu", ("fcs_2", "relu_2"), ("fcs_2",))
    reasons = {u.node: u.reason for u in matching.unmatched_float}
    assert set(reasons) == {"fcs_1", "relu_1"}
    assert "its weights are not `fcs_1`'s: weight SQNR -3.01 dB" in reasons["fcs_1"]
    assert "it paired with float `fcs_2`" in reasons["fcs_1"]
    report = ns.compare(f, q, data, progress=False)
    row = report.row("fcs.2")
    (inputs_outputs,) = _hooked(q, ["fcs.2"], lambda: q(torch.cat(data))).values()
    x, out = inputs_outputs[0]
    with torch.no_grad():
        alone = nn.functional.relu(f.fcs[2](x))
    assert row.shadow_sqnr == pytest.approx(sqnr(alone, out), abs=0.05)  # 41.61 dB
    quant_weight = q.get_submodule("fcs.2").weight().dequantize()
    assert row.weight_sqnr == pytest.approx(sqnr(f.fcs[2].weight, quant_weight), abs=1e-3)
    assert "float ops the quantized model lacks" in row.notes
    assert report.culprit != "fcs.2"


def test_a_layer_called_twice_on_one_side_only_is_left_unpaired_not_shifted():
    """The quantized model calls fcs.0 twice, the float one fcs.0, fcs.1, fcs.2 once each:
    its second call was paired with float fcs.1 (weight -2.71 dB), and every row after it
    one layer off. The second call pairs with nothing, saying why, and the rest pair with
    the layers whose weights they hold."""
    f, q, data = _stack_pair(twice=True)
    matching = ns.match(f, q)
    pairs = _pairs(matching)
    assert pairs["fcs.1"][1:] == (("fcs_1", "relu_1"), ("fcs_2",))
    assert pairs["fcs.2"][1:] == (("fcs_2", "relu_2"), ("fcs_3",))
    assert "fcs.0#2" not in pairs and not matching.unmatched_float
    (miss,) = matching.unmatched_quant
    assert miss.node == "fcs_1" and "weight SQNR `fcs_1` (linear) -2.71 dB" in miss.reason
    assert "the float op of its name, `fcs_0`, is paired already" in miss.reason
    report = ns.compare(f, q, data, progress=False)
    for layer in ("fcs.1", "fcs.2"):
        quant_weight = q.get_submodule(layer).weight().dequantize()
        twin = f.get_submodule(layer).weight
        assert report.row(layer).weight_sqnr == pytest.approx(sqnr(twin, quant_weight),
                                                              abs=1e-3)
        assert report.row(layer).weight_sqnr > 40


def test_a_layer_the_float_model_skips_leaves_the_quantized_one_unpaired():
    """The other way round: the float model skips fcs.1, so the quantized fcs.1 reads weight
    -2.83 dB against float fcs.2, the op after fcs.0; it is unpaired, and fcs.2 pairs by
    name."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    full = _Stack().eval()
    f = _Stack(skip=1).eval()
    f.load_state_dict(full.state_dict())
    data = [torch.randn(8, 16) for _ in range(3)]
    prepared = prepare_fx(copy.deepcopy(full), get_default_qconfig_mapping("x86"), (data[0],))
    for d in data:
        prepared(d)
    q = convert_fx(prepared)
    matching = ns.match(f, q)
    assert _pairs(matching)["fcs.2"][1:] == (("fcs_2", "relu_1"), ("fcs_2",))
    (miss,) = matching.unmatched_quant
    assert miss.node == "fcs_1" and "-2.83 dB" in miss.reason
    assert "the float graph has no op named `fcs.1`" in miss.reason


class _InPlaceRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        y = self.a(x)
        y.relu_()  # its result unused: it works by writing into y
        return self.b(y)


def test_an_unused_in_place_op_the_quantized_graph_dropped_is_not_called_dead_code():
    """torch's convert_fx drops `y.relu_()` (its result is unused), and the quantized model
    computes b on the unclamped y. The float relu_ was reported as dead code with "nothing to
    compare"; its reason now says it writes into `a`'s value, so every value after differs
    (b's output SQNR, by hooks, is far below a's)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = _InPlaceRelu().eval()
    data = [torch.randn(4, 8) for _ in range(2)]
    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("fbgemm"), (data[0],))
    for x in data:
        prepared(x)
    q = convert_fx(prepared)
    assert not any("relu" in str(n.target) for n in q.graph.nodes)  # dropped by torch
    report = ns.compare(f, q, data, progress=False)
    reasons = {node: why for node, side, why in report.unmatched if side == "float"}
    assert "relu_" in reasons and "dead code" not in reasons["relu_"]
    assert "writes into `a`" in reasons["relu_"]
    with torch.no_grad():
        out_b = float(sqnr(torch.cat([f(x) for x in data]), torch.cat([q(x) for x in data])))
    assert report.row("b").output_sqnr == pytest.approx(out_b, abs=1e-3)
    assert report.row("b").output_sqnr < report.row("a").output_sqnr - 10


@pytest.mark.parametrize("flow", ["dynamic", "fx_static"])
def test_an_op_only_the_float_model_has_leaves_the_next_layer_paired(flow):
    """The float model scales fc2's input by 0.5; the quantized one does not. fc2 was looked
    for only among the float consumers of the relu (the mul), and both fc2s were left
    unpaired, as was every op reading them. It is now found by its name, its weights
    agreeing, and its shadow reads what the quantized fc2 reads (forward hooks)."""
    torch.manual_seed(0)
    f = Scaled(0.5).eval()
    plain = Scaled().eval()
    plain.load_state_dict(f.state_dict())
    data = [torch.randn(4, 16) for _ in range(3)]
    if flow == "dynamic":
        q = torch.ao.quantization.quantize_dynamic(plain, {nn.Linear}, dtype=torch.qint8)
    else:  # the relu's output quantize in front of fc2 is what the quantized fc2 reads
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(plain, get_default_qconfig_mapping("fbgemm"), (data[0],))
        for x in data:
            prepared(x)
        q = convert_fx(prepared)
    seen = []
    handle = q.fc2.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    with torch.no_grad():
        for x in data:
            q(x)
        handle.remove()
        seen = [(i.dequantize() if i.is_quantized else i, o.dequantize() if o.is_quantized
                 else o) for i, o in seen]
        shadow = float(sqnr(torch.cat([f.fc2(i) for i, _ in seen]),
                            torch.cat([o for _, o in seen])))
    report = ns.compare(f, q, data, progress=False)
    assert [r.name for r in report.rows][-5:] == ["fc1", "relu", "fc2", "relu_1", "fc3"]
    assert [(node, side) for node, side, _ in report.unmatched] == [("mul", "float")]
    assert report.row("fc2").shadow_sqnr == pytest.approx(shadow, abs=1e-3)


class _ScaledByKwargs(nn.Module):
    """A forward whose ``scale`` comes through ``**kwargs``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, **kwargs):
        return self.fc(x) * kwargs["scale"]


def test_a_root_kept_whole_takes_what_its_kwargs_is_given():
    """A model kept whole (``leaf_modules=[its type]``) whose forward takes ``**kwargs``: the
    one-op graph calling it took its named arguments only, and compare refused the batch
    ("cannot be called with these inputs: unexpected keyword input 'scale'. Its forward takes
    (x)"), which the model runs on. Oracle: the model outputs of plain forwards."""
    torch.manual_seed(0)
    f = _ScaledByKwargs().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(2, 8, generator=gen), "scale": torch.tensor(2.0 + i)}
            for i in range(2)]
    report = ns.compare(f, q, data, leaf_modules=[_ScaledByKwargs], progress=False)
    with torch.no_grad():
        ref = torch.cat([f(**batch) for batch in data])
        out = torch.cat([q(**batch) for batch in data])
    assert [r.name for r in report.rows] == ["root"]
    assert report.row("root").output_sqnr == pytest.approx(sqnr(ref, out), rel=1e-6)
    assert report.model_output["sqnr"] == pytest.approx(sqnr(ref, out), rel=1e-6)
