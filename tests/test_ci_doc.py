"""docs/ci.md stays true: its files, its commands (run through the CLI's main) and its outputs.

test_docs.py runs the page's python blocks; the shell, YAML and TOML blocks are run here.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from test_docs import _fenced_blocks

from fxnumeric.cli import main
from fxnumeric.report import Report

DOC = Path(__file__).resolve().parents[1] / "docs" / "ci.md"
_COMMAND = re.compile(r"^\s*(?:-\s+)?(?:run:\s+)?(?:OMP_NUM_THREADS=1\s+)?fxnumeric\s+(.*)$")


def _blocks(info: str) -> list[list[str]]:
    return [body for kind, _, body in _fenced_blocks(DOC.read_text()) if kind == info]


def _file(info: str, first_line: str) -> str:
    """The block of kind ``info`` whose first line names the file (``# quant/thresholds.toml``)."""
    for body in _blocks(info):
        if body and body[0] == first_line:
            return "\n".join(body) + "\n"
    raise AssertionError(f"docs/ci.md has no {info} block starting {first_line!r}")


def _commands(info: str) -> list[list[str]]:
    return [shlex.split(m[1]) for body in _blocks(info) for line in body
            if (m := _COMMAND.match(line))]


@pytest.fixture
def ci_folder(tmp_path, monkeypatch) -> Path:
    """A checkout as the page describes it: mymodel.py and quant/thresholds.toml."""
    (tmp_path / "mymodel.py").write_text(_file("python", "# mymodel.py"))
    (tmp_path / "quant").mkdir()
    (tmp_path / "quant" / "thresholds.toml").write_text(_file("toml", "# quant/thresholds.toml"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    return tmp_path


def test_the_ci_page_commands_run_and_print_what_it_shows(ci_folder, capsys):
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load("\n".join(_blocks("yaml")[0]))
    steps = workflow["jobs"]["accuracy"]["steps"]
    assert [s.get("name") for s in steps if s.get("run", "").startswith("fxnumeric ")] == [
        "Report", "Thresholds", "Against the baseline", "Diff page"]
    baseline = _commands("bash")
    assert len(baseline) == 1 and baseline[0][0] == "report"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the page
    try:
        assert main(baseline[0] + ["--no-progress"]) == 0
        job = _commands("yaml")
        assert [c[0] for c in job] == ["report", "check", "diff", "diff"]
        outputs = []
        for command in job:
            capsys.readouterr()
            extra = ["--no-progress"] if command[0] == "report" else []
            assert main(command + extra) == 0, command
            outputs.append(capsys.readouterr().out)
        assert main(job[1] + ["--min-layer-output-sqnr", "39"]) == 1
        failing = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    for name in ("report.html", "report.json", "diff.html", "quant/baseline.json"):
        assert (ci_folder / name).exists(), name
    shown = ["\n".join(body) + "\n" for body in _blocks("text")]
    assert outputs[1] == shown[0] == "all 14 checks passed\n"
    assert failing == shown[1]
    assert outputs[2].splitlines()[-1] == "5 layers in both reports; no regression beyond tolerance"

    # and the diff step fails the job when a layer got worse than the baseline
    report = Report.from_json("report.json")
    rows = tuple(dataclasses.replace(r, shadow={**r.shadow, "sqnr": r.shadow["sqnr"] - 3})
                 if r.name == "head" else r for r in report.rows)
    dataclasses.replace(report, rows=rows).to_json("report.json")
    assert main(job[2]) == 1
    assert "; 1 regression beyond tolerance: head shadow SQNR: " in capsys.readouterr().out
