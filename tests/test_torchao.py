"""torchao ``quantize_``: modules keep their class, weights become torchao tensor subclasses."""

from __future__ import annotations

import copy
import math
import textwrap

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")


def two_projections(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """One traced op reading two modules' weights, as Swin's ``shifted_window_attention``."""
    return nn.functional.linear(torch.relu(nn.functional.linear(x, first)), second)


torch.fx.wrap("two_projections")

import fxnumeric as fxn  # noqa: E402
from fxnumeric.flows.torchao import is_torchao_tensor  # noqa: E402


class LlamaMLP(nn.Module):
    """A Llama-style stack: RMS-free pre-norm, SwiGLU MLP, residual."""

    def __init__(self, dim: int = 64, hidden: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.act = nn.SiLU()
        self.head = nn.Linear(dim, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        x = x + self.down(self.act(self.gate(h)) * self.up(h))
        return self.head(x)


def _configs():
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    return {
        "int8-weight-only": (Int8WeightOnlyConfig(), 40),
        "int8-dynamic": (Int8DynamicActivationInt8WeightConfig(), 35),
        # Int4WeightOnlyConfig has no CPU kernel here (plain/preshuffled need mslk, the tile
        # packed format CUDA); IntxWeightOnlyConfig(int4) is torchao's int4 weight-only on CPU
        "int4-weight-only": (IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                  granularity=PerGroup(32)), 15),
    }


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return LlamaMLP().eval()


def _data():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 8, 64, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("config", ["int8-weight-only", "int8-dynamic", "int4-weight-only"])
def test_quantize_pairs_counts_and_compares(float_model, config):
    from torchao.quantization import quantize_

    cfg, min_weight_sqnr = _configs()[config]
    quant = copy.deepcopy(float_model)
    quantize_(quant, cfg)
    m = fxn.match(float_model, quant)
    assert not m.unmatched_float and not m.unmatched_quant
    assert [p.name for p in m.pairs if p.quantized] == ["gate", "up", "down", "head"]
    assert m.coverage == 1.0
    weights = fxn.compare_weights(float_model.state_dict(), quant.state_dict())
    assert sorted(weights) == ["down.weight", "gate.weight", "head.weight", "norm.weight",
                               "up.weight"]
    assert not any(is_torchao_tensor(w["quantized"]) for w in weights.values())  # dequantized
    assert torch.equal(weights["norm.weight"]["float"], weights["norm.weight"]["quantized"])
    report = fxn.compare(float_model, quant, _data())
    for name in ("gate", "up", "down", "head"):
        row = report.row(name)
        assert row.weight_sqnr > min_weight_sqnr, (name, row.weight_sqnr)
        assert min_weight_sqnr - 15 < row.output_sqnr < 80
        assert row.shadow_sqnr > min_weight_sqnr - 15
    # weight-only: the shadow of a linear sees exactly the weight error on the same input
    if config != "int8-dynamic":
        gate = report.row("gate")
        assert gate.shadow_sqnr == pytest.approx(gate.output_sqnr, abs=1e-6)


def test_weight_subclass_is_dequantized_for_the_comparison(float_model):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quant = copy.deepcopy(float_model)
    quantize_(quant, Int8WeightOnlyConfig())
    with pytest.raises(NotImplementedError):
        float_model.gate.weight - quant.gate.weight  # what crashed compare() before
    pair = fxn.extract_weights(fxn.match(float_model, quant))["gate.weight"]
    torch.testing.assert_close(pair["quantized"], quant.gate.weight.dequantize())
    assert fxn.sqnr(pair["float"], pair["quantized"]) > 40


def test_loggers_and_shadows_on_quantize_(float_model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quant = copy.deepcopy(float_model)
    quantize_(quant, Int8DynamicActivationInt8WeightConfig())
    x = _data()[0]
    f_gm, q_gm = fxn.add_loggers(float_model, quant)
    shadowed, skipped = fxn.add_shadows(float_model, quant)
    with torch.no_grad():
        assert torch.equal(q_gm(x), quant(x)) and torch.equal(shadowed(x), quant(x))
        f_gm(x)
    assert not skipped and sorted(fxn.loggers_of(shadowed)) == sorted(fxn.loggers_of(q_gm))


def test_hugging_face_llama_under_quantize_counts_every_linear():
    """A model torch.fx cannot trace whole is paired through the module tree; its Linear
    leaves with torchao weights count as quantized there too."""
    transformers = pytest.importorskip("transformers")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    float_model = transformers.LlamaModel(config).eval()
    quant = copy.deepcopy(float_model)
    quantize_(quant, Int8WeightOnlyConfig())
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    m = fxn.match(float_model, quant, ids)
    linears = [p for p in m.pairs if p.kind == "linear"]
    assert len(linears) == 14 and all(p.quantized for p in linears)  # 7 per layer
    assert m.coverage == 1.0 and not m.unmatched_quant
    report = fxn.compare(float_model, quant, [ids])
    assert all(report.row(p.name).weight_sqnr > 40 for p in linears)


def test_compare_model_stub_shadows_torchao_linears():
    # torch's rule skips a module whose twin has the float's type; torchao keeps nn.Linear and
    # quantizes its weight, so that rule shadowed nothing and returned {}
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8WeightOnlyConfig())
    x = torch.randn(4, 16)
    stats = fxn.compare_model_stub(f, q, [nn.Linear], x)
    assert list(stats) == ["0.stats", "2.stats"]
    with torch.no_grad():
        hidden = q[1](q[0](x))  # what the quantized model feeds its second Linear
        expected = {"0.stats": (f[0](x), q[0](x)), "2.stats": (f[2](hidden), q[2](hidden))}
    for key, (float_out, quant_out) in expected.items():
        torch.testing.assert_close(stats[key]["float"][0], float_out)
        torch.testing.assert_close(stats[key]["quantized"][0], quant_out)
    # a Linear left float (same type, plain weight) is still not shadowed, as in torch's suite
    partly = copy.deepcopy(f)
    quantize_(partly, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn == "2")
    assert list(fxn.compare_model_stub(f, partly, [nn.Linear], x)) == ["2.stats"]


class FunctionalProjection(nn.Module):
    """A projection called functionally: ``F.linear(x, self.qkv.weight, self.qkv.bias)``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.linear(x, self.qkv.weight, self.qkv.bias)
        return self.out(torch.relu(h))


def test_a_functional_op_reading_a_torchao_weight_is_a_quantized_layer_named_by_its_module():
    """It crashed compare (``torch.equal`` on an ``Int8Tensor``, as torchvision's swin_t did
    on its ``shifted_window_attention``), and it was an unquantized row named ``linear`` with
    no weight SQNR, that advice could not name for ``quantize_``."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    torch.manual_seed(0)
    f = FunctionalProjection().eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    m = fxn.match(f, q)
    assert [(p.name, p.kind, p.quantized) for p in m.pairs] == [
        ("qkv", "linear", True), ("relu", "relu", False), ("out", "linear", True)]
    data = [(x,) for x in torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1))]
    report = fxn.compare(f, q, data)
    expected = fxn.sqnr(f.qkv.weight, q.qkv.weight.dequantize())  # the weight, read directly
    assert report.row("qkv").weight_sqnr == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():  # output of the functional op, read directly from both models
        ref = torch.cat([nn.functional.linear(x, f.qkv.weight, f.qkv.bias) for (x,) in data])
        act = torch.cat([nn.functional.linear(x, q.qkv.weight, q.qkv.bias) for (x,) in data])
    assert report.row("qkv").output_sqnr == pytest.approx(fxn.sqnr(ref, act), rel=1e-5)
    advice = fxn.advise(f, q, data, metric="sqnr", target=200.0)
    assert sorted(advice.keep_float) == ["out", "qkv"]
    mixed = fxn.advise(f, {"int8": q}, data, metric="sqnr", target=0.0)
    assert mixed.assignment == {"qkv": "int8", "out": "int8"}
    fqn = mixed.to_torchao({"int8": Int8DynamicActivationInt8WeightConfig()})
    assert set(fqn.fqn_to_config) == {"qkv", "out"}  # module paths quantize_ applies
    applied = copy.deepcopy(f)
    quantize_(applied, fqn, filter_fn=None)
    assert is_torchao_tensor(applied.qkv.weight) and is_torchao_tensor(applied.out.weight)
    # the verified value is the applied model's (the hybrid quantized the functional op too)
    assert fxn.compare(f, applied, data).model_output["sqnr"] == pytest.approx(mixed.value,
                                                                                abs=1e-6)
    weight_only = copy.deepcopy(f)
    quantize_(weight_only, Int8WeightOnlyConfig())
    assert fxn.match(f, weight_only).pair("qkv").quantized


class TwoWeightsInOneOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.Linear(32, 32, bias=False)
        self.out = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(two_projections(x, self.a.weight, self.b.weight))


def test_advice_over_variants_says_which_quantized_layers_it_cannot_choose_for():
    """A quantized op whose weights no one module holds stays float in every plan the search
    verifies: the advice lists it (it was left out silently)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    f = TwoWeightsInOneOp().eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8WeightOnlyConfig())
    m = fxn.match(f, q)
    assert [(p.name, p.quantized) for p in m.pairs] == [("two_projections", True),
                                                         ("out", True)]
    data = [(x,) for x in torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))]
    advice = fxn.advise(f, {"int8": q}, data, metric="sqnr", target=0.0)
    assert advice.assignment == {"out": "int8"}
    ((layer, reason),) = advice.unsearched
    assert layer == "two_projections" and "float in every plan" in reason
    assert "two_projections" in advice.message and "advice.unsearched" in advice.message
    hybrid = copy.deepcopy(f)  # what the search verified: two_projections float, out int8
    quantize_(hybrid, advice.to_torchao({"int8": Int8WeightOnlyConfig()}), filter_fn=None)
    assert not is_torchao_tensor(hybrid.a.weight) and is_torchao_tensor(hybrid.out.weight)
    assert fxn.compare(f, hybrid, data).model_output["sqnr"] == pytest.approx(advice.value,
                                                                               abs=1e-6)


class ActThenProjection(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.qkv = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.act(x), self.qkv.weight, self.qkv.bias)


def test_a_functional_op_reading_a_torchao_weight_pairs_by_its_node_name():
    """Its report name (the weight's module) is not what pairing matches by: with its input
    unpaired (a different activation upstream), the op still pairs by node name."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    f = ActThenProjection(nn.Sigmoid()).eval()
    q = ActThenProjection(nn.Tanh()).eval()
    q.load_state_dict(f.state_dict())
    quantize_(q, Int8WeightOnlyConfig())
    m = fxn.match(f, q)
    assert [(p.name, p.quantized, p.float_nodes) for p in m.pairs if p.quantized] == [
        ("qkv", True, ("linear",))]
    assert m.coverage == 1.0


def test_a_quantized_weight_holding_nan_is_reported_not_a_crash(float_model):
    """torchao's float8 weight-only dequantizes to NaN on this CPU: compare's weight
    histogram raised torch's ``bincount`` error. A NaN in one row's scale stands for it: the
    weight SQNR is NaN and the row says so, the histogram counts the finite values, and the
    outputs say where NaN first appears."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quant = copy.deepcopy(float_model)
    quantize_(quant, Int8WeightOnlyConfig())
    quant.down.weight.scale[3] = float("nan")  # output channel 3 of `down`: 128 values
    report = fxn.compare(float_model, quant, _data())
    down = report.row("down")
    assert math.isnan(down.weight_sqnr)
    assert "quantized weight holds NaN/Inf" in down.note
    hist = down.weight_histogram
    assert sum(hist.float_counts) == 64 * 128 and sum(hist.quant_counts) == 63 * 128
    finite = quant.down.weight.dequantize()[torch.arange(64) != 3]
    assert hist.low <= float(finite.min()) and float(finite.max()) <= hist.high
    assert math.isfinite(report.row("gate").weight_sqnr) and not report.row("gate").note
    assert report.nonfinite == (("quantized", "down"),)


def test_float8_weights_get_no_uniform_grid_floor(float_model):
    """A float8 weight is rounded to 3 mantissa bits, a step that grows with the value: no
    uniform grid of step ``scale``. Read as one, every layer's floor was 55 dB and every
    float8 layer "below floor: a wrong output or weight scale" at its normal 32 dB. Such a
    weight has no floor (unknown, not a guess); its SQNR is the direct computation's."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    quant = copy.deepcopy(float_model)
    quantize_(quant, Float8WeightOnlyConfig())
    report = fxn.compare(float_model, quant, _data())
    linears = [r for r in report.rows if r.kind == "linear"]
    assert len(linears) == 4 and all(r.quantized for r in linears)
    for row in linears:
        assert row.floor_sqnr is None and not row.below_floor and "floor" not in row.note
        ref = float_model.get_submodule(row.name).weight.double()
        actual = quant.get_submodule(row.name).weight.dequantize().double()
        direct = 10 * math.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())
        assert row.weight_sqnr == pytest.approx(direct, abs=1e-6)
        assert 25 < row.weight_sqnr < 40  # e4m3's 3 mantissa bits


def test_advice_keeps_float_the_layer_that_makes_the_quantized_model_nan(float_model):
    """A layer whose weight dequantizes to NaN (torchao's float8 lm_head on this CPU) makes
    the quantized model's metric NaN: advise and sensitivity refused ("nothing can be
    ranked"), while keeping that layer float is the answer. NaN ranks last; only a float
    model, or a metric NaN everywhere, is refused."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quant = copy.deepcopy(float_model)
    quantize_(quant, Int8WeightOnlyConfig())
    quant.up.weight.scale[5] = float("nan")
    data = _data()
    found = fxn.sensitivity(float_model, quant, data, progress=False)
    assert math.isnan(found.quantized) and found.ranking()[0] == "up"
    advice = fxn.advise(float_model, quant, data, metric="sqnr", target=30, progress=False)
    assert advice.reached and "up" in advice.keep_float
    assert math.isnan(advice.curve[0]) and advice.curve[-1] >= 30
    with pytest.raises(fxn.InputError, match="NaN on the quantized model itself"):
        fxn.advise(float_model, quant, data, metric=lambda ref, out: math.nan, target=1,
                   progress=False)


@pytest.mark.parametrize("config", ["int8-weight-only", "int8-dynamic"])
def test_capture_export_of_a_torchao_model_reads_it_with_torch_fx_and_says_so(float_model,
                                                                               config):
    # torch.export decomposes torchao's tensors into `_int_mm` and
    # `access_subclass_inner_tensor`: one pair of two, and the torchao quantize's raw int8
    # compared with the float input named "culprit" at -35 dB
    from torchao.quantization import quantize_

    quant = copy.deepcopy(float_model)
    quantize_(quant, _configs()[config][0])
    data = _data()
    exported = fxn.compare(float_model, quant, data, capture="export", progress=False)
    traced = fxn.compare(float_model, quant, data, capture="fx", progress=False)
    assert [r.name for r in exported.rows] == [r.name for r in traced.rows]
    assert {"gate", "up", "down", "head"} <= {r.name for r in exported.rows}
    for a, b in zip(exported.rows, traced.rows, strict=True):
        assert a.output == b.output and a.shadow == b.shadow
    assert any("torch.export turns torchao's quantized weights" in n for n in exported.notes)


def _bert_classifier_variants():
    transformers = pytest.importorskip("transformers")
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        IntxWeightOnlyConfig,
        quantize_,
    )
    from torchao.quantization.granularity import PerGroup

    config = transformers.BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, num_labels=5,
                                     initializer_range=0.2)
    torch.manual_seed(0)
    float_model = transformers.BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(3, 512, (4, 16), generator=g)
        mask = torch.ones_like(ids)
        for row in range(1, 4):
            mask[row, int(torch.randint(2, 17, (1,), generator=g)):] = 0
        batches.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    configs = {"int4": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
               "i8d": Int8DynamicActivationInt8WeightConfig()}
    variants = {}
    for name, cfg in configs.items():
        variants[name] = copy.deepcopy(float_model)
        quantize_(variants[name], cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return float_model, variants, configs, batches


def test_advice_over_variants_is_the_cheapest_plan_it_verified_that_meets_the_target():
    """The search passed a 5.2-bit plan meeting top-1 agreement 1.0 (it is on the front) and
    returned a 5.8-bit one: pruning undoes one upgrade at a time and could not get there."""
    from torchao.quantization import quantize_

    float_model, variants, configs, batches = _bert_classifier_variants()
    advice = fxn.advise(float_model, variants, batches, metric="top1_agreement", target=1.0,
                        progress=False)

    assert advice.reached
    assert advice.bits == min(bits for bits, value in advice.front if value >= 1.0)
    assert (advice.bits, advice.value) in advice.front
    applied = copy.deepcopy(float_model)
    quantize_(applied, advice.to_torchao(configs), filter_fn=None)
    with torch.no_grad():
        agree = [(float_model(**b).logits.argmax(-1) == applied(**b).logits.argmax(-1))
                 for b in batches]
    assert float(torch.cat(agree).double().mean()) == advice.value == 1.0


# --- torchao QAT: quantize_(model, QATConfig(base, step="prepare")) swaps each Linear for a
# FakeQuantizedLinear (each Embedding for a FakeQuantizedEmbedding)

def _sqnr_by_hand(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    return 10 * math.log10(float(ref.square().sum() / (ref - actual).square().sum()))


def _hooked_outputs(model: nn.Module, names: list[str], data: list) -> dict[str, torch.Tensor]:
    """Each named module's outputs over ``data``, concatenated, read by forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: seen[name].append(out.detach())) for name in names]
    with torch.no_grad():
        for batch in data:
            model(batch)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(outs) for name, outs in seen.items()}


