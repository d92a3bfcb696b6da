"""Oracle tests on Hugging Face transformers models, which torch.fx cannot trace whole.

Tiny configs, random weights under a fixed seed, nothing downloaded. Each model is
dynamically quantized (qint8 Linear, and float16 where torch runs it) and compared by torch's
eager Numeric Suite (the oracle) and by fxnumeric, on fresh copies:

* ``compare_model_outputs`` and ``compare_weights`` (model and state-dict forms) return every
  key the eager suite returns, with identical tensors;
* ``compare()``'s output SQNR of each Linear equals the SQNR of the eager suite's tensors.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.ao.ns._numeric_suite as tns
from torch import nn

import fxnumeric as ns

transformers = pytest.importorskip("transformers")

SEQ = 8
BATCH = 2


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]  # the model's first positional input


def _ids() -> torch.Tensor:
    return torch.randint(0, 99, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _pixels() -> torch.Tensor:
    return torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def _bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg)


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)


def _vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    return transformers.ViTModel(cfg)


def _distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4,
                                        hidden_dim=37, max_position_embeddings=32)
    return transformers.DistilBertModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


CASES = [
    Case("bert", _bert, _ids),
    Case("gpt2", _gpt2, _ids),
    Case("vit", _vit, _pixels),
    Case("distilbert", _distilbert, _ids),
    Case("llama", _llama, _ids),
]
DTYPES = {"qint8": torch.qint8, "float16": torch.float16}


@pytest.fixture(scope="module")
def pairs() -> dict[tuple[str, str], tuple[nn.Module, nn.Module]]:
    """Pristine float/quantized pairs; tests take deep copies (the eager suite mutates)."""
    built = {}
    for case in CASES:
        torch.manual_seed(0)
        float_model = case.build().eval()
        for dtype_name, dtype in DTYPES.items():
            quant = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(float_model), {nn.Linear}, dtype=dtype
            )
            built[case.name, dtype_name] = (float_model, quant)
    return built


def _fresh(pairs, key) -> tuple[nn.Module, nn.Module]:
    float_model, quant = pairs[key]
    return copy.deepcopy(float_model), copy.deepcopy(quant)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.is_quantized or b.is_quantized:
            return a.is_quantized and b.is_quantized and torch.equal(a.int_repr(), b.int_repr())
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_superset_and_equal(ours: dict, theirs: dict) -> None:
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"keys torch's eager suite returns and fxnumeric does not: {missing}"
    for key in theirs:
        for side in ("float", "quantized"):
            assert _same(ours[key][side], theirs[key][side]), f"{key} [{side}] differs"


KEYS = [(c.name, d) for c in CASES for d in DTYPES]
CASE_OF = {c.name: c for c in CASES}


@pytest.mark.parametrize("key", KEYS, ids=[f"{m}-{d}" for m, d in KEYS])
def test_compare_model_outputs_matches_eager(pairs, key):
    x = CASE_OF[key[0]].inputs()
    theirs = tns.compare_model_outputs(*_fresh(pairs, key), x)
    float_model, quant = pairs[key]
    ours = ns.compare_model_outputs(float_model, quant, x)
    assert theirs, "the oracle logged nothing: the test would prove nothing"
    _assert_superset_and_equal(ours, theirs)


@pytest.mark.parametrize("key", KEYS, ids=[f"{m}-{d}" for m, d in KEYS])
def test_compare_weights_matches_eager(pairs, key):
    float_model, quant = pairs[key]
    theirs = tns.compare_weights(float_model.state_dict(), quant.state_dict())
    assert theirs
    by_state_dict = ns.compare_weights(float_model.state_dict(), quant.state_dict())
    _assert_superset_and_equal(by_state_dict, theirs)
    by_model = ns.compare_weights(float_model, quant)
    missing = sorted(set(theirs) - set(by_model))
    assert not missing, f"model form misses {missing}"
    for k in theirs:
        assert torch.equal(by_model[k]["float"], theirs[k]["float"]), k
        assert _same(by_model[k]["quantized"], theirs[k]["quantized"]), k


@pytest.mark.parametrize("key", KEYS, ids=[f"{m}-{d}" for m, d in KEYS])
def test_compare_sqnr_of_each_linear_equals_eager(pairs, key):
    x = CASE_OF[key[0]].inputs()
    theirs = tns.compare_model_outputs(*_fresh(pairs, key), x)
    float_model, quant = pairs[key]
    report = ns.compare(float_model, quant, [x], comparisons=("outputs",))
    rows = {row.name: row for row in report.rows}
    linears = [k for k in theirs if isinstance(quant.get_submodule(k[: -len(".stats")]), nn.Module)
               and "linear" in type(quant.get_submodule(k[: -len(".stats")])).__name__.lower()]
    assert linears
    for k in linears:
        (ref,), (actual,) = theirs[k]["float"], theirs[k]["quantized"]
        expected = ns.sqnr(ref, actual)
        got = rows[k[: -len(".stats")]].output["sqnr"]
        assert abs(got - expected) < 0.01, (k, got, expected)


def test_pairs_say_how_they_were_found(pairs):
    float_model, quant = pairs["bert", "qint8"]
    m = ns.match(float_model, quant)
    by_name = {p.name: p for p in m.pairs}
    assert by_name["encoder.layer.0.attention.self.query"].found_by == "module"
    dense = by_name["encoder.layer.0.intermediate.dense"]
    assert (dense.found_by, dense.region) == ("graph", "encoder.layer.0.intermediate")
    assert "encoder.layer.0.attention.self" in dict(m.untraced)
    assert m.coverage == 1.0 and not m.unmatched_float and not m.unmatched_quant


def test_user_models_untouched_and_outputs_unchanged(pairs):
    float_model, quant = pairs["bert", "qint8"]
    x = _ids()
    before = [dict(mod._forward_hooks) for mod in quant.modules()]
    with torch.no_grad():
        expected = quant(x).last_hidden_state
    float_gm, quant_gm = ns.add_loggers(float_model, quant)
    with torch.no_grad():
        got = quant_gm(x).last_hidden_state
    assert torch.equal(got, expected)
    assert [dict(mod._forward_hooks) for mod in quant.modules()] == before
    assert ns.loggers_of(quant_gm)["encoder.layer.1.output.dense"].stats["tensor_val"]
    assert not any(isinstance(mod, ns.Logger) for mod in quant.modules())


def test_keyword_inputs(pairs):
    float_model, quant = pairs["bert", "qint8"]
    batch = {"input_ids": _ids(), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
    batch["attention_mask"][:, -2:] = 0
    m = ns.match(float_model, quant, example_inputs=batch)
    report = ns.compare(float_model, quant, [batch, batch], matching=m)
    assert report.batches == 2
    row = {r.name: r for r in report.rows}["encoder.layer.1.output.dense"]
    assert row.output["sqnr"] > 10
    acts = ns.compare_model_outputs(float_model, quant, batch)
    assert "pooler.dense.stats" in acts


def test_inputs_the_model_cannot_run_name_the_argument(pairs):
    float_model, quant = pairs["bert", "qint8"]
    with pytest.raises(ns.InputError, match=r"input_ids=Tensor\[2, 8\] float32"):
        ns.compare(float_model, quant, [{"input_ids": _ids().float()}])
    with pytest.raises(ns.InputError, match=r"input_ids=Tensor\[2, 8\] float32"):
        ns.match(float_model, quant, example_inputs={"input_ids": _ids().float()})
    lin = nn.Sequential(nn.Linear(4, 4)).eval()
    qlin = torch.ao.quantization.quantize_dynamic(copy.deepcopy(lin), {nn.Linear})
    with pytest.raises(ns.InputError, match="unexpected keyword input 'inputs'.*takes \\(input\\)"):
        ns.compare(lin, qlin, [{"inputs": torch.randn(2, 4)}])


def test_shadows_on_module_tree_pairs(pairs):
    float_model, quant = pairs["bert", "qint8"]
    quant_gm, skipped = ns.add_shadows(float_model, quant)
    quant_gm(_ids())
    stats = ns.loggers_of(quant_gm)["encoder.layer.0.attention.self.query"].stats
    assert stats["float"][0].shape == stats["quantized"][0].shape == (BATCH, SEQ, 32)
    assert ns.sqnr(stats["float"][0], stats["quantized"][0]) > 20


def test_prepare_in_place_and_stubs_on_a_module_tree_capture(pairs):
    float_model, quant = _fresh(pairs, ("bert", "qint8"))
    x = _ids()
    ns.prepare_model_outputs(float_model, quant)
    float_model(x)
    quant(x)
    acts = ns.get_matching_activations(float_model, quant)
    theirs = tns.compare_model_outputs(*_fresh(pairs, ("bert", "qint8")), x)
    _assert_superset_and_equal(acts, theirs)
    ns.remove_instrumentation(float_model)
    ns.remove_instrumentation(quant)
    assert "forward" not in quant.__dict__
    stubs = ns.compare_model_stub(*pairs["bert", "qint8"], [nn.Linear], x)
    their_stubs = tns.compare_model_stub(*_fresh(pairs, ("bert", "qint8")), [nn.Linear], x)
    assert set(their_stubs) <= set(stubs)
    entry = stubs["encoder.layer.0.output.dense.stats"]
    assert ns.sqnr(entry["float"][0], entry["quantized"][0]) > 20


def test_cli_report_on_a_transformers_factory(user_module, capsys):
    from fxnumeric.cli import main

    user_module("hfzoo",
        "import torch, transformers\n"
        "def bert():\n"
        "    torch.manual_seed(0)\n"
        "    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,\n"
        "                                  num_attention_heads=4, intermediate_size=37)\n"
        "    return transformers.BertModel(cfg)\n"
    )
    code = main(["report", "--model", "hfzoo:bert", "--quant", "dynamic", "--input-shape", "2,8",
                 "--input-dtype", "long", "--vocab", "99", "--batches", "2", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out
    assert out.rstrip().splitlines()[-1].startswith("2 batches; ")


def test_cli_report_on_a_factory_returning_a_transformer_and_its_pt2e_twin(user_module, capsys):
    """A factory returns the float BertModel and its pt2e model: torch.fx cannot trace the
    float one, and the module tree cannot walk the exported quantized graph. The default
    capture (auto) exports the float side (with --capture fx, nothing pairs)."""
    from fxnumeric.cli import main

    user_module("hfzoo_pt2e",
        "import copy, torch, transformers\n"
        "from fxnumeric.models import quantize_pt2e\n"
        "def bert():\n"
        "    torch.manual_seed(0)\n"
        "    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,\n"
        "                                  num_attention_heads=4, intermediate_size=37)\n"
        "    model = transformers.BertModel(cfg).eval()\n"
        "    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(1))\n"
        "    return model, quantize_pt2e(copy.deepcopy(model), [ids])[1]\n"
    )
    args = ["report", "--model", "hfzoo_pt2e:bert", "--input-shape", "2,8",
            "--input-dtype", "long", "--vocab", "99", "--batches", "2", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in out
    assert out.rstrip().splitlines()[-1].startswith("2 batches; ")
    assert main([*args, "--capture", "fx"]) != 0
    assert "nothing paired" in capsys.readouterr().err


@pytest.mark.parametrize("comparisons", [("weights",), ("shadows",)])
def test_compare_without_float_observers_runs_the_float_model_as_it_is(pairs, comparisons):
    float_model, quant = pairs["bert", "qint8"]
    batch = {"input_ids": _ids(), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}
    report = ns.compare(float_model, quant, [batch], comparisons=comparisons)
    assert report.model_output["sqnr"] > 10


def test_swapped_models_are_caught_by_the_guards(pairs):
    float_model, quant = pairs["bert", "qint8"]
    with pytest.raises(ns.InputError, match="look swapped"):
        ns.match(quant, float_model)


@pytest.mark.parametrize("model", ["llama", "gpt2", "vit"])
def test_full_compare_shadows_every_linear(pairs, model):
    float_model, quant = pairs[model, "qint8"]
    report = ns.compare(float_model, quant, [CASE_OF[model].inputs()])
    # GPT-2's Conv1D layers are linear too, but quantize_dynamic leaves them float
    linears = [r for r in report.rows if r.kind == "linear" and r.quantized]
    assert linears and all(r.shadow.get("sqnr", 0) > 10 and r.weight_sqnr for r in linears)
    assert all(r.weight_sqnr is None for r in report.rows if not r.quantized)  # nothing to compare
    assert not [r.note for r in report.rows if r.note.startswith("no shadow")]


def test_falcon_reads_its_layers_as_they_are():
    """Falcon's decoder layer writes the attention output into the MLP's (``mlp_output +=
    attention_output``, untraced code): the MLP's output read 7 dB against a quantized model
    that differed only in ``lm_head``. Its ``FalconLinear`` (an ``nn.Linear`` subclass that
    quantize_dynamic leaves float) read ``module:FalconLinear``."""
    import transformers

    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4)
    model = transformers.FalconForCausalLM(config).eval()
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 64, (2, 6), generator=gen)} for _ in range(2)]
    report = ns.compare(model, quant, data)
    rows = {r.name: r for r in report.rows}
    modules = dict(model.named_modules())
    float_linears = [r for name, r in rows.items() if name.startswith("transformer.h.")
                     and isinstance(modules.get(name), nn.Linear)]
    assert len(float_linears) == 8
    for row in float_linears:  # left float, fed the float model's own values: no error
        assert row.kind == "linear" and not row.quantized
        assert row.output_sqnr == math.inf and row.shadow_sqnr == math.inf
    assert rows["lm_head"].quantized and math.isfinite(rows["lm_head"].output_sqnr)


def test_the_end_metric_reads_the_logits_not_the_loss_of_a_labelled_batch():
    # with labels a classifier returns (loss, logits): advise and sensitivity read the loss
    # (95 dB) where compare's model output reads the logits (44 dB)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    f = transformers.BertForSequenceClassification(config).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 128, (2, 12), generator=gen),
             "labels": torch.tensor([0, 2])} for _ in range(3)]
    with torch.no_grad():
        ref = torch.cat([f(**b).logits for b in data])
        out = torch.cat([q(**b).logits for b in data])
    expected = ns.sqnr(ref, out)
    assert ns.compare(f, q, data).model_output["sqnr"] == pytest.approx(expected, rel=1e-6)
    assert ns.sensitivity(f, q, data, metric="sqnr").quantized == pytest.approx(expected,
                                                                                  rel=1e-6)


def test_albert_reads_each_call_of_its_shared_layer_where_it_runs():
    """ALBERT runs its one layer once per layer of the model. Its GELU activation (a module
    torch.fx traces: a region of its own graph) read the calls pooled, one set of rows listed
    after every call's ``ffn``; each call is a set of rows of its own, in run order."""
    config = transformers.AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32,
                                       num_hidden_layers=3, num_attention_heads=4,
                                       intermediate_size=37, max_position_embeddings=32)
    torch.manual_seed(0)
    f = transformers.AlbertModel(config).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 99, (BATCH, SEQ), generator=gen) for _ in range(2)]
    report = ns.compare(f, q, data)
    layer = "encoder.albert_layer_groups.0.albert_layers.0."
    names = [r.name[len(layer):] for r in report.rows if r.name.startswith(layer)]
    calls = [[n for n in names if n.partition("#")[2] == site] for site in ("", "2", "3")]
    assert calls[0][0] == "attention.query" and calls[0][-1] == "full_layer_layer_norm"
    assert names == calls[0] + calls[1] + calls[2]  # call after call
    assert calls[2] == [f"{n}#3" for n in calls[0]]
    outputs: dict[str, list[torch.Tensor]] = {"float": [], "quant": []}
    hooks = [m.get_submodule(layer + "activation").register_forward_hook(
        lambda mod, args, out, kept=outputs[side]: kept.append(out.double()))
        for side, m in (("float", f), ("quant", q))]
    with torch.no_grad():
        for ids in data:
            f(ids), q(ids)
    for h in hooks:
        h.remove()
    for site, suffix in enumerate(("", "#2", "#3")):
        ref = torch.cat([t.flatten() for t in outputs["float"][site::3]])
        actual = torch.cat([t.flatten() for t in outputs["quant"][site::3]])
        row = report.row(f"{layer}activation.mul_3{suffix}")  # the activation's output
        assert row.output_sqnr == pytest.approx(ns.sqnr(ref, actual), abs=1e-4)


