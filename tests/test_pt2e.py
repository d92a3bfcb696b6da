"""pt2e: torch.export graphs quantized by torchao's prepare_pt2e / convert_pt2e.

Oracle: torchao's own numeric debugger (prepare_for_propagation_comparison,
extract_results_from_loggers, compare_results) on the same pairs. Where it compares the same
float node with the same quantized value as fxnumeric, the SQNRs agree within 0.01 dB (with
torchao's definition: it takes the *quantized* tensor as the signal). Where they differ, the
test states why (see ``_pt2e_models.oracle_rows``).
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter

import pytest
import torch

pytest.importorskip("torchao")

import _pt2e_models as M  # noqa: E402

import fxnumeric as fxn  # noqa: E402


@pytest.fixture(scope="module")
def resnet18():
    return M.pt2e_pair("resnet18")


def test_resnet18_pairs_every_op_with_module_path_names(resnet18):
    ep, float_gm, quant = resnet18
    m = fxn.match(ep, quant)
    # 49 ops, and the input's quantize as a pair of its own (x.quantize)
    assert (len(m.pairs), len(m.unmatched_float), len(m.unmatched_quant)) == (50, 0, 0)
    assert m.coverage == 1.0 and m.pairs[0].name == "x.quantize"
    # quantized = reads a dequantized value or hands its output to a quantize: a relu_ fused
    # after its conv reads the conv's float result, but runs in the same quantized kernel
    assert all(p.quantized for p in m.pairs[1:])
    relu = m.pair("relu")
    assert m.output_nodes(relu)[1].name == "dequantize_per_tensor_default_22"  # after its q/dq
    assert not any("guards" in p.name or "guards" in p.kind for p in m.pairs)
    conv = m.pair("layer1.0.conv1")
    assert (conv.kind, conv.float_nodes, conv.quant_nodes) == (
        "conv2d", ("conv2d_1", "batch_norm_1"), ("conv2d_1",))  # BN folded into the conv
    # ops a bigger module computes itself read as users name them: module path + kind
    assert [p.name for p in m.pairs if p.kind == "add"][:2] == ["layer1.0.add", "layer1.1.add"]
    # BasicBlock.relu is called twice: two call sites, two pairs
    assert {"layer1.0.relu", "layer1.0.relu#2"} <= {p.name for p in m.pairs}
    # the ExportedProgram and its .module() give the same pairs
    assert fxn.match(float_gm, quant).pairs == m.pairs
    # the user's converted model keeps its _guards_fn: fxnumeric only reads it
    assert any(n.target == "_guards_fn" for n in quant.graph.nodes)


def test_dequantize_nodes_are_plumbing_and_quantize_nodes_unpaired_roles(resnet18):
    ep, _, quant = resnet18
    m = fxn.match(ep, quant)
    qv = m.quant_view
    roles = Counter(qv.op_class(n).role for n in qv.nodes if qv.op_class(n) is not None)
    dequantize = [n for n in quant.graph.nodes if "dequantize" in str(n.target)]
    assert len(dequantize) > 50 and all(not qv.is_op(qv.node(n.name)) for n in dequantize)
    assert roles["optional"] == sum(
        1 for n in quant.graph.nodes
        if "quantize_per_tensor" in str(n.target) and "dequantize" not in str(n.target))


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v2", "transformer"])
def test_torchao_numeric_debugger_agrees_where_it_compares_the_same_values(model_name):
    ep, _, quant = M.pt2e_pair(model_name)
    x = M.batches(model_name, 1, seed=5)[0]
    rows = M.oracle_rows(ep, quant, x)
    categories = Counter(r[-1] for r in rows)
    same = [r for r in rows if r[-1] == "same"]
    assert len(same) >= 20
    for name, _, _, fx_sqnr, fx_quant_signal, torchao_sqnr, _, _ in same:
        assert abs(fx_quant_signal - torchao_sqnr) < 0.01, name
        assert abs(fx_sqnr - torchao_sqnr) < 0.2, name  # the two SQNR definitions stay close
    # torchao's value of an add_ is read after the relu_ that overwrites it in place; fxnumeric
    # logs a copy. Put through that relu_, fxnumeric's values give torchao's number.
    for name, _, _, _, explained, torchao_sqnr, _, category in rows:
        if category == "in-place":
            assert abs(explained - torchao_sqnr) < 0.01, name
    folded = [r for r in rows if r[-1] == "bn-folded"]
    if model_name == "transformer":
        assert not folded and categories["absent"] == 0
    else:
        # torchao compares the float conv *before* its BatchNorm with the quantized conv that
        # absorbed it: a meaningless number. fxnumeric pairs the conv+BN chain.
        assert len(folded) == {"resnet18": 20, "mobilenet_v2": 52}[model_name]
        for name, _, _, fx_sqnr, _, torchao_sqnr, _, _ in folded:
            assert fx_sqnr > 10 and fx_sqnr - torchao_sqnr > 5, name


def test_fold_quantize_off_gives_the_same_pairs_and_weights(resnet18):
    ep, _, folded = resnet18
    _, _, unfolded = M.pt2e_pair("resnet18", fold_quantize=False)
    m_folded, m_unfolded = fxn.match(ep, folded), fxn.match(ep, unfolded)
    assert [(p.name, p.float_nodes) for p in m_unfolded.pairs] == [
        (p.name, p.float_nodes) for p in m_folded.pairs]
    assert m_unfolded.coverage == 1.0 and not m_unfolded.unmatched_quant
    w_folded, w_unfolded = fxn.extract_weights(m_folded), fxn.extract_weights(m_unfolded)
    assert sorted(w_folded) == sorted(w_unfolded) and len(w_folded) == 21  # 20 convs + fc
    for key in w_folded:
        torch.testing.assert_close(w_folded[key]["quantized"], w_unfolded[key]["quantized"])


def test_weights_are_bn_folded_float_against_dequantized(resnet18):
    ep, float_gm, quant = resnet18
    weights = fxn.extract_weights(fxn.match(ep, quant))
    pair = weights["layer1.0.conv1.weight"]
    block = M.vision("resnet18").layer1[0]  # the same seeded weights the pair was made from
    scale = block.bn1.weight / torch.sqrt(block.bn1.running_var + block.bn1.eps)
    expected = block.conv1.weight * scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(pair["float"], expected.detach())
    assert pair["quantized"].dtype == torch.float32
    assert 30 < fxn.sqnr(pair["float"], pair["quantized"]) < 60
    report = fxn.compare(ep, quant, M.batches("resnet18", 1), comparisons=("weights",))
    assert all(r.weight_sqnr is not None for r in report.rows if r.kind in ("conv2d", "linear"))
    # by state dict, the names a pt2e model still holds are float weights its graph does not
    # read: every weight read inf dB (float against itself). Refused, with the fix, which works
    assert "fc.weight" in quant.state_dict()
    with pytest.raises(fxn.InputError, match=r"pt2e \(convert_pt2e\).*compare_weights\("
                                             r"float_model, quantized_model\)"):
        fxn.compare_weights(ep.module().state_dict(), quant.state_dict())
    by_model = fxn.compare_weights(ep.module(), quant)["layer1.0.conv1.weight"]
    assert fxn.sqnr(by_model["float"], by_model["quantized"]) == pytest.approx(
        fxn.sqnr(pair["float"], pair["quantized"]))


def test_prepared_models_pair_with_observers_transparent():
    ep, _, prepared = M.pt2e_pair("resnet18", convert=False)
    m = fxn.match(ep, prepared)
    assert (len(m.pairs), len(m.unmatched_quant), m.coverage) == (49, 0, 1.0)
    # ops reading or producing an observed value count as quantized, as they will be
    assert all(p.quantized for p in m.pairs)
    report = fxn.compare(ep, prepared, M.batches("resnet18", 1), comparisons=("outputs",))
    # observers pass values through: the prepared model computes the float model exactly,
    # except that its convs read the unfolded weight and apply BN after (same math)
    assert report.model_output["sqnr"] > 80


def test_qat_prepared_models_pair_conv_and_batch_norm():
    from torchao.quantization.pt2e import move_exported_model_to_eval

    ep, _, prepared = M.pt2e_pair("resnet18", convert=False, qat=True)
    move_exported_model_to_eval(prepared)  # its BatchNorms use running statistics
    m = fxn.match(ep, prepared)
    # the QAT graph keeps its BatchNorm after a conv that reads weight * bn_scale and divides
    # the scale back out: conv and BatchNorm pair one to one, the scaling is not a layer; the
    # input's fake-quant is a pair of its own, as a converted model's input quantize is
    assert (len(m.pairs), len(m.unmatched_float), len(m.unmatched_quant)) == (70, 0, 0)
    assert (m.pairs[0].name, m.pairs[0].kind) == ("x.quantize", "quantize")
    conv = m.pairs[1]
    assert (conv.kind, conv.float_nodes, conv.quant_nodes) == ("conv2d", ("conv2d",),
                                                                ("conv2d_20",))
    assert m.output_nodes(conv)[1].name == "div_1"  # the conv's value, scale divided back out
    report = fxn.compare(ep, prepared, M.batches("resnet18", 1))
    convs = [r for r in report.rows if r.kind == "conv2d"]
    assert len(convs) == 20 and all(r.output_sqnr > 15 and r.shadow_sqnr > 25 for r in convs)
    # fake-quants are not run on weights (that would update them): until convert, the weight
    # compared is the float weight, scaled and divided back (float rounding only)
    assert all(r.weight_sqnr > 100 for r in convs)


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = (torch.nn.Linear(16, 32), torch.nn.GELU(),
                                        torch.nn.Linear(32, 4))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _qat_mlp(calibration, **config):
    """``(float model, its ExportedProgram, prepare_qat_pt2e model)``, the fake-quants
    calibrated on ``calibration`` (XNNPACK symmetric QAT config, ``config`` its arguments:
    ``act_qmin``, ``act_qmax``), BatchNorm-free in eval."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    torch.manual_seed(0)
    float_model = _Mlp().eval()
    ep = torch.export.export(float_model, (calibration,))
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_qat=True, **config))
    prepared = prepare_qat_pt2e(torch.export.export(copy.deepcopy(float_model),
                                                    (calibration,)).module(), quantizer)
    prepared(calibration)
    move_exported_model_to_eval(prepared)
    return float_model, ep, prepared