def _swapped(model: nn.Module, source: nn.Module, names) -> nn.Module:
    """A copy of ``model`` whose named modules are copies of ``source``'s: a hybrid by hand."""
    hybrid = copy.deepcopy(model)
    for name in names:
        parent, _, field = name.rpartition(".")
        setattr(hybrid.get_submodule(parent), field, copy.deepcopy(source.get_submodule(name)))
    return hybrid


class TokensToLogits(nn.Module):
    """An embedding and two projections; ``forward`` calls ``torch.relu`` (no ReLU module)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _qat_prepared(f: nn.Module, api: str = "QATConfig") -> nn.Module:
    """``f`` prepared for QAT by torchao: int8 per-token activations and int4 weights in
    groups of 32 on the Linears, int4 weights on the Embedding."""
    from torchao.quantization import (
        Int8DynamicActivationIntxWeightConfig,
        IntxWeightOnlyConfig,
        PerGroup,
        quantize_,
    )
    from torchao.quantization.qat import QATConfig

    prepared = copy.deepcopy(f)
    is_embedding = lambda m, fqn: isinstance(m, nn.Embedding)  # noqa: E731
    if api == "QATConfig":
        linear = QATConfig(Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32)), step="prepare")
        embedding = QATConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                   granularity=PerGroup(32)), step="prepare")
    else:  # the older API, deprecated in torchao 0.18
        from torchao.quantization.qat import (
            IntxFakeQuantizeConfig,
            IntXQuantizationAwareTrainingConfig,
        )

        weight = IntxFakeQuantizeConfig(torch.int4, group_size=32)
        linear = IntXQuantizationAwareTrainingConfig(
            IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False), weight)
        embedding = IntXQuantizationAwareTrainingConfig(None, weight)
    quantize_(prepared, linear)
    quantize_(prepared, embedding, filter_fn=is_embedding)
    return prepared


def _token_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (4, 8), generator=gen) for _ in range(3)]


@pytest.mark.parametrize("api", ["QATConfig", "IntXQuantizationAwareTrainingConfig"])
def test_a_torchao_qat_prepared_model_compares_layer_by_layer(api, recwarn):
    """Its FakeQuantizedLinears were traced through and paired with nothing: this model was
    refused ("nothing paired ... do not look like a float model and the quantized model made
    from it"), a Sequential gave one `relu` row and "nothing was quantized" while its first
    Linear reads 23.47 dB by hooks. Each QAT layer is now one quantized op paired with its
    float layer; oracles: forward hooks on both models' modules, the fake-quantized weight
    computed directly, and the converted model, which computes the same."""
    from torchao.quantization.qat import QATConfig
    from torchao.quantization.qat.linear import disable_linear_fake_quant

    torch.manual_seed(0)
    f = TokensToLogits().eval()
    q = _qat_prepared(f, api)
    assert type(q.fc1).__name__ == "FakeQuantizedLinear"
    assert type(q.emb).__name__ == "FakeQuantizedEmbedding"
    data = _token_batches()
    m = fxn.match(f, q)
    assert [(p.name, p.kind, p.quantized) for p in m.pairs] == [
        ("emb", "embedding", True), ("fc1", "linear", True), ("relu", "relu", False),
        ("fc2", "linear", True)]
    assert m.coverage == 1.0 and not m.unmatched_float and not m.unmatched_quant
    weights = fxn.extract_weights(m)  # before any forward: the fake-quantizer holds no scales
    assert q.fc1.weight_fake_quantizer.scale is None  # reading the weight stored none either
    report = fxn.compare(f, q, data, progress=False)
    assert not report.notes
    assert not [w for w in recwarn if issubclass(w.category, fxn.FxNumericWarning)]
    layers = ["emb", "fc1", "fc2"]
    ref, out = _hooked_outputs(f, layers, data), _hooked_outputs(q, layers, data)
    for name in layers:
        row = report.row(name)
        assert row.quantized
        assert row.output_sqnr == pytest.approx(_sqnr_by_hand(ref[name], out[name]), abs=1e-6)
        layer = q.get_submodule(name)
        fake_quantized = layer.weight_fake_quantizer(layer.weight).detach()
        torch.testing.assert_close(weights[f"{name}.weight"]["quantized"], fake_quantized,
                                   rtol=0, atol=0)
        assert row.weight_sqnr == pytest.approx(
            _sqnr_by_hand(f.get_submodule(name).weight, fake_quantized), abs=1e-6)
        assert 15 < row.weight_sqnr < 30  # int4 in groups of 32
    # the first layer reads the same input on both sides: its error is its own
    emb = report.row("emb")
    assert emb.shadow_sqnr == pytest.approx(emb.output_sqnr, abs=1e-6)
    with torch.no_grad():
        logits = _sqnr_by_hand(torch.cat([f(x) for x in data]),
                               torch.cat([q(x) for x in data]))
    assert report.model_output["sqnr"] == pytest.approx(logits, abs=1e-6)

    # the eager API logs each QAT layer as the layer it stands for (torch's type list)
    logged = fxn.compare_model_outputs(f, q, data[0])
    assert sorted(logged) == ["emb.stats", "fc1.stats", "fc2.stats"]
    with torch.no_grad():
        assert torch.equal(logged["fc1.stats"]["quantized"][0], q.fc1(q.emb(data[0])))

    if api == "QATConfig":  # the model convert makes computes the same, and reads the same
        from torchao.quantization import (
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            quantize_,
        )

        converted = copy.deepcopy(q)
        quantize_(converted, QATConfig(Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4, weight_granularity=PerGroup(32)), step="convert"))
        quantize_(converted, QATConfig(IntxWeightOnlyConfig(
            weight_dtype=torch.int4, granularity=PerGroup(32)), step="convert"),
                  filter_fn=lambda mod, fqn: isinstance(mod, nn.Embedding))
        assert is_torchao_tensor(converted.fc1.weight) and is_torchao_tensor(converted.emb.weight)
        after = fxn.compare(f, converted, data, progress=False)
        for name in layers:
            assert after.row(name).weight_sqnr == pytest.approx(report.row(name).weight_sqnr,
                                                                abs=1e-6)
            assert after.row(name).output_sqnr == pytest.approx(report.row(name).output_sqnr,
                                                                abs=1e-4)

    # a QAT layer whose fake-quantizers are off computes the float layer: not quantized
    disable_linear_fake_quant(q.fc2)
    off = fxn.match(f, q).pair("fc2")
    assert not off.quantized
    assert fxn.compare(f, q, data, progress=False).row("fc2").weight_sqnr is None


def test_advice_on_a_torchao_qat_prepared_model_swaps_the_float_layer_in(recwarn):
    """sensitivity and advise refused a QAT-prepared model ("computes nothing in quantized
    form") and diagnose flagged nothing. Each hybrid they report is checked against the same
    hybrid built by hand: the float module in place of the QAT layer, or the other way."""
    torch.manual_seed(0)
    f = TokensToLogits().eval()
    q = _qat_prepared(f)
    data = _token_batches()

    def end_sqnr(model: nn.Module) -> float:
        with torch.no_grad():
            return _sqnr_by_hand(torch.cat([f(x) for x in data]),
                                 torch.cat([model(x) for x in data]))

    found = fxn.sensitivity(f, q, data, progress=False)
    assert [layer.name for layer in found.layers] == ["emb", "fc1", "fc2"]
    for layer in found.layers:
        assert layer.only == pytest.approx(end_sqnr(_swapped(f, q, [layer.name])), abs=1e-6)
        assert layer.all_but == pytest.approx(end_sqnr(_swapped(q, f, [layer.name])), abs=1e-6)
    target = max(layer.all_but for layer in found.layers) - 0.5  # one layer kept float suffices
    advice = fxn.advise(f, q, data, metric="sqnr", target=target, progress=False)
    assert advice.reached and len(advice.keep_float) == 1
    assert advice.value == pytest.approx(end_sqnr(_swapped(q, f, advice.keep_float)), abs=1e-6)
    diagnosis = fxn.diagnose(f, q, data, progress=False)
    assert [(d.name, d.quantized) for d in diagnosis.layers] == [
        ("emb", True), ("fc1", True), ("relu", False), ("fc2", True)]  # every op has a row
    report = fxn.compare(f, q, data, progress=False)
    below = [n for n in ("emb", "fc1", "fc2")
             if report.row(n).output_sqnr < diagnosis.threshold_db]
    assert below and diagnosis.first_below == below[0]  # fc1: 18.4 dB, below 20
    assert diagnosis.flagged


def test_a_torchao_qat_prepared_llama_pairs_every_linear():
    """Traced through the module tree: every FakeQuantizedLinear was unpaired, the report
    said "nothing was quantized" and "no layer adds measurable error" (8 rows, no Linear)
    while the output reads 7.90 dB. Oracle: forward hooks on each Linear."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    f = transformers.LlamaModel(config).eval()
    q = _qat_prepared(f)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 64, (1, 8), generator=gen) for _ in range(2)]
    m = fxn.match(f, q, data[0])
    assert m.pair("embed_tokens").quantized
    linears = [p.name for p in m.pairs if p.kind == "linear"]
    assert len(linears) == 14 and all(m.pair(n).quantized for n in linears)  # 7 per layer
    assert m.coverage == 1.0 and not m.unmatched_quant
    report = fxn.compare(f, q, data, progress=False)
    ref, out = _hooked_outputs(f, linears, data), _hooked_outputs(q, linears, data)
    for name in linears:
        expected = _sqnr_by_hand(ref[name], out[name])
        assert report.row(name).output_sqnr == pytest.approx(expected, abs=1e-5), name
        assert 15 < report.row(name).weight_sqnr < 30


