"""LLM outputs in LLM terms (issue 19, item 1): compare's model output of a decoder that
returns logits carries per-token KL, its p99 and max, top-1 agreement and perplexities over
real tokens, read another way by a direct computation; layer metrics are unchanged."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _models import nan_in_layer1_norm_pair, run_order_and_first_nonfinite

import fxnumeric as ns
from fxnumeric.llm_metrics import LLM_METRICS
from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches

torchao = pytest.importorskip("torchao")


def _int4(model):
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_

    q = copy.deepcopy(model)
    quantize_(q, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    return q


def _direct(f, q, batches):
    """The metrics computed plainly, in float64, over the real (attention_mask) tokens."""
    kls, agree, nll_f, nll_q, targets = [], 0, 0.0, 0.0, 0
    with torch.no_grad():
        for b in batches:
            lf = F.log_softmax(f(**b).logits.double(), -1)
            lq = F.log_softmax(q(**b).logits.double(), -1)
            mask = b["attention_mask"].bool()
            kl = (lf.exp() * (lf - lq)).sum(-1)[mask]
            kls.append(kl)
            agree += int((lf.argmax(-1) == lq.argmax(-1))[mask].sum())
            nxt = b["input_ids"][:, 1:]
            valid = mask[:, 1:] & mask[:, :-1]
            nll_f -= float(lf[:, :-1].gather(-1, nxt[..., None])[..., 0][valid].sum())
            nll_q -= float(lq[:, :-1].gather(-1, nxt[..., None])[..., 0][valid].sum())
            targets += int(valid.sum())
    kls = torch.cat(kls)
    return {"kl": float(kls.mean()), "kl_max": float(kls.max()),
            "top1_agreement": agree / kls.numel(),
            "ppl_float": math.exp(nll_f / targets), "ppl_quantized": math.exp(nll_q / targets)}


def test_the_model_output_of_a_decoder_speaks_kl_top1_and_perplexity(tmp_path):
    f = tiny_llama().eval()
    q = _int4(f)
    data = tiny_llm_batches(vocab_size=256, n=2)
    assert (data[0]["attention_mask"] == 0).any()  # padded sequences: padding must not count
    report = ns.compare(f, q, data, progress=False)
    expected = _direct(f, q, data)
    for key, value in expected.items():
        assert report.model_output[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert set(LLM_METRICS) <= set(report.model_output)
    summary = report.summary()
    assert f"per-token KL {report.model_output['kl']:.4g} nats" in summary
    assert "top-1 agreement" in summary and "perplexity" in summary
    assert "per-token KL" in report.table()
    assert "per-token KL" in report.to_html(tmp_path / "r.html").read_text()
    assert ns.Report.from_json(report.to_json()).model_output == report.model_output
    last = report.to_csv(tmp_path / "r.csv").read_text().splitlines()
    header, model_row = last[0].split(","), last[-1].split(",")
    assert model_row[0] == "(model output)"
    assert float(model_row[header.index("kl")]) == pytest.approx(report.model_output["kl"])
    # layer metrics stay what they are: SQNR of each Linear, no KL of hidden states
    assert all("kl" not in r.output for r in report.rows)


def _with_labels(batch):
    """``batch`` with labels: its input ids, -100 (no target) at padding."""
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return {**batch, "labels": labels}


def test_labels_give_the_perplexity_of_the_labels():
    f = tiny_llama().eval()
    q = _int4(f)
    batch = tiny_llm_batches(vocab_size=256, n=1)[0]
    with_labels = _with_labels(batch)
    report = ns.compare(f, q, [with_labels], progress=False)
    with torch.no_grad():  # transformers' own loss over the same labels
        loss_f = float(f(**with_labels).loss)
        loss_q = float(q(**with_labels).loss)
    assert report.model_output["ppl_float"] == pytest.approx(math.exp(loss_f), rel=1e-4)
    assert report.model_output["ppl_quantized"] == pytest.approx(math.exp(loss_q), rel=1e-4)
    # the output compared is the logits, not the loss listed first; of real tokens only
    real = batch["attention_mask"].bool()
    assert report.model_output["sqnr"] == pytest.approx(
        ns.sqnr(f(**batch).logits.detach()[real], q(**batch).logits.detach()[real]), abs=1e-4)


def test_a_tokenizers_batch_encoding_is_keyword_inputs_and_a_tuple_output_skips_its_loss():
    # a BatchEncoding (a Mapping, not a dict) was passed as one positional input; with
    # return_dict=False and labels the model output compared was the scalar loss
    import transformers

    f = tiny_llama().eval()
    q = _int4(f)
    batch = tiny_llm_batches(vocab_size=256, n=1)[0]
    with_labels = _with_labels(batch)
    plain = ns.compare(f, q, [with_labels], progress=False)
    encoded = ns.compare(f, q, [transformers.BatchEncoding(with_labels)], progress=False)
    assert encoded.model_output == pytest.approx(plain.model_output, rel=1e-6)
    as_tuple = ns.compare(f, q, [{**with_labels, "return_dict": False}], progress=False)
    assert as_tuple.model_output == pytest.approx(plain.model_output, rel=1e-6)
    expected = _direct(f, q, [batch])
    assert as_tuple.model_output["kl"] == pytest.approx(expected["kl"], rel=1e-4)


def test_a_batch_asking_for_a_cache_runs_without_one_and_says_so():
    # a layer and its float twin both wrote into the model's one DynamicCache: "the size of
    # tensor a (32) must match the size of tensor b (16)" with shadows on
    f = tiny_llama().eval()
    q = _int4(f)
    batch = tiny_llm_batches(vocab_size=256, n=1)[0]
    with pytest.warns(ns.FxNumericWarning, match="use_cache=True: fxnumeric runs each batch"):
        cached = ns.compare(f, q, [{**batch, "use_cache": True}], progress=False)
    plain = ns.compare(f, q, [batch], progress=False)
    assert cached.model_output == pytest.approx(plain.model_output, rel=1e-6)
    assert [r.shadow_sqnr for r in cached.rows] == pytest.approx([r.shadow_sqnr for r in plain.rows])


def test_a_bfloat16_quantized_model_against_its_float32_original():
    # the shadows fed bfloat16 values to float32 twins: "expected m1 and m2 to have the same
    # dtype" with shadows on; a twin now reads them in its weights' dtype
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    f = tiny_llama().eval()
    q = copy.deepcopy(f).to(torch.bfloat16)
    quantize_(q, Int8WeightOnlyConfig())
    data = tiny_llm_batches(vocab_size=256, n=1)
    report = ns.compare(f, q, data, progress=False)
    expected = _direct(f, q, data)
    assert report.model_output["kl"] == pytest.approx(expected["kl"], rel=1e-3)
    shadows = [r.shadow_sqnr for r in report.rows if r.quantized]
    assert shadows and all(math.isfinite(v) and v > 20 for v in shadows)


def test_batches_of_padding_alone_say_so():
    # compare dropped the LLM metrics without a word; advise blamed NaN outputs
    f = tiny_llama().eval()
    q = _int4(f)
    batch = tiny_llm_batches(vocab_size=256, n=1)[0]
    padding = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])}
    report = ns.compare(f, q, [padding], progress=False)
    assert not set(LLM_METRICS) & set(report.model_output)
    assert any("no batch holds a real token" in note for note in report.notes)
    assert "no batch holds a real token" in report.table()
    # nor has the model output: its metrics are NaN, not read off the padding
    assert math.isnan(report.model_output["sqnr"])
    assert any("no real token to read: every position is padding" in n for n in report.notes)
    with pytest.raises(ns.InputError, match="metric 'kl' is read over real tokens, and no batch"):
        ns.advise(f, q, [padding], metric="kl", target=0.1, progress=False)
    notes = ns.compare(f, q, [batch], progress=False).notes
    assert len(notes) == 1
    assert notes[0].startswith("model output: its metrics read real tokens only (attention_mask)")


def test_a_model_without_logits_has_no_llm_metrics():
    torch.manual_seed(0)
    f = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    report = ns.compare(f, q, [torch.randn(4, 8)], progress=False)
    assert not set(LLM_METRICS) & set(report.model_output)
    assert "KL" not in report.summary()


def test_real_smollm2_under_int8_reads_as_the_models_run_directly(smollm2_float):
    from torchao.quantization import quantize_

    from fxnumeric.models import torchao_config, untied_linears
    from fxnumeric.zoo_llm import LLM_TEXTS, llm_batches

    model, tokenizer = smollm2_float
    q = copy.deepcopy(model)
    quantize_(q, torchao_config("int8-weight-only"), filter_fn=untied_linears(q))
    data = llm_batches(tokenizer, LLM_TEXTS)
    report = ns.compare(model, q, data, comparisons=("outputs",), progress=False)
    expected = _direct(model, q, data)
    for key in ("kl", "top1_agreement", "ppl_float", "ppl_quantized"):
        assert report.model_output[key] == pytest.approx(expected[key], rel=1e-3), key
    assert report.model_output["kl"] < 0.05 and report.model_output["top1_agreement"] > 0.9


class _Wrapper(torch.nn.Module):
    """A user's thin wrapper: torch.fx traces it, keeping the untraceable Llama inside whole."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask=None):
        return self.m(input_ids=input_ids, attention_mask=attention_mask)


