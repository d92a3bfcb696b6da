"""compare's data handling (labelled loaders, one tensor) and progress (notebooks, phases)."""

from __future__ import annotations

import copy
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import fxnumeric as ns
from fxnumeric.progress import Progress, enabled_by_default, phase


def _pair():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return f, torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})


def _loader():
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, 16, generator=gen),
                         torch.randint(0, 4, (12,), generator=gen))
    return DataLoader(data, batch_size=4)


def test_labelled_loader_error_suggests_inputs():
    f, q = _pair()
    with pytest.raises(ns.InputError, match=r"looks like \(inputs, labels\).*Fix: compare\(\.\.\., "
                       r"inputs=0\)"):
        ns.compare(f, q, _loader())


def test_inputs_picks_the_model_inputs_from_each_batch():
    f, q = _pair()
    by_index = ns.compare(f, q, _loader(), inputs=0)
    by_function = ns.compare(f, q, _loader(), inputs=lambda batch: batch[0])
    unlabelled = ns.compare(f, q, [x for x, _ in _loader()])
    assert by_index.batches == by_function.batches == unlabelled.batches == 3
    assert by_index.model_output == unlabelled.model_output == by_function.model_output
    with pytest.raises(ns.InputError, match="inputs=5 cannot index a batch"):
        ns.compare(f, q, _loader(), inputs=5)


def test_a_single_tensor_is_one_batch():
    f, q = _pair()
    x = torch.randn(8, 16)
    one = ns.compare(f, q, x)
    assert one.batches == 1
    assert one.model_output == ns.compare(f, q, [x]).model_output


