"""What compare's per-batch work costs and how exact its sums are: large tensors summed to 1e-6
of float64, a batch's outputs freed as the model frees them, and a layer left float whose
shadow would recompute its own output not run again."""

from __future__ import annotations

import copy
import gc
import math
import pathlib
import platform
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn as nn

import fxnumeric as ns
from fxnumeric import _collector
from fxnumeric.metrics import Accumulator, db, energy, prepare_actual


def _oracle(ref: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    r, a = ref.detach().double(), actual.detach().double()
    signal, noise = float(r.square().sum()), float((r - a).square().sum())
    return {"sqnr": 10 * math.log10(signal / noise),
            "cosine": float((r * a).sum() / (r.norm() * a.norm())),
            "mse": noise / r.numel(),
            "max_abs_error": float((r - a).abs().max())}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_energy_of_a_large_activation_is_within_1e6_of_float64(layout):
    # one vector_norm of 12.8M float32 values is off by 1e-3 relative; energy() is not
    torch.manual_seed(0)
    x = torch.randn(32, 32, 112, 112) * 3 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :31]  # a tensor with gaps, read in its own layout
    exact = float(x.double().square().sum())
    assert energy(x) == pytest.approx(exact, rel=1e-6)
    assert float(torch.linalg.vector_norm(x)) ** 2 != pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("size", [5, 300_000])
def test_energy_of_finite_values_whose_squares_overflow_float32(size):
    # float32 sums of squares overflow past 1.8e19: finite values read as Inf ("NaN/Inf in 3
    # batches") and, beside a finite signal, crashed the batch's SQNR (math domain error)
    x = torch.randn(size, generator=torch.Generator().manual_seed(0)) * 1e26
    assert float(torch.linalg.vector_norm(x)) == math.inf
    assert energy(x) == pytest.approx(float(x.double().square().sum()), rel=1e-6)


def test_an_infinite_quantized_value_closes_its_batch() -> None:
    # Inf noise beside a finite signal: log10(0) raised "math domain error" at end_batch
    acc = Accumulator()
    acc.update(torch.tensor([1.0, 2.0]), torch.tensor([math.inf, 2.0]))
    acc.end_batch()
    assert acc.nonfinite_batches == 1 and acc.spread() is None
    assert db(1.0, math.inf) == -math.inf and math.isnan(db(math.inf, math.inf))
    assert db(4.0, 0.0) == math.inf and db(0.0, 4.0) == -math.inf and db(400.0, 4.0) == 20.0


