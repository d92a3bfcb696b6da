"""Reports saved and loaded: every field of every report dataclass round-trips bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import struct
import typing
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest
import torch
from torch import nn

import fxnumeric as ns
from fxnumeric.errors import InputError
from fxnumeric.report import Report, ReportRow, Thresholds, WeightHistogram, check_report
from fxnumeric.report.persist import SCHEMA

# every kind of float a report can hold, bit patterns included: the generator cycles through them
_FLOATS = (1 / 3, -0.0, math.inf, -math.inf, math.nan, -math.nan, 5e-324, 1e308, 0.1 + 0.2)


class _Values:
    """Non-default values for any type hint a report dataclass uses, different every call."""

    def __init__(self) -> None:
        self.n = count(1)

    def __call__(self, hint, depth: int = 0):
        k = next(self.n)
        options = typing.get_args(hint) if typing.get_origin(hint) in (
            typing.Union, __import__("types").UnionType) else None
        if options:
            return self(next(o for o in options if o is not type(None)), depth)
        if dataclasses.is_dataclass(hint):
            return self.instance(hint, depth + 1)
        if hint is float:
            return _FLOATS[k % len(_FLOATS)]
        if hint is int:
            return k + 6
        if hint is str:
            return f"s{k}"
        if hint is bool:
            return True
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is tuple or (origin is tuple and not args):  # ReportRow.activations: raw tensors
            return (torch.ones(2),)
        if origin is tuple and args[-1] is Ellipsis:
            return () if depth > 2 else tuple(self(args[0], depth) for _ in range(2))
        if origin is tuple:
            return tuple(self(a, depth) for a in args)
        if origin is dict:
            return {} if depth > 2 else {f"k{k}": self(args[1], depth), "kl": self(args[1], depth)}
        raise AssertionError(f"no test value for {hint}: extend _Values")

    def instance(self, cls, depth: int = 0):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: self(hints[f.name], depth) if "json_choices" not in f.metadata
                      else next(c for c in f.metadata["json_choices"] if c != f.default)
                      for f in dataclasses.fields(cls)})


def _bits(x: float) -> bytes:
    return struct.pack(">d", x)


def _same(a, b, where: str = "report") -> None:
    """``a`` and ``b`` are equal, floats bit for bit (so nan equals nan of the same sign)."""
    if isinstance(a, str):  # torch.__version__ is a str subclass; JSON gives a str back
        assert isinstance(b, str) and str(a) == str(b), f"{where}: {a!r} != {b!r}"
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, float):
        assert _bits(a) == _bits(b), f"{where}: {a!r} != {b!r}"
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            _same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _differs_from_default(obj, where: str = "report") -> None:
    """Every field of ``obj`` (and of the dataclasses inside it) is set to a non-default value."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            assert value != f.default and value is not f.default, f"{where}.{f.name} is default"
        if f.default_factory is not dataclasses.MISSING:
            assert value != f.default_factory(), f"{where}.{f.name} is default"
        for item in (value if isinstance(value, tuple) else (value,)):
            if dataclasses.is_dataclass(item):
                _differs_from_default(item, f"{where}.{f.name}")


def _without_activations(report: Report) -> Report:
    """``report`` as loaded back: no raw tensors, in its variants' rows either."""
    return dataclasses.replace(report, rows=tuple(dataclasses.replace(r, activations=None)
                                                  for r in report.rows),
                               variants={k: _without_activations(v)
                                         for k, v in report.variants.items()})


def test_every_field_of_every_report_dataclass_round_trips_bit_for_bit():
    """Walks dataclasses.fields: a field added later is covered with no change here."""
    report = _Values().instance(Report)
    _differs_from_default(report)
    fields = {f.name for f in dataclasses.fields(ReportRow)}
    assert {"floor_sqnr", "flags", "weight_histogram", "float_rms", "note"} <= fields
    assert report.rows[0].activations is not None
    text = report.to_json()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    loaded = Report.from_json(text)
    _same(loaded, _without_activations(report))  # raw tensors are never saved
    assert loaded.rows[0].activations is None
    _same(Report.from_dict(report.to_dict()), loaded)
    _same(Report.from_json(loaded.to_json(indent=None)), loaded)
    assert loaded.to_json() == text