class _Keyword(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(x)


def test_a_single_dict_of_keyword_inputs_is_one_batch():
    # it was read as a batch per key: "batch 0 is a str ('x') ... (tokenize text first)"
    torch.manual_seed(0)
    f = _Keyword().eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    batch = {"x": torch.randn(4, 16)}
    one = ns.compare(f, q, batch, progress=False)
    assert one.batches == 1
    assert one.model_output == ns.compare(f, q, [batch], progress=False).model_output
    assert ns.sensitivity(f, q, batch, "sqnr", progress=False).layers
    assert ns.diagnose(f, q, batch, progress=False).batches == 1


def test_progress_shows_in_a_notebook_and_names_the_long_phases(monkeypatch, capsys):
    f, q = _pair()
    assert not enabled_by_default()  # pytest's stderr is not a terminal
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert enabled_by_default()  # a Jupyter kernel: stderr is never a terminal there
    ns.compare(f, q, [torch.randn(2, 16) for _ in range(3)])
    err = capsys.readouterr().err
    assert "tracing and pairing the models ..." in err
    assert "comparing batches" in err and "3/3" in err
    assert "comparing weights ..." in err
    ns.compare(f, q, [torch.randn(2, 16)], matching=ns.match(f, q))
    assert "tracing" not in capsys.readouterr().err  # nothing is traced for a given matching
    ns.compare(f, q, [torch.randn(2, 16)], progress=False)
    assert capsys.readouterr().err == ""


def test_progress_without_tqdm_writes_a_plain_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    with Progress(2, "calibrating", enabled=True) as bar:
        bar.update()
        bar.update()
    assert re.search(r"\rcalibrating: 2/2 batch  \d+\.\ds\n$", capsys.readouterr().err)
    with phase("tracing", enabled=True):
        pass
    assert capsys.readouterr().err.startswith("tracing ... ")


# ---------------------------------------------------------------- inputs validated before work


def _counting(model: nn.Module) -> list[int]:
    """Count the model's forward calls (a hook on the module the graph is traced from)."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_nan_batch_is_left_out_with_a_warning_naming_it():
    f, q = _pair()
    good = [torch.randn(4, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    nan = good[1].clone()
    nan[0, 3] = float("nan")
    inf = good[2].clone()
    inf[1, 0] = float("inf")
    with pytest.warns(ns.FxNumericWarning) as caught:
        report = ns.compare(f, q, [good[0], nan, good[1], inf])
    assert [str(w.message) for w in caught if issubclass(w.category, ns.FxNumericWarning)] == [
        f"batch {i} holds NaN/Inf (in batch): it is left out of every metric (Report.notes "
        "lists the batches left out)" for i in (1, 3)]
    # in a dict batch, the warning names the field that holds it (an additive mask's -inf)
    from fxnumeric.run import nonfinite_inputs

    ids = {"x": good[0], "mask": torch.tensor([0.0, float("-inf")])}
    assert nonfinite_inputs(ids) == ["batch['mask']"]
    assert report.batches == 2 and report.skipped_batches == (1, 3)
    assert ns.Report.from_json(report.to_json()).skipped_batches == (1, 3)
    assert ("2 of 4 batches left out of every metric: their input holds NaN/Inf (batch 1, 3)"
            in report.notes)
    clean = ns.compare(f, q, good[:2])
    assert report.model_output == clean.model_output  # the NaN batch touched no sum
    assert [r.shadow for r in report.rows] == [r.shadow for r in clean.rows]
    assert "2 batches (2 more left out: NaN/Inf in the input)" in report.summary()


def test_only_nan_batches_is_an_input_error():
    f, q = _pair()
    # refused before tracing: no batch is left to be the capture's example
    with pytest.raises(ns.InputError, match=r"every batch holds NaN/Inf \(2 batches\).*\nFix:"):
        ns.compare(f, q, [torch.full((2, 16), float("nan"))] * 2)


def _poison_bias(linear: nn.Module) -> None:
    """A quantized (dynamic) Linear whose bias holds NaN: it makes NaN from finite input."""
    bias = linear.bias().clone()
    bias[0] = float("nan")
    linear.set_weight_bias(linear.weight(), bias)


def test_nan_made_inside_a_model_is_traced_to_its_first_layer_and_names_no_culprit():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 4)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(4, 16) for _ in range(3)]
    _poison_bias(q[4])  # the last: a dynamic Linear cannot even quantize a NaN input
    report = ns.compare(f, q, data)
    assert report.nonfinite == (("quantized", "4"),)
    assert ("NaN/Inf first appears at 4 in the quantized model (float model: finite): the "
            "metrics after it are poisoned") in report.notes
    assert report.culprit is None and report.verdict.kind == "poisoned"
    assert ("no culprit named: NaN/Inf inside the model poison the sums (first at 4 in the "
            "quantized model)") in report.summary()
    with torch.no_grad():
        f[2].bias[0] = float("inf")  # and the float model overflows, earlier
    both = ns.compare(f, q, data)
    assert both.nonfinite == (("quantized", "4"), ("float", "2"))
    assert ns.Report.from_json(both.to_json()).nonfinite == both.nonfinite
    assert ("NaN/Inf first appears at 4 in the quantized model and at 2 in the float model: "
            "the metrics after it are poisoned") in both.notes
    assert both.culprit is None


@pytest.mark.parametrize("data,message", [
    (None, r"data is None: pass an iterable of batches .*\nFix: "),
    (5, r"data is an int, not an iterable of batches"),
    ([torch.randn(0, 16)], r"batch 0 holds an empty tensor \(the batch: shape \[0, 16\]\): "
                           r"metrics over no values mean nothing .*\nFix: leave empty batches"),
    ([torch.randn(2, 16), (torch.randn(0, 16),)],
     r"batch 1 holds an empty tensor \(batch\[0\]: shape \[0, 16\]\)"),
    (["a sentence"], r"batch 0 is a str \('a sentence'\): a batch must be a tensor, a tuple or "
                     r"list of positional inputs, or a dict of keyword inputs.*\nFix: "),
    ([torch.randn(2, 16), 7], r"batch 1 is an int \(7\): a batch must be a tensor"),
    ([["a", "b"]], r"batch 0 is a list of str with no tensor: a batch must be a tensor"),
    ([None], r"batch 0 is None: a batch must be a tensor"),
])
def test_batches_that_cannot_be_batches_are_input_errors_before_any_model_runs(data, message):
    f, q = _pair()
    calls = _counting(f), _counting(q)
    with pytest.raises(ns.InputError, match=message):
        ns.compare(f, q, data)
    if data is not None and not isinstance(data, int) and len(data) == 1:
        assert [c[0] for c in calls] == [0, 0]  # refused before tracing runs anything


def test_check_batch_and_nonfinite_inputs_are_reusable():
    from fxnumeric.run import check_batch, nonfinite_inputs

    check_batch({"input_ids": torch.ones(2, 3, dtype=torch.long)}, 0)
    check_batch((torch.ones(1, 4), (torch.zeros(2, 1, 8), torch.zeros(2, 1, 8))), 0)
    with pytest.raises(ns.InputError, match=r"batch 4 is a dict of str with no tensor"):
        check_batch({"text": "hello"}, 4)
    assert nonfinite_inputs((torch.ones(2), {"m": torch.tensor([0.0, -float("inf")])}))
    assert not nonfinite_inputs((torch.ones(2), torch.tensor([1, 2])))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


def test_models_with_nothing_paired_are_refused_before_any_batch_runs():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    cnn = _CNN().eval()
    prepared = prepare_fx(copy.deepcopy(cnn), get_default_qconfig_mapping(), (x,))
    prepared(x)
    q_cnn = convert_fx(prepared)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).eval()
    calls = _counting(mlp)
    with pytest.raises(ns.InputError, match=r"nothing paired: no compute op of the float model "
                       r"\(Sequential\) was found in the quantized model \(GraphModule\).*\n"
                       r"Fix: pass the float model the quantized one was made from"):
        ns.compare(mlp, q_cnn, [x])
    # no batch ran: the two forwards are the check of mlp's traced graph (mlp, then its graph)
    assert calls[0] == 2


def test_the_quantized_model_passed_twice_is_refused_before_any_batch_runs():
    f, q = _pair()
    data = [torch.randn(2, 16)]
    calls = _counting(q)
    with pytest.raises(ns.InputError, match=r"the same Sequential object was passed as "
                       r"float_model and quant_model.*\nFix: keep the float model"):
        ns.compare(q, q, data)
    with pytest.raises(ns.InputError, match=r"the float model is quantized too: it computes 2 "
                       r"quantized ops or quantize nodes \(`_0`, `_2`\).*passed twice\?\nFix: "):
        ns.compare(copy.deepcopy(q), q, data)
    # no batch ran: the forwards are the check of each traced graph (the copy carries the hook)
    assert calls[0] == 4


def test_max_batches_reads_no_batch_past_the_last():
    f, q = _pair()
    data = iter([torch.randn(4, 16) for _ in range(5)])
    assert ns.compare(f, q, data, max_batches=2, progress=False).batches == 2
    assert len(list(data)) == 3  # the caller's iterator gave up two batches, not three


def test_max_batches_that_is_no_positive_int_is_refused_before_any_batch_is_read():
    """``max_batches=-1`` and ``2.5`` raised itertools.islice's bare ValueError, and ``0`` said
    "data yielded no batches", blaming the data."""
    f, q = _pair()
    batches = [torch.randn(4, 16) for _ in range(3)]
    for bad in (0, -1, 2.5, "2", True):
        data = iter(batches)
        with pytest.raises(ns.InputError, match=rf"max_batches={re.escape(repr(bad))}: pass a "
                           "positive number of batches to compare \\(an int\\), or None"):
            ns.compare(f, q, data, max_batches=bad, progress=False)
        assert len(list(data)) == 3  # refused before reading the caller's data
    for good, read in ((None, 3), (1, 1), (np.int64(2), 2), (10, 3)):
        assert ns.compare(f, q, batches, max_batches=good, progress=False).batches == read


def test_a_nan_first_batch_of_a_module_tree_model_is_left_out_not_run_by_the_capture():
    """A Hugging Face model is captured through its module tree, which runs the first batch:
    a NaN there made the quantized model fail (InputError: ChooseQuantizationParams) where the
    same batch in second place is left out. The capture now runs the first finite batch.
    Oracle: the logits' SQNR computed directly on the finite batch."""
    pytest.importorskip("transformers")
    from fxnumeric.zoo_llm import tiny_llama

    f = tiny_llama(vocab_size=128)
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    gen = torch.Generator().manual_seed(3)
    mask = torch.ones(2, 12, dtype=torch.long)
    clean = {"inputs_embeds": torch.randn(2, 12, 64, generator=gen), "attention_mask": mask}
    embeds = torch.randn(2, 12, 64, generator=gen)
    embeds[0, 0, 0] = float("nan")
    bad = {"inputs_embeds": embeds, "attention_mask": mask}
    read = []

    def batches():  # an iterator: the batches read ahead for the capture are compared too
        for batch in (bad, clean):
            read.append(batch)
            yield batch

    with pytest.warns(ns.FxNumericWarning, match="batch 0 holds NaN/Inf"):
        report = ns.compare(f, q, batches())
    assert report.batches == 1 and report.skipped_batches == (0,) and len(read) == 2
    with torch.no_grad():
        ref, actual = f(**clean).logits.double(), q(**clean).logits.double()
    sqnr = 10 * torch.log10((ref ** 2).sum() / ((ref - actual) ** 2).sum()).item()
    assert report.model_output["sqnr"] == pytest.approx(sqnr, abs=1e-4)
    clean_only = ns.compare(f, q, [clean])
    assert [(r.name, r.shadow) for r in report.rows] == [(r.name, r.shadow)
                                                        for r in clean_only.rows]
    with pytest.raises(ns.InputError, match=r"every batch holds NaN/Inf \(2 batches\).*\nFix:"):
        ns.compare(f, q, [bad, bad])
    with pytest.raises(ns.InputError, match=r"every batch holds NaN/Inf \(1 batches\)"):
        ns.compare(f, q, iter([bad, clean]), max_batches=1)
