"""fxnumeric.llm_metrics against direct computations with torch.nn.functional (the oracle)."""

from __future__ import annotations

import doctest
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from fxnumeric import llm_metrics
from fxnumeric.errors import InputError
from fxnumeric.llm_metrics import LogitsAccumulator, looks_like_logits, token_fields


def _logits(shape, seed, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _pair(shape=(3, 7, 50), seed=0, noise=0.3, dtype=torch.float32):
    f = _logits(shape, seed, dtype=dtype)
    q = (f.double() + _logits(shape, seed + 1, scale=noise, dtype=torch.float64)).to(dtype)
    return f, q


def _mask(batch, seq, lengths):
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return mask


def _oracle(f, q, mask=None, labels=None):
    """The metrics straight from F.kl_div / F.cross_entropy in float64."""
    f64, q64 = f.double(), q.double()
    log_p, log_q = F.log_softmax(f64, -1), F.log_softmax(q64, -1)
    token_kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    real = torch.ones(f.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
    kl = token_kl[real]
    out = {
        "kl": float(kl.mean()),
        "kl_p99": float(torch.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
        "top1_agreement": float((f64.argmax(-1) == q64.argmax(-1))[real].double().mean()),
    }
    if labels is not None:
        # HF's causal-LM loss: position t scores labels[t + 1]; padding is no target
        target = labels.clone()
        target[~real] = -100
        target = target[:, 1:].reshape(-1)
        for name, logits in (("ppl_float", f64), ("ppl_quantized", q64)):
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target,
                                  ignore_index=-100)
            out[name] = math.exp(float(nll))
    return out


def _close(got, expected, tol=1e-6):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=tol, abs=tol), key


def test_matches_kl_div_and_cross_entropy_with_padding():
    f, q = _pair()
    mask = _mask(3, 7, [7, 4, 2])
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(5))
    acc = LogitsAccumulator()
    acc.update(f, q, attention_mask=mask, input_ids=ids)
    _close(acc.values(), _oracle(f, q, mask, labels=ids))
    assert acc.tokens == 13 and acc.targets == 6 + 3 + 1


def test_padding_is_ignored_whatever_it_holds():
    f, q = _pair()
    mask = _mask(3, 7, [7, 4, 2])
    garbage_f, garbage_q = f.clone(), q.clone()
    garbage_f[~mask.bool()] = 1e4  # what the model computes on padding must not matter
    garbage_q[~mask.bool()] = -1e4
    a, b = LogitsAccumulator(), LogitsAccumulator()
    a.update(f, q, attention_mask=mask)
    b.update(garbage_f, garbage_q, attention_mask=mask)
    assert a.values() == b.values()


def test_labels_with_ignore_index():
    f, q = _pair()
    labels = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(6))
    labels[0, 3] = -100  # e.g. a prompt token masked out of the loss
    labels[2, 1:3] = -100
    acc = LogitsAccumulator()
    acc.update(f, q, labels=labels)
    _close(acc.values(), _oracle(f, q, labels=labels))


def test_labels_win_over_input_ids():
    f, q = _pair()
    labels = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(6))
    a, b = LogitsAccumulator(), LogitsAccumulator()
    a.update(f, q, labels=labels, input_ids=torch.zeros_like(labels))
    b.update(f, q, labels=labels)
    assert a.values() == b.values()


def test_bf16_logits():
    f, q = _pair(dtype=torch.bfloat16)
    mask = _mask(3, 7, [5, 7, 3])
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(7))
    acc = LogitsAccumulator()
    acc.update(f, q, attention_mask=mask, input_ids=ids)
    _close(acc.values(), _oracle(f, q, mask, labels=ids))  # the oracle reads the same bf16 values


def test_streaming_over_batches_equals_one_batch():
    f, q = _pair((8, 9, 40), seed=3)
    mask = _mask(8, 9, [9, 1, 5, 9, 3, 8, 2, 6])
    ids = torch.randint(0, 40, (8, 9), generator=torch.Generator().manual_seed(8))
    whole, parts = LogitsAccumulator(), LogitsAccumulator()
    whole.update(f, q, attention_mask=mask, input_ids=ids)
    for rows in (slice(0, 3), slice(3, 4), slice(4, 8)):
        parts.update(f[rows], q[rows], attention_mask=mask[rows], input_ids=ids[rows])
    _close(parts.values(), whole.values(), tol=1e-12)
    assert parts.tokens == whole.tokens and parts.targets == whole.targets


def test_merge_equals_one_accumulator():
    f, q = _pair((6, 5, 30), seed=4)
    one, a, b = LogitsAccumulator(), LogitsAccumulator(), LogitsAccumulator()
    one.update(f, q, input_ids=torch.zeros(6, 5, dtype=torch.long))
    a.update(f[:2], q[:2], input_ids=torch.zeros(2, 5, dtype=torch.long))
    b.update(f[2:], q[2:], input_ids=torch.zeros(4, 5, dtype=torch.long))
    a.merge(b)
    _close(a.values(), one.values(), tol=1e-12)


def test_chunks_do_not_change_the_result(monkeypatch):
    f, q = _pair((4, 33, 64), seed=9)
    mask = _mask(4, 33, [33, 10, 20, 1])
    ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(9))
    big = LogitsAccumulator()
    big.update(f, q, attention_mask=mask, input_ids=ids)
    monkeypatch.setattr(llm_metrics, "_CHUNK_ELEMENTS", 64 * 5)  # 5 tokens per chunk
    small = LogitsAccumulator()
    small.update(f, q, attention_mask=mask, input_ids=ids)
    _close(small.values(), big.values(), tol=1e-6)
    _close(small.values(), _oracle(f, q, mask, labels=ids))


