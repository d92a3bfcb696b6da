"""Capture of models torch.fx cannot trace whole: regions, module-tree pairs, kept-whole modules.

Small hand-written models whose ``forward`` has data-dependent control flow, so the
structure of each capture is known exactly.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections import OrderedDict

import pytest
import torch
import torch.ao.ns._numeric_suite as tns
from _models import CallsTwice
from torch import nn

import fxnumeric as ns
from fxnumeric.capture.clone import module_tree_copy


class _Untraceable(nn.Module):
    """Its own forward branches on data; its children are plain layers."""

    def __init__(self, names=("proj", "out")):
        super().__init__()
        self.first, self.second = names
        setattr(self, names[0], nn.Linear(4, 8))
        setattr(self, names[1], nn.Linear(8, 4))
        self.mlp = _Mlp()

    def forward(self, x):
        h = getattr(self, self.first)(x)
        if h.sum() > 0:  # data-dependent: torch.fx cannot trace this
            h = h * 2
        return self.mlp(getattr(self, self.second)(h))


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


class _Masked(nn.Module):
    """Traceable only once it is known that ``mask`` is None."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.fc(x)
        if mask is not None:
            y = y * mask
        return y


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.masked = _Masked()
        self.gate = _Gated()

    def forward(self, x):
        return self.gate(self.masked(x))


class _Gated(nn.Module):
    """Untraceable, kept whole inside the traced root; its child is compared through hooks."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x):
        return self.inner(x) if x.sum() > 0 else -self.inner(x)


def _dyn(model: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})


def _x() -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(0))


def test_untraceable_root_pairs_children_as_modules_and_regions():
    torch.manual_seed(0)
    f = _Untraceable().eval()
    m = ns.match(f, _dyn(f))
    found = {p.name: (p.found_by, p.region, p.kind) for p in m.pairs}
    assert found == {  # a leaf module kept whole is a region of its own: a one-op graph
        "proj": ("module", "proj", "linear"),
        "out": ("module", "out", "linear"),
        "mlp.fc": ("graph", "mlp", "linear"),
        "mlp.relu": ("graph", "mlp", "relu"),
        "mlp.add": ("graph", "mlp", "add"),
    }
    assert [path for path, _ in m.untraced] == [""]
    assert "h.sum() > 0" in m.untraced[0][1]
    assert "paired through the module tree" in m.explain("proj")
    assert "relu" in m.explain("mlp.fc")  # drawn inside the region's own graphs
    assert "mlp.fc" in m.table() and "found by" in m.table()


def test_children_with_other_names_pair_by_position_and_type():
    torch.manual_seed(0)
    f = _Untraceable().eval()
    renamed = _Untraceable(names=("projection", "output")).eval()
    renamed.load_state_dict({k.replace("proj.", "projection.").replace("out.", "output."): v
                             for k, v in f.state_dict().items()})
    m = ns.match(f, _dyn(renamed))
    by_module = {m.region_of(p).float_path: m.region_of(p).quant_path
                 for p in m.pairs if p.found_by == "module"}
    assert by_module == {"proj": "projection", "out": "output"}
    assert m.coverage == 1.0


def test_a_layer_without_counterpart_is_a_miss_with_a_reason():
    torch.manual_seed(0)
    f = _Untraceable().eval()
    q = _dyn(f)
    q.extra = nn.Linear(4, 4)  # not in the float model, not at the same position either
    m = ns.match(f, q)
    (miss,) = m.unmatched_quant
    assert miss.node == "extra"
    assert "no float submodule `extra`" in miss.reason


def test_outputs_and_weights_through_hooks_equal_plain_forwards():
    torch.manual_seed(0)
    f = _Untraceable().eval()
    q = _dyn(f)
    x = _x()
    acts = ns.compare_model_outputs(f, q, x)
    with torch.no_grad():
        expected = f.proj(x)
    assert torch.equal(acts["proj.stats"]["float"][0], expected)
    assert set(acts) == {"proj.stats", "out.stats", "mlp.fc.stats"}
    weights = ns.compare_weights(f, q)
    assert set(weights) == {f"{n}._packed_params._packed_params" for n in ("proj", "out", "mlp.fc")}
    assert torch.equal(weights["proj._packed_params._packed_params"]["float"], f.proj.weight)
    assert not any(m._forward_hooks for m in (*f.modules(), *q.modules()))


def test_submodule_kept_whole_inside_a_traced_root_is_still_compared_inside():
    torch.manual_seed(0)
    f = _Outer().eval()
    q = _dyn(f)
    m = ns.match(f, q)
    found = {p.name: p.found_by for p in m.pairs}
    assert found == {"masked.fc": "graph", "gate": "graph", "gate.inner": "module"}
    report = ns.compare(f, q, [_x(), -_x()])
    rows = {r.name: r for r in report.rows}
    assert rows["gate.inner"].output["sqnr"] > 20  # its hook ran inside the root's graph
    # gate returns +-inner(x): the same error, seen from outside and from inside
    assert abs(rows["gate"].output["sqnr"] - rows["gate.inner"].output["sqnr"]) < 1e-6
    assert rows["gate.inner"].shadow and rows["masked.fc"].shadow


def test_example_inputs_let_modules_with_optional_arguments_be_traced():
    torch.manual_seed(0)
    f = _Untraceable().eval()
    f.mlp = _Masked()
    q = _dyn(f)
    without = ns.match(f, q)
    assert "mlp" in dict(without.untraced)
    assert without.pair("mlp.fc").found_by == "module"
    with_inputs = ns.match(f, q, example_inputs=_x())
    assert "mlp" not in dict(with_inputs.untraced)
    fc = with_inputs.pair("mlp.fc")
    assert (fc.found_by, fc.region) == ("graph", "mlp")
    report = ns.compare(f, q, [_x()], matching=with_inputs)
    assert {r.name for r in report.rows} == {"proj", "out", "mlp.fc"}


def test_module_tree_copy_shares_weights_not_modules():
    f = _Untraceable()
    twin = module_tree_copy(f)
    assert twin.proj is not f.proj and twin.proj.weight is f.proj.weight
    twin.set_submodule("mlp", nn.Identity())
    twin.proj.register_forward_hook(lambda *a: None)
    assert isinstance(f.mlp, _Mlp) and not f.proj._forward_hooks


class _Rotary(nn.Module):
    """Rotary embeddings move a constant to the input's device: `inv.to(device=x.device)`."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv", torch.linspace(0.5, 1.5, 4))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * self.inv.to(device=x.device)