def _activation_fake_quants(prepared):
    """A copy of ``prepared`` with its observers off, and ``{name of the op (or input) a
    fake-quant of an activation reads: that fake-quant}``."""
    qat = copy.deepcopy(prepared)
    fake_quants = {name: m for name, m in qat.named_modules() if hasattr(m, "disable_observer")}
    for module in fake_quants.values():
        module.disable_observer()
    return qat, {node.args[0].name: fake_quants[node.target] for node in qat.graph.nodes
                 if node.target in fake_quants and node.args[0].op != "get_attr"}


def _fake_quant_oracle(float_model, prepared, batches):
    """Output SQNR per row, read with forward hooks: the float model's input and modules
    against the fake-quant each value goes through in a copy of ``prepared`` whose observers
    are off (the scales stay as calibrated), its input's included."""
    float_model, (qat, after) = copy.deepcopy(float_model), _activation_fake_quants(prepared)
    rows = {"x.quantize": "x", "fc1": "linear", "act": "gelu", "fc2": "linear_1"}
    float_values, quant_values = {n: [] for n in rows}, {n: [] for n in rows}
    for row, op in rows.items():
        after[op].register_forward_hook(
            lambda _m, _i, out, row=row: quant_values[row].append(out.detach()))
        if row != "x.quantize":
            float_model.get_submodule(row).register_forward_hook(
                lambda _m, _i, out, row=row: float_values[row].append(out.detach()))
    with torch.no_grad():
        for x in batches:
            float_values["x.quantize"].append(x)
            float_model(x)
            qat(x)
    return {row: fxn.sqnr(torch.cat(float_values[row]), torch.cat(quant_values[row]))
            for row in rows}


def test_qat_prepared_fake_quants_belong_to_rows_as_a_converted_models_quantizes_do():
    # fake-quants calibrated on one batch and compared on others: the input's clips hard
    # (19.3 dB) and fc2's output fake-quant takes the model output to 5.3 dB. Read as
    # plumbing, the input's was in no row and fc2 read 15.6 dB, before its fake-quant: no
    # row accounted for the model's 5.3 dB
    batches = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    float_model, ep, prepared = _qat_mlp(batches[0])
    before = _state(prepared)
    report = fxn.compare(ep, prepared, batches[1:], progress=False)
    _assert_state(prepared, before)  # compared with its scales, never recalibrated
    oracle = _fake_quant_oracle(float_model, prepared, batches[1:])
    read = {r.name: r.output_sqnr for r in report.rows}
    assert read == pytest.approx(oracle, abs=1e-4)
    assert oracle["x.quantize"] < 25 and oracle["fc2"] < 10
    assert report.model_output["sqnr"] == pytest.approx(oracle["fc2"], abs=1e-4)
    # the input's row is the quantize alone: its own error is its output's
    assert report.row("x.quantize").shadow_sqnr == pytest.approx(oracle["x.quantize"], abs=1e-4)
    # the converted model reads its input quantize and fc2 the same (its kernels round alike)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = fxn.compare(ep, convert_pt2e(copy.deepcopy(prepared)), batches[1:],
                            progress=False)
    for name in ("x.quantize", "fc2"):
        assert converted.row(name).output_sqnr == pytest.approx(oracle[name], abs=0.1)


def test_the_verdict_names_a_qat_prepared_models_input_fake_quant_where_error_enters():
    # compared on its calibration batch, every fake-quant but the input's covers its values;
    # the input's range is narrowed to 30%, as one calibrated on quieter data than it reads
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    float_model, ep, prepared = _qat_mlp(x)
    input_fake_quant = next(prepared.get_submodule(str(n.target)) for n in prepared.graph.nodes
                            if n.op == "call_module" and n.args[0].name == "x")
    input_fake_quant.activation_post_process.min_val.mul_(0.3)
    input_fake_quant.activation_post_process.max_val.mul_(0.3)
    report = fxn.compare(ep, prepared, [x], progress=False)
    oracle = _fake_quant_oracle(float_model, prepared, [x])
    assert oracle["x.quantize"] < 10  # the rows after inherit its error, adding little
    assert all(r.shadow_sqnr > 35 for r in report.rows if r.name != "x.quantize")
    assert report.culprit == "x.quantize"
    assert report.row("x.quantize").output_sqnr == pytest.approx(oracle["x.quantize"], abs=1e-4)
    assert "culprit: x.quantize" in report.summary()


def test_a_qat_prepared_layers_floor_reads_its_fake_quants_range_not_its_dtypes():
    # 4-bit activations held in int8 (quant_min -8, quant_max 7): read with int8's range, fc2's
    # output fake-quant clipped nothing, so fc2's floor read 26.9 dB and its 9.2 dB "below
    # floor: a wrong output or weight scale"; the range it clips to puts its floor at 9.9 dB
    batches = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    float_model, ep, prepared = _qat_mlp(batches[0], act_qmin=-8, act_qmax=7)
    report = fxn.compare(ep, prepared, batches, progress=False)
    qat, fake_quant = _activation_fake_quants(prepared)
    # the floor, computed directly: each Linear's float twin on the input the prepared model
    # gave it (read by forward hooks), against the grid of the fake-quant after it (clipped
    # half a step beyond its ends), and its rounding noise. No weight term: until convert,
    # fxnumeric reads a weight as the observers see it, unquantized (docs/pt2e.md)
    twin_inputs = {"fc1": [], "fc2": []}
    for layer, before in (("fc1", "x"), ("fc2", "gelu")):
        fake_quant[before].register_forward_hook(
            lambda _m, _i, out, layer=layer: twin_inputs[layer].append(out.detach()))
    with torch.no_grad():
        for x in batches:
            qat(x)
    for layer, after in (("fc1", "linear"), ("fc2", "linear_1")):
        grid = fake_quant[after]
        assert (grid.quant_min, grid.quant_max) == (-8, 7)
        step, zero = float(grid.scale), int(grid.zero_point)
        low, high = (-8 - zero - 0.5) * step, (7 - zero + 0.5) * step
        with torch.no_grad():
            y = torch.cat([float_model.get_submodule(layer)(x) for x in twin_inputs[layer]])
        y = y.double()
        noise = y.numel() * step ** 2 / 12 + float(((y - y.clamp(low, high)) ** 2).sum())
        oracle = 10 * math.log10(float((y ** 2).sum()) / noise)
        assert report.row(layer).floor_sqnr == pytest.approx(oracle, abs=1e-3), layer
    assert report.row("fc2").floor_sqnr < 12 and report.row("fc2").floor_cause == "clipping"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model, before):
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed


def test_calls_on_a_model_before_conversion_leave_its_calibration_as_it_was():
    # every call's forwards went into the user's observers (min/max, histograms) and moved a
    # QAT model's fake-quant scales from batch to batch; BatchNorm counted the batches
    from torchao.quantization.pt2e import move_exported_model_to_eval

    torch.manual_seed(0)
    float_model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                      torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    data = [torch.randn(1, 3, 16, 16) * 3 for _ in range(2)]  # wider than the calibration
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(float_model, (data[0],)).module(), quantizer)
    for x in data:
        prepared(x / 3)  # calibrate
    before = _state(prepared)
    fxn.compare(float_model, prepared, data, progress=False)
    fxn.diagnose(float_model, prepared, data, progress=False)
    fxn.sensitivity(float_model, prepared, data, "sqnr", progress=False)
    fxn.advise(float_model, prepared, data, metric="sqnr", target=200, progress=False)
    fxn.compare_model_outputs(float_model, prepared, data[0])
    _assert_state(prepared, before)
    ep, _, qat = M.pt2e_pair("resnet18", convert=False, qat=True)
    move_exported_model_to_eval(qat)
    batches = M.batches("resnet18", 2)
    before = _state(qat)
    first = fxn.compare(ep, qat, batches, progress=False)
    _assert_state(qat, before)
    # the fake-quants quantize every batch with the scales they had: a second run reads alike
    assert fxn.compare(ep, qat, batches, progress=False) == first


