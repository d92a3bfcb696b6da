"""The ``fxnumeric`` command: ``demo``, ``report``, ``match``, ``advise``, ``diff``, ``check``.

Every subcommand ends with one of four exit statuses, decided in one place (:func:`main`):

* 0 (:data:`EXIT_OK`): done, and every check passed;
* 1 (:data:`EXIT_FAILED`): the answer is "no": ``check`` found a threshold not met, ``diff``
  a regression, ``advise`` did not reach its target;
* 2 (:data:`EXIT_INPUT`): the input is wrong: bad arguments (argparse), an
  :class:`~fxnumeric.errors.FxNumericError` (a model, file or option fxnumeric cannot use),
  or a file the command cannot read or write;
* 3 (:data:`EXIT_INTERNAL`): anything else went wrong: a bug, in fxnumeric or in model code
  it ran; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .compare import COMPARISONS

__all__ = ["main", "EXIT_OK", "EXIT_FAILED", "EXIT_INPUT", "EXIT_INTERNAL"]

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

# raw: a line ending in a backslash is shown as a shell continuation, not joined to the next
_EXAMPLES = r"""examples:
  fxnumeric demo
      pair and compare torchvision's quantizable resnet18 and the tutorial's LSTM
      (random weights, seeded: no network needed)
  fxnumeric report --model torchvision:resnet18 --quant static --input-shape 1,3,224,224 --batches 8
  fxnumeric report --model torchvision:mobilenet_v2 --quant fx --format html -o report.html
  fxnumeric report --model mymodels:make --quant dynamic --input-shape 4,128 --top-k 10
  fxnumeric report --model torchvision:resnet18 --quant fx,pt2e,static --input-shape 1,3,64,64
      one report, a column group per quantized variant; the best one named
  fxnumeric match --model torchvision:googlenet --quant fx --input-shape 1,3,64,64
  fxnumeric report --model torchvision:resnet18 --quant fx --why --sensitivity sqnr \
      --format html -o report.html
  fxnumeric advise --model torchvision:resnet18 --quant fx --metric cosine --target 0.999
  fxnumeric advise --model fxnumeric.zoo:minilm_cli_pair --input-shape 4,16 --input-dtype long \
      --vocab 30522 --metric min_cosine --target 0.97
  fxnumeric report --model mymodels:make --quant dynamic --input-shape 4,128 --json report.json
  torchrun --nproc_per_node 2 -m fxnumeric.cli report --model mymodels:make --batches 64
      data-parallel: two processes share the batches, rank 0 prints the report
  fxnumeric check report.json --min-output-sqnr 25 --min-shadow-sqnr 20
  fxnumeric check report.json --thresholds quant.toml
  fxnumeric diff baseline.json report.json --tolerance 1 --format html -o diff.html

--model package.module:factory imports that module (the current folder is searched first, so
mymodels.py beside you works) and calls factory(); it must return the float model or a
(float_model, quantized_model) pair. This runs your code: only use specs you trust.
--seed seeds the random weights as well as the data, so two runs print the same numbers.