def test_plumbing_of_a_constant_carries_the_constant_not_its_other_argument():
    torch.manual_seed(0)
    f = _Rotary().eval()
    view = ns.GraphView(ns.trace(f))
    to = next(n for n in view.nodes if n.op == "call_method" and n.target == "to")
    assert view.producer(to) is None  # the buffer, a constant; not `x.device`
    report = ns.compare(f, _dyn(f), [_x()])
    # the shadow copies `inv.to(...)` and reads the constant, not a device
    assert report.row("mul").shadow["sqnr"] > 20 and not report.row("mul").note


def _compared_twice_called(model: type[nn.Module]):
    """A seeded model calling one module twice, dynamically quantized, three batches and the
    report over them."""
    torch.manual_seed(0)
    f = model().eval()
    q = _dyn(f)
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return f, q, data, ns.compare(f, q, data)


def test_a_leaf_module_called_twice_is_two_rows_each_read_at_its_call():
    f, q, data, report = _compared_twice_called(CallsTwice)
    assert [r.name for r in report.rows] == ["fc", "fc#2", "out"]
    signal, noise = [0.0, 0.0], [0.0, 0.0]
    with torch.no_grad():
        for x in data:  # each call read directly
            hf, hq = f.fc(x), q.fc(x)
            hf2 = f.fc(torch.relu(hf * 2 if hf.sum() > 0 else hf))
            hq2 = q.fc(torch.relu(hq * 2 if hq.sum() > 0 else hq))
            for i, (a, b) in enumerate(((hf, hq), (hf2, hq2))):
                signal[i] += float(a.double().square().sum())
                noise[i] += float((a - b).double().square().sum())
    for name, s, n in zip(("fc", "fc#2"), signal, noise, strict=True):
        assert report.row(name).output_sqnr == pytest.approx(10 * math.log10(s / n), abs=1e-4)
    # the eager API keeps torch's one logger per module, logged once per call
    acts = ns.compare_model_outputs(f, q, data[0])
    assert len(acts["fc.stats"]["float"]) == len(acts["fc.stats"]["quantized"]) == 2


class _Block(nn.Module):
    """Traceable: a region of its own graph, whose tanh pairs as a graph op."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x))


class _SharesABlock(nn.Module):
    """An untraceable root that calls one traceable block twice, another layer between the
    calls: ALBERT's one shared layer, run once per layer of the model."""

    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.block(x)
        if h.sum() > 0:  # data-dependent: torch.fx cannot trace the root
            h = h * 2
        return self.out(self.block(self.mid(h)))


