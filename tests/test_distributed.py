"""Data-parallel compare: two processes (gloo on CPU) each run half of the batches, and rank 0's
report equals a one-process run over all of them, field by field (1e-6).

The oracle is :func:`fxnumeric.compare` in this process. Merging is tested first without
processes: accumulators filled on parts of the batches and merged equal one accumulator fed
every batch (sums, maxima, the per-batch spread, NaN/Inf counts, custom metrics, token KLs).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.ao.quantization import quantize_dynamic

import fxnumeric as ns
from fxnumeric.distributed import ONE_PROCESS, Ranks, _fingerprint, data_parallel
from fxnumeric.llm_metrics import LogitsAccumulator
from fxnumeric.metrics import Accumulator

sys.path.insert(0, str(Path(__file__).parent))
from _report_equal import differences  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _mean_abs(ref, actual):
    return float((ref - actual).abs().mean())


def _tensor_batches(n: int = 7, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ref, actual) pairs, one with NaN in the actual tensor, one with Inf in the reference."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ref = torch.randn(3, 5, generator=gen) * (i + 1)
        actual = ref + 0.05 * torch.randn(3, 5, generator=gen)
        if i == 3:
            actual[0, 0] = math.nan
        if i == 5:
            ref[1, 1] = math.inf
        out.append((ref, actual))
    return out


def _fed(batches, order) -> Accumulator:
    acc = Accumulator({"mean_abs": _mean_abs})
    for i in order:
        acc.update(*batches[i])
        acc.update(*batches[i])  # a module called twice per batch
        acc.end_batch()
    return acc


@pytest.mark.parametrize("parts", [[range(0, 7)], [range(0, 3), range(3, 7)],
                                   [range(0, 7, 2), range(1, 7, 2)], [[0], [], [1, 2, 3, 4, 5, 6]]])
def test_merged_parts_equal_one_accumulator(parts):
    batches = _tensor_batches()
    finite = [b for i, b in enumerate(batches) if i not in (3, 5)]
    whole = _fed(finite, range(len(finite)))
    states = [_fed(finite, [i for i in part if i < len(finite)]).state() for part in parts]
    merged = Accumulator({"mean_abs": _mean_abs})
    state = states[0]
    for other in states[1:]:
        state = state.merged(other)
    merged.load(state)
    names = ["sqnr", "cosine", "mse", "max_abs_error", "mean_abs"]
    assert not differences(merged.values(names), whole.values(names), rel=1e-12)
    assert not differences(merged.spread(), whole.spread(), rel=1e-12)
    assert (merged.batches, merged.count) == (whole.batches, whole.count)


def test_merging_keeps_nan_and_inf_and_where_they_came_from():
    batches = _tensor_batches()
    whole = _fed(batches, range(7))
    a, b = _fed(batches, [0, 1, 2, 3]), _fed(batches, [4, 5, 6])
    a.merge(b)
    assert (a.nonfinite_batches, a.ref_nonfinite, a.actual_nonfinite) == (4, 2, 2)
    assert (a.nonfinite_batches, a.ref_nonfinite, a.actual_nonfinite) == (
        whole.nonfinite_batches, whole.ref_nonfinite, whole.actual_nonfinite)
    assert math.isnan(a.value("max_abs_error")) and math.isnan(whole.value("max_abs_error"))
    assert not differences(a.spread(), whole.spread(), rel=1e-12)


def test_merging_an_empty_accumulator_changes_nothing():
    acc = _fed(_tensor_batches(), [0, 1])
    before = acc.state()
    acc.merge(Accumulator({"mean_abs": _mean_abs}))
    assert acc.state() == before
    empty = Accumulator()
    empty.merge(_fed(_tensor_batches(), [0, 1]))
    assert empty.state().signal == before.signal and empty.spread() == acc.spread()


def test_logits_states_merge_to_the_exact_p99():
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(6, 9, 40, generator=gen) * 3
    q = f + 0.3 * torch.randn(6, 9, 40, generator=gen)
    ids = torch.randint(0, 40, (6, 9), generator=gen)
    whole, parts = LogitsAccumulator(), [LogitsAccumulator() for _ in range(3)]
    whole.update(f, q, input_ids=ids)
    for k, rows in enumerate((slice(0, 1), slice(1, 4), slice(4, 6))):
        parts[k].update(f[rows], q[rows], input_ids=ids[rows])
    state = parts[0].state().merged(parts[1].state()).merged(parts[2].state())
    merged = LogitsAccumulator()
    merged.load(pickle.loads(pickle.dumps(state)))  # as it travels between processes
    assert not differences(merged.values(), whole.values(), rel=1e-12)
    assert merged.tokens == whole.tokens == 54


def test_ranks_share_batches_by_index(monkeypatch):
    monkeypatch.setattr(Ranks, "_check", lambda self, *args: None)  # no group
    pairs = list(enumerate("abcde"))
    shares = [list(Ranks(r, 2).share(pairs, [])) for r in range(2)]
    assert shares == [[(0, "a"), (2, "c"), (4, "e")], [(1, "b"), (3, "d")]]
    assert [Ranks(r, 3).count(5) for r in range(3)] == [2, 2, 1]
    assert list(ONE_PROCESS.share(pairs, [])) == pairs
    assert ONE_PROCESS.reduce([], 3, [2, 1]) == (3, (2, 1))


def test_merged_shape_mismatch_is_the_later_batchs():
    # batch i: float (i + 2, 3) against quantized (i + 1, 3); ranks run i % 2 == r
    def fed(indices):
        acc = Accumulator()
        for i in indices:
            acc.update(torch.zeros(i + 2, 3), torch.zeros(i + 1, 3))
            acc.end_batch(i)
        return acc.state()

    last = ((6, 3), (5, 3))  # batch 4's, which one process sees last
    assert fed(range(5)).shape_mismatch == last
    assert fed([0, 2, 4]).merged(fed([1, 3])).shape_mismatch == last
    assert fed([1, 3]).merged(fed([0, 2, 4])).shape_mismatch == last
    assert fed([1, 3]).merged(fed([])).shape_mismatch == ((5, 3), (4, 3))


def test_merged_unfit_mask_is_the_first_batchs():
    """The unfit-mask note names the first batch whose mask did not fit, as one process keeps
    it; a merge took rank 0's first (batch 1's shapes before rank 1's batch 0 ... in rank
    order). Oracle: one accumulator fed every batch in order."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(5):  # batch i: (i + 1, 2 * (i + 2)) tokens, logits for every other one
        ids = torch.randint(0, 30, (i + 1, 2 * (i + 2)), generator=gen)
        mask = torch.ones_like(ids)
        mask[:, -1] = 0  # padding: the mask must be placed, and cannot be
        f = torch.randn(i + 1, i + 2, 30, generator=gen)
        batches.append((f, f + 0.1, {"input_ids": ids, "attention_mask": mask}))

    def fed(indices):
        acc = LogitsAccumulator()
        for i in indices:
            acc.update_batch(*batches[i], index=i)
        return acc.state()

    first = ((1, 4), (1, 2))  # batch 0's mask and logits' positions
    assert fed(range(5)).unfit_shapes == first and fed(range(5)).unfit_masks == 5
    assert fed([0, 2, 4]).merged(fed([1, 3])).unfit_shapes == first
    assert fed([1, 3]).merged(fed([0, 2, 4])).unfit_shapes == first
    assert fed([1, 3]).merged(fed([])).unfit_shapes == ((2, 6), (2, 3))


