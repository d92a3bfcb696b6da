"""A large Linear's output read a block of rows at a time: its shadow (:class:`RowShadow`),
and the float model's own output held as the Linear and its input (:class:`LinearRows`, an
LLM's float logits). The same sums as the whole output's, read against oracles summed in
float64 from forward hooks on both models or from the models' outputs; no shadow output the
size of the whole ever made, and the float logits gone before the quantized head runs."""

from __future__ import annotations

import copy
import importlib
import math
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fxnumeric as ns
from fxnumeric.errors import InternalError
from fxnumeric.metrics import Accumulator, db

graph = importlib.import_module("fxnumeric.instrument.graph")  # `ns.instrument` is a function
rows = importlib.import_module("fxnumeric.rows")
compare_module = importlib.import_module("fxnumeric.compare")
metrics = importlib.import_module("fxnumeric.metrics")

BOUND = 4096
VOCAB, TOKENS = 300, 64  # the last Linear's output: 19200 values, past the bound


@pytest.fixture
def low_bound(monkeypatch):
    monkeypatch.setattr(rows, "ROW_BLOCK", BOUND)
    monkeypatch.setattr(rows, "HELD_PAST", BOUND)  # bytes: a tiny model's logits are held as rows


@pytest.fixture
def floors(monkeypatch):
    """Every FloorSums compare makes, by pair name."""
    made: dict[str, object] = {}
    make = compare_module.floor_sums

    def recorded(region, pair):
        made[pair.name] = sums = make(region, pair)
        return sums

    monkeypatch.setattr(compare_module, "floor_sums", recorded)
    return made


class _Head(nn.Module):
    """A small decoder-like stack ending in a wide Linear (a vocabulary of 300)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.head = nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, VOCAB)

    def forward(self, x):
        return self.head(self.act(self.up(x)))


def _quantized(f: nn.Module, flow: str, calibration: torch.Tensor) -> nn.Module:
    if flow == "dynamic":
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    if flow == "torchao":
        pytest.importorskip("torchao")
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        q = copy.deepcopy(f)
        quantize_(q, Int8WeightOnlyConfig())
        return q
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (calibration,))
    prepared(calibration)
    return convert_fx(prepared)


def _hooked(q: nn.Module, q_head: nn.Module, batches) -> list[tuple[torch.Tensor, ...]]:
    """``(input, output)`` of each call of ``q_head`` as the quantized model ran it."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = q_head.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    try:
        with torch.no_grad():
            for b in batches:
                q(**b) if isinstance(b, dict) else q(b)
    finally:
        hook.remove()
    return seen


def _oracle(float_head, seen) -> dict[str, float]:
    """The head's shadow metrics and floor sums from its inputs and outputs as the quantized
    model ran it (``seen``), the float twin computed by ``float_head`` on each input, every
    sum taken in float64 over the whole tensors."""
    signal = noise = dot = actual = input_energy = 0.0
    largest, count, rows = 0.0, 0, 0
    channels = torch.zeros(VOCAB, dtype=torch.float64)
    for x, out in seen:
        x = x.dequantize() if x.is_quantized else x
        out = out.dequantize() if out.is_quantized else out
        with torch.no_grad():
            r = float_head(x).double()
        a = out.double()
        signal += float(r.square().sum())
        noise += float((r - a).square().sum())
        dot += float((r * a).sum())
        actual += float(a.square().sum())
        largest = max(largest, float((r - a).abs().max()))
        count += r.numel()
        rows += r.numel() // VOCAB
        channels += (a - r).reshape(-1, VOCAB).sum(dim=0)
        input_energy += float(x.double().square().sum())
    return {"sqnr": db(signal, noise), "cosine": dot / math.sqrt(signal * actual),
            "mse": noise / count, "max_abs_error": largest, "input_energy": input_energy,
            "channel_count": rows, "channel_error": channels, "signal": signal}


def _compare(f, q, batches, **kw):
    return ns.compare(f, q, batches, comparisons=("outputs", "shadows"), progress=False, **kw)


