"""compare's data handling (labelled loaders, one tensor) and progress (notebooks, phases)."""

from __future__ import annotations

import copy
import re
import sys
import types

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
