"""Models dispatched by accelerate (weights offloaded to CPU memory or disk, loaded by hooks at
each call) compare with the same numbers as the same models in memory.

The oracle is the in-memory run: every field of the report (rows, weights, spread, model
output, notes) equal to 1e-6. Offloaded float models: ``disk_offload``, ``dispatch_model`` with
a ``device_map`` holding ``"disk"``, and ``from_pretrained(device_map=..., offload_folder=...)``.
Quantized models: accelerate offloads torchao's models to CPU memory (``cpu_offload``) but not
to disk (``.numpy()`` of a tensor subclass), and cannot offload ``quantize_dynamic`` models at
all (their state dict holds dtypes and packed weights): those stay in memory.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.ao.quantization import quantize_dynamic

import fxnumeric as ns
from fxnumeric import offload
from fxnumeric.capture.clone import module_tree_copy
from fxnumeric.offload import devices, keeps_whole, loaded, offloaded_names

sys.path.insert(0, str(Path(__file__).parent))
from _models import ScaledLinear  # noqa: E402
from _report_equal import differences  # noqa: E402

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches  # noqa: E402

META = torch.device("meta")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*deprecat.*")
        yield


@pytest.fixture(scope="module")
def batches():
    return tiny_llm_batches(n=3)


@pytest.fixture(scope="module")
def dynamic_llama():
    """tiny_llama in memory and its quantize_dynamic version, with the in-memory report."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        f = tiny_llama()
        q = quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    return f, q


def _same(offloaded, in_memory) -> None:
    found = differences(offloaded, in_memory, rel=1e-6)
    assert not found, "\n".join(found[:20])


def _parameters_on_meta(model: nn.Module) -> int:
    return sum(p.device == META for p in model.parameters())


def test_a_tree_copy_of_a_hooked_model_runs_the_copy_through_the_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 4)
    expected = model(x)
    accelerate.cpu_offload(model, execution_device="cpu")
    assert model[0].weight.device == META
    twin = module_tree_copy(model)
    seen = []
    twin[1] = _Recorder(seen)  # replaced in the copy only
    with torch.no_grad():
        got = twin(x)
    assert seen == [(3, 4)]  # the copy's root ran the copy's children, the replaced one included
    torch.testing.assert_close(got, expected)  # its Linear copies loaded their weights
    assert twin[0].weight.device == META and model[0].weight.device == META  # offloaded again
    assert type(model[1]) is nn.ReLU and model[0]._hf_hook is twin[0]._hf_hook


class _Recorder(nn.Module):
    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return torch.relu(x)


def test_disk_offloaded_float_model_compares_as_in_memory(dynamic_llama, batches, tmp_path):
    f, q = dynamic_llama
    in_memory = ns.compare(f, q, batches)
    offloaded = accelerate.disk_offload(tiny_llama(), tmp_path, execution_device="cpu")
    assert _parameters_on_meta(offloaded) == len(list(offloaded.parameters()))
    report = ns.compare(offloaded, q, batches)
    _same(report, in_memory)
    assert any(r.weight_sqnr is not None for r in report.rows)  # weights read through the hooks
    assert any(r.output and r.shadow for r in report.rows if r.quantized)
    assert _parameters_on_meta(offloaded) == len(list(offloaded.parameters()))  # still offloaded


def test_a_preloaded_bert_layer_takes_the_position_ids_its_kwargs_took(tmp_path):
    """transformers 5's BERT encoder passes each BertLayer ``position_ids`` through its
    ``**kwargs``; preloaded, the layer is called whole, and its one-op graph refused them:
    compare raised "the float model failed on the input ... unexpected keyword argument
    'position_ids'". Oracle: the in-memory model with its layers kept whole by
    ``leaf_modules``, which the preload is equivalent to, and the offloaded model's own
    forward."""
    import transformers

    def bert():
        cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=37,
                                      max_position_embeddings=32)
        torch.manual_seed(0)
        return transformers.BertForMaskedLM(cfg).eval()

    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        q = quantize_dynamic(bert(), {nn.Linear})
    f = bert()
    layer = type(f.bert.encoder.layer[0])
    in_memory = ns.compare(f, q, data, leaf_modules=[layer], progress=False)
    offloaded = accelerate.disk_offload(bert(), tmp_path, execution_device="cpu",
                                        preload_module_classes=[layer.__name__])
    report = ns.compare(offloaded, q, data, progress=False)
    # the layers' own Linears are listed unpaired, with the preload as the reason
    assert {path for path, _, _ in report.unmatched} == {
        path for path, m in f.named_modules() if path.startswith("bert.encoder.layer.")
        and isinstance(m, (nn.Linear, nn.LayerNorm))}
    assert all("preload_module_classes" in reason for _, _, reason in report.unmatched)
    _same(dataclasses.replace(report, unmatched=()), in_memory)
    assert report.row("bert.encoder.layer.1").output_sqnr is not None
    with torch.no_grad():
        ref, out = f(**data[0]).logits.double(), q(**data[0]).logits.double()
    assert report.model_output["sqnr"] == pytest.approx(
        float(10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())), rel=1e-6)