@pytest.mark.usefixtures("traced_graphs_unchecked")
@pytest.mark.parametrize("flow", ["dynamic", "torchao", "fx"])
def test_a_wide_linears_shadow_in_row_blocks_reads_the_whole_outputs_sums(flow, floors,
                                                                          monkeypatch):
    torch.manual_seed(0)
    f = _Head().eval()
    # leading dims (2, 32): the rows are their product, 64
    batches = [torch.randn(2, TOKENS // 2, 32) for _ in range(2)]
    # calibrated on smaller inputs, so that the FX head's output grid clips some values
    q = _quantized(f, flow, 0.5 * batches[0])
    blocks: list[int] = []
    f.head.register_forward_hook(lambda m, i, o: blocks.append(o.numel()))
    whole = _compare(f, q, batches)
    whole_floors = dict(floors)
    blocks.clear()
    monkeypatch.setattr(rows, "ROW_BLOCK", BOUND)
    by_rows = _compare(f, q, batches)
    # the float model's own call, then the shadow's blocks of 13 rows
    assert blocks == [TOKENS * VOCAB, *[13 * VOCAB] * 4, 12 * VOCAB] * 2
    head = "head"
    q_head = q.get_submodule(head)
    want = _oracle(f.head, _hooked(q, q_head, batches))
    row, before = by_rows.row(head), whole.row(head)
    for name in ("sqnr", "cosine", "mse", "max_abs_error"):
        assert row.shadow[name] == pytest.approx(want[name], rel=1e-6), name
        assert row.shadow[name] == pytest.approx(before.shadow[name], rel=1e-6), name
    assert row.output == before.output  # the output comparison is not chunked
    spread, alone = row.spread["shadow_sqnr"], before.spread["shadow_sqnr"]
    assert spread.batches == 2 == alone.batches  # one per batch, not one per block
    assert (spread.low, spread.high) == pytest.approx((alone.low, alone.high), rel=1e-6)
    assert row.floor_sqnr == pytest.approx(before.floor_sqnr, rel=1e-6)
    assert row.floor_cause == before.floor_cause
    sums, alone = floors[head], whole_floors[head]
    assert sums.input_energy == pytest.approx(want["input_energy"], rel=1e-6)
    assert sums.input_count == alone.input_count
    assert sums.input_steps == pytest.approx(alone.input_steps, rel=1e-12)
    assert sums.channel_count == want["channel_count"] == alone.channel_count
    # signed sums per channel, in float32 (as FloorSums sums them): what the verdict reads of
    # them is the offset's power
    torch.testing.assert_close(sums.channel_error, want["channel_error"], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sums.channel_error, alone.channel_error, rtol=1e-5, atol=1e-8)
    offset = float(want["channel_error"].square().sum()) / want["channel_count"]
    assert sums.offset_noise() == pytest.approx(offset, rel=1e-6)
    assert sums.clip_noise == pytest.approx(alone.clip_noise, rel=1e-6)
    if flow == "fx":  # the quantized head's grid clips: the clipping's noise is summed
        assert sums.clip_noise > 0
        low, high = sums.grid.bounds()
        with torch.no_grad():
            ref = torch.cat([f.head(q_head_input) for q_head_input in _inputs(q, q_head,
                                                                               batches)])
        clipped = float((ref.double() - ref.double().clamp(low, high)).square().sum())
        assert sums.clip_noise == pytest.approx(clipped, rel=1e-5)
    else:
        assert sums.dynamic is not None or flow == "torchao"


def _inputs(q, module, batches):
    seen = []
    hook = module.register_forward_hook(lambda m, i, o: seen.append(
        i[0].dequantize() if i[0].is_quantized else i[0]))
    try:
        with torch.no_grad():
            for b in batches:
                q(b)
    finally:
        hook.remove()
    return seen


class _FunctionalHead(_Head):
    """The head as ``F.linear`` of its parameters: a ``call_function`` in the traced graph."""

    def forward(self, x):
        return F.linear(self.act(self.up(x)), self.head.weight, self.head.bias)


class _LastLinear(torch.fx.Interpreter):
    """Records the input and output of the graph's last ATen ``linear`` (a pt2e graph's)."""

    def run_node(self, n):
        out = super().run_node(n)
        if n.target is torch.ops.aten.linear.default:
            self.last = (self.env[n.args[0]], out)
        return out


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_a_functional_linears_shadow_in_row_blocks_reads_an_interpreters_oracle(monkeypatch):
    from _models import x86_pt2e

    torch.manual_seed(0)
    f = _FunctionalHead().eval()
    batches = [torch.randn(2, TOKENS // 2, 32) for _ in range(2)]
    q = x86_pt2e(f, [0.5 * b for b in batches])
    whole = _compare(f, q, batches)
    monkeypatch.setattr(rows, "ROW_BLOCK", BOUND)
    with _Allocations(1) as seen:
        by_rows = _compare(f, q, batches)
    assert seen.shapes.count((13, VOCAB)) >= 8  # the shadow's blocks (4 of 13 rows per batch)
    calls = []
    for b in batches:
        interpreter = _LastLinear(q)
        interpreter.run(b)
        calls.append(interpreter.last)
    want = _oracle(lambda x: F.linear(x, f.head.weight, f.head.bias), calls)
    name = by_rows.rows[-1].name
    assert by_rows.rows[-1].kind == "linear"
    for metric in ("sqnr", "cosine", "mse", "max_abs_error"):
        assert by_rows.row(name).shadow[metric] == pytest.approx(want[metric], rel=1e-6), metric
        assert by_rows.row(name).shadow[metric] == pytest.approx(whole.row(name).shadow[metric],
                                                              rel=1e-6), metric


@pytest.mark.usefixtures("traced_graphs_unchecked", "low_bound")
def test_an_llms_lm_head_shadow_in_row_blocks_reads_the_hook_oracle():
    pytest.importorskip("transformers")
    from fxnumeric.zoo_llm import tiny_llama

    f = tiny_llama(vocab_size=VOCAB, tie_word_embeddings=False)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, VOCAB, (1, TOKENS), generator=gen),
                "attention_mask": torch.ones(1, TOKENS, dtype=torch.long)} for _ in range(2)]
    calls: list[int] = []
    forwards: list[int] = []
    f.lm_head.register_forward_hook(lambda m, i, o: calls.append(o.numel()))
    f.register_forward_hook(lambda m, i, o: forwards.append(1))
    report = ns.compare(f, q, batches, progress=False)
    # the float model's own calls (the batches', and the recording run of its modules)
    # compute the whole logits; the shadow's blocks are 13 rows each
    assert calls.count(TOKENS * VOCAB) == len(forwards) == 3
    assert sorted(c for c in calls if c < TOKENS * VOCAB) == sorted(
        [13 * VOCAB] * 8 + [12 * VOCAB] * 2)
    want = _oracle(f.lm_head, _hooked(q, q.lm_head, batches))
    row = report.row("lm_head")
    for name in ("sqnr", "cosine", "mse", "max_abs_error"):
        assert row.shadow[name] == pytest.approx(want[name], rel=1e-6), name
    assert row.spread["shadow_sqnr"].batches == 2


@pytest.mark.usefixtures("traced_graphs_unchecked", "low_bound")
@pytest.mark.parametrize("option", ["keep_activations", "custom metric"])
def test_kept_activations_and_custom_metrics_read_the_whole_shadow_output(option):
    torch.manual_seed(0)
    f = _Head().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    batches = [torch.randn(TOKENS, 32) for _ in range(2)]
    calls: list[int] = []
    f.head.register_forward_hook(lambda m, i, o: calls.append(o.numel()))

    def total_error(ref, actual):
        return float((ref - actual).abs().sum())

    kw = ({"keep_activations": True} if option == "keep_activations"
          else {"metrics": ["sqnr", total_error]})
    report = _compare(f, q, batches, **kw)
    assert calls == [TOKENS * VOCAB] * 4  # the float model's, then its shadow's, per batch
    if option == "custom metric":
        with torch.no_grad():
            want = sum(float((f.head(x).double() - q.head(x).double()).abs().sum())
                       for x in (q.act(q.up(b)) for b in batches)) / 2
        assert report.row("head").shadow["total_error"] == pytest.approx(want, rel=1e-5)


def test_an_accumulator_fed_row_blocks_counts_one_batch_with_the_whole_tensors_sums():
    torch.manual_seed(0)
    ref = torch.randn(3, 50, 40)
    actual = ref + 0.01 * torch.randn(3, 50, 40)
    actual[1, 7, 3] += 1.0  # the largest error, in the middle block
    whole, rows = Accumulator(), Accumulator()
    for _ in range(2):
        whole.update(ref, actual)
        whole.end_batch()
        flat_ref, flat_actual = ref.flatten(0, -2), actual.flatten(0, -2)
        rows.update_rows((flat_ref[i:i + 40], flat_actual[i:i + 40]) for i in range(0, 150, 40))
        rows.end_batch()
    a, b = rows.state(), whole.state()
    assert (a.batches, a.count, a.max_abs) == (b.batches, b.count, b.max_abs) == (2, 12000,
                                                                                 a.max_abs)
    for name in ("signal", "noise", "dot", "actual_energy"):
        # float32 energies of blocks and of the whole: within 1e-6 (fxnumeric.metrics.energy)
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-6), name
    assert rows.spread().batches == 2
    assert rows.spread().mean == pytest.approx(whole.spread().mean, rel=1e-6)


