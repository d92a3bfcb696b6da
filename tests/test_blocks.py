"""A view by block (issue 19, item 2): decoder layers, BERT layers, ResNet stages as block
rows with the error entering, added in (a block-level shadow) and leaving each; read another
way with forward hooks on the models themselves."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fxnumeric as ns
from fxnumeric.blocks import block_of, block_paths
from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches

sys.path.insert(0, str(Path(__file__).parent))
from _flow_pairs import FLOWS  # noqa: E402


def _sqnr(pairs):
    signal = sum(float(f.double().square().sum()) for f, _ in pairs)
    noise = sum(float((f.double() - q.double()).square().sum()) for f, q in pairs)
    return 10 * math.log10(signal / noise)


def _first(x):
    x = x[0] if isinstance(x, (tuple, list)) else x
    return x.dequantize() if x.is_quantized else x


def _read_blocks(f, q, blocks, batches, call):
    """Each block's (float out, quant out) and (float block on the quant input, quant out)."""
    outputs = {b: [] for b in blocks}
    shadows = {b: [] for b in blocks}
    seen = {}
    for batch in batches:
        seen.clear()
        hooks = [f.get_submodule(b).register_forward_hook(
            lambda m, a, o, b=b: seen.__setitem__(("f", b), _first(o))) for b in blocks]
        hooks += [q.get_submodule(b).register_forward_hook(
            lambda m, a, k, o, b=b: seen.__setitem__(("q", b), (a, k, _first(o))),
            with_kwargs=True) for b in blocks]
        with torch.no_grad():
            call(f, batch)
            call(q, batch)
        for h in hooks:
            h.remove()
        for b in blocks:
            args, kwargs, q_out = seen[("q", b)]
            outputs[b].append((seen[("f", b)], q_out))
            with torch.no_grad():
                deq = [a.dequantize() if isinstance(a, torch.Tensor) and a.is_quantized else a
                       for a in args]
                shadows[b].append((_first(f.get_submodule(b)(*deq, **kwargs)), q_out))
    return ({b: _sqnr(v) for b, v in outputs.items()}, {b: _sqnr(v) for b, v in shadows.items()})


def test_blocks_are_the_repeated_containers():
    f = FLOWS["fx"]().float_model
    assert block_paths(tiny_llama()) == ["model.layers.0", "model.layers.1"]
    assert block_paths(FLOWS["bert"]().float_model) == ["encoder.layer.0", "encoder.layer.1"]

    assert block_paths(torchvision.models.resnet18(weights=None)) == [
        "layer1", "layer2", "layer3", "layer4"]
    # stages of 3 to 6 Bottlenecks are still repeats of one kind of container
    assert block_paths(torchvision.models.resnet50(weights=None)) == [
        "layer1", "layer2", "layer3", "layer4"]
    # `features` and `classifier` are both Sequentials but hold different layers: not two
    # blocks; the blocks are the inverted residuals (and the two conv-BN-ReLU6 ends)
    mobilenet = block_paths(torchvision.models.mobilenet_v2(weights=None))
    assert mobilenet == [f"features.{i}" for i in range(19)]
    assert block_paths(torchvision.models.vgg11(weights=None)) == []  # no repeated container
    assert block_paths(f) == []  # conv, relu, pool, fc: layers, no repeated container
    dynamic = FLOWS["dynamic"]().quant_model
    assert block_paths(dynamic) == []  # a dynamic Linear has a child, but is a layer
    assert block_of("model.layers.1.mlp.down_proj", ["model.layers.1", "model.layers.10"]) == (
        "model.layers.1")


def test_decoder_blocks_read_as_the_models_run_them():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    f = tiny_llama().eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    data = tiny_llm_batches(vocab_size=256, n=2)
    report = ns.compare(f, q, data, progress=False)
    names = [b.name for b in report.blocks]
    assert names == ["model.layers.0", "model.layers.1"]
    outputs, shadows = _read_blocks(f, q, names, data,
                                    lambda m, b: m(**b, use_cache=False))
    for block in report.blocks:
        assert block.kind == "LlamaDecoderLayer" and len(block.layers) == 11
        assert block.output_sqnr == pytest.approx(outputs[block.name], abs=1e-3)
        assert block.shadow_sqnr == pytest.approx(shadows[block.name], abs=1e-3)
    assert report.blocks[0].entering is None
    assert report.blocks[1].entering == report.blocks[0].output_sqnr
    # layers know their block, in the order the block runs them
    layers = [r for r in report.rows if r.block == "model.layers.1"]
    assert [r.name.rsplit(".", 1)[-1] for r in layers][:3] == ["input_layernorm", "q_proj",
                                                                "k_proj"]
    assert [r.name for r in layers] == list(report.blocks[1].layers)


