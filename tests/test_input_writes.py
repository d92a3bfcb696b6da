"""Models that write into their inputs: every run fxnumeric makes sees the batch as the user
gave it, and the user's batch is never written into.

The oracles: the same model without the in-place write (the same parameters, quantized alike),
and the float and quantized models run by hand on copies of the batch.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.ao.ns._numeric_suite as tns
import torch.ao.quantization as tq
import torch.nn as nn

import fxnumeric as ns
from fxnumeric._tensors import copy_inputs


class _Doubles(nn.Module):
    """Static eager quantization; ``forward`` doubles its input in place first."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.conv, self.dequant = tq.QuantStub(), nn.Conv2d(3, 3, 1), tq.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.dequant(self.conv(self.quant(x)))


class _DoublesPure(_Doubles):
    """The same computation without the in-place write."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.conv(self.quant(x * 2)))


def _static_pairs():
    """(writing float, its quantized model), (pure float, its quantized model): the same
    parameters and the same quantized parameters."""
    torch.backends.quantized.engine = "fbgemm"
    torch.manual_seed(28)
    x0 = torch.randn(1, 3, 4, 4)
    writing = _Doubles().eval()
    prepared = copy.deepcopy(writing)
    prepared.qconfig = tq.get_default_qconfig("fbgemm")
    tq.prepare(prepared, inplace=True)
    prepared(x0.clone())
    quant_writing = tq.convert(prepared)
    pure = _DoublesPure().eval()
    pure.load_state_dict(writing.state_dict())
    prepared_pure = copy.deepcopy(pure)
    prepared_pure.qconfig = prepared.qconfig
    tq.prepare(prepared_pure, inplace=True)
    prepared_pure(x0.clone())  # its qparams are replaced by the writing model's below
    quant_pure = tq.convert(prepared_pure)
    quant_pure.load_state_dict(quant_writing.state_dict())
    return (writing, quant_writing), (pure, quant_pure), x0


def test_compare_of_a_model_writing_into_its_input_reads_as_without_the_write():
    (f, q), (f_pure, q_pure), x0 = _static_pairs()
    x = x0.clone()
    report = ns.compare(f, q, [x])
    pure = ns.compare(f_pure, q_pure, [x0.clone()])
    assert torch.equal(x, x0)  # the user's batch: before, 4 * x0
    # by hand, each model on its own copy of the batch
    by_hand = ns.sqnr(f(x0.clone()), q(x0.clone()))
    assert report.model_output["sqnr"] == pytest.approx(by_hand, rel=1e-6)  # before: 3.35 dB
    assert report.model_output["sqnr"] == pytest.approx(pure.model_output["sqnr"], rel=1e-6)
    conv, conv_pure = report.row("conv"), pure.row("conv")
    assert conv.output_sqnr == pytest.approx(conv_pure.output_sqnr, rel=1e-6)  # 35.17 dB
    assert conv.shadow_sqnr == pytest.approx(conv_pure.shadow_sqnr, rel=1e-6)  # before: 5.27
    assert report.row("mul_").output_sqnr == float("inf")  # before: 0 dB


def test_eager_api_logs_each_model_on_the_batch_as_given_unlike_torchs_suite():
    (f, q), _, x0 = _static_pairs()
    # oracle: each model by hand on a copy of the batch, its quant stub's output hooked
    seen: dict[str, torch.Tensor] = {}
    handles = [model.quant.register_forward_hook(
        lambda m, i, o, side=side: seen.__setitem__(side, o.detach().clone()))
        for side, model in (("float", f), ("quantized", q))]
    f(x0.clone()), q(x0.clone())
    for handle in handles:
        handle.remove()
    x = x0.clone()
    logged = ns.compare_model_outputs(f, q, x)["quant.stats"]
    assert torch.equal(x, x0)
    assert torch.equal(logged["float"][0], seen["float"])  # 2 * x0 (torch's suite: 4 * x0)
    assert torch.equal(logged["float"][0], 2 * x0)
    assert torch.equal(logged["quantized"][0].int_repr(), seen["quantized"].int_repr())
    # torch's suite hands both models the user's tensor: the quantized model doubles it
    # again, over the float value it logged (docs/eager_compat.md)
    x_torch = x0.clone()
    eager = tns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), x_torch)
    assert torch.equal(eager["quant.stats"]["float"][0], 4 * x0)
    assert torch.equal(x_torch, 4 * x0)
    # prepare_model_outputs leaves the runs to the user: each model on its own copy (the docs'
    # advice) logs what compare_model_outputs does
    ns.prepare_model_outputs(f, q)
    f(x0.clone()), q(x0.clone())
    prepared = ns.get_matching_activations(f, q)["quant.stats"]
    ns.remove_instrumentation(f), ns.remove_instrumentation(q)
    assert torch.equal(prepared["float"][0], logged["float"][0])
    assert torch.equal(prepared["quantized"][0].int_repr(), logged["quantized"][0].int_repr())


class _WritesMask(nn.Module):
    """A language-model-like model that shifts its attention mask in place (0 at tokens, -1 at
    padding, as a bias is made), as some in-forward preprocessing does."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(20, 16), nn.Linear(16, 20)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        shifted = attention_mask.sub_(1)
        return self.head(self.embed(input_ids) * (1 + shifted).unsqueeze(-1))