def test_an_accumulator_with_a_custom_metric_refuses_row_blocks():
    acc = Accumulator({"m": lambda r, a: 0.0})
    assert not acc.additive and not Accumulator(keep=True).additive and Accumulator().additive
    with pytest.raises(InternalError, match="custom metrics or kept tensors"):
        acc.update_rows([(torch.ones(2, 2), torch.ones(2, 2))])


class _Allocations(TorchDispatchMode):
    """The tensors ops create with new storage (no view of an input) of at least ``size``
    values."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size, self.made, self.shapes = size, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        read = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(
            (args, kwargs)) if isinstance(t, torch.Tensor) and not t.is_quantized}
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.numel() >= self.size and not t.is_quantized
                    and t.untyped_storage().data_ptr() not in read):
                self.made.append(str(func))
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.usefixtures("traced_graphs_unchecked", "low_bound")
def test_no_shadow_output_the_size_of_the_whole_is_made(monkeypatch):
    # every whole-tensor sum a chunk at a time (as logits-sized tensors are): the only
    # tensors of the whole output's size are then the two models' own outputs
    monkeypatch.setattr(metrics, "_UPDATE_CHUNK", BOUND)
    monkeypatch.setattr(metrics, "_CHUNK", 1024)
    torch.manual_seed(0)
    f = _Head().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    batches = [torch.randn(TOKENS, 32) for _ in range(2)]
    matching = ns.match(f, q)
    with _Allocations(TOKENS * VOCAB) as seen:
        report = _compare(f, q, batches, matching=matching)
    assert report.row("head").shadow_sqnr > 30
    # per batch: the float head's matmul and the quantized head's own output, nothing else
    assert sorted(seen.made) == sorted(["aten.addmm.default",
                                        "quantized.linear_dynamic.default"] * 2)


# ------------------------------------------- the float model's large Linear outputs as rows


def _llm_pair(head: str):
    """A tiny Llama and its dynamic-quantized copy, its head quantized or left float (as
    torchao leaves a tied lm_head)."""
    pytest.importorskip("transformers")
    from fxnumeric.zoo_llm import tiny_llama

    f = tiny_llama(vocab_size=VOCAB, tie_word_embeddings=False)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    if head == "float":
        q.lm_head = copy.deepcopy(f.lm_head)
    return f, q


def _padded_batches() -> list[dict[str, torch.Tensor]]:
    from fxnumeric.zoo_llm import tiny_llm_batches

    # 48 rows of logits: not the size of the head's weight (300 x 64), which is no logits
    return tiny_llm_batches(vocab_size=VOCAB, n=2, batch_size=3, seq_len=16)


def _direct(f, q, batches) -> dict[str, float]:
    """The model output's metrics and the head's output SQNR, read straight off both models'
    outputs: KL and top-1 by ``LogitsAccumulator`` fed whole logits, the SQNRs in float64
    (the model output's over real tokens, the head's over every position)."""
    from fxnumeric.llm_metrics import LogitsAccumulator

    acc = LogitsAccumulator()
    out = {"signal": 0.0, "noise": 0.0, "head_signal": 0.0, "head_noise": 0.0}
    with torch.no_grad():
        for b in batches:
            fl, ql = f(**b).logits.double(), q(**b).logits.double()
            acc.update(fl, ql, attention_mask=b["attention_mask"], input_ids=b["input_ids"])
            real = b["attention_mask"].bool()
            out["signal"] += float(fl[real].square().sum())
            out["noise"] += float((fl - ql)[real].square().sum())
            out["head_signal"] += float(fl.square().sum())
            out["head_noise"] += float((fl - ql).square().sum())
    return {**acc.values(), "sqnr": db(out["signal"], out["noise"]),
            "head_sqnr": db(out["head_signal"], out["head_noise"])}


class _LogitsAlive(TorchDispatchMode):
    """The most float32 tensors of ``numel`` values (logits) alive at once, counted by
    storage each time an op returns one."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.alive, self.most = numel, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                    and t.numel() == self.numel):
                key = t.untyped_storage().data_ptr()
                self.alive[key] = self.alive.get(key, 0) + 1
                weakref.finalize(t, self._dead, key)
                self.most = max(self.most, len(self.alive))
        return out

    def _dead(self, key: int) -> None:
        self.alive[key] -= 1
        if not self.alive[key]:
            del self.alive[key]