def test_opt_in_training_mode_is_refused_though_its_dropout_is_functional():
    """OPT drops out with ``F.dropout(x, p=self.dropout, training=self.training)``: no dropout
    module, and its decoder layers are kept whole, so no traced graph shows it either.
    Built from a config (training mode), compare read 10.62 dB then 10.21 dB for one torchao
    int8 weight-only pair (42.59 dB in eval mode): dropout noise taken for quantization error."""
    config = transformers.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                    max_position_embeddings=32)  # dropout=0.1
    torch.manual_seed(0)
    f = transformers.OPTForCausalLM(config)
    assert f.training and config.dropout == 0.1
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f).eval(), {nn.Linear}).train()
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 99, (BATCH, SEQ), generator=gen)} for _ in range(2)]
    for call in (lambda: ns.compare(f, q, data), lambda: ns.sensitivity(f, q, data, "sqnr")):
        with pytest.raises(ns.InputError, match=r"(?s)float model is in training mode: "
                                                r"`model\.decoder` \(OPTDecoder with dropout="
                                                r"0\.1\) and 2 more.*float_model\.eval\(\)"):
            call()
    f.eval()
    with pytest.raises(ns.InputError, match=r"quantized model is in training mode: "
                                            r"`model\.decoder` \(OPTDecoder with dropout=0\.1"):
        ns.compare(f, q, data)
    q.eval()
    with torch.no_grad():
        ref = torch.cat([f(**b, use_cache=False).logits for b in data])
        out = torch.cat([q(**b, use_cache=False).logits for b in data])
    report = ns.compare(f, q, data)
    assert report.model_output["sqnr"] == pytest.approx(_direct_sqnr(ref, out), rel=1e-6)
    assert ns.compare(f, q, data).model_output["sqnr"] == report.model_output["sqnr"]


