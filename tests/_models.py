"""Small model definitions shared by the tests (importable as ``_models``)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn

__all__ = ["LSTMModel", "CallsTwice", "Bags", "embedding_pair", "nan_in_layer1_norm_pair",
           "run_order_and_first_nonfinite", "QatFunctional", "qat_functional_pair",
           "functional_values", "module_inputs", "ScaledLinear", "fp16_exact_pair",
           "conv1d_as_linear", "dynamic_mlp_with_bias", "OutlierMLP", "outlier_mlp", "x86_pt2e",
           "x86_fx"]


class LSTMModel(nn.Module):
    """The Numeric Suite tutorial's word-language LSTM: encoder, recurrent module, decoder."""

    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.5):
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)

        self.init_weights()

        self.nhid = nhid
        self.nlayers = nlayers

    def init_weights(self) -> None:
        initrange = 0.1
        self.encoder.weight.data.uniform_(-initrange, initrange)
        self.decoder.bias.data.zero_()
        self.decoder.weight.data.uniform_(-initrange, initrange)

    def forward(self, input, hidden):
        emb = self.encoder(input)
        output, hidden = self.rnn(emb, hidden)
        decoded = self.decoder(output)
        return decoded, hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (
            weight.new_zeros(self.nlayers, bsz, self.nhid),
            weight.new_zeros(self.nlayers, bsz, self.nhid),
        )


class CallsTwice(nn.Module):
    """An untraceable root that calls one Linear twice: its region has two call sites."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > 0:  # data-dependent: torch.fx cannot trace the root
            h = h * 2
        return self.out(self.fc(torch.relu(h)))


class Bags(nn.Module):
    """An EmbeddingBag and an Embedding of the same ids, pooled into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 16, mode="sum")
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        pooled = self.emb(ids).view(offsets.numel(), -1, 16).mean(1)
        return self.fc(torch.cat([self.bag(ids, offsets), pooled], 1))


def embedding_pair(qconfig: Any) -> tuple[Bags, nn.Module, list[tuple[torch.Tensor, ...]]]:
    """:class:`Bags` and its eager-quantized copy, both embeddings under ``qconfig`` (a
    ``float_qparams_weight_only_qconfig``), with three batches of 8 ids in 2 bags."""
    torch.manual_seed(0)
    float_model = Bags().eval()
    quant_model = copy.deepcopy(float_model)
    for module in (quant_model.bag, quant_model.emb):
        module.qconfig = qconfig
    torch.ao.quantization.prepare(quant_model, inplace=True)
    torch.ao.quantization.convert(quant_model, inplace=True)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 50, (8,), generator=g), torch.tensor([0, 4])) for _ in range(3)]
    return float_model, quant_model, data