def test_loggers_shadows_and_eager_calls_work_on_pt2e(resnet18):
    ep, float_gm, quant = resnet18
    x = M.batches("resnet18", 1, seed=3)[0]
    m = fxn.match(ep, quant)
    f_logged, q_logged = fxn.add_loggers(ep, quant, matching=m)
    with torch.no_grad():
        assert torch.equal(q_logged(x), quant(x))  # loggers change nothing
        f_logged(x)
    # the conv's float value is taken before the relu_ that overwrites it in place
    conv = fxn.loggers_of(f_logged)["conv1"].stats["tensor_val"][0]
    assert conv.min() < 0
    shadowed, skipped = fxn.add_shadows(ep, quant, matching=m)
    assert not skipped
    with torch.no_grad():
        assert torch.equal(shadowed(x), quant(x))  # shadows read copies where ops write in place
    report = fxn.compare(ep, quant, [x])
    add = report.row("layer1.0.add")
    assert add.shadow_sqnr == math.inf  # add_ has no output quantize of its own under XNNPACK
    assert 25 < report.row("layer1.0.conv1").shadow_sqnr < 60
    eager = fxn.compare_model_outputs(float_gm, copy.deepcopy(quant), x)
    assert "layer1.0.conv1.stats" in eager
    assert eager["fc.stats"]["quantized"][0].shape == (1, 1000)
    # module_swap_list selects by the module class each op came from (nn_module_stack)
    stubs = fxn.compare_model_stub(float_gm, copy.deepcopy(quant),
                                   [torch.nn.Conv2d, torch.nn.Linear], x)
    assert len(stubs) == 21 and "layer4.1.conv2.stats" in stubs and "fc.stats" in stubs
    entry = stubs["layer1.0.conv1.stats"]
    assert 25 < fxn.sqnr(entry["float"][0], entry["quantized"][0]) < 60
    # the ExportedProgram itself, as compare takes it (an AttributeError before)
    by_program = fxn.compare_model_outputs(ep, copy.deepcopy(quant), x)
    assert list(by_program) == list(eager)
    assert torch.equal(by_program["fc.stats"]["float"][0], eager["fc.stats"]["float"][0])
    with pytest.raises(fxn.InputError, match="float_module is an ExportedProgram: the prepare_"):
        fxn.prepare_model_outputs(ep, copy.deepcopy(quant))


def test_aten_tables_normalise_decomposed_batch_norm_and_relu6():
    ep, _, quant = M.pt2e_pair("mobilenet_v2")
    m = fxn.match(ep, quant)
    kinds = Counter(p.kind for p in m.pairs)
    assert kinds["relu6"] == 35 and kinds["conv2d"] == 52  # hardtanh_(x, 0, 6) is a ReLU6
    # run_decompositions turns batch_norm into _native_batch_norm_legit_no_training + getitem:
    # the convs still pair with their BN folded, and the weights are still folded
    decomposed = ep.run_decompositions({})
    d = fxn.match(decomposed, quant)
    folded = [p for p in d.pairs if p.kind == "conv2d"]
    assert len(folded) == 52 and all(len(p.float_nodes) == 2 for p in folded)
    # the one miss: flatten decomposed to view on the float side only (compare programs at
    # the same IR level)
    assert [u.node for u in d.unmatched_quant] == ["flatten"]
    w, w_d = fxn.extract_weights(m), fxn.extract_weights(d)
    key = "features.1.conv.0.0.weight"
    torch.testing.assert_close(w[key]["float"], w_d[key]["float"])


def test_a_models_own_linear_plus_parameter_is_an_add_not_a_qat_scale():
    from fxnumeric.models import quantize_pt2e

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)
            self.pos = torch.nn.Parameter(torch.randn(8))

        def forward(self, x):
            return torch.relu(self.fc(x) + self.pos)

    float_gm, quant = quantize_pt2e(Net().eval(), [torch.randn(2, 8)])
    m = fxn.match(float_gm, quant)
    assert [(p.name, p.kind) for p in m.pairs] == [("x.quantize", "quantize"), ("fc", "linear"), ("add", "add"),
                                                   ("relu", "relu")]


def test_plain_float_module_pairs_with_a_pt2e_model():
    _, _, quant = M.pt2e_pair("resnet18")
    m = fxn.match(M.model("resnet18"), quant)  # float side traced by torch.fx
    assert (len(m.pairs), len(m.unmatched_float), len(m.unmatched_quant)) == (50, 0, 0)  # 49 ops and the input quantize
    weights = fxn.extract_weights(m)  # module weights BN-folded against graph constants
    assert 30 < fxn.sqnr(weights["layer1.0.conv1.weight"]["float"],
                         weights["layer1.0.conv1.weight"]["quantized"]) < 60


def test_transformer_block_pairs():
    ep, _, quant = M.pt2e_pair("transformer")
    m = fxn.match(ep, quant)
    assert (len(m.pairs), len(m.unmatched_float), len(m.unmatched_quant)) == (25, 0, 0)
    linears = [p.name for p in m.pairs if p.kind == "linear"]
    assert linears == ["q", "k", "v", "proj", "fc1", "fc2"]
    assert m.coverage == 1.0


def test_x86_quantizer_pairs_a_transformer_and_explains_resnet18():
    from fxnumeric.models import quantize_pt2e

    float_gm, quant = quantize_pt2e(M.model("transformer"), M.batches("transformer", 2),
                                    quantizer="x86")
    m = fxn.match(float_gm, quant)
    assert (len(m.pairs), len(m.unmatched_quant), m.coverage) == (24, 0, 1.0)
    # torchao 0.18's x86 quantizer cannot annotate resnet18's conv-add-relu partitions
    # the fix names the other quantizer only, as the CLI's --quant mode and by name
    with pytest.raises(fxn.InputError, match=r"x86 quantizer failed on ResNet.*Fix: try the "
                                             r"other quantizer: --quant pt2e \(quantizer="
                                             r"'xnnpack'\)$"):
        quantize_pt2e(M.model("resnet18"), M.batches("resnet18", 1), quantizer="x86")


def test_a_dynamic_pt2e_layer_alone_computes_its_own_qparams():
    # the hybrid with one dynamic layer quantized took choose_qparams' scale and zero point
    # from the float graph, i.e. the input tensor: "zero_point ... one element, received 64"
    import torch.nn.functional as F
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 8)).eval()
    data = [torch.randn(4, 16) for _ in range(2)]
    config = get_default_x86_inductor_quantization_config(is_dynamic=True)
    prepared = prepare_pt2e(torch.export.export(model, (data[0],)).module(),
                            X86InductorQuantizer().set_global(config))
    prepared(data[0])
    quant = convert_pt2e(prepared)
    s = fxn.sensitivity(model, quant, data, "sqnr", progress=False)
    ops = torch.ops.quantized_decomposed
    weight = ops.dequantize_per_channel(quant._frozen_param0, quant._scale_0,
                                        quant._zero_point_0, 0, -128, 127, torch.int8)
    refs, outs = [], []
    for x in data:  # the first Linear alone quantized, computed with torch's own ops
        scale, zero = ops.choose_qparams.tensor(x, 0, 255, 2 ** -12, torch.uint8)
        xq = ops.dequantize_per_tensor.tensor(
            ops.quantize_per_tensor.tensor(x, scale, zero, 0, 255, torch.uint8),
            scale, zero, 0, 255, torch.uint8)
        with torch.no_grad():
            outs.append(model[2](F.relu(F.linear(xq, weight, model[0].bias))))
            refs.append(model(x))
    first = next(layer for layer in s.layers if layer.name == "0")
    assert first.only == pytest.approx(fxn.sqnr(torch.cat(refs), torch.cat(outs)), abs=1e-3)


def test_dynamic_pt2e_pairs_choose_qparams_as_plumbing():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    data = M.batches("transformer", 2)
    ep = torch.export.export(M.model("transformer"), (data[0],))
    config = get_symmetric_quantization_config(is_dynamic=True, is_per_channel=True)
    prepared = prepare_pt2e(ep.module(), XNNPACKQuantizer().set_global(config))
    prepared(data[0])
    quant = convert_pt2e(prepared)
    m = fxn.match(ep, quant)
    assert (len(m.pairs), len(m.unmatched_quant), m.coverage) == (24, 0, 1.0)
    report = fxn.compare(ep, quant, data)
    assert all(40 < report.row(n).weight_sqnr < 60 for n in ("q", "k", "v", "fc1", "fc2"))


class _ThreeLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = (torch.nn.Linear(8, 16), torch.nn.Linear(16, 8),
                                        torch.nn.Linear(8, 4))

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(torch.relu(self.fc0(x)))))


class _Values(torch.fx.Interpreter):
    """Runs a GraphModule and keeps every node's value, by node name, over runs."""

    def __init__(self, gm, values):
        super().__init__(gm)
        self.values = values

    def run_node(self, n):
        out = super().run_node(n)
        self.values.setdefault(n.name, []).append(out)
        return out


def test_a_dynamic_layer_owns_the_quantize_of_its_input():
    # every Linear of a dynamic pt2e model quantizes its input per call (choose_qparams, then
    # quantize): its shadow reads the value before that rounding, as a quantize_dynamic
    # Linear's does. Fed the dequantized value, fc1 read 50.15 dB (its weights alone) against
    # 48.79, the gelu's rounding was in no row, and the first one had a row of its own
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    torch.manual_seed(0)
    model = _ThreeLinears().eval()
    data = [torch.randn(4, 8) for _ in range(3)]
    ep = torch.export.export(model, (data[0],))
    config = get_symmetric_quantization_config(is_dynamic=True, is_per_channel=False)
    prepared = prepare_pt2e(ep.module(), XNNPACKQuantizer().set_global(config))
    prepared(data[0])
    quant = convert_pt2e(prepared)
    report = fxn.compare(ep, quant, data, progress=False)
    assert [r.name for r in report.rows] == ["fc0", "relu", "fc1", "gelu", "fc2"]
    values: dict[str, list] = {}
    with torch.no_grad():
        for x in data:
            _Values(quant, values).run(x)
        linears = [n.name for n in quant.graph.nodes if n.target == torch.ops.aten.linear.default]
        reads = [data, values["relu"], values["gelu"]]  # what each Linear quantizes per call
        for name, node, read in zip(("fc0", "fc1", "fc2"), linears, reads, strict=True):
            layer = getattr(model, name)
            oracle = fxn.sqnr(torch.cat([layer(v) for v in read]), torch.cat(values[node]))
            assert report.row(name).shadow_sqnr == pytest.approx(oracle, abs=1e-4)