def test_capture_export_of_a_torchao_qat_model_reads_it_with_torch_fx_and_says_so():
    # torch.export traces a FakeQuantizedLinear into its fake-quantize arithmetic: 84 nodes
    # unpaired, one relu row, "nothing was quantized"
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    q = _qat_prepared(f)
    data = [torch.randn(8, 64, generator=torch.Generator().manual_seed(1))]
    exported = fxn.compare(f, q, data, capture="export", progress=False)
    traced = fxn.compare(f, q, data, capture="fx", progress=False)
    assert [r.name for r in exported.rows] == [r.name for r in traced.rows] == ["0", "1", "2"]
    for a, b in zip(exported.rows, traced.rows, strict=True):
        assert a.output == b.output and a.weight_sqnr == b.weight_sqnr
    assert any("torch.export traces torchao's QAT layers" in n for n in exported.notes)


def test_the_torchao_keep_line_rebuilds_the_advised_model_leaving_float_what_quantize_did():
    """The line quantized every ``nn.Linear`` but the kept ones, also the ``head`` the
    ``filter_fn`` had left float (a tied ``lm_head`` left out by ``untied_linears``): Gemma's
    advice claimed 43.28 dB and its line built a model reading 21.51 dB."""
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    torch.manual_seed(0)
    f = LlamaMLP().eval()
    config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))
    q = copy.deepcopy(f)
    quantize_(q, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn != "head")
    data = _data()

    def output(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x) for x in data]).double()

    def direct_sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
        return float(10 * torch.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum()))

    ref = output(f)
    advice = fxn.advise(f, q, data, metric="sqnr", target=direct_sqnr(ref, output(q)) + 3,
                        progress=False)
    assert advice.reached
    line = advice.torchao_keep_lines()
    assert line in advice.summary()
    rebuilt = copy.deepcopy(f)
    exec(line, {"quantize_": quantize_, "model": rebuilt, "config": config, "torch": torch})
    assert direct_sqnr(ref, output(rebuilt)) == pytest.approx(advice.value, abs=1e-6)
    rest = [name for name in ("gate", "up", "down") if name not in advice.keep_float]
    assert [n for n, m in rebuilt.named_modules()
            if is_torchao_tensor(getattr(m, "weight", None))] == rest
    assert advice.torchao_modules == ("gate", "up", "down")
    assert line == (f"quantize_(model, config, filter_fn=lambda m, fqn: fqn in "
                    f"{{{', '.join(map(repr, rest))}}})")


