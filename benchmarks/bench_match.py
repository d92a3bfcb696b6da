"""Benchmark fxnumeric's matcher against torch's FX Numeric Suite matcher.

Run from the repository root::

    .venv/bin/python benchmarks/bench_match.py            # full run (a few minutes)
    .venv/bin/python benchmarks/bench_match.py --quick    # small subset (< 1 minute)
    .venv/bin/python benchmarks/bench_match.py --profile  # also cProfile the resnet50 pairing

Part 1 times, for torchvision models FX-quantized with the x86 default qconfig mapping:

* ``fxnumeric.match(float_model, quant_model)`` end to end (tracing included);
* the public ``fxnumeric.match(float_gm, quant_gm)`` on graphs traced beforehand (the float
  model by ``fxnumeric.trace``; the FX-quantized model is a GraphModule already), so views,
  pairing and the ``Matching`` are timed but tracing is not;
* torch's ``get_matching_subgraph_pairs(gm_a, gm_b)`` alone, the two GraphModules made exactly
  as ``torch.ao.ns._numeric_suite_fx.add_loggers`` / ``extract_weights`` make them (NSTracer);
  (``torch.ao.ns`` is only the matcher: its tracing is not timed).

Part 2 times fxnumeric on synthetic graphs of ~100 to ~20000 float fx nodes (a long residual
chain; repeated wide concatenations; and a residual chain whose quantized convs pair with
nothing, so every op after one is looked up by name, the search that was quadratic) and reports
microseconds per float node: flat means linear.

Every timing is the median of ``--repeat`` runs (default 5) after one warm-up run, with
``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import os
import pstats
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

# Runnable from a checkout without installation.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torchvision  # noqa: E402
from _synthetic import SHAPES, UNPAIRED, make_pair  # noqa: E402
from _timing import timed  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.ns._numeric_suite_fx import NSTracer, _get_observed_graph_module_attr  # noqa: E402
from torch.ao.ns.fx.graph_matcher import get_matching_subgraph_pairs  # noqa: E402
from torch.ao.quantization import (  # noqa: E402
    MinMaxObserver,
    QConfig,
    QConfigMapping,
    default_per_channel_weight_observer,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

import fxnumeric  # noqa: E402

warnings.filterwarnings("ignore")  # torch.ao.quantization deprecation warnings

NOTES: list[str] = []


# --------------------------------------------------------------------------- helpers


def synthetic_qconfig_mapping() -> QConfigMapping:
    """The x86 mapping with MinMax activation observers as the global qconfig.

    The quantized graph has the same ops as with the x86 default; only the scales differ. The
    default's HistogramObserver costs ~35 ms per observer in convert_fx
    (``_non_linear_param_search``), which made 1000-node synthetic models take minutes.
    """
    qconfig = QConfig(activation=MinMaxObserver.with_args(reduce_range=False),
                      weight=default_per_channel_weight_observer)
    return get_default_qconfig_mapping("x86").set_global(qconfig)


def quantize(
    model: nn.Module, example: torch.Tensor, mapping: QConfigMapping | None = None
) -> tuple[nn.Module, fx.GraphModule]:
    """FX post-training quantization: prepare_fx, one calibration pass, convert_fx."""
    model.eval()
    mapping = mapping if mapping is not None else get_default_qconfig_mapping("x86")
    prepared = prepare_fx(copy.deepcopy(model), mapping, (example,))
    with torch.no_grad():
        prepared(example)
    prepared_copy = copy.deepcopy(prepared)  # convert_fx consumes its argument
    return prepared_copy, convert_fx(prepared)


def ns_graph_module(model: nn.Module) -> fx.GraphModule:
    """Trace a model exactly as torch.ao.ns._numeric_suite_fx.add_loggers/extract_weights do."""
    tracer = NSTracer([], [])
    gm = fx.GraphModule(model, tracer.trace(model))
    scope = _get_observed_graph_module_attr(model, "node_name_to_scope")
    if scope is not None:
        gm._node_name_to_scope = scope
    return gm


def fx_nodes(model: nn.Module) -> int:
    return len(fxnumeric.trace(model).graph.nodes)


def fxnumeric_pairing(float_model: nn.Module, quant_model: nn.Module) -> tuple[Callable[[], Any], int, int]:
    float_gm = fxnumeric.trace(float_model)
    quant_gm = quant_model if isinstance(quant_model, fx.GraphModule) else fxnumeric.trace(quant_model)
    fn = lambda: fxnumeric.match(float_gm, quant_gm)  # noqa: E731
    return fn, len(float_gm.graph.nodes), len(quant_gm.graph.nodes)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.2f}"


# --------------------------------------------------------------------------- part 1


def torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "googlenet":
        return torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False)
    return getattr(torchvision.models, name)(weights=None)


def bench_torchvision(names: list[str], repeat: int) -> tuple[list[list[Any]], dict[str, tuple]]:
    example = torch.randn(1, 3, 224, 224)
    rows = []
    kept: dict[str, tuple] = {}
    for name in names:
        float_model = torchvision_model(name).eval()
        t0 = time.perf_counter()
        prepared, quant_model = quantize(float_model, example)
        t_quant = time.perf_counter() - t0

        # fxnumeric, end to end
        fx_e2e, m = timed(lambda: fxnumeric.match(float_model, quant_model), repeat, unit=1e3)
        if m.coverage < 1.0 or m.unmatched_quant:
            NOTES.append(
                f"{name}: fxnumeric coverage {m.coverage:.1%}, {len(m.unmatched_quant)} quantized "
                f"and {len(m.unmatched_float)} float nodes unpaired; first: "
                + "; ".join(f"{u.node} ({u.kind}): {u.reason}" for u in m.unmatched_quant[:3])
            )
        # fxnumeric.match on graphs traced beforehand
        pair_fn, n_float, n_quant = fxnumeric_pairing(float_model, quant_model)
        fx_pair, _ = timed(pair_fn, repeat, unit=1e3)
        kept[name] = (float_model, quant_model)

        # torch FX Numeric Suite: matcher alone, model A = the float model (as add_loggers traces it)
        torch_ms = None
        torch_pairs: Any = "-"
        model_a, label = float_model, ""
        for attempt in ("float", "prepared"):
            try:
                gm_a, gm_b = ns_graph_module(model_a), ns_graph_module(quant_model)
                torch_ms, res = timed(lambda: get_matching_subgraph_pairs(gm_a, gm_b), repeat, unit=1e3)
                torch_pairs = f"{len(res)}{label}"
                break
            except Exception as exc:  # GraphMatchingException and friends
                NOTES.append(
                    f"{name}: torch get_matching_subgraph_pairs(A={attempt} model, B=quantized) raised "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                )
                model_a, label = prepared, " (A=prepared)"
        rows.append([
            name, n_float, n_quant, fmt(fx_e2e), fmt(fx_pair), fmt(torch_ms),
            ratio(torch_ms, fx_e2e), ratio(torch_ms, fx_pair),
            len(m.pairs), f"{m.coverage:.0%}", torch_pairs,
        ])
        print(f"  {name}: quantized in {t_quant:.1f}s, fxnumeric {fx_e2e:.1f} ms, torch {fmt(torch_ms)} ms",
              file=sys.stderr, flush=True)
    return rows, kept


TORCHVISION_HEADERS = [
    "model", "float nodes", "quant nodes",
    "fxnumeric match\n(ms, tracing incl.)", "fxnumeric.match on\ntraced graphs (ms)",
    "torch FX NS\nmatcher (ms)", "torch matcher /\nfxn match", "torch matcher /\nfxn match on traced",
    "fxnumeric\npairs", "coverage", "torch\npairs",
]


# --------------------------------------------------------------------------- part 2


def bench_synthetic(sizes: list[int], repeat: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """Pairing time per node on generated models from ~100 to ~10,000 nodes.

    The models are eager-quantized (``_synthetic.make_pair``): prepare_fx grows faster than
    linearly with graph size, eager prepare/convert does not. The garbage collector runs and
    then freezes the heap before each timing, so earlier, larger graphs do not slow later ones.
    """
    rows, summary = [], []
    for shape in SHAPES:
        per_node: dict[int, float] = {}
        per_node_e2e: dict[int, float] = {}
        for target in sizes:
            t0 = time.perf_counter()
            float_model, quant_model = make_pair(shape, target)
            t_quant = time.perf_counter() - t0
            pair_fn, n_float, n_quant = fxnumeric_pairing(float_model, quant_model)
            gc.collect()
            gc.freeze()
            reps = repeat if n_float < 5000 else max(3, repeat - 2)
            t_pair, _ = timed(pair_fn, reps, unit=1e3)
            t_e2e, m = timed(lambda: fxnumeric.match(float_model, quant_model), reps, unit=1e3)
            gc.unfreeze()
            us_pair = t_pair * 1e3 / n_float
            us_e2e = t_e2e * 1e3 / n_float
            per_node[n_float] = us_pair
            per_node_e2e[n_float] = us_e2e
            if (m.coverage < 1.0 or m.unmatched_quant) and shape != UNPAIRED:
                NOTES.append(
                    f"{shape} {n_float} nodes: fxnumeric coverage {m.coverage:.1%}; first: "
                    + "; ".join(f"{u.node} ({u.kind}): {u.reason}" for u in m.unmatched_quant[:2])
                )
            rows.append([
                shape, n_float, n_quant, f"{t_quant:.1f}", fmt(t_pair), f"{us_pair:.1f}",
                fmt(t_e2e), f"{us_e2e:.1f}", len(m.pairs), f"{m.coverage:.0%}",
            ])
            print(f"  {shape}, {n_float} nodes: quantized in {t_quant:.1f}s, pairing {t_pair:.1f} ms",
                  file=sys.stderr, flush=True)
        summary.append([
            shape,
            f"{max(per_node.values()) / min(per_node.values()):.2f}",
            f"{max(per_node_e2e.values()) / min(per_node_e2e.values()):.2f}",
        ])
    return rows, summary


SYNTH_HEADERS = [
    "shape", "float nodes", "quant nodes", "eager prepare+convert (s)",
    "fxnumeric\npairing (ms)", "pairing\n(µs/node)", "fxnumeric match\n(ms, tracing incl.)",
    "match\n(µs/node)", "pairs", "coverage",
]


# --------------------------------------------------------------------------- profile


def profile_pairing(float_model: nn.Module, quant_model: nn.Module, label: str, top: int = 12) -> str:
    pair_fn, _, _ = fxnumeric_pairing(float_model, quant_model)
    pair_fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        pair_fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("cumulative").print_stats(top)
    return f"cProfile of fxnumeric pairing ({label}, 5 runs), by cumulative time:\n{out.getvalue()}"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two models, synthetic sizes 100 and 1000")
    parser.add_argument("--repeat", type=int, default=None, help="timed runs per measurement (default 5, quick 3)")
    parser.add_argument("--profile", action="store_true", help="cProfile the pairing on resnet50")
    parser.add_argument("--tablefmt", default="github", help="tabulate format (default github)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    repeat = args.repeat or (3 if args.quick else 5)
    models = ["resnet18", "mobilenet_v2"] if args.quick else [
        "resnet18", "resnet50", "mobilenet_v2", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
        "googlenet"]
    sizes = [100, 1000] if args.quick else [100, 1000, 10000, 20000]

    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"threads={torch.get_num_threads()}, cores={os.cpu_count()}, python {sys.version.split()[0]}, "
          f"median of {repeat} runs after 1 warm-up{' (--quick)' if args.quick else ''}")
    print()

    rows, kept = bench_torchvision(models, repeat)
    print("## torchvision models (FX-quantized, x86 qconfig mapping)\n")
    print(tabulate(rows, headers=TORCHVISION_HEADERS, tablefmt=args.tablefmt, disable_numparse=True))
    print()

    synth_rows, summary = bench_synthetic(sizes, repeat)
    print("## synthetic graphs (µs per float fx node)\n")
    print(tabulate(synth_rows, headers=SYNTH_HEADERS, tablefmt=args.tablefmt, disable_numparse=True))
    print()
    print(tabulate(summary, headers=["shape", "pairing µs/node\nmax/min (target ≤ 2)",
                                     "match µs/node\nmax/min"], tablefmt=args.tablefmt, disable_numparse=True))
    print()

    if args.profile:
        if "resnet50" not in kept:
            f = torchvision_model("resnet50").eval()
            kept["resnet50"] = (f, quantize(f, torch.randn(1, 3, 224, 224))[1])
        print(profile_pairing(*kept["resnet50"], "resnet50"))

    print("Notes:" if NOTES else "Notes: none (no exceptions, every coverage 100%, no recursion-limit change).")
    for note in NOTES:
        print(f"- {note}")
    print(f"\nTotal benchmark time: {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