def _calls_of(f: nn.Module, q: nn.Module, path: str, data: list[torch.Tensor]
              ) -> dict[str, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Every call of module ``path`` in both models, read by hooks: ``{side: [[(input,
    output) of each call] of each batch]}``."""
    seen: dict[str, list[list[tuple[torch.Tensor, torch.Tensor]]]] = {"float": [], "quant": []}
    hooks = [m.get_submodule(path).register_forward_hook(
        lambda mod, args, out, kept=seen[side]: kept[-1].append((args[0], out.detach().clone())))
        for side, m in (("float", f), ("quant", q))]
    with torch.no_grad():
        for x in data:
            for calls in seen.values():
                calls.append([])
            f(x), q(x)
    for h in hooks:
        h.remove()
    return seen


def test_a_region_called_twice_is_two_sets_of_rows_each_read_at_its_call():
    f, q, data, report = _compared_twice_called(_SharesABlock)
    # each call's rows where that call runs: `mid` runs between the two
    assert [r.name for r in report.rows] == ["block.fc", "block.tanh", "mid", "block.fc#2",
                                             "block.tanh#2", "out"]
    seen = _calls_of(f, q, "block.fc", data)
    sums = {}  # (row, metric) -> [signal, noise] over the batches, read per call by hooks
    with torch.no_grad():
        for i in range(len(data)):
            for site, name in enumerate(("block.fc", "block.fc#2")):
                float_out = seen["float"][i][site][1]
                quant_in, quant_out = seen["quant"][i][site]
                tanh = name.replace("fc", "tanh")
                for key, ref, actual in (
                        ((name, "output"), float_out, quant_out),
                        ((name, "shadow"), f.block.fc(quant_in), quant_out),
                        ((tanh, "output"), torch.tanh(float_out), torch.tanh(quant_out))):
                    acc = sums.setdefault(key, [0.0, 0.0])
                    acc[0] += float(ref.double().square().sum())
                    acc[1] += float((ref - actual).double().square().sum())
    assert sums[("block.fc", "output")] != sums[("block.fc#2", "output")]
    for (name, metric), (signal, noise) in sums.items():
        row = report.row(name)
        got = row.output_sqnr if metric == "output" else row.shadow["sqnr"]
        assert got == pytest.approx(10 * math.log10(signal / noise), abs=1e-4), (name, metric)
    # the eager API keeps torch's one logger per op, logged once per call
    acts = ns.compare_model_outputs(f, q, data[0])
    assert len(acts["block.fc.stats"]["float"]) == len(acts["block.fc.stats"]["quantized"]) == 2
    assert torch.equal(acts["block.fc.stats"]["float"][1], seen["float"][0][1][1])


class _TiedBlocks(nn.Module):
    """One block registered at two paths (``layers.0`` is ``layers.1``), run through each."""

    def __init__(self):
        super().__init__()
        block = _Block()
        self.layers = nn.ModuleList([block, block])
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace the root
                x = x * 2
        return self.out(x)


def test_a_block_registered_at_two_paths_is_read_at_both_calls():
    """Its region sits at the first path only: the call through the second went unobserved
    (the row read the first call alone), then a call-site counter at one path counted one
    call per forward and read alternate batches."""
    f, q, data, report = _compared_twice_called(_TiedBlocks)
    assert [r.name for r in report.rows] == ["layers.0.fc", "layers.0.tanh", "layers.0.fc#2",
                                             "layers.0.tanh#2", "out"]
    seen = _calls_of(f, q, "layers.0.fc", data)
    for site, name in enumerate(("layers.0.fc", "layers.0.fc#2")):
        expected = ns.sqnr(*(torch.cat([calls[site][1] for calls in seen[side]])
                             for side in ("float", "quant")))
        assert report.row(name).output_sqnr == pytest.approx(expected, abs=1e-4)


class _TwoInputs(nn.Module):
    """A layer owning its weight (kept whole) that takes a second required input."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x, gate, scale=1.0):
        return x * self.weight * torch.sigmoid(gate) * scale


class _GatedByHand(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.mix = _TwoInputs()

    def forward(self, x):
        h = self.fc(x)
        if h.sum() > 0:  # untraceable root: its children are paired through the module tree
            h = -h
        return self.mix(h, x)


def test_a_module_kept_whole_gets_its_required_inputs_by_position():
    """A forward pre-hook registered without ``with_kwargs`` sees positional arguments only:
    every required argument of a module kept whole reaches it there, as the model's own call
    passed them (arguments with defaults go by name, as transformers passes them)."""
    torch.manual_seed(0)
    f = _GatedByHand().eval()
    q = _dyn(f)
    seen = []
    for model in (f, q):
        model.mix.register_forward_pre_hook(lambda m, args: seen.append(len(args)))
    x = _x()
    report = ns.compare(f, q, [x])
    assert seen and set(seen) == {2}  # recorded call and compare alike (compare gave 1)
    with torch.no_grad():
        ref, actual = f(x).double(), q(x).double()
    expected = 10 * math.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())
    assert report.row("mix").output_sqnr == pytest.approx(expected, rel=1e-5)


class _ReturnsTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        y = self.proj(x)
        return y, y.abs()


class _OverwritesItsChildren(nn.Module):
    """Falcon's decoder layer: untraceable code that writes into what its children returned
    (``mlp_output += attention_output``): a leaf's output, a traced region's, and a value a
    traced region returns in a tuple."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 4)
        self.attn = _ReturnsTwo()
        self.mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        a, _ = self.attn(x)
        a.mul_(3)  # into a value the region returned in a tuple
        g = self.gate(x)
        g.sub_(1)  # into the leaf's output
        a = a * g
        if a.sum() > 0:  # untraceable: the children are captured on their own
            a = -a
        m = self.mlp(x)
        m += a  # into the region's output
        return self.head(m)


def test_values_the_caller_overwrites_in_place_are_compared_as_the_layer_made_them():
    """An output the untraced caller writes into afterwards is read as the layer returned it:
    kept for the quantized side, it was read after the write (Falcon-7B's MLP read 7 dB
    where nothing differed but the ``+=``). Oracle: forward hooks that copy each output."""
    torch.manual_seed(0)
    f = _OverwritesItsChildren().eval()
    q = _dyn(f)
    outputs = {}

    def keep(key):
        def hook(module, args, out):
            outputs[key] = out.clone()  # returns None: the output itself is left as it is
        return hook

    xs = [_x()]
    for side, model in (("float", f), ("quant", q)):
        handles = [model.get_submodule(name).register_forward_hook(keep((side, name)))
                   for name in ("attn.proj", "gate", "mlp.2")]
        with torch.no_grad():
            model(xs[0])
        for handle in handles:
            handle.remove()
    report = ns.compare(f, q, xs, keep_activations=True)
    for name in ("attn.proj", "gate", "mlp.2"):
        ref, actual = outputs["float", name].double(), outputs["quant", name].double()
        expected = 10 * math.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())
        row = report.row(name)
        assert row.output_sqnr == pytest.approx(expected, rel=1e-6), name
        (kept_ref, kept_actual), = row.activations
        assert torch.equal(kept_ref, outputs["float", name])
        assert torch.equal(kept_actual.dequantize() if kept_actual.is_quantized else kept_actual,
                           outputs["quant", name])
    # under inference_mode tensors keep no version counter: the twins copy them
    with torch.inference_mode():
        inference = ns.compare(f, q, xs)
    for name in ("attn.proj", "gate", "mlp.2"):
        assert inference.row(name).output_sqnr == pytest.approx(report.row(name).output_sqnr)
    # the eager API's loggers keep values too; torch's own suite keeps the tensor the caller
    # then wrote into (docs/eager_compat.md, row 18)
    ours = ns.compare_model_outputs(f, q, xs[0])
    theirs = tns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), xs[0])
    for name in ("attn.proj", "gate", "mlp.2"):
        for side, key in (("float", "float"), ("quant", "quantized")):
            assert torch.equal(ours[f"{name}.stats"][key][0], outputs[side, name])
    assert torch.equal(theirs["gate.stats"]["float"][0].detach(), outputs["float", "gate"] - 1)


class _OverwritesSometimes(nn.Module):
    """Writes into a leaf's output only for inputs with a large value (data-dependent)."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 4)
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        g = self.gate(x)
        if x.abs().max() > 2.0:  # untraceable, and only for some batches
            g.mul_(3)
        return self.head(g)


class _Loops(nn.Module):
    """Calls ``fc`` as many times as its batch's first value says (torch.fx cannot trace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.gate = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        for _ in range(int(x[0, 0].item())):
            x = torch.relu(self.fc(x)) + x
        return self.gate(x)


class _Loop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _Loops(), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(x))


def _calls(n: int, seed: int) -> torch.Tensor:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed))
    x[0, 0] = n
    return x


def _per_call(f: nn.Module, q: nn.Module, data: list[torch.Tensor]) -> list[float]:
    """Pooled SQNR of each call of ``block.fc`` over the batches that make it, from hooks."""
    seen = _calls_of(f, q, "block.fc", data)
    most = max(len(calls) for calls in seen["float"])
    return [_sqnr_over([(a[i][1], b[i][1]) for a, b in zip(seen["float"], seen["quant"],
                                                           strict=True) if i < len(a)])
            for i in range(most)]


def test_calls_are_counted_per_forward_and_calls_past_the_first_batch_s_say_so():
    """A batch making fewer calls than the first shifted every later batch's calls onto other
    rows (3, 1, 3, 2 calls: `fc#2` read 41.16 dB where its calls read 41.35); a batch making
    more ran its extra calls on the last rows' loggers without a word."""
    torch.manual_seed(0)
    f = _Loop().eval()
    q = _dyn(f)
    data = [_calls(n, seed) for seed, n in enumerate((3, 1, 3, 2))]
    report = ns.compare(f, q, data)
    rows = [report.row(name).output_sqnr for name in ("block.fc", "block.fc#2", "block.fc#3")]
    assert rows == pytest.approx(_per_call(f, q, data), abs=1e-4)

    more_later = [_calls(1, 0), _calls(3, 1)]
    with pytest.warns(ns.FxNumericWarning, match=r"^`block.fc` is called more often in a batch "
                      r"than in the first \(1 call a forward\).*the calls past the first 1 are "
                      "not compared"):
        report = ns.compare(f, q, more_later)
    assert [r.name for r in report.rows if r.name.startswith("block.fc")] == ["block.fc"]
    assert report.row("block.fc").output_sqnr == pytest.approx(
        _per_call(f, q, more_later)[0], abs=1e-4)  # the first call of each batch only


def _sqnr_over(pairs):
    ref = torch.cat([r.double().reshape(-1) for r, _ in pairs])
    actual = torch.cat([a.double().reshape(-1) for _, a in pairs])
    return 10 * math.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())