def test_a_layer_gone_wild_reads_its_sqnr_not_nan() -> None:
    # a quantized Linear whose weight scale is 1e20 (torch's 4-bit Embedding returns such
    # values): its outputs are finite, their squares are not in float32
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    quant_model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear})
    w = torch.quantize_per_tensor(float_model[2].weight.detach() * 1e21, 1e20, 0, torch.qint8)
    quant_model[2].set_weight_bias(w, float_model[2].bias.detach())
    data = [torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    report = ns.compare(float_model, quant_model, data, comparisons=("outputs", "shadows"))
    with torch.no_grad():
        ref = torch.cat([float_model(x) for x in data])
        out = torch.cat([quant_model(x) for x in data])
    assert torch.isfinite(out).all() and out.abs().max() > 1e19
    assert report.model_output["sqnr"] == pytest.approx(_oracle(ref, out)["sqnr"], rel=1e-6)
    row = report.row("2")
    assert row.output_sqnr == pytest.approx(_oracle(ref, out)["sqnr"], rel=1e-6)
    assert "NaN/Inf" not in row.note and report.nonfinite == ()
    assert report.verdict.culprit == "2"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_sized_tensors_are_summed_by_chunks_to_1e6_of_float64(dtype):
    # 512 tokens x 24000 words: above the chunk size, read a chunk at a time in float32
    torch.manual_seed(1)
    ref = torch.randn(1, 512, 24000).to(dtype)
    actual = (ref.float() + 0.02 * torch.randn(ref.shape)).to(dtype)
    acc = Accumulator()
    shared, actual_energy = prepare_actual(actual, torch.float32)
    assert shared.dtype == dtype and shared.data_ptr() == actual.data_ptr()  # no copy made
    acc.update(ref, shared, actual_energy=actual_energy)
    alone = Accumulator()
    alone.update(ref, actual)
    want = _oracle(ref, actual)
    for name, value in want.items():
        assert acc.value(name) == pytest.approx(value, rel=1e-6), name
        assert alone.value(name) == pytest.approx(value, rel=1e-6), name



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_block_is_summed_by_chunks_without_a_whole_float_copy(
        dtype, monkeypatch):
    # a block of a large Linear's rows (85 rows of 49152 words: 4.2M values, just under the
    # size past which a tensor is read by chunks) was read whole: two float32 copies and their
    # error, 48 MiB while a 512-token SmolLM2 sequence's bfloat16 logits were read
    from fxnumeric import metrics

    torch.manual_seed(2)
    ref = torch.randn(85, 49152).to(dtype)
    actual = (ref.float() + 0.02 * torch.randn(ref.shape)).to(dtype)
    made: list[int] = []
    as_float = metrics._as_float
    monkeypatch.setattr(metrics, "_as_float",
                        lambda x, d: (made.append(x.numel()), as_float(x, d))[-1])
    acc = Accumulator()
    acc.update(ref, actual)
    assert made == [] or max(made) <= metrics._CHUNK
    for name, value in _oracle(ref, actual).items():
        assert acc.value(name) == pytest.approx(value, rel=1e-6), name


@pytest.mark.parametrize("size", [64, 5_000_000], ids=["small", "chunked"])
@pytest.mark.parametrize("precision", [torch.float32, torch.float64])
def test_cosine_of_a_clipped_output_far_smaller_than_its_float_twin(size, precision):
    """Input far outside the calibrated range: the quantized output is clipped to a tiny
    fraction of the float one. Read from the energies, sum(ref * actual) cancelled to noise
    (a cosine of 0.77 read 2e-8; [1e20, 1e20] against [1, -0.5] read 0 for 0.316)."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(size, generator=gen) * 1e8
    actual = ref.clamp(-1.0, 1.0) * 1e-7 + torch.randn(size, generator=gen)
    acc = Accumulator(precision=precision)
    acc.update(ref, actual)
    assert acc.value("cosine") == pytest.approx(_oracle(ref, actual)["cosine"], rel=1e-5)
    acc = Accumulator(precision=precision)
    acc.update(torch.tensor([1e20, 1e20], dtype=torch.float64),
               torch.tensor([1.0, -0.5], dtype=torch.float64))
    assert acc.value("cosine") == pytest.approx(0.5 / math.sqrt(2 * 1.25), rel=1e-6)


def test_the_cosine_of_an_exact_layer_is_one_not_more():
    """Eight batches of a layer whose outputs agree exactly: the float64 sums round apart and
    the cosine read 1.0000000000000002 in the CSV and JSON."""
    gen = torch.Generator().manual_seed(1)
    acc, flipped = Accumulator(), Accumulator()
    for _ in range(8):
        ref = torch.randn(2, 12, 64, generator=gen)
        acc.update(ref, ref.clone())
        flipped.update(ref, -ref)
    assert acc.value("cosine") == 1.0  # a vector against itself: exactly 1
    assert flipped.value("cosine") == -1.0
    assert acc.value("sqnr") == math.inf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_chunks_that_need_converting_share_one_buffer_and_keep_their_values(dtype):
    # a new tensor per chunk was not memory reused in the turns' helper thread (glibc's
    # per-thread heap): each converted chunk is written into one buffer instead
    from fxnumeric.metrics import _chunks

    x = torch.randn(5 * (1 << 20) + 123).to(dtype)
    seen, pointers = [], set()
    for chunk in _chunks(x, torch.float32):
        assert chunk.dtype == torch.float32
        pointers.add(chunk.data_ptr())
        seen.append(chunk.clone())
    assert len(pointers) == 1 and len(seen) == 6
    assert torch.equal(torch.cat(seen), x.to(torch.float32))
    plain = x.to(torch.float32)
    views = list(_chunks(plain, torch.float32))  # nothing to convert: views, no copy
    step = views[0].numel() * plain.element_size()
    assert [c.data_ptr() for c in views] == [plain.data_ptr() + i * step for i in range(6)]

def test_nan_in_a_chunked_tensor_is_counted_not_hidden():
    ref = torch.randn(1, 512, 24000)
    actual = ref.clone()
    actual[0, 400, 7] = float("nan")
    acc = Accumulator()
    acc.update(ref, actual)
    assert acc.nonfinite_batches == 1 and acc.actual_nonfinite == 1
    assert math.isnan(acc.value("sqnr")) and math.isnan(acc.value("max_abs_error"))


class _Chain(nn.Module):
    """Six Linear + ReLU layers of one width."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(6))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_a_batchs_quantized_outputs_are_freed_as_the_model_frees_them():
    # compare used to hold every layer's output to the end of the batch: 880 MiB on a
    # 512-token SmolLM2 sequence
    torch.manual_seed(0)
    f = _Chain().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    first: list[weakref.ref] = []
    alive_at_the_last_layer: list[bool] = []
    q.layers[0].register_forward_hook(lambda m, i, o: first.append(weakref.ref(o)))

    def at_last_layer(module, inputs):
        gc.collect()
        alive_at_the_last_layer.append(first[-1]() is not None)

    q.layers[5].register_forward_pre_hook(at_last_layer)
    report = ns.compare(f, q, [torch.randn(8, 64) for _ in range(2)], progress=False)
    assert report.row("layers.0").output_sqnr > 20  # it was compared, then let go
    assert alive_at_the_last_layer == [False, False]


def _partly_dynamic(seed: int = 0):
    torch.manual_seed(seed)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {"0": torch.ao.quantization.
                                                                  default_dynamic_qconfig})
    return f, q


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_a_layer_left_float_that_computes_alike_is_not_run_again_by_its_shadow():
    f, q = _partly_dynamic()
    calls = []
    f[2].register_forward_pre_hook(lambda m, i: calls.append(1))
    batches = [torch.randn(4, 16) for _ in range(3)]
    report = ns.compare(f, q, batches, progress=False)
    row = report.row("2")
    assert not row.quantized and row.shadow_sqnr == math.inf
    assert row.shadow["max_abs_error"] == 0.0 and row.shadow["mse"] == 0.0
    assert len(calls) == len(batches)  # the float model's own forwards only
    # its output comparison still reads the error arriving from the quantized layer 0
    want = _oracle(torch.cat([f(b) for b in batches]), torch.cat([q(b) for b in batches]))
    assert row.output_sqnr == pytest.approx(want["sqnr"], rel=1e-6)