def test_resnet_stages_are_blocks_of_the_traced_graph(tmp_path):
    from fxnumeric.demo import resnet18_pair

    f, q, _ = resnet18_pair()
    data = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))
            for i in range(2)]
    report = ns.compare(f, q, data, progress=False)
    assert [b.name for b in report.blocks] == ["layer1", "layer2", "layer3", "layer4"]
    outputs, shadows = _read_blocks(f, q, ["layer2", "layer4"], data, lambda m, b: m(b))
    for name in ("layer2", "layer4"):
        block = next(b for b in report.blocks if b.name == name)
        assert block.output_sqnr == pytest.approx(outputs[name], abs=1e-3)
        assert block.shadow_sqnr == pytest.approx(shadows[name], abs=1e-3)
        # the error a stage adds by itself is less than what leaves it, accumulated
        assert block.shadow_sqnr > block.output_sqnr
    assert report.row("layer3.0.conv1").block == "layer3"
    page = report.to_html(tmp_path / "r.html").read_text()
    assert "<h2>Blocks</h2>" in page and page.count("<details>") == 4
    assert ns.Report.from_json(report.to_json()).blocks == report.blocks
    assert "shadow SQNR (adds)" in report.block_table() and "layer4" in str(report)



class _Values(torch.fx.Interpreter):
    """Runs a GraphModule and keeps what each call_module node read and returned."""

    def __init__(self, gm):
        super().__init__(gm)
        self.read, self.out = {}, {}

    def call_module(self, target, args, kwargs):
        out = super().call_module(target, args, kwargs)
        self.read.setdefault(target, args[0])
        self.out[target] = out
        return out