def test_a_value_overwritten_in_a_later_batch_leaves_that_batch_out_and_says_so(monkeypatch):
    """The float twins keep no copies up front (a copy of every value a submodule returns:
    a 512-token SmolLM2's logits among them); each value's version counter says whether the
    caller wrote into it. Seen in the first batch, that batch runs again with copies (the
    test above); seen later, that batch is left out of the layer's output metrics, noted,
    and later batches are copied. Oracle: forward-hook copies of the batches compared."""
    graph = importlib.import_module("fxnumeric.instrument.graph")
    copies = []
    monkeypatch.setattr(graph, "copy_values", lambda x: copies.append(1) or x.clone())
    torch.manual_seed(0)
    f = _OverwritesSometimes().eval()
    q = _dyn(f)
    small = torch.full((3, 4), 0.5) + 0.1 * _x()
    xs = [small, small * 5, small * 0.9]  # only the second batch is written into
    outputs = {"float": [], "quant": []}
    for side, model in (("float", f), ("quant", q)):
        handle = model.gate.register_forward_hook(
            lambda m, args, out, side=side: outputs[side].append(out.clone()) and None)
        with torch.no_grad():
            for x in xs:
                model(x)
        handle.remove()
    report = ns.compare(f, q, xs)
    gate = report.row("gate")
    pairs = list(zip(outputs["float"], outputs["quant"], strict=True))
    assert gate.output_sqnr == pytest.approx(_sqnr_over([pairs[0], pairs[2]]), rel=1e-6)
    assert "output: 1 batches left out (the model's code wrote into the float value" in gate.note
    assert report.row("head").output_sqnr == pytest.approx(
        ns.compare(f, q, xs, comparisons=("outputs",)).row("head").output_sqnr)
    # the second run copies nothing up front either: a graph-level copy is for loggers that
    # keep values (and in-graph in-place ops), not for compare's float twins
    assert not copies
    # several variants share one float model: its twins read the versions alike
    both = ns.compare(f, {"a": q, "b": _dyn(f)}, xs)
    assert both.variants["a"].row("gate").output_sqnr == pytest.approx(gate.output_sqnr)
    assert "1 batches left out" in both.variants["b"].row("gate").note