class _WritesMaskPure(_WritesMask):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        shifted = attention_mask - 1
        return self.head(self.embed(input_ids) * (1 + shifted).unsqueeze(-1))


def test_a_model_writing_into_its_attention_mask_is_compared_on_the_mask_given():
    torch.manual_seed(0)
    f = _WritesMask().eval()
    f_pure = _WritesMaskPure().eval()
    f_pure.load_state_dict(f.state_dict())
    q = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    q_pure = tq.quantize_dynamic(copy.deepcopy(f_pure), {nn.Linear})
    ids = torch.randint(0, 20, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask.clone()}
    report = ns.compare(f, q, [batch])
    pure = ns.compare(f_pure, q_pure, [{"input_ids": ids, "attention_mask": mask.clone()}])
    assert torch.equal(batch["attention_mask"], mask)  # before: mask - 2, or less
    by_hand = ns.sqnr(f(ids, mask.clone()), q(ids, mask.clone()))
    assert report.model_output["sqnr"] == pytest.approx(by_hand, rel=1e-6)
    assert report.model_output["sqnr"] == pytest.approx(pure.model_output["sqnr"], rel=1e-6)
    assert report.row("head").output_sqnr == pytest.approx(pure.row("head").output_sqnr, rel=1e-6)


class _DoublesLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return self.b(torch.relu(self.a(x)))


class _DoublesLinearPure(_DoublesLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x * 2)))


def _dynamic_pairs():
    torch.manual_seed(0)
    f = _DoublesLinear().eval()
    f_pure = _DoublesLinearPure().eval()
    f_pure.load_state_dict(f.state_dict())
    return ((f, tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})),
            (f_pure, tq.quantize_dynamic(copy.deepcopy(f_pure), {nn.Linear})))


def _lockstep(f, q, data):
    """compare with a budget of one byte: the two models run in turns on the batch."""
    compare_module = importlib.import_module("fxnumeric.compare")
    saved = compare_module.LOCKSTEP_MIN, compare_module.LOCKSTEP_SHARE
    compare_module.LOCKSTEP_MIN, compare_module.LOCKSTEP_SHARE = 1, 1 << 40
    try:
        return ns.compare(f, q, data)
    finally:
        compare_module.LOCKSTEP_MIN, compare_module.LOCKSTEP_SHARE = saved


def _rows(report):
    return ([round(r.output_sqnr, 6) for r in report.rows if r.kind == "linear"],
            round(report.model_output["sqnr"], 6))


_PATHS = {  # what each path returns, read alike for the writing model and its pure twin
    "variants": lambda f, q, data: _rows(ns.compare(f, {"a": q, "b": q}, data)),
    "lockstep": lambda f, q, data: _rows(_lockstep(f, q, data)),
    "sensitivity": lambda f, q, data: [(round(s.only, 6), round(s.all_but, 6)) for s in
                                       ns.sensitivity(f, q, data).layers],
    "advise": lambda f, q, data: round(ns.advise(f, q, data, metric="sqnr", target=60).value, 6),
    "diagnose": lambda f, q, data: [(round(d.local_sqnr, 6), round(d.cumulative_sqnr, 6))
                                    for d in ns.diagnose(f, q, data).layers if d.quantized],
    "match": lambda f, q, data: len(ns.match(f, q, example_inputs=data[0]).pairs),
    "compare_model_stub": lambda f, q, data: [
        round(ns.sqnr(v["float"][0], v["quantized"][0]), 6)
        for v in ns.compare_model_stub(f, q, [nn.Linear], data[0]).values()],
}


@pytest.mark.parametrize("path", list(_PATHS))
def test_every_path_runs_its_models_on_the_batch_as_given(path):
    (f, q), (f_pure, q_pure) = _dynamic_pairs()
    torch.manual_seed(1)
    given = [torch.randn(4, 8) for _ in range(2)]
    data = [x.clone() for x in given]
    found = _PATHS[path](f, q, data)
    assert all(torch.equal(x, y) for x, y in zip(data, given, strict=True))  # before: doubled, or more
    assert found == _PATHS[path](f_pure, q_pure, [x.clone() for x in given])


def test_copies_keep_strides_expansions_and_containers():
    channels_last = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)
    expanded = torch.ones(2, 1, 1, 5).expand(2, 3, 5, 5)  # one value per row, 75 wide
    nested = {"x": [channels_last, (expanded, 3)], "name": "a", "again": channels_last}
    copied = copy_inputs(nested)
    assert copied["x"] is not nested["x"] and copied["name"] == "a"
    assert copied["again"] is copied["x"][0]  # one tensor given twice stays one tensor
    got_cl, (got_ex, three) = copied["x"]
    assert got_cl.stride() == channels_last.stride() and torch.equal(got_cl, channels_last)
    assert got_ex.stride() == expanded.stride() and torch.equal(got_ex, expanded)
    assert got_ex.untyped_storage().nbytes() == 2 * 5 * 4  # the distinct values only
    assert got_cl.data_ptr() != channels_last.data_ptr() and three == 3