def test_a_transformer_in_training_mode_without_dropout_compares_as_it_is():
    """Training mode alone is not refused: OPT with every dropout at 0 computes alike in
    either mode (as Llama, whose attention_dropout is 0 by default)."""
    config = transformers.OPTConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                                    max_position_embeddings=32, dropout=0.0)
    torch.manual_seed(0)
    f = transformers.OPTForCausalLM(config)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear}).train()
    assert f.training and q.training
    data = [{"input_ids": _ids()}]
    with torch.no_grad():
        ref = f(**data[0], use_cache=False).logits
        out = q(**data[0], use_cache=False).logits
    assert ns.compare(f, q, data).model_output["sqnr"] == pytest.approx(_direct_sqnr(ref, out),
                                                                         rel=1e-6)


def _direct_sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))


def test_gpt2_with_nothing_quantized_warns_with_the_count_of_its_ops():
    """GPT-2's Conv1D layers are no nn.Linear: quantize_ of the Linears leaves it float. The
    warning counted the one op calling the model whole, "all 1 ops", over 32 rows."""
    torch.manual_seed(0)
    f = _gpt2().eval()
    with pytest.warns(ns.FxNumericWarning) as caught:
        report = ns.compare(f, copy.deepcopy(f), [_ids()])
    messages = [str(w.message) for w in caught if w.category is ns.FxNumericWarning]
    assert len(messages) == 1 and len(report.rows) == 32
    assert messages[0].startswith("the quantized model has no quantized op (all 32 ops are float)")