def test_near_identical_logits_keep_their_small_kl():
    """A KL of 1e-6 nats survives float32: the error stays near 1e-9 nats, not 1e-6."""
    f = _logits((2, 16, 2000), 11, scale=8.0)
    q = f + _logits((2, 16, 2000), 12, scale=2e-3)
    acc = LogitsAccumulator()
    acc.update(f, q)
    expected = _oracle(f, q)
    assert 1e-7 < expected["kl"] < 1e-5
    assert acc.values()["kl"] == pytest.approx(expected["kl"], rel=1e-2, abs=1e-8)
    offset = LogitsAccumulator()  # softmax ignores a common offset: so must the KL's precision
    offset.update(f, q + 5.0)
    assert offset.values()["kl"] == pytest.approx(_oracle(f, q + 5.0)["kl"], rel=1e-2, abs=1e-8)
    same = LogitsAccumulator()
    same.update(f, f.clone())
    assert same.values()["kl"] == 0.0 and same.values()["top1_agreement"] == 1.0


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
def test_a_constant_offset_of_the_quantized_logits_costs_no_precision(offset):
    """Softmax ignores a constant offset, and so must the KL's precision. SmolLM2's
    vocabulary, logits of scale 5 and 1e-3 apart (a KL of 4e-7 nats), the same float32
    tensors to fxnumeric and to a float64 oracle: the float32 difference of the logits kept
    the rounding of ``ulp(offset)``, 3.4e-6 nats off per token at an offset of 100 (the mean
    KL twice the oracle's), 2.4e-5 at 1000 (12 times), and 1.3e-8 without offset."""
    f = _logits((1, 6, 49152), 21, scale=5.0)
    q = f + _logits((1, 6, 49152), 22, scale=1e-3) + offset
    f64, q64 = f.double().log_softmax(-1), q.double().log_softmax(-1)
    oracle = (f64.exp() * (f64 - q64)).sum(-1).reshape(-1)
    assert 1e-7 < float(oracle.min())
    acc = LogitsAccumulator()
    acc.update(f, q)
    assert acc.values()["kl"] == pytest.approx(float(oracle.mean()), rel=0, abs=1e-12)
    # token_kls keeps float32: 6e-8 of the value
    assert torch.allclose(acc.token_kls().double(), oracle, rtol=1e-6, atol=1e-13)


def test_kl_p99_among_infinite_token_kls_is_infinite():
    """Two tokens whose quantized logits give -inf where the float model's probability is
    not 0: their KL is inf, and so is the p99 that falls between them (it read NaN, as
    inf - inf, while kl and kl_max read inf)."""
    f, q = _pair((1, 52, 10), seed=23, noise=0.1)
    finite = LogitsAccumulator()  # no infinite token: torch.quantile's interpolation
    finite.update(f, q)
    assert finite.values()["kl_p99"] == pytest.approx(_oracle(f, q)["kl_p99"], rel=1e-5)
    q[0, 3, 7] = -math.inf
    q[0, 9, 2] = -math.inf
    f64, q64 = f.double().log_softmax(-1), q.double().log_softmax(-1)
    oracle = (f64.exp() * (f64 - q64)).sum(-1).reshape(-1).sort().values
    assert oracle[-2:].isinf().all() and oracle[:-2].isfinite().all()
    acc = LogitsAccumulator()
    acc.update(f, q)
    values = acc.values()
    assert values["kl"] == values["kl_max"] == values["kl_p99"] == math.inf
    one = q.clone()  # one infinite token: the p99 interpolates from a finite one to inf
    one[0, 9, 2] = f[0, 9, 2]
    acc = LogitsAccumulator()
    acc.update(f, one)
    assert acc.values()["kl_p99"] == math.inf


def test_far_apart_models_and_masked_vocabulary_entries():
    f = _logits((2, 16, 500), 13, scale=8.0)
    q = f + _logits((2, 16, 500), 14, scale=40.0)  # maxima 100+ nats apart in some rows
    acc = LogitsAccumulator()
    acc.update(f, q)
    _close(acc.values(), _oracle(f, q))
    # a vocabulary entry both models mask with -inf contributes nothing (the oracle says nan)
    f_masked, q_masked = f.clone(), f + _logits((2, 16, 500), 15, scale=0.3)
    reference = LogitsAccumulator()
    reference.update(f_masked[..., :-1], q_masked[..., :-1])
    f_masked[..., -1] = q_masked[..., -1] = -math.inf
    masked = LogitsAccumulator()
    masked.update(f_masked, q_masked)
    _close(masked.values(), reference.values())


def test_nan_logits_poison_top1_as_they_poison_kl():
    """A token whose quantized logits hold NaN has no top token: the agreement is NaN, as the
    KL is (torchao's float8 lm_head gave NaN logits on a CPU and read "top-1 agreement
    0.000"), through merges too; padding that holds NaN is not a real token."""
    f, q = _pair((2, 6, 40))
    clean = LogitsAccumulator()
    clean.update(f, q)
    assert 0 < clean.values()["top1_agreement"] <= 1
    poisoned = q.clone()
    poisoned[1, 2, 5] = math.nan
    acc = LogitsAccumulator()
    acc.update(f, poisoned)
    values = acc.values()
    assert math.isnan(values["top1_agreement"]) and math.isnan(values["kl"])
    merged = LogitsAccumulator()
    merged.load(clean.state().merged(acc.state()))
    assert math.isnan(merged.values()["top1_agreement"])
    padded = LogitsAccumulator()  # the NaN token is padding: not read
    padded.update(f, poisoned, attention_mask=_mask(2, 6, [6, 2]))
    reference = LogitsAccumulator()
    reference.update(f, q, attention_mask=_mask(2, 6, [6, 2]))
    _close(padded.values(), reference.values())