def test_cli_report_quant_pt2e(capsys):
    from fxnumeric.cli import main

    code = main(["report", "--model", "torchvision:resnet18", "--quant", "pt2e",
                 "--input-shape", "1,3,32,32", "--batches", "1", "--no-progress",
                 "--comparisons", "outputs"])
    out = capsys.readouterr().out
    assert code == 0 and "layer1.0.conv1" in out and "_guards_fn" not in out


def test_tiny_bert_encoder_pairs_with_constant_subgraphs_as_plumbing():
    transformers = pytest.importorskip("transformers")
    from fxnumeric.models import quantize_pt2e

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            config = transformers.BertConfig(
                vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=32)
            self.bert = transformers.BertModel(config).eval()

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    gen = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 100, (2, 16), generator=gen) for _ in range(2)]
    float_gm, quant = quantize_pt2e(Encoder().eval(), data)
    m = fxn.match(float_gm, quant)
    # position ids and the default mask (arange, ones, ...) are computed from constants:
    # convert_pt2e folds them, so they are not layers on either side
    assert not m.unmatched_quant and m.coverage == 1.0
    # the pooler is dead code (only last_hidden_state is returned); the quantized graph
    # dropped it, and each float node says so or points at the dead chain
    assert [u.node for u in m.unmatched_float] == ["select", "linear_12", "tanh"]
    assert "never used" in m.unmatched_float[-1].reason
    assert sum(p.kind == "linear" for p in m.pairs) == 12  # q, k, v, out, up, down x 2 layers
    report = fxn.compare(float_gm, quant, data)
    assert report.model_output["sqnr"] > 25


class _Reader(torch.fx.Interpreter):
    """Runs a graph and keeps a copy of the values of the nodes asked for (read another way)."""

    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.wanted, self.values = set(nodes), {}

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.wanted:
            self.values[n] = value.detach().clone()
        return value


def test_a_module_called_twice_is_two_rows_each_read_at_its_call_site(resnet18):
    ep, _, quant = resnet18
    data = M.batches("resnet18", 2, seed=5)
    m = fxn.match(ep, quant)
    report = fxn.compare(ep, quant, data, matching=m)
    assert len(report.rows) == len(m.pairs) == 50  # one row per call site, none blended
    first, second = m.pair("layer1.0.relu"), m.pair("layer1.0.relu#2")
    nodes = {p: m.output_nodes(p) for p in (first, second)}
    signal = {p: 0.0 for p in nodes}
    noise = {p: 0.0 for p in nodes}
    for x in data:
        f_read = _Reader(m.float_graph, [f for f, _ in nodes.values()])
        q_read = _Reader(m.quant_graph, [q for _, q in nodes.values()])
        with torch.no_grad():
            f_read.run(x)
            q_read.run(x)
        for p, (f, q) in nodes.items():
            ref, actual = f_read.values[f].double(), q_read.values[q].double()
            signal[p] += float(ref.square().sum())
            noise[p] += float((ref - actual).square().sum())
    for p in nodes:
        direct = 10 * math.log10(signal[p] / noise[p])
        assert abs(report.row(p.name).output_sqnr - direct) < 1e-3, p.name
    assert report.row("layer1.0.relu").output_sqnr != report.row("layer1.0.relu#2").output_sqnr


class _Cat(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class _Inception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(8, 4, 1)
        self.pool = torch.nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(self.pool(x))], 1)


class _Inceptions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.Sequential(_Inception(), _Inception())

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_a_cat_read_in_float_and_through_a_quantize_hands_on_the_quantized_value():
    # XNNPACK leaves a max_pool2d reading googlenet's Inception cat as it is, while the convs
    # of the next block read a quantize/dequantize of it. The cat's row is read after that
    # quantize: before it, its rounding was in no row (the cat's shadow read inf, its block
    # left at 39.31 dB where the next block's conv reads 38.62)
    from fxnumeric.models import quantize_pt2e

    torch.manual_seed(0)
    model = _Inceptions().eval()
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    float_gm, quant = quantize_pt2e(model, data, quantizer="xnnpack")
    report = fxn.compare(float_gm, quant, data, progress=False)
    # the oracle: the quantized graph's first cat and the dequantize its conv reader reads (an
    # fx Interpreter), against the float block's output
    cat = next(n for n in quant.graph.nodes if n.target is torch.ops.aten.cat.default)
    (quantize,) = [u for u in cat.users if u.target is not torch.ops.aten.max_pool2d.default]
    (read,) = quantize.users
    sums = {"output": [0.0, 0.0], "shadow": [0.0, 0.0]}
    for x in data:
        values = _Reader(quant, [cat, read])
        with torch.no_grad():
            values.run(x)
            float_cat = model.blocks[0](model.stem(x))
        for key, ref in (("output", float_cat), ("shadow", values.values[cat])):
            sums[key][0] += float(ref.double().square().sum())
            sums[key][1] += float((ref.double() - values.values[read].double()).square().sum())
    direct = {key: 10 * math.log10(signal / noise) for key, (signal, noise) in sums.items()}
    row = report.row("blocks.0.cat")
    assert row.output_sqnr == pytest.approx(direct["output"], abs=1e-3)
    assert row.shadow["sqnr"] == pytest.approx(direct["shadow"], abs=1e-3)
    blocks = {b.name: b for b in report.blocks}
    assert blocks["blocks.0"].output_sqnr == pytest.approx(direct["output"], abs=1e-3)
    assert blocks["blocks.1"].entering == pytest.approx(direct["output"], abs=1e-3)


def test_a_graph_constant_computed_from_a_list_of_nodes():
    # torch.cat takes a list of nodes; fx keeps it as an immutable_list, which ATen refuses
    from torch import fx

    from fxnumeric.semantics import evaluate_constant
    from fxnumeric.view import GraphView

    root = torch.nn.Module()
    root.p, root.q = torch.randn(2, 3), torch.randn(1, 3)
    graph = fx.Graph()
    x = graph.placeholder("x")
    p, q = graph.get_attr("p"), graph.get_attr("q")
    cat = graph.call_function(torch.ops.aten.cat.default, ([p, q], 0))
    mixed = graph.call_function(torch.ops.aten.cat.default, ([p, x], 0))
    graph.output((cat, mixed))
    view = GraphView(fx.GraphModule(root, graph))
    torch.testing.assert_close(evaluate_constant(cat, view), torch.cat([root.p, root.q]))
    assert evaluate_constant(mixed, view) is None  # depends on the input


def test_pt2e_model_with_a_cat_compares_with_every_floor():
    from fxnumeric.models import quantize_pt2e

    torch.manual_seed(0)
    data = [torch.randn(1, 3, 8, 8) for _ in range(2)]
    float_gm, quant = quantize_pt2e(_Cat().eval(), data, quantizer="xnnpack")
    report = fxn.compare(float_gm, quant, data, progress=False)
    rows = {r.name: r for r in report.rows}
    assert {"a", "b", "cat", "c"} <= set(rows)
    for name in ("a", "b", "cat", "c"):
        assert rows[name].floor_sqnr is not None and 20 < rows[name].floor_sqnr < 80, name
        assert 20 < rows[name].shadow["sqnr"] < 80, name


def test_a_graph_constant_reads_each_node_once_however_deep(monkeypatch):
    # evaluated recursively, every add of two branches doubled the work (a pt2e
    # mobilenet_v3's compare took 4 minutes) and a long chain overflowed Python's stack
    from torch import fx

    from fxnumeric import semantics
    from fxnumeric.view import GraphView

    reads = []
    fetch = semantics.fetch_attr
    monkeypatch.setattr(semantics, "fetch_attr", lambda gm, target: reads.append(target)
                        or fetch(gm, target))
    root = torch.nn.Module()
    root.c = torch.tensor([1.0], dtype=torch.float64)
    graph = fx.Graph()
    value = graph.get_attr("c")
    for _ in range(16):  # 16 diamonds: 2**16 reads of `c` when walked path by path
        value = graph.call_function(torch.add, (graph.call_function(torch.mul, (value, 2.0)),
                                                graph.call_function(torch.mul, (value, 3.0))))
    for _ in range(3000):  # deeper than Python's recursion limit
        value = graph.call_function(torch.add, (value, 1.0))
    graph.output(value)
    view = GraphView(fx.GraphModule(root, graph))
    assert semantics.evaluate_constant(value, view).item() == 5.0 ** 16 + 3000
    assert reads == ["c"]


class _SampleDropResidual(torch.nn.Module):
    """EfficientNet's residual: torchvision's StochasticDepth (the identity in eval mode,
    which torch.export leaves out of its graph) before an in-place add."""

    def __init__(self):
        super().__init__()
        import torchvision

        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.drop = torchvision.ops.StochasticDepth(0.2, "row")
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.drop(self.bn(self.conv(x)))
        y += x
        return self.head(y)


