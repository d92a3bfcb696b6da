"""capture="export": torch.export as a second tracer, on models torch.fx cannot trace whole."""

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn

import fxnumeric as fxn

transformers = pytest.importorskip("transformers")
pytest.importorskip("torchao")


def _pt2e(model: nn.Module, batch: dict) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    exported = torch.export.export(model, (), batch, strict=False)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    prepared = prepare_pt2e(exported.module(), quantizer)
    prepared(**batch)
    return convert_pt2e(prepared)


@pytest.fixture(scope="module")
def bert():
    """A tiny BertModel (random weights, eager attention: matmul + softmax) and its pt2e twin."""
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids}  # a keyword input
    return model, _pt2e(model, batch), batch


def _sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    return 20 * math.log10(ref.norm().item() / (ref - actual).norm().item())


def test_export_pairs_name_the_users_modules_and_attention_internals(bert):
    model, quant, batch = bert
    m = fxn.match(model, quant, batch, capture="export")
    assert not m.unmatched_quant and m.coverage == 1.0 and m.whole_graph
    modules = dict(model.named_modules())
    linears = [p.name for p in m.pairs if p.kind == "linear"]
    assert len(linears) == 13 and all(isinstance(modules[n], nn.Linear) for n in linears)
    assert "encoder.layer.0.attention.self.query" in linears
    # what BertSelfAttention computes itself pairs too, named after it
    for layer in (0, 1):
        inside = [p.kind for p in m.pairs
                  if p.name.startswith(f"encoder.layer.{layer}.attention.self.")
                  and p.name.rpartition(".")[0] == f"encoder.layer.{layer}.attention.self"]
        assert inside.count("matmul") == 2 and inside.count("softmax") == 1
    assert m.pair("encoder.layer.0.attention.self.softmax").quantized
    # torch.fx cannot pair a module tree with a flat pt2e graph at all; it says what to do,
    # and the default ("auto") exports the float side as "export" does
    # (it warned "no quantized op" and returned no pair, the fix in a note of its table)
    with pytest.raises(fxn.InputError, match="(?s)nothing paired: torch.fx could not trace the "
                                             "float model .BertModel.*capture='export' or"):
        fxn.match(model, quant, batch, capture="fx")
    assert [p.name for p in fxn.match(model, quant, batch).pairs] == [p.name for p in m.pairs]


def _node_values(gm: torch.fx.GraphModule, batch: dict) -> dict[str, torch.Tensor]:
    values: dict[str, torch.Tensor] = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            values[n.name] = out = super().run_node(n)
            return out

    with torch.no_grad():
        Record(gm).run(*[batch[n.target] for n in gm.graph.find_nodes(op="placeholder")])
    return values


def test_linear_output_sqnr_equals_the_logged_tensors(bert):
    model, quant, batch = bert
    report = fxn.compare(model, quant, [batch], capture="export", comparisons=("outputs",))
    logged = fxn.compare_model_outputs(model, quant, batch, capture="export")
    # the float values logged on the exported graph are the eager model's own Linear outputs
    eager: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, name=name: eager.__setitem__(name, o))
             for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    # and the quantized ones are what each pt2e linear hands on after its output q/dq
    values = _node_values(quant, batch)
    quantized = {}
    for node in quant.graph.nodes:
        if node.target is torch.ops.aten.linear.default:
            path = list(node.meta["nn_module_stack"].values())[-1][0]
            (q,) = node.users
            (dq,) = q.users
            assert "dequantize" in str(dq.target)
            quantized[path] = values[dq.name]
    checked = 0
    for row in report.rows:
        if row.kind != "linear":
            continue
        stats = logged[f"{row.name}.stats"]
        ref, actual = stats["float"][0], stats["quantized"][0]
        torch.testing.assert_close(ref, eager[row.name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(actual, quantized[row.name], rtol=0, atol=0)
        assert row.output["sqnr"] == pytest.approx(_sqnr(ref, actual), abs=0.01)
        checked += 1
    assert checked == 13


def test_auto_exports_the_float_side_against_a_pt2e_model(bert):
    model, quant, batch = bert
    auto = fxn.match(model, quant, batch, capture="auto")
    export = fxn.match(model, quant, batch, capture="export")
    assert [p.name for p in auto.pairs] == [p.name for p in export.pairs]
    assert dict(auto.capture_notes)["float"].startswith("captured with torch.export")
    # at least every layer the module tree pairs (float vs the dynamic quantized model)
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    tree = fxn.match(model, dynamic, batch)
    assert tree.untraced
    modules = dict(model.named_modules())
    tree_layers = {p.name for p in tree.pairs if p.name in modules}
    # but the two embeddings of constant ids (positions, token types), which convert_pt2e
    # folds into constants: the pt2e model has no such op left to compare
    folded = {"embeddings.position_embeddings", "embeddings.token_type_embeddings"}
    assert tree_layers - {p.name for p in auto.pairs} == folded
    # and at least as many ops of every kind (attention's matmul/softmax are new)
    tree_kinds = Counter(p.kind for p in tree.pairs)
    # hidden[:, 0] is aten.select.int in the exported graph: a getitem of the same index
    assert tree_kinds - Counter(p.kind for p in auto.pairs) == Counter({"embedding": 2})
    assert (len(tree.pairs), len(auto.pairs)) == (29, 57)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x, attention_mask=None):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / 4
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e4)
        return self.out(scores.softmax(-1) @ self.v(x))