def test_two_dimensional_logits_are_tokens():
    f, q = _pair((10, 20))
    acc = LogitsAccumulator()
    acc.update(f, q)
    _close(acc.values(), _oracle(f, q))


def test_nothing_seen_is_nan_and_no_perplexity():
    values = LogitsAccumulator().values()
    assert set(values) == {"kl", "kl_p99", "kl_max", "top1_agreement"}
    assert all(math.isnan(v) for v in values.values())
    acc = LogitsAccumulator()
    f, q = _pair()
    acc.update(f, q)  # no labels: no perplexity
    assert "ppl_float" not in acc.values()


def test_logits_of_the_last_positions_read_the_last_positions_of_the_mask():
    # logits_to_keep=1 (generate's prefill): the (3, 16) input_ids raised "do not match the
    # logits' leading dims" and the mask was dropped
    # ... and its next tokens are those of the last positions too
    f, q = _pair((3, 2, 50))
    mask = _mask(3, 6, [6, 5, 3])
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(3))
    acc = LogitsAccumulator()
    acc.update_batch(f, q, {"input_ids": ids, "attention_mask": mask},
                       llm_metrics.LogitsReader(next_token=True))
    got = acc.values()
    expected = _oracle(f, q, mask[:, -2:], labels=ids[:, -2:])
    assert acc.tokens == int(mask[:, -2:].sum()) == 3 and acc.targets == 1
    _approx(got, expected, ("kl", "kl_max", "top1_agreement", "ppl_float", "ppl_quantized"))


def test_token_kls_are_float32_one_per_real_token():
    f, q = _pair()
    acc = LogitsAccumulator()
    acc.update(f, q, attention_mask=_mask(3, 7, [7, 4, 2]))
    acc.update(f, q)
    kls = acc.token_kls()
    assert kls.dtype == torch.float32 and kls.shape == (13 + 21,)


def test_wrong_shapes_say_what_differs():
    f, q = _pair()
    acc = LogitsAccumulator()
    with pytest.raises(InputError, match=r"float logits \(3, 7, 50\) and quantized logits"):
        acc.update(f, q[..., :49])
    with pytest.raises(InputError, match=r"attention_mask \(3, 6\) does not match"):
        acc.update(f, q, attention_mask=torch.ones(3, 6))
    with pytest.raises(InputError, match=r"outside the vocabulary \[0, 50\)"):
        acc.update(f, q, labels=torch.full((3, 7), 50))
    with pytest.raises(InputError, match="must be a floating tensor"):
        acc.update(torch.zeros(3, 7, dtype=torch.long), q)
    assert acc.tokens == 0  # a rejected batch leaves nothing behind


def test_module_doctests():
    result = doctest.testmod(llm_metrics)
    assert result.failed == 0 and result.attempted > 0


# ---------------------------------------------------------------- looks_like_logits


def test_an_output_with_logits_is_logits():
    logits = torch.randn(2, 5, 300)
    assert looks_like_logits(SimpleNamespace(logits=logits, loss=torch.tensor(1.0))) is logits
    assert looks_like_logits({"loss": torch.tensor(1.0), "logits": logits}) is logits


def test_a_tensor_is_logits_by_the_models_vocabulary():
    out = torch.randn(2, 5, 300)
    assert looks_like_logits(out, vocab_size=300) is out
    assert looks_like_logits((out, "cache"), vocab_size=300) is out
    assert looks_like_logits(out, vocab_size=301) is None
    assert looks_like_logits(torch.randn(4, 300), vocab_size=300) is not None  # (tokens, vocab)


def test_the_heuristic_without_a_vocabulary():
    ids = torch.randint(0, 1000, (2, 5))
    logits = torch.randn(2, 5, 1200)
    assert looks_like_logits(logits, {"input_ids": ids}) is logits
    assert looks_like_logits(logits, ids) is logits
    assert looks_like_logits(logits, (ids, torch.ones_like(ids))) is logits
    assert looks_like_logits(logits) is None  # no input ids to check against
    assert looks_like_logits(torch.randn(2, 5, 576), ids) is None  # hidden states: too narrow
    assert looks_like_logits(torch.randn(2, 6, 1200), ids) is None  # not one row per token
    assert looks_like_logits(torch.randn(2, 1200), ids) is None  # a classifier's scores
    wide_hidden = torch.randn(2, 5, 1024)  # a 1024-wide encoder's hidden states
    assert looks_like_logits(wide_hidden, torch.randint(0, 30000, (2, 5))) is None
    assert looks_like_logits(logits, torch.randn(2, 5)) is None  # float "ids" are not ids


def test_tiny_llama_output_is_logits():
    pytest.importorskip("transformers")
    from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches

    model = tiny_llama()
    batch = tiny_llm_batches()[0]
    with torch.no_grad():
        out = model(**batch)
    assert looks_like_logits(out, batch) is out.logits
    with torch.no_grad():
        plain = model(**batch, return_dict=False)[0]
    assert looks_like_logits(plain, batch, vocab_size=model.config.vocab_size) is plain
    assert looks_like_logits(out.logits, batch) is None  # 256 < 1000: say vocab_size
    with torch.no_grad():
        hidden = model.model(**batch).last_hidden_state
    assert looks_like_logits(hidden, batch, vocab_size=model.config.vocab_size) is None