def _fx_converted(f, data):
    """``f`` quantized by FX (x86), calibrated on ``data``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (data[0],))
    with torch.no_grad():
        for x in data:
            prepared(x)
    return convert_fx(prepared)


def test_resnet_stages_are_blocks_of_an_fx_converted_graph():
    # convert_fx keeps `layer1` as a plain Module and names the residual add after its
    # quantized op (add_relu): the blocks are read off the float model, the add's row off
    # where its float op ran
    torch.manual_seed(0)
    f = torchvision.models.resnet18(weights=None).eval()
    data = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i))
            for i in range(2)]
    q = _fx_converted(f, data)
    report = ns.compare(f, q, data, progress=False)
    assert [b.name for b in report.blocks] == ["layer1", "layer2", "layer3", "layer4"]
    assert report.row("add_relu").block == "layer1" and report.row("add_relu_3").block == "layer2"
    assert [r.name for r in report.rows if r.block == "layer2"] == list(report.blocks[1].layers)
    assert report.row("fc").block == ""
    # the oracle: the quantized values entering and leaving layer2 (what layer2.0.conv1 and
    # layer3.0.conv1 read), the float layer2's output and the float layer2 on the entering one
    outs, shadows = [], []
    for x in data:
        values = _Values(q)
        with torch.no_grad():
            values.run(x)
            entering = values.read["layer2.0.conv1"].dequantize()
            leaving = values.read["layer3.0.conv1"].dequantize()
            float_out = f.layer2(f.layer1(f.maxpool(f.relu(f.bn1(f.conv1(x))))))
            outs.append((float_out, leaving))
            shadows.append((f.layer2(entering), leaving))
    block = report.blocks[1]
    assert block.output_sqnr == pytest.approx(_sqnr(outs), abs=1e-3)
    assert block.shadow_sqnr == pytest.approx(_sqnr(shadows), abs=1e-3)



class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.relu, self.fc2 = (torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                         torch.nn.Linear(64, 32))

    def forward(self, x):
        return x + self.fc2(self.relu(self.fc1(x)))  # a functional add ends the block


class _ResidualNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)
        self.blocks = torch.nn.Sequential(_Residual(), _Residual(), _Residual())

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


def test_an_fx_converted_block_ending_in_a_plain_add_leaves_by_the_add():
    # convert_fx's quantized add says nowhere that it ran in the block: the block's other
    # ops leave by fc2 alone, which was read as the block's output (0.2 dB against 31 dB)
    torch.manual_seed(0)
    f = _ResidualNet().eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    q = _fx_converted(f, data)
    report = ns.compare(f, q, data, progress=False)
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    # the oracle: what each block's fc1 (and `out`) reads in the quantized graph, the float
    # blocks' outputs, and the float block on the quantized value entering it
    reads = ["blocks.0.fc1", "blocks.1.fc1", "blocks.2.fc1", "out"]
    outs, shadows = {i: [] for i in range(3)}, {i: [] for i in range(3)}
    for x in data:
        values = _Values(q)
        with torch.no_grad():
            values.run(x)
            h = f.inp(x)
            for i, block in enumerate(f.blocks):
                entering = values.read[reads[i]].dequantize()
                leaving = values.read[reads[i + 1]].dequantize()
                h = block(h)
                outs[i].append((h, leaving))
                shadows[i].append((block(entering), leaving))
    for i, block in enumerate(report.blocks):
        assert block.output_sqnr == pytest.approx(_sqnr(outs[i]), abs=1e-3)
        assert block.shadow_sqnr == pytest.approx(_sqnr(shadows[i]), abs=1e-3)
        assert block.output_sqnr > 25


class _ConvSiLU(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))


class _SiLUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(_ConvSiLU(), _ConvSiLU())
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_an_fx_float_op_hands_on_the_value_its_quantized_reader_reads():
    # x86 runs SiLU in float: conv -> dequantize -> silu -> quantize_per_tensor -> next conv.
    # The next conv's shadow is fed the rounded value, so the rounding is the SiLU's: read
    # before it, the SiLU row read 32.20 dB with a shadow of inf, and its block left at 32.20
    # where the next conv reads 30.79 dB (efficientnet_b0's SiLU rows the same, 34.32 vs 32.41)
    torch.manual_seed(0)
    f = _SiLUNet().eval()
    data = [torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))
            for i in range(2)]
    q = _fx_converted(f, data)
    report = ns.compare(f, q, data, progress=False)
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1"]
    # the oracle: what the next conv reads in the quantized graph (an fx Interpreter), the
    # float model's SiLU, the float SiLU of the quantized conv's output, and the float block
    # on what the block's conv reads
    reads = ["blocks.0.conv", "blocks.1.conv", "head"]
    outs, shadows, spans = ({i: [] for i in range(2)} for _ in range(3))
    for x in data:
        values = _Values(q)
        with torch.no_grad():
            values.run(x)
            h = x
            for i, block in enumerate(f.blocks):
                h = block(h)
                read = values.read[reads[i + 1]].dequantize()
                outs[i].append((h, read))
                conv_out = values.out[f"blocks.{i}.conv"].dequantize()
                shadows[i].append((torch.nn.functional.silu(conv_out), read))
                spans[i].append((block(values.read[reads[i]].dequantize()), read))
    for i, block in enumerate(report.blocks):
        row = report.row(f"blocks.{i}.act")
        assert not row.quantized
        assert row.output["sqnr"] == pytest.approx(_sqnr(outs[i]), abs=1e-3)
        assert row.shadow["sqnr"] == pytest.approx(_sqnr(shadows[i]), abs=1e-3)
        assert math.isfinite(row.shadow["sqnr"])
        assert block.output_sqnr == pytest.approx(_sqnr(outs[i]), abs=1e-3)
        assert block.shadow_sqnr == pytest.approx(_sqnr(spans[i]), abs=1e-3)
    assert report.blocks[1].entering == pytest.approx(_sqnr(outs[0]), abs=1e-3)


def test_an_exported_float_graph_has_the_blocks_of_its_module():
    # torch.export drops the module tree; its ops' nn_module_stack records it, and the blocks
    # read from there are the module's, with the same numbers as comparing the nn.Module
    from _flow_pairs import _pt2e

    torch.manual_seed(0)
    f = torchvision.models.resnet18(weights=None).eval()
    data = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(i))
            for i in range(2)]
    exported = torch.export.export(copy.deepcopy(f), (data[0],)).module()
    assert block_paths(exported) == block_paths(f) == ["layer1", "layer2", "layer3", "layer4"]
    mobilenet = torchvision.models.mobilenet_v2(weights=None).eval()
    assert block_paths(torch.export.export(mobilenet, (data[0],)).module()) == block_paths(
        mobilenet)
    q = _pt2e(f, data)
    from_graph = ns.compare(exported, q, data, progress=False)
    from_module = ns.compare(f, q, data, capture="export", progress=False)
    assert [(b.name, b.kind, b.layers) for b in from_graph.blocks] == [
        (b.name, b.kind, b.layers) for b in from_module.blocks]
    assert [b.kind for b in from_graph.blocks] == ["Sequential"] * 4
    for a, b in zip(from_graph.blocks, from_module.blocks, strict=True):
        assert a.output_sqnr == pytest.approx(b.output_sqnr, abs=1e-6)
        assert a.shadow_sqnr == pytest.approx(b.shadow_sqnr, abs=1e-6)


def test_no_blocks_no_block_rows():
    pair = FLOWS["dynamic"]()
    report = ns.compare(pair.float_model, pair.quant_model, pair.batches, progress=False)
    assert report.blocks == () and report.block_table() == ""
    assert all(r.block == "" for r in report.rows)
    only = ns.compare(pair.float_model, pair.quant_model, pair.batches, progress=False,
                      comparisons=("outputs",))
    assert only.blocks == ()


def test_a_pt2e_block_shadow_reads_the_hidden_state_as_the_block_receives_it():
    """X86InductorQuantizer quantizes a BertLayer's input for its query/key/value Linears but
    its residual add reads the hidden state as carried. The block shadow fed the dequantized
    copy everywhere read 43 dB where the float layer on the block's input reads 79 dB.
    Oracle: the float BertLayer run by hand on the value entering the quantized block (read
    with an fx Interpreter), against the quantized block's output."""
    transformers = pytest.importorskip("transformers")
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=37,
                                     attn_implementation="sdpa")
    torch.manual_seed(0)
    bert = transformers.BertModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 99, (4, 12), generator=gen)} for _ in range(2)]
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(
        torch.export.export(bert, (), data[0], strict=False).module(), quantizer)
    for batch in data:
        prepared(**batch)
    q = pt2e.convert_pt2e(prepared)
    report = ns.compare(bert, q, data, progress=False)
    matching = ns.match(bert, q, data[0])

    class Values(torch.fx.Interpreter):
        def run_node(self, n):
            self.seen[n.name] = value = super().run_node(n)
            return value

    for block in ns.blocks.find_blocks(matching):
        index = int(block.name.rsplit(".", 1)[1])
        linear = next(n for n in block.quant_nodes if "linear" in str(n.target))
        entering = linear.args[0]
        while "quantize" in str(entering.target):  # the Linear's own quantize/dequantize
            entering = entering.args[0]
        signal = noise = 0.0
        for batch in data:
            run = Values(q)
            run.seen = {}
            run.run(batch["input_ids"])
            with torch.no_grad():
                ref = bert.encoder.layer[index](run.seen[entering.name])
            ref = (ref[0] if isinstance(ref, tuple) else ref).double()
            actual = run.seen[block.quant_out.name].double()
            signal += float(ref.square().sum())
            noise += float((ref - actual).square().sum())
        row = next(b for b in report.blocks if b.name == block.name)
        assert row.shadow_sqnr == pytest.approx(10 * math.log10(signal / noise), abs=1e-3)