class _ReturnsThroughPlumbing(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x).contiguous()  # plumbing: the same tensor


class _ReturnsAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x).transpose(0, 1)  # a view: its memory is proj's output


class _OverwritesThroughPlumbing(nn.Module):
    def __init__(self, child: type[nn.Module] = _ReturnsThroughPlumbing):
        super().__init__()
        self.child = child()

    def forward(self, x):
        flat = self.child(x)
        flat.mul_(2)  # writes into what contiguous() returned: proj's output itself
        if flat.sum() > 0:  # untraceable: the child is captured on its own
            flat = -flat
        return flat


@pytest.mark.parametrize("child", [_ReturnsThroughPlumbing, _ReturnsAView])
def test_a_logger_keeps_a_copy_of_a_value_the_region_returns_through_plumbing(child):
    """The eager API's loggers keep what they log: a value a region returns only through
    plumbing (``proj(x).contiguous()``, the same tensor) or a view of it
    (``.transpose(0, 1)``) is written into by the caller all the same. Oracle: a forward
    hook's copy of proj's output."""
    torch.manual_seed(0)
    _assert_logged_as_made(_OverwritesThroughPlumbing(child).eval(), "child.proj")


def _assert_logged_as_made(f: nn.Module, path: str) -> None:
    """The eager API's logger of ``path`` holds the module's output as it returned it: a
    forward hook's copy (the hook returns None: the output itself is left as it is)."""
    q = _dyn(f)
    x = _x()
    seen = {}
    for side, model in (("float", f), ("quantized", q)):
        handle = model.get_submodule(path).register_forward_hook(
            lambda module, args, out, side=side: seen.__setitem__(side, out.clone()))
        with torch.no_grad():
            model(x)
        handle.remove()
    logged = ns.compare_model_outputs(f, q, x)[f"{path}.stats"]
    for side in ("float", "quantized"):
        assert torch.equal(logged[side][0], seen[side])


