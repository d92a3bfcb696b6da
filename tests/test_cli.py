"""The ``fxnumeric`` command."""

from __future__ import annotations

import pytest

from fxnumeric.cli import main


def test_demo_prints_sqnr_tables(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "quantized-op coverage 100%" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    conv1 = float(lines["conv1.weight"].split()[-1])
    assert 30 < conv1 < 60
    assert lines["encoder.weight"].split()[-1] == "inf"
    assert "rnn._all_weight_values.4.param.weight_hh" in lines


def test_bad_arguments_exit_nonzero(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fxnumeric demo" in capsys.readouterr().out