def test_floats_keep_their_bits_and_specials_are_strings():
    row = ReportRow("fc", "linear", True, -0.0, {"sqnr": math.inf, "mse": 5e-324},
                    {"sqnr": -math.nan, "cosine": math.nan}, floor_sqnr=0.1 + 0.2)
    report = Report((row,), ("sqnr",), ("outputs",), 1, {"sqnr": -math.inf, "kl": 1e308})
    data = json.loads(report.to_json())
    layer = data["layers"][0]
    assert layer["weight_sqnr"] == 0.0 and math.copysign(1, layer["weight_sqnr"]) < 0
    assert layer["output"] == {"sqnr": "inf", "mse": 5e-324}
    assert layer["shadow"] == {"sqnr": "-nan", "cosine": "nan"}
    assert layer["floor_sqnr"] == 0.30000000000000004
    assert data["model_output"] == {"sqnr": "-inf", "kl": 1e308}
    _same(Report.from_json(report.to_json()), report)
    # == holds across the round trip with NaN in it (NaN != NaN made it False), and still
    # tells a NaN from a number
    assert Report.from_json(report.to_json()) == report
    other = dataclasses.replace(row, shadow={"sqnr": 1.0, "cosine": math.nan})
    assert dataclasses.replace(report, rows=(other,)) != report
    assert row == Report.from_json(report.to_json()).rows[0]


def test_human_readable_keys_and_lists_of_numbers_on_one_line():
    hist = WeightHistogram(-1.0, 1.0, (0, 3, 1), (1, 2, 1))
    row = ReportRow("conv1", "conv2d", True, 40.0, {"sqnr": 30.0}, {"sqnr": 35.0},
                    weight_histogram=hist)
    report = Report((row,), ("sqnr",), ("weights", "outputs", "shadows"), 2, {"sqnr": 30.0},
                    unmatched=(("add_1", "float", "no quantized twin"),))
    text = report.to_json()
    data = json.loads(text)
    assert list(data)[:3] == ["schema", "summary", "worst_layer"]
    assert data["schema"] == SCHEMA == 2
    assert data["summary"] == report.summary() and data["worst_layer"] == "conv1"
    assert data["layers"][0]["degenerate"] is False
    assert data["unmatched"] == [{"node": "add_1", "side": "float", "reason": "no quantized twin"}]
    assert '"float_counts": [0, 3, 1],' in text


# A later Report with nested reports and a row with per-batch spreads: the same code saves
# them. (Report.variants itself was such a field; it arrived with no code in persist.py.)
@dataclass(frozen=True)
class _SpreadRow(ReportRow):
    output_spread: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _LaterReport(Report):
    rows: tuple[_SpreadRow, ...] = field(metadata={"json": "layers"})
    baselines: dict[str, Report] = field(default_factory=dict)


def test_fields_added_later_round_trip_with_no_extra_code():
    report = _Values().instance(_LaterReport)
    _differs_from_default(report)
    assert report.baselines and all(isinstance(v, Report) for v in report.baselines.values())
    data = json.loads(report.to_json())
    assert "schema" not in next(iter(data["baselines"].values()))  # once, at the top
    assert "schema" not in next(iter(data["variants"].values()))
    _same(_LaterReport.from_json(report.to_json()), dataclasses.replace(
        _without_activations(report),
        baselines={k: _without_activations(v) for k, v in report.baselines.items()}))
    with pytest.raises(InputError, match="unknown key 'baselines' for a Report .* newer"):
        Report.from_json(report.to_json())


def test_a_real_report_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    report = ns.compare(f, q, [torch.randn(4, 16) for _ in range(3)], keep_activations=True)
    path = tmp_path / "report.json"
    report.to_json(path)
    for source in (path, str(path), path.read_text()):
        loaded = Report.from_json(source)
        _same(loaded, _without_activations(report))
    assert loaded.row("2").weight_histogram.float_counts == report.row("2").weight_histogram.float_counts
    assert loaded.table() == report.table() and loaded.summary() == report.summary()