class _Settings(nn.Module):
    """Float ops whose settings are tuples: a pool of size ``(1, 2)`` and a ``reshape`` to
    ``(n, -1)`` left float between dynamically quantized Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.pool, self.fc2 = nn.Linear(16, 32), nn.MaxPool2d((1, 2)), nn.Linear(16, 8)

    def forward(self, x):
        y = self.pool(self.fc1(x).reshape((x.shape[0], 1, 2, 16)))
        return self.fc2(y.reshape((x.shape[0], -1)))


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_float_ops_whose_settings_are_tuples_compute_alike_and_are_not_shadowed():
    # a setting given as a tuple read as different, so such ops ran again in shadows
    torch.manual_seed(0)
    f = _Settings().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    pool_calls = []
    f.pool.register_forward_pre_hook(lambda m, i: pool_calls.append(1))
    batches = [torch.randn(4, 16) for _ in range(3)]
    report = ns.compare(f, q, batches, progress=False)
    row = report.row("pool")
    assert not row.quantized and row.shadow_sqnr == math.inf
    assert len(pool_calls) == len(batches)  # the float model's own forwards only
    reshapes = [r for r in report.rows if r.kind == "reshape"]
    assert reshapes and all(r.shadow_sqnr == math.inf for r in reshapes)
    with torch.no_grad():
        want = _oracle(torch.cat([f.pool(f.fc1(b).reshape(4, 1, 2, 16)) for b in batches]),
                       torch.cat([q.pool(q.fc1(b).reshape(4, 1, 2, 16)) for b in batches]))
    assert row.output_sqnr == pytest.approx(want["sqnr"], rel=1e-6)


def test_a_layer_left_float_with_other_weights_is_shadowed_and_reads_the_difference():
    f, q = _partly_dynamic()
    with torch.no_grad():
        q[2].weight.add_(0.01 * torch.randn_like(q[2].weight))
    batches = [torch.randn(4, 16) for _ in range(3)]
    report = ns.compare(f, q, batches, progress=False)
    with torch.no_grad():
        inputs = [torch.relu(q[0](b)) for b in batches]  # what the quantized layer 2 reads
        want = _oracle(torch.cat([f[2](x) for x in inputs]), torch.cat([q[2](x) for x in inputs]))
    row = report.row("2")
    assert not row.quantized and math.isfinite(row.shadow_sqnr)
    for name, value in want.items():
        assert row.shadow[name] == pytest.approx(value, rel=1e-6), name


class _Mean(nn.Module):
    """``torch.mean`` as a module of the user's own, so a hook reads what it is given."""

    def forward(self, x):
        return torch.mean(x, dim=(2, 3), keepdim=True)