def test_stochastic_depth_is_plumbing_so_pt2e_residual_adds_pair():
    # before: efficientnet_b0 under X86InductorQuantizer left its 9 residual adds unpaired
    # (the float graph kept stochastic_depth, pt2e's had none) and advise left out the layers
    # after them
    from fxnumeric.models import quantize_pt2e

    torch.manual_seed(0)
    float_model = _SampleDropResidual().eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 8, 16, 16, generator=gen) for _ in range(2)]
    _, quant = quantize_pt2e(float_model, data, quantizer="x86")
    m = fxn.match(float_model, quant)
    assert m.coverage == 1.0 and not m.unmatched_float and not m.unmatched_quant
    assert [p.kind for p in m.pairs if p.quantized] == ["conv2d", "add", "conv2d"]
    report = fxn.compare(float_model, quant, data[:1], progress=False)
    # oracle: the float sum computed directly, and the value pt2e's head conv reads
    head = next(n for n in quant.graph.nodes if n.name == "conv2d_1")
    read: dict = {}

    class Reader(torch.fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n is head.args[0]:
                read["quantized"] = value
            return value

    with torch.no_grad():
        Reader(quant).run(data[0])
        expected = float_model.bn(float_model.conv(data[0])) + data[0]
    assert report.row("add").output_sqnr == pytest.approx(
        fxn.sqnr(expected, read["quantized"]), abs=1e-4)
    hybrids = fxn.sensitivity(float_model, quant, data, progress=False)
    assert {layer.name for layer in hybrids.layers} >= {"conv", "add", "head"}


def test_stochastic_depth_in_training_mode_is_refused():
    float_model = _SampleDropResidual().eval()
    float_model.drop.train()
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {torch.nn.Conv2d})
    with pytest.raises(fxn.InputError, match=r"training mode: `drop` \(StochasticDepth\)"):
        fxn.compare(float_model, quant, [torch.randn(1, 8, 4, 4)], progress=False)


class _ChannelShuffle(torch.nn.Module):
    """ShuffleNet's channel shuffle: a view whose sizes come from ``x.size()``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        batch, channels, height, width = x.size()
        x = x.view(batch, 2, channels // 2, height, width).transpose(1, 2).contiguous()
        return self.head(x.view(batch, -1, height, width))


def test_shape_arithmetic_is_plumbing_on_every_capture():
    """``x.size()``, its items and ``channels // 2`` compute shapes, not values: under FX
    they were rows without values (shufflenet_v2: 96 of its rows), against a pt2e model
    (whose shapes are constants) unpaired float nodes (96). They are plumbing: no row, nothing
    unpaired, and a shadow that reads them computes them again from the tensor they measure.
    Oracle: the head conv's output SQNR from forward hooks on both models."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from fxnumeric.models import quantize_pt2e

    torch.manual_seed(0)
    model = _ChannelShuffle().eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(2)]
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (data[0],))
    for x in data:
        prepared(x)
    fx_quant = convert_fx(prepared)
    _, pt2e_quant = quantize_pt2e(model, data, quantizer="x86")
    for quant in (fx_quant, pt2e_quant):
        m = fxn.match(model, quant)
        assert not m.unmatched_float and not m.unmatched_quant
        kinds = {p.kind for p in m.pairs}
        assert not kinds & {"size", "getitem", "floordiv"}, kinds
        report = fxn.compare(model, quant, data, progress=False)
        assert report.row("head").shadow_sqnr is not None
        assert all(not r.note.startswith("no shadow") for r in report.rows)
    outputs = {}
    for side, module in (("float", model.head), ("quant", fx_quant.head)):
        module.register_forward_hook(
            lambda m, args, out, side=side: outputs.setdefault(side, []).append(out) and None)
    with torch.no_grad():
        for x in data:
            model(x), fx_quant(x)
    ref = torch.cat([o.reshape(-1) for o in outputs["float"]])
    actual = torch.cat([o.dequantize().reshape(-1) for o in outputs["quant"]])
    report = fxn.compare(model, fx_quant, data, progress=False)
    assert report.row("head").output_sqnr == pytest.approx(fxn.sqnr(ref, actual), abs=1e-4)


def _pad_sizes(size: tuple, window: list) -> tuple:
    """Video Swin's ``_compute_pad_size_3d`` and ``_get_window_and_shift_size`` in one: a
    function of shapes kept whole by torch.fx, which writes into its list argument."""
    for i, s in enumerate(size):
        window[i] = min(window[i], s)
    return tuple((k - s % k) % k for s, k in zip(size, window, strict=True))


torch.fx.wrap("_pad_sizes")


class _PadsFromShapes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        pad_rows, _ = _pad_sizes((x.size(0), x.size(1)), [4, 4])
        positions = torch.arange(x.size(1), dtype=x.dtype)  # an op fed shapes only
        y = torch.nn.functional.pad(self.fc(x + positions), (0, 0, 0, pad_rows))
        return self.head(y)


def test_functions_of_shapes_are_plumbing_and_ops_fed_shapes_are_shadowed():
    """A function of shapes (video Swin's pad sizes) was a row without values, and its
    shadow read the shape it was fed as a tensor (compare: "'int' object has no attribute
    'size'", blamed on the input); the hybrids ran it on torch.fx's immutable list
    (sensitivity: "'immutable_list' object does not support mutation"). Oracle: the model
    run by hand with only ``head`` float."""
    import torchao.quantization as tq

    torch.manual_seed(0)
    model = _PadsFromShapes().eval()
    quant = copy.deepcopy(model)
    tq.quantize_(quant, tq.Int8DynamicActivationInt8WeightConfig())
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(6, 8, generator=gen) for _ in range(3)]
    report = fxn.compare(model, quant, data, progress=False)
    assert [r.name for r in report.rows] == ["arange", "add", "fc", "pad", "head"]
    assert report.row("arange").shadow_sqnr == math.inf  # fed the same shapes: no error
    hybrid = copy.deepcopy(quant)
    hybrid.head = copy.deepcopy(model.head)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in data])
        by_hand = torch.cat([hybrid(x) for x in data])
    s = fxn.sensitivity(model, quant, data, progress=False)
    assert s.layer("head").all_but == pytest.approx(fxn.sqnr(ref, by_hand), rel=1e-9)


def test_a_qat_model_not_moved_to_eval_is_refused_and_left_as_it_was():
    # its BatchNorms (aten.batch_norm, training=True) normalised with batch statistics, and
    # compare changed their running mean and variance (a write that moves no version
    # counter, so nothing put them back), while prepare_qat_fx's in training mode is refused
    float_model, data, qat, _ = M.qat_residual_cnn(to_eval=False)
    before = _state(qat)
    for call in (lambda: fxn.compare(float_model, qat, data, progress=False),
                 lambda: fxn.sensitivity(float_model, qat, data, "sqnr", progress=False)):
        with pytest.raises(fxn.InputError, match=r"(?s)quantized graph runs `batch_norm.*"
                                                 r"move_exported_model_to_eval"):
            call()
    _assert_state(qat, before)


class _Hybrid(torch.fx.Interpreter):
    """Runs a graph with the nodes of ``replaced`` computed by their functions instead."""

    def __init__(self, gm, replaced):
        super().__init__(gm)
        self.replaced = replaced

    def run_node(self, n):
        if n in self.replaced:
            return self.replaced[n](*self.fetch_args_kwargs_from_env(n)[0])
        return super().run_node(n)


def _end_sqnr(float_model, outputs, data):
    """Output SQNR (pooled over ``data``) of ``outputs(x)`` against the float model."""
    signal = noise = 0.0
    with torch.no_grad():
        for x in data:
            ref, got = float_model(x).double(), outputs(x).double()
            signal += float((ref ** 2).sum())
            noise += float(((ref - got) ** 2).sum())
    return 10 * math.log10(signal / noise)


def test_a_qat_conv_kept_float_keeps_the_quantize_its_residual_add_asked_for():
    # prepare_qat_pt2e's conv-bn rewrite replaced the batch_norm node the residual add's
    # annotation names (keys `relu`, `batch_norm_3`), and the annotation of the BatchNorm
    # that asked for the conv-bn's output is gone with the BatchNorm convert_pt2e folded:
    # matched by name, "all but conv2" dropped the quantize the add asked for (28.637 dB, the
    # hybrid below without it) and advise kept conv2 float for that number
    import torch.nn.functional as F

    float_model, data, _, quant = M.qat_residual_cnn()
    conv2 = [n for n in quant.graph.nodes if n.target is torch.ops.aten.conv2d.default][1]
    (out_quantize,) = conv2.users
    float_conv2 = {conv2: lambda x, *_: float_model.bn2(float_model.conv2(x))}
    all_but = _end_sqnr(float_model, _Hybrid(quant, float_conv2).run, data)
    # only conv2 quantized: its input and output quantized with the converted model's qparams
    in_quantize = conv2.args[0].args[0]
    weight = conv2.args[1]
    w = torch.ops.quantized_decomposed.dequantize_per_tensor(
        getattr(quant, weight.args[0].target), *weight.args[1:])
    bias = quant.get_parameter(conv2.args[2].target)

    def fake_quant(t, scale, zero_point, low, high, _dtype):
        return (torch.clamp(torch.round(t / scale) + zero_point, low, high) - zero_point) * scale

    def only_conv2(x):
        f = float_model
        y = f.relu1(f.bn1(f.conv1(x)))
        h = F.conv2d(fake_quant(y, *in_quantize.args[1:]), w, bias, *conv2.args[3:])
        y = f.relu2(y + fake_quant(h, *out_quantize.args[1:]))
        return f.fc2(f.relu3(f.fc1(y.mean((2, 3)))))

    only = _end_sqnr(float_model, only_conv2, data)
    layer = fxn.sensitivity(float_model, quant, data, "sqnr", progress=False).layer("conv2")
    assert layer.all_but == pytest.approx(all_but, abs=1e-6)  # 28.345 dB
    assert layer.only == pytest.approx(only, abs=1e-6)  # 26.197 dB
    advice = fxn.advise(float_model, quant, data, metric="sqnr", target=26, progress=False)
    assert advice.keep_float == ("conv2",) and advice.curve[-1] == pytest.approx(all_but, abs=1e-6)