def _data() -> dict:
    row = ReportRow("fc", "linear", True, 40.0, {"sqnr": 30.0}, {"sqnr": 35.0})
    return Report((row,), ("sqnr",), ("outputs",), 1, {"sqnr": 30.0}).to_dict()


def test_an_older_file_without_a_later_field_loads_with_its_default():
    data = _data()
    del data["layers"][0]["floor_sqnr"], data["notes"]
    loaded = Report.from_dict(data)
    assert loaded.rows[0].floor_sqnr is None and loaded.notes == ()


# Files written by fxnumeric at f58acdd (report schema 1, before reference_rms and spread):
# 3 batches each; in _tiny, layer 2's weights are x1e-7 (float RMS 3.2e-8) and layer 3's x1e7.
_OLD = Path(__file__).parent / "data"


def test_a_schema_1_file_keeps_the_collapse_it_saved():
    text = (_OLD / "report_schema1_f58acdd_tiny.json").read_text()
    saved = json.loads(text)
    # the oracle: what the fxnumeric that wrote it said, and its rule (float RMS < 1e-6)
    assert [layer["degenerate"] for layer in saved["layers"]] == [False, True, False]
    assert [layer["float_rms"] < 1e-6 for layer in saved["layers"]] == [False, True, False]
    report = Report.from_json(text)
    assert [r.degenerate for r in report.rows] == [False, True, False]  # [F, F, F] before
    assert report.culprit is None and report.worst_layer.name == "3"  # "2" (0.00 dB) before
    assert report.row("2").shadow_sqnr == 0.0
    assert "float signal collapsed in 1 layer (as the older fxnumeric" in report.summary()
    assert "as the older fxnumeric that saved this report judged it" in report.row("2").notes
    # the gate does not judge a layer the file calls collapsed (it failed at 0.00 dB before)
    result = check_report(report, Thresholds.from_dict({"layers": {"min_shadow_sqnr": 30}}))
    assert result.passed and result.skipped == ("2",)
    # the data given is not changed; saved again, the report is schema 2 and loads the same
    assert Report.from_dict(saved) == report and "legacy_degenerate" not in saved["layers"][1]
    again = json.loads(report.to_json())
    assert again["schema"] == 2 and again["layers"][1]["legacy_degenerate"] is True
    assert Report.from_json(report.to_json()) == report
    # a variant of a schema 1 file is brought up too
    nested = {**saved, "variants": {"a": {k: v for k, v in saved.items() if k != "schema"}}}
    variant = Report.from_dict(nested).variants["a"]
    assert [r.degenerate for r in variant.rows] == [False, True, False]


def test_a_schema_1_file_with_reference_rms_is_judged_by_it():
    row = ReportRow("fc", "linear", True, 40.0, {"sqnr": 3.0}, {"sqnr": 3.0}, float_rms=1e-9,
                    reference_rms=1.0)
    data = Report((row,), ("sqnr",), ("outputs",), 1, {"sqnr": 30.0}).to_dict()
    data["schema"] = 1
    data["layers"][0]["degenerate"] = False  # edited: the row's own numbers say collapsed
    loaded = Report.from_dict(data)
    assert loaded.rows[0].degenerate and loaded.rows[0].legacy_degenerate is None


def test_a_file_without_spreads_does_not_claim_one_batch():
    text = (_OLD / "report_schema1_f58acdd_make.json").read_text()
    report = Report.from_json(text)
    assert report.batches == json.loads(text)["batches"] == 3
    assert all(r.spread == {} for r in report.rows)
    assert "1 batch" not in report.verdict.text  # "1 batch: no spread across ..." before
    assert ("3 batches, but no per-batch spread in this report (saved by an older fxnumeric): "
            "no spread across batches to tell near ties") in report.verdict.text