def test_merged_output_part_is_the_first_batchs():
    """Where the compared model output sits is read on the first batch compared, as one
    process reads it: a rank that ran no batch takes it from the others, and rank order does
    not pick it."""
    from fxnumeric.compare import _FirstPart

    def fed(indices):
        part = _FirstPart()
        for i in indices:  # batch i returns i + 2 tensors
            part.see(i, tuple(torch.zeros(1) for _ in range(i + 2)))
        return part.state()

    first = ("[0]", 3)  # batch 1's, batch 0 holding NaN
    assert fed([1, 2, 3]).part == first
    assert fed([]).merged(fed([1, 3])).part == first
    assert fed([3]).merged(fed([1, 2])).merged(fed([])).part == first
    merged = _FirstPart()
    merged.load(pickle.loads(pickle.dumps(fed([2]).merged(fed([1])))))
    assert (merged.index, merged.part) == (1, first)


def test_merged_floor_offsets_are_what_one_process_keeps():
    """A floor's per-channel error sums merge to what one process keeps, in any share of the
    batches: added when every batch has the same channels, none when their count differs (a
    merge used to keep rank 0's, one process the run of batches since the last change)."""
    from fxnumeric.floor import FloorState, FloorSums

    gen = torch.Generator().manual_seed(0)
    for widths in ((5, 5, 5, 5), (5, 5, 7, 5)):  # an add's last dim: a length, not channels
        outputs = [torch.randn(3, w, generator=gen) for w in widths]

        def fed(indices, outputs=outputs):
            sums = FloorSums(kind="add")
            for i in indices:
                sums.update(outputs[i] + 0.1 * (i + 1), outputs[i], ())
            return sums.state()

        one = fed(range(4))
        for parts in (([0, 2], [1, 3]), ([1, 3], [0, 2]), ([0, 1, 2], [3]), ([3], [], [0, 1, 2])):
            merged = FloorState()
            for part in parts:
                merged = merged.merged(fed(part))
            assert merged.channel_count == one.channel_count
            assert merged.channels_differ == one.channels_differ == (widths[2] == 7)
            if one.channel_error is None:
                assert merged.channel_error is None
            else:
                torch.testing.assert_close(merged.channel_error, one.channel_error)