@pytest.mark.usefixtures("low_bound")
@pytest.mark.parametrize("head", ["quantized", "float"])
def test_an_llms_float_logits_are_freed_before_the_quantized_logits_are_made(head,
                                                                            monkeypatch):
    # every whole-tensor sum a chunk at a time, as logits-sized tensors are
    monkeypatch.setattr(metrics, "_UPDATE_CHUNK", BOUND)
    monkeypatch.setattr(metrics, "_CHUNK", 1024)
    f, q = _llm_pair(head)
    batches = _padded_batches()
    matching = ns.match(f, q)
    with _LogitsAlive(batches[0]["input_ids"].numel() * VOCAB) as logits:
        report = ns.compare(f, q, batches, matching=matching, progress=False)
    # held as the head's input (rows computed when read), the float logits die with the
    # float forward, before the quantized model makes its own
    assert logits.most == 1
    want = _direct(f, q, batches)
    got = report.model_output
    for name in ("kl", "kl_p99", "kl_max", "top1_agreement", "ppl_float", "ppl_quantized",
                 "sqnr"):
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-9), name
    assert report.row("lm_head").output["sqnr"] == pytest.approx(want["head_sqnr"], rel=1e-5)


@pytest.mark.usefixtures("low_bound")
def test_an_accumulator_reads_a_linear_held_as_rows_as_its_whole_output():
    torch.manual_seed(0)
    fc = nn.Linear(16, VOCAB)
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        out = fc(x)
    actual = out + 0.01 * torch.randn_like(out)
    held = rows.LinearRows.of(out, fc, (x,), {})
    assert held is not None and held.nbytes == x.nbytes
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False
    for real in (None, mask):
        by_rows, whole = Accumulator(), Accumulator()
        by_rows.update(held, actual, rows=real)
        whole.update(out, actual, rows=real)
        picked = (slice(None),) if real is None else (real,)
        r, a = out[picked].double(), actual[picked].double()
        assert by_rows.count == whole.count == r.numel()
        assert by_rows.value("sqnr") == pytest.approx(
            db(float(r.square().sum()), float((r - a).square().sum())), rel=1e-6)
        for name in ("sqnr", "cosine", "mse", "max_abs_error"):
            assert by_rows.value(name) == pytest.approx(whole.value(name), rel=1e-6), name