class _WritesIntoAView(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y = self.proj(x)
        flat = y.view(-1)
        flat.add_(1.0)  # writes into proj's output through a view
        return self.head(flat.view(y.shape))


def test_a_logger_keeps_a_value_the_graph_writes_into_through_a_view():
    """An op of the traced graph writing into a view of a logged value: the logger of
    ``proj`` kept the written tensor. Oracle: a forward hook's copy of proj's output."""
    torch.manual_seed(0)
    _assert_logged_as_made(_WritesIntoAView().eval(), "proj")


class _Optional(nn.Module):
    """``forward(x, y=None)``: the branch on ``y`` runs only when the call gives ``y``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        h = self.l1(x)
        if y is not None:
            h = h + y
        return self.l2(torch.relu(h))


def _hooked_sqnr(f: nn.Module, q: nn.Module, args: tuple, kwargs: dict,
                 names: list[str]) -> dict[str, float]:
    """Each module's output SQNR, float model against quantized, both run on the call
    ``(*args, **kwargs)`` and read by forward hooks, in float64."""
    outs: dict[tuple[str, str], torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda _m, _i, out, key=(side, name): outs.__setitem__(key, out.detach().double()))
        for side, model in (("float", f), ("quant", q)) for name in names]
    with torch.no_grad():
        f(*args, **kwargs)
        q(*args, **kwargs)
    for handle in handles:
        handle.remove()
    return {name: 10 * math.log10(float(outs["float", name].square().sum()
                                        / (outs["float", name] - outs["quant", name])
                                        .square().sum())) for name in names}


@pytest.mark.parametrize("capture", ["auto", "fx", "export"])
def test_an_optional_argument_the_batch_leaves_out_is_traced_at_its_default(capture):
    """``forward(x, y=None)`` called as ``model(x)``: torch.fx made ``y`` a graph input, so
    ``if y is not None`` kept the add, and the graph failed on ``x`` alone ("unsupported
    operand type(s) for +: 'Tensor' and 'NoneType'", blamed on the float model;
    capture="export": "the float model takes 1 inputs (x) but the quantized model takes 2")."""
    torch.manual_seed(0)
    f = _Optional().eval()
    q = _dyn(f)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    report = ns.compare(f, q, [x], capture=capture, progress=False)
    want = _hooked_sqnr(f, q, (x,), {}, ["l1", "l2"])
    assert {"l1", "l2"} <= {r.name for r in report.rows}
    assert not any(r.kind == "add" for r in report.rows)
    for name, sqnr in want.items():
        assert report.row(name).output["sqnr"] == pytest.approx(sqnr, abs=1e-3)
    # a batch that gives y is traced with it: the add is compared, on that call
    want = _hooked_sqnr(f, q, (x, y), {}, ["l1", "l2"])
    for batch in ((x, y), {"x": x, "y": y}):
        report = ns.compare(f, q, [batch], capture=capture, progress=False)
        assert any(r.kind == "add" for r in report.rows)
        for name, sqnr in want.items():
            assert report.row(name).output["sqnr"] == pytest.approx(sqnr, abs=1e-3)
    # y given as None is the call without y
    report = ns.compare(f, q, [{"x": x, "y": None}], capture=capture, progress=False)
    assert report.row("l2").output["sqnr"] == pytest.approx(
        _hooked_sqnr(f, q, (x,), {}, ["l2"])["l2"], abs=1e-3)


def test_an_optional_argument_left_out_through_the_eager_api_and_match():
    torch.manual_seed(0)
    f = _Optional().eval()
    q = _dyn(f)
    x = torch.randn(3, 8)
    want = tns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), x)
    got = ns.compare_model_outputs(f, q, x)
    assert list(got) == list(want) == ["l1.stats", "l2.stats"]
    for key in want:
        for side in ("float", "quantized"):
            assert all(torch.equal(a, b) for a, b in zip(got[key][side], want[key][side],
                                                         strict=True))
    assert [p.name for p in ns.match(f, q, example_inputs=x).pairs] == ["l1", "relu", "l2"]
    # without example inputs torch.fx traces every argument as an input: y's add is there
    assert [p.name for p in ns.match(f, q).pairs] == ["l1", "add", "relu", "l2"]


def test_batches_that_differ_in_the_arguments_they_give_are_refused_with_the_reason():
    torch.manual_seed(0)
    f = _Optional().eval()
    q = _dyn(f)
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ns.InputError, match=r"the float model was traced with `y` fixed to "
                       r"None.*this batch gives `y` \(Tensor\[3, 8\].*\nFix: give every batch "
                       "the same arguments"):
        ns.compare(f, q, [x, (x, y)], progress=False)
    with pytest.raises(ns.InputError, match=r"This batch leaves out \(or gives as None\) `y`, "
                       r"which the graph was traced with as an input.*Fix: give every batch"):
        ns.compare(f, q, [(x, y), x], progress=False)



class _Ignores(nn.Module):
    """``forward(x, unused=None)`` never reads ``unused``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 8)
        self.l2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, unused: torch.Tensor | None = None) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def _fx_dyn(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    from torch.ao.quantization import QConfigMapping, default_dynamic_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    return convert_fx(prepare_fx(copy.deepcopy(model),
                                 QConfigMapping().set_global(default_dynamic_qconfig), (x,)))


def _output_sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    return 10 * math.log10(float(ref.square().sum() / (ref - actual).square().sum()))


def test_an_fx_graph_module_with_an_argument_it_never_reads_is_compared_on_batches_without_it():
    """convert_fx keeps ``unused`` as a placeholder without users; the float model, traced on
    the batch, has it fixed to None. Every call on ``x`` (or ``(x, None)``) raised "the float
    model takes 1 inputs (x) but the quantized model takes 2 (x, unused)". Oracles: forward
    hooks, torch's eager suite, hybrids built by hand."""
    torch.manual_seed(0)
    f = _Ignores().eval()
    x = torch.randn(6, 8)
    q = _fx_dyn(f, x)
    assert [str(n.target) for n in q.graph.find_nodes(op="placeholder")] == ["x", "unused"]
    want = _hooked_sqnr(f, q, (x,), {}, ["l1", "l2"])
    for batch in (x, (x, None), {"x": x, "unused": None}):
        report = ns.compare(f, q, [batch], progress=False)
        assert [r.name for r in report.rows] == ["l1", "relu", "l2"]
        for name, sqnr in want.items():
            assert report.row(name).output["sqnr"] == pytest.approx(sqnr, abs=1e-3)
    assert [p.name for p in ns.match(f, q, example_inputs=x).pairs] == ["l1", "relu", "l2"]
    assert [p.name for p in ns.match(f, q).pairs] == ["l1", "relu", "l2"]
    torch_outputs = tns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), x)
    outputs = ns.compare_model_outputs(f, q, x)
    assert list(outputs) == list(torch_outputs) == ["l1.stats", "l2.stats"]
    for key in torch_outputs:
        for side in ("float", "quantized"):
            assert all(torch.equal(a, b) for a, b in zip(
                outputs[key][side], torch_outputs[key][side], strict=True))
    # sensitivity: each layer alone quantized (q's module in a copy of f), and alone float
    with torch.no_grad():
        ref = f(x)
        quantized = _output_sqnr(ref, q(x))
        only, all_but = {}, {}
        for name in ("l1", "l2"):
            hybrid = copy.deepcopy(f)
            setattr(hybrid, name, getattr(q, name))
            only[name] = _output_sqnr(ref, hybrid(x))
            hybrid = copy.deepcopy(q)
            setattr(hybrid, name, getattr(f, name))
            all_but[name] = _output_sqnr(ref, hybrid(x))
    sens = ns.sensitivity(f, q, [x], progress=False)
    assert sens.quantized == pytest.approx(quantized, abs=1e-3)
    layers = {layer.module: layer for layer in sens.layers}
    for name in ("l1", "l2"):
        assert layers[name].only == pytest.approx(only[name], abs=1e-3)
        assert layers[name].all_but == pytest.approx(all_but[name], abs=1e-3)
    advice = ns.advise(f, q, [x], metric="sqnr", target=quantized + 100, progress=False)
    assert advice.curve[0] == pytest.approx(quantized, abs=1e-3)
    cumulative = {d.module: d.cumulative_sqnr
                  for d in ns.diagnose(f, q, [x], progress=False).layers}
    for name, sqnr in want.items():
        assert cumulative[name] == pytest.approx(sqnr, abs=1e-3)