def test_gathered_states_hold_cpu_tensors_whatever_device_their_values_were_on():
    """The states ranks gather kept their tensors where they were summed: a pickled CUDA
    tensor comes back on the device it left, so with one rank per GPU, rank 0 concatenated
    the token KLs of cuda:0 and cuda:1 and failed (added floor channel errors alike). Fake
    tensors stand in for two GPUs: their devices are checked as real ones, and no GPU is
    needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxnumeric.floor import FloorState
    from fxnumeric.llm_metrics import LogitsState

    with FakeTensorMode():
        kls = [torch.zeros(n, device=f"cuda:{i}") for i, n in enumerate((2, 3))]
        channels = [torch.zeros(4, device=f"cuda:{i}") for i in range(2)]
    logits = [LogitsState(tokens=len(k), token_kls=k, batches=1) for k in kls]
    floors = [FloorState(channel_error=c, channel_count=4) for c in channels]
    assert {s.token_kls.device.type for s in logits} == {"cpu"}
    assert {s.channel_error.device.type for s in floors} == {"cpu"}
    merged = logits[0].merged(logits[1])
    assert merged.token_kls.device.type == "cpu" and merged.token_kls.shape == (5,)
    merged = floors[0].merged(floors[1])
    assert merged.channel_error.device.type == "cpu" and merged.channel_count == 8


def test_sparse_batches_are_compared_and_fingerprinted_by_their_values():
    f, q, data = _sparse_case()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        report = ns.compare(f, q, data + [(data[0][0], data[0][1] * math.inf)])
    # oracle: fc's outputs on each side summed by hand (its input is a dense tensor)
    with torch.no_grad():
        signal = sum(float((f.fc(x).double() ** 2).sum()) for x, _ in data)
        noise = sum(float(((f.fc(x) - q.fc(x)).double() ** 2).sum()) for x, _ in data)
    assert report.batches == 3 and report.skipped_batches == (3,)  # Inf in a sparse tensor
    assert report.rows[0].name == "fc"
    assert math.isclose(report.rows[0].output["sqnr"], 10 * math.log10(signal / noise),
                        rel_tol=1e-5)
    adj = data[0][1]
    assert _fingerprint((data[0][0], adj)) == _fingerprint((data[0][0].clone(), adj.clone()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        csr = adj.to_sparse_csr()
    for other in (adj * 2, csr, adj.to_dense()):
        assert _fingerprint((data[0][0], other)) != _fingerprint((data[0][0], adj))


def test_a_rank_left_waiting_says_to_pass_distributed_false(monkeypatch):
    def timed_out(every, mine):
        raise RuntimeError("[gloo] Timed out waiting 20000ms for recv operation to complete")

    monkeypatch.setattr(dist, "all_gather_object", timed_out)
    with pytest.raises(ns.InputError, match=r"rank 0 of 2 waited for the other ranks(.|\n)*Timed "
                                            r"out(.|\n)*Fix: call compare on every rank, or "
                                            r"pass distributed=False"):
        list(Ranks(0, 2).share(enumerate([torch.ones(2)]), []))


def test_distributed_true_without_a_process_group_says_how_to_launch():
    assert not dist.is_initialized()
    assert data_parallel(None) == ONE_PROCESS and data_parallel(False) == ONE_PROCESS
    with pytest.raises(ns.InputError, match=r"needs an initialised torch.distributed process "
                                            r"group(.|\n)*Fix: launch with torchrun"):
        ns.compare(nn.Linear(2, 2), nn.Linear(2, 2), [torch.randn(1, 2)], distributed=True)



def test_ranks_check_an_exported_programs_parameters_too():
    """What ranks must hold alike lists both models' parameters; a float side given as an
    ExportedProgram (no nn.Module) had none listed, so ranks holding different float models
    merged their sums unwarned. Oracle: the ExportedProgram's own named_parameters()."""
    from _flow_pairs import MLP, _pt2e, _vectors

    from fxnumeric.compare import _capture_lines

    torch.manual_seed(0)
    f = MLP().eval()
    data = _vectors()
    q = _pt2e(f, data)
    ep = torch.export.export(copy.deepcopy(f), (data[0],))
    lines = _capture_lines(type("Plan", (), {"matching": ns.match(ep, q, data[0])}))
    listed = [line for line in lines if line.startswith("float parameter")]
    assert listed == [f"float parameter {name!r} of shape {tuple(p.shape)}"
                      for name, p in ep.named_parameters()]
    assert len(listed) == 6


