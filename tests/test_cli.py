"""The ``fxnumeric`` command."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
import traceback
from pathlib import Path

import pytest
import torch

import fxnumeric as ns
from fxnumeric.cli import main
from fxnumeric.report import Report


def test_demo_ends_with_the_report_the_html_path_and_next_steps(tmp_path, capsys):
    html = tmp_path / "demo.html"
    assert main(["demo", "-o", str(html)]) == 0
    out = capsys.readouterr().out
    assert "quantized-op coverage 100%" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    conv1_weight_sqnr = float(lines["conv1"].split()[2])
    assert 30 < conv1_weight_sqnr < 60
    # the embedding stays float under dynamic: no weight SQNR to show (not an inf)
    assert lines["encoder"].split()[2] == "-"
    assert "note: random weights (seed 0; BatchNorm statistics from 3 seeded batches)" in out
    tail = out[out.index("HTML report of resnet18:"):].splitlines()
    assert tail[0] == f"HTML report of resnet18: {html.resolve()}" and html.exists()
    assert tail[1] == "next:" and any("fxnumeric report --model" in t for t in tail)
    assert "<svg" in html.read_text()


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
    common = ["report", "--model", "torchvision:resnet18", "--input-shape", "1,3,32,32",
              "--batches", "2", "--no-progress"]
    assert main(common + ["--top-k", "3", "--sort", "shadow_sqnr"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 + 3 + 2 and out[-1].startswith("2 batches; 33 layers; model output SQNR")
    assert out[-2].startswith("note: random weights (torchvision weights=None, seed 0;")
    assert main(common + ["--format", "json", "--comparisons", "outputs"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["batches"] == 2 and data["comparisons"] == ["outputs"] and len(data["layers"]) == 33
    assert main(common + ["--format", "csv", "-o", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().startswith("layer,kind,quantized,weight_sqnr,output_sqnr")
    assert main(common + ["--format", "html", "-o", str(tmp_path / "r.html")]) == 0
    assert "<svg" in (tmp_path / "r.html").read_text()


def test_report_user_factory_and_dynamic(user_module, capsys):
    user_module("userzoo",
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(32, 4))\n"
    )
    code = main(["report", "--model", "userzoo:make", "--quant", "dynamic", "--input-shape", "4,16",
                 "--batches", "3", "--format", "json", "--no-progress"])
    assert code == 0
    import json

    layers = {layer["name"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    assert set(layers) == {"0", "1", "2"} and isinstance(layers["0"]["weight_sqnr"], float)


def test_match_command_prints_pairs(capsys):
    assert main(["match", "--model", "torchvision:mobilenet_v2", "--quant", "fx",
                 "--input-shape", "1,3,32,32"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("coverage of quantized ops 100%")


@pytest.mark.parametrize("argv, message", [
    (["report", "--model", "nope.mod:f"], "cannot import 'nope.mod'"),
    (["report", "--model", "torchvision:resnet18", "--input-shape", "1,3,64", "--batches", "1"],
     "calibration) model failed on the input (Tensor[1, 3, 64]"),
    (["report", "--model", "torchvision:resnet18", "--format", "html"], "add -o FILE"),
    (["report", "--model", "torchvision:resnet18", "--format", "json", "--top-k", "3"],
     "--top-k order the rows of --format table; --format json holds every row"),
    (["report", "--model", "torchvision:resnet18", "--format", "csv", "-o", "r.csv", "--sort",
      "weight_sqnr", "--top-k", "2"], "--sort and --top-k order the rows of --format table"),
    (["report", "--model", "torchvision:vgg11"], "no quantizable 'vgg11'"),
    (["report", "--model", "resnet18"], "must look like torchvision:resnet18"),
])
def test_user_errors_exit_2_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxnumeric: error: ") and message in err and "Traceback" not in err


def test_bad_shape_argument(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--model", "torchvision:resnet18", "--input-shape", "a,b"])
    assert info.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


_RESNET = ["report", "--model", "torchvision:resnet18", "--input-shape", "1,3,64,64",
           "--batches", "1", "--no-progress"]


def _rows(text: str) -> list[list[str]]:
    """The data rows of a `simple` table: the lines between the rule and the notes."""
    lines = text.splitlines()
    return [line.split() for line in lines[2:] if line and not line.startswith("note:")
            and "batches;" not in line]


def test_seed_makes_runs_reproducible_and_changes_the_weights(capsys):
    """--seed seeds the random weights too: the same command twice prints the same table."""
    main(_RESNET + ["--top-k", "3", "--sort", "shadow_sqnr"])
    first = capsys.readouterr().out
    torch.manual_seed(1234)  # whatever the global RNG did in between
    main(_RESNET + ["--top-k", "3", "--sort", "shadow_sqnr"])
    assert capsys.readouterr().out == first
    main(_RESNET + ["--top-k", "3", "--sort", "shadow_sqnr", "--seed", "1"])
    assert capsys.readouterr().out != first


def test_random_torchvision_weights_get_batchnorm_statistics_and_a_note(capsys):
    """mobilenet_v2 with fresh BatchNorm statistics collapsed to ~1e-10 (0 dB, cosine 0)."""
    argv = ["report", "--model", "torchvision:mobilenet_v2", "--quant", "fx", "--input-shape",
            "1,3,32,32", "--batches", "1", "--format", "json", "--no-progress"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_output_rms"] > 0.01 and data["model_output"]["cosine"] > 0.3
    assert not any(layer["degenerate"] for layer in data["layers"])
    assert data["notes"][0].startswith("random weights (torchvision weights=None, seed 0; "
                                       "BatchNorm statistics from 3 seeded batches)")


def test_top_k_alone_is_worst_first_and_sort_fallback_is_announced(capsys):
    main(_RESNET + ["--top-k", "4"])
    rows = _rows(capsys.readouterr().out)
    shadow = [float(r[7]) for r in rows]  # layer kind weight output cosine mse max shadow
    assert len(rows) == 4 and shadow == sorted(shadow)
    main(_RESNET + ["--top-k", "3", "--sort", "shadow_sqnr", "--comparisons", "outputs"])
    out = capsys.readouterr().out
    assert ("note: no shadow SQNR in this report (comparisons: outputs): sorted by output SQNR"
            in out)
    output_sqnr = [float(r[2]) for r in _rows(out)]
    assert output_sqnr == sorted(output_sqnr)


def test_static_mobilenet_leaks_no_observer_warning(recwarn, capsys):
    argv = ["report", "--model", "torchvision:mobilenet_v2", "--quant", "static",
            "--input-shape", "1,3,32,32", "--batches", "1", "--comparisons", "outputs",
            "--no-progress"]
    assert main(argv) == 0
    assert not [w for w in recwarn if "must run observer" in str(w.message)]
    assert "must run observer" not in capsys.readouterr().err


def test_warnings_are_one_line(user_module, capsys):
    user_module("twins",
        "import copy, torch\n"
        "def make():\n"
        "    f = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval()\n"
        "    return f, copy.deepcopy(f)\n")
    assert main(["match", "--model", "twins:make", "--input-shape", "2,4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("fxnumeric: warning: the quantized model has no quantized op (all 1 "
                            "ops are float). Coverage is n/a; is it the model returned by convert "
                            "/ convert_fx / quantize_dynamic?\n")
    assert captured.out.rstrip().endswith(
        "coverage of quantized ops n/a (the quantized model has no quantized op)")


_UNTRACEABLE = """import torch


class Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: torch.fx cannot trace this
            return torch.relu(x)
        return x


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.gate, self.out = torch.nn.Linear(8, 8), Gate(), torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.gate(self.fc(x)))


def make():
    return Net()
"""


def _in_fresh_folder(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(_UNTRACEABLE)
    monkeypatch.chdir(tmp_path)
    # as in an installed `fxnumeric` script: the current folder is not on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "mymodels", raising=False)


def test_model_from_the_current_folder_with_an_untraceable_module(tmp_path, monkeypatch, capsys):
    _in_fresh_folder(tmp_path, monkeypatch)
    argv = ["report", "--model", "mymodels:make", "--quant", "dynamic", "--input-shape", "4,8",
            "--batches", "2", "--no-progress", "--format", "json"]
    # `gate` cannot be traced: it is kept whole without being told (see docs/tracing.md)
    for extra in ([], ["--leaf-modules", "gate"], ["--leaf-modules", "Gate"]):
        assert main(argv + extra) == 0
        captured = capsys.readouterr()
        assert "No module named" not in captured.err
        layers = [layer["name"] for layer in json.loads(captured.out)["layers"]]
        assert layers == ["fc", "gate", "out"]


def test_debug_is_accepted_after_the_subcommand(tmp_path, monkeypatch):
    _in_fresh_folder(tmp_path, monkeypatch)
    with pytest.raises(ns.InputError, match="float model failed on the input"):
        main(["report", "--model", "mymodels:make", "--quant", "dynamic", "--input-shape",
              "4,5", "--debug"])
    with pytest.raises(ns.InputError):
        main(["--debug", "report", "--model", "mymodels:make", "--quant", "dynamic",
              "--input-shape", "4,5"])


# where docs/reports.md shows the command's output for each kind of CPU (torch's
# get_cpu_capability): its kernels round differently, and the errors travel through the model
_SHOWN_FOR = {"AVX512": r"prints exactly this on an x86 CPU with AVX-512",
              "AVX2": r"On a CPU with AVX2 only"}


def test_the_table_in_docs_reports_is_what_the_command_prints(capsys):
    """docs/reports.md shows a command and its output: a reader reproduces it exactly."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reports.md").read_text()
    command = re.search(r"^OMP_NUM_THREADS=1 fxnumeric (report .*)$", doc, re.M)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in _SHOWN_FOR:
        pytest.skip(f"docs/reports.md shows the output on AVX512 and AVX2 CPUs, not {capability}")
    shown = re.search(_SHOWN_FOR[capability] + r".*?```text\n(.*?)\n```", doc, re.S)
    assert command and shown
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(command[1].split()) == 0
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.rstrip("\n") == shown[1]