def test_another_flows_lines_for_a_torchao_advice_warn_that_they_make_another_model(
        float_model, recwarn):
    """The float-fallback lines of torch's flows came silently for a torchao model, as if
    ``quantize_dynamic`` or ``prepare_fx`` rebuilt the model measured; ``to_torchao`` already
    warned the other way round. Its own lines stay silent."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    q = copy.deepcopy(float_model)
    quantize_(q, Int8WeightOnlyConfig())
    data = _data()
    one = fxn.advise(float_model, q, data, metric="sqnr", target=math.inf, max_float_layers=1,
                     progress=False)
    variant = fxn.advise(float_model, {"int8": q}, data, metric="sqnr", target=math.inf,
                         max_float_layers=1, progress=False)
    assert one.flow == variant.flow == "torchao" and len(one.keep_float) == 1
    for advice, own in ((one, "advice.torchao_keep_lines()"),
                        (variant, "advice.to_torchao(configs)")):
        for lines, flow in ((advice.dynamic_lines, "dynamic"), (advice.qconfig_mapping, "fx"),
                            (advice.fx_lines, "fx"), (advice.eager_lines, "eager"),
                            (advice.pt2e_lines, "pt2e")):
            with pytest.warns(fxn.FxNumericWarning) as caught:
                lines()
            assert len(caught) == 1
            assert str(caught[0].message).startswith(
                f"this assignment was verified on "
                f"{'variants' if advice.variants else 'a quantized model'} from torchao, not "
                f"{flow}: {flow} quantizes differently")
            assert caught[0].filename == __file__  # the warning points at the caller's line
            assert f"Fix: use {own}, made for torchao" in str(caught[0].message)
    recwarn.clear()
    for advice in (one, variant):
        advice.summary()
        advice.torchao_keep_lines()
        advice.to_torchao({name: Int8WeightOnlyConfig() for name in ("quantized", "int8")})
    assert not [w for w in recwarn if w.category is fxn.FxNumericWarning]


def test_an_exported_dynamic_model_names_no_input_quantize_as_culprit():
    # torch.export of an Int8DynamicActivationInt8WeightConfig model: the input's quantize
    # (choose_qparams_affine, then quantize_affine) feeds an int8 matmul its raw codes, with
    # no dequantize. Paired with the input as a quantize row, it compared codes with floats
    # (-34 dB) and was named the culprit. Quantized dynamically, it is the reading op's: no
    # row, and since no Linear pairs, no culprit is named: the one row, the relu, reads what
    # the quantized relu reads (the unpaired int8 Linear's output) and adds nothing, so the
    # verdict says the error enters where no row compares it
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    data = [torch.randn(4, 32) for _ in range(3)]
    ep, qep = torch.export.export(f, (data[0],)), torch.export.export(q, (data[0],))
    report = fxn.compare(ep, qep, data, progress=False)
    assert not any(r.kind == "quantize" for r in report.rows)
    with torch.no_grad():
        oracle = _sqnr_by_hand(torch.cat([f(x) for x in data]),
                               torch.cat([qep.module()(x) for x in data]))
    assert report.model_output["sqnr"] == pytest.approx(oracle, abs=1e-4)
    assert report.verdict.culprit is None
    assert [r.kind for r in report.rows] == ["relu"] and report.rows[0].shadow_sqnr == math.inf
    assert report.verdict.kind == "unlocated"
    assert "the error enters where no row compares it" in report.summary()


class _Gated(nn.Module):
    """torch.fx cannot trace it (a branch on a value): one layer, kept whole."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = x * 0
        return self.b(torch.relu(self.a(x)))


class _Headed(nn.Module):
    """``body`` as module ``name``, then a Linear ``head`` reading its ``width`` features."""

    def __init__(self, name: str, body: nn.Module, width: int, out: int) -> None:
        super().__init__()
        self.body_name = name
        self.add_module(name, body)
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, self.body_name)(x))


def test_the_torchao_keep_line_keeps_float_every_module_inside_a_kept_one():
    """A module kept float with everything in it (``enc``, kept whole where torch.fx cannot
    trace it): the line compared paths exactly and still quantized ``enc.a`` and ``enc.b``.
    torchao's ``enc`` is no layer of its own (its weights are its Linears'), so the advice
    keeping both Linears, measured, is the oracle for one naming ``enc``."""
    import dataclasses

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    f = _Headed("enc", _Gated(), 64, 16).eval()
    q = copy.deepcopy(f)
    config = Int8WeightOnlyConfig()
    quantize_(q, config)
    data = _data()
    measured = fxn.advise(f, q, data, metric="sqnr", target=math.inf, layers=["enc.a", "enc.b"],
                          progress=False)
    assert set(measured.keep_float) == {"enc.a", "enc.b"}
    assert measured.torchao_modules == ("enc.a", "enc.b", "head")
    whole = dataclasses.replace(measured, keep_float=("enc",), functions=())
    by_hand = copy.deepcopy(f)
    quantize_(by_hand, config, filter_fn=lambda m, fqn: fqn == "head")

    def output(model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(x) for x in data]).double()

    ref = output(f)
    # the line naming what quantize_ quantized (by weight, or by module alone), and the one
    # with no module known
    lines = [advice.torchao_keep_lines() for advice in (
        measured, whole, dataclasses.replace(whole, torchao_weights=()),
        dataclasses.replace(whole, torchao_modules=(), torchao_weights=()))]
    assert lines[0] == lines[1] == lines[2] == (
        "quantize_(model, config, filter_fn=lambda m, fqn: fqn in {'head'})")
    assert lines[3] == ("quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, "
                        "torch.nn.Linear) and not (fqn + '.').startswith(('enc.',)))")
    for line in lines:
        rebuilt = copy.deepcopy(f)
        exec(line, {"quantize_": quantize_, "model": rebuilt, "config": config, "torch": torch})
        assert [n for n, m in rebuilt.named_modules()
                if is_torchao_tensor(getattr(m, "weight", None))] == ["head"], line
        assert torch.equal(output(rebuilt), output(by_hand))
        assert _sqnr_by_hand(ref, output(rebuilt)) == pytest.approx(measured.value, abs=1e-6)


def _apply_keep_line(line: str, model: nn.Module, configs: dict[str, object]) -> None:
    """Run ``line`` on ``model`` as docs/advise.md tells a user to: each config variable the
    line's comments name (``# config_1: the config '0' was quantized with ...``) bound to the
    config that layer was made with, ``config`` to the one config when there is one."""
    import re

    from torchao.quantization import FqnToConfig, quantize_

    names = {"quantize_": quantize_, "FqnToConfig": FqnToConfig, "torch": torch, "model": model}
    named = re.findall(r"^# (config_\d+): the config '([^']*)' was quantized with", line, re.M)
    names.update({variable: configs[layer] for variable, layer in named})
    if not named:
        names["config"] = next(iter(configs.values()))
    exec(line, names)


def _output(model: nn.Module, data: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x) for x in data]).double()


class _FunctionalAttention(nn.Module):
    """``qkv``'s weight read functionally, as torchvision's Swin and ViT read it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = nn.functional.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, -1)
        return self.proj(torch.relu(q) * v + k)


def test_the_torchao_keep_line_leaves_float_a_layer_whose_weight_is_read_functionally():
    """``attn.qkv`` kept float, read through ``F.linear(x, self.qkv.weight, ...)``: a function
    op, and ``Advice._kept`` counted only modules kept, so the line still quantized it and
    built the quantized model (6.391 dB where the advice claimed 7.667)."""
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    torch.manual_seed(0)
    f = _Headed("attn", _FunctionalAttention(), 32, 8).eval()
    config = IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(16))
    q = copy.deepcopy(f)
    quantize_(q, config)
    data = [torch.randn(4, 32) for _ in range(3)]
    ref = _output(f, data)
    quantized = _sqnr_by_hand(ref, _output(q, data))
    advice = fxn.advise(f, q, data, metric="sqnr", target=quantized + 1, progress=False)
    assert advice.reached and advice.keep_float == ("attn.qkv",)
    assert advice.functions[0][:2] == ("attn", nn.functional.linear)  # a function op
    line = advice.torchao_keep_lines()
    assert line in advice.summary()
    rebuilt = copy.deepcopy(f)
    _apply_keep_line(line, rebuilt, {"all": config})
    assert _sqnr_by_hand(ref, _output(rebuilt, data)) == pytest.approx(advice.value, abs=1e-6)
    assert not is_torchao_tensor(rebuilt.attn.qkv.weight)
    assert advice.value > quantized + 1
    assert line == "quantize_(model, config, filter_fn=lambda m, fqn: fqn in {'attn.proj', 'head'})"


def test_the_torchao_keep_line_of_a_mixed_fqn_to_config_model_names_one_config_per_kind():
    """Made with an ``FqnToConfig`` of three configs, the model got one ``quantize_(model,
    config, ...)`` line: whichever config the user took, it built another model (45.44, 7.09
    or 29.44 dB where the advice claimed 32.32). The line now names a config per kind of
    weight, each tied to a layer made with it; bound so, it builds the advised model."""
    from torchao import quantization as ao

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(),
                      nn.Linear(128, 32)).eval()
    configs = {"0": ao.Int8WeightOnlyConfig(),
               "2": ao.IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=ao.PerGroup(16)),
               "4": ao.Float8WeightOnlyConfig()}
    q = copy.deepcopy(f)
    ao.quantize_(q, ao.FqnToConfig(configs), filter_fn=None)
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(8, 64, generator=gen) for _ in range(3)]
    ref = _output(f, data)
    advice = fxn.advise(f, q, data, metric="sqnr", target=20.0, progress=False)
    assert advice.reached and advice.keep_float == ("2",)
    line = advice.torchao_keep_lines()
    rebuilt = copy.deepcopy(f)
    _apply_keep_line(line, rebuilt, configs)
    assert _sqnr_by_hand(ref, _output(rebuilt, data)) == pytest.approx(advice.value, abs=1e-6)
    assert [type(rebuilt[i].weight).__name__ for i in (0, 2, 4)] == [
        "Int8Tensor", "Parameter", "Float8Tensor"]
    assert dict(advice.torchao_weights) == {
        "0.weight": "Int8Tensor int8, per row",
        "2.weight": "IntxUnpackedToInt8Tensor int2, groups of 16",
        "4.weight": "Float8Tensor float8_e4m3fn, per row"}
    assert textwrap.indent(line, "    ") in advice.summary()
    assert line.splitlines() == [
        "# in the quantized model these layers hold 2 kinds of torchao weight, made by 2 "
        "configs: one config cannot rebuild them",
        "# config_1: the config '0' was quantized with (Int8Tensor int8, per row)",
        "# config_2: the config '4' was quantized with (Float8Tensor float8_e4m3fn, per row)",
        "quantize_(model, FqnToConfig({'0': config_1, '4': config_2}), filter_fn=None)"]


class _RawWeights(nn.Module):
    """Weights that are no module's ``weight``, quantized by parameter path in FqnToConfig."""

    def __init__(self) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(64, 32) * 0.1)
        self.w_out = nn.Parameter(torch.randn(16, 64) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.relu(nn.functional.linear(x, self.w_in)), self.w_out)