class _IgnoresButTraced(nn.Module):
    """Reads ``unused`` only into a value nothing uses: torch.fx keeps the dead ``mul``."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, unused: torch.Tensor | None = None) -> torch.Tensor:
        if unused is not None:
            unused * 2
        return self.l1(x)


def test_an_argument_read_only_by_dead_code_is_no_input_on_either_side():
    """A float GraphModule from torch.fx.symbolic_trace keeps the dead ``unused * 2``, so
    its ``unused`` has a user; convert_fx's dead-code elimination leaves the quantized one
    without. Both carry no value into the graph. Oracle: forward hooks."""
    torch.manual_seed(0)
    x, t = torch.randn(6, 8), torch.randn(6, 8)
    model = _IgnoresButTraced().eval()
    f, q = torch.fx.symbolic_trace(model), _fx_dyn(model, x)
    assert len(f.graph.find_nodes(op="placeholder")[1].users) == 1
    assert not q.graph.find_nodes(op="placeholder")[1].users
    assert [p.name for p in ns.match(f, q).pairs] == ["l1"]
    report = ns.compare(f, q, [(x, t)], progress=False)
    assert report.row("l1").output["sqnr"] == pytest.approx(
        _hooked_sqnr(f, q, (x, t), {}, ["l1"])["l1"], abs=1e-3)


def test_a_quantized_graph_module_reading_an_argument_the_batches_leave_out_is_refused():
    """convert_fx traced ``y`` as an input, so q's graph adds it and fails on ``q(x)``; the
    float model, traced on ``x``, has ``y`` fixed. compare said "the float model takes 1
    inputs (x) but the quantized model takes 2 (x, y); compare a float model with the
    quantized model made from it", which it is."""
    torch.manual_seed(0)
    f = _Optional().eval()
    x = torch.randn(3, 8)
    q = _fx_dyn(f, x)
    with pytest.raises(TypeError):
        q(x)
    with pytest.raises(ns.InputError, match=r"the quantized model's graph reads `y`, which the "
                       r"float model was traced with fixed to its default.*\nFix: give `y` in "
                       "every batch"):
        ns.compare(f, q, [x], progress=False)
    # given y, the graph of that call is compared (oracle: forward hooks)
    report = ns.compare(f, q, [(x, x)], progress=False)
    for name, sqnr in _hooked_sqnr(f, q, (x, x), {}, ["l1", "l2"]).items():
        assert report.row(name).output["sqnr"] == pytest.approx(sqnr, abs=1e-3)

class _MaskedChild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.l(x)
        return h if mask is None else h * mask


class _CallsWithMaskNone(nn.Module):
    """An untraceable root calling its child with ``mask=None`` by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.c = _MaskedChild()
        self.l2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace the root
            x = x * 1
        return self.l2(self.c(x, mask=None))


def test_a_region_traced_with_an_argument_fixed_takes_it_by_its_own_name():
    """The region ``c``, traced with ``mask`` fixed to None, took ``mask_1=`` (torch.fx's
    name): the root's ``self.c(x, mask=None)`` failed with "unexpected keyword argument
    'mask'", blamed on the float model."""
    torch.manual_seed(0)
    f = _CallsWithMaskNone().eval()
    q = _dyn(f)
    x = torch.randn(3, 8).abs()
    assert ns.match(f, q, example_inputs=x).pair("c.l").region == "c"
    report = ns.compare(f, q, [x], progress=False)
    want = _hooked_sqnr(f, q, (x,), {}, ["c.l", "l2"])
    for name, sqnr in want.items():
        assert report.row(name).output["sqnr"] == pytest.approx(sqnr, abs=1e-3)