class _Around(nn.Module):
    """conv -> op -> conv between stubs: the op is left float and runs on quantized values."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), \
            torch.ao.quantization.DeQuantStub()
        self.conv, self.op, self.conv2 = nn.Conv2d(3, 8, 3), op, nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.dequant(self.conv2(self.op(self.conv(self.quant(x)))))


def _quantized_around(op: nn.Module, flow: str, batches: list[torch.Tensor]):
    from torch.ao.quantization import get_default_qconfig, get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = _Around(op).eval()
    if flow == "eager":
        prepared = copy.deepcopy(f)
        prepared.qconfig = get_default_qconfig("fbgemm")
        prepared = torch.ao.quantization.prepare(prepared)
    else:
        prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("fbgemm"),
                              (batches[0],))
    for b in batches:
        prepared(b)
    q = (torch.ao.quantization.convert if flow == "eager" else convert_fx)(prepared)
    return f, q


def _op_error(q: nn.Module, float_op: nn.Module, batches: list[torch.Tensor]):
    """The oracle of the op's own error: its float twin on the dequantized quantized input
    against the quantized model's op, read by a hook, pooled over the batches; and whether
    the op read quantized tensors."""
    refs, acts, on_grid = [], [], []

    def hook(module, args, out):
        on_grid.append(args[0].is_quantized)
        refs.append(float_op(args[0].dequantize()))
        acts.append(out.dequantize())

    handle = q.get_submodule("op").register_forward_hook(hook)
    with torch.no_grad():
        for b in batches:
            q(b)
    handle.remove()
    return (torch.cat([r.flatten() for r in refs]), torch.cat([a.flatten() for a in acts]),
            all(on_grid))


_ROUNDING = {  # float-capable ops that compute in integers on a quantized tensor and round
    "AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d(1),
    "AvgPool2d": lambda: nn.AvgPool2d(2),
    "bilinear Upsample": lambda: nn.Upsample(scale_factor=2.0, mode="bilinear"),
    "torch.mean": _Mean,
    "Hardtanh off the grid": nn.Hardtanh,
}
_EXACT = {  # ops that move or select the quantized integers: exact on the grid
    "ReLU": nn.ReLU,
    "MaxPool2d": lambda: nn.MaxPool2d(2),
    "nearest Upsample": lambda: nn.Upsample(scale_factor=2.0, mode="nearest"),
    "Hardtanh on the grid": nn.Hardtanh,
}
_BOUNDS_IN_STEPS = {"Hardtanh off the grid": (-3.4, 40.4), "Hardtanh on the grid": (-3, 40)}
_NOT_ON_THE_GRID = {  # what convert_fx does not leave as a float module on quantized values
    ("torch.mean", "fx"): "convert_fx inlines the user's module: no module left to hook",
    ("ReLU", "fx"): "convert_fx fuses the conv and the relu",
    ("bilinear Upsample", "fx"): "convert_fx dequantizes before an Upsample",
    ("nearest Upsample", "fx"): "convert_fx dequantizes before an Upsample",
}


@pytest.mark.usefixtures("traced_graphs_unchecked")
@pytest.mark.parametrize("flow", ["eager", "fx"])
@pytest.mark.parametrize("op", list(_ROUNDING) + list(_EXACT))
def test_a_float_op_run_on_quantized_values_is_shadowed_unless_exact_on_the_grid(op, flow):
    # AdaptiveAvgPool2d(1) between quantized convs computes alike in both models (the same
    # module), but the quantized model runs it on quantized tensors and rounds its result:
    # compare read inf (no error of its own) where the op reads 22 dB here
    if (op, flow) in _NOT_ON_THE_GRID:
        pytest.skip(_NOT_ON_THE_GRID[op, flow])
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 12, 12, generator=g) for _ in range(3)]
    f, q = _quantized_around((_ROUNDING | _EXACT)[op](), flow, batches)
    if op in _BOUNDS_IN_STEPS:  # bounds in steps of the grid the op reads, from zero
        for m in (f.op, q.op):
            m.min_val, m.max_val = (float(torch.tensor(k * q.conv.scale))
                                    for k in _BOUNDS_IN_STEPS[op])
    ref, actual, on_grid = _op_error(q, copy.deepcopy(f.op), batches)
    calls: list[int] = []  # the float op's runs (not countable in a module traced through)
    f.op.register_forward_pre_hook(lambda m, i: calls.append(1))
    report = ns.compare(f, q, batches, progress=False)
    counted = op != "torch.mean"
    row = report.row("mean" if op == "torch.mean" else "op")
    assert on_grid and not row.quantized
    if op in _EXACT:  # no error, and the shortcut still saves the float op's second run
        assert torch.equal(ref, actual)
        assert row.shadow_sqnr == math.inf and row.shadow["max_abs_error"] == 0.0
        assert len(calls) == len(batches) or not counted
        return
    want = _oracle(ref, actual)
    assert row.shadow_sqnr == pytest.approx(want["sqnr"], abs=1e-5)
    assert row.shadow["max_abs_error"] == pytest.approx(want["max_abs_error"], rel=1e-6)
    assert len(calls) == 2 * len(batches) or not counted  # shadowed
    if op == "AdaptiveAvgPool2d":  # diagnose reads the same shadow
        diagnosis = ns.diagnose(f, q, batches, progress=False)
        local = next(d.local_sqnr for d in diagnosis.layers if d.name == "op")
        assert local == pytest.approx(row.shadow_sqnr, abs=1e-5)

def test_a_value_overwritten_in_place_later_is_read_before_it_is_without_a_copy():
    # conv -> bn -> ReLU6(inplace=True): FX quantization does not fuse relu6, so the relu6
    # writes into the conv pair's output. compare's comparators read it at their call, before
    # the relu6 runs (no copy); kept activations are copied, and both read pre-relu values.
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                      nn.Conv2d(8, 8, 3)).eval()
    xs = [torch.randn(2, 3, 16, 16) for _ in range(3)]
    prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (xs[0],))
    for x in xs:
        prepared(x)
    q = convert_fx(prepared)
    lean = ns.compare(f, q, xs, progress=False)
    kept = ns.compare(f, q, xs, keep_activations=True, progress=False)
    ref = torch.cat([r for r, _ in kept.row("0").activations])
    with torch.no_grad():
        assert torch.equal(ref, torch.cat([f[1](f[0](x)) for x in xs]))  # before the relu6
    assert float(ref.min()) < -1
    actual = torch.cat([a.dequantize() for _, a in kept.row("0").activations])
    want = _oracle(ref, actual)
    for name, value in want.items():
        assert lean.row("0").output[name] == pytest.approx(value, rel=1e-6), name
    for row in lean.rows:
        for side in ("output", "shadow"):
            other = getattr(kept.row(row.name), side)
            for name, value in getattr(row, side).items():
                assert value == pytest.approx(other[name], rel=1e-9), (row.name, side, name)


def _counted_pair():
    """Wide layers; ``seen`` records how many float layers had run when each quantized layer
    starts (which the order of the two forwards decides)."""
    torch.manual_seed(0)
    f = _Chain(256).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    float_calls: list[int] = []
    seen: list[int] = []
    for layer in f.layers:
        layer.register_forward_pre_hook(lambda m, i: float_calls.append(1))
    for layer in q.layers:
        layer.register_forward_pre_hook(lambda m, i: seen.append(len(float_calls)))
    return f, q, float_calls, seen


@pytest.fixture
def tiny_budget(monkeypatch):
    compare_module = __import__("importlib").import_module("fxnumeric.compare")
    monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 1)
    monkeypatch.setattr(compare_module, "LOCKSTEP_SHARE", 1 << 40)


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_past_the_budget_the_float_model_runs_only_as_far_ahead_as_needed(tiny_budget):
    f, q, float_calls, seen = _counted_pair()
    batches = [torch.randn(32, 256) for _ in range(2)]
    report = ns.compare(f, q, batches, comparisons=("outputs",), progress=False)
    # (outputs only: a shadow calls the float layers too). The quantized forward starts once
    # the first float value is over the budget; then quantized layer k starts when the float
    # model has run layers 0..k-1: it runs one layer ahead, where in sequence it ran all six
    assert seen[:6] == [1, 1, 2, 3, 4, 5]
    assert seen[6:] == [7, 7, 8, 9, 10, 11]
    assert len(float_calls) == 12 and report.batches == 2


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_within_the_budget_the_float_forward_runs_whole_first():
    f, q, float_calls, seen = _counted_pair()
    ns.compare(f, q, [torch.randn(32, 256) for _ in range(2)], comparisons=("outputs",),
               progress=False)
    assert seen == [6] * 6 + [12] * 6


def test_turns_change_no_value(tiny_budget, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    f = LlamaForCausalLM(config).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    batches = [{"input_ids": torch.randint(0, 96, (2, 12)),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(3)]
    turns = ns.compare(f, q, batches, progress=False)
    compare_module = __import__("importlib").import_module("fxnumeric.compare")
    monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 1 << 60)
    whole = ns.compare(f, q, batches, progress=False)
    assert [r.name for r in turns.rows] == [r.name for r in whole.rows]
    for a, b in zip(turns.rows, whole.rows, strict=True):
        assert a.output == b.output and a.shadow == b.shadow, a.name
    assert turns.model_output == whole.model_output
    assert [b.name for b in turns.blocks] == [b.name for b in whole.blocks]
    for a, b in zip(turns.blocks, whole.blocks, strict=True):
        assert a.output == b.output and a.shadow == b.shadow, a.name


def test_turns_give_free_pages_back_at_every_switch(tiny_budget, monkeypatch):
    lockstep = __import__("importlib").import_module("fxnumeric.lockstep")
    trims, switches = [], []
    monkeypatch.setattr(lockstep, "return_free_pages", lambda: trims.append(1))
    hand_over = lockstep.Lockstep._hand_over
    monkeypatch.setattr(lockstep.Lockstep, "_hand_over",
                        lambda self, to, me: switches.append(to) or hand_over(self, to, me))
    monkeypatch.setattr(lockstep.Lockstep, "consumed", _untrimmed_consumed(lockstep))
    monkeypatch.setattr(lockstep.Lockstep, "reading", lambda self, value: None)
    f, q, _, _ = _counted_pair()
    ns.compare(f, q, [torch.randn(32, 256) for _ in range(3)], comparisons=("outputs",),
               progress=False)
    # per batch: when turns start and end, and each time the turn passes (the trims as
    # values are read, left out here: the next tests)
    assert len(switches) >= 3 and len(trims) == len(switches) + 2 * 3
    trims.clear()
    compare_module = __import__("importlib").import_module("fxnumeric.compare")
    monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 1 << 60)
    ns.compare(f, q, [torch.randn(32, 256) for _ in range(3)], comparisons=("outputs",),
               progress=False)
    assert trims == []  # a batch within the budget runs in one thread, and keeps its heap


def _untrimmed_consumed(lockstep):
    """``Lockstep.consumed`` without its trims: the held bytes counted, nothing else."""
    def consumed(self, value):
        self.held -= lockstep._nbytes(value)
    return consumed


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_the_quantized_side_gives_free_pages_back_as_it_reads(monkeypatch):
    lockstep = __import__("importlib").import_module("fxnumeric.lockstep")
    compare_module = __import__("importlib").import_module("fxnumeric.compare")
    value = 32 * 256 * 4  # bytes of one layer's output
    # 7 of the 12 values held ahead: at the float forward's end 5 are left to read
    monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 7 * value)
    monkeypatch.setattr(compare_module, "LOCKSTEP_SHARE", 1 << 40)
    monkeypatch.setattr(lockstep, "READ_PER_TRIM", 1 / 4)  # 1.75 values: several reads a trim
    events: list[tuple[str, int]] = []
    monkeypatch.setattr(lockstep, "return_free_pages", lambda: events.append(("trim", 0)))
    consumed = lockstep.Lockstep.consumed

    def watched(self, value):
        events.append(("read after the float end" if self.float_done else "read",
                       lockstep._nbytes(value)))
        consumed(self, value)

    monkeypatch.setattr(lockstep.Lockstep, "consumed", watched)
    f, q, _, _ = _counted_pair()
    ns.compare(f, q, [torch.randn(32, 256)], comparisons=("outputs",), progress=False)
    # in turns the quantized side reads up to the budget's float values (made in the caller's
    # heap) at a time, and once the float forward has ended it reads the values left without
    # handing the turn over: the pages go back each time READ_PER_TRIM of the budget was read
    # since the last time (the values read before the current one are dropped by then), as
    # well as each time the turn passes
    first = next(i for i, (kind, _) in enumerate(events) if kind == "trim")  # turns start
    tail = events[first:]
    reads = [n for kind, n in tail if kind == "read after the float end"]
    assert len(reads) >= 3 and sum(reads) >= 3 * value
    share = 7 * value // 4
    since, trims, by_reads = 0, 0, {"read": 0, "read after the float end": 0}
    for kind, nbytes in tail:
        if kind == "trim":
            since, trims = 0, trims + 1
            continue
        if since >= share:  # this read's consumed trims before counting it
            by_reads[kind] += 1
        assert since < share + value
        since += nbytes
    assert by_reads["read"] >= 1 and by_reads["read after the float end"] >= 1
    assert trims >= 4


class _Widening(nn.Module):
    """Six Linear + ReLU layers of one width, then a Linear 8 times as wide."""

    def __init__(self) -> None:
        super().__init__()
        self.chain = _Chain(256)
        self.head = nn.Linear(256, 2048)

    def forward(self, x):
        return self.head(self.chain(x))


@pytest.mark.usefixtures("traced_graphs_unchecked")
def test_the_free_pages_go_back_before_a_large_float_value_is_read(monkeypatch):
    lockstep = __import__("importlib").import_module("fxnumeric.lockstep")
    compare_module = __import__("importlib").import_module("fxnumeric.compare")
    value = 32 * 256 * 4  # bytes of a chain layer's output; the head's is 8 times that
    monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 7 * value)
    monkeypatch.setattr(compare_module, "LOCKSTEP_SHARE", 1 << 40)
    events: list[tuple[str, int]] = []
    monkeypatch.setattr(lockstep, "return_free_pages", lambda: events.append(("trim", 0)))
    monkeypatch.setattr(lockstep.Lockstep, "consumed", _untrimmed_consumed(lockstep))
    reading, hand_over = lockstep.Lockstep.reading, lockstep.Lockstep._hand_over
    monkeypatch.setattr(lockstep.Lockstep, "reading", lambda self, v: (
        events.append(("read", lockstep._nbytes(v))), reading(self, v))[-1])
    monkeypatch.setattr(lockstep.Lockstep, "_hand_over", lambda self, to, me: (
        events.append(("switch", 0)), hand_over(self, to, me))[-1])
    torch.manual_seed(0)
    f = _Widening().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    ns.compare(f, q, [torch.randn(32, 256)], comparisons=("outputs",), progress=False)
    reads = [i for i, (kind, _) in enumerate(events) if kind == "read"]
    # a quarter of the budget or more: its read is preceded by a trim; the others are not
    wide = [i for i in reads if events[i][1] >= 7 * value // 4]
    assert [events[i][1] for i in wide] == [8 * value]
    assert events[wide[0] + 1] == ("trim", 0)
    assert all(events[i + 1][0] != "trim" for i in reads if i not in wide)


_RSS = """
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
"""

_LEAVE_128_MIB_FREE = """
# glibc raises its mmap threshold past a freed 8 MiB block: the 1 MiB blocks below then come
# from the heap, and once freed under a block still alive they stay resident there
del_me = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
del del_me
left = [torch.empty(1 << 20, dtype=torch.uint8).fill_(1) for _ in range(128)]
pin = torch.empty(1 << 20, dtype=torch.uint8).fill_(1)
del left
before = rss()
"""


def _released_mib(script: str) -> float:
    """MiB the resident set of a fresh process running ``script`` fell by: its last line."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                         text=True, check=True, timeout=300)
    return float(out.stdout.split()[-1])


_glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's heaps and /proc/self/statm")


@_glibc_only
def test_a_block_of_rows_is_read_after_the_free_pages_went_back():
    # a large Linear's output held as rows (the logits) is computed a block at a time as it is
    # read; a block of 8-16 MiB does not fit in the smaller pieces the layers before it left
    # free, which go back first: in a fresh process whose heap holds 128 MiB freed, reading a
    # 16 MiB block leaves the resident set lower than before
    script = ("import os, torch, torch.nn as nn\n"
              "from fxnumeric.rows import LinearRows\n"
              "torch.set_num_threads(1)\n" + _RSS + """
torch.manual_seed(0)
head = nn.Linear(64, 8192)
x = torch.randn(1056, 64)  # 33 MiB of output: held as rows
rows = LinearRows.of(head(x), head, (x,), {})
assert rows is not None
""" + _LEAVE_128_MIB_FREE + """
block = rows.rows(slice(0, 512))
assert torch.equal(block, head(x)[:512])
print((before - rss()) / 2**20)
""")
    released = _released_mib(script)
    assert released > 64, released


@_glibc_only
def test_turns_leave_no_free_heap_resident():
    # the memory compare's own two threads and the caller's earlier calls leave free in glibc's
    # heaps goes back to the system: read as the process's resident set, in a fresh process
    # whose heap holds 128 MiB freed before compare starts
    script = ("import copy, importlib, os, sys\n"
              "import torch, torch.nn as nn\n"
              "import fxnumeric as ns\n"
              f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
              "from test_sums_and_memory import _Chain\n"
              "torch.set_num_threads(1)\n" + _RSS + """
compare = importlib.import_module("fxnumeric.compare")
compare.LOCKSTEP_MIN, compare.LOCKSTEP_SHARE = 1, 1 << 40  # every batch takes turns
torch.manual_seed(0)
f = _Chain(256).eval()
q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
batches = [torch.randn(32, 256)]
ns.compare(f, q, batches, comparisons=("outputs",), progress=False)  # warm
""" + _LEAVE_128_MIB_FREE + """
ns.compare(f, q, batches, comparisons=("outputs",), progress=False)
print((before - rss()) / 2**20)
""")
    released = _released_mib(script)
    assert released > 100, released