exit status: 0 ok; 1 a check failed, a diff regressed or advise missed its target;
2 an input error (arguments, model, files); 3 an internal error (rerun with --debug).
"""


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape takes comma-separated integers like 1,3,224,224, got {text!r}"
        ) from None
    if not shape or any(v <= 0 for v in shape):
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes, got {text!r}")
    return shape


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _known_names(text: str, known: tuple[str, ...], takes: str) -> list[str]:
    """The comma-separated names of ``text``: one or more, each of ``known``; else argparse's
    error, ``takes`` saying what the option takes."""
    names = _names(text)
    if not names or any(n not in known for n in names):
        raise argparse.ArgumentTypeError(f"{takes}, got {text!r}")
    return names


def _comparisons(text: str) -> list[str]:
    return _known_names(text, COMPARISONS, f"--comparisons takes one or more of "
                        f"{','.join(COMPARISONS)} (comma-separated)")


_QUANT_CHOICES = ("static", "dynamic", "fx", "pt2e", "pt2e-x86", "int8-weight-only",
                  "int8-dynamic", "int4-weight-only")


def _quant(text: str) -> str:
    return ",".join(_known_names(text, _QUANT_CHOICES, f"--quant takes one of "
                                 f"{', '.join(_QUANT_CHOICES)} (or several, comma-separated, "
                                 "for report and advise)"))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="torchvision:NAME or package.module:factory")
    p.add_argument("--quant", type=_quant, default="static", metavar="MODE",
                   help="how to quantize the float model (one mode, and ignored, when the "
                        f"factory returns a pair): {', '.join(_QUANT_CHOICES)}. pt2e: "
                        "torch.export + torchao's "
                        "XNNPACK symmetric quantizer, pt2e-x86: its x86 inductor quantizer; "
                        "int8-weight-only, int8-dynamic, int4-weight-only: torchao quantize_ "
                        "(group 32 for int4: a Linear whose input features 32 does not "
                        "divide stays float, with a warning) of every untied Linear. report "
                        "takes several, "
                        "comma-separated: one report, a column group per variant, the best "
                        "named; advise too: which variant (or float) each layer should take")
    p.add_argument("--input-shape", type=_shape, default=(1, 3, 224, 224),
                   help="e.g. 1,3,224,224")
    p.add_argument("--input-dtype", choices=("float", "long"), default="float",
                   help="long: integer token ids in [0, --vocab)")
    p.add_argument("--vocab", type=_positive, default=10,
                   help="range of token ids for --input-dtype long")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the random weights and the data (default 0)")
    p.add_argument("--float-weights",
                   help="state_dict file for the float model (read with weights_only=True)")
    p.add_argument("--leaf-modules", type=_names, default=[],
                   help="comma-separated module paths (encoder.layers.0) or class names "
                        "(TransformerEncoderLayer) to keep whole when torch.fx cannot trace them")
    p.add_argument("--capture", choices=("fx", "export", "auto"), default="auto",
                   help="how the models become graphs: torch.fx (the module tree where it "
                        "cannot trace), torch.export on the first input batch, or auto "
                        "(default: torch.fx, but torch.export for a float model torch.fx "
                        "cannot trace, against pt2e)")
    p.add_argument("--no-progress", action="store_true", help="never show progress")


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before and after the subcommand; SUPPRESS keeps a subcommand's
    # unset flag from overwriting the top-level one
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks for errors")
    parser = argparse.ArgumentParser(
        prog="fxnumeric",
        description="Find where a quantized PyTorch model loses accuracy.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the built-in demo", parents=[debug])
    demo.add_argument("-o", "--output", default="fxnumeric-demo.html",
                      help="where to write the demo's HTML report (default: %(default)s)")
    rep = sub.add_parser("report", parents=[debug],
                         help="per-layer comparison of a float model and its quantized version",
                         epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(rep)
    rep.add_argument("--batches", type=_positive, default=8, help="number of random input batches")
    rep.add_argument("--format", choices=("table", "json", "csv", "html", "model-explorer"),
                     default="table", help="model-explorer: node-data overlays in the -o directory")
    rep.add_argument("--tablefmt", default="simple",
                     help="tabulate format for --format table (github, plain, ...)")
    rep.add_argument("--comparisons", type=_comparisons, default=list(COMPARISONS),
                     help=f"comma-separated, any of {','.join(COMPARISONS)} (default: all, as "
                          "fxnumeric.compare); blocks: what enters each block (a decoder "
                          "layer, a ResNet stage) and what it adds, the block table")
    rep.add_argument("--sort", choices=("graph", "output_sqnr", "shadow_sqnr", "weight_sqnr"),
                     help="row order (default: graph order, or worst first with --top-k)")
    rep.add_argument("--top-k", type=_positive,
                     help="show only the k worst layers (by shadow SQNR unless --sort says)")
    rep.add_argument("-o", "--output", "--out",
                     help="write to this file instead of stdout (required for html and csv)")
    rep.add_argument("--json", metavar="FILE",
                     help="also save the report as JSON (for fxnumeric check and diff), "
                          "whatever --format shows")
    rep.add_argument("--why", action="store_true",
                     help="add a flags column: why each layer is bad (fxnumeric.diagnose)")
    rep.add_argument("--sensitivity", choices=("sqnr", "cosine", "min_cosine"),
                     help="with --format html: chart each layer's effect on this end metric "
                          "(two hybrid models per layer, fxnumeric.sensitivity)")
    mat = sub.add_parser("match", parents=[debug],
                         help="print how the float and quantized graphs pair",
                         epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(mat)
    mat.add_argument("--tablefmt", default="simple")
    adv = sub.add_parser("advise", parents=[debug],
                         help="which layers to keep float so a metric reaches a target",
                         epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(adv)
    adv.add_argument("--target", type=float, required=True, help="metric value to reach")
    adv.add_argument("--metric", choices=("sqnr", "cosine", "min_cosine", "kl", "top1_agreement"),
                     default="sqnr",
                     help="end metric of the model output: sqnr, cosine, min_cosine, "
                          "top1_agreement (higher is better), kl (nats, lower is better)")
    adv.add_argument("--batches", type=_positive, default=4, help="number of random input batches")
    adv.add_argument("--max-float-layers", type=_count,
                     help="keep at most this many layers float (with several --quant modes, 0 "
                          "chooses among the modes only)")
    adv.add_argument("--candidates", type=_positive,
                     help="with one --quant mode, layers verified per step of the search "
                          "(default 16)")
    adv.add_argument("-o", "--output", metavar="FILE",
                     help="also write an HTML page: the curve (with several --quant modes, the "
                          "Pareto front of weight bits against the metric) and the steps")
    dif = sub.add_parser("diff", parents=[debug],
                         help="what changed between two saved reports; exit 1 on a regression",
                         epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    dif.add_argument("old", help="the earlier report (JSON, from fxnumeric report --json)")
    dif.add_argument("new", help="the later report")
    dif.add_argument("--tolerance", type=_tolerance, default=0.5, metavar="DB",
                     help="an SQNR may fall this many dB before it is a regression "
                          "(default %(default)s)")
    dif.add_argument("--tolerance-cosine", type=_tolerance, default=1e-3, metavar="X",
                     help="a cosine may fall this much (default %(default)s)")
    dif.add_argument("--tolerance-kl", type=_tolerance, default=0.01, metavar="X",
                     help="the model output's kl may rise this much (default %(default)s)")
    dif.add_argument("--tolerance-top1", type=_tolerance, default=0.01, metavar="X",
                     help="its top1_agreement may fall this much (default %(default)s)")
    dif.add_argument("--variant", metavar="NAME",
                     help="with one report of several variants and one of a single quantized "
                          "model: the variant the single one is")
    dif.add_argument("--format", choices=("table", "html"), default="table")
    dif.add_argument("--tablefmt", default="simple", help="tabulate format for --format table")
    dif.add_argument("--all", action="store_true", help="also list metrics that did not change")
    dif.add_argument("-o", "--output", "--out",
                     help="write to this file instead of stdout (required for html)")
    chk = sub.add_parser("check", parents=[debug],
                         help="does a saved report meet its thresholds? exit 1 if not",
                         epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    chk.add_argument("report", help="a report saved as JSON (fxnumeric report --json FILE)")
    chk.add_argument("--thresholds", metavar="FILE",
                     help="TOML thresholds: [model_output], [layers], [layers.\"PATTERN\"] "
                          "(docs/ci.md); flags below are added and win")
    for flag, metavar, text in _CHECK_FLAGS:
        chk.add_argument(flag, type=float, metavar=metavar, help=text)
    return parser


_CHECK_FLAGS = (  # flag, metavar, help; each is a keyword of fxnumeric.testing.check_report
    ("--min-output-sqnr", "DB", "the model output's SQNR"),
    ("--min-output-cosine", "X", "the model output's cosine"),
    ("--max-kl", "X", "the model output's kl (LLM reports)"),
    ("--min-top1-agreement", "X", "the model output's top1_agreement (LLM reports)"),
    ("--min-shadow-sqnr", "DB", "every layer's shadow (local) SQNR"),
    ("--min-layer-output-sqnr", "DB", "every layer's output (cumulative) SQNR"),
    ("--min-weight-sqnr", "DB", "every layer's weight SQNR"),
    ("--max-below-floor", "DB", "how far any layer's shadow SQNR may sit below its floor_sqnr"),
)


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _importable_here() -> None:
    """Let ``--model mymodels:make`` import ``mymodels.py`` from the current folder.

    ``python -m`` puts the current folder on ``sys.path``; an installed console script does
    not, so the CLI does it, as ``python -m fxnumeric`` would.
    """
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.insert(0, here)


def _leaf_modules(names: list[str], *models: Any) -> list[Any]:
    """Module paths stay strings; a class name becomes every class of that name in the models."""
    leaves: list[Any] = []
    for name in names:
        if "." not in name and name[:1].isupper():
            types = {type(m) for model in models for m in model.modules()
                     if type(m).__name__ == name}
            if types:
                leaves.extend(sorted(types, key=lambda t: t.__module__))
                continue
        leaves.append(name)
    return leaves


def _pair(args: argparse.Namespace):
    from .errors import InputError
    from .models import build_pair, random_batches

    if "," in args.quant:
        raise InputError(f"--quant {args.quant}: several modes are for `fxnumeric report` (a "
                         "column group per variant) and `fxnumeric advise` (which variant each "
                         "layer should take); this command takes one")
    if not args.model.startswith("torchvision:"):
        _importable_here()
    calibration = random_batches(args.input_shape, 2, seed=args.seed + 1, dtype=args.input_dtype,
                                 high=args.vocab)
    if args.quant.startswith("pt2e"):
        from .models import build_pt2e_pair

        built = build_pt2e_pair(args.model, calibration, float_weights=args.float_weights,
                                seed=args.seed, progress=_progress(args),
                                quantizer="x86" if args.quant == "pt2e-x86" else "xnnpack")
    else:
        built = build_pair(args.model, args.quant, calibration, float_weights=args.float_weights,
                           seed=args.seed, progress=_progress(args))
    leaves = _leaf_modules(args.leaf_modules, built.float_model, built.quant_model)
    return built, leaves


def _report(args: argparse.Namespace) -> int:
    from .errors import InputError

    if args.format in ("html", "csv", "model-explorer") and not args.output:
        raise InputError(f"--format {args.format} writes a file: add -o FILE")
    if args.sensitivity and args.format != "html":
        raise InputError("--sensitivity draws a chart in the HTML page: add --format html -o FILE")
    if args.format != "table" and (args.sort is not None or args.top_k is not None):
        given = " and ".join(flag for flag, value in (("--sort", args.sort),
                                                      ("--top-k", args.top_k))
                             if value is not None)
        raise InputError(f"{given} order the rows of --format table; --format {args.format} "
                         "holds every row in graph order (the HTML table sorts on a click): "
                         f"drop {given}, or use --format table")
    made = _variants_report(args) if "," in args.quant else _single_report(args)
    if made is None:
        return EXIT_OK  # under torchrun every rank holds the same report: rank 0 writes it
    report, sens = made
    if args.format == "table":
        text = report.table(tablefmt=args.tablefmt, sort=args.sort, top_k=args.top_k)
        if report.blocks and args.top_k is None:
            text += "\n\n" + report.block_table(tablefmt=args.tablefmt)
    elif args.format == "json":
        text = report.to_json()
    elif args.format == "csv":
        text = f"wrote {report.to_csv(args.output)}"
    elif args.format == "model-explorer":
        written = report.to_model_explorer(args.output)
        text = "wrote " + ", ".join(str(p) for p in written.values())
    else:
        text = f"wrote {report.to_html(args.output, sensitivity=sens)}\n{report.summary()}"
    if args.output and args.format in ("table", "json"):
        Path(args.output).write_text(text + "\n")
        text = f"wrote {args.output}"
    if args.json:
        report.to_json(args.json)
        # on stderr: stdout may be the JSON or table a pipe reads
        print(f"saved the report as JSON in {args.json}", file=sys.stderr)
    print(text)
    return EXIT_OK


def _single_report(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """``report`` of one quantized model: the report and the sensitivity (``--sensitivity``);
    None on the ranks after the first under torchrun."""
    from .compare import compare
    from .distributed import torchrun_group
    from .models import random_batches
    from .progress import phase

    built, leaves = _pair(args)
    data = random_batches(args.input_shape, args.batches, seed=args.seed, dtype=args.input_dtype,
                          high=args.vocab)
    with phase("tracing and pairing the models", _progress(args)):
        matching = _matching(args, built, leaves, data[0])
    with torchrun_group() as ranks:  # under torchrun: the ranks share the batches
        report = compare(
            built.float_model, built.quant_model, data,
            comparisons=args.comparisons,
            matching=matching,
            progress=_progress(args) if not ranks.rank else False,
        )
    if ranks.rank:
        return None
    report = dataclasses.replace(report, notes=built.notes + report.notes)
    if args.why:
        from .advice.diagnose import annotate, diagnose

        report = annotate(report, diagnose(built.float_model, built.quant_model, data,
                                           matching=matching, progress=_progress(args)))
    sens = None
    if args.sensitivity:
        from .advice.search import sensitivity

        sens = sensitivity(built.float_model, built.quant_model, data, args.sensitivity,
                           matching=matching, progress=_progress(args))
    return report, sens


def _variants_report(args: argparse.Namespace) -> tuple[Any, None] | None:
    """``report --quant fx,pt2e,dynamic``: one float model, a variant per mode, one report
    (None on the ranks after the first under torchrun)."""
    from .compare import compare
    from .distributed import torchrun_group
    from .errors import FxNumericError, InputError
    from .models import BuiltPair, build_variants, random_batches
    from .progress import phase

    if args.why or args.sensitivity:
        raise InputError(f"--{'why' if args.why else 'sensitivity'} looks into one quantized "
                         f"model; --quant {args.quant} names several.\nFix: rerun with one "
                         "--quant mode for the variant to look into")
    if not args.model.startswith("torchvision:"):
        _importable_here()
    calibration = random_batches(args.input_shape, 2, seed=args.seed + 1, dtype=args.input_dtype,
                                 high=args.vocab)
    float_model, variants, notes = build_variants(
        args.model, args.quant.split(","), calibration, float_weights=args.float_weights,
        seed=args.seed, progress=_progress(args))
    leaves = _leaf_modules(args.leaf_modules, float_model, *variants.values())
    data = random_batches(args.input_shape, args.batches, seed=args.seed, dtype=args.input_dtype,
                          high=args.vocab)
    matchings = {}
    with phase("tracing and pairing the models", _progress(args)):
        for name, quant_model in variants.items():
            try:
                matchings[name] = _matching(args, BuiltPair(float_model, quant_model), leaves,
                                            data[0])
            except FxNumericError as exc:
                raise type(exc)(f"--quant {name}: {exc}") from exc
    with torchrun_group() as ranks:  # under torchrun: the ranks share the batches
        report = compare(
            float_model, variants, data,
            comparisons=args.comparisons,
            matching=matchings, progress=_progress(args) if not ranks.rank else False)
    if ranks.rank:
        return None
    return dataclasses.replace(
        report, notes=notes + report.notes,
        variants={name: dataclasses.replace(v, notes=notes + v.notes)
                  for name, v in report.variants.items()}), None


def _matching(args: argparse.Namespace, built: Any, leaves: list[str], example: Any, *,
              validate: bool = False) -> Any:
    """``match`` of the built pair with the command's ``--capture`` on ``example``, the first
    batch, as :func:`fxnumeric.compare` matches on its own: exported on it where the capture
    needs it, and, for a model captured through the module tree (Hugging Face), run on it to
    record how each submodule is called and in which order (without it, the rows, and the
    layer named where NaN/Inf first appears, followed module registration order).
    ``validate``: check that both models accept it (``compare``, ``advise`` and ``diagnose``
    run it next anyway)."""
    from .match import match

    return match(built.float_model, built.quant_model, example, leaf_modules=leaves or None,
                 capture=args.capture, validate_inputs=validate)


def _match(args: argparse.Namespace) -> int:
    from .models import random_batches
    from .progress import phase

    built, leaves = _pair(args)
    example = random_batches(args.input_shape, 1, seed=args.seed, dtype=args.input_dtype,
                             high=args.vocab)[0]
    with phase("tracing and pairing the models", _progress(args)):
        matching = _matching(args, built, leaves, example, validate=True)
    print(matching.table(tablefmt=args.tablefmt))
    return EXIT_OK


_FX_CALL_TRACE = "Call using an FX-traced Module, line"
"""The line torch.fx puts in the traceback it prints itself (see :class:`_WithoutFxTraces`)."""


class _WithoutFxTraces:
    """``sys.stderr`` less the traceback torch.fx prints on its own.

    A ``GraphModule`` whose generated forward raises prints the traceback and its generated
    code (a ``~~~ <--- HERE`` marker) to ``sys.stderr`` before re-raising
    (``torch.fx.graph_module._WrappedCall``): the CLI printed it above its one-line error,
    although only ``--debug`` shows tracebacks. Everything else is written through.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._dropped = False  # print() writes its end ("\n") after the trace: drop it too

    def write(self, text: str) -> int:
        if text.startswith("Traceback") and _FX_CALL_TRACE in text:
            self._dropped = True
            return len(text)
        if self._dropped and text == "\n":
            self._dropped = False
            return len(text)
        self._dropped = False
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """One line per warning, as for errors: no library file path and source line; labelled
    ``fxnumeric: warning:`` when it is fxnumeric's (a ``FxNumericWarning``), else by the
    package it comes from and its category (``torch: UserWarning: ...``)."""
    from .errors import FxNumericWarning

    if issubclass(category, FxNumericWarning):
        print(f"fxnumeric: warning: {message}", file=sys.stderr)
        return
    origin = _package_of(filename)
    print(f"{origin + ': ' if origin else ''}{category.__name__}: {message}", file=sys.stderr)