class _RawNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(32, 32), _RawWeights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.fc(x)))


def test_the_torchao_keep_line_names_a_weight_of_no_module_by_its_parameter_path():
    """``proj.w_in`` and ``proj.w_out``, quantized through ``FqnToConfig`` parameter keys: the
    line named module ``proj`` in a ``filter_fn``, and torchao failed on it ("requires module
    to have weight attribute"); kept float, ``proj`` (a function op) was still named."""
    from torchao import quantization as ao

    torch.manual_seed(0)
    f = _RawNet().eval()
    int_x = ao.IntxWeightOnlyConfig
    configs = {"proj.w_in": int_x(weight_dtype=torch.int4, granularity=ao.PerAxis(0)),
               "proj.w_out": ao.Int8WeightOnlyConfig(),
               "fc": int_x(weight_dtype=torch.int2, granularity=ao.PerGroup(16))}
    q = copy.deepcopy(f)
    ao.quantize_(q, ao.FqnToConfig(configs), filter_fn=None)
    data = [torch.randn(4, 32) for _ in range(3)]
    ref = _output(f, data)
    for target, kept in ((15.0, ("fc",)), (40.0, ("fc", "proj"))):
        advice = fxn.advise(f, q, data, metric="sqnr", target=target, progress=False)
        assert advice.reached and advice.keep_float == kept
        line = advice.torchao_keep_lines()
        rebuilt = copy.deepcopy(f)
        _apply_keep_line(line, rebuilt, configs)
        assert _sqnr_by_hand(ref, _output(rebuilt, data)) == pytest.approx(advice.value, abs=1e-6)
    assert line == "# every module quantize_ quantized is kept float: leave model float"
    assert advice.value == math.inf


# --- what a plan over several variants costs: the bits the model it makes stores

class _SharedWeights(nn.Module):
    """An embedding tied to the output head, and two Linears sharing one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.first = nn.Linear(32, 32)
        self.second = nn.Linear(32, 32)
        self.second.weight = self.first.weight
        self.mix = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.second(torch.relu(self.first(h)))
        return self.head(self.mix(h))


def _bits_by_hand(model: nn.Module) -> int:
    """Nominal weight bits of ``model``, each tensor once:
    float 32 a value; torchao int8 8 a value plus a float32 scale a row; int4 g32 4 a value
    plus a float32 scale a group (their zero points are all 0: a symmetric format keeps none)."""
    seen, bits = set(), 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        name = type(weight).__name__
        if name == "Int8Tensor":
            assert not weight.zero_point.any()
            bits += 8 * weight.numel() + 32 * weight.shape[0]
        elif name == "IntxUnpackedToInt8Tensor":
            assert not weight.zero_point.any()
            bits += 4 * weight.numel() + 32 * weight.numel() // 32
        else:
            assert type(weight) in (torch.Tensor, nn.Parameter)
            bits += 32 * weight.numel()
    return bits


def test_a_plan_costs_what_the_model_it_makes_stores_with_tied_and_shared_weights():
    """A tied head kept float stores nothing (the embedding keeps the weight); two layers
    sharing a weight kept float store it once. The search read both at 32 bits a weight, so
    it quantized the tied head, untying it, for a model larger than one keeping it float."""
    from torchao.quantization import (
        FqnToConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
        quantize_,
    )

    from fxnumeric.advice.mixed import FLOAT, _Plans, layer_choices
    from fxnumeric.advice.search import _Search

    torch.manual_seed(0)
    float_model = _SharedWeights().eval()
    configs = {"int4": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
               "int8": Int8WeightOnlyConfig()}
    variants = {}
    for name, config in configs.items():
        variants[name] = copy.deepcopy(float_model)
        quantize_(variants[name], config)
    data = [torch.randint(0, 64, (4, 8)) for _ in range(2)]

    search = _Search(float_model, variants, data, "sqnr", None, False)
    try:
        found, _ = layer_choices(search.runner)
        plans = _Plans(search, found)
    finally:
        search.close()
    paths = {lc.name: lc.module for lc in found}
    assert sorted(paths.values()) == ["first", "head", "mix", "second"]
    searched = sum(float_model.get_submodule(p).weight.numel() for p in paths.values())
    kept_bits = 32 * float_model.emb.weight.numel()  # outside the search: in every plan's model
    assert plans.total == searched
    for choice_of in ({"first": FLOAT, "second": FLOAT, "mix": FLOAT, "head": FLOAT},
                      {"first": FLOAT, "second": "int8", "mix": "int4", "head": FLOAT},
                      {"first": FLOAT, "second": FLOAT, "mix": "int8", "head": "int4"},
                      {"first": "int4", "second": "int8", "mix": "int8", "head": "int8"}):
        applied = copy.deepcopy(float_model)
        quantize_(applied, FqnToConfig({p: configs[c] for p, c in choice_of.items()
                                        if c != FLOAT}), filter_fn=None)
        by_hand = _bits_by_hand(applied) - kept_bits
        plan = {name: choice_of[path] for name, path in paths.items()}
        assert plans.bits(plan) * plans.total == pytest.approx(by_hand, rel=1e-12), choice_of

    advice = fxn.advise(float_model, variants, data, metric="sqnr", target=20, progress=False)
    assert advice.assignment["head"] == FLOAT  # free, and exact
    applied = copy.deepcopy(float_model)
    quantize_(applied, advice.to_torchao(configs), filter_fn=None)
    assert applied.head.weight is applied.emb.weight
    assert advice.bits * searched == pytest.approx(_bits_by_hand(applied) - kept_bits)


def test_the_weight_sqnr_of_a_bfloat16_model_reads_the_weight_the_kernel_scales():
    """An int8 weight-only weight of a bfloat16 model is applied as ``mm(x, qdata) * scale``:
    no weight is rounded to bfloat16. ``dequantize()`` rounds each to the model's dtype, so
    the weight SQNR read 47.05 dB where ``qdata * scale`` reads 47.84 (per-row int8, 64x64).
    Oracle: ``qdata * scale`` in float64, from the tensor's own fields."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval().to(torch.bfloat16)
    q = copy.deepcopy(f)
    quantize_(q, Int8WeightOnlyConfig())
    weight = q[0].weight
    qdata, scale = weight.qdata.double(), weight.scale.double()
    by_hand = fxn.sqnr(f[0].weight.double(), qdata * scale.reshape(-1, 1))
    report = fxn.compare(f, q, [torch.randn(8, 64, dtype=torch.bfloat16)], progress=False)
    assert report.rows[0].weight_sqnr == pytest.approx(by_hand, abs=1e-4)
    assert by_hand - fxn.sqnr(f[0].weight.double(), weight.dequantize().double()) > 0.3


