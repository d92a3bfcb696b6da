"""The model output's metrics (compare's ``Report.model_output``, the built-in end metrics of
sensitivity and advise) read real tokens only when the batch's ``attention_mask`` holds
padding and fits the output's rows; the layer rows read every position, and a note says so.

Oracles: the two models run directly, their outputs masked by hand and compared in float64;
hybrids of sensitivity/advise re-made with ``quantize_dynamic`` of a name set.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import fxnumeric as ns
from fxnumeric.metrics import _CHUNK, Accumulator

transformers = pytest.importorskip("transformers")


def _bert() -> nn.Module:
    """A seeded 2-layer BERT whose padding token has an embedding of its own (a random init
    at 0.02 reads 69 dB, with padding or without alike)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, initializer_range=0.2)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[0] = torch.randn(32)
    return model


def _quantized(model: nn.Module, keep_float: tuple[str, ...] = ()) -> nn.Module:
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - set(keep_float)
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), names,
                                                  dtype=torch.qint8)


def _batches(padded: bool = True) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ((12, 5, 9), (12, 3, 12)):
        ids = torch.randint(1, 99, (3, 12), generator=g)
        mask = torch.ones_like(ids)
        if padded:
            for row, n in enumerate(lengths):
                mask[row, n:] = 0
                ids[row, n:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _outputs(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**b).last_hidden_state.double() for b in batches]


def _real(outputs: list[torch.Tensor], batches: list[dict]) -> torch.Tensor:
    """Every real token's row, all batches: the mask applied by hand."""
    return torch.cat([o[b["attention_mask"].bool()] for o, b in zip(outputs, batches,
                                                                      strict=True)])


def _sqnr(f: torch.Tensor, q: torch.Tensor) -> float:
    return 10 * math.log10(float(f.pow(2).sum()) / float((f - q).pow(2).sum()))


def test_model_output_reads_real_tokens_only():
    fm = _bert()
    qm = _quantized(fm)
    batches = _batches()
    f_out, q_out = _outputs(fm, batches), _outputs(qm, batches)
    f, q = _real(f_out, batches), _real(q_out, batches)
    every = _sqnr(torch.cat([o.reshape(-1) for o in f_out]),
                  torch.cat([o.reshape(-1) for o in q_out]))
    real = _sqnr(f, q)
    assert abs(every - real) > 0.5, (every, real)  # the padding weighs: the old value is another one
    report = ns.compare(fm, qm, batches)
    out = report.model_output
    assert out["sqnr"] == pytest.approx(real, abs=1e-4)
    cosine = float((f * q).sum() / (f.norm() * q.norm()))
    assert out["cosine"] == pytest.approx(cosine, abs=1e-6)
    assert out["mse"] == pytest.approx(float((f - q).pow(2).mean()), rel=1e-5)
    assert out["max_abs_error"] == pytest.approx(float((f - q).abs().max()), rel=1e-5)
    padded = sum(int((b["attention_mask"] == 0).sum()) for b in batches)
    note = next(n for n in report.notes if "real tokens only" in n)
    assert f"{padded} of its 72 positions" in note and "layer and block rows" in note
    # the layer rows are as they were: the last LayerNorm's row reads every position
    last = report.row("encoder.layer.1.output.LayerNorm")
    assert last.output["sqnr"] == pytest.approx(every, abs=1e-3)


def test_no_padding_no_change():
    fm = _bert()
    qm = _quantized(fm)
    batches = _batches(padded=False)
    f_out, q_out = _outputs(fm, batches), _outputs(qm, batches)
    every = _sqnr(torch.cat([o.reshape(-1) for o in f_out]),
                  torch.cat([o.reshape(-1) for o in q_out]))
    report = ns.compare(fm, qm, batches)
    assert report.model_output["sqnr"] == pytest.approx(every, abs=1e-4)
    assert not [n for n in report.notes if "real tokens" in n or "does not fit" in n]
    sens = ns.sensitivity(fm, qm, batches)
    assert sens.quantized == pytest.approx(every, abs=1e-4)