def _package_of(filename: str) -> str | None:
    """The top-level package of the loaded module whose file is ``filename`` (None when no
    loaded module is, or it is fxnumeric: a warning raised by a library fxnumeric calls, with
    a ``stacklevel`` that points at fxnumeric's call)."""
    path = os.path.abspath(filename)
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and os.path.abspath(file) == path:
            package = name.partition(".")[0]
            return None if package == "fxnumeric" else package
    return None


def _advise(args: argparse.Namespace) -> int:
    from .advice.search import advise
    from .models import build_variants, random_batches
    from .progress import phase

    data = random_batches(args.input_shape, args.batches, seed=args.seed, dtype=args.input_dtype,
                          high=args.vocab)
    modes = args.quant.split(",")
    if len(modes) > 1:  # which variant (or float) each layer should take
        if not args.model.startswith("torchvision:"):
            _importable_here()
        calibration = random_batches(args.input_shape, 2, seed=args.seed + 1,
                                     dtype=args.input_dtype, high=args.vocab)
        float_model, variants, notes = build_variants(
            args.model, modes, calibration, float_weights=args.float_weights, seed=args.seed,
            progress=_progress(args))
        advice = advise(float_model, variants, data, metric=args.metric, target=args.target,
                        max_float_layers=args.max_float_layers, candidates=args.candidates,
                        progress=_progress(args))
    else:
        built, leaves = _pair(args)
        notes = built.notes
        with phase("tracing and pairing the models", _progress(args)):
            matching = _matching(args, built, leaves, data[0])
        advice = advise(built.float_model, built.quant_model, data, metric=args.metric,
                        target=args.target, max_float_layers=args.max_float_layers,
                        candidates=args.candidates, matching=matching, progress=_progress(args))
    for note in notes:
        print(f"note: {note}")
    print(advice.summary())
    if args.output:
        print(f"wrote {advice.to_html(args.output)}")
    return EXIT_OK if advice.reached else EXIT_FAILED


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(html_path=args.output)
    return EXIT_OK