def test_blocks_run_in_order_and_enter_from_their_own_container():
    """A CLIP runs its vision tower first, its text tower is registered first: the blocks
    were listed text first, and the vision tower's first layer read the text tower's last
    output as its 'entering' SQNR. Oracle: the order forward hooks see the layers run in."""
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, bos_token_id=0, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=16)
    torch.manual_seed(0)
    f = transformers.CLIPModel(config).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(3, 64, (3, 7), generator=gen),
             "pixel_values": torch.randn(2, 3, 32, 32, generator=gen)} for _ in range(2)]
    layers = [f"{tower}_model.encoder.layers.{i}" for tower in ("text", "vision")
              for i in range(2)]
    ran: list[str] = []
    hooks = [f.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: ran.append(p))
             for p in layers]
    with torch.no_grad():
        f(**data[0])
    for hook in hooks:
        hook.remove()
    report = ns.compare(f, q, data, progress=False)
    blocks = {b.name: b for b in report.blocks}
    assert [b.name for b in report.blocks] == ran
    for tower in ("vision", "text"):
        first, second = (blocks[f"{tower}_model.encoder.layers.{i}"] for i in range(2))
        assert first.entering is None
        assert second.entering == first.output_sqnr


def test_named_parts_of_one_kind_are_not_blocks_and_an_unused_module_says_so():
    """A T5's encoder and decoder are both T5Stacks: they were its two blocks (23 and 33
    layers), where its blocks are the layers inside them. Its tied `shared` embedding, which
    the model runs as `encoder.embed_tokens`, was a row of dashes with no note."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                   num_decoder_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    f = transformers.T5ForConditionalGeneration(config).eval()
    assert block_paths(f) == ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                              "decoder.block.1"]
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, 64, (2, 7), generator=gen),
             "labels": torch.randint(1, 64, (2, 5), generator=gen)}]
    report = ns.compare(f, q, data, progress=False)
    assert report.row("encoder.block.1.layer.0.SelfAttention.q").block == "encoder.block.1"
    decoder = next(b for b in report.blocks if b.name == "decoder.block.0")
    assert decoder.entering is None
    shared = report.row("shared")
    assert not shared.output and shared.note.startswith("never ran on the data")
    assert all(not r.note.startswith("never ran") for r in report.rows if r.output)
    # torchvision's numbered stages are blocks as before
    assert block_paths(torchvision.models.resnet18()) == ["layer1", "layer2", "layer3", "layer4"]


def test_a_generation_step_reads_the_cache_as_each_model_and_block_receives_it():
    """A batch with ``past_key_values`` (one step of generation): the models append to the
    cache they are handed. fxnumeric handed the user's one cache to every run, which grew it
    and then failed ("size of tensor a (12) must match ... (10)") as the float run's keys
    became the quantized run's past. Each run, and each block shadow, now reads the cache as it
    was before it."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    f = tiny_llama().eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8WeightOnlyConfig())
    ids = tiny_llm_batches(vocab_size=256, n=1)[0]["input_ids"][:, :10]
    with torch.no_grad():
        cache = f(input_ids=ids[:, :8], use_cache=True).past_key_values
    batch = {"input_ids": ids[:, 8:], "past_key_values": cache}

    report = ns.compare(f, q, [batch], progress=False)

    assert cache.get_seq_length() == 8  # the user's cache, as it was
    blocks = ["model.layers.0", "model.layers.1"]
    seen = {}
    hooks = [m.get_submodule(b).register_forward_pre_hook(
        lambda mod, a, k, key=(side, b): seen.__setitem__(key, (a, copy.deepcopy(k))),
        with_kwargs=True) for side, m in (("f", f), ("q", q)) for b in blocks]
    hooks += [m.get_submodule(b).register_forward_hook(
        lambda mod, a, o, key=(side, b): seen.__setitem__(key + ("out",), _first(o)))
        for side, m in (("f", f), ("q", q)) for b in blocks]
    with torch.no_grad():
        logits = {side: m(input_ids=ids[:, 8:], past_key_values=copy.deepcopy(cache)).logits
                  for side, m in (("f", f), ("q", q))}
        for h in hooks:
            h.remove()
        for block in report.blocks:
            args, kwargs = seen[("q", block.name)]
            float_block = _first(f.get_submodule(block.name)(*args, **kwargs))
            quant_out = seen[("q", block.name, "out")]
            assert block.shadow_sqnr == pytest.approx(_sqnr([(float_block, quant_out)]),
                                                      abs=1e-3)
            assert block.output_sqnr == pytest.approx(
                _sqnr([(seen[("f", block.name, "out")], quant_out)]), abs=1e-3)
    assert [b.name for b in report.blocks] == blocks
    assert report.model_output["sqnr"] == pytest.approx(_sqnr([(logits["f"], logits["q"])]),
                                                        abs=1e-3)