def test_token_fields():
    ids = torch.tensor([[5, 6, 0]])
    mask = torch.tensor([[True, True, False]])
    assert set(token_fields({"input_ids": ids, "attention_mask": mask})) == {
        "input_ids", "attention_mask"}
    assert token_fields((ids, mask))["attention_mask"] is mask
    assert token_fields(ids) == {"input_ids": ids}
    assert token_fields(torch.randn(2, 3)) == {}  # an image batch has no tokens
    assert token_fields({"pixel_values": torch.randn(1, 3)}) == {}


# ---------------------------------------------------------------- on a quantized tiny Llama


def test_int4_tiny_llama_moves_every_metric():
    pytest.importorskip("transformers")
    quantization = pytest.importorskip("torchao.quantization")
    import copy

    from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches

    float_model = tiny_llama()
    quant_model = copy.deepcopy(float_model)
    quantization.quantize_(quant_model, quantization.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=quantization.PerGroup(32)))
    acc = LogitsAccumulator()
    batches = tiny_llm_batches(n=2)
    with torch.no_grad():
        for batch in batches:
            acc.update(float_model(**batch).logits, quant_model(**batch).logits,
                       attention_mask=batch["attention_mask"], input_ids=batch["input_ids"])
    values = acc.values()
    assert acc.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert 0 < values["kl"] <= values["kl_p99"] <= values["kl_max"]
    assert 0 < values["top1_agreement"] < 1
    assert values["ppl_float"] > 1 and values["ppl_quantized"] > 1


def test_token_kls_are_never_negative():
    # a common offset leaves the distributions equal: rounding put some tokens at -7e-9 nats,
    # and a hybrid's mean KL below zero (sensitivity listed negative KLs)
    f = _logits((4, 16, 1000), 21, scale=1.0)
    q = f + _logits((4, 16, 1000), 22, scale=1e-6) + 0.3
    acc = LogitsAccumulator()
    acc.update(f, q)
    assert float(acc.token_kls().min()) >= 0.0
    assert 0.0 <= acc.values()["kl"] < 1e-8


# ---------------------------------------------------------------- heads that are not causal LMs


def _bert_heads_batch():
    ids = torch.randint(5, 200, (3, 10), generator=torch.Generator().manual_seed(3))
    mask = _mask(3, 10, [10, 6, 3])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _bert_head(cls_name, **config):
    transformers = pytest.importorskip("transformers")
    import copy

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, **config)
    f = getattr(transformers, cls_name)(cfg).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    return f, q


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_sequence_classifier_reads_kl_and_top1_per_sequence():
    """(batch, labels) logits: one prediction per row, the attention mask (batch, seq) does not
    apply to them, and the labels are classes, not next tokens: no perplexity."""
    import fxnumeric as ns

    f, q = _bert_head("BertForSequenceClassification", num_labels=5)
    batches = [_bert_heads_batch() | {"labels": torch.tensor([0, 3, 4])}]
    report = ns.compare(f, q, batches, progress=False)
    with torch.no_grad():
        fl = f(**batches[0]).logits
        ql = q(**batches[0]).logits
    assert fl.shape == (3, 5)
    _close({k: report.model_output[k] for k in ("kl", "kl_p99", "kl_max", "top1_agreement")},
           _oracle(fl, ql))
    assert "ppl_float" not in report.model_output
    # one KL per sample, and the words say so (they said "per-token KL"), saved and loaded
    assert report.logits_per == "sample"
    assert f"per-sample KL {report.model_output['kl']:.4g} nats" in report.summary()
    assert "per-token" not in report.summary()
    assert ns.Report.from_json(report.to_json()).logits_per == "sample"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_token_classifier_and_a_masked_lm_count_real_tokens_and_give_no_perplexity():
    import fxnumeric as ns

    for cls_name, config in (("BertForTokenClassification", {"num_labels": 7}),
                             ("BertForMaskedLM", {})):
        f, q = _bert_head(cls_name, **config)
        batch = _bert_heads_batch()
        report = ns.compare(f, q, [batch], progress=False)
        with torch.no_grad():
            fl, ql = f(**batch).logits, q(**batch).logits
        expected = _oracle(fl, ql, mask=batch["attention_mask"])
        _close({k: report.model_output[k] for k in expected}, expected)
        assert report.logits_per == "token" and "per-token KL" in report.summary()
        # labels (the classes of each token; a masked LM's own targets) are not next tokens
        assert "ppl_float" not in report.model_output, cls_name