def _diff(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .report import Report

    if args.format == "html" and not args.output:
        raise InputError("--format html writes a file: add -o FILE")
    old, new = Report.from_json(args.old), Report.from_json(args.new)
    diff = old.diff(new, tolerance_db=args.tolerance, tolerance_cosine=args.tolerance_cosine,
                    tolerance_kl=args.tolerance_kl, tolerance_top1=args.tolerance_top1,
                    variant=args.variant)
    if args.format == "html":
        print(f"wrote {diff.to_html(args.output)}\n{diff.summary()}")
    else:
        text = diff.table(tablefmt=args.tablefmt, changed_only=not args.all)
        if args.output:
            Path(args.output).write_text(text + "\n")
            text = f"wrote {args.output}\n{diff.summary()}"
        print(text)
    return EXIT_FAILED if diff.regressed else EXIT_OK


def _check(args: argparse.Namespace) -> int:
    from .report.check import check_report

    limits = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_"))
              for flag, _, _ in _CHECK_FLAGS}
    result = check_report(args.report, args.thresholds, **limits)
    print(result.text())
    return EXIT_OK if result.passed else EXIT_FAILED


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _demo, "report": _report, "match": _match, "advise": _advise, "diff": _diff,
    "check": _check,
}


def _exit_status(exc: Exception) -> int:
    """The status for an exception a command raised: whose mistake it was."""
    from .errors import FxNumericError, InternalError

    if isinstance(exc, InternalError):
        return EXIT_INTERNAL  # fxnumeric's own code failed, not the input
    if isinstance(exc, FxNumericError):
        return EXIT_INPUT
    if isinstance(exc, OSError) and exc.filename is not None:
        return EXIT_INPUT  # a file named on the command line that cannot be read or written
    return EXIT_INTERNAL


