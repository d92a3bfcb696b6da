"""Mixture-of-experts layers compared only where both models routed alike (fxnumeric.routing).

transformers 5's fused experts run ``act_fn`` once per expert hit, on the rows the router
sent to that expert. Where the quantized model's router picks other experts, or the same in
another order, row ``i`` of a call is another token on each side: the oracle is the act_fn
outputs and the router's picks read with forward hooks on the user's models.
"""

from __future__ import annotations

import copy
import importlib
import math
import re

import pytest
import torch
from torch import nn

import fxnumeric as ns

transformers = pytest.importorskip("transformers")


def _mixtral() -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


def _batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        ids = torch.randint(0, 300, (2, 24), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _seen(model: nn.Module, batch: dict) -> dict[int, tuple[torch.Tensor, list[torch.Tensor]]]:
    """Per layer: the router's picks the experts got and every act_fn output, read by hooks
    on a copy of ``model``."""
    model = copy.deepcopy(model)
    seen: dict[int, tuple[list, list]] = {}
    for i, layer in enumerate(model.model.layers):
        picks, acts = seen.setdefault(i, ([], []))
        layer.mlp.experts.register_forward_pre_hook(
            lambda m, args, picks=picks: picks.append(args[1].clone()))
        layer.mlp.experts.act_fn.register_forward_hook(
            lambda m, args, out, acts=acts: acts.append(out.detach().clone()))
    with torch.no_grad():
        model(**batch, use_cache=False)
    return {i: (picks[0], acts) for i, (picks, acts) in seen.items()}


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)


@pytest.mark.parametrize("turns", [False, True], ids=["one-thread", "in-turns"])
def test_expert_layers_are_compared_only_where_both_models_routed_alike(turns, monkeypatch):
    if turns:  # the quantized model runs in turns with the float one at every value
        compare_module = importlib.import_module("fxnumeric.compare")
        monkeypatch.setattr(compare_module, "LOCKSTEP_MIN", 1)
        monkeypatch.setattr(compare_module, "LOCKSTEP_SHARE", 1 << 40)
    f = _mixtral()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    batches = _batches()
    report = ns.compare(f, q, batches, progress=False)

    sums = {i: [0.0, 0.0] for i in range(2)}
    misrouted = {i: 0 for i in range(2)}
    differ = {i: [0, 0] for i in range(2)}
    for batch in batches:
        fs, qs = _seen(f, batch), _seen(q, batch)
        for i in range(2):
            (f_picks, f_acts), (q_picks, q_acts) = fs[i], qs[i]
            differ[i][0] += int((f_picks != q_picks).sum())
            differ[i][1] += f_picks.numel()
            if not torch.equal(f_picks, q_picks):
                misrouted[i] += 1
                continue
            for a, b in zip(f_acts, q_acts, strict=True):
                sums[i][0] += float((a.double() ** 2).sum())
                sums[i][1] += float(((a.double() - b.double()) ** 2).sum())
    # the data routes some batches alike and others not, so both cases are read
    assert 0 < sum(misrouted.values()) < 2 * len(batches)
    assert any(differ[i][0] for i in range(2))

    for i in range(2):
        row = report.row(f"model.layers.{i}.mlp.experts.act_fn.silu")
        if misrouted[i] == len(batches):
            assert row.output_sqnr is None
        else:
            assert row.output_sqnr == pytest.approx(_db(*sums[i]), abs=1e-3)
        if misrouted[i]:
            assert (f"output: {misrouted[i]} batches left out: `model.layers.{i}.mlp.experts` "
                    "routed its rows unlike the float model") in row.note
        else:
            assert "left out" not in row.note
        assert math.isinf(row.shadow_sqnr)  # act_fn is not quantized: its shadow is exact
        # the router's picks: how many of the top-k slots differ
        picks = next(r for r in report.rows if r.name.startswith(f"model.layers.{i}.mlp.")
                     and "integer values" in r.note and re.search(r"differ|equal", r.note))
        if differ[i][0]:
            assert f"{differ[i][0]} of {differ[i][1]} differ" in picks.note
        else:
            assert f"all {differ[i][1]} equal" in picks.note


def test_routes_of_several_variants_share_one_float_model():
    f = _mixtral()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    batches = _batches()
    alone = ns.compare(f, q, batches, progress=False)
    both = ns.compare(f, {"a": q, "b": copy.deepcopy(q)}, batches, progress=False)
    for name in ("a", "b"):
        for mine, theirs in zip(both.variants[name].rows, alone.rows, strict=True):
            assert mine.name == theirs.name and mine.note == theirs.note
            assert mine.output_sqnr == theirs.output_sqnr