class _Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.fc(x)) + x


class _Encoder(torch.nn.Module):
    """Traceable: one region holding both blocks."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _EncodesTwice(torch.nn.Module):
    """An untraceable root that runs its encoder twice: its region has two call sites."""

    def __init__(self):
        super().__init__()
        self.enc = _Encoder()
        self.out = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = self.enc(x)
        if h.sum() > 0:  # data-dependent: torch.fx cannot trace the root
            h = h * 2
        return self.out(self.enc(h))


def test_a_region_run_twice_has_a_block_per_call():
    """The blocks of a region run twice read both calls pooled; then, once its layers were
    rows per call, they were skipped. Oracle: forward hooks on each block, call by call."""
    torch.manual_seed(0)
    f = _EncodesTwice().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    report = ns.compare(f, q, data, progress=False)
    paths = ["enc.layers.0", "enc.layers.1"]
    names = paths + [f"{p}#2" for p in paths]
    assert [b.name for b in report.blocks] == names  # in run order
    ran: dict[tuple[str, str], list] = {}  # (side, block) -> (input, output) of each call
    hooks = [m.get_submodule(p).register_forward_hook(
        lambda mod, args, out, key=(side, p): ran.setdefault(key, []).append((args[0], out)))
        for p in paths for side, m in (("float", f), ("quant", q))]
    with torch.no_grad():
        for x in data:
            f(x), q(x)
    for h in hooks:
        h.remove()
    outputs: dict[str, list] = {name: [] for name in names}
    shadows: dict[str, list] = {name: [] for name in names}
    with torch.no_grad():
        for p in paths:
            for call, ((_, float_out), (quant_in, quant_out)) in enumerate(zip(
                    ran["float", p], ran["quant", p], strict=True)):
                name = p if call % 2 == 0 else f"{p}#2"  # two calls per forward
                outputs[name].append((float_out, quant_out))
                shadows[name].append((f.get_submodule(p)(quant_in), quant_out))
    blocks = {b.name: b for b in report.blocks}
    for name in names:
        assert blocks[name].output_sqnr == pytest.approx(_sqnr(outputs[name]), abs=1e-4)
        assert blocks[name].shadow_sqnr == pytest.approx(_sqnr(shadows[name]), abs=1e-4)
    assert blocks["enc.layers.0#2"].layers == ("enc.layers.0.fc#2", "enc.tanh#2", "enc.add#2")


def test_an_exported_program_float_side_has_the_blocks_of_its_module():
    """The float side given as the ExportedProgram itself (not its .module()) had no blocks:
    find_blocks wanted an nn.Module, so the block table and every row's block were empty,
    with no note. Oracle: forward hooks on the float blocks, and the quantized graph's values
    read with an fx Interpreter (the value each block hands on is the one the next Linear
    reads; the last block's is the model's output)."""
    pt2e = pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    class Blk(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = torch.nn.Linear(16, 16), torch.nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x))

    torch.manual_seed(0)
    f = torch.nn.Sequential()
    f.blocks = torch.nn.Sequential(Blk(), Blk(), Blk())
    f.eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ep = torch.export.export(copy.deepcopy(f), (data[0],))
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = pt2e.prepare_pt2e(ep.module(), quantizer)
    for x in data:
        prepared(x)
    q = pt2e.convert_pt2e(prepared)

    report = ns.compare(ep, q, data, progress=False)
    names = ["blocks.0", "blocks.1", "blocks.2"]
    assert [b.name for b in report.blocks] == names
    inside = [r for r in report.rows if r.name.startswith("blocks.")]
    assert inside and all(r.block == r.name[:len("blocks.0")] for r in inside)

    class Values(torch.fx.Interpreter):
        def run_node(self, n):
            self.seen[n.name] = value = super().run_node(n)
            return value

    linears = [n for n in q.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 3
    outs = {b: [] for b in names}
    shadows = {b: [] for b in names}
    for x in data:
        run = Values(q)
        run.seen = {}
        q_out = run.run(x)
        q_out = q_out[0] if isinstance(q_out, (tuple, list)) else q_out
        seen = {}
        hooks = [f.get_submodule(b).register_forward_hook(
            lambda m, a, o, b=b, seen=seen: seen.__setitem__(b, o)) for b in names]
        with torch.no_grad():
            f(x)
        for h in hooks:
            h.remove()
        for i, b in enumerate(names):
            leaving = run.seen[linears[i + 1].args[0].name] if i < 2 else q_out
            entering = run.seen[linears[i].args[0].name]
            outs[b].append((seen[b], leaving))
            with torch.no_grad():
                shadows[b].append((f.get_submodule(b)(entering), leaving))
    for row in report.blocks:
        assert row.output_sqnr == pytest.approx(_sqnr(outs[row.name]), abs=1e-3)
        assert row.shadow_sqnr == pytest.approx(_sqnr(shadows[row.name]), abs=1e-3)
    # the same rows as the nn.Module and its .module() give
    for other in (f, ep.module()):
        again = ns.compare(other, q, data, progress=False)
        assert [(b.name, b.layers) for b in again.blocks] == [
            (b.name, b.layers) for b in report.blocks]
        for a, b in zip(report.blocks, again.blocks, strict=True):
            assert a.output_sqnr == pytest.approx(b.output_sqnr, abs=1e-9)
            assert a.shadow_sqnr == pytest.approx(b.shadow_sqnr, abs=1e-9)


class _ScaledBlock(torch.nn.Module):
    """Linear-ReLU; ``scale`` shrinks its weights (and zeroes its bias): the float signal
    after a few such blocks is rounding residue."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.fc, self.act = torch.nn.Linear(16, 16), torch.nn.ReLU()
        with torch.no_grad():
            self.fc.weight.mul_(scale)
            if scale != 1.0:
                self.fc.bias.zero_()

    def forward(self, x):
        return self.act(self.fc(x))