def test_a_llama_missing_a_decoder_layer_pairs_each_layer_with_its_own_weights():
    """A quantized Llama with its middle decoder layer deleted: the module tree paired its
    `layers.1` (the float `layers.2`) with the float `layers.1` by name, and every Linear of
    it read weight SQNR -2.5 to -3.6 dB, as two unrelated layers do. The layers pair by their
    weights: each reads what its float twin, fed the same input, reads against it by hooks,
    and the float layer the quantized model lacks is unpaired, saying so."""
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    f = transformers.LlamaForCausalLM(cfg).eval()
    shorter = copy.deepcopy(f)
    del shorter.model.layers[1]
    shorter.config.num_hidden_layers = 2
    for i, layer in enumerate(shorter.model.layers):
        layer.self_attn.layer_idx = i
    q = torch.ao.quantization.quantize_dynamic(shorter, {nn.Linear})
    data = [_ids()]
    report = ns.compare(f, q, data, progress=False)
    row = report.row("model.layers.1.self_attn.q_proj")
    assert row.float_nodes == ("model.layers.2.self_attn.q_proj",)
    seen = []
    hook = q.model.layers[1].self_attn.q_proj.register_forward_hook(
        lambda m, args, out: seen.append((args[0], out)))
    with torch.no_grad():
        q(data[0])
    hook.remove()
    twin = f.model.layers[2].self_attn.q_proj
    with torch.no_grad():
        alone = twin(seen[0][0])
    assert row.shadow_sqnr == pytest.approx(ns.sqnr(alone, seen[0][1]), abs=1e-3)
    quant_weight = q.model.layers[1].self_attn.q_proj.weight().dequantize()
    assert row.weight_sqnr == pytest.approx(ns.sqnr(twin.weight, quant_weight), abs=1e-3)
    assert min(r.weight_sqnr for r in report.rows if r.weight_sqnr is not None) > 30
    (missing,) = [u for u in report.unmatched if u[1] == "float"]
    assert missing[0] == "model.layers.1" and "the quantized model lacks it" in missing[2]