def test_a_qat_prepared_models_batch_norms_are_two_layers_named_by_their_modules():
    # move_exported_model_to_eval puts each BatchNorm in torchao's root WrapperModule: they
    # were `batch_norm` (bn1, float) and `batch_norm#2` (bn2, quantized), call sites of one
    # layer labelled bn1, and "all but bn1" swapped both (29.77 dB, the two-BatchNorm hybrid)
    float_model, data, qat, _ = M.qat_residual_cnn()
    matching = fxn.match(float_model, qat)
    names = {p.name for p in matching.pairs}
    assert {"bn1", "bn2"} <= names and not any("batch_norm" in n for n in names)
    frozen = copy.deepcopy(qat)
    for module in frozen.modules():
        if hasattr(module, "observer_enabled"):
            module.disable_observer()
    (bn2,) = [n for n in frozen.graph.nodes if n.target is torch.ops.aten.batch_norm.default
              and n.args[1].target == "bn2.weight"]
    (fake_quant,) = bn2.users
    float_bn2 = {bn2: lambda x, *_: float_model.bn2(x), fake_quant: lambda x: x}
    oracle = _end_sqnr(float_model, _Hybrid(frozen, float_bn2).run, data)
    layers = fxn.sensitivity(float_model, qat, data, "sqnr", progress=False)
    assert "bn1" not in {layer.name for layer in layers.layers}  # it hands on no quantized value
    assert layers.layer("bn2").module == "bn2"
    assert layers.layer("bn2").all_but == pytest.approx(oracle, abs=1e-6)  # 28.726 dB


def _small_pt2e_cnn():
    """A plain float ``Sequential(Conv2d, ReLU, Flatten, Linear)``, its exported program, its
    XNNPACK pt2e model, and a batch."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 6 * 6, 5)).eval()
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    ep = torch.export.export(copy.deepcopy(f), (data[0],))
    prepared = prepare_pt2e(ep.module(), XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config()))
    for x in data:
        prepared(x)
    return f, ep, convert_pt2e(prepared), data[0]


def _pt2e_values(quant, x):
    """Every node's value in ``quant`` run on ``x``, and the input of each conv2d / linear
    (an fx Interpreter: the oracle for what the quantized graph computes)."""
    values, inputs = {}, {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
                inputs[n.name] = self.env[n.args[0]]
            values[n.name] = super().run_node(n)
            return values[n.name]

    with torch.no_grad():
        Recorder(quant).run(x)
    return values, inputs


def test_compare_model_stub_on_pt2e_finds_the_float_module_of_the_plain_nn_module():
    """The float model as the plain nn.Module (traced by torch.fx: its layers are call_module
    nodes, no nn_module_stack) shadows the same ops as its exported program: before, the
    plain module's Conv2d and Linear went unrecognised and the call returned {}. Oracle: the
    float module called by hand on the input the quantized graph hands the op (an fx
    Interpreter), and the same call with ep.module() as the float model."""
    f, ep, quant, x = _small_pt2e_cnn()
    values, inputs = _pt2e_values(quant, x)
    swap = [torch.nn.Conv2d, torch.nn.Linear]
    plain = fxn.compare_model_stub(f, quant, swap, x)
    exported = fxn.compare_model_stub(ep.module(), quant, swap, x)
    assert list(plain) == list(exported) == ["0.stats", "3.stats"]
    with torch.no_grad():
        for key, module, node, out in [("0.stats", f[0], "conv2d", "conv2d"),
                                       ("3.stats", f[3], "linear", "dequantize_per_tensor_default_5")]:
            entry = plain[key]
            # the float shadow: the float layer on the quantized graph's (dequantized) input
            assert torch.equal(entry["float"][0], module(inputs[node])), key
            assert torch.equal(entry["quantized"][0], values[out]), key
            assert torch.equal(entry["float"][0], exported[key]["float"][0]), key
            assert torch.equal(entry["quantized"][0], exported[key]["quantized"][0]), key
    # the in-place call selects alike
    prepared = copy.deepcopy(quant)
    fxn.prepare_model_with_stubs(f, prepared, swap, fxn.ShadowLogger)
    with torch.no_grad():
        prepared(x)
    logged = fxn.get_logger_dict(prepared)
    assert list(logged) == ["0.stats", "3.stats"]
    assert torch.equal(logged["3.stats"]["float"][0], plain["3.stats"]["float"][0])
    # one type selects its layer only
    assert list(fxn.compare_model_stub(f, quant, [torch.nn.Linear], x)) == ["3.stats"]


def test_an_allow_list_selects_pt2e_ops_by_the_module_class_they_came_from():
    """compare_model_outputs with an allow list you pass logs, of a pt2e model, the ops whose
    module class is in it, with the float model plain or exported (before, every quantized op
    was logged whatever the list). The default list logs every quantized op, as before.
    Oracle: forward hooks on the float model's Linear, and the quantized graph's output."""
    f, ep, quant, x = _small_pt2e_cnn()
    seen = []
    hook = f[3].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        f(x)
    hook.remove()
    for float_model in (f, ep.module()):
        only_linear = fxn.compare_model_outputs(float_model, quant, x,
                                                allow_list={torch.nn.Linear})
        assert list(only_linear) == ["3.stats"]
        assert torch.equal(only_linear["3.stats"]["float"][0], seen[0])
        with torch.no_grad():
            assert torch.equal(only_linear["3.stats"]["quantized"][0], quant(x))
        assert list(fxn.compare_model_outputs(float_model, quant, x,
                                              allow_list={torch.nn.Conv2d})) == ["0.stats"]
        assert set(fxn.compare_model_outputs(float_model, quant, x)) == {
            "0.stats", "1.stats", "2.stats", "3.stats"}


def test_the_eager_api_refuses_a_pt2e_model_passed_as_the_float_model():
    """Oracle: compare's own guard, on the same pair."""
    f, _, quant, x = _small_pt2e_cnn()
    twice = r"the float model is quantized too: it computes \d+ quantized ops or quantize nodes"
    with pytest.raises(fxn.InputError, match=twice):
        fxn.compare(copy.deepcopy(quant), quant, [x])
    with pytest.raises(fxn.InputError, match=twice):
        fxn.compare_model_stub(copy.deepcopy(quant), quant, [torch.nn.Conv2d], x)
    with pytest.raises(fxn.InputError, match=twice):
        fxn.compare_model_outputs(copy.deepcopy(quant), quant, x)
    with pytest.raises(fxn.InputError, match=twice):
        fxn.compare_weights(copy.deepcopy(quant), quant)


class _Twice(torch.nn.Module):
    """x -> fc1 -> act -> fc2 -> act -> fc2 -> fc3: ``fc2`` and ``act`` called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act = torch.nn.Linear(16, 16), torch.nn.ReLU()
        self.fc2, self.fc3 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.fc2(self.act(self.fc2(self.act(self.fc1(x))))))


def _xnnpack(float_model, data, **config):
    """``(exported program, XNNPACK pt2e model)`` calibrated on ``data``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    ep = torch.export.export(copy.deepcopy(float_model), (data[0],))
    prepared = prepare_pt2e(ep.module(), XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(**config)))
    for x in data:
        prepared(x)
    return ep, convert_pt2e(prepared)


def _handed_on(graph_module, data):
    """Every node's value over ``data`` (an fx Interpreter), a node followed by its output
    quantize read as the dequantized value it hands on: ``{node name: values}``."""
    values: dict[str, list[torch.Tensor]] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                values.setdefault(n.name, []).append(out.detach().double())
            return out

    with torch.no_grad():
        for x in data:
            Recorder(graph_module).run(x)
    handed_on = {}
    for n in graph_module.graph.nodes:
        q = next((u for u in n.users if "quantize_per_tensor" in str(u.target)
                  and "dequantize" not in str(u.target)), None)
        dq = next(iter(q.users)) if q is not None else n
        if n.name in values:
            handed_on[n.name] = values[dq.name]
    return handed_on


def _sqnr_db(refs, actuals) -> float:
    ref, act = torch.cat([r.flatten() for r in refs]), torch.cat([a.flatten() for a in actuals])
    return float(10 * torch.log10(ref.square().sum() / (ref - act).square().sum()))