def test_device_map_with_disk_and_a_cpu_offloaded_torchao_model(batches, tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    f = tiny_llama()
    q = copy.deepcopy(f)
    quantize_(q, Int8WeightOnlyConfig())
    in_memory = ns.compare(f, q, batches)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                  "model.layers.0": "disk", "model.layers.1": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    f_dispatched = accelerate.dispatch_model(tiny_llama(), device_map=device_map,
                                             offload_dir=tmp_path)
    q_offloaded = copy.deepcopy(tiny_llama())
    quantize_(q_offloaded, Int8WeightOnlyConfig())
    accelerate.cpu_offload(q_offloaded, execution_device="cpu")
    assert f_dispatched.model.layers[0].mlp.down_proj.weight.device == META
    assert q_offloaded.model.layers[0].mlp.down_proj.weight.device == META
    _same(ns.compare(f_dispatched, q_offloaded, batches), in_memory)


def test_from_pretrained_with_an_offload_folder(dynamic_llama, batches, tmp_path):
    from transformers import LlamaForCausalLM

    f, q = dynamic_llama
    f.save_pretrained(tmp_path / "checkpoint")
    offloaded = LlamaForCausalLM.from_pretrained(
        tmp_path / "checkpoint", device_map={"": "disk"}, offload_folder=tmp_path / "offload")
    assert _parameters_on_meta(offloaded)
    _same(ns.compare(offloaded, q, batches), ns.compare(f, q, batches))


def _kl(float_model: nn.Module, model: nn.Module, batches) -> float:
    """Mean over real tokens of KL(float || model) of the next-token distributions, in
    float64: the oracle of metric="kl"."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ref = float_model(**batch).logits.double().log_softmax(-1)
            got = model(**batch).logits.double().log_softmax(-1)
            kl = (ref.exp() * (ref - got)).sum(-1)
            real = batch["attention_mask"].bool()
            total, tokens = total + float(kl[real].sum()), tokens + int(real.sum())
    return total / tokens


def test_a_preloaded_decoder_layer_is_one_layer_for_sensitivity_advise_and_diagnose(
        dynamic_llama, batches, tmp_path):
    """With preload_module_classes each decoder layer is called whole. Its 7 quantized
    Linears used to vanish from sensitivity and advise without a word (1 layer, lm_head,
    instead of 15; skipped empty), and advise said "NOT reached (even with all 1 layers
    float)" at KL 0.01086, which keeping the decoder layers float reaches. Each decoder layer
    is now one layer, swapped whole, and every result says so. Oracle: the hybrids built by
    hand (the quantized model with the float decoder layer put in), their KL computed
    directly."""
    f, q = dynamic_llama
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                  "model.layers.0": "disk", "model.layers.1": "disk", "model.norm": "cpu",
                  "lm_head": "cpu"}
    dispatched = accelerate.dispatch_model(tiny_llama(), device_map=device_map,
                                           offload_dir=tmp_path, main_device="cpu",
                                           preload_module_classes=["LlamaDecoderLayer"])

    def with_float(*paths):
        hybrid = copy.deepcopy(q)
        for path in paths:
            parent, _, name = path.rpartition(".")
            setattr(hybrid.get_submodule(parent), name, copy.deepcopy(f.get_submodule(path)))
        return hybrid

    s = ns.sensitivity(dispatched, q, batches, metric="kl")
    assert [layer.name for layer in s.layers] == ["model.layers.0", "model.layers.1", "lm_head"]
    assert s.skipped == () and s.failed == ()
    assert [name for name, _ in s.whole] == ["model.layers.0", "model.layers.1"]
    assert all("preload_module_classes" in why for _, why in s.whole)
    assert s.quantized == pytest.approx(_kl(f, q, batches), rel=1e-6)
    for layer in s.layers:
        assert layer.all_but == pytest.approx(_kl(f, with_float(layer.name), batches), rel=1e-6)
    advice = ns.advise(dispatched, q, batches, metric="kl", target=0.005)
    assert advice.reached and advice.keep_float == ("model.layers.0",)
    assert advice.value == pytest.approx(_kl(f, with_float("model.layers.0"), batches), rel=1e-6)
    assert advice.value <= 0.005
    assert "`model.layers.0`, `model.layers.1` are each called whole" in advice.message
    assert "Dispatch without preload_module_classes" in advice.message
    diagnosis = ns.diagnose(dispatched, q, batches)
    assert [name for name, _ in diagnosis.whole] == ["model.layers.0", "model.layers.1"]
    assert "model.layers.1 is called whole because accelerate's preload" in diagnosis.text()
    assert diagnosis.layer("model.layers.0").quantized


def test_a_module_with_small_offloaded_tensors_of_its_own_is_traced_through(tmp_path):
    """A custom module holding a parameter beside its Linear, offloaded: it used to be called
    whole, and its Linear's row and weight SQNR vanished without a word (3 rows instead of 4,
    weight_sqnr None). Its own tensors are now read into the graph and it is traced through
    as in memory. Oracle: the in-memory run, every field, and the weight SQNR computed
    directly."""
    model, q, data, in_memory, direct = _scaled_pair()
    assert [r.name for r in in_memory.rows] == ["fc", "relu", "block.fc", "mul"]
    accelerate.disk_offload(model, tmp_path, execution_device="cpu")
    assert offloaded_names(model.block) == ["scale"] and not keeps_whole(model.block)
    report = ns.compare(model, q, data)
    _same(report, in_memory)
    assert report.row("block.fc").weight_sqnr == pytest.approx(direct, rel=1e-9)
    # the user's model is untouched: still offloaded, still run by its hook
    assert model.block.scale.device == META and model.block.fc.weight.device == META
    assert _parameters_on_meta(model) == len(list(model.parameters()))


def test_a_module_with_large_offloaded_tensors_of_its_own_is_called_whole(tmp_path, monkeypatch):
    """Own tensors above the size a graph may hold keep the module whole (its hook loads
    them). Its row then compares the weights of its quantized layers, and the layers inside
    are listed unpaired with the reason and the fix; they used to vanish without a word.
    Oracles: the in-memory rows of that Linear and of the block's last op, and the SQNR
    computed directly."""
    model, q, data, in_memory, direct = _scaled_pair()
    accelerate.disk_offload(model, tmp_path, execution_device="cpu")
    monkeypatch.setattr(offload, "_HELD_BYTES", 16)  # the block's scale: 8 floats, 32 bytes
    assert keeps_whole(model.block)
    report = ns.compare(model, q, data)
    _same(report.model_output, in_memory.model_output)
    assert [r.name for r in report.rows] == ["fc", "relu", "block"]
    block, inner = report.row("block"), in_memory.row("block.fc")
    assert block.weight_sqnr == pytest.approx(inner.weight_sqnr, rel=1e-9)
    assert block.weight_sqnr == pytest.approx(direct, rel=1e-9)
    assert block.weight_keys == ("block.fc._packed_params._packed_params",)
    assert "weights of its layers block.fc compare here" in block.note
    # the whole block's output is the in-memory output of its last op (fc * scale)
    assert block.output["sqnr"] == pytest.approx(in_memory.row("mul").output["sqnr"], rel=1e-6)
    assert {(node, side) for node, side, _ in report.unmatched} == {
        ("block.fc", "float"), ("block.fc", "quantized")}
    assert all("accelerate offloads its own `scale`" in reason and "device_map" in reason
               for _, _, reason in report.unmatched)


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # `scale`
def test_a_root_with_large_offloaded_tensors_of_its_own_is_one_op(tmp_path, monkeypatch):
    """A root module whose own offloaded tensors are too large to read into a graph is called
    whole: compare, sensitivity and diagnose used to say "nothing paired ... do not look like
    a float model and the quantized model made from it", the quantized side traced through
    while the float side was one op. Both sides are now one op, as leaf_modules=[""] makes
    them; sensitivity and advise, with nothing to choose among, say so and how to have the
    layers. Oracles: the in-memory run (its model output and its last op's row), the weight
    SQNR computed directly, and the fix's dispatch comparing as in memory."""
    torch.manual_seed(0)
    model = ScaledLinear().eval()  # fc(x) * scale: the root holds `scale` beside `fc`
    q = quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    data = [torch.randn(2, 8) for _ in range(2)]
    in_memory = ns.compare(model, q, data)
    w = model.fc.weight.detach().double()
    direct = 10 * torch.log10((w ** 2).sum() / ((w - q.fc.weight().dequantize().double()) ** 2)
                              .sum()).item()
    accelerate.disk_offload(model, tmp_path / "root", execution_device="cpu")
    monkeypatch.setattr(offload, "_HELD_BYTES", 16)  # scale: 8 floats, 32 bytes
    assert keeps_whole(model)

    report = ns.compare(model, q, data)
    assert [r.name for r in report.rows] == ["root"]
    row = report.row("root")
    assert row.quantized and row.weight_keys == ("fc._packed_params._packed_params",)
    assert row.weight_sqnr == pytest.approx(direct, rel=1e-9)
    assert row.output["sqnr"] == pytest.approx(in_memory.row("mul").output["sqnr"], rel=1e-6)
    _same(report.model_output, in_memory.model_output)
    assert {(node, side) for node, side, _ in report.unmatched} == {("fc", "float"),
                                                                     ("fc", "quantized")}
    assert all("inside the model's root module" in reason
               and "device_map entries putting `scale` on the execution device" in reason
               for _, _, reason in report.unmatched)
    diagnosis = ns.diagnose(model, q, data)
    assert [name for name, _ in diagnosis.whole] == ["root"]
    assert diagnosis.layer("root").cumulative_sqnr == pytest.approx(row.output["sqnr"], rel=1e-6)
    for search in (lambda: ns.sensitivity(model, q, data),
                   lambda: ns.advise(model, q, data, metric="sqnr", target=60.0)):
        with pytest.raises(ns.InputError, match=r"the whole model is called as one op(.|\n)*"
                                                r"Fix: Keep the model's own tensors in memory "
                                                r"\(device_map entries putting `scale`"):
            search()
    # the fix: the root's own tensor kept in memory, its Linear on disk
    torch.manual_seed(0)
    kept = accelerate.dispatch_model(ScaledLinear().eval(), device_map={"scale": "cpu",
                                                                        "fc": "disk"},
                                     main_device="cpu", offload_dir=tmp_path / "kept")
    assert kept.fc.weight.device == META and not keeps_whole(kept)
    _same(ns.compare(kept, q, data), in_memory)


def _scaled_pair():
    """A :class:`_Scaled` model, its quantize_dynamic twin, two batches, the in-memory report
    and ``block.fc``'s weight SQNR computed directly."""
    torch.manual_seed(0)
    model = _Scaled().eval()
    q = quantize_dynamic(copy.deepcopy(model), {nn.Linear})
    data = [torch.randn(2, 8) for _ in range(2)]
    w = model.block.fc.weight.detach().double()
    error = w - q.block.fc.weight().dequantize().double()
    direct = 10 * torch.log10((w ** 2).sum() / (error ** 2).sum()).item()
    return model, q, data, ns.compare(model, q, data), direct


class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.block = ScaledLinear()

    def forward(self, x):
        return self.block(torch.relu(self.fc(x)))


def test_offloaded_weights_are_read_without_touching_the_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    weight = model[0].weight.detach().clone()
    accelerate.disk_offload(model, tmp_path, execution_device="cpu")
    readable = loaded(model[0], "0")
    torch.testing.assert_close(readable.weight, weight)
    assert model[0].weight.device == META and readable is not model[0]
    assert devices(model) == {torch.device("cpu")}
    plain = nn.Linear(2, 2)
    assert loaded(plain) is plain


def test_weights_on_meta_with_nothing_to_load_them_are_refused_with_a_fix():
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ns.InputError, match=r"no accelerate hook on that module holds its "
                                            r"value(.|\n)*Fix: load the weights"):
        loaded(empty[0], "0")
    q = quantize_dynamic(nn.Sequential(nn.Linear(4, 4)).eval(), {nn.Linear})
    with pytest.raises(ns.InputError, match=r"float model on meta(.|\n)*Weights on the meta "
                                            r"device were never loaded"):
        ns.compare(empty, q, [torch.randn(2, 4)], comparisons=("outputs",))


