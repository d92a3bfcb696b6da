"""A traced graph is held to its module's own output on the first batch (capture.check).

torch.fx decides ``isinstance(x, torch.Tensor)`` on a Proxy (False) and silently keeps the
other branch. The oracles are the models themselves: SQNR computed directly from the two
models' real outputs, and each layer's output read by forward hooks.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import fxnumeric as ns
from fxnumeric.capture.check import check_whole


def _sqnr(ref: torch.Tensor, actual: torch.Tensor) -> float:
    ref, actual = ref.double(), actual.double()
    return 10 * math.log10(float((ref ** 2).sum() / ((ref - actual) ** 2).sum()))


class _Masked(nn.Module):
    """The guard of an optional mask that torch.fx reads as False."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.a(x)
        if isinstance(mask, torch.Tensor):
            h = h * mask
        return self.b(h)


class _Gated(nn.Module):
    """Untraceable whole (a data-dependent ``if``), holding a :class:`_Masked`."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = _Masked(), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.inner(x, mask)
        if h.sum() > -1e9:  # data-dependent: torch.fx cannot trace the root
            h = h + 1
        return self.out(h)


def _pair(model: nn.Module) -> tuple[nn.Module, nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    f = model.eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(8, 16, generator=g),
             "mask": (torch.rand(8, 16, generator=g) > 0.7).float()} for _ in range(2)]
    return f, q, data


def _hooked_outputs(model: nn.Module, path: str, data: list) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            for batch in data:
                model(**batch)
    finally:
        handle.remove()
    return seen


def _hooked_sqnr(f: nn.Module, q: nn.Module, path: str, data: list) -> float:
    return _sqnr(torch.cat(_hooked_outputs(f, path, data)),
                 torch.cat(_hooked_outputs(q, path, data)))


def test_whole_model_whose_trace_drops_a_branch_is_compared_as_it_runs():
    f, q, data = _pair(_Masked())
    report = ns.compare(f, q, data, progress=False)
    with torch.no_grad():
        direct = _sqnr(torch.cat([f(**b) for b in data]), torch.cat([q(**b) for b in data]))
    assert report.model_output["sqnr"] == pytest.approx(direct, abs=1e-4)
    assert report.row("b").output_sqnr == pytest.approx(_hooked_sqnr(f, q, "b", data), abs=1e-4)
    note = next(n for n in report.notes if "computes differently" in n)
    assert "`<root>`" in note and "_Masked" in note and "isinstance" in note


def test_region_whose_trace_drops_a_branch_is_kept_whole():
    f, q, data = _pair(_Gated())
    m = ns.match(f, q, example_inputs=data[0])
    reasons = dict(m.untraced)
    assert "computes differently from its forward" in reasons["inner"]
    assert "differs by up to" in reasons["inner"]
    assert "inner" not in {r.float_path for r in m.regions if not r.whole_module}
    report = ns.compare(f, q, data, progress=False)
    for path in ("inner.a", "inner.b", "out"):
        assert report.row(path).output_sqnr == pytest.approx(
            _hooked_sqnr(f, q, path, data), abs=1e-4), path
    with torch.no_grad():
        direct = _sqnr(torch.cat([f(**b) for b in data]), torch.cat([q(**b) for b in data]))
    assert report.model_output["sqnr"] == pytest.approx(direct, abs=1e-4)
    assert any("`inner`" in n and "computes differently" in n for n in report.notes)


def test_graphs_that_compute_as_their_modules_are_kept():
    """No note where the trace is right: the same model without the isinstance guard, and a
    model whose dropout runs in training mode (both runs see the same random numbers)."""
    f, q, data = _pair(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    data = [b["x"] for b in data]
    m = ns.match(f, q, example_inputs=data[0])
    assert m.whole_graph and not m.capture_notes
    dropped = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5)).train()
    assert check_whole(dropped, ns.trace(dropped), data[0], which="float", fix="") is None


def _t5_fp16(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                   num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # from_pretrained in float16 keeps `wo` in float32 (T5's _keep_in_fp32_modules)
        f = transformers.T5ForConditionalGeneration.from_pretrained(
            tmp_path, dtype=torch.float16).eval()
    assert f.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    q = copy.deepcopy(f)
    torchao = pytest.importorskip("torchao.quantization")
    torchao.quantize_(q, torchao.Int8WeightOnlyConfig(), filter_fn=lambda m, name: (
        isinstance(m, nn.Linear) and name != "lm_head"))
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    return f, q, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]


def test_t5_fp16_feed_forward_compared_and_searchable(tmp_path):
    f, q, data = _t5_fp16(tmp_path)
    report = ns.compare(f, q, data, progress=False)
    ff = "encoder.block.0.layer.1.DenseReluDense"
    for path in (f"{ff}.wi", f"{ff}.wo", "decoder.block.0.layer.2.DenseReluDense.wo"):
        assert report.row(path).output_sqnr == pytest.approx(
            _hooked_sqnr(f, q, path, data), abs=1e-3), path
    assert any(f"`{ff}`" in n and "fails where its forward ran" in n for n in report.notes)
    found = ns.sensitivity(f, q, data, progress=False)
    assert not found.failed


class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x))


class _Branchy(nn.Module):
    """Untraceable whole, holding a traceable :class:`_Plain`."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.out = _Plain(), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        if h.sum() > -1e9:  # data-dependent: torch.fx cannot trace the root
            h = h + 1
        return self.out(h)


def test_a_region_with_hooks_of_its_own_is_kept():
    """The graph runs its module's own hooks (a pre-hook that scales the input): it is checked
    on the inputs before that hook, so it computes as the module does and stays a region."""
    torch.manual_seed(0)
    f = _Branchy().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    for model in (f, q):
        model.inner.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    m = ns.match(f, q, example_inputs=torch.randn(4, 16))
    assert "inner" in {r.float_path for r in m.regions}
    assert "inner" not in dict(m.untraced) and not m.capture_notes


class _MaskedIfGiven(_Masked):
    """:class:`_Masked` with the traceable guard."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.a(x)
        if mask is not None:
            h = h * mask
        return self.b(h)


def test_quantized_graph_that_drops_a_branch_is_found_on_its_side():
    f, _, data = _pair(_MaskedIfGiven())
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    q.__class__ = _Masked  # the same model, quantized from code with the isinstance guard
    report = ns.compare(f, q, data, progress=False)
    with torch.no_grad():
        direct = _sqnr(torch.cat([f(**b) for b in data]), torch.cat([q(**b) for b in data]))
    assert report.model_output["sqnr"] == pytest.approx(direct, abs=1e-4)
    assert any(n.startswith("capture (quantized): `<root>`: the quantized _Masked's graph")
               for n in report.notes), report.notes