def test_diagnose_keeps_the_call_sites_of_a_module_called_twice_apart():
    """A module called twice has a row per call site in the report, and so in the diagnosis:
    each reads what its own call reads. Before, `fc2`'s two calls were pooled into one entry
    (38.8 dB cumulative, neither call's), `fc3` read that pool (true: `fc2#2`'s 37.6 dB) and
    `act` claimed to read `fc1` and `fc2`. Oracle: an fx Interpreter on the exported float
    graph and on the pt2e graph, each call's node (linear_1, linear_2) read apart."""
    torch.manual_seed(0)
    float_model = _Twice().eval()
    with torch.no_grad():
        float_model.fc2.weight.mul_(3)
    data = [torch.randn(8, 16) for _ in range(3)]
    ep, quant = _xnnpack(float_model, data)
    float_values, quant_values = _handed_on(ep.module(), data), _handed_on(quant, data)

    def oracle(node):
        return _sqnr_db(float_values[node], quant_values[node])

    diagnosis = fxn.diagnose(ep, quant, data, threshold_db=39.0, progress=False)
    report = fxn.compare(ep, quant, data, progress=False)
    assert [d.name for d in diagnosis.layers] == [r.name for r in report.rows] == [
        "x.quantize", "fc1", "act", "fc2", "act#2", "fc2#2", "fc3"]
    by_node = {"fc1": "linear", "act": "relu", "fc2": "linear_1", "act#2": "relu_1",
               "fc2#2": "linear_2", "fc3": "linear_3"}
    for name, node in by_node.items():
        assert diagnosis.layer(name).cumulative_sqnr == pytest.approx(oracle(node), abs=1e-6)
    fc2, fc2_again, fc3 = (diagnosis.layer(n) for n in ("fc2", "fc2#2", "fc3"))
    assert fc2.cumulative_sqnr - fc2_again.cumulative_sqnr > 3  # 41.18 and 37.61 dB
    assert fc3.inputs == ("fc2#2",)
    assert fc3.input_sqnr == pytest.approx(oracle("linear_2"), abs=1e-6)  # 37.61, not 38.84
    assert fc2_again.inputs == ("act#2",)
    assert fc2_again.input_sqnr == pytest.approx(oracle("relu_1"), abs=1e-6)
    assert diagnosis.layer("act").inputs == ("fc1",)
    assert diagnosis.layer("act#2").inputs == ("fc2",)
    # one module, two entries: the module path and its weight figures shared, the call
    # site named as the report's row
    assert [d.call_site for d in diagnosis.call_sites("fc2")] == ["fc2", "fc2#2"]
    assert fc2_again.module == "fc2" and fc2_again.per_channel == fc2.per_channel
    # the first call below 39 dB is the second call of fc2, and the report's row says so
    assert diagnosis.first_below == "fc2#2"
    assert [f.code for f in fc2_again.flags] == ["amplification"] and not fc2.flags
    assert "`fc2#2` is the first op" in fc2_again.flags[0].text
    flags = {r.name: r.flags for r in fxn.advice.annotate(report, diagnosis).rows}
    assert flags == {d.name: tuple(f.code for f in d.flags) for d in diagnosis.layers}
    assert flags["fc2#2"] == ("amplification",)


def test_diagnosis_layer_takes_a_call_site_by_pair_name_or_module_path():
    """A region called twice names its call sites by its quantized path; the module path with
    the call site's number finds them too, the bare module path the first call."""
    from fxnumeric.advice.diagnose import Diagnosis, LayerDiagnosis

    layers = tuple(LayerDiagnosis(name=n, module="block.relu", kind="relu")
                   for n in ("q.relu", "q.relu#2"))
    diagnosis = Diagnosis(layers, 20.0, None, 1)
    assert [d.call_site for d in layers] == ["block.relu", "block.relu#2"]
    assert diagnosis.layer("q.relu#2") is diagnosis.layer("block.relu#2") is layers[1]
    assert diagnosis.layer("block.relu") is layers[0]
    assert diagnosis.call_sites("block.relu") == list(layers)


def _weight_dequantize(quant, linear: str):
    """The ``dequantize`` node feeding the weight of the pt2e graph's node ``linear``."""
    node = next(n for n in quant.graph.nodes if n.name == linear).args[1]
    assert "dequantize" in str(node.target)
    return node


@pytest.mark.parametrize("per_channel", [False, True])
def test_diagnose_reads_the_weight_grid_of_a_pt2e_graph_from_its_dequantize(per_channel):
    """The docs' outlier example (one output channel 30x wider than the rest) quantized by
    pt2e: its weight arrives dequantized, so before, per_channel and the utilisation were
    None and no weight flag fired (FX flags it). Oracle: the scales and integer range of the
    graph's own ``dequantize_per_tensor`` / ``dequantize_per_channel`` of that weight, and the
    float weight's channel ranges, computed by hand."""
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                            torch.nn.ReLU(), torch.nn.Linear(64, 10)).eval()
    with torch.no_grad():
        f[2].weight[7] *= 30
    data = [torch.randn(32, 16) for _ in range(2)]
    ep, quant = _xnnpack(f, data, is_per_channel=per_channel)
    dq = _weight_dequantize(quant, "linear_1")
    args = [getattr(quant, str(a.target)) if isinstance(a, torch.fx.Node) else a
            for a in dq.args[1:]]
    scales, (qmin, qmax) = torch.as_tensor(args[0]).double(), args[-3:-1]
    assert (qmin, qmax) == (-127, 127)
    w = f[2].weight.detach().double()
    ranges = w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)
    layer = fxn.diagnose(ep, quant, data, progress=False).layer("2")
    assert layer.per_channel is per_channel
    assert layer.channel_outlier_ratio == pytest.approx(float(ranges.max() / ranges.median()))
    utilisation = float((ranges / (scales * (qmax - qmin))).median())
    assert layer.weight_utilisation == pytest.approx(utilisation, rel=1e-9)
    codes = [flag.code for flag in layer.flags]
    if per_channel:  # each channel its own scale: nothing to fix in the weights
        assert utilisation > 0.9 and "weight_outliers" not in codes
    else:  # 0.0326, as FX's per-tensor model reads
        assert utilisation < 0.05 and "weight_outliers" in codes


class _TwoLinears(torch.nn.Module):
    """Two functional linears in one module: pt2e names them `two.linear`, `two.linear#2`."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(32, 16) * 0.1)
        w2 = torch.randn(32, 16) * 0.1
        w2[0] *= 50  # one outlier row
        self.w2 = torch.nn.Parameter(w2)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w1) + torch.nn.functional.linear(x, self.w2)


def test_diagnose_gives_each_functional_op_of_a_module_its_own_weight_figures():
    """`two.linear#2` is another op of `two`, not a second call of `two.linear`: diagnose
    keyed the weight figures by the name without `#2`, so both ops got the worse weight's
    (utilisation 0.0221, outlier ratio 39.1) and `two.linear` was flagged weight_outliers.
    Oracle: each weight's channel ranges against the XNNPACK per-tensor grid (max|w|/127 over
    254 levels), by hand."""
    torch.manual_seed(0)
    f = torch.nn.Sequential(_TwoLinears()).eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    _, quant = _xnnpack(f, data, is_per_channel=False)
    d = fxn.diagnose(f, quant, data, progress=False)
    for name, w in (("0.linear", f[0].w1), ("0.linear#2", f[0].w2)):
        w = w.detach().double()
        ranges = w.amax(1) - w.amin(1)
        layer = d.layer(name)
        assert layer.weight_utilisation == pytest.approx(
            float((ranges / (w.abs().max() / 127 * 254)).median()), rel=1e-6), name
        assert layer.channel_outlier_ratio == pytest.approx(
            float(ranges.max() / ranges.median()), rel=1e-9), name
    assert "weight_outliers" not in [flag.code for flag in d.layer("0.linear").flags]
    assert "weight_outliers" in [flag.code for flag in d.layer("0.linear#2").flags]


def test_diagnose_measures_clipping_and_noise_at_a_pt2e_input_quantize():
    """An MLP calibrated on 0.2 * randn and diagnosed on randn: half the inputs fall outside
    the input quantize's grid. pt2e's ``quantize_per_tensor`` hands on no quantized tensor,
    so before, its clipping and noise were None (FX measured them) and only the amplification
    flag fired. Oracle: the grid from that node's arguments, and the dequantized value it
    hands on from an fx Interpreter."""
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 8)).eval()
    calibration = [0.2 * torch.randn(8, 16) for _ in range(3)]
    data = [torch.randn(8, 16) for _ in range(3)]
    ep, quant = _xnnpack(f, calibration)
    node = next(n for n in quant.graph.nodes  # the input's (the weights' are folded)
                if str(n.target) == "quantized_decomposed.quantize_per_tensor.default")
    scale, zero_point, qmin, qmax = node.args[1:5]
    x = torch.cat(data).double()
    low, high = (qmin - zero_point - 0.5) * scale, (qmax - zero_point + 0.5) * scale
    clipped = float(((x < low) | (x > high)).double().mean())
    handed_on = torch.cat(_handed_on(quant, data)[node.args[0].name])  # the model input
    noise_steps = float((handed_on - x).square().mean().sqrt()) / scale
    entry = fxn.diagnose(ep, quant, data, progress=False).layers[0]
    assert entry.kind == "quantize"
    assert entry.clipped == pytest.approx(clipped) and clipped > 0.5
    assert entry.noise_steps == pytest.approx(noise_steps, rel=1e-6)
    assert {"clipping", "noise"} <= {flag.code for flag in entry.flags}


class _ConvLoop(torch.nn.Module):
    """A conv run three times in a loop: three call sites of one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _ in range(3):
            x = torch.relu(self.conv(x))
        return x