class _InputNamedLikeAFixedOne(nn.Module):
    """An input ``a_b`` beside an optional ``a``: ``a_b`` reads, to a rule that strips
    ``_suffix``, like torch.fx's renaming (``a_1``) of the fixed ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.l = nn.Linear(8, 8)

    def forward(self, a_b: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        h = self.l(a_b)
        return h if a is None else h + a


def test_an_input_named_like_a_fixed_argument_keeps_its_name():
    # the fixed ``a``'s placeholder got its name back by stripping "_..." from every
    # placeholder: the input ``a_b`` became ``a`` and compare's dict batch
    # {"a_b": x} failed with "unexpected keyword argument 'a_b'"
    torch.manual_seed(0)
    f = _InputNamedLikeAFixedOne().eval()
    q = _dyn(f)
    x = torch.randn(3, 8)
    report = ns.compare(f, q, [{"a_b": x}], progress=False)
    want = _hooked_sqnr(f, q, (), {"a_b": x}, ["l"])
    assert report.row("l").output["sqnr"] == pytest.approx(want["l"], abs=1e-3)


class _CachesOnFirstCall(nn.Module):
    """Caches a size read off its input on its first call, as torchvision's
    ``MultiScaleRoIAlign`` caches its ``scales``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.width = None

    def forward(self, x):
        if self.width is None:
            self.width = x.shape[-1]
        return self.fc(x) * (self.width / 8)


class _CachesInADict(nn.Module):
    """Fills a cache it owns in place on its first call."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.g = nn.Parameter(torch.ones(1))
        self.cache: dict[str, torch.Tensor] = {}
        self.calls: list[int] = []

    def forward(self, x):
        if "w" not in self.cache:
            self.cache["w"] = torch.sigmoid(self.g)
            self.calls.append(1)
        return self.fc(x) * self.cache["w"]


def test_tracing_leaves_a_cache_filled_in_place_as_it_was():
    """The cache kept the trace's Proxy, and the user's models returned `Proxy(getattr_1)`
    from then on, without an error. They return what a fresh copy of them returns."""
    torch.manual_seed(0)
    f = nn.Sequential(_CachesInADict()).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    fresh_f, fresh_q = copy.deepcopy(f), copy.deepcopy(q)
    x = torch.randn(2, 8)
    ns.compare(f, q, [x], progress=False)
    ns.match(f, q)
    for model, fresh in ((f, fresh_f), (q, fresh_q)):
        assert model[0].cache == {} and model[0].calls == []
        with torch.no_grad():
            assert torch.equal(model(x), fresh(x))


def test_attributes_kept_puts_back_every_container_by_identity():
    """Whatever a block writes into a module's containers, by key, index, order or member,
    is put back: each attribute and each item the very object it was (a tensor is never
    compared with ``==``, which would compare its elements)."""
    from fxnumeric.capture.fx import attributes_kept

    m = nn.Linear(2, 2)
    t, u = torch.zeros(3), torch.zeros(3)  # equal, not identical
    m.d, m.l, m.s, m.o = {"a": t, "b": 1}, [t, 2], {1, 2}, OrderedDict(x=t, y=u)
    containers = (m.d, m.l, m.s, m.o, m._parameters, m._forward_hooks)
    before = [(c, list(c.items()) if isinstance(c, dict) else list(c)) for c in containers]
    attrs = dict(m.__dict__)
    with attributes_kept(m):
        m.d["a"] = u  # an equal tensor in an item's place
        m.l.reverse()
        m.s.add(3)
        m.o.move_to_end("x")  # the same items in another order
        m._parameters["extra"] = nn.Parameter(torch.ones(1))
        m.register_forward_hook(lambda *a: None)
        m.l2 = []  # a new attribute, and one replaced
        m.d = {}
    assert m.__dict__.keys() == attrs.keys()
    assert all(m.__dict__[k] is v for k, v in attrs.items())
    for container, items in before:
        now = list(container.items()) if isinstance(container, dict) else list(container)
        assert len(now) == len(items)
        if isinstance(container, set):
            assert container == set(items)
        else:
            assert all(a[0] is b[0] and a[1] is b[1] if isinstance(a, tuple) else a is b
                       for a, b in zip(now, items, strict=True))


@pytest.mark.parametrize("call", ["match", "compare_model_outputs", "add_loggers"])
def test_tracing_leaves_what_a_forward_caches_on_the_users_models(call):
    """Traced, the cache held a torch.fx Proxy, and every later forward of the user's
    models failed ("Proxy object cannot be iterated" on a fresh Faster R-CNN after
    ns.match). The models run afterwards as a fresh copy of them does."""
    torch.manual_seed(0)
    f = nn.Sequential(_CachesOnFirstCall()).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    fresh_f, fresh_q = copy.deepcopy(f), copy.deepcopy(q)
    x = torch.randn(2, 8)
    if call == "match":
        ns.match(f, q)
    elif call == "compare_model_outputs":
        ns.compare_model_outputs(f, q, x)
    else:
        ns.add_loggers(f, q)
    for model, fresh in ((f, fresh_f), (q, fresh_q)):
        assert model[0].width is None
        assert not hasattr(model, "_tensor_constant0")
        with torch.no_grad():
            assert torch.equal(model(x), fresh(x))