def test_advice_on_gpt2_says_its_lines_apply_once_the_conv1d_layers_are_converted():
    """GPT-2's Conv1D layers, converted to nn.Linear to be quantized: the advice's lines name
    them, and on the float model itself quantize_dynamic leaves them float (the claimed SQNR
    read inf there). Oracle: the line applied to a converted copy gives the claimed value."""
    import warnings

    from _models import conv1d_as_linear as converted
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    from transformers.pytorch_utils import Conv1D

    from fxnumeric.errors import FxNumericWarning

    torch.manual_seed(0)
    f = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    q = quantize_dynamic(converted(copy.deepcopy(f)), {nn.Linear})
    data = [{"input_ids": torch.randint(3, 256, (3, 12),
                                        generator=torch.Generator().manual_seed(1))}]

    def sqnr(model: nn.Module) -> float:
        with torch.no_grad():
            a, b = f(**data[0]).logits.double(), model(**data[0]).logits.double()
        return 10 * math.log10(float((a ** 2).sum() / ((a - b) ** 2).sum()))

    advice = ns.advise(f, q, data, metric="sqnr", target=sqnr(q) + 3, progress=False)
    conv1d = tuple(n for n, m in f.named_modules() if isinstance(m, Conv1D))
    assert advice.converted == conv1d and len(conv1d) == 8
    with pytest.warns(FxNumericWarning, match=r"8 layers \(transformer\.h\.0\.attn\.c_attn, .*"
                                              r"are transformers Conv1D in the float model"):
        line = advice.dynamic_lines()
    assert "note: 8 layers (transformer.h.0.attn.c_attn" in advice.summary()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        namespace = {"quantize_dynamic": quantize_dynamic,
                     "default_dynamic_qconfig": default_dynamic_qconfig,
                     "model": converted(copy.deepcopy(f))}
        exec(line, namespace)  # noqa: S102
        built = namespace["model"]
    assert sqnr(built) == pytest.approx(advice.value, rel=1e-6)