# --- two processes -------------------------------------------------------------------------


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_case():
    """An MLP over 7 batches: batch ``i`` has ``i + 1`` rows (so a hook can tell which ran),
    batch 2 holds NaN (left out, on rank 0), batch 5 overflows inside the models (NaN/Inf
    first appears in a layer, on rank 1); a custom metric."""
    torch.manual_seed(0)
    f = _Mlp().eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        q = quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(i + 1, 16, generator=gen) for i in range(7)]
    data[2][0, 0] = math.nan
    data[5] = data[5].clamp(-1, 1) * 3e38  # finite, until fc1 sums 16 of them: Inf
    return f, q, data


class _Classifier(nn.Module):
    """A classifier returning ``{"logits": (batch, 10)}``: one prediction per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return {"logits": self.fc2(torch.relu(self.fc1(x)))}


class _TokenLm(nn.Module):
    """A token model returning ``{"logits": (batch, seq, vocab)}``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.head(self.embed(input_ids))}


class _DropsARow(nn.Module):
    """Its quantized twin (:func:`_shape_case`) drops the first row of the output."""

    def __init__(self, drop: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = drop

    def forward(self, x):
        y = self.fc(x)
        return y[1:] if self.drop else y


class _SparseGraph(nn.Module):
    """A GNN-style layer: ``adj @ fc(x)`` with a sparse adjacency from the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)

    def forward(self, x, adj):
        return torch.sparse.mm(adj, self.fc(x))


class _TwoOutputs(nn.Module):
    """Returns ``(out, hidden)``: the metrics read ``output[0]``, and a note says so."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        hidden = self.fc1(x)
        return self.fc2(torch.relu(hidden)), hidden


def _two_outputs_cases() -> dict:
    """Where the compared output sits, read on the first batch one process runs: batch 0 of
    two holds NaN, so rank 0 runs none; one batch, so rank 1 runs none. Such a rank returned
    no ``model_output_part`` and no note on it."""
    torch.manual_seed(1)
    f = _TwoOutputs().eval()
    q = _quantized(f)
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    data[0][0, 0] = math.nan
    return {"two_outputs_nan_first": ns.compare(f, q, data),
            "two_outputs_one_batch": ns.compare(f, q, data[1:]),
            "two_outputs_variants": ns.compare(f, {"int8": q}, data)}


def _quantized(f: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return quantize_dynamic(copy.deepcopy(f), {nn.Linear})


def _logits_cases() -> dict:
    """Per-rank LLM state: a classifier whose batch 0 (rank 0's only) holds NaN, so that
    rank 0 runs no batch of logits; a token model over one batch (rank 1 runs none) without
    a real token (attention_mask all 0)."""
    torch.manual_seed(0)
    cls = _Classifier().eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    data[0][0, 0] = math.nan
    lm = _TokenLm().eval()
    ids = torch.randint(0, 50, (2, 6), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.zeros_like(ids)}
    return {"classifier_nan_first": ns.compare(cls, _quantized(cls), data),
            "token_lm_no_real_token": ns.compare(lm, _quantized(lm), [batch])}


def _shape_case():
    """Five batches, batch ``i`` of ``i + 2`` rows; the quantized model drops a row, so every
    batch's shapes differ and the note names the last batch's: ``(6, 8)`` against ``(5, 8)``."""
    torch.manual_seed(0)
    f, dropping = _DropsARow().eval(), _DropsARow(drop=True).eval()
    dropping.load_state_dict(f.state_dict())
    gen = torch.Generator().manual_seed(5)
    return f, _quantized(dropping), [torch.randn(i + 2, 8, generator=gen) for i in range(5)]


class _Halving(nn.Module):
    """Logits for every other position: a padded ``attention_mask`` does not fit them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, input_ids, attention_mask):
        return {"logits": self.head(self.embed(input_ids)[:, ::2])}


def _unfit_mask_case():
    """Three batches; batch 0 is not padded, batches 1 (rank 1's) and 2 (rank 0's) are, with
    other shapes: the note names the first unfit batch's, ``[2, 8]``."""
    torch.manual_seed(0)
    f = _Halving().eval()
    gen = torch.Generator().manual_seed(1)

    def batch(size, length, pad):
        ids = torch.randint(3, 50, (size, length), generator=gen)
        mask = torch.ones_like(ids)
        if pad:
            mask[1:, length // 2:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return f, _quantized(f), [batch(2, 8, False), batch(2, 8, True), batch(3, 10, True)]


def _sparse_case():
    torch.manual_seed(0)
    f = _SparseGraph().eval()
    gen = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 16, generator=gen),
             (torch.rand(4, 4, generator=gen) > 0.5).float().to_sparse()) for _ in range(3)]
    return f, _quantized(f), data