class _FailsOnce(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.armed = inner, False

    def forward(self, x):
        if self.armed:
            raise RuntimeError("planted failure")
        return self.inner(x)


@pytest.mark.parametrize("side", ["float", "quantized"])
def test_a_failure_in_turns_names_its_model_and_leaves_no_thread(tiny_budget, side):
    import threading

    f, q, _, _ = _counted_pair()
    target = f if side == "float" else q
    target.layers[4] = _FailsOnce(target.layers[4])
    target.layers[4].armed = True
    before = threading.active_count()
    with pytest.raises(ns.InputError, match=f"the {side} model failed"):
        ns.compare(f, q, [torch.randn(32, 256)], progress=False)
    assert threading.active_count() == before


def test_when_both_fail_the_float_models_error_is_the_one_raised(tiny_budget):
    f, q, _, _ = _counted_pair()
    for model, layer in ((f, 4), (q, 2)):
        model.layers[layer] = _FailsOnce(model.layers[layer])
        model.layers[layer].armed = True
    with pytest.raises(ns.InputError, match="the float model failed"):
        ns.compare(f, q, [torch.randn(32, 256)], progress=False)


@pytest.mark.filterwarnings("ignore:the quantized model has no quantized op")
def test_turns_keep_the_callers_autocast(tiny_budget, monkeypatch):
    # autocast is thread-local: the quantized model, run in turns in a helper thread, must
    # run under the caller's autocast as the float model does
    torch.manual_seed(0)
    f = _Chain(256).eval()
    q = copy.deepcopy(f)
    with torch.no_grad():
        for layer in q.layers:
            layer.weight.add_(0.01 * torch.randn_like(layer.weight))
    batches = [torch.randn(8, 256) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        turns = ns.compare(f, q, batches, comparisons=("outputs",), progress=False)
        compare_module = __import__("importlib").import_module("fxnumeric.compare")
        monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 1 << 60)
        whole = ns.compare(f, q, batches, comparisons=("outputs",), progress=False)
    for a, b in zip(turns.rows, whole.rows, strict=True):
        assert a.output == b.output, a.name
    assert turns.model_output == whole.model_output


def test_each_quantized_weight_is_read_once_and_the_floors_are_those_of_a_fresh_read(
        monkeypatch):
    # the weight comparison and the floor both read a dynamic Linear's weight; weight()
    # copies it out of its packed form, so compare reads it once and the floor reuses it
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams
    from torch.ao.quantization import quantize_dynamic

    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    batches = [torch.randn(4, 16) * 3 for _ in range(2)]
    unpacks = []
    unpack = LinearPackedParams._weight_bias
    monkeypatch.setattr(LinearPackedParams, "_weight_bias",
                        lambda self: unpacks.append(self) or unpack(self))
    matching = ns.match(f, q)
    report = ns.compare(f, q, batches, comparisons=("weights", "shadows"), matching=matching)
    assert len(unpacks) == 2 and len({id(p) for p in unpacks}) == 2
    # the oracle: without the weight comparison each floor reads its module afresh
    floors = {r.name: r.floor_sqnr for r in report.rows if r.floor_sqnr is not None}
    assert set(floors) == {"0", "2"}
    alone = ns.compare(f, q, batches, comparisons=("shadows",), matching=matching)
    assert {name: alone.row(name).floor_sqnr for name in floors} == floors
    assert len(unpacks) == 4  # two more: the floors' own reads


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.itself = self


def _collections_during(fn):
    """(generations of the collections that ran during ``fn()``, its result)."""
    generations: list[int] = []

    def seen(phase, info):
        if phase == "start":
            generations.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        result = fn()
    finally:
        gc.callbacks.remove(seen)
    return generations, result


def test_compare_defers_young_collections_and_frees_its_cyclic_garbage_at_the_end():
    # a compare of SmolLM2 left ~150,000 objects alive across young collections, enough to
    # start a full collection (0.35 s walking every object of the process) in every call
    f = _Chain().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(8, 64) for _ in range(3)]
    thresholds = gc.get_threshold()
    inside: list[int] = []
    garbage: list[weakref.ref] = []

    def probe(ref, actual):
        inside.append(gc.get_threshold()[0])
        cycle = _Cycle()
        garbage.append(weakref.ref(cycle))
        return 0.0

    gc.collect()
    generations, report = _collections_during(
        lambda: ns.compare(f, q, data, metrics={"probe": probe}, progress=False))
    assert generations == [0]  # before: a young collection every 700 objects built
    assert set(inside) == {_collector.YOUNG_LIMIT}
    assert gc.get_threshold() == thresholds
    assert garbage and all(ref() is None for ref in garbage)
    assert report.row("layers.0").output_sqnr > 20