def _layer_outputs(model: nn.Module, layers: list[nn.Module], batches) -> tuple[list, torch.Tensor]:
    """Each layer's output tensor per batch, read by forward hooks on a plain forward of
    ``model``, and the model's output on the last batch."""
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.register_forward_hook(
        lambda m, args, out, i=i: seen[i].append(out[0] if isinstance(out, tuple) else out))
        for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            outputs = [model(**batch)[0] for batch in batches]
    finally:
        for hook in hooks:
            hook.remove()
    return seen, outputs


def _sqnr_over(refs: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
    """SQNR of every batch's values together (signal and noise summed over batches)."""
    signal = sum(r.double().pow(2).sum() for r in refs)
    noise = sum((r.double() - o.double()).pow(2).sum() for r, o in zip(refs, outs, strict=True))
    return float(10 * torch.log10(signal / noise))


@pytest.mark.parametrize("with_inputs", [True, False], ids=["match-on-inputs", "match-alone"])
def test_a_bert_layer_kept_whole_takes_what_its_kwargs_took(with_inputs, monkeypatch):
    """transformers 5's BERT encoder passes each BertLayer ``position_ids`` through its
    ``**kwargs``. Kept whole (``leaf_modules``, or accelerate's ``preload_module_classes``),
    the layer's one-op graph did not take it, and compare blamed the input: "the float model
    failed on the input ... unexpected keyword argument 'position_ids'". A matching made
    without example inputs learns the names on the first batch of compare, diagnose and
    sensitivity. Oracle: each layer's output read by forward hooks on the plain models, and
    the model output."""
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    f = transformers.BertForMaskedLM(cfg).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1:, SEQ // 2:] = 0
    batches = [{"input_ids": _ids(), "attention_mask": mask},
               {"input_ids": _ids().flip(0), "attention_mask": mask}]
    layer = type(f.bert.encoder.layer[0])
    matching = ns.match(f, q, leaf_modules=[layer],
                        example_inputs=batches[0] if with_inputs else None)
    recorded = []
    match_module = importlib.import_module("fxnumeric.match")  # ns.match is the function
    record_calls = match_module.record_calls
    monkeypatch.setattr(match_module, "record_calls",
                        lambda *a, **k: recorded.append(k["which"]) or record_calls(*a, **k))
    report = ns.compare(f, q, batches, matching=matching, progress=False)
    # one run records both the kwargs and the run order (it took two), none when match had it
    assert recorded == ([] if with_inputs else ["quantized"])
    float_seen, float_out = _layer_outputs(f, list(f.bert.encoder.layer), batches)
    quant_seen, quant_out = _layer_outputs(q, list(q.bert.encoder.layer), batches)
    for i in range(2):
        row = report.row(f"bert.encoder.layer.{i}")
        assert row.output_sqnr == pytest.approx(_sqnr_over(float_seen[i], quant_seen[i]),
                                                rel=1e-6)
    # the model output (logits) of real tokens only, padding left out
    float_out = [o[b["attention_mask"].bool()] for o, b in zip(float_out, batches, strict=True)]
    quant_out = [o[b["attention_mask"].bool()] for o, b in zip(quant_out, batches, strict=True)]
    assert report.model_output["sqnr"] == pytest.approx(_sqnr_over(float_out, quant_out),
                                                        rel=1e-6)
    # diagnose and sensitivity run the same matching (they had no first batch to learn from)
    diagnosis = ns.diagnose(f, q, batches, matching=matching, progress=False)
    assert diagnosis.layer("bert.encoder.layer.1").cumulative_sqnr == pytest.approx(
        _sqnr_over(float_seen[1], quant_seen[1]), rel=1e-6)
    s = ns.sensitivity(f, q, batches, matching=matching, metric="sqnr", progress=False)
    assert s.quantized == pytest.approx(_sqnr_over(float_out, quant_out), rel=1e-6)