def _pt2e_exported(model, batch):
    """``(ExportedProgram, convert_pt2e model)`` of ``model`` (XNNPACK, calibrated on
    ``batch``): the float side and the quantized side of the pt2e flow."""
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    exported = torch.export.export(model, (), batch)
    prepared = prepare_pt2e(exported.module(),
                            XNNPACKQuantizer().set_global(get_symmetric_quantization_config()))
    with torch.no_grad():
        prepared(**batch)
    return exported, convert_pt2e(prepared)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_an_exported_token_classifier_or_masked_lm_gives_no_next_token_perplexity():
    """Through torch.export (the pt2e flow) a model loses ``can_generate``: a token
    classifier's input ids were read as next-token targets over its 5 classes (InputError
    "outside the vocabulary [0, 5)"), a masked LM got a next-token perplexity of 839. The
    class the graph was traced from tells the kind, as the Hugging Face module does."""
    import fxnumeric as ns
    from fxnumeric.llm_metrics import predicts_next_token

    for cls_name, config in (("BertForTokenClassification", {"num_labels": 5}),
                             ("BertForMaskedLM", {})):
        f, _ = _bert_head(cls_name, **config)
        batch = {"input_ids": _bert_heads_batch()["input_ids"]}
        exported, quantized = _pt2e_exported(f, batch)
        with torch.no_grad():
            fl, ql = exported.module()(**batch).logits, quantized(**batch).logits
        expected = _oracle(fl, ql)  # float64 log-softmaxes of both models' logits
        for float_side in (exported, exported.module()):
            report = ns.compare(float_side, quantized, [batch], progress=False)
            _close({k: report.model_output[k] for k in expected}, expected)
            assert "ppl_float" not in report.model_output, cls_name
        assert predicts_next_token(exported) is predicts_next_token(quantized) is False
        if cls_name == "BertForTokenClassification":
            # advise and sensitivity read the same logits the same way
            sens = ns.sensitivity(exported, quantized, [batch], metric="kl", progress=False,
                                  layers=["classifier"])
            assert sens.quantized == pytest.approx(expected["kl"], rel=1e-6, abs=1e-9)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_quantized_side_tells_the_kind_when_the_float_side_cannot():
    """A program whose class cannot be imported where it is compared (here its recorded class
    renamed to a module that does not exist) tells nothing; the quantized model, which
    records its class, says it is a token classifier: its class labels, which fit the 5
    classes, are not next tokens. They read as perplexity 4.99 before."""
    import fxnumeric as ns
    from fxnumeric.llm_metrics import predicts_next_token

    f, _ = _bert_head("BertForTokenClassification", num_labels=5)
    ids = _bert_heads_batch()["input_ids"]
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(6))
    batch = {"input_ids": ids, "labels": labels}
    exported, quantized = _pt2e_exported(f, batch)
    for node in exported.graph.nodes:  # new dicts: the quantized graph's stay as they were
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: (path, "not_installed_here.BertForTokenClassification" if path == ""
                      else cls) for key, (path, cls) in stack.items()}
    assert predicts_next_token(exported) is None
    assert predicts_next_token(exported, quantized) is False
    report = ns.compare(exported, quantized, [batch], progress=False)
    with torch.no_grad():
        fl, ql = exported.module()(**batch).logits, quantized(**batch).logits
    expected = _oracle(fl, ql)
    _close({k: report.model_output[k] for k in expected}, expected)
    assert "ppl_float" not in report.model_output


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore:the quantized model has no quantized op")
def test_an_exported_causal_lm_keeps_its_perplexity():
    """The class an exported Llama was traced from says it predicts the next token: the
    perplexity of its input ids, as a direct float64 computation gives it."""
    import copy

    import fxnumeric as ns
    from fxnumeric.llm_metrics import is_encoder_decoder, predicts_next_token
    from fxnumeric.zoo_llm import tiny_llama

    pytest.importorskip("transformers")
    model = tiny_llama()
    rounded = copy.deepcopy(model)  # int8-rounded Linear weights: a model a little off
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):
                scale = module.weight.abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
                module.weight.copy_((module.weight / scale).round() * scale)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    batch = {"input_ids": ids, "use_cache": False}
    float_side = torch.export.export(model, (), batch)
    quant_side = torch.export.export(rounded, (), batch)
    assert predicts_next_token(float_side) is True and not is_encoder_decoder(float_side)
    report = ns.compare(float_side, quant_side, [batch], progress=False)
    with torch.no_grad():
        fl, ql = model(**batch).logits, rounded(**batch).logits
    expected = _oracle(fl, ql, labels=ids)
    assert expected["kl"] > 1e-6
    _close({k: report.model_output[k] for k in expected}, expected, tol=1e-5)


def test_a_model_of_unknown_kind_is_scored_on_its_labels_never_on_its_input_ids():
    """Without ``can_generate`` (a model of your own, an exported graph whose class is not
    importable) the input ids are no next tokens (a masked LM's are not); labels the batch
    holds are, when they are token ids of the vocabulary; class labels (a token classifier's,
    beyond the vocabulary here) are not, and raise nothing."""
    f, q = _pair((3, 7, 50))
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = _mask(3, 7, [7, 5, 2])
    derived = LogitsAccumulator()
    derived.update_batch(f, q, {"input_ids": ids, "attention_mask": mask})
    assert "ppl_float" not in derived.values()
    _close(derived.values(), _oracle(f, q, mask))
    labels = ids.flip(0)
    labelled = LogitsAccumulator()
    labelled.update_batch(f, q, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    _close(labelled.values(), _oracle(f, q, mask, labels=labels))
    classes = LogitsAccumulator()
    classes.update_batch(f, q, {"input_ids": ids, "labels": torch.full((3, 7), 60)})
    assert "ppl_float" not in classes.values()
    known = LogitsAccumulator()  # a causal LM: the input ids are its next tokens
    known.update_batch(f, q, {"input_ids": ids, "attention_mask": mask},
                       llm_metrics.LogitsReader(next_token=True))
    _close(known.values(), _oracle(f, q, mask, labels=ids))


def _seq2seq(cls_name: str):
    import copy

    import transformers

    torch.manual_seed(0)
    if cls_name == "T5ForConditionalGeneration":
        cfg = transformers.T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                    num_heads=4, decoder_start_token_id=0)
    else:
        cfg = transformers.BartConfig(vocab_size=300, d_model=64, encoder_layers=2,
                                      decoder_layers=2, encoder_attention_heads=4,
                                      decoder_attention_heads=4, encoder_ffn_dim=128,
                                      decoder_ffn_dim=128, max_position_embeddings=64)
    f = getattr(transformers, cls_name)(cfg).eval()
    return f, torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("cls_name", ["T5ForConditionalGeneration", "BartForConditionalGeneration"])
