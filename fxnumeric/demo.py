"""The built-in demo: torchvision's quantizable resnet18 and the tutorial's LSTM.

Random weights and seeded data, so it runs on a fresh install without network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from tabulate import tabulate
from torch import nn

from . import eager
from ._tensors import first_output
from .match import match
from .metrics import sqnr

__all__ = ["LSTMModel", "resnet18_pair", "lstm_pair", "run_demo"]


class LSTMModel(nn.Module):
    """The tutorial's word-language model: embedding, LSTM, linear decoder."""

    def __init__(self, ntoken: int = 10, ninp: int = 512, nhid: int = 256, nlayers: int = 5, dropout: float = 0.5) -> None:
        super().__init__()
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid
        self.nlayers = nlayers
        initrange = 0.1
        self.encoder.weight.data.uniform_(-initrange, initrange)
        self.decoder.bias.data.zero_()
        self.decoder.weight.data.uniform_(-initrange, initrange)

    def forward(self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]):
        emb = self.encoder(input)
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(output), hidden

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def resnet18_pair(seed: int = 0, input_shape: tuple[int, ...] = (2, 3, 32, 32)):
    """The tutorial's static setup: fused quantizable resnet18, default_qconfig, calibrated."""
    import torchvision
    from torch.ao.quantization import default_eval_fn, default_qconfig, quantize

    torch.manual_seed(seed)
    float_model = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    float_model.fuse_model()
    float_model.qconfig = default_qconfig
    data = [(torch.rand(*input_shape), torch.zeros(input_shape[0], dtype=torch.long)) for _ in range(2)]
    qmodel = quantize(float_model, default_eval_fn, [data], inplace=False)
    return float_model, qmodel, data[0][0]


def lstm_pair(seed: int = 0):
    """The tutorial's dynamic setup: LSTMModel with LSTM and Linear quantized to qint8."""
    torch.manual_seed(seed)
    float_model = LSTMModel().eval()
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    inputs = (torch.randint(10, (1, 1), dtype=torch.long), float_model.init_hidden(1))
    return float_model, qmodel, inputs


def _section(title: str, float_model: nn.Module, qmodel: nn.Module, inputs: tuple, swap: list, out: Callable[[str], None]) -> None:
    out(f"== {title}")
    m = match(float_model, qmodel)
    out(f"paired {len(m.pairs)} ops; quantized-op coverage {m.coverage:.0%}; "
        f"unpaired: {len(m.unmatched_float)} float, {len(m.unmatched_quant)} quantized")
    weights = eager.compare_weights(float_model, qmodel)
    acts = eager.compare_model_outputs(float_model, qmodel, *inputs)
    stubs = eager.compare_model_stub(float_model, qmodel, swap, *inputs)
    rows = [(k, "weight", sqnr(v["float"], v["quantized"])) for k, v in weights.items()]
    rows += [(k, "output (cumulative)", sqnr(first_output(v["float"][0]), first_output(v["quantized"][0]))) for k, v in acts.items()]
    rows += [(k, "shadow (local)", sqnr(v["float"][0], v["quantized"][0])) for k, v in stubs.items()]
    out(tabulate(rows, headers=("key", "comparison", "SQNR dB"), floatfmt=".2f"))
    out("")


def run_demo(out: Callable[[str], None] = print) -> None:
    """Run both tutorial setups through fxnumeric and print SQNR per layer."""
    import torchvision

    f, q, x = resnet18_pair()
    _section("resnet18, eager static quantization (random weights)", f, q, (x,),
             [torchvision.models.quantization.resnet.QuantizableBasicBlock], out)
    f, q, inputs = lstm_pair()
    _section("LSTM word-language model, dynamic quantization", f, q, inputs, [nn.Linear, nn.LSTM], out)