def test_a_block_whose_float_signal_collapsed_is_flagged_as_its_layers_are(tmp_path):
    """Blocks 1-3 shrink the signal 1e-3 each: blocks.2 and blocks.3 leave rounding residue,
    their layer rows read "float signal collapsed", but the block table showed their SQNRs
    (9.5 dB, 0 dB) and blocks.4's entering 0 dB with no note. Oracle: the float RMS of each
    block's output and of the model input, by forward hooks, judged by the rule itself
    (RMS < 1e-6 x the largest activation upstream)."""
    torch.manual_seed(0)
    f = torch.nn.Sequential()
    f.blocks = torch.nn.Sequential(_ScaledBlock(), _ScaledBlock(1e-3), _ScaledBlock(1e-3),
                                   _ScaledBlock(1e-3), _ScaledBlock())
    f.eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    q = _fx_converted(f, data)
    report = ns.compare(f, q, data, progress=False)

    names = [f"blocks.{i}" for i in range(5)]
    sums = {b: [0.0, 0] for b in ["input", *names]}
    for x in data:
        seen = {"input": x}
        hooks = [f.get_submodule(b).register_forward_hook(
            lambda m, a, o, b=b, seen=seen: seen.__setitem__(b, o)) for b in names]
        with torch.no_grad():
            f(x)
        for h in hooks:
            h.remove()
        for b, value in seen.items():
            sums[b][0] += float(value.double().square().sum())
            sums[b][1] += value.numel()
    rms = {b: (s / n) ** 0.5 for b, (s, n) in sums.items()}
    upstream = [max(rms[b] for b in ["input", *names[:i + 1]]) for i in range(5)]
    collapsed = [rms[b] < ns.report.DEGENERATE_RMS_RATIO * up for b, up in zip(names, upstream,
                                                                                strict=True)]
    assert collapsed == [False, False, True, True, False]  # the model does what it says

    assert [b.name for b in report.blocks] == names
    for block, up, gone in zip(report.blocks, upstream, collapsed, strict=True):
        assert block.float_rms == pytest.approx(rms[block.name], rel=1e-6)
        assert block.reference_rms == pytest.approx(up, rel=1e-6)
        assert block.degenerate is gone
        assert ("float signal collapsed (RMS" in block.notes) is gone
        # the layers inside say the same
        assert all(r.degenerate is gone for r in report.rows if r.block == block.name)
    by_name = {b.name: b for b in report.blocks}
    assert "entering SQNR meaningless: blocks.3's float signal collapsed" in by_name[
        "blocks.4"].notes
    assert "entering" not in by_name["blocks.2"].notes  # blocks.1 did not collapse

    table = {line.split()[0]: line for line in report.block_table().splitlines()[2:]}
    assert "float signal collapsed" in table["blocks.2"] and "collapsed" in table["blocks.3"]
    assert "collapsed" not in table["blocks.1"]
    page = report.to_html(tmp_path / "r.html").read_text()
    for name, gone in zip(names, collapsed, strict=True):  # greyed as collapsed layers are
        assert (f"<tr class='collapsed'><td>{name}</td>" in page) is gone
    saved = json.loads(report.to_json())
    assert [b["degenerate"] for b in saved["blocks"]] == collapsed
    assert ns.Report.from_json(report.to_json()) == report