def _error_message(exc: Exception, status: int) -> str:
    if status == EXIT_INPUT:
        # the whole message: its later lines say where (source line) and what to do (Fix:)
        return f"fxnumeric: error: {str(exc) or type(exc).__name__}"
    first = (str(exc).splitlines() or [""])[0][:300]
    return (f"fxnumeric: internal error: {type(exc).__name__}: {first}\n"
            "fxnumeric: this is a bug (in fxnumeric, or in model code it ran); rerun with "
            "--debug for the traceback, and report it with the traceback if it is fxnumeric's")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 a failed check, 2 an input error,
    3 an internal error: see the module docstring). Argument errors exit 2 through argparse.
    """
    args = _parser().parse_args(argv)
    stderr = sys.stderr
    if not args.debug:
        sys.stderr = _WithoutFxTraces(stderr)
    try:
        with warnings.catch_warnings():
            # torch warns on every call that eager/FX quantization is deprecated; the CLI uses it.
            warnings.filterwarnings("ignore", message=".*deprecat.*")
            warnings.showwarning = _show_warning  # restored when the block ends
            return _COMMANDS[args.command](args)
    except BrokenPipeError:
        # the reader went away (`fxnumeric report | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        status = _exit_status(exc)
        print(_error_message(exc, status), file=sys.stderr)
        return status
    finally:
        sys.stderr = stderr


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