class _Pooled(nn.Module):
    """Hidden states pooled two tokens to one: ``(batch, tokens / 2, width)``, which the
    batch's mask of ``tokens`` positions does not fit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(99, 16)
        self.linear = nn.Linear(16, 16)

    def forward(self, input_ids, attention_mask):
        h = self.linear(self.embed(input_ids) * attention_mask.unsqueeze(-1))
        return h.reshape(h.shape[0], h.shape[1] // 2, 2, -1).mean(2)


def test_unfit_mask_is_noted_and_every_position_read():
    fm = _Pooled().eval()
    qm = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fm), {nn.Linear},
                                                dtype=torch.qint8)
    batches = _batches()
    with torch.no_grad():
        f = torch.cat([fm(**b).double().reshape(-1) for b in batches])
        q = torch.cat([qm(**b).double().reshape(-1) for b in batches])
    report = ns.compare(fm, qm, batches)
    assert report.model_output["sqnr"] == pytest.approx(_sqnr(f, q), abs=1e-4)
    note = next(n for n in report.notes if "does not fit" in n)
    assert "attention_mask [3, 12] does not fit the model output's positions [3, 6]" in note
    assert "(2 of 2 batches)" in note and "read every position" in note


def test_sensitivity_and_advise_read_real_tokens():
    fm = _bert()
    qm = _quantized(fm)
    batches = _batches()
    f_out = _outputs(fm, batches)
    f = _real(f_out, batches)

    def real_sqnr(model: nn.Module) -> float:
        return _sqnr(f, _real(_outputs(model, batches), batches))

    def every_sqnr(model: nn.Module) -> float:
        return _sqnr(torch.cat([o.reshape(-1) for o in f_out]),
                     torch.cat([o.reshape(-1) for o in _outputs(model, batches)]))

    sens = ns.sensitivity(fm, qm, batches)
    assert sens.quantized == pytest.approx(real_sqnr(qm), abs=1e-4)
    assert abs(every_sqnr(qm) - sens.quantized) > 0.5, every_sqnr(qm)
    for layer in sens.layers[:4]:  # all_but: the quantized model with that layer float
        assert layer.all_but == pytest.approx(real_sqnr(_quantized(fm, (layer.module,))),
                                              abs=1e-4), layer.module
    # a target the quantized model reaches over real tokens and not over every position
    target = (sens.quantized + every_sqnr(qm)) / 2
    assert sens.quantized > target > every_sqnr(qm)
    advice = ns.advise(fm, qm, batches, metric="sqnr", target=target)
    assert advice.reached and advice.keep_float == ()
    assert "already reaches" in advice.message
    # one step up: the layers it keeps float, re-quantized without them, read real tokens
    advice = ns.advise(fm, qm, batches, metric="sqnr", target=sens.quantized + 0.3)
    assert advice.keep_float
    assert advice.value == pytest.approx(real_sqnr(_quantized(fm, advice.keep_float)),
                                         abs=1e-4)


def test_min_cosine_reads_each_sample_over_real_tokens():
    fm = _bert()
    qm = _quantized(fm)
    batches = _batches()
    f_out, q_out = _outputs(fm, batches), _outputs(qm, batches)
    lowest = min(
        float(torch.nn.functional.cosine_similarity(fo[i][b["attention_mask"][i].bool()]
                                                    .reshape(-1),
                                                    qo[i][b["attention_mask"][i].bool()]
                                                    .reshape(-1), dim=0))
        for fo, qo, b in zip(f_out, q_out, batches, strict=True) for i in range(3))
    sens = ns.sensitivity(fm, qm, batches, metric="min_cosine")
    assert sens.quantized == pytest.approx(lowest, abs=1e-6)


@pytest.mark.parametrize("left", [False, True])
def test_accumulator_rows_against_float64(left):
    """Rows in chunks (a view where consecutive, a copy of the chunk's rows else) give the
    sums of the real rows, on an output larger than one chunk."""
    g = torch.Generator().manual_seed(2)
    width = 1000
    ref = torch.randn(3, 1200, width, generator=g)
    actual = ref + 0.01 * torch.randn(3, 1200, width, generator=g)
    rows = torch.ones(3, 1200, dtype=torch.bool)
    for i, n in enumerate((1200, 700, 13)):
        if left:
            rows[i, :1200 - n] = False
        else:
            rows[i, n:] = False
    assert rows.sum() * width > _CHUNK
    acc = Accumulator()
    acc.update(ref, actual, rows=rows)
    f, q = ref[rows].double(), actual[rows].double()
    assert acc.count == f.numel()
    assert acc.value("sqnr") == pytest.approx(_sqnr(f, q), abs=1e-4)
    assert acc.value("mse") == pytest.approx(float((f - q).pow(2).mean()), rel=1e-5)
    assert acc.value("max_abs_error") == pytest.approx(float((f - q).abs().max()), rel=1e-6)
    cosine = float((f * q).sum() / (f.norm() * q.norm()))
    assert acc.value("cosine") == pytest.approx(cosine, abs=1e-7)


def test_sensitivity_and_advise_say_what_of_the_output_the_end_metric_reads():
    """The end metric reads one of the tensors a BertModel returns (last_hidden_state, not
    pooler_output) and its real tokens only: Sensitivity and Advice said neither, where
    compare's report does."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, initializer_range=0.2)
    f = transformers.BertModel(config).eval()  # with its pooler: two tensors returned
    q = _quantized(f)
    data = _batches()
    with torch.no_grad():
        returned = [k for k, v in f(**data[0]).items() if isinstance(v, torch.Tensor)]
    assert returned == ["last_hidden_state", "pooler_output"]  # the oracle: what it returns
    masks = torch.cat([b["attention_mask"] for b in data])
    padded, positions = int((masks == 0).sum()), masks.numel()
    want = ("model output: the end metric reads `output['last_hidden_state']`, one of the 2 "
            "tensors the model returns (the first); the rest are not compared",
            f"model output: the end metric reads real tokens only (attention_mask): {padded} "
            f"of its {positions} positions ({padded / positions:.0%}) are padding, left out")
    sens = ns.sensitivity(f, q, data, progress=False)
    assert sens.notes == want
    assert sens.table().splitlines()[-2:] == [f"note: {n}" for n in want]
    advice = ns.advise(f, q, data, metric="sqnr", target=sens.quantized - 1, progress=False)
    assert advice.notes == want and all(f"note: {n}" in advice.summary() for n in want)
    report = ns.compare(f, q, data, progress=False)  # compare's own note, the same words
    assert any(n.startswith("model output: the metrics read `output['last_hidden_state']`")
               for n in report.notes)
