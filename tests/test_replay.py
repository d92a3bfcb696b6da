"""Block replay: a hybrid that agrees with an earlier one on its leading blocks takes those
blocks' outputs instead of running them, and the search's results do not change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fxnumeric as ns
import fxnumeric.advice.search as search
from fxnumeric.advice.replay import BlockReplay

torchao = pytest.importorskip("torchao")
from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_  # noqa: E402
from torchao.quantization.granularity import PerGroup  # noqa: E402

from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _Counting(BlockReplay):
    made: list[BlockReplay] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _Counting.made.append(self)


class _Off(BlockReplay):
    def run(self, model, batch_index, base, where, call):
        return call(model)


def _variants():
    torch.manual_seed(0)
    f = tiny_llama().eval()
    q8 = copy.deepcopy(f)
    quantize_(q8, Int8WeightOnlyConfig())
    q4 = copy.deepcopy(f)
    quantize_(q4, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    return f, {"int4": q4, "int8": q8}


def test_replayed_blocks_give_the_search_the_same_answer(monkeypatch) -> None:
    f, variants = _variants()
    data = tiny_llm_batches(vocab_size=256, n=2)
    monkeypatch.setattr(search, "BlockReplay", _Off)
    plain = ns.advise(f, variants, data, metric="kl", target=0.002, progress=False)
    _Counting.made.clear()
    monkeypatch.setattr(search, "BlockReplay", _Counting)
    replayed = ns.advise(f, variants, data, metric="kl", target=0.002, progress=False)
    (replay,) = _Counting.made
    assert replay.enabled and replay.replayed > 0
    assert replayed.assignment == plain.assignment
    assert replayed.front == plain.front
    assert replayed.evaluations == plain.evaluations


class _Twice(nn.Module):
    """A model that calls its first block twice: replay must stay off."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))

    def forward(self, x):
        x = self.layers[0](self.layers[0](x))
        return self.layers[2](self.layers[1](x))


def test_replay_stays_off_when_blocks_do_not_run_once_each_in_order() -> None:
    model = _Twice()
    replay = BlockReplay(model, [], budget=1 << 20)
    assert replay.blocks == ["layers.0", "layers.1", "layers.2"]
    x = torch.randn(2, 4)
    expected = model(x)
    first = replay.run(model, 0, "float", [], lambda m: m(x))
    again = replay.run(model, 0, "float", [], lambda m: m(x))
    assert replay.enabled is False and replay.replayed == 0
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(again, expected)
    assert "forward" not in vars(model.layers[0])  # the model is left as it was


def test_replayed_output_is_the_blocks_output_and_the_model_is_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.layers = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))
    model.forward = lambda x: model.layers[2](model.layers[1](model.layers[0](x)))
    replay = BlockReplay(model, [], budget=1 << 20)
    x = torch.randn(2, 4)
    expected = model(x)
    seen = []
    handle = model.layers[0][0].register_forward_hook(lambda m, a, o: seen.append(o))
    replay.run(model, 0, "float", [("swap", 2)], lambda m: m(x))
    out = replay.run(model, 0, "float", [("other", 2)], lambda m: m(x))
    handle.remove()
    assert replay.enabled and replay.replayed == 2  # blocks 0 and 1 not run the second time
    assert len(seen) == 1
    torch.testing.assert_close(out, expected)
    assert all("forward" not in vars(b) for b in model.layers)