# --- what fxnumeric reads of a torchao weight: the weight the op multiplies its input by -------

def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 32)).eval()


def _outlier_batches(channels: slice = slice(0, 4), value: float | None = None,
                     factor: float = 20.0) -> list[torch.Tensor]:
    """Batches whose first input channels are outliers (what SmoothQuant is for)."""
    gen = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        x = torch.randn(8, 64, generator=gen)
        if value is not None:
            x[:, channels] = value
        else:
            x[:, channels] *= factor
        batches.append(x)
    return batches


def _smoothed(config_name: str, f: nn.Module, batches: list[torch.Tensor]) -> nn.Module:
    """``f`` through torchao's SmoothQuant (int8 dynamic) or AWQ (int8 weight-only) flow."""
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if config_name == "smoothquant":
        from torchao.prototype.smoothquant import SmoothQuantConfig

        def make(step):
            return SmoothQuantConfig(Int8DynamicActivationInt8WeightConfig(), step=step,
                                     alpha=0.5)
    else:
        from torchao.prototype.awq import AWQConfig

        def make(step):
            return AWQConfig(Int8WeightOnlyConfig(), step=step)
    q = copy.deepcopy(f)
    quantize_(q, make("prepare"))
    with torch.no_grad():
        for x in batches:
            q(x)
    quantize_(q, make("convert"))
    return q


def _hooked(f: nn.Module, q: nn.Module, batches: list[torch.Tensor], path: str,
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The inputs the quantized module at ``path`` read, and the float module's outputs on
    them (its shadow), captured by forward hooks."""
    inputs, outputs = [], []
    fmod = copy.deepcopy(f.get_submodule(path)).double()

    def hook(module, args, out):
        inputs.append(args[0].detach().double())
        outputs.append(fmod(args[0].double()).detach())

    handle = q.get_submodule(path).register_forward_hook(hook)
    with torch.no_grad():
        for x in batches:
            q(x)
    handle.remove()
    return inputs, outputs


def _db(signal: float, noise: float) -> float:
    return 10 * math.log10(signal / noise)


@pytest.mark.parametrize("config_name", ["smoothquant", "awq"])
def test_the_weight_of_a_smoothquant_or_awq_layer_is_the_one_it_multiplies_the_input_by(
        config_name):
    """SmoothQuant and AWQ store ``W / act_pre_scale`` and scale the input by
    ``act_pre_scale`` inside the op: the weight compared is the stored one times
    ``act_pre_scale`` per input channel (SmoothQuant's layer ``0`` read -14.6 dB from the raw
    ``dequantize()`` where its effective weight reads 37.5, and the report said its weights
    looked made from another checkpoint). Oracle: ``qdata * scale * act_pre_scale`` in float64
    from the tensor's fields; that it is the weight the op computes with is checked on AWQ's
    weight-only layer, whose output is ``x @ W_eff.T + b`` exactly."""
    f = _mlp()
    batches = _outlier_batches()
    q = _smoothed(config_name, f, batches)
    report = fxn.compare(f, q, batches, progress=False)
    eager = fxn.compare_weights(f.state_dict(), q.state_dict())
    scaled = []
    for path in ("0", "2", "4"):
        weight = q.get_submodule(path).weight
        assert weight.act_pre_scale is not None
        effective = (weight.qdata.double() * weight.scale.double().reshape(-1, 1)
                     * weight.act_pre_scale.double().reshape(1, -1))
        float_weight = f.get_submodule(path).weight.double()
        by_hand = fxn.sqnr(float_weight, effective)
        raw = fxn.sqnr(float_weight, weight.qdata.double() * weight.scale.double().reshape(-1, 1))
        assert report.row(path).weight_sqnr == pytest.approx(by_hand, abs=1e-3)
        assert fxn.sqnr(eager[f"{path}.weight"]["float"].double(),
                        eager[f"{path}.weight"]["quantized"].double()) == pytest.approx(
            by_hand, abs=1e-3)
        assert by_hand > 35
        scaled.append(by_hand - raw)
        if config_name == "awq":
            x = batches[0] if path == "0" else torch.randn(8, weight.shape[1])
            with torch.no_grad():
                out = q.get_submodule(path)(x).double()
            expected = x.double() @ effective.T + q.get_submodule(path).bias.double()
            assert torch.allclose(out, expected, atol=1e-4)
    assert max(scaled) > 10  # the pre-scale is not a no-op on these layers
    assert not any("another seed or checkpoint" in note for note in report.notes)


def test_a_smoothquant_layers_floor_reads_its_scaled_input_and_stored_weight():
    """The floor of a SmoothQuant layer is that of its quantized op: the input scaled by
    ``act_pre_scale``, rounded per token (int8 symmetric, 255 steps), times the stored int8
    weight (per-row steps). Read as the effective weight with the unscaled input, it read
    19.9 dB against a shadow SQNR of 42.9. Oracle: the noise model of :mod:`fxnumeric.floor`
    summed by hand in float64 from ``qdata``, ``scale``, ``act_pre_scale`` and the inputs a
    forward hook captured; and the floor sits near the shadow SQNR the hooks measure."""
    f = _mlp()
    batches = _outlier_batches()
    q = _smoothed("smoothquant", f, batches)
    report = fxn.compare(f, q, batches, progress=False)
    for path in ("0", "2"):
        weight = q.get_submodule(path).weight
        stored = weight.qdata.double() * weight.scale.double().reshape(-1, 1)
        pre = weight.act_pre_scale.double().reshape(-1)
        inputs, shadows = _hooked(f, q, batches, path)
        with torch.no_grad():
            outs = [q.get_submodule(path)(x.float()).double() for x in inputs]
        scaled = [x * pre for x in inputs]
        count = sum(o.numel() for o in shadows)
        fan_in = weight.shape[1]
        mean_square = sum(float(x.square().sum()) for x in scaled) / sum(x.numel() for x in scaled)
        weight_noise = count * fan_in * mean_square * float(weight.scale.double().square().mean()) / 12
        steps = sum(float((2 * x.abs().amax(dim=1) / 255).square().sum()) for x in scaled)
        input_noise = steps * float(stored.square().sum()) / 12
        signal = sum(float(o.square().sum()) for o in shadows)
        floor = _db(signal, weight_noise + input_noise)
        shadow = _db(signal, sum(float((o - s).square().sum()) for o, s in zip(outs, shadows, strict=True)))
        row = report.row(path)
        assert row.shadow_sqnr == pytest.approx(shadow, abs=1e-2)
        assert row.floor_sqnr == pytest.approx(floor, abs=1e-2)
        assert abs(row.floor_sqnr - row.shadow_sqnr) < 3
        assert not row.below_floor


def test_the_floor_of_an_int8_dynamic_activation_intx_layer_counts_its_input_rounding():
    """``Int8DynamicActivationIntxWeightConfig`` keeps its activation scheme in the weight's
    ``activation_quantization`` (``int8_asym_per_token``: each token over 255 steps of
    ``[min(x, 0), max(x, 0)]``), not ``act_quant_kwargs``: the floor left it out and read
    48.6 dB for a layer at 40.3, flagged below its floor as a kernel fault. Oracle: the floor's
    noise model summed by hand in float64 from ``qdata``, ``scale`` and the hooked inputs; and
    the SQNR of the float layer on its input rounded that way, by hand, is no better than it."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerAxis, quantize_

    f = _mlp()
    batches = _outlier_batches(slice(0, 1), value=60.0)
    q = copy.deepcopy(f)
    quantize_(q, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                       weight_granularity=PerAxis(0)))
    report = fxn.compare(f, q, batches, progress=False)
    weight = q[0].weight
    stored = (weight.qdata.double() - weight.zero_point.double().reshape(-1, 1)) \
        * weight.scale.double().reshape(-1, 1)
    inputs, shadows = _hooked(f, q, batches, "0")
    count = sum(o.numel() for o in shadows)
    mean_square = sum(float(x.square().sum()) for x in inputs) / sum(x.numel() for x in inputs)
    weight_noise = count * 64 * mean_square * float(weight.scale.double().square().mean()) / 12
    steps = sum(float(((x.amax(dim=1).clamp(min=0) - x.amin(dim=1).clamp(max=0)) / 255)
                      .square().sum()) for x in inputs)
    signal = sum(float(o.square().sum()) for o in shadows)
    floor = _db(signal, weight_noise + steps * float(stored.square().sum()) / 12)
    rounded_noise = 0.0
    float_layer = copy.deepcopy(f[0]).double()
    for x, shadow in zip(inputs, shadows, strict=True):
        low, high = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
        step = (high - low) / 255
        zero = (-low / step).round() - 128
        xq = ((x / step).round() + zero).clamp(-128, 127).sub(zero).mul(step)
        with torch.no_grad():
            rounded_noise += float((float_layer(xq) - shadow).square().sum())
    row = report.row("0")
    assert row.floor_sqnr == pytest.approx(floor, abs=1e-2)
    assert row.floor_sqnr < _db(signal, rounded_noise) + 0.5  # the input alone: 41.0 dB
    assert not row.below_floor and "kernel" not in row.note