# ---------------------------------------------------------------- exit statuses

_TINY = ("import torch\n"
         "def make():\n"
         "    torch.manual_seed(0)\n"
         "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),\n"
         "                               torch.nn.Linear(32, 4))\n")
_TINY_ARGS = ["--model", "tinymlp:make", "--quant", "dynamic", "--input-shape", "4,16",
              "--no-progress"]


@pytest.fixture
def tiny_report(user_module, tmp_path, capsys) -> Path:
    """``tinymlp:make`` importable, and its report saved by ``report --json``."""
    user_module("tinymlp", _TINY)
    path = tmp_path / "tiny.json"
    assert main(["report", *_TINY_ARGS, "--batches", "2", "--json", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"saved the report as JSON in {path}\n"
    assert captured.out.splitlines()[-1].startswith("2 batches; 3 layers; model output SQNR")
    assert Report.from_json(path).summary() == captured.out.splitlines()[-1]
    return path


def _internal_cases(tmp_path: Path, report: Path) -> list[tuple[list[str], str, str]]:
    """(argv, module, function): each command, and a function inside it to break."""
    return [
        (["report", *_TINY_ARGS, "--batches", "1"], "fxnumeric.compare", "compare"),
        (["match", *_TINY_ARGS], "fxnumeric.match", "match"),
        (["advise", *_TINY_ARGS, "--target", "30"], "fxnumeric.advice.search", "advise"),
        (["demo", "-o", str(tmp_path / "demo.html")], "fxnumeric.demo", "run_demo"),
        (["check", str(report), "--min-output-sqnr", "1"], "fxnumeric.report.check", "check"),
        (["diff", str(report), str(report)], "fxnumeric.report.diff", "diff_reports"),
    ]


def test_every_command_exits_3_on_an_internal_error_and_debug_shows_it(
        tiny_report, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    for argv, module, function in _internal_cases(tmp_path, tiny_report):
        with monkeypatch.context() as patch:
            patch.setattr(importlib.import_module(module), function, broken)
            assert main(argv) == 3, argv[0]
            err = capsys.readouterr().err
            assert err.splitlines() == [
                "fxnumeric: internal error: RuntimeError: boom",
                "fxnumeric: this is a bug (in fxnumeric, or in model code it ran); rerun with "
                "--debug for the traceback, and report it with the traceback if it is "
                "fxnumeric's"], argv[0]
            with pytest.raises(RuntimeError, match="boom"):
                main([*argv, "--debug"])


def test_fxnumerics_own_failure_inside_a_forward_exits_3(tiny_report, monkeypatch, capsys):
    # it exited 2, as if the input were wrong
    import fxnumeric.metrics as metrics

    monkeypatch.setattr(metrics, "energy", None)  # a TypeError in Accumulator.update
    assert main(["report", *_TINY_ARGS, "--batches", "1"]) == 3
    assert capsys.readouterr().err.startswith(
        "fxnumeric: internal error: InternalError: fxnumeric's own code failed inside the")


def test_float_weights_that_cannot_be_used_exit_2(user_module, tmp_path, capsys):
    # a file torch.load refuses exited 3 ("internal error: UnpicklingError"); weights given
    # with a factory that returns a quantized pair were ignored without a word
    user_module("tinymlp", _TINY)
    garbage = tmp_path / "weights.pt"
    garbage.write_text("not a state dict")
    assert main(["report", *_TINY_ARGS, "--float-weights", str(garbage)]) == 2
    assert "cannot load --float-weights" in capsys.readouterr().err
    user_module("tinypair", _TINY + (
        "def pair():\n"
        "    f = make().eval()\n"
        "    return f, torch.ao.quantization.quantize_dynamic(f, {torch.nn.Linear})\n"))
    torch.save(torch.nn.Linear(2, 2).state_dict(), garbage)
    argv = ["report", "--model", "tinypair:pair", "--input-shape", "4,16", "--no-progress"]
    assert main([*argv, "--float-weights", str(garbage)]) == 2
    assert "returns a (float, quantized) pair" in capsys.readouterr().err
    assert main(argv) == 0
    # several modes named the pair's one quantized model after the first mode
    assert main([*argv, "--quant", "dynamic,fx"]) == 2
    assert "several modes (dynamic, fx) would name it after the first" in (
        capsys.readouterr().err.replace("\n", " "))


def test_advise_exits_1_when_the_target_is_not_reached_and_0_when_it_is(user_module, capsys):
    user_module("tinymlp", _TINY)
    assert main(["advise", *_TINY_ARGS, "--target", "1000", "--max-float-layers", "1"]) == 1
    assert "NOT reached" in capsys.readouterr().out
    assert main(["advise", *_TINY_ARGS, "--target", "20"]) == 0


def test_input_errors_exit_2_in_every_command(tiny_report, tmp_path, capsys):
    missing = str(tmp_path / "nope.json")
    for argv, message in [
        (["report", *_TINY_ARGS, "--batches", "1", "-o", str(tmp_path / "no" / "dir.txt")],
         "No such file or directory"),
        (["check", missing, "--min-output-sqnr", "1"], "no report file"),
        (["diff", str(tiny_report), missing], "no report file"),
        (["diff", str(tiny_report), str(tiny_report), "--tablefmt", "bogus"],
         "unknown table format 'bogus': use one of simple, plain, github"),
        (["advise", "--model", "nope.mod:f", "--target", "1"], "cannot import 'nope.mod'"),
        (["match", "--model", "resnet18"], "must look like torchvision:resnet18"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fxnumeric: error: ") and message in err, err


def test_help_documents_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "exit status: 0 ok; 1 a check failed" in capsys.readouterr().out


def test_report_of_a_module_tree_model_lists_rows_in_run_order(tmp_path, capsys):
    """The CLI matched without the first batch, so a Hugging Face model's rows followed module
    registration order (layer 0's q_proj before the input_layernorm feeding it) and the NaN
    planted in layer 1's norm was said to first appear at its q_proj."""
    from _models import nan_in_layer1_norm_pair, run_order_and_first_nonfinite

    from fxnumeric.models import random_batches

    path = tmp_path / "llama.json"
    argv = ["report", "--model", "_models:nan_in_layer1_norm_pair", "--input-shape", "2,12",
            "--input-dtype", "long", "--vocab", "256", "--batches", "1", "--no-progress"]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    cli = json.loads(path.read_text())
    # the oracles: compare's own rows on the same pair and batch; hooks on the quantized model
    float_model, quant_model = nan_in_layer1_norm_pair()
    data = random_batches((2, 12), 1, seed=0, dtype="long", high=256)  # the CLI's batch
    own = ns.compare(float_model, quant_model, data, progress=False)
    order, origin = run_order_and_first_nonfinite(quant_model, data[0])
    names = [layer["name"] for layer in cli["layers"]]
    assert names == [row.name for row in own.rows]
    modules = [n for n in names if n in order]
    assert len(modules) > 10 and modules == sorted(modules, key=order.index)
    assert [layer["kind"] for layer in cli["layers"][:3]] == ["embedding", "rmsnorm", "linear"]
    assert origin == "model.layers.1.input_layernorm"
    assert f"note: NaN/Inf first appears at {origin} in the quantized model" in out


def test_report_computes_the_blocks_as_compare_does_by_default(tmp_path, capsys):
    """--comparisons defaulted to weights,outputs,shadows: the block table docs/reports.md
    shows in `fxnumeric report`, the HTML and the JSON was never computed."""
    from fxnumeric.compare import COMPARISONS
    from fxnumeric.models import build_pair, random_batches

    path = tmp_path / "r.json"
    assert main(["report", "--model", "torchvision:resnet18", "--input-shape", "1,3,32,32",
                 "--batches", "2", "--no-progress", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    cli = Report.from_json(path)
    # the oracle: compare's own defaults on the pair and batches the command builds
    calibration = random_batches((1, 3, 32, 32), 2, seed=1)
    built = build_pair("torchvision:resnet18", "static", calibration, seed=0)
    own = ns.compare(built.float_model, built.quant_model,
                     random_batches((1, 3, 32, 32), 2, seed=0), progress=False)
    assert cli.comparisons == own.comparisons == COMPARISONS
    assert [b.name for b in cli.blocks] == [b.name for b in own.blocks] == [
        "layer1", "layer2", "layer3", "layer4"]
    for mine, theirs in zip(cli.blocks, own.blocks, strict=True):
        assert mine.output_sqnr == pytest.approx(theirs.output_sqnr, abs=1e-6)
        assert mine.shadow_sqnr == pytest.approx(theirs.shadow_sqnr, abs=1e-6)
    assert out.rstrip("\n").endswith(own.block_table())


def test_help_examples_show_shell_continuations_and_parse(capsys):
    """The epilog's backslash-newline was Python's, so --help joined two lines into
    "--sensitivity sqnr       --format html"."""
    import shlex

    from fxnumeric.cli import _parser

    with pytest.raises(SystemExit):
        main(["report", "--help"])
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("  fxnumeric report --model torchvision:resnet18 --quant fx --why "
                     "--sensitivity sqnr \\")
    assert lines[at + 1] == "      --format html -o report.html"
    assert not any(re.search(r"\S {3,}--", line) for line in lines)
    # each example, its continuation lines joined as a shell joins them, parses
    commands, joined = [], ""
    for line in lines:
        if line.startswith("  fxnumeric ") or joined:
            joined += line.strip().removesuffix("\\") + " "
            if not line.endswith("\\"):
                commands.append(joined)
                joined = ""
    assert len(commands) >= 12
    for command in commands:
        _parser().parse_args(shlex.split(command)[1:])


def _floats_in_summary(out: str) -> int:
    """How many layers the advice's per-layer lines keep float."""
    lines = out[out.index("per layer"):].splitlines()[1:]
    return sum(line.strip().endswith(": float") for line in lines)


def test_advise_over_several_modes_keeps_at_most_max_float_layers_float(user_module, capsys):
    # several --quant modes ignored --max-float-layers: SQNR 1000 dB "reached" with every
    # layer float; and 0 (the modes only, as the Python API takes it) was refused
    user_module("tinymlp", _TINY)
    argv = ["advise", *_TINY_ARGS, "--quant", "dynamic,fx", "--batches", "2", "--target", "1000"]
    assert main(argv) == 0
    assert _floats_in_summary(capsys.readouterr().out) == 2  # float everywhere: inf dB
    for limit in (1, 0):
        assert main([*argv, "--max-float-layers", str(limit)]) == 1
        out = capsys.readouterr().out
        assert "NOT reached" in out and (f"with at most {limit} layer{'' if limit == 1 else 's'} "
                                         "float") in out
        assert _floats_in_summary(out) == limit
    # one mode: 0 keeps nothing float, the quantized model itself
    assert main(["advise", *_TINY_ARGS, "--target", "1000", "--max-float-layers", "0"]) == 1
    assert "NOT reached" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main([*argv, "--max-float-layers", "-1"])
    assert info.value.code == 2 and "expected 0 or more, got '-1'" in capsys.readouterr().err


def test_advise_over_several_modes_refuses_candidates(user_module, capsys):
    # --candidates (default 16) was dropped silently with several modes
    user_module("tinymlp", _TINY)
    assert main(["advise", *_TINY_ARGS, "--quant", "dynamic,fx", "--batches", "2",
                 "--target", "30", "--candidates", "3"]) == 2
    assert "candidates applies to one quantized model" in capsys.readouterr().err


def test_pt2e_float_weights_are_refused_as_in_every_other_mode(user_module, tmp_path, capsys):
    """--quant pt2e exited 3 ("internal error: UnpicklingError") on a file torch.load refuses,
    and ignored --float-weights for a factory's (float, quantized) pair (exit 0, the report
    the same without them); every other mode exits 2 with a Fix: line."""
    pytest.importorskip("torchao")
    user_module("tinymlp", _TINY)
    user_module("tinypair", _TINY + (
        "def pair():\n"
        "    f = make().eval()\n"
        "    return f, torch.ao.quantization.quantize_dynamic(f, {torch.nn.Linear})\n"))
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"\x80\x04not a pickle")  # torch.load(weights_only=True) refuses it
    weights = tmp_path / "pair.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), weights)
    for model, path in (("tinymlp:make", garbage), ("tinypair:pair", weights)):
        errors = {}
        for mode in ("dynamic", "pt2e"):
            assert main(["report", "--model", model, "--quant", mode, "--input-shape", "4,16",
                         "--batches", "1", "--no-progress", "--float-weights", str(path)]) == 2
            err = capsys.readouterr().err
            errors[mode] = err[err.index("fxnumeric: error:"):]
        assert errors["pt2e"] == errors["dynamic"]
        assert "\nFix: " in errors["pt2e"]


def test_weights_of_the_right_model_load_for_pt2e(user_module, tmp_path, capsys):
    """The one loading path: --float-weights changes the float model pt2e quantizes, as the
    Python API built with the same weights says."""
    pytest.importorskip("torchao")
    from fxnumeric.models import build_pt2e_pair, random_batches

    user_module("tinymlp", _TINY)
    path = tmp_path / "w.pt"
    torch.manual_seed(5)
    torch.save(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                   torch.nn.Linear(32, 4)).state_dict(), path)
    assert main(["report", "--model", "tinymlp:make", "--quant", "pt2e", "--input-shape", "4,16",
                 "--batches", "1", "--no-progress", "--float-weights", str(path),
                 "--format", "json", "--comparisons", "outputs"]) == 0
    cli = json.loads(capsys.readouterr().out)
    built = build_pt2e_pair("tinymlp:make", random_batches((4, 16), 2, seed=1),
                            float_weights=str(path))
    x = random_batches((4, 16), 1, seed=0)[0]
    with torch.no_grad():
        ref, actual = built.float_model(x).double(), built.quant_model(x).double()
    state = torch.load(path, weights_only=True)
    expected = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(
        x, state["0.weight"], state["0.bias"])), state["2.weight"], state["2.bias"])
    torch.testing.assert_close(ref, expected.double())  # the file's weights, not make()'s
    sqnr = 10 * math.log10(ref.pow(2).sum() / (ref - actual).pow(2).sum())
    assert cli["model_output"]["sqnr"] == pytest.approx(sqnr, abs=1e-6)


_FAILS_IN_GENERATED_CODE = _TINY + """
class Broken(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = make()

    def forward(self, x):
        return self.net(x) + torch.ones(5)  # (4, 4) + (5,): fails in the generated forward


def pair():
    return make().eval(), torch.fx.symbolic_trace(Broken())
"""


def test_a_graph_module_failing_prints_no_traceback_without_debug(user_module, capsys):
    """torch.fx's GraphModule prints the traceback and its generated code (`~~~ <--- HERE`) to
    stderr itself before re-raising: it appeared above the CLI's one-line error."""
    user_module("brokengm", _FAILS_IN_GENERATED_CODE)
    argv = ["report", "--model", "brokengm:pair", "--input-shape", "4,16", "--batches", "1",
            "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "<--- HERE" not in err
    assert [line for line in err.splitlines() if "error" in line] == [
        "fxnumeric: error: the quantized model failed on the input (Tensor[4, 16] float32 on "
        "cpu) at node `add` (operator.add): RuntimeError: The size of tensor a (4) must match "
        "the size of tensor b (5) at non-singleton dimension 1"]
    with pytest.raises(ns.InputError, match="the quantized model failed on the input") as info:
        main([*argv, "--debug"])
    # --debug shows everything: the traceback reaches the generated code's failing line
    # (torch.fx's wrapper, which printed it with a `<--- HERE` marker, dropped it)
    frames = traceback.extract_tb(info.value.__cause__.__traceback__)
    assert frames[-1].filename.startswith("<eval_with_key>") and "add" in frames[-1].line


def test_warnings_are_labelled_by_their_origin(user_module, tmp_path, capsys):
    """torch.load's own warning read "fxnumeric: warning: Detected pickle protocol 4"."""
    import warnings

    user_module("tinymlp", _TINY)
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"\x80\x04not a pickle")
    with warnings.catch_warnings(record=True) as caught:  # the oracle: torch.load on its own
        warnings.simplefilter("always")
        with pytest.raises(Exception):  # noqa: B017 (whatever torch.load raises)
            torch.load(garbage, weights_only=True)
    own = [w for w in caught if "pickle protocol" in str(w.message)]
    assert own and "/torch/" in own[0].filename.replace("\\", "/")
    assert main(["report", *_TINY_ARGS, "--float-weights", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert f"torch: {own[0].category.__name__}: {own[0].message}\n" in err
    assert "fxnumeric: warning" not in err


def test_diff_refuses_a_variant_neither_report_needs(tiny_report, capsys):
    """--variant names which variant a single report is, against several: with two single
    reports it was ignored (exit 0)."""
    assert main(["diff", str(tiny_report), str(tiny_report), "--variant", "fx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxnumeric: error: variant='fx' says which variant")
    assert "each is of a single quantized model" in err and "Fix: leave variant out" in err
    assert main(["diff", str(tiny_report), str(tiny_report)]) == 0


@pytest.mark.parametrize("value", [",", "", "outputs,bogus"])
def test_comparisons_must_name_one_or_more(value, capsys):
    """`--comparisons ,` gave a report with no per-layer metric."""
    with pytest.raises(SystemExit) as info:
        main(["report", "--model", "torchvision:resnet18", "--comparisons", value])
    assert info.value.code == 2
    assert (f"--comparisons takes one or more of weights,outputs,shadows,blocks "
            f"(comma-separated), got {value!r}") in capsys.readouterr().err


def test_advise_table_tells_the_steps_apart(user_module, capsys):
    """The step table rounded every value to 4 digits: cosines 0.99997 and 1 both read "1"."""
    from fxnumeric.models import build_pair, random_batches

    user_module("tinymlp", _TINY)
    argv = ["advise", *_TINY_ARGS, "--metric", "cosine", "--target", "0.999999",
            "--batches", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = out[out.index("  step"):].split("\n\n")[0].splitlines()[2:]
    shown = [line.split()[-1] for line in table]
    # the oracle: the Python API on the pair and batches the command builds
    built = build_pair("tinymlp:make", "dynamic", random_batches((4, 16), 2, seed=1))
    advice = ns.advise(built.float_model, built.quant_model, random_batches((4, 16), 2, seed=0),
                       metric="cosine", target=0.999999, progress=False)
    assert len(shown) == len(advice.curve) == 3
    assert len({f"{v:.4g}" for v in advice.curve}) < 3  # what 4 digits could not tell apart
    assert len(set(shown)) == 3
    for text, value in zip(shown, advice.curve, strict=True):
        assert abs(float(text) - value) <= 0.5 * 10 ** -len(text.partition(".")[2])


def make_model_and_tokenizer():
    """A factory returning what transformers loaders do: (model, tokenizer)."""
    return torch.nn.Linear(2, 2), "a tokenizer"


def test_a_factory_returning_a_model_and_its_tokenizer_is_told_which_item_is_no_model():
    """A (model, tokenizer) pair read "returned tuple; it must return a model or a
    (float, quantized) pair", which a pair is."""
    from fxnumeric.models import load_float_model

    with pytest.raises(ns.InputError) as info:
        load_float_model("test_cli:make_model_and_tokenizer", "dynamic")
    message = str(info.value)
    assert "returned a tuple of 2 (Linear, str): its item 1 is not an nn.Module" in message
    assert "(float, quantized) pair of models" in message