class _BoundedBlock(torch.nn.Module):
    """Linear-ReLU6: its output is at most 6 whatever its input."""

    def __init__(self):
        super().__init__()
        self.fc, self.act = torch.nn.Linear(16, 16), torch.nn.ReLU6()

    def forward(self, x):
        return self.act(self.fc(x))


def test_a_block_ending_in_a_bounded_op_is_judged_against_what_reaches_its_output():
    """Inputs of RMS 1e8: each block ends in a ReLU6 (output RMS about 2.5), and every block
    read "collapsed" against its Linear's 1e8-scale reference. Oracle: each block's float
    output RMS by forward hooks, judged against the ReLU6's bound."""
    torch.manual_seed(0)
    f = torch.nn.Sequential()
    f.blocks = torch.nn.Sequential(*(_BoundedBlock() for _ in range(3)))
    f.eval()
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) * 1e8
            for i in range(3)]
    q = _fx_converted(f, data)
    report = ns.compare(f, q, data, progress=False)

    names = [f"blocks.{i}" for i in range(3)]
    outs: dict[str, list[torch.Tensor]] = {b: [] for b in names}
    hooks = [f.get_submodule(b).register_forward_hook(
        lambda m, a, o, b=b: outs[b].append(o)) for b in names]
    with torch.no_grad():
        for x in data:
            f(x)
    for h in hooks:
        h.remove()
    rms = {b: (sum(float(t.double().square().sum()) for t in ts)
               / sum(t.numel() for t in ts)) ** 0.5 for b, ts in outs.items()}
    assert rms["blocks.0"] < ns.report.DEGENERATE_RMS_RATIO * 1e8  # collapsed by the old rule

    assert [b.name for b in report.blocks] == names
    for block in report.blocks:
        assert block.float_rms == pytest.approx(rms[block.name], rel=1e-5)
        assert block.reference_rms == 6.0 and not block.degenerate
    assert "collapsed" not in report.block_table()


def test_every_variant_shows_its_blocks_in_text_and_html(tmp_path):
    # a multi-variant report printed the first variant's block table alone, under no name,
    # and its HTML page had no blocks at all
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    f = tiny_llama().eval()
    q8 = copy.deepcopy(f)
    quantize_(q8, Int8DynamicActivationInt8WeightConfig())
    qd = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    data = tiny_llm_batches(vocab_size=256, n=2)
    report = ns.compare(f, {"int8": q8, "dynamic": qd}, data, progress=False)
    names = ["model.layers.0", "model.layers.1"]
    text = str(report)
    for variant, quant in (("int8", q8), ("dynamic", qd)):
        own = report.variants[variant]
        assert f"blocks of {variant}:\n{own.block_table()}" in text
        outputs, _ = _read_blocks(f, quant, names, data, lambda m, b: m(**b, use_cache=False))
        assert [b.output_sqnr for b in own.blocks] == pytest.approx(
            [outputs[n] for n in names], abs=1e-3)  # each variant's own blocks
    page = report.to_html(tmp_path / "r.html").read_text()
    assert page.count("<h2>Blocks</h2>") == 2