def test_an_encoder_decoder_is_read_against_its_decoder_inputs(cls_name):
    """The logits are the decoder's (batch, 7), not the encoder input's (batch, 10): the mask is
    decoder_attention_mask and the labels score position t on labels[t], unshifted (the model
    shifts them right into its decoder inputs). Both raised before; T5's encoder, called
    positionally through the module tree, failed in transformers' use_cache decorator."""
    import fxnumeric as ns

    f, q = _seq2seq(cls_name)
    gen = torch.Generator().manual_seed(1)
    decoder_mask = _mask(2, 7, [7, 5])
    labels = torch.randint(3, 300, (2, 7), generator=gen)
    labels[1, 5:] = -100
    batch = {"input_ids": torch.randint(3, 300, (2, 10), generator=gen),
             "attention_mask": _mask(2, 10, [10, 8]).long(),
             "decoder_input_ids": torch.randint(3, 300, (2, 7), generator=gen),
             "decoder_attention_mask": decoder_mask.long(), "labels": labels}
    report = ns.compare(f, q, [batch], progress=False)
    with torch.no_grad():
        fl, ql = f(**batch).logits, q(**batch).logits
    expected = _oracle(fl, ql, mask=decoder_mask)
    for name, logits in (("ppl_float", fl), ("ppl_quantized", ql)):
        nll = F.cross_entropy(logits.double().reshape(-1, 300), labels.reshape(-1))
        expected[name] = math.exp(float(nll))
    _close({k: report.model_output[k] for k in expected}, expected)
    # without labels the targets are the next decoder inputs, as a causal LM's are
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    report = ns.compare(f, q, [no_labels], progress=False)
    with torch.no_grad():
        fl, ql = f(**no_labels).logits, q(**no_labels).logits
    expected = _oracle(fl, ql, mask=decoder_mask, labels=batch["decoder_input_ids"])
    _close({k: report.model_output[k] for k in expected}, expected)
    # labels alone (a seq2seq collator's, -100 for padding): the model makes its decoder inputs
    # from them; their padding is not a real token
    labels_only = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    report = ns.compare(f, q, [labels_only], progress=False)
    with torch.no_grad():
        fl, ql = f(**labels_only).logits, q(**labels_only).logits
    expected = _oracle(fl, ql, mask=labels != -100)
    for name, logits in (("ppl_float", fl), ("ppl_quantized", ql)):
        nll = F.cross_entropy(logits.double().reshape(-1, 300), labels.reshape(-1))
        expected[name] = math.exp(float(nll))
    _close({k: report.model_output[k] for k in expected}, expected)
    if cls_name.startswith("Bart"):  # input ids alone: BART shifts them right to decode them
        plain = {k: batch[k] for k in ("input_ids", "attention_mask")}
        report = ns.compare(f, q, [plain], progress=False)
        with torch.no_grad():
            fl, ql = f(**plain).logits, q(**plain).logits
        real = plain["attention_mask"].bool()
        expected = _oracle(fl, ql, mask=real)
        targets = plain["input_ids"].masked_fill(~real, -100)
        for name, logits in (("ppl_float", fl), ("ppl_quantized", ql)):
            nll = F.cross_entropy(logits.double().reshape(-1, 300), targets.reshape(-1))
            expected[name] = math.exp(float(nll))
        _close({k: report.model_output[k] for k in expected}, expected)


def _approx(got, expected, keys, rel=1e-6):
    """``got[key]`` within ``rel`` of ``expected[key]``, no absolute slack (a KL of 1e-6)."""
    for key in keys:
        assert got[key] == pytest.approx(expected[key], rel=rel, abs=0), key


def _tiny_ctc():
    """A tiny Wav2Vec2ForCTC and its dynamic-quantized copy; audio (2, 800), the second
    utterance right-padded from sample 400: 79 and 39 frames by the conv lengths
    ``(800 - 10) // 5 + 1 = 159``, ``(159 - 3) // 2 + 1 = 79`` (400 samples: 79, 39)."""
    transformers = pytest.importorskip("transformers")
    import copy

    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
        feat_extract_norm="layer")
    f = transformers.Wav2Vec2ForCTC(cfg).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    x = torch.randn(2, 800, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 400:] = 0
    x[1, 400:] = 0
    x[1, :400] *= 30
    return f, q, {"input_values": x, "attention_mask": mask}, _mask(2, 79, [79, 39])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_ctc_models_sample_mask_is_read_through_its_own_frame_mask():
    """The (2, 800) mask of audio samples against (2, 79) logits of frames: its last 79
    columns were kept as the frame mask (the logits_to_keep rule), all 0 for the padded
    utterance, so its 39 real frames were dropped (KL 2.527e-06 against 2.450e-06 over the
    real frames in the sweep's run). compare and sensitivity read it alike."""
    import fxnumeric as ns

    f, q, batch, frames = _tiny_ctc()
    with torch.no_grad():
        fl, ql = f(**batch).logits, q(**batch).logits
    assert fl.shape == (2, 79, 32)
    expected = _oracle(fl, ql, frames)
    last_columns = _oracle(fl, ql, batch["attention_mask"][:, -79:])  # the old reading
    assert expected["kl"] != pytest.approx(last_columns["kl"], rel=1e-3)
    report = ns.compare(f, q, [batch], progress=False, comparisons=["outputs"])
    _approx(report.model_output, expected, ("kl", "kl_max", "top1_agreement"))
    assert "ppl_float" not in report.model_output
    assert not [n for n in report.notes if "does not fit" in n]
    # the model output's SQNR reads the same real frames (40 of 158 padding)
    assert any("40 of its 158 positions" in n for n in report.notes)
    real = frames.bool()
    assert report.model_output["sqnr"] == pytest.approx(ns.sqnr(fl[real], ql[real]), abs=1e-4)
    sens = ns.sensitivity(f, q, [batch], metric="kl", progress=False, layers="lm_head")
    _approx({"kl": sens.quantized}, expected, ("kl",))
    sens = ns.sensitivity(f, q, [batch], metric="top1_agreement", progress=False,
                          layers="lm_head")
    _approx({"top1_agreement": sens.quantized}, expected, ("top1_agreement",))


