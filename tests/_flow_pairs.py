"""One small float/quantized pair per quantization flow and capture, in one place.

``FLOWS[name]()`` returns a :class:`FlowPair`; ``tests/test_every_flow.py`` runs every feature
on every one of them. Seeded random weights, nothing downloaded. The ``make_<name>``
functions are CLI factories (``fxnumeric report --model _flow_pairs:make_fx``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    default_qconfig,
    get_default_qat_qconfig_mapping,
    get_default_qconfig_mapping,
    prepare,
    quantize_dynamic,
)
from torch.ao.quantization.quantize_fx import (
    convert_fx,
    convert_to_reference_fx,
    prepare_fx,
    prepare_qat_fx,
)


@dataclass(frozen=True)
class FlowPair:
    """A float model, its quantized counterpart, batches, and how to capture them."""

    float_model: Any
    quant_model: Any
    batches: list[Any]
    capture: str = "fx"
    module_tree: bool = False  # torch.fx cannot trace it whole
    cli: tuple[str, ...] = ()  # the CLI's data flags for this model


class EagerNet(nn.Module):
    """Conv-ReLU, conv, a residual add (FloatFunctional), pooled into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.add = nn.quantized.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(self.quant(x)))
        y = self.add.add(self.conv2(y), y)
        return self.dequant(self.fc(torch.flatten(self.pool(y), 1)))


class Net(nn.Module):
    """EagerNet without stubs, for the FX and pt2e flows; its ReLU is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y) + y)
        return self.fc(torch.flatten(self.pool(y), 1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


def _images(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(n)]


def _vectors(n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 16, generator=gen) for _ in range(n)]


def _tokens(n: int = 2, *, mask: bool = True) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 99, (2, 8), generator=gen)
        batch = {"input_ids": ids}
        if mask:
            attention = torch.ones(2, 8, dtype=torch.long)
            attention[1, 6:] = 0  # a padded sequence
            batch["attention_mask"] = attention
        out.append(batch)
    return out


def _calibrated(prepared: nn.Module, batches: list[Any]) -> nn.Module:
    with torch.no_grad():
        for b in batches:
            prepared(b)
    return prepared


def eager() -> FlowPair:
    torch.manual_seed(0)
    f = EagerNet().eval()
    f.qconfig = default_qconfig
    data = _images()
    q = convert(_calibrated(prepare(copy.deepcopy(f)), data))
    return FlowPair(f, q, data, cli=("--input-shape", "2,3,8,8"))


def _fx(reference: bool = False) -> FlowPair:
    torch.manual_seed(0)
    f = Net().eval()
    data = _images()
    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (data[0],))
    _calibrated(prepared, data)
    q = convert_to_reference_fx(prepared) if reference else convert_fx(prepared)
    return FlowPair(f, q, data, cli=("--input-shape", "2,3,8,8"))


def fx() -> FlowPair:
    return _fx()


def reference_fx() -> FlowPair:
    return _fx(reference=True)


def dynamic() -> FlowPair:
    torch.manual_seed(0)
    f = MLP().eval()
    return FlowPair(f, quantize_dynamic(copy.deepcopy(f), {nn.Linear}), _vectors(),
                    cli=("--input-shape", "4,16"))


def qat() -> FlowPair:
    """FX QAT: fake-quantized forwards in training mode (the fake-quants calibrate), then
    convert. No weight update, so the float model is still the one the weights came from."""
    torch.manual_seed(0)
    f = Net().eval()
    data = _images()
    prepared = prepare_qat_fx(copy.deepcopy(f).train(), get_default_qat_qconfig_mapping("x86"),
                              (data[0],))
    with torch.no_grad():
        for b in data:
            prepared(b)
    return FlowPair(f, convert_fx(prepared.eval()), data, cli=("--input-shape", "2,3,8,8"))


def _pt2e(model: nn.Module, data: list[torch.Tensor]) -> nn.Module:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    exported = torch.export.export(copy.deepcopy(model), (data[0],)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config())
    return convert_pt2e(_calibrated(prepare_pt2e(exported, quantizer), data))


def pt2e() -> FlowPair:
    torch.manual_seed(0)
    f = Net().eval()
    data = _images()
    float_gm = torch.export.export(copy.deepcopy(f), (data[0],)).module()
    return FlowPair(float_gm, _pt2e(f, data), data, cli=("--input-shape", "2,3,8,8"))


def export() -> FlowPair:
    """capture='export': a plain float nn.Module against its pt2e model."""
    torch.manual_seed(0)
    f = MLP().eval()
    data = _vectors()
    return FlowPair(f, _pt2e(f, data), data, capture="export", cli=("--input-shape", "4,16"))


def torchao() -> FlowPair:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    torch.manual_seed(0)
    f = MLP().eval()
    q = copy.deepcopy(f)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    return FlowPair(f, q, _vectors(), cli=("--input-shape", "4,16"))


def torchao_qat() -> FlowPair:
    """torchao QAT before convert: each Linear a FakeQuantizedLinear (int8 per-token
    activations, int4 weights in groups of 16, fake-quantized inside the layer)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_
    from torchao.quantization.qat import QATConfig

    torch.manual_seed(0)
    f = MLP().eval()
    q = copy.deepcopy(f)
    quantize_(q, QATConfig(Int8DynamicActivationIntxWeightConfig(
        weight_dtype=torch.int4, weight_granularity=PerGroup(16)), step="prepare"))
    return FlowPair(f, q, _vectors(), cli=("--input-shape", "4,16"))


def _hf(model: nn.Module, quantize: Callable[[nn.Module], nn.Module], *, mask: bool = True,
        ) -> FlowPair:
    model = model.eval()
    return FlowPair(model, quantize(copy.deepcopy(model)), _tokens(mask=mask), module_tree=True,
                    cli=("--input-shape", "2,8", "--input-dtype", "long", "--vocab", "99"))


def _linear_dynamic(model: nn.Module) -> nn.Module:
    return quantize_dynamic(model, {nn.Linear})


def bert() -> FlowPair:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=32)
    return _hf(transformers.BertModel(cfg), _linear_dynamic)


def gpt2() -> FlowPair:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return _hf(transformers.GPT2LMHeadModel(cfg), _linear_dynamic)


def llama() -> FlowPair:
    """The crash of issue 16: a Llama under torchao's int8 dynamic activation config."""
    import transformers
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    def torchao_int8(model: nn.Module) -> nn.Module:
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return _hf(transformers.LlamaForCausalLM(cfg), torchao_int8)


def t5() -> FlowPair:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                num_heads=4)
    return _hf(transformers.T5EncoderModel(cfg), _linear_dynamic)


FLOWS: dict[str, Callable[[], FlowPair]] = {
    "eager": eager, "fx": fx, "reference_fx": reference_fx, "dynamic": dynamic, "qat": qat,
    "pt2e": pt2e, "export": export, "torchao": torchao, "torchao_qat": torchao_qat,
    "bert": bert, "gpt2": gpt2, "llama": llama, "t5": t5,
}


def _factory(name: str) -> Callable[[], tuple[Any, Any]]:
    def make() -> tuple[Any, Any]:
        built = FLOWS[name]()
        return built.float_model, built.quant_model

    make.__name__ = f"make_{name}"
    return make


for _name in FLOWS:
    globals()[f"make_{_name}"] = _factory(_name)