def test_keyword_inputs_attention_mask():
    torch.manual_seed(0)
    model = _Attention().eval()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[:, -2:] = 0
    batch = {"x": torch.randn(2, 6, 16), "attention_mask": mask}
    quant = _pt2e(model, batch)
    m = fxn.match(model, quant, batch, capture="export")
    assert {"q", "k", "v", "out", "softmax"} <= {p.name for p in m.pairs}
    report = fxn.compare(model, quant, [batch, batch], capture="export")
    assert report.batches == 2 and report.row("out").output["sqnr"] > 20
    stub = fxn.compare_model_stub(model, quant, [nn.Linear], batch, capture="export")
    assert "q.stats" in stub


def test_a_side_torch_export_cannot_capture_is_traced_by_fx_and_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    x = torch.randn(3, 8)
    m = fxn.match(model, dynamic, x, capture="export")
    # an ATen linear (exported float) pairs with the dynamic quantized Linear module (torch.fx)
    assert [(p.name, p.kind, p.float_nodes) for p in m.pairs] == [
        ("0", "linear", ("linear",)), ("1", "relu", ("relu",)), ("2", "linear", ("linear_1",))]
    (side, note), = m.capture_notes
    assert side == "quantized"
    assert "torch.export could not capture the quantized model (Sequential)" in note
    assert "__obj_flatten__" in note and "traced with torch.fx instead" in note
    assert "capture (quantized): torch.export could not" in m.table()
    report = fxn.compare(model, dynamic, [x], capture="export")
    assert report.row("0").weight_sqnr > 30 and "traced with torch.fx" in " ".join(report.notes)


def test_bert_with_a_dynamic_quantized_side_falls_back_to_the_module_tree(bert):
    model, _, batch = bert
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    m = fxn.match(model, dynamic, batch, capture="export")
    assert [p.name for p in m.pairs] == [p.name for p in fxn.match(model, dynamic, batch).pairs]
    notes = dict(m.capture_notes)
    assert "LinearPackedParamsBase" in notes["quantized"]
    assert "captured through the module tree" in notes["both"]


def test_export_needs_example_inputs_and_a_known_capture():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    with pytest.raises(fxn.InputError, match="capture='export' runs torch.export on example"):
        fxn.match(model, dynamic, capture="export")
    with pytest.raises(fxn.InputError, match="unknown capture 'dynamo'; choose from fx, export"):
        fxn.match(model, dynamic, torch.randn(1, 4), capture="dynamo")


def test_a_batch_of_other_shapes_than_the_export_names_the_cause():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    with pytest.raises(fxn.InputError, match=r"(?s)Tensor\[5, 4\].*Guard failed.*specialised to "
                       "the shapes it was exported with"):
        fxn.compare(model, dynamic, [torch.randn(3, 4), torch.randn(5, 4)], capture="export")