def nan_in_layer1_norm_pair() -> tuple[nn.Module, nn.Module]:
    """tiny_llama against layer 0's Linears quantized dynamically, with a NaN planted in the
    quantized model's ``model.layers.1.input_layernorm`` weight: the NaN's origin."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    from fxnumeric.zoo_llm import tiny_llama

    f = tiny_llama().eval()
    layer0 = {n: default_dynamic_qconfig for n, m in f.named_modules()
              if isinstance(m, nn.Linear) and n.startswith("model.layers.0.")}
    q = quantize_dynamic(copy.deepcopy(f), layer0)
    with torch.no_grad():
        q.model.layers[1].input_layernorm.weight[5] = float("nan")
    return f, q


def run_order_and_first_nonfinite(model: nn.Module, batch: Any) -> tuple[list[str], str | None]:
    """Forward hooks on ``model`` run on ``batch``: its module paths in the order their first
    call begins, and the first module whose output (first tensor) is not finite."""
    order, nonfinite = [], []

    def began(path):
        return lambda module, args: order.append(path) if path not in order else None

    def ended(path):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            if torch.is_tensor(out) and out.is_floating_point() and not out.isfinite().all():
                nonfinite.append(path)
        return hook

    hooks = [h for path, m in model.named_modules() if path
             for h in (m.register_forward_pre_hook(began(path)),
                       m.register_forward_hook(ended(path)))]
    with torch.no_grad():
        model(**batch) if isinstance(batch, dict) else model(batch)
    for h in hooks:
        h.remove()
    return order, nonfinite[0] if nonfinite else None


class QatFunctional(nn.Module):
    """Convs and a FloatFunctional of each kind: ``add``, ``add_relu``, ``mul`` and ``cat``
    fake-quantize their output once prepared for QAT (their ``activation_post_process``),
    ``add_scalar`` does not (torch never observes it); ``conv3`` reads its output."""

    OBSERVED = ("add", "add_relu", "mul", "cat")

    def __init__(self) -> None:
        super().__init__()
        from torch.ao.nn.quantized import FloatFunctional
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.add, self.add_relu, self.mul, self.cat, self.addsc = (
            FloatFunctional() for _ in range(5))
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(self.quant(x))
        b = self.conv2(a)
        s = self.add.add(a, b)
        m = self.mul.mul(self.add_relu.add_relu(s, b), a)
        return self.dequant(self.conv3(self.addsc.add_scalar(self.cat.cat([m, s], dim=1), 0.5)))


def qat_functional_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """``(QAT float model, its converted model, input)``: :class:`QatFunctional` prepared by
    eager ``prepare_qat`` (x86), two SGD steps taken, then in eval mode with its observers off
    (every forward fake-quantizes alike, with the scales ``convert`` gave the other)."""
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    qat = QatFunctional().train()
    qat.qconfig = tq.get_default_qat_qconfig("x86")
    tq.prepare_qat(qat, inplace=True)
    sgd = torch.optim.SGD(qat.parameters(), lr=0.1)
    for _ in range(2):
        qat(torch.randn(2, 3, 8, 8)).square().mean().backward()
        sgd.step()
        sgd.zero_grad()
    qat.eval().apply(tq.disable_observer)
    with warnings.catch_warnings():  # add_scalar's observer never ran: convert says so
        warnings.simplefilter("ignore")
        quantized = tq.convert(copy.deepcopy(qat))
    return qat, quantized, torch.randn(2, 3, 8, 8)


def functional_values(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, ...]]:
    """What the FloatFunctionals of a :class:`QatFunctional` (QAT or converted) hand on for
    ``x``, read by forward hooks: ``{name: (value before its activation_post_process, value
    after)}`` (a FakeQuantize in the QAT model, an Identity in the converted one), and
    ``add_scalar``'s value (``conv3``'s input) as ``(value,)``. Dequantized, detached."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}

    def keep(name: str, *values: torch.Tensor) -> None:
        seen[name] = tuple(v.detach().dequantize().clone() for v in values)

    hooks = [getattr(model, name).activation_post_process.register_forward_hook(
        lambda m, args, out, name=name: keep(name, args[0], out))
        for name in QatFunctional.OBSERVED]
    hooks.append(model.conv3.register_forward_pre_hook(
        lambda m, args: keep("add_scalar", args[0])))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def module_inputs(gm: torch.fx.GraphModule, *args: Any) -> dict[str, Any]:
    """``{module target: the first input of its first call}`` when ``gm`` runs on ``args``
    (an fx Interpreter): what each of its modules reads, read another way than fxnumeric's."""
    read: dict[str, Any] = {}

    class Reads(torch.fx.Interpreter):
        def call_module(self, target, call_args, kwargs):
            read.setdefault(target, call_args[0])
            return super().call_module(target, call_args, kwargs)

    with torch.no_grad():
        Reads(gm).run(*args)
    return read


class ScaledLinear(nn.Module):
    """A custom module holding a parameter of its own beside a Linear (``fc(x) * scale``):
    neither one op nor a container of layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.scale = nn.Parameter(torch.full((8,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


class UntracedGate(nn.Module):
    """A conv and a residual add through a FloatFunctional, in code torch.fx cannot trace
    (``len`` of a Proxy)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.add = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x):
        y = self.conv(x)
        if len(x) > 0:  # len() of a Proxy: torch.fx cannot trace this
            y = self.add.add(y, x)
        return y