def test_diagnose_defers_young_collections_as_compare_does():
    f = _Chain().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gc.collect()
    generations, found = _collections_during(
        lambda: ns.diagnose(f, q, [torch.randn(8, 64) for _ in range(3)], progress=False))
    assert generations == [0]
    assert [layer.name for layer in found.layers][:1] == ["layers.0"]


@pytest.mark.parametrize("call", ["match", "prepare_model_outputs", "prepare_model_with_stubs",
                                  "compare_model_outputs", "compare_weights"])
def test_the_stages_and_the_eager_api_defer_young_collections(call):
    # preparing mobilenet_v2 again and again started a full collection (0.45 s in a process
    # of 435,000 objects) every tenth call
    f = _Chain().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    x = torch.randn(8, 64)
    run = {"match": lambda: ns.match(f, q),
           "prepare_model_outputs": lambda: ns.prepare_model_outputs(f, q),
           "prepare_model_with_stubs": lambda: ns.prepare_model_with_stubs(
               f, q, {nn.Linear}, ns.ShadowLogger),
           "compare_model_outputs": lambda: ns.compare_model_outputs(f, q, x),
           "compare_weights": lambda: ns.compare_weights(f, q)}[call]
    gc.collect()
    generations, _ = _collections_during(run)
    ns.remove_instrumentation(f), ns.remove_instrumentation(q)
    assert generations == [0]  # one young collection, at the end