def _edited(edit) -> str:
    data = _data()
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize("text, message", [
    ("not json at all", r"report\.json is not JSON \(Expecting value at line 1, column 1\)"),
    ('{"schema": 1, "layers": [', r"is not JSON .*Fix: pass a file written by Report\.to_json"),
    ("[1, 2]", r"is not an fxnumeric report: it holds a list"),
    ('{"summary": "old", "layers": []}', r"no \"schema\" key .*Fix: rerun `fxnumeric report"),
    (_edited(lambda d: d.update(schema=3)),
     r"written by a newer fxnumeric \(report schema 3; this one reads schema 2 and older\)\. "
     r"Fix: upgrade fxnumeric"),
    (_edited(lambda d: d.update(schema="1")), r"\"schema\" must be a positive integer"),
    (_edited(lambda d: d["layers"][0]["output"].update(sqnr="abc")),
     r"layers\[0\]\.output\.sqnr: expected a number \(or \"inf\", \"-inf\", \"nan\"\), got a "
     r"string \(\"abc\"\)\. Fix:"),
    (_edited(lambda d: d["layers"][0].update(quantized=1)), r"layers\[0\]\.quantized: expected bool"),
    (_edited(lambda d: d.pop("batches")), r"batches: missing \(a Report needs it\)"),
    (_edited(lambda d: d.update(batches=-3)),  # loaded before, and read "-3 batches"
     r"batches: expected a count of at least 0, got -3\. Fix:"),
    (_edited(lambda d: d["layers"][0].update(bogus=1)),
     r"layers\[0\]: unknown key 'bogus' for a ReportRow"),
    (_edited(lambda d: d.update(unmatched=[{"node": "x"}])),
     r"unmatched\[0\]: expected an object with keys node, side, reason"),
    (_edited(lambda d: d.update(unmatched=[{"node": "x", "side": "float", "reason": 3}])),
     r"unmatched\[0\]\.reason: expected str, got a number \(3\)"),  # unmatched[0][2] before
    (_edited(lambda d: d.update(logits_per="banana")),  # loaded before
     r"logits_per: expected one of 'token', 'sample', got a string \(\"banana\"\)\. Fix:"),
    (_edited(lambda d: d["model_output"].update(sqnr=10 ** 400)),  # a bare OverflowError before
     r"model_output\.sqnr: an integer too large for a float \(above 1\.8e308; infinity is "),
    ('{"schema": 2, "batches": 1' + "0" * 5000 + "}", r"a number in it cannot be read \(.*4300"),
])
def test_garbage_gives_an_input_error_that_says_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "report.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        Report.from_json(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(InputError, match=r"no report file '.*nope\.json'\. Fix: pass a file"):
        Report.from_json(tmp_path / "nope.json")
    (tmp_path / "r.bin").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match=r"r\.bin is not a report: not UTF-8 text"):
        Report.from_json(tmp_path / "r.bin")
    for empty in ("", "  "):  # read as the directory "." ("Is a directory")
        with pytest.raises(InputError, match="no report given: an empty string is neither"):
            Report.from_json(empty)


def test_docstring_examples_run():
    import doctest

    from fxnumeric.report import data, persist

    for module in (data, persist):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_the_docs_name_every_key_a_report_file_holds():
    """docs/reports.md's layout lists every key: of the report, of a layer, of a block."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reports.md").read_text()
    section = doc.split("## Saved reports: JSON both ways", 1)[1].split("\n## ", 1)[0]
    data = _Values().instance(Report).to_dict()  # every field set: every key present
    keys = {"report": set(data), "layer": set(data["layers"][0]),
            "block": set(data["blocks"][0])}
    assert {"floor_cause", "block", "shadow_shapes"} <= keys["layer"] and "blocks" in keys["report"]
    missing = {where: sorted(k for k in names if f"`{k}`" not in section)
               for where, names in keys.items()}
    assert missing == {"report": [], "layer": [], "block": []}


def test_a_float_too_large_exits_2_from_the_cli(tmp_path, capsys):
    from fxnumeric.cli import main

    path = tmp_path / "big.json"
    path.write_text(_edited(lambda d: d["layers"][0]["output"].update(sqnr=10 ** 400)))
    assert main(["diff", str(path), str(path)]) == 2  # 3, "internal error", before
    assert "layers[0].output.sqnr: an integer too large for a float" in capsys.readouterr().err
