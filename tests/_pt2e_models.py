"""Models and helpers shared by the pt2e/torchao tests and benchmarks/bench_pt2e.py."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class TransformerBlock(nn.Module):
    """A pre-norm encoder block (attention + GELU MLP) written with plain modules and ops."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def vision(name: str) -> nn.Module:
    """A torchvision model with seeded random weights and BatchNorm statistics (torchvision's
    fresh BatchNorms are identities, which would hide what BN folding does)."""
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    gen = torch.Generator().manual_seed(0)
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        n = bn.num_features
        bn.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
        bn.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
        bn.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
        bn.bias.data.copy_(0.1 * torch.randn(n, generator=gen))
    return net


def transformer() -> nn.Module:
    torch.manual_seed(0)
    return TransformerBlock().eval()


def batches(model_name: str, count: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 8, 32) if model_name == "transformer" else (1, 3, 64, 64)
    return [torch.randn(*shape, generator=gen) for _ in range(count)]


def model(model_name: str) -> nn.Module:
    return transformer() if model_name == "transformer" else vision(model_name)


def pt2e_pair(model_name: str, *, fold_quantize: bool = True, qat: bool = False,
              convert: bool = True, per_channel: bool = False):
    """``(exported program, float .module(), quantized)`` under the XNNPACK quantizer."""
    from torchao.quantization.pt2e.quantize_pt2e import (
        convert_pt2e,
        prepare_pt2e,
        prepare_qat_pt2e,
    )
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    float_model = model(model_name)
    data = batches(model_name, 2)
    ep = torch.export.export(copy.deepcopy(float_model), (data[0],))
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat))
    prepare = prepare_qat_pt2e if qat else prepare_pt2e
    prepared = prepare(ep.module(), quantizer)
    for x in data:
        prepared(x)
    quant = convert_pt2e(prepared, fold_quantize=fold_quantize) if convert else prepared
    return ep, ep.module(), quant


def torchao_oracle(float_gm, quant_gm, x):
    """torchao's numeric debugger on one batch: ``{float node name: (quant node, sqnr)}``."""
    from torchao.quantization.pt2e import (
        compare_results,
        extract_results_from_loggers,
        prepare_for_propagation_comparison,
    )

    ref = prepare_for_propagation_comparison(float_gm)
    actual = prepare_for_propagation_comparison(quant_gm)
    with torch.no_grad():
        ref(x)
        actual(x)
    results = compare_results(extract_results_from_loggers(ref),
                              extract_results_from_loggers(actual))
    return {
        s.ref_node_name: (s.actual_node_name, float(s.results[0].sqnr))
        for s in results.values()
    }


def overwritten_in_place(node) -> bool:
    """Whether a later ATen in-place op (``relu_`` after ``add_``) writes into ``node``'s output:
    torchao's loggers keep a view of such a value, so they record it after the overwrite."""
    return any(
        isinstance(u.target, torch._ops.OpOverload) and u.target._schema.is_mutable
        and u.args and u.args[0] is node
        for u in node.users
    )


def _same_value(a, b) -> bool:
    """The same node, or two dequantize nodes of the same quantize (pt2e duplicates them)."""
    return a is b or (a.op == b.op == "call_function" and a.target == b.target
                      and "dequantize" in str(a.target) and a.args == b.args)


def oracle_rows(ep, quant, x):
    """fxnumeric and torchao's numeric debugger on one batch, one row per fxnumeric pair.

    Each row: ``(pair, float node, quant node, fx_sqnr, fx_sqnr_quant_signal, torchao_sqnr,
    torchao_quant_node, category)``. ``fx_sqnr`` is fxnumeric's SQNR (the float value is the
    signal); ``fx_sqnr_quant_signal`` uses the quantized value as the signal, as torchao does
    (for ``in-place`` rows: of fxnumeric's two values put through the in-place op that follows,
    which is what torchao's loggers end up holding).
    Categories: ``same`` (torchao compares the same two values), ``bn-folded`` (torchao compares
    the float conv *before* its BatchNorm with the BN-folded quantized conv), ``in-place``
    (torchao's logged tensor is overwritten by a later in-place op), ``other`` (torchao logs a
    different quantized node), ``absent`` (torchao has no entry for the float node).
    """
    import fxnumeric as fxn

    matching = fxn.match(ep, quant)
    oracle = torchao_oracle(ep.module(), quant, x)
    float_gm, quant_gm = fxn.add_loggers(ep, quant, matching=matching)
    with torch.no_grad():
        float_gm(x)
        quant_gm(x)
    float_logs, quant_logs = fxn.loggers_of(float_gm), fxn.loggers_of(quant_gm)
    seen: dict[str, int] = {}
    fv, qv = matching.float_view, matching.quant_view
    rows = []
    for pair in matching.pairs:
        if fv.node(pair.float_nodes[0]).op == "placeholder":
            continue  # the input's quantize: torchao's debugger logs ops only
        k = seen[pair.name] = seen.get(pair.name, -1) + 1
        f_val = float_logs[pair.name].stats["tensor_val"][k]
        q_val = quant_logs[pair.name].stats["tensor_val"][k]
        fx_sqnr, fx_q = fxn.sqnr(f_val, q_val), fxn.sqnr(q_val, f_val)
        f_out, q_out = matching.output_nodes(pair)
        folded = len(pair.float_nodes) > 1 and any(
            fv.op_class(fv.node(n)).signature[0] == "batch_norm" for n in pair.float_nodes[1:])
        key = pair.float_nodes[0] if folded else f_out.name
        entry = oracle.get(key)
        if entry is None:
            category = "absent"
        elif folded:
            category = "bn-folded"
        elif not _same_value(qv.node(entry[0]), q_out):
            category = "other"
        elif overwritten_in_place(f_out) or overwritten_in_place(qv.node(entry[0])):
            category = "in-place"
            # what torchao recorded: both values after the in-place op that follows
            (after,) = (u for u in f_out.users if u.target._schema.is_mutable)
            fx_q = fxn.sqnr(after.target(q_val.clone()), after.target(f_val.clone()))
        else:
            category = "same"
        rows.append((pair.name, key, q_out.name, fx_sqnr, fx_q,
                     entry[1] if entry else None, entry[0] if entry else None, category))
    return rows


class ResidualCnn(nn.Module):
    """conv-bn-relu, conv-bn into a residual add-relu, linear-relu, linear: the QAT conv-bn
    rewrite replaces the BatchNorm node the residual add's annotation names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.fc1, self.relu3, self.fc2 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(y + self.bn2(self.conv2(y)))
        return self.fc2(self.relu3(self.fc1(y.mean((2, 3)))))


def qat_residual_cnn(*, to_eval: bool = True):
    """``(float model, batches, prepare_qat_pt2e model, its convert_pt2e model)``: XNNPACK's
    symmetric QAT config, the fake-quants calibrated on the batches, then moved to eval
    (``to_eval``; else no converted model: ``None``)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    torch.manual_seed(0)
    float_model = ResidualCnn().eval()
    data = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    with torch.no_grad():
        for bn in (float_model.bn1, float_model.bn2):
            bn.running_var.uniform_(0.5, 2)
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.weight.uniform_(0.5, 1.5)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_qat=True))
    exported = torch.export.export(copy.deepcopy(float_model).train(), (data[0],))
    qat = prepare_qat_pt2e(exported.module(), quantizer)
    with torch.no_grad():
        for x in data:
            qat(x)
    if not to_eval:
        return float_model, data, qat, None
    move_exported_model_to_eval(qat)
    return float_model, data, qat, convert_pt2e(copy.deepcopy(qat))
