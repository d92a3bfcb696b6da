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


class _Heads(nn.Module):
    """A box head torch.fx cannot trace (a branch on a value), run on a list of proposals
    sorted by score, as torchvision's RoIHeads is."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, proposals: list[torch.Tensor]):
        rows = torch.cat(proposals)
        if rows.abs().sum() > 0:
            rows = rows * 1.0
        return self.fc(rows)


class _TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.score, self.box, self.heads = nn.Linear(8, 1), nn.Linear(8, 4), _Heads()

    def forward(self, x):
        order = self.score(x).squeeze(-1).argsort(descending=True)
        return self.heads([self.box(x)[order]])


def _two_stage(reordered: bool):
    """``(float, quantized, data, local SQNR, output SQNR)`` of :class:`_TwoStage`, the
    scorer quantized too (``reordered``) or only the head; the SQNRs by forward hooks: the
    float head's fc fed the quantized fc's input, and the two fcs' outputs row by row."""
    torch.manual_seed(0)
    f = _TwoStage().eval()
    q = copy.deepcopy(f)
    if reordered:
        q = torch.ao.quantization.quantize_dynamic(q, {nn.Linear})
    else:
        q.heads.fc = torch.ao.quantization.quantize_dynamic(nn.Sequential(q.heads.fc),
                                                            {nn.Linear})[0]
    data = [torch.randn(32, 8) for _ in range(3)]
    seen: dict[str, list] = {"float": [], "quant": []}
    hooks = [m.heads.fc.register_forward_hook(lambda _m, i, o, side=side: seen[side].append(
        (i[0], o))) for m, side in ((f, "float"), (q, "quant"))]
    with torch.no_grad():
        for x in data:
            f(x), q(x)
        for h in hooks:
            h.remove()
        local = _pooled([(f.heads.fc(i), o) for i, o in seen["quant"]])
        output = _pooled([(fo, qo) for (_, fo), (_, qo) in zip(seen["float"], seen["quant"],
                                                               strict=True)])
    return f, q, data, local, output


@pytest.mark.parametrize("reordered", [True, False])
def test_a_box_head_is_compared_only_where_the_proposals_come_in_the_same_order(reordered):
    """A quantized scorer reorders near-tied proposals: row i of the box head is another
    region on each side, and its output SQNR read the reorder. Those batches are now left
    out of its output comparison, as a misrouted expert's are; with the scorer float the
    proposals come alike and the rows compare as forward hooks read them. The shadow reads
    the quantized head's own rows either way (hooks: the float fc fed them)."""
    f, q, data, shadow, output = _two_stage(reordered)
    report = ns.compare(f, q, data, progress=False)
    row = report.row("heads.fc")
    assert row.shadow_sqnr == pytest.approx(shadow, abs=1e-4)
    if reordered:
        assert shadow - output > 10  # what the rows read compared index by index
        assert row.output_sqnr is None
        assert "3 batches left out: `heads` routed its rows unlike the float model" in row.note
    else:
        assert row.output_sqnr == pytest.approx(output, abs=1e-4)
        assert "routed" not in row.note


def _pooled(pairs) -> float:
    signal = sum(float(ref.double().square().sum()) for ref, _ in pairs)
    noise = sum(float((ref.double() - out.double()).square().sum()) for ref, out in pairs)
    return 10 * math.log10(signal / noise)


@pytest.mark.parametrize("reordered", [True, False])
def test_diagnose_reads_no_cumulative_error_from_proposals_routed_otherwise(reordered):
    """diagnose compared the box head's rows index by index as compare did, and on a
    Faster R-CNN named its flatten the first op below the threshold, amplifying. Where the
    proposals come in another order it now reads no cumulative error there; where they come
    alike, the forward hooks' value. Its local error is the shadow's either way."""
    f, q, data, local, output = _two_stage(reordered)
    d = ns.diagnose(f, q, data, progress=False, threshold_db=local - 5)
    fc = d.layer("heads.fc")
    assert fc.local_sqnr == pytest.approx(local, abs=1e-4)
    if reordered:
        assert local - output > 10
        assert fc.cumulative_sqnr is None and d.first_below != "heads.fc"
    else:
        assert fc.cumulative_sqnr == pytest.approx(output, abs=1e-4)


def test_boxes_that_tie_or_repeat_are_not_read_as_reordered():
    """Padding rows (equal boxes) made the nearest box of each row the first of its equals,
    and every batch of a model whose inputs were the same on both sides was left out as
    misrouted (hooks: 42.4 dB); boxes that round a little apart, but stay nearest their own
    index within the ratio, are alike too. A real reorder is not."""
    from fxnumeric.routing import _same_order

    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert _same_order(boxes, boxes.clone())
    rounded = boxes + 0.01 * torch.randn(boxes.shape, generator=torch.Generator().manual_seed(0))
    assert _same_order(boxes, rounded)
    assert not _same_order(boxes, rounded[[1, 0, 2, 3]])
