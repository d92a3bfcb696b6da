"""The documentation must stay runnable and its links must resolve.

* ``test_python_blocks_run``: every ```python block of a document is executed,
  in order, in one fresh namespace (the way a reader pastes them into one
  session). Code lines keep their line numbers in the Markdown file, so a
  traceback points at the failing line of the document itself.
* ``test_relative_links_resolve``: every relative link in docs/*.md and
  README.md names a file or directory that exists in the repository.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial.md"
README = ROOT / "README.md"

# An opening or closing code fence: ``` or ~~~ (3 or more), indented by up to 3 spaces.
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def _fenced_blocks(text: str):
    """Yield (info_string, first_code_line_index, code_lines) for each fenced block.

    Line indices are 0-based. An unclosed fence runs to the end of the document,
    as in CommonMark.
    """
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None or (m["fence"][0] == "`" and "`" in m["info"]):
            i += 1
            continue
        fence, indent, info = m["fence"], len(m["indent"]), m["info"].strip()
        start = i + 1
        j = start
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if (
                close is not None
                and close["fence"][0] == fence[0]
                and len(close["fence"]) >= len(fence)
                and not close["info"].strip()
            ):
                break
            j += 1
        # Remove up to `indent` leading spaces, like CommonMark does for an indented fence.
        body = [line[min(indent, len(line) - len(line.lstrip(" "))) :] for line in lines[start:j]]
        yield info, start, body
        i = j + 1


def python_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(first code line index, code lines) of each ```python block of `path`, in order."""
    blocks = []
    for info, start, body in _fenced_blocks(path.read_text(encoding="utf-8")):
        words = info.split()
        if words and words[0].lower() == "python":
            blocks.append((start, body))
    return blocks


def _program(path: Path, blocks: list[tuple[int, list[str]]]) -> str:
    """Concatenate the blocks, each code line at its own line number in `path`."""
    n_lines = len(path.read_text(encoding="utf-8").splitlines())
    program = [""] * n_lines
    for start, body in blocks:
        code = textwrap.dedent("\n".join(body)).split("\n")
        program[start : start + len(code)] = code
    return "\n".join(program) + "\n"


