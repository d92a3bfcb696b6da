"""The built-in demo: torchvision's quantizable resnet18 and the tutorial's LSTM.

Random weights (seeded) and seeded data, so it runs on a fresh install without network and
prints the same numbers every time. It ends with the report table, where the HTML report
was written, and what to try next.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .compare import compare
from .match import match
from .models import calibrate_batchnorm
from .report import Report

__all__ = ["LSTMModel", "resnet18_pair", "lstm_pair", "run_demo"]


class LSTMModel(nn.Module):
    """The tutorial's word-language model: embedding, LSTM, linear decoder."""

    def __init__(self, ntoken: int = 10, ninp: int = 512, nhid: int = 256, nlayers: int = 5,
                 dropout: float = 0.5) -> None:
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
        return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid))


def resnet18_pair(seed: int = 0, input_shape: tuple[int, ...] = (2, 3, 32, 32)):
    """The tutorial's static setup: fused quantizable resnet18, default_qconfig, calibrated.

    Random weights seeded by ``seed``, BatchNorm statistics from seeded inputs
    (:func:`fxnumeric.models.calibrate_batchnorm`) so that activations keep their scale.
    Returns ``(float_model, quantized_model, example_input)``.
    """
    import torchvision
    from torch.ao.quantization import default_eval_fn, default_qconfig, quantize

    torch.manual_seed(seed)
    float_model = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    calibrate_batchnorm(float_model, input_shape, seed=seed)
    float_model.fuse_model()
    float_model.qconfig = default_qconfig
    gen = torch.Generator().manual_seed(seed + 1)
    data = [(torch.rand(*input_shape, generator=gen), torch.zeros(input_shape[0], dtype=torch.long))
            for _ in range(2)]
    qmodel = quantize(float_model, default_eval_fn, [data], inplace=False)
    return float_model, qmodel, data[0][0]


def lstm_pair(seed: int = 0):
    """The tutorial's dynamic setup: LSTMModel with LSTM and Linear quantized to qint8."""
    torch.manual_seed(seed)
    float_model = LSTMModel().eval()
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model),
                                                    {nn.LSTM, nn.Linear}, dtype=torch.qint8)
    inputs = (torch.randint(10, (1, 1), dtype=torch.long), float_model.init_hidden(1))
    return float_model, qmodel, inputs


_NEXT = """next:
  open {html}    the verdict and what to run next, the SQNR chart (hover a layer),
      weight histograms, the full table (click a header to sort)
  fxnumeric report --model torchvision:mobilenet_v2 --quant fx --input-shape 1,3,64,64 --top-k 10
  fxnumeric report --model mymodels:make --quant dynamic --input-shape 4,128
      your own model: mymodels.py in this folder, make() returns the float model or a
      (float, quantized) pair; add --float-weights FILE for trained weights
  python: report = fxnumeric.compare(float_model, quantized_model, loader, inputs=0)
      then print(report), report.culprit (None unless one layer stands out),
      report.to_html("report.html"); docs/reports.md explains every column and the culprit
      rule, docs/tutorial.md the eager Numeric Suite API"""


def _section(title: str, float_model: nn.Module, qmodel: nn.Module, data: list,
             out: Callable[[str], None], note: str) -> Report:
    out(f"== {title}")
    m = match(float_model, qmodel)
    out(f"paired {len(m.pairs)} ops; quantized-op coverage {m.coverage:.0%}; "
        f"unpaired: {len(m.unmatched_float)} float, {len(m.unmatched_quant)} quantized")
    report = compare(float_model, qmodel, data, matching=m, progress=False)
    report = dataclasses.replace(report, notes=(note, *report.notes))
    out(report.table())
    out("")
    return report


def run_demo(out: Callable[[str], None] = print, *,
             html_path: str | Path = "fxnumeric-demo.html") -> None:
    """Compare both tutorial setups, print their report tables, write the resnet18 HTML page."""
    f, q, _ = resnet18_pair()
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(2, 3, 32, 32, generator=gen) for _ in range(4)]
    random = ("random weights (seed 0{}): the numbers describe an untrained model; "
              "run `fxnumeric report --float-weights FILE` for a trained one")
    report = _section("resnet18, eager static quantization", f, q, images, out,
                      random.format("; BatchNorm statistics from 3 seeded batches"))
    f, q, (tokens, hidden) = lstm_pair()
    sentences = [(torch.randint(10, (5, 1), generator=gen), hidden) for _ in range(4)]
    _section("LSTM word-language model, dynamic quantization", f, q, sentences, out,
             random.format(""))
    path = report.to_html(html_path).resolve()
    out(f"HTML report of resnet18: {path}")
    out(_NEXT.format(html=path))