class _Halving(torch.nn.Module):
    """A model of one's own with one output position per two input samples and no mask of
    its output positions: ``{"logits": (batch, samples // 2, 40)}``."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(1, 16, 2, stride=2)
        self.head = torch.nn.Linear(16, 40)

    def forward(self, input_values, attention_mask=None):
        return {"logits": self.head(self.conv(input_values[:, None]).transpose(1, 2)) * 4}


def test_a_mask_that_does_not_fit_the_logits_is_not_used_and_a_note_says_so():
    """Nothing tells where the (2, 12) mask's samples sit among the (2, 6) positions: the
    metrics read every position, and compare says so; sensitivity, whose one number would
    read padding as real, refuses. Its last 6 columns were taken before (row 1 all padding)."""
    import copy

    import fxnumeric as ns

    torch.manual_seed(0)
    f = _Halving().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(2))
    batch = {"input_values": x, "attention_mask": _mask(2, 12, [12, 6])}
    with torch.no_grad():
        fl, ql = f(**batch)["logits"], q(**batch)["logits"]
    expected = _oracle(fl, ql)  # every position
    assert expected["kl"] != pytest.approx(_oracle(fl, ql, _mask(2, 6, [6, 0]))["kl"], rel=1e-3)
    report = ns.compare(f, q, [batch], progress=False, comparisons=["outputs"])
    _approx(report.model_output, expected, ("kl", "kl_max", "top1_agreement"))
    note = [n for n in report.notes if "attention_mask [2, 12] does not fit" in n]
    assert len(note) == 1 and "[2, 6]" in note[0] and "padding included" in note[0]
    with pytest.raises(InputError, match=r"attention_mask \[2, 12\] holds padding but does not "
                                         r"fit the logits' positions \[2, 6\]"):
        ns.sensitivity(f, q, [batch], metric="kl", progress=False)
    # a mask without padding says every position is real: no note, nothing refused
    full = {"input_values": x, "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    report = ns.compare(f, q, [full], progress=False, comparisons=["outputs"])
    _approx(report.model_output, expected, ("kl", "top1_agreement"))
    assert not [n for n in report.notes if "attention_mask" in n]
    sens = ns.sensitivity(f, q, [full], metric="kl", progress=False)
    _approx({"kl": sens.quantized}, expected, ("kl",))


def test_logits_to_keep_in_the_batch_places_the_mask():
    """A batch asking for the logits of some positions only (transformers' logits_to_keep,
    an int for the last ones or a tensor of indices) reads the mask at those positions,
    whatever the model's kind; without it a model of unknown kind gets its mask not used."""
    f, q = _pair((3, 2, 50))
    mask = _mask(3, 6, [6, 4, 1])
    ids = torch.zeros(3, 6, dtype=torch.long)
    for keep, columns in ((2, [4, 5]), (torch.tensor(2), [4, 5]),
                          (torch.tensor([0, 3]), [0, 3])):
        for name in ("logits_to_keep", "num_logits_to_keep"):
            acc = LogitsAccumulator()
            acc.update_batch(f, q, {"input_ids": ids, "attention_mask": mask, name: keep})
            real = mask[:, columns]
            assert acc.tokens == int(real.sum()) and not acc.unfit_masks, (keep, name)
            _approx(acc.values(), _oracle(f, q, real), ("kl", "kl_max", "top1_agreement"))
    unknown = LogitsAccumulator()
    unknown.update_batch(f, q, {"input_ids": ids, "attention_mask": mask})
    assert unknown.tokens == 6 and unknown.unfit_masks == 1
    assert unknown.unfit_shapes == ((3, 6), (3, 2))
    _approx(unknown.values(), _oracle(f, q), ("kl", "top1_agreement"))
    merged = LogitsAccumulator()
    merged.merge(unknown)
    assert merged.state().unfit_masks == 1 and merged.unfit_shapes == ((3, 6), (3, 2))