class UntracedGated(nn.Module):
    """:class:`UntracedGate` between a QuantStub and a DeQuantStub, for eager quantization."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.gate = UntracedGate()
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.gate(self.quant(x)))


def fp16_exact_pair(quantized: set[str] | None = None,
                    ) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """A 3-Linear MLP whose weights fp16 holds exactly, and its fp16 dynamic quantization
    (``quantized``: only those layers): the two differ only in the order float32 sums are
    taken, by float32 rounding at most (no quantization error at all)."""
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                      nn.Linear(16, 4)).eval()
    with torch.no_grad():
        for p in f.parameters():
            p.copy_(p.half().float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(copy.deepcopy(f), quantized or {nn.Linear}, dtype=torch.float16)
    return f, q, [torch.randn(4, 8) for _ in range(3)]


class Halved(nn.Module):
    """Three Linear+ReLU and a head; with ``half``, the quantized side's ``y * 0.5`` after
    ``fcs.1`` that the float model lacks."""

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.out = nn.Linear(16, 4)
        self.half = half

    def forward(self, x):
        for i, fc in enumerate(self.fcs):
            x = torch.relu(fc(x))
            if self.half and i == 1:
                x = x * 0.5
        return self.out(x)


class Scaled(nn.Module):
    """Three Linears; with ``scale``, a ``y * scale`` after the relu (on one side only)."""

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)
        self.scale = scale

    def forward(self, x):
        y = torch.relu(self.fc1(x))
        if self.scale is not None:
            y = y * self.scale
        return self.fc3(torch.relu(self.fc2(y)))


def halved_pair(flow: str) -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    """``(float Halved, Halved(half=True) quantized by flow, 3 batches)``: ``"dynamic"``
    (quantize_dynamic) or ``"fx_static"`` (prepare_fx / convert_fx, fbgemm)."""
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = Halved().eval()
    halved = Halved(half=True).eval()
    halved.load_state_dict(f.state_dict())
    data = [torch.randn(8, 16) for _ in range(3)]
    if flow == "dynamic":
        return f, quantize_dynamic(copy.deepcopy(halved), {nn.Linear}, dtype=torch.qint8), data
    prepared = prepare_fx(copy.deepcopy(halved), get_default_qconfig_mapping("fbgemm"),
                          (data[0],))
    with torch.no_grad():
        for x in data:
            prepared(x)
    return f, convert_fx(prepared), data


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """``model`` (changed in place, and returned) with every transformers ``Conv1D`` (GPT-2's
    layers, weight stored ``(in, out)``) replaced by the ``nn.Linear`` it computes, as a user
    converts GPT-2 before torchao or ``quantize_dynamic``, which quantize ``nn.Linear`` only."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(*child.weight.shape)
                linear.weight.data = child.weight.data.t().contiguous()
                linear.bias.data = child.bias.data.clone()
                setattr(parent, name, linear)
    return model


def dynamic_mlp_with_bias(value: float, index: int = 2) -> tuple[nn.Module, nn.Module]:
    """A float MLP (Linear-ReLU-Linear-ReLU-Linear, 16 -> 4) and its ``quantize_dynamic``
    copy whose Linear ``index`` holds ``value`` (NaN, Inf) in its first bias entry."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 4)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    weight, bias = q[index]._packed_params._weight_bias()
    bias = bias.clone()
    bias[0] = value
    q[index].set_weight_bias(weight, bias)
    return f, q


class OutlierMLP(nn.Module):
    """fc0 -> fc1 -> GELU -> fc2 -> fc3; fc1's output channel 7 is 40x the rest (fc2's
    matching input column /40, so the float model is unchanged in kind): a per-tensor input
    quantize in front of fc2 rounds every other channel coarsely."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1 = nn.Linear(32, 32), nn.Linear(32, 128)
        self.act = nn.GELU()
        self.fc2, self.fc3 = nn.Linear(128, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(self.fc2(self.act(self.fc1(self.fc0(x)))))


def outlier_mlp():
    torch.manual_seed(0)
    model = OutlierMLP().eval()
    with torch.no_grad():
        model.fc1.weight[7] *= 40
        model.fc1.bias[7] *= 40
        model.fc2.weight[:, 7] /= 40
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(16, 32, generator=g) for _ in range(4)]


def x86_pt2e(model, data, keep_float=()):
    """X86InductorQuantizer, with the modules ``keep_float`` left out by name."""
    pytest.importorskip("torchao")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    for name in keep_float:
        quantizer.set_module_name_qconfig(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(copy.deepcopy(model), (data[0],)).module()
        prepared = prepare_pt2e(exported, quantizer)
        for x in data:
            prepared(x)
        return convert_pt2e(prepared)


def x86_fx(model, data, keep_float=()):
    """convert_fx with torch's x86 qconfig mapping, ``keep_float`` set to None by name."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mapping = get_default_qconfig_mapping("x86")
    for name in keep_float:
        mapping = mapping.set_module_name(name, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), mapping, (data[0],))
        for x in data:
            prepared(x)
        return convert_fx(prepared)