def test_a_call_that_keeps_making_cyclic_garbage_is_collected_past_the_limit(monkeypatch):
    monkeypatch.setattr(_collector, "YOUNG_LIMIT", 5_000)
    f = _Chain().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    first: list[weakref.ref] = []
    freed_before_the_end: list[bool] = []

    def litter(ref, actual):
        cycles = [_Cycle() for _ in range(2_000)]
        if not first:
            first.append(weakref.ref(cycles[0]))
        freed_before_the_end.append(first[0]() is None)
        return 0.0

    generations, _ = _collections_during(
        lambda: ns.compare(f, q, [torch.randn(8, 64) for _ in range(4)],
                           metrics={"litter": litter}, progress=False))
    assert any(freed_before_the_end)  # bounded: 5,000 objects, not the whole call's litter
    assert len(generations) > 1


def test_nested_deferrals_collect_once_and_a_disabled_collector_is_left_alone():
    f = _Chain().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(8, 64)]

    def twice():
        with _collector.deferred_collection():
            ns.compare(f, q, data, progress=False)
            return ns.compare(f, q, data, progress=False)

    generations, _ = _collections_during(twice)
    assert generations == [0]
    gc.disable()
    try:
        generations, _ = _collections_during(lambda: ns.compare(f, q, data, progress=False))
        assert generations == [] and not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_is_restored_when_compare_raises():
    f = _Chain().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    thresholds = gc.get_threshold()
    with pytest.raises(ns.InputError, match="batch"):
        ns.compare(f, q, [torch.randn(8, 64), None], progress=False)
    assert gc.get_threshold() == thresholds


def test_a_threshold_set_during_the_block_is_left_as_it_was_set():
    thresholds = gc.get_threshold()
    try:
        with _collector.deferred_collection():
            gc.set_threshold(5_000, *thresholds[1:])  # a user's metric, another thread
        assert gc.get_threshold()[0] == 5_000
    finally:
        gc.set_threshold(*thresholds)