def test_layers_inside_a_preloaded_module_are_listed_unpaired_with_the_reason(
        dynamic_llama, batches, tmp_path):
    """With preload_module_classes the decoder layer's hook loads its children: the layer is
    compared whole, and its Linears and norms used to vanish from the report without a word
    (25 rows became 5). They are now unpaired, each with the reason and the fix."""
    f, q = dynamic_llama
    in_memory = ns.compare(f, q, batches)
    device_map = {name: "disk" for name in ("model.embed_tokens", "model.layers", "model.norm",
                                            "model.rotary_emb", "lm_head")}
    dispatched = accelerate.dispatch_model(tiny_llama(), device_map=device_map,
                                           offload_dir=tmp_path, main_device="cpu",
                                           preload_module_classes=["LlamaDecoderLayer"])
    report = ns.compare(dispatched, q, batches)

    inside = {f"model.layers.{i}.{name}" for i in range(2) for name, m in
              f.model.layers[0].named_modules() if isinstance(m.__dict__["_parameters"].get(
                  "weight"), torch.Tensor)}
    assert len(inside) == 18  # 7 Linears and 2 norms a layer
    for side in ("float", "quantized"):
        listed = {node for node, s, reason in report.unmatched if s == side
                  and "preload_module_classes" in reason and "model.layers." in reason}
        assert listed == inside
    assert {r.name for r in report.rows} == {"model.embed_tokens", "model.layers.0",
                                             "model.layers.1", "model.norm", "lm_head"}
    assert report.model_output == pytest.approx(in_memory.model_output, rel=1e-6)
    # each layer's row compares the weights of its quantized Linears, read from the layer's
    # hook (theirs have none): oracle, the SQNR of the 7 weights together, computed directly
    for i in range(2):
        pairs = [(m.weight.detach().double(), q.get_submodule(f"model.layers.{i}.{name}")
                  .weight().dequantize().double())
                 for name, m in f.model.layers[i].named_modules() if isinstance(m, nn.Linear)]
        signal = sum((w ** 2).sum() for w, _ in pairs)
        noise = sum(((w - wq) ** 2).sum() for w, wq in pairs)
        row = report.row(f"model.layers.{i}")
        assert len(row.weight_keys) == 7
        assert row.weight_sqnr == pytest.approx(10 * torch.log10(signal / noise).item(), rel=1e-9)


def test_an_offloaded_model_not_exported_says_accelerates_hooks_are_why(tmp_path):
    """``capture="export"`` of a disk-offloaded float model: torch.export's fake tensors meet
    the hooks that load its weights, and the note read "TypeError: FakeTensor.__new__()
    missing required argument: 'fake_mode'", naming no cause. It names the hooks and their
    modules; the model is traced by torch.fx as in memory. Oracle: the in-memory model's
    report with ``capture="fx"``."""
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()

    q = quantize_dynamic(mlp(), {nn.Linear})
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    in_memory = ns.compare(mlp(), q, data, capture="fx", progress=False)
    offloaded = accelerate.disk_offload(mlp(), tmp_path, execution_device="cpu")
    report = ns.compare(offloaded, q, data, capture="export", progress=False)
    (note,) = [n for n in report.notes if n.startswith("capture (float)")]
    assert ("torch.export could not capture the float model (Sequential): accelerate's "
            "offload hooks (on `0`, `2`) load its weights at each call, which torch.export "
            "cannot run through (") in note
    assert note.endswith("a model loaded in memory can be exported; traced with torch.fx "
                         "instead")
    _same(report.rows, in_memory.rows)
    _same(report.model_output, in_memory.model_output)