def run_python_blocks(path: Path) -> dict:
    """Execute the ```python blocks of `path` in one fresh namespace and return it."""
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.relative_to(ROOT)} has no ```python blocks")
    namespace = {"__name__": "__main__", "__file__": str(path)}
    exec(compile(_program(path, blocks), str(path), "exec"), namespace)
    return namespace


def _check_tutorial_namespace(ns: dict) -> None:
    """What the tutorial's last part (dynamic quantization of LSTMModel) leaves behind."""
    import torch.ao.nn.quantized.dynamic as nnqd
    import torch.nn as nn

    float_model, qmodel = ns["float_model"], ns["qmodel"]
    assert type(float_model).__name__ == "LSTMModel"

    # compare_weights on the LSTM: one entry per weight_ih and per weight_hh of each layer.
    wt = ns["wt_compare_dict"]
    lstm_keys = {
        f"rnn._all_weight_values.{layer}.param.weight_{kind}"
        for layer in range(5)
        for kind in ("ih", "hh")
    }
    assert set(wt) == {"encoder.weight", "decoder._packed_params._packed_params"} | lstm_keys
    for key, entry in wt.items():
        assert set(entry) == {"float", "quantized"}, key
        assert entry["quantized"].shape == entry["float"].shape, key
    assert not wt["encoder.weight"]["quantized"].is_quantized
    assert wt["decoder._packed_params._packed_params"]["quantized"].is_quantized
    assert torch.equal(wt["encoder.weight"]["float"], float_model.encoder.weight)
    assert torch.equal(
        wt["decoder._packed_params._packed_params"]["float"], float_model.decoder.weight
    )
    for layer in range(5):
        for kind in ("ih", "hh"):
            entry = wt[f"rnn._all_weight_values.{layer}.param.weight_{kind}"]
            assert entry["quantized"].is_quantized
            assert torch.equal(entry["float"], getattr(float_model.rnn, f"weight_{kind}_l{layer}"))

    assert set(ns["act_compare_dict"]) == {"encoder.stats", "rnn.stats", "decoder.stats"}
    assert set(ns["ob_dict"]) == {"rnn.stats", "decoder.stats"}
    for key, entry in ns["ob_dict"].items():
        assert set(entry) == {"float", "quantized"}, key
        assert len(entry["float"]) == len(entry["quantized"]) == 1, key

    # The LSTM part only calls compare_*(), which (unlike eager) leave the models untouched:
    # same module tree, same instance attributes and no hooks, as freshly built models.
    fresh_float = ns["LSTMModel"](ntoken=ns["ntokens"], ninp=512, nhid=256, nlayers=5).eval()
    fresh_q = torch.ao.quantization.quantize_dynamic(
        fresh_float, {nn.LSTM, nn.Linear}, dtype=torch.qint8
    )
    assert type(qmodel.rnn) is nnqd.LSTM and type(qmodel.decoder) is nnqd.Linear
    for model, fresh in ((float_model, fresh_float), (qmodel, fresh_q)):
        tree = [(name, type(mod)) for name, mod in model.named_modules()]
        assert tree == [(name, type(mod)) for name, mod in fresh.named_modules()]
        pairs = zip(model.named_modules(), fresh.named_modules(), strict=True)
        for (name, mod), (_, ref) in pairs:
            assert set(vars(mod)) == set(vars(ref)), (name, set(vars(mod)) ^ set(vars(ref)))
            hooks = [h for h in vars(mod) if h.endswith("_hooks")]
            assert [len(vars(mod)[h]) for h in hooks] == [len(vars(ref)[h]) for h in hooks], name

    m = ns["m"]
    for attr in ("pairs", "unmatched_float", "unmatched_quant"):
        assert hasattr(m, attr), attr
    assert len(m.pairs) > 0
    assert isinstance(m.table(), str) and m.table()


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=str(p.relative_to(ROOT))) for p in
     [README, *sorted((ROOT / "docs").glob("*.md"))]],
)
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not path.exists():
        pytest.skip(f"{path.relative_to(ROOT)} does not exist")
    monkeypatch.chdir(tmp_path)  # examples may write report files
    namespace = run_python_blocks(path)
    if path == TUTORIAL:
        _check_tutorial_namespace(namespace)


# ---------------------------------------------------------------- links

# [text](target "title") and ![alt](target); target may be wrapped in <...>.
_INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"
)
# [label]: target
_REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
# <a href="target">, <img src="target">
_HTML_LINK = re.compile(r"""\b(?:href|src)\s*=\s*["']([^"']*)["']""", re.I)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)


def _markdown_files() -> list[Path]:
    files = sorted((ROOT / "docs").glob("*.md"))
    if README.exists():
        files.append(README)
    return files


def _prose(text: str) -> str:
    """`text` without fenced code blocks and code spans (links there are not links)."""
    lines = text.splitlines()
    for _, start, body in _fenced_blocks(text):
        for k in range(start - 1, min(start + len(body) + 1, len(lines))):
            lines[k] = ""
    return _CODE_SPAN.sub("", "\n".join(lines))


def relative_links(path: Path) -> list[str]:
    prose = _prose(path.read_text(encoding="utf-8"))
    targets = [m[1] for m in _INLINE_LINK.finditer(prose)]
    targets += [m[1] for m in _REF_DEF.finditer(prose)]
    targets += [m[1] for m in _HTML_LINK.finditer(prose)]
    out = []
    for target in targets:
        target = target.strip("<>").strip()
        if not target or target.startswith(("#", "//")) or _SCHEME.match(target):
            continue
        out.append(target)
    return out


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in relative_links(path):
        file_part = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
        if not file_part:
            continue
        base = ROOT if file_part.startswith("/") else path.parent
        if not (base / file_part.lstrip("/")).exists():
            broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)}: links to missing files: {broken}"