def _llama_case():
    from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches

    f = tiny_llama()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        q = quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    return f, q, tiny_llm_batches(n=5, batch_size=2)


def _reports() -> tuple[dict, list[int]]:
    """The reports both processes (and the oracle) compute, and the batch sizes rank ran."""
    f, q, data = _mlp_case()
    ran: list[int] = []
    f.fc1.register_forward_pre_hook(lambda m, args: ran.append(args[0].shape[0]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        out = {"mlp": ns.compare(f, q, data, metrics=["sqnr", "cosine", "mse",
                                                      "max_abs_error", _mean_abs])}
        out["mlp_two_batches"] = ns.compare(f, q, data, max_batches=2)
        out.update(_logits_cases())
        out.update(_two_outputs_cases())
        out["shape_note"] = ns.compare(*_shape_case())
        out["unfit_mask"] = ns.compare(*_unfit_mask_case())
        out["sparse"] = ns.compare(*_sparse_case())
        if _has_transformers():
            f, q, batches = _llama_case()
            out["llama"] = ns.compare(f, q, batches)
            half = quantize_dynamic(copy.deepcopy(f), {nn.Linear}, dtype=torch.float16)
            out["llama_variants"] = ns.compare(f, {"int8": q, "fp16": half}, batches)
    return out, ran


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _refusals() -> dict[str, str]:
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    f, q, data = _mlp_case()
    # the same layer count, other names and widths: rank 1's fc1 is named a, 64 wide
    torch.manual_seed(0)
    wide = nn.Sequential()
    wide.add_module("a", nn.Linear(16, 64))
    wide.add_module("act", nn.ReLU())
    wide.add_module("b", nn.Linear(64, 8))
    wide_q = _quantized(wide.eval())
    other = nn.Sequential(nn.Linear(16, 8)).eval()
    other_q = quantize_dynamic(copy.deepcopy(other), {nn.Linear})
    found = {}
    loader = DataLoader(TensorDataset(torch.randn(8, 16)), batch_size=2,
                        sampler=DistributedSampler(TensorDataset(torch.randn(8, 16))))
    for name, call in (
        ("sampler", lambda: ns.compare(f, q, loader, inputs=0)),
        ("keep", lambda: ns.compare(f, q, data[:2], keep_activations=True)),
        ("mismatch", lambda: ns.compare(*((f, q) if dist.get_rank() == 0 else (other, other_q)),
                                        data[:2])),
        ("data", lambda: ns.compare(f, q, [x + dist.get_rank() for x in data[:2]])),
        ("structure", lambda: ns.compare(*((f, q) if dist.get_rank() == 0 else (wide, wide_q)),
                                         data[:2])),
    ):
        try:
            call()
            found[name] = ""
        except ns.InputError as exc:
            found[name] = str(exc)
    return found


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        reports, ran = _reports()
        refusals = _refusals()
        f, q, data = _mlp_case()
        alone = ns.compare(f, q, data[:4], distributed=False)  # batch 2 holds NaN
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump((reports, ran, refusals, alone.batches), fh)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    init = "file://" + str(out / "rendezvous")
    mp.spawn(_worker, args=(init, str(out)), nprocs=WORLD, join=True)
    results = []
    for rank in range(WORLD):
        with open(out / f"rank{rank}.pkl", "rb") as fh:
            results.append(pickle.load(fh))
    return results


@pytest.fixture(scope="module")
def one_process():
    # one thread, as in the ranks: float32 per-batch reductions summed in another order by
    # more threads move a per-batch SQNR by ~1e-7, its spread's std by ~2e-6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")
            return _reports()
    finally:
        torch.set_num_threads(threads)


def test_rank_zero_equals_one_process_field_by_field(two_ranks, one_process):
    oracle, _ = one_process
    reports, _, _, _ = two_ranks[0]
    assert set(reports) == set(oracle)
    found = [d for name, report in reports.items()
             for d in differences(report, oracle[name], rel=1e-6, path=name)]
    assert not found, "\n".join(found[:20])


def test_the_oracle_has_what_must_survive_the_merge(one_process):
    oracle, _ = one_process
    mlp = oracle["mlp"]
    assert mlp.batches == 6 and mlp.skipped_batches == (2,)
    assert any("1 of 7 batches left out" in n for n in mlp.notes)
    assert mlp.nonfinite and any("NaN/Inf first appears" in n for n in mlp.notes)
    assert all(row.spread for row in mlp.rows) and "_mean_abs" in mlp.rows[0].output
    assert oracle["mlp_two_batches"].batches == 2
    assert oracle["classifier_nan_first"].logits_per == "sample"  # batch 1's (4, 10) logits
    assert any("no batch holds a real token" in n for n in oracle["token_lm_no_real_token"].notes)
    # the last batch's shapes: batch 4 holds 6 rows, the quantized model drops one
    assert "float (6, 8) vs quantized (5, 8)" in oracle["shape_note"].notes[0]
    # the first unfit batch's: batch 1 (rank 1's), not batch 2 (rank 0's)
    assert any("attention_mask [2, 8] does not fit the logits' positions [2, 4] (2 of 3 "
               "batches)" in n for n in oracle["unfit_mask"].notes)
    assert oracle["sparse"].batches == 3 and oracle["sparse"].rows[0].output
    for name in ("two_outputs_nan_first", "two_outputs_one_batch", "two_outputs_variants"):
        assert oracle[name].model_output_part == "[0]"
        assert any("the metrics read `output[0]`, one of the 2 tensors" in n
                   for n in oracle[name].notes)
    if "llama" in oracle:
        assert any(row.weight_sqnr is not None for row in oracle["llama"].rows)
        # merged: the token KLs (their p99) and the blocks' sums; variants each their own
        assert {"kl", "kl_p99", "top1_agreement"} <= set(oracle["llama"].model_output)
        assert len(oracle["llama"].blocks) == 2
        assert set(oracle["llama_variants"].variants) == {"int8", "fp16"}
        assert oracle["llama_variants"].variants["fp16"].blocks


def test_every_rank_returns_the_same_report(two_ranks):
    first = two_ranks[0][0]
    found = [d for reports, *_ in two_ranks[1:] for name, report in reports.items()
             for d in differences(report, first[name], rel=0.0, path=name)]
    assert not found, "\n".join(found[:20])


def test_each_rank_ran_its_own_share_of_the_batches(two_ranks):
    # batch i has i + 1 rows; rank r runs i % 2 == r (batch 0 also runs once when capturing)
    ran = [set(r[1]) for r in two_ranks]
    assert ran[0] == {1, 5, 7}  # batch 2 (3 rows) holds NaN: left out
    assert ran[1] - {1} == {2, 4, 6}


def test_what_cannot_be_split_is_refused_on_every_rank(two_ranks):
    for _, _, refusals, alone_batches in two_ranks:
        assert "DistributedSampler" in refusals["sampler"] and "Fix:" in refusals["sampler"]
        assert "keep_activations=True) under torch.distributed" in refusals["keep"]
        assert "Fix: run one process" in refusals["keep"]
        assert "captured the models differently: rank 1 has " in refusals["mismatch"]
        assert "Fix: build the models and data identically" in refusals["mismatch"]
        # the same layer count, another structure: the first difference is named
        assert ("captured the models differently: rank 1 has pair 'a' (linear) where rank 0 "
                "has pair 'fc1' (linear)") in refusals["structure"], refusals["structure"]
        # data of the same shapes, other values: the sums merged as if one run's
        assert "the ranks hold different data: the first batch of rank 1" in refusals["data"]
        assert alone_batches == 3  # distributed=False: each rank compares all of its data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_runs_the_cli_data_parallel(tmp_path):
    """``torchrun --nproc_per_node 2 -m fxnumeric.cli report`` prints rank 0's report once."""
    args = ["report", "--model", "_flow_pairs:make_dynamic", "--input-shape", "4,16",
            "--batches", "5", "--format", "json", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                "-m", "fxnumeric.cli", *args]
    done = subprocess.run(torchrun, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "fxnumeric.cli", *args], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    parallel, alone = ns.Report.from_json(done.stdout), ns.Report.from_json(one.stdout)
    assert parallel.batches == 5
    found = differences(parallel, alone, rel=1e-6)
    assert not found, "\n".join(found[:20])