def test_cli_capture_export(user_module, capsys):
    from fxnumeric.cli import main

    user_module("exportzoo",
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(32, 4))\n"
    )
    common = ["--model", "exportzoo:make", "--quant", "dynamic", "--input-shape", "4,16",
              "--capture", "export", "--no-progress"]
    assert main(["match", *common]) == 0
    out = capsys.readouterr().out  # exported float ATen ops paired with fx-traced modules
    assert "linear_1" in out and "0 float and 0 quantized nodes unpaired" in out
    assert "capture (quantized): torch.export could not capture" in out
    assert main(["report", *common, "--batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 batches; 3 layers" in out and "traced with torch.fx instead" in out


def test_every_call_exports_the_float_side_by_default_against_a_pt2e_model(bert):
    """The module tree cannot walk a pt2e model: with ``capture="fx"`` a BertModel and its
    pt2e twin pair nothing. The default (``"auto"``) exports the float model on the first
    batch, in compare, the eager API and the calls past compare alike."""
    model, quant, batch = bert
    with pytest.raises(fxn.InputError, match="(?s)nothing paired.*capture='export' or 'auto'"):
        fxn.compare(model, quant, [batch], capture="fx")
    exported = fxn.compare(model, quant, [batch], capture="export")
    report = fxn.compare(model, quant, [batch])
    assert [r.name for r in report.rows] == [r.name for r in exported.rows]
    assert len(report.rows) > 30
    assert [r.output_sqnr for r in report.rows] == [r.output_sqnr for r in exported.rows]
    logged = fxn.compare_model_outputs(model, quant, batch)
    assert "encoder.layer.0.attention.self.query.stats" in logged
    rows = {r.name for r in report.rows}
    diagnosed = {layer.name for layer in fxn.diagnose(model, quant, [batch]).layers}
    assert "encoder.layer.0.attention.self.query" in diagnosed and diagnosed <= rows
    # the float base skipped the attention mask with layer 0's `add` (which builds it for
    # every layer): layer 1's `add` then read None
    found = fxn.sensitivity(model, quant, [batch])
    assert not found.skipped
    ranked = set(found.ranking())
    assert "encoder.layer.0.attention.self.query" in ranked and ranked <= rows
    swapped = found.layer("encoder.layer.1.attention.self.add")
    assert math.isfinite(swapped.only) and math.isfinite(swapped.all_but)


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(12, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y, _ = self.lstm(self.fc0(x))
        return self.fc(self.gru(y)[0])


class _Cells(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc0, self.lstm, self.gru = nn.Linear(8, 6), nn.LSTMCell(6, 6), nn.GRUCell(6, 6)

    def forward(self, x):
        h, c = self.lstm(self.fc0(x))
        return self.gru(h, c)


@pytest.mark.parametrize("model, shape, matrices", [
    (_Recurrent, (2, 5, 8), {"lstm": 8, "gru": 2}),
    (_Cells, (3, 8), {"lstm": 2, "gru": 2}),
])
def test_an_exported_float_lstm_s_weights_pair_with_the_dynamic_lstm_s(model, shape, matrices):
    """The float side exported (an ExportedProgram, or capture="export"): its LSTM and GRU
    are aten.lstm/aten.gru reading a flat parameter list (a cell: aten.lstm_cell reading
    w_ih, w_hh), not modules, and their rows read no weight SQNR, with no note. Oracle: the
    float parameters against the dynamic modules' own quantized weights (_weight_bias(),
    get_weight()), pooled per layer."""
    torch.manual_seed(0)
    f = model().eval()
    q = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(f), {nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell})
    data = [torch.randn(*shape) for _ in range(2)]
    exported = torch.export.export(f, (data[0],))
    by_module = fxn.compare(f, q, data, comparisons=["weights"], progress=False)
    for report in (fxn.compare(exported, q, data, comparisons=["weights"], progress=False),
                   fxn.compare(f, q, data, capture="export", comparisons=["weights"],
                               progress=False)):
        for name, count in matrices.items():
            fmod, qmod = getattr(f, name), getattr(q, name)
            quantized = (qmod._weight_bias()["weight"] if hasattr(qmod, "_weight_bias")
                         else qmod.get_weight())
            signal = noise = 0.0
            for n, qw in quantized.items():
                w = getattr(fmod, n).detach().double()
                signal += float(w.square().sum())
                noise += float((w - qw.dequantize().double()).square().sum())
            row = report.row(name)
            assert len(quantized) == count
            assert row.weight_sqnr == pytest.approx(10 * math.log10(signal / noise), abs=1e-9)
            assert row.weight_keys == by_module.row(name).weight_keys
            assert len(row.weight_keys) == count and row.note == ""


class _EagerQat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.dq = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.fc1, self.relu, self.fc2 = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)

    def forward(self, x):
        return self.dq(self.fc2(self.relu(self.fc1(self.q(x)))))


def _hooked(model: nn.Module, names: list[str], data: list) -> dict[str, tuple[torch.Tensor,
                                                                             torch.Tensor]]:
    """``{name: (input, output)}`` of each module named, over ``data`` concatenated: what a
    forward hook registered after prepare_qat reads (after the module's own fake-quant)."""
    seen: dict[str, list] = {name: [] for name in names}
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(
        lambda mod, args, out, name=name: seen[name].append((args[0], out))) for name in names]
    with torch.no_grad():
        for x in data:
            model(x)
    for hook in hooks:
        hook.remove()

    def joined(values):
        return torch.cat([v.dequantize() if v.is_quantized else v for v in values]).double()

    return {name: (joined([i for i, _ in got]), joined([o for _, o in got]))
            for name, got in seen.items()}


def test_capture_export_of_an_eager_qat_model_traces_both_with_torch_fx_and_says_so():
    """torch.export traced an eager prepare_qat model's fake-quants into their arithmetic
    (aten.fused_moving_avg_obs_fake_quant): `q` and `fc1` were unpaired, the fake-quants
    unpaired with pairing reasons, `fc2` read as `fc2.linear` before its output fake-quant
    (35.80 dB where the layer hands on 33.82) and the only note was "nothing was quantized".
    As for torchao's QAT layers, both models are traced with torch.fx, and a note says why.
    Oracle: forward hooks on both models (observers off, so every forward computes alike)."""
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    f = _EagerQat().eval()
    data = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    qat = copy.deepcopy(f).train()
    qat.qconfig = tq.get_default_qat_qconfig("x86")
    qat = tq.prepare_qat(qat).eval()
    with torch.no_grad():
        for x in data:
            qat(x)
    qat.apply(tq.disable_observer)
    names = ["q", "fc1", "relu", "fc2"]
    ref, out = _hooked(f, names, data), _hooked(qat, names, data)
    with pytest.warns(fxn.FxNumericWarning, match="simulates quantization with 3 fake-quants"):
        report = fxn.compare(f, qat, data, capture="export", progress=False)
    assert [r.name for r in report.rows] == names
    for name in names:
        assert report.row(name).output_sqnr == pytest.approx(
            _sqnr(ref[name][1], out[name][1]), abs=1e-6), name
    for name in ("fc1", "fc2"):  # the float layer fed what the QAT layer reads
        with torch.no_grad():
            shadow = getattr(f, name)(out[name][0].float()).double()
        assert report.row(name).shadow["sqnr"] == pytest.approx(
            _sqnr(shadow, out[name][1]), abs=1e-4), name
    note = ("capture (quantized): torch.export traces torch.ao's fake-quants and observers "
            "(`q.activation_post_process`: FusedMovingAvgObsFakeQuantize and 4 more")
    assert any(n.startswith(note) and "both models traced with torch.fx instead" in n
               for n in report.notes)
    with pytest.warns(fxn.FxNumericWarning, match="simulates quantization"):
        m = fxn.match(f, qat, data[0], capture="export")
    assert not m.unmatched_float and not m.unmatched_quant and m.capture_notes
    # a QAT model on the float side, against its converted model: the same, noted for it
    converted = tq.convert(copy.deepcopy(qat))
    got = _hooked(converted, names, data)
    report = fxn.compare(qat, converted, data, capture="export", progress=False)
    assert [r.name for r in report.rows] == names
    for name in names:  # `q`: the fake-quant and the quantize agree exactly
        want = math.inf if torch.equal(out[name][1], got[name][1]) else _sqnr(
            out[name][1], got[name][1])
        assert report.row(name).output_sqnr == pytest.approx(want, abs=1e-6), name
    assert any(n.startswith("capture (float): torch.export traces torch.ao's fake-quants")
               for n in report.notes)


def test_an_exported_program_with_a_keyword_only_input_runs_on_a_dict_batch():
    """``forward(x, *, scale)`` exported takes ``x`` by position and ``scale`` only by name: a
    dict batch naming both gives ``x`` its place (torch's check of the exported input tree
    refused ``x`` by name, and no batch could pass both)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, *, scale):
            return self.fc(x) * scale

    torch.manual_seed(0)
    model = Scaled().eval()
    x, scale = torch.randn(4, 8), torch.tensor(3.0)
    exported = torch.export.export(model, (x,), {"scale": scale})
    quant = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    report = fxn.compare(exported, quant, [{"x": x, "scale": scale}], progress=False)
    with torch.no_grad():
        ref = exported.module()(x, scale=scale).double()
        err = ref - quant(x, scale=scale).double()
    want = 10 * math.log10(float(ref.square().sum() / err.square().sum()))
    assert report.model_output["sqnr"] == pytest.approx(want, rel=1e-6)
    assert [row.name for row in report.rows] == ["fc", "mul"]