def test_per_row_logits_get_no_perplexity_from_labels_that_fit():
    """(batch, classes) logits and a (batch,) of class ids that are token ids of the
    "vocabulary": the causal shift ran along the batch dim, scoring sample t's classes on
    sample t + 1's label (a perplexity of 5.015 for a wrapped 5-class classifier)."""
    f, q = _pair((6, 5))
    labels = torch.tensor([0, 3, 1, 4, 2, 2])
    for reader in (None, llm_metrics.LogitsReader(next_token=True)):
        acc = LogitsAccumulator()
        acc.update_batch(f, q, {"input_ids": torch.zeros(6, 4, dtype=torch.long),
                                "labels": labels}, reader)
        assert "ppl_float" not in acc.values() and acc.logits_per == "sample"
        _close(acc.values(), _oracle(f, q))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_wrapped_sequence_classifier_with_class_labels_gets_no_perplexity():
    """A classifier inside a model of one's own (no can_generate) whose batch holds class
    labels: one prediction per row, as docs/llm.md says, and no ppl_*."""
    import copy

    import fxnumeric as ns

    class Wrap(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
            return self.m(input_ids=input_ids, attention_mask=attention_mask)

    inner, _ = _bert_head("BertForSequenceClassification", num_labels=5)
    f = Wrap(inner).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    batch = _bert_heads_batch() | {"labels": torch.tensor([0, 3, 1])}
    report = ns.compare(f, q, [batch], progress=False, comparisons=["outputs"])
    with torch.no_grad():
        fl, ql = f(**batch).logits, q(**batch).logits
    expected = _oracle(fl, ql)
    _approx(report.model_output, expected, ("kl", "kl_max", "top1_agreement"), rel=1e-5)
    assert "ppl_float" not in report.model_output and "perplexity" not in report.summary()
    assert report.logits_per == "sample"


class _AdditiveMaskLM(torch.nn.Module):
    """A language model of one's own that adds its float mask to the attention scores (0 for
    real tokens, a large negative number for padding)."""

    def __init__(self, vocab: int = 1200, width: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mix = torch.nn.Embedding(vocab, width), torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids)
        scores = h @ h.transpose(1, 2) / 6 + attention_mask[:, None, :]
        return self.head(torch.relu(self.mix(torch.softmax(scores, -1) @ h))) * 3


@pytest.mark.parametrize("padding", [-1e4, torch.finfo(torch.float32).min, None])
def test_an_additive_float_mask_counts_its_zeros_as_the_real_tokens(padding):
    import copy

    import fxnumeric as ns

    f = _AdditiveMaskLM().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    ids = torch.randint(0, 1200, (2, 10), generator=torch.Generator().manual_seed(1))
    real = torch.ones(2, 10, dtype=torch.bool)
    if padding is not None:  # None: a batch without padding, whose additive mask is all zeros
        real[0, 6:], real[1, 3:] = False, False
    additive = torch.where(real, 0.0, -1e4 if padding is None else padding)
    report = ns.compare(f, q, [{"input_ids": ids, "attention_mask": additive}])
    with torch.no_grad():
        expected = _oracle(f(ids, additive), q(ids, additive), real.long())
    assert report.model_output["kl"] == pytest.approx(expected["kl"], rel=1e-6)
    assert report.model_output["top1_agreement"] == pytest.approx(expected["top1_agreement"])
    # a 0/1 float mask is read as it is
    assert token_fields({"attention_mask": real.float()})["attention_mask"].equal(real.float())


def test_logits_to_keep_lines_up_the_targets_or_gives_no_perplexity():
    """A batch with logits_to_keep scores its kept positions on their next tokens (its
    targets were dropped, so the report's perplexity read the other batches alone, with no
    note); positions that do not run in a row cannot be lined up with their next tokens, and
    the report then gives no perplexity rather than one of the other batches."""
    f, q = _pair((3, 6, 50))
    mask = _mask(3, 6, [6, 5, 3])
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(4))
    kept_f, kept_q = _pair((3, 3, 50), seed=7)
    whole = {"input_ids": ids, "attention_mask": mask}
    kept = {**whole, "logits_to_keep": 3}
    causal = llm_metrics.LogitsReader(next_token=True)
    both = LogitsAccumulator()
    both.update_batch(f, q, whole, causal)
    both.update_batch(kept_f, kept_q, kept, causal)
    # the oracle: both batches' real tokens and targets in one float64 computation
    f64 = torch.cat([f, kept_f], dim=1).double()
    q64 = torch.cat([q, kept_q], dim=1).double()
    nll = {"ppl_float": 0.0, "ppl_quantized": 0.0}
    count = 0
    for logits_f, logits_q, columns in ((f64[:, :6], q64[:, :6], slice(0, 6)),
                                        (f64[:, 6:], q64[:, 6:], slice(3, 6))):
        target = ids[:, columns].clone()
        target[mask[:, columns] == 0] = -100
        target = target[:, 1:].reshape(-1)
        count += int((target != -100).sum())
        for name, logits in (("ppl_float", logits_f), ("ppl_quantized", logits_q)):
            nll[name] += float(F.cross_entropy(logits[:, :-1].reshape(-1, 50), target,
                                               ignore_index=-100, reduction="sum"))
    assert both.targets == count == 5 + 4 + 2 + 2 + 1
    got = both.values()
    for name, total in nll.items():
        assert got[name] == pytest.approx(math.exp(total / count), rel=1e-6), name
    scattered = LogitsAccumulator()
    scattered.update_batch(f, q, whole, causal)
    scattered.update_batch(kept_f, kept_q, {**whole, "logits_to_keep": torch.tensor([0, 2, 5])},
                           causal)
    assert scattered.unplaced == 1 and "ppl_float" not in scattered.values()
    assert scattered.tokens == 14 + int(mask[:, [0, 2, 5]].sum())  # the KL reads both
    merged = LogitsAccumulator()
    merged.merge(scattered)
    assert merged.unplaced == 1 and "ppl_float" not in merged.values()
