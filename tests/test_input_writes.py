"""Models that write into their inputs: every run fxnumeric makes sees the batch as the user
gave it, and the user's batch is never written into.

The oracles: the same model without the in-place write (the same parameters, quantized alike),
and the float and quantized models run by hand on copies of the batch.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math

import pytest
import torch
import torch.ao.ns._numeric_suite as tns
import torch.ao.quantization as tq
import torch.nn as nn

import fxnumeric as ns
from fxnumeric._tensors import copy_inputs
from fxnumeric.errors import InputError
from fxnumeric.run import batch_tensors, check_batch, nonfinite_inputs


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
    real = mask.bool()  # the model output reads the real tokens of the mask as given
    by_hand = ns.sqnr(f(ids, mask.clone())[real], q(ids, mask.clone())[real])
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


@dataclasses.dataclass
class _Graph:
    """A batch object, as a graph library's ``Batch``: tensors in attributes."""

    x: torch.Tensor
    edges: list[torch.Tensor]


class _NormalisesGraph(nn.Module):
    """Writes into the batch object's tensor (a normalisation in place), then reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, batch: _Graph, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = batch.x.mul_(2)
        h = torch.relu(self.a(x)) + batch.edges[0]
        return self.b(h if mask is None else h * mask)


class _Cache:
    """A model's own key cache (not a Hugging Face ``Cache``), appended to by ``forward``."""

    def __init__(self, *keys: torch.Tensor) -> None:
        self.k = list(keys)


class _Attends(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, cache: _Cache) -> torch.Tensor:
        cache.k.append(self.k(x))
        keys = torch.cat(cache.k, 0)
        return self.o((self.q(x) @ keys.T).softmax(-1) @ keys)


def _hooked_sqnr(f, q, names, batches, call):
    """Oracle: output SQNR of modules ``names`` pooled over ``batches``, by forward hooks,
    each model run on its own deep copy of each batch."""
    seen: dict[tuple[str, str], list[torch.Tensor]] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, i, o, key=(side, name): seen.setdefault(key, []).append(o.detach().clone()))
        for side, model in (("float", f), ("quantized", q)) for name in names]
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for batch in batches:
            outputs.append((call(f, copy.deepcopy(batch)), call(q, copy.deepcopy(batch))))
    for handle in handles:
        handle.remove()

    def pooled(pairs):
        signal = sum(float(r.double().pow(2).sum()) for r, _ in pairs)
        noise = sum(float((r.double() - a.double()).pow(2).sum()) for r, a in pairs)
        return 10 * math.log10(signal / noise)

    found = {name: pooled(list(zip(seen["float", name], seen["quantized", name], strict=True)))
             for name in names}
    return found, pooled(outputs)


def test_a_model_writing_into_a_batch_object_is_compared_on_the_batch_given():
    torch.manual_seed(0)
    f = _NormalisesGraph().eval()
    q = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    given = [_Graph(torch.randn(4, 8), [torch.randn(4, 8)]) for _ in range(3)]
    data = [(copy.deepcopy(g), torch.ones(4, 1)) for g in given]
    layers, model = _hooked_sqnr(f, q, ["a", "b"], data, lambda m, b: m(*b))
    report = ns.compare(f, q, data)
    assert all(torch.equal(d.x, g.x) for (d, _), g in zip(data, given, strict=True))  # before: x 1024
    assert report.row("a").output_sqnr == pytest.approx(layers["a"], abs=1e-4)  # 39.96 dB; before: 0.14
    assert report.row("b").output_sqnr == pytest.approx(layers["b"], abs=1e-4)
    assert report.model_output["sqnr"] == pytest.approx(model, abs=1e-4)  # before: 0.16 dB
    # a batch that is the object alone (before: "a tuple of _Graph with no tensor")
    alone = [(copy.deepcopy(g),) for g in given]
    layers, model = _hooked_sqnr(f, q, ["a", "b"], alone, lambda m, b: m(*b))
    report = ns.compare(f, q, alone, inputs=lambda b: b)
    assert report.row("a").output_sqnr == pytest.approx(layers["a"], abs=1e-4)
    assert report.model_output["sqnr"] == pytest.approx(model, abs=1e-4)
    assert all(torch.equal(d.x, g.x) for (d,), g in zip(alone, given, strict=True))


@pytest.mark.parametrize("start", [0, 1], ids=["empty", "one key"])
def test_a_cache_object_in_the_batch_is_each_runs_own(start):
    torch.manual_seed(0)
    f = _Attends().eval()
    q = tq.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [(torch.randn(4, 8), _Cache(*[torch.randn(6, 8)] * start)) for _ in range(3)]
    layers, model = _hooked_sqnr(f, q, ["k", "q", "o"], data, lambda m, b: m(*b))
    report = ns.compare(f, q, data)
    assert [len(cache.k) for _, cache in data] == [start] * 3  # before: [9, 3, 3] from one key
    for name in ("k", "q", "o"):  # o: 39.66 dB; before: 18.86 (the float run's keys too)
        assert report.row(name).output_sqnr == pytest.approx(layers[name], abs=1e-4)
    assert report.model_output["sqnr"] == pytest.approx(model, abs=1e-4)


def test_input_copies_copy_objects_holding_tensors_once_and_leave_modules():
    @dataclasses.dataclass(frozen=True)
    class Frozen:
        x: torch.Tensor
        again: torch.Tensor

    class Slotted:
        __slots__ = ("x", "keys")

        def __init__(self, x: torch.Tensor) -> None:
            self.x, self.keys = x, []

    x = torch.ones(3)
    module = nn.Linear(2, 2)
    frozen, slotted = Frozen(x, x), Slotted(x)
    copied = copy_inputs(((frozen, frozen), slotted, module, "s"))
    (got, got_again), got_slotted, got_module, text = copied
    assert got is got_again and got is not frozen  # one object given twice stays one
    assert got.x is got.again and got.x is got_slotted.x and got.x is not x
    got.x.mul_(2), got_slotted.keys.append(1)
    assert torch.equal(x, torch.ones(3)) and slotted.keys == []
    assert got_module is module and text == "s"


def test_an_object_holding_tensors_that_cannot_be_copied_is_refused_by_name():
    class Uncopyable:
        def __init__(self) -> None:
            self.x = torch.ones(2)

        def __copy__(self):
            raise TypeError("no copies")

    with pytest.raises(InputError, match=r"Uncopyable holds tensors \(x\) but cannot be copied"):
        copy_inputs((Uncopyable(),))


def test_check_batch_finds_tensors_in_objects_and_nan_there():
    batch = (_Graph(torch.ones(2), [torch.tensor([0.0, float("nan")])]),)
    assert [where for where, _ in batch_tensors(batch)] == ["batch[0].x", "batch[0].edges[0]"]
    check_batch(batch, 0)  # before: "a tuple of _Graph with no tensor"
    assert nonfinite_inputs(batch) == ["batch[0].edges[0]"]
    check_batch((torch.ones(2), _Cache(torch.zeros(0, 8))), 0)  # a cache may start empty
    with pytest.raises(InputError, match="batch 1 is a tuple of _Cache with no tensor"):
        check_batch((_Cache(),), 1)