def test_a_call_whose_weight_convert_pt2e_left_float_says_so():
    """torchao's convert_pt2e quantizes the weight of a conv's first call in a loop only: its
    second and third calls read the float parameter. Their rows' weight SQNR of inf is true, but
    read unexplained like a perfect quantization. Oracle: the weight each conv node of the pt2e
    graph computes with (an fx Interpreter), compared with the float parameter."""
    torch.manual_seed(0)
    float_model = _ConvLoop().eval()
    data = [torch.randn(2, 3, 12, 12) for _ in range(2)]
    ep, quant = _xnnpack(float_model, data, is_per_channel=True)
    read: dict[str, torch.Tensor] = {}

    class Weights(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and "conv2d" in str(n.target):
                read[n.name] = self.env[n.args[1]]
            return out

    with torch.no_grad():
        Weights(quant).run(data[0])
    report = fxn.compare(ep, quant, data, progress=False)
    rows = {r.name: r for r in report.rows if r.kind == "conv2d"}
    for name, node in zip(rows, ("conv2d", "conv2d_1", "conv2d_2", "conv2d_3"), strict=True):
        param = float_model.stem.weight if name == "stem" else float_model.conv.weight
        left_float = torch.equal(read[node], param)
        assert left_float == (name in ("conv#2", "conv#3")), name  # torchao's, as read
        assert ("weight not quantized" in rows[name].note) == (name == "conv#2"), name
    assert rows["conv#2"].weight_sqnr == math.inf and rows["conv"].weight_sqnr < 60
    # the third call quantizes nothing (no activation quantize either): a float layer, which
    # shows no weight SQNR and needs no note
    assert not rows["conv#3"].quantized and rows["conv#3"].weight_sqnr is None


class _Indexing(torch.nn.Module):
    """``y[:, 0]``, ``y[0]`` and ``y[:, 1:]`` before Linears: torch.export writes them as
    ``aten.select.int(y, 1, 0)``, ``aten.select.int(y, 0, 0)`` and ``aten.slice.Tensor(y, 1,
    1, 9223372036854775807)``, torch.fx as three ``getitem``s."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = torch.nn.Linear(8, 8)
        self.fc = torch.nn.Linear(8, 4)
        self.fc_first = torch.nn.Linear(8, 4)
        self.fc_rest = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc0(x)
        return self.fc(y[:, 0]) + self.fc_first(y[0]) + self.fc_rest(y[:, 1:].mean(1))


def _indexing_pair():
    torch.manual_seed(0)
    float_model = _Indexing().eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 4, 8, generator=g) for _ in range(3)]
    _, quant = _xnnpack(float_model, data)
    return float_model, data, quant


def test_an_exported_select_and_slice_pair_with_the_float_getitems_they_index_alike():
    # `y[:, 0]` is getitem(y, (slice(None), 0)) in the float model traced by torch.fx and
    # aten.select.int(y, 1, 0) in the pt2e model: the two kinds never paired, both were listed
    # unpaired and fc's row noted that the error of the select "is in no row"
    float_model, data, quant = _indexing_pair()
    m = fxn.match(float_model, quant, data[0])
    assert not m.unmatched_float and not m.unmatched_quant
    indexing = {p.quant_nodes: (p.kind, p.float_nodes) for p in m.pairs
                if p.float_nodes[0].startswith("getitem")}
    assert indexing == {("select",): ("getitem", ("getitem",)),
                        ("select_1",): ("getitem", ("getitem_1",)),
                        ("slice_1",): ("getitem", ("getitem_2",))}
    # the select's row reads its value as the Linear after it reads it (its own quantize on
    # the way, XNNPACK's), and its shadow the error that quantize adds. Oracle: the float value
    # computed directly, the quantized ones read by an fx Interpreter
    handed_on = _handed_on(quant, data)
    with torch.no_grad():
        float_values = [float_model.fc0(x)[:, 0] for x in data]
    (select_node, *_) = quant.graph.find_nodes(op="call_function",
                                               target=torch.ops.aten.select.int)
    assert "quantize_per_tensor" in str(next(iter(select_node.users)).target)
    report = fxn.compare(float_model, quant, data, progress=False)
    (select,) = [p for p in m.pairs if p.quant_nodes == ("select",)]
    row = report.row(select.name)
    assert row.output_sqnr == pytest.approx(_sqnr_db(float_values, handed_on["select"]), abs=1e-4)
    fed = [v[:, 0] for v in handed_on["linear"]]  # fc0's dequantized output, indexed in float
    assert row.shadow_sqnr == pytest.approx(_sqnr_db(fed, handed_on["select"]), abs=1e-4)
    assert math.isfinite(row.shadow_sqnr) and not row.note


def test_sensitivity_measures_the_linear_reading_an_exported_select_alone():
    # before, "only fc quantized" was NaN: fc reads the output of `select`, "which the float
    # model does not compute" (it does: y[:, 0]). Oracle: the model quantized by XNNPACK with
    # fc alone annotated, calibrated on the same data, measured directly
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    float_model, data, quant = _indexing_pair()
    prepared = prepare_pt2e(
        torch.export.export(copy.deepcopy(float_model), (data[0],)).module(),
        XNNPACKQuantizer().set_module_name("fc", get_symmetric_quantization_config()))
    with torch.no_grad():
        for x in data:
            prepared(x)
    only_fc = convert_pt2e(prepared)
    with torch.no_grad():
        only = _sqnr_db([float_model(x) for x in data], [only_fc(x) for x in data])
    layer = fxn.sensitivity(float_model, quant, data, "sqnr", layers="fc",
                            progress=False).layer("fc")
    assert layer.only == pytest.approx(only, abs=1e-4)


@pytest.mark.parametrize("index", ["[:, 0]", "[0]", "[0, :]", "[:, -1]", "[:, 1:3]", "[:, 1:]",
                                   "[:, :2]", "[:, ::2]", "[:, -2:]", "[:, :-1]", "[1:]",
                                   "[:, :, 1:20]", ".select(1, 0)", ".select(0, 2)"])
def test_an_index_reads_the_same_traced_by_torch_fx_and_exported(index):
    # oracle: the node torch.export makes of the expression against torch.fx's
    from fxnumeric.ops import index_of

    class Index(torch.nn.Module):
        def forward(self, x):
            return eval("x" + index) * 2  # noqa: S307 (the expression under test)

    x = torch.randn(4, 5, 6)
    traced = [n for n in torch.fx.symbolic_trace(Index()).graph.nodes
              if n.op in ("call_function", "call_method") and n.target is not operator.mul]
    exported = [n for n in torch.export.export(Index(), (x,)).module().graph.nodes
                if n.op == "call_function" and n.target in (torch.ops.aten.select.int,
                                                            torch.ops.aten.slice.Tensor)]
    assert len(traced) == len(exported) == 1
    assert index_of(traced[0]) == index_of(exported[0]) != ()


def test_a_weight_left_float_is_explained_by_what_left_it_float():
    # the note blamed torchao's convert_pt2e looping on every weight left float: on an
    # XNNPACK ConvTranspose2d called once (its quantizer annotates no conv_transpose weight)
    # and on FX's quantized LayerNorm (torch's kernel takes a float weight). Oracle: the
    # weight each quantized op computes with, read from the quantized model
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    upsample = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3),
                                   torch.nn.ConvTranspose2d(8, 4, 2, stride=2)).eval()
    ep, quant = _xnnpack(upsample, data)
    (node,) = [n for n in quant.graph.nodes
               if n.target == torch.ops.aten.conv_transpose2d.input]
    assert node.args[1].op == "get_attr"  # read straight from the float parameter
    row = fxn.compare(ep, quant, data, progress=False).row("1")
    assert row.weight_sqnr == math.inf
    assert "(its quantizer left the weight float)" in row.note
    assert "convert_pt2e" not in row.note

    normed = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.LayerNorm([8, 6, 6]),
                                 torch.nn.Conv2d(8, 4, 1)).eval()
    prepared = prepare_fx(copy.deepcopy(normed), get_default_qconfig_mapping("x86"), (data[0],))
    for x in data:
        prepared(x)
    fx_quant = convert_fx(prepared)
    assert fx_quant.get_submodule("1").weight.dtype == torch.float32  # torch's kernel's
    row = fxn.compare(normed, fx_quant, data, progress=False).row("1")
    assert row.weight_sqnr == math.inf
    assert "(torch's quantized layer_norm takes its weight in float)" in row.note


class _Scaled(torch.nn.Module):
    """Two inputs and a non-tensor argument, which torch.export makes a constant of."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x, y, n):
        return self.b(self.a(x + y).relu()) * n


def _scaled_pair():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    torch.manual_seed(0)
    f = _Scaled().eval()
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen), 3)
            for _ in range(3)]
    ep = torch.export.export(copy.deepcopy(f), data[0])
    prepared = prepare_pt2e(ep.module(),
                            XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
    for batch in data:
        prepared(*batch)
    return f, convert_pt2e(prepared), data


def test_a_non_tensor_argument_made_constant_by_export_pairs_under_auto_as_under_export():
    f, q, data = _scaled_pair()
    with torch.no_grad():  # the oracle: the model outputs, read directly
        pairs = [(f(*b), q(*b)) for b in data]
    signal = sum(float((a.double() ** 2).sum()) for a, _ in pairs)
    noise = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in pairs)
    auto = fxn.compare(f, q, data)
    assert auto.model_output["sqnr"] == pytest.approx(10 * math.log10(signal / noise),
                                                      abs=1e-5)
    exported = fxn.compare(f, q, data, capture="export")
    assert [(r.name, r.output["sqnr"]) for r in auto.rows] == [
        (r.name, r.output["sqnr"]) for r in exported.rows]
    assert {"a", "b", "mul"} <= {r.name for r in auto.rows}
    assert any("computes with the value of `n` it was exported with" in note
               for note in auto.notes)
    # without example inputs nothing can be exported: the pairing says why, truthfully
    with pytest.raises(fxn.MatchError, match=r"the float model reads `n`, which the quantized "
                                             r"model takes but computes without: torch\.export "
                                             r"made a constant of it.*\nFix: pass example_inputs"):
        fxn.match(f, q)