def test_a_wrapper_around_a_decoder_names_no_container_a_culprit():
    """The wrapper's graph called `m.model` (a LlamaModel kept whole): paired as a layer, its
    "shadow" was the whole float stack fed the quantized input (the accumulated error, 32 dB)
    and the verdict named it the culprit, while its own layers read 44 dB each."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    f = tiny_llama()
    q = copy.deepcopy(f)
    quantize_(q, Int8WeightOnlyConfig())
    data = tiny_llm_batches(n=2)
    comparisons = ("weights", "outputs", "shadows")
    plain = ns.compare(f, q, data, progress=False, comparisons=comparisons)
    wrapped = ns.compare(_Wrapper(f), _Wrapper(q), data, progress=False,
                         comparisons=comparisons)

    container = wrapped.row("m.model")  # the LlamaModel's output, compared; no shadow
    assert not container.shadow and "own layers are compared inside it" in container.notes
    assert container.output["sqnr"] == pytest.approx(plain.row("model.norm").output["sqnr"])
    assert wrapped.culprit == plain.culprit is None
    for row in plain.rows:  # the same layers, read the same
        twin = wrapped.row(f"m.{row.name}")
        assert twin.output.get("sqnr") == pytest.approx(row.output.get("sqnr"), abs=1e-6)
        assert twin.shadow.get("sqnr") == pytest.approx(row.shadow.get("sqnr"), abs=1e-6)
    outputs = []
    hooks = [m.model.layers[1].self_attn.o_proj.register_forward_hook(
        lambda mod, a, o: outputs.append(o)) for m in (f, q)]
    with torch.no_grad():
        for batch in data:
            f(**batch)
            q(**batch)
    for h in hooks:
        h.remove()
    signal = sum(float(a.double().square().sum()) for a in outputs[::2])
    noise = sum(float((a.double() - b.double()).square().sum())
                for a, b in zip(outputs[::2], outputs[1::2], strict=True))
    assert wrapped.row("m.model.layers.1.self_attn.o_proj").output["sqnr"] == pytest.approx(
        10 * math.log10(signal / noise), abs=1e-4)


def test_a_matching_made_without_example_inputs_gives_rows_in_run_order():
    """match(f, q) of a module-tree model records no call order: compare listed its rows
    region by region (a layer's projections before the norm feeding them) and named the
    q_proj after a NaN'd norm where the NaN first appears. compare orders it on its first
    batch."""
    f, q = nan_in_layer1_norm_pair()
    data = tiny_llm_batches(n=1)
    order, origin = run_order_and_first_nonfinite(q, data[0])
    assert origin == "model.layers.1.input_layernorm"
    own = ns.compare(f, q, data, progress=False, comparisons=("outputs",))
    matching = ns.match(f, q)
    given = ns.compare(f, q, data, progress=False, comparisons=("outputs",), matching=matching)
    names = [row.name for row in given.rows]
    assert names == [row.name for row in own.rows]
    modules = [n for n in names if n in order]  # the rows that are modules, as they ran
    assert len(modules) > 10 and modules == sorted(modules, key=order.index)
    assert given.nonfinite == own.nonfinite == (("quantized", origin),)
    assert f"NaN/Inf first appears at {origin} in the quantized model" in given.notes[0]
    assert not matching.call_order  # the user's matching is left as it was


def test_advise_on_float_logits_poisoned_on_real_tokens_blames_the_float_model():
    # the LLM metrics were left out of the float outputs' check: NaN float logits read as
    # "NaN on the quantized model itself"
    f = tiny_llama().eval()
    q = _int4(f)
    with torch.no_grad():
        f.lm_head.weight[5, 0] = math.nan  # every token's logit 5: NaN in the float model only
    data = tiny_llm_batches(vocab_size=256, n=2)
    with torch.no_grad():
        assert all(f(**b).logits.isnan().any() and not q(**b).logits.isnan().any() for b in data)
    for metric in ("kl", "top1_agreement"):
        with pytest.raises(ns.InputError, match="the float model's output holds NaN/Inf on "
                                                "batches 0, 1 of data"):
            ns.sensitivity(f, q, data, metric=metric, progress=False)


def _bert_classifier(num_labels):
    import transformers

    torch.manual_seed(0)
    f = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37, num_labels=num_labels)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    data = [{"input_ids": torch.randint(0, 99, (4, 8), generator=torch.Generator().manual_seed(i))}
            for i in range(2)]
    return f, q, data


def test_a_single_logit_is_no_distribution_for_kl_or_top1():
    # a regressor's logits (B, 1), its quantized bias off by 5 (output SQNR -60 dB): a softmax
    # over one class is 1, so sensitivity read kl 0 and top1_agreement 1, advise said the
    # target 0.99 was "already reached", and compare printed "per-token KL 0 nats"
    f, q, data = _bert_classifier(1)
    q.classifier.set_weight_bias(q.classifier.weight(), torch.tensor([5.0]))
    with torch.no_grad():
        ref = torch.cat([f(**b).logits for b in data]).double()
        out = torch.cat([q(**b).logits for b in data]).double()
    by_hand = float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()))
    assert by_hand < -50
    report = ns.compare(f, q, data, progress=False)
    assert report.model_output["sqnr"] == pytest.approx(by_hand, abs=1e-3)
    assert not set(LLM_METRICS) & set(report.model_output)
    assert "KL" not in report.summary() and "top-1" not in report.summary()
    one_value = (r"(?s)metric '{}' reads the logits as a distribution over their last dim, and "
                 r"the model's logits have one value there \(shape \[4, 1\].*Fix: metric='sqnr'")
    for metric in ("kl", "top1_agreement"):
        with pytest.raises(ns.InputError, match=one_value.format(metric)):
            ns.sensitivity(f, q, data, metric=metric, progress=False)
        with pytest.raises(ns.InputError, match=one_value.format(metric)):
            ns.advise(f, q, data, metric=metric, target=0.99, progress=False)


def test_a_custom_metric_named_like_an_llm_metric_is_refused():
    # the model output's `kl` read the LLM metric while the layers' `kl` read the user's
    # function: one name, two meanings, with nothing said
    f = tiny_llama().eval()
    q = _int4(f)
    data = tiny_llm_batches(vocab_size=256, n=1)

    def mean_abs(ref, actual):
        return float((ref - actual).abs().mean())

    for name in LLM_METRICS:
        with pytest.raises(ns.InputError, match=f"custom metric name '{name}' is an LLM output"):
            ns.compare(f, q, data, metrics={name: mean_abs}, progress=False)
    report = ns.compare(f, q, data, metrics={"mean_abs": mean_abs}, progress=False)
    assert report.model_output["kl"] == pytest.approx(_direct(f, q, data)["kl"], rel=1e-4)
    real = data[0]["attention_mask"].bool()  # the model output reads real tokens only
    assert report.model_output["mean_abs"] == pytest.approx(
        float((f(**data[0]).logits - q(**data[0]).logits)[real].abs().mean()), rel=1e-5)


class _Causal(_Wrapper):
    """The wrapper of a user who says the model predicts the next token."""

    def can_generate(self) -> bool:
        return True


def test_a_model_of_unknown_kind_says_why_it_has_no_perplexity():
    # the user's own wrapper has no can_generate(): its input ids are not read as next
    # tokens (a masked LM's are not), and the report said nothing of the missing perplexity
    f = tiny_llama().eval()
    q = _int4(f)
    data = tiny_llm_batches(vocab_size=256, n=2)
    unknown = ns.compare(_Wrapper(f), _Wrapper(q), data, progress=False)
    assert "ppl_float" not in unknown.model_output
    assert any(n.startswith("no perplexity: nothing tells") for n in unknown.notes)
    expected = _direct(f, q, data)
    assert unknown.model_output["kl"] == pytest.approx(expected["kl"], rel=1e-4)
    causal = ns.compare(_Causal(f), _Causal(q), data, progress=False)
    assert causal.model_output["ppl_float"] == pytest.approx(expected["ppl_float"], rel=1e-4)
    assert not any(n.startswith("no perplexity") for n in causal.notes)


def test_labels_that_score_no_token_say_why_there_is_no_perplexity():
    """Labels all -100 (a prompt-only batch): transformers' loss is NaN (nothing to score), the
    perplexity keys are absent, and a note says why instead of dropping them silently."""
    f = tiny_llama().eval()
    q = _int4(f)
    batch = tiny_llm_batches(vocab_size=256, n=1)[0]
    ignored = {**batch, "labels": torch.full_like(batch["input_ids"], -100)}
    report = ns.compare(f, q, [ignored], progress=False)
    with torch.no_grad():
        assert math.isnan(float(f(**ignored).loss))  # the oracle: no token has a target
    assert "ppl_float" not in report.model_output and "kl" in report.model_output
    note = ("no perplexity: the batches give targets, but none of their real tokens has one "
            "(every label is -100")
    assert any(n.startswith(note) for n in report.notes)
    plain = ns.compare(f, q, [_with_labels(batch)], progress=False)  # some targets: no note
    assert "ppl_float" in plain.model_output
    assert not any(n.startswith("no perplexity") for n in plain.notes)


def test_a_batch_with_logits_to_keep_counts_in_the_perplexity():
    """A batch asking for its last positions' logits (logits_to_keep=4) is scored on those
    positions' next tokens: its targets were dropped, and the perplexity read the other
    batch alone with no note. Kept positions that do not run in a row give no perplexity,
    and a note says why."""
    f = tiny_llama().eval()
    q = _int4(f)
    first, second = tiny_llm_batches(vocab_size=256, n=2)
    kept = {**second, "logits_to_keep": 4}
    report = ns.compare(f, q, [first, kept], progress=False, comparisons=("outputs",))
    # the oracle: the kept positions' log-probabilities, scored on the next real token
    nll_f = nll_q = 0.0
    targets = 0
    with torch.no_grad():
        for b in (first, kept):
            lf = F.log_softmax(f(**b).logits.double(), -1)
            lq = F.log_softmax(q(**b).logits.double(), -1)
            k = lf.shape[1]
            ids, mask = b["input_ids"][:, -k:], b["attention_mask"][:, -k:].bool()
            valid = mask[:, 1:] & mask[:, :-1]
            nxt = ids[:, 1:, None]
            nll_f -= float(lf[:, :-1].gather(-1, nxt)[..., 0][valid].sum())
            nll_q -= float(lq[:, :-1].gather(-1, nxt)[..., 0][valid].sum())
            targets += int(valid.sum())
    assert report.model_output["ppl_float"] == pytest.approx(math.exp(nll_f / targets), rel=1e-5)
    assert report.model_output["ppl_quantized"] == pytest.approx(math.exp(nll_q / targets),
                                                                 rel=1e-5)
    scattered = {**second, "logits_to_keep": torch.tensor([0, 2, 3])}
    report = ns.compare(f, q, [first, scattered], progress=False, comparisons=("outputs",))
    assert "ppl_float" not in report.model_output and "kl" in report.model_output
    assert any(n.startswith("no perplexity: 1 batch gave targets that cannot be lined up")
               for n in report.notes)


def test_a_bfloat16_model_quantized_by_quantize_dynamic_is_told_to_use_float32():
    """torch's dynamic Linear takes float32 alone: the error named the module and torch's
    "expected scalar type Float but found BFloat16", not what to do."""
    f = tiny_llama().eval().to(torch.bfloat16)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear},
                                               dtype=torch.qint8)
    data = tiny_llm_batches(vocab_size=256, n=1)
    with pytest.raises(RuntimeError, match="BFloat16"):  # the oracle: torch's own refusal
        with torch.no_grad():
            q(**data[0])
    with pytest.raises(ns.InputError, match=r"(?s)self_attn\.q_proj.*compute in float32 alone: "
                                            r"quantize a float32 copy of the model"):
        ns.compare(f, q, data, progress=False)