@pytest.mark.parametrize("factor", [1.0, 8.0, 0.25])
def test_the_floor_of_a_static_activation_layer_reads_its_fixed_input_grid(factor):
    """``Int8StaticActivationInt8WeightConfig`` rounds the input on a grid fixed at conversion
    (``act_quant_scale``), clipping what lies beyond it; the floor assumed a scale chosen per
    call: a scale 8x too coarse read "its qparams allow 42.0 dB", a kernel fault, where they
    allow 23.2. Oracle: the float layer on its input (hooked) rounded and clipped onto that
    grid by hand, in float64; a scale that does not fit (too coarse, or clipping) is named."""
    from torchao.quantization import Int8StaticActivationInt8WeightConfig, PerTensor, quantize_

    f = _mlp()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 64, generator=gen) for _ in range(3)]
    peak = {}
    hooks = [f.get_submodule(p).register_forward_hook(
        lambda m, args, out, p=p: peak.__setitem__(p, max(peak.get(p, 0.0),
                                                          float(args[0].abs().max()))))
        for p in ("0", "2", "4")]
    with torch.no_grad():
        for x in batches:
            f(x)
    for hook in hooks:
        hook.remove()
    q = copy.deepcopy(f)
    for path in ("0", "2", "4"):
        scale = torch.tensor([[peak[path] * factor / 127.0]])
        quantize_(q, Int8StaticActivationInt8WeightConfig(act_quant_scale=scale,
                                                          granularity=PerTensor()),
                  filter_fn=lambda m, fqn, path=path: fqn == path)
    report = fxn.compare(f, q, batches, progress=False)
    for path in ("0", "2", "4"):
        step = float(q.get_submodule(path).weight.act_quant_scale)
        inputs, shadows = _hooked(f, q, batches, path)
        float_layer = copy.deepcopy(f.get_submodule(path)).double()
        with torch.no_grad():
            rounded = [float_layer((x / step).round().clamp(-128, 127) * step) for x in inputs]
        signal = sum(float(s.square().sum()) for s in shadows)
        alone = _db(signal, sum(float((r - s).square().sum())
                                for r, s in zip(rounded, shadows, strict=True)))
        row = report.row(path)
        assert row.floor_sqnr < alone + 1.0  # the input's grid alone allows no more (a model)
        assert abs(row.floor_sqnr - row.shadow_sqnr) < 3
        assert not row.below_floor and "kernel" not in row.notes
        assert (row.floor_cause == "input") == (factor != 1.0)
        if factor != 1.0:
            assert "act_quant_scale" in row.notes


def _intx_by_hand(weight) -> torch.Tensor:
    """An ``IntxUnpackedToInt8Tensor``'s values from its fields, in float64."""
    groups = weight.qdata.shape[1] // weight.scale.shape[1]
    scale = weight.scale.double().repeat_interleave(groups, dim=1)
    zero = weight.zero_point.double().repeat_interleave(groups, dim=1)
    return (weight.qdata.double() - zero) * scale


def test_a_model_with_torchaos_activation_logger_attached_compares_its_wrapped_weights(capsys):
    """torchao's ``add_activation_loggers`` wraps each weight in an ``ActivationLoggingTensor``
    (``original_weight_tensor``): compare ran every batch, then died in the weight histogram
    (``NotImplementedError: aten.view``). The wrapper is read through: the layers count as
    quantized, their weight SQNRs and floors are those of the same model without loggers.
    Oracle: ``(qdata - zero_point) * scale`` in float64 from the wrapped tensor's fields."""
    from torchao.prototype.quant_logger import add_activation_loggers
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    f = _mlp()
    q = copy.deepcopy(f)
    quantize_(q, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    logged = copy.deepcopy(q)
    add_activation_loggers(logged)
    assert type(logged[0].weight).__name__ == "ActivationLoggingTensor"
    batches = _outlier_batches(factor=1.0)
    report = fxn.compare(f, logged, batches, progress=False)
    plain = fxn.compare(f, q, batches, progress=False)
    capsys.readouterr()  # the logger prints each activation
    for path in ("0", "2", "4"):
        inner = logged.get_submodule(path).weight.original_weight_tensor
        by_hand = fxn.sqnr(f.get_submodule(path).weight.double(), _intx_by_hand(inner))
        row = report.row(path)
        assert row.quantized
        assert row.weight_sqnr == pytest.approx(by_hand, abs=1e-3)
        assert row.floor_sqnr is not None
        assert row.floor_sqnr == pytest.approx(plain.row(path).floor_sqnr, abs=1e-9)


class _OpaqueWeight(torch.Tensor):
    """A wrapper weight that computes ``F.linear`` and nothing else: no flow unwraps it."""

    @staticmethod
    def __new__(cls, held: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, held.shape, dtype=held.dtype,
                                                   device=held.device)

    def __init__(self, held: torch.Tensor) -> None:
        self._held = held

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.linear:
            return func(args[0], args[1]._held, *args[2:], **kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        if func is torch.ops.aten.detach.default:
            return _OpaqueWeight(args[0]._held)
        raise NotImplementedError(f"_OpaqueWeight: no {func}")

    def __deepcopy__(self, memo):
        return _OpaqueWeight(copy.deepcopy(self._held, memo))


def test_a_weight_no_torch_op_reads_is_named_not_the_end_of_the_run():
    """A layer whose weight is a tensor subclass whose values no op reads (a wrapper no flow
    unwraps, here around a torchao weight) has its weights left out, with a note naming the
    weight and why; the run and every other row survive. Oracle: the other layers' weight
    SQNRs from their tensors' fields in float64."""
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    f = _mlp()
    q = copy.deepcopy(f)
    quantize_(q, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    q[2].weight = nn.Parameter(_OpaqueWeight(q[2].weight.detach()), requires_grad=False)
    batches = _outlier_batches(factor=1.0)
    report = fxn.compare(f, q, batches, progress=False)
    note = report.row("2").note
    assert "weights not compared" in note and "`2.weight`" in note and "_OpaqueWeight" in note
    assert "NotImplementedError" in note
    assert math.isfinite(report.row("2").output_sqnr)
    for path in ("0", "4"):
        by_hand = fxn.sqnr(f.get_submodule(path).weight.double(),
                           _intx_by_hand(q.get_submodule(path).weight))
        assert report.row(path).weight_sqnr == pytest.approx(by_hand, abs=1e-3)
