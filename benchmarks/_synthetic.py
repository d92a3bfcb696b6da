"""Large generated models, quantized in eager mode (prepare_fx grows faster than linearly
with graph size, eager prepare/convert does not), for the scaling parts of the benchmarks."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub, convert, default_qconfig, prepare


class ResidualChain(nn.Module):
    """``blocks`` x (conv1x1 -> relu -> add skip): a long, deep residual chain."""

    def __init__(self, blocks: int, ch: int = 4) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.convs = nn.ModuleList(nn.Conv2d(ch, ch, 1) for _ in range(blocks))
        self.relus = nn.ModuleList(nn.ReLU() for _ in range(blocks))
        self.adds = nn.ModuleList(FloatFunctional() for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        for conv, relu, add in zip(self.convs, self.relus, self.adds, strict=True):
            x = add.add(x, relu(conv(x)))
        return self.dequant(x)


class WideConcat(nn.Module):
    """``blocks`` x (``width`` parallel conv1x1 branches -> cat -> conv1x1 reduce)."""

    def __init__(self, blocks: int, width: int = 8, ch: int = 4) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.branches = nn.ModuleList(nn.ModuleList(nn.Conv2d(ch, ch, 1) for _ in range(width)) for _ in range(blocks))
        self.cats = nn.ModuleList(FloatFunctional() for _ in range(blocks))
        self.reduce = nn.ModuleList(nn.Conv2d(ch * width, ch, 1) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        for branches, cat, reduce in zip(self.branches, self.cats, self.reduce, strict=True):
            x = reduce(cat.cat([b(x) for b in branches], 1))
        return self.dequant(x)


# fx nodes per block of each shape (conv, relu, add, add's activation_post_process; and
# width convs, cat, its activation_post_process, reduce), for sizing models by node count
UNPAIRED = "residual chain, every conv unpaired"
NODES_PER_BLOCK = {"residual chain": 4, "wide concat (width 8)": 8 + 3, UNPAIRED: 4}
SHAPES = {"residual chain": ResidualChain, "wide concat (width 8)": lambda blocks: WideConcat(blocks, 8),
          UNPAIRED: ResidualChain}


def _unpair_convs(quant_model: nn.Module) -> None:
    """Replace every quantized conv with a quantized hardswish: no float op pairs with it, so
    each relu after one has no paired input and is looked up by name (the search that used to
    scan every float op: quadratic in graph size)."""
    from torch.ao.nn.quantized import Hardswish

    for i, conv in enumerate(quant_model.convs):
        quant_model.convs[i] = Hardswish(conv.scale, conv.zero_point)


def make_pair(shape: str, nodes: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A float model of about ``nodes`` fx nodes and its eager-quantized copy."""
    torch.manual_seed(seed)
    blocks = max(1, round(nodes / NODES_PER_BLOCK[shape]))
    float_model = SHAPES[shape](blocks).eval()
    model = copy.deepcopy(float_model)
    model.qconfig = default_qconfig
    prepare(model, inplace=True)
    with torch.no_grad():
        model(torch.randn(1, 4, 4, 4))
    quant_model = convert(model, inplace=True)
    if shape == UNPAIRED:
        _unpair_convs(quant_model)
    return float_model, quant_model