@pytest.mark.usefixtures("low_bound")
def test_only_a_plain_large_linear_output_is_held_as_rows(monkeypatch):
    fc = nn.Linear(16, VOCAB)
    x = torch.randn(40, 16)
    with torch.no_grad():
        out = fc(x)
    assert rows.LinearRows.of(out, fc, (x,), {}) is not None
    with monkeypatch.context() as bytes_bound:
        bytes_bound.setattr(rows, "HELD_PAST", out.nbytes)  # small: computing rows costs time
        assert rows.LinearRows.of(out, fc, (x,), {}) is None
    by_function = rows.LinearRows.of(out, F.linear, (x, fc.weight), {"bias": fc.bias})
    assert by_function is not None
    assert torch.allclose(by_function.rows(slice(3, 9)), out[3:9], rtol=0, atol=1e-6)
    assert by_function.rows(torch.tensor([0, 7, 39])).shape == (3, VOCAB)
    small = x[:4]
    with torch.no_grad():
        assert rows.LinearRows.of(fc(small), fc, (small,), {}) is None  # within the bound
    hooked = copy.deepcopy(fc)
    hooked.register_forward_hook(lambda m, i, o: o * 2)  # its output is not F.linear's
    assert rows.LinearRows.of(out, hooked, (x,), {}) is None
    wide_input = torch.randn(40, 200)  # no smaller than a quarter of the output: kept whole
    wide = nn.Linear(200, VOCAB)
    with torch.no_grad():
        assert rows.LinearRows.of(wide(wide_input), wide, (wide_input,), {}) is None
    with torch.device("meta"):
        offloaded = nn.Linear(16, VOCAB)  # accelerate's offloaded weights sit on meta
    assert rows.LinearRows.of(out, offloaded, (x,), {}) is None


@pytest.mark.usefixtures("low_bound")
def test_logits_held_as_rows_read_alike_under_inference_mode():
    # inference tensors keep no version counter: the rows still serve the head's row, and
    # the model output is read from the logits themselves
    f, q = _llm_pair("quantized")
    batches = _padded_batches()
    plain = ns.compare(f, q, batches, progress=False)
    with torch.inference_mode():
        inferred = ns.compare(f, q, batches, progress=False)
    want = _direct(f, q, batches)
    for report in (plain, inferred):
        assert report.model_output["kl"] == pytest.approx(want["kl"], rel=1e-5)
        assert report.row("lm_head").output["sqnr"] == pytest.approx(want["head_sqnr"],
                                                                     rel=1e-5)
