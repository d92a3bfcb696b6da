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


def test_report_table_json_csv_html(tmp_path, capsys):
    common = ["report", "--model", "torchvision:resnet18", "--input-shape", "1,3,32,32", "--batches", "2", "--no-progress"]
    assert main(common + ["--top-k", "3", "--sort", "shadow_sqnr"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + 3 + 1 and out[-1].startswith("2 batches; 33 layers; model output SQNR")
    assert main(common + ["--format", "json", "--comparisons", "outputs"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["batches"] == 2 and data["comparisons"] == ["outputs"] and len(data["layers"]) == 33
    assert main(common + ["--format", "csv", "-o", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().startswith("layer,kind,weight SQNR")
    assert main(common + ["--format", "html", "-o", str(tmp_path / "r.html")]) == 0
    assert "<svg" in (tmp_path / "r.html").read_text()


def test_report_user_factory_and_dynamic(tmp_path, monkeypatch, capsys):
    (tmp_path / "userzoo.py").write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["report", "--model", "userzoo:make", "--quant", "dynamic", "--input-shape", "4,16",
                 "--batches", "3", "--format", "json", "--no-progress"])
    assert code == 0
    import json

    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    assert set(layers) == {"0", "1", "2"} and isinstance(layers["0"]["weight_sqnr"], float)


def test_match_command_prints_pairs(capsys):
    assert main(["match", "--model", "torchvision:mobilenet_v2", "--quant", "fx", "--input-shape", "1,3,32,32"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("coverage of quantized ops 100%")


@pytest.mark.parametrize("argv, message", [
    (["report", "--model", "nope.mod:f"], "cannot import 'nope.mod'"),
    (["report", "--model", "torchvision:resnet18", "--input-shape", "1,3,64", "--batches", "1"],
     "calibration) model failed on the input (Tensor[1, 3, 64]"),
    (["report", "--model", "torchvision:resnet18", "--format", "html"], "add -o FILE"),
    (["report", "--model", "torchvision:vgg11"], "no quantizable 'vgg11'"),
    (["report", "--model", "resnet18"], "must look like torchvision:resnet18"),
])
def test_user_errors_are_one_line_with_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxnumeric: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_bad_shape_argument(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--model", "torchvision:resnet18", "--input-shape", "a,b"])
    assert info.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
