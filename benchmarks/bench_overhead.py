"""Overhead of numeric-suite instrumentation: torch eager suite vs torch FX suite vs fxnumeric.

Usage::

    .venv/bin/python benchmarks/bench_overhead.py [--quick] [--models resnet18,...] [--batches 1,16]
                                                  [--best-of 3] [--flows a,b] [--pairs eager,fx]
                                                  [--profile]

The eager API against torch's eager suite as issue 19 measures it (quantizable mobilenet_v2,
random weights, 8 single images at 224 px, one thread, best of 3)::

    .venv/bin/python benchmarks/bench_overhead.py --models mobilenet_v2 --pairs eager --batches 8 \
        --best-of 3 --flows "torch-eager outputs,fxnumeric outputs"

For each torchvision model two (float, quantized) pairs are built:

* ``eager``: torchvision.models.quantization.<model>(quantize=False), fuse_model(), x86 qconfig,
  prepare / calibrate once / convert. The float side is the fused float model.
* ``fx``: torchvision.models.<model>, prepare_fx / calibrate once / convert_fx with
  get_default_qconfig_mapping("x86"). The float side is the plain float model.

Flows timed for N batches of 1x3x224x224 (seeded), all under torch.no_grad():

* ``floor``: float forward + quantized forward per batch.
* ``torch-eager outputs``: prepare_model_outputs + N x (float, quant) forwards + get_matching_activations.
* ``torch-eager stubs``: prepare_model_with_stubs + N x quant forwards + get_logger_dict.
* ``torch-fx loggers``: add_loggers + N x (a, b) forwards + extract_logger_info.
* ``torch-fx shadows``: add_shadow_loggers + N x shadow forwards + extract_shadow_logger_info.
* ``fxnumeric outputs``: ns.prepare_model_outputs + N x (float, quant) forwards + ns.get_matching_activations.
* ``fxnumeric stubs``: ns.prepare_model_with_stubs + N x quant forwards + ns.get_logger_dict.
* ``fxnumeric graph``: ns.match + ns.add_loggers + ns.add_shadows (one-time, matching reused)
  + N x (float_gm, quant_gm, shadow_gm) forwards (per batch) + ns.loggers_of.

Every flow that mutates a model gets deep copies; deepcopy is not timed. Totals are medians of 3
runs when N == 1, a single run otherwise; with ``--best-of K``, K rounds each run every flow once
in turn (the floor and the candidates interleaved) and each flow keeps its fastest round: a
single run on a shared machine moves a ratio by +-0.1 (the issue-9 table's 1.08x for the eager
mobilenet_v2 outputs flow was one such run; best of 3 read 1.19-1.22x). "ratio" is total /
floor total for the same pair. The "stubs"/"shadows" flows run only the quantized (shadowed)
model per batch, yet are still divided by the floor of float+quant, as both models' work is done.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import os
import platform
import pstats
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.ao.ns._numeric_suite as tns  # noqa: E402
import torch.ao.ns._numeric_suite_fx as tnsfx  # noqa: E402
import torch.nn as nn  # noqa: E402
import torchvision  # noqa: E402
from tabulate import tabulate  # noqa: E402
from torch.ao.quantization import (  # noqa: E402
    convert,
    get_default_qconfig,
    get_default_qconfig_mapping,
    prepare,
)
from torch.ao.quantization.quantization_mappings import (  # noqa: E402
    get_default_static_quant_module_mappings,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

import fxnumeric as ns  # noqa: E402

ALL_MODELS = ["resnet18", "resnet50", "mobilenet_v2", "shufflenet_v2_x1_0", "googlenet"]


# ---------------------------------------------------------------- model building


def _model_kwargs(name: str) -> dict:
    kw: dict = {"weights": None}
    if name == "googlenet":
        kw.update(aux_logits=False, init_weights=False)
    return kw


def make_inputs(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 3, 224, 224, generator=g) for _ in range(n)]


def build_eager_pair(name: str, calib: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    m = getattr(torchvision.models.quantization, name)(quantize=False, **_model_kwargs(name)).eval()
    m.fuse_model()
    float_model = copy.deepcopy(m)
    m.qconfig = get_default_qconfig("x86")
    prepare(m, inplace=True)
    with torch.no_grad():
        m(calib)
    convert(m, inplace=True)
    return float_model, m.eval()


def build_fx_pair(name: str, calib: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    float_model = getattr(torchvision.models, name)(**_model_kwargs(name)).eval()
    prepared = prepare_fx(copy.deepcopy(float_model), get_default_qconfig_mapping("x86"), (calib,))
    with torch.no_grad():
        prepared(calib)
    return float_model, convert_fx(prepared).eval()


def swap_list(float_model: nn.Module) -> set[type]:
    """Float types of quantizable layers: torch's static mapping keys + fused types present."""
    types = set(get_default_static_quant_module_mappings().keys())
    for m in float_model.modules():
        if type(m).__module__.startswith("torch.ao.nn.intrinsic"):
            types.add(type(m))
    return types


# ---------------------------------------------------------------- flows
# Each flow: fn(float_model, quant_model, inputs) -> (phases dict of seconds, counts dict).
# Models passed in are fresh deep copies (made outside the timer).


_CLOCK = time.perf_counter  # --cpu-time: time.process_time


class Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def __call__(self, phase: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t = _CLOCK()

            def __exit__(self, *exc):
                timer.phases[phase] = timer.phases.get(phase, 0.0) + _CLOCK() - self.t

        return _Ctx()


def flow_floor(f, q, xs, swaps):
    t = Timer()
    with t("run"):
        for x in xs:
            f(x)
            q(x)
    return t.phases, {}


def _outputs_flow(suite):
    """prepare_model_outputs + forwards + get_matching_activations of an eager-API suite."""
    def flow(f, q, xs, swaps):
        t = Timer()
        with t("setup"):
            suite.prepare_model_outputs(f, q)
        with t("run"):
            for x in xs:
                f(x)
                q(x)
        with t("extract"):
            d = suite.get_matching_activations(f, q)
        return t.phases, {"logged": len(d)}

    return flow


def _stubs_flow(suite):
    """prepare_model_with_stubs + forwards + get_logger_dict of an eager-API suite."""
    def flow(f, q, xs, swaps):
        t = Timer()
        with t("setup"):
            suite.prepare_model_with_stubs(f, q, swaps, suite.ShadowLogger)
        with t("run"):
            for x in xs:
                q(x)
        with t("extract"):
            d = suite.get_logger_dict(q)
        return t.phases, {"shadowed": len(d)}

    return flow


def flow_torch_fx_loggers(f, q, xs, swaps):
    t = Timer()
    with t("setup"):
        a, b = tnsfx.add_loggers("a", f, "b", q, tnsfx.OutputLogger)
    with t("run"):
        for x in xs:
            a(x)
            b(x)
    with t("extract"):
        d = tnsfx.extract_logger_info(a, b, tnsfx.OutputLogger, "b")
    return t.phases, {"logged": len(d)}


def flow_torch_fx_shadows(f, q, xs, swaps):
    t = Timer()
    with t("setup"):
        s = tnsfx.add_shadow_loggers("a", f, "b", q, tnsfx.OutputLogger)
    with t("run"):
        for x in xs:
            s(x)
    with t("extract"):
        d = tnsfx.extract_shadow_logger_info(s, tnsfx.OutputLogger, "b")
    return t.phases, {"shadowed": len(d)}


def fxn_graph_setup(f, q):
    m = ns.match(f, q)
    float_gm, quant_gm = ns.add_loggers(f, q, matching=m)
    shadow_gm, skipped = ns.add_shadows(f, q, matching=m)
    return float_gm, quant_gm, shadow_gm, skipped


def fxn_graph_run(float_gm, quant_gm, shadow_gm, xs):
    for x in xs:
        float_gm(x)
        quant_gm(x)
        shadow_gm(x)


def flow_fxn_graph(f, q, xs, swaps):
    t = Timer()
    with t("setup"):
        float_gm, quant_gm, shadow_gm, skipped = fxn_graph_setup(f, q)
    with t("run"):
        fxn_graph_run(float_gm, quant_gm, shadow_gm, xs)
    with t("extract"):
        logged, shadowed = ns.loggers_of(quant_gm), ns.loggers_of(shadow_gm)
        n_vals = sum(len(lg.stats.get("tensor_val", ())) for lg in logged.values())
    return t.phases, {"logged": len(logged), "shadowed": len(shadowed), "skipped": len(skipped),
                      "_tensor_vals": n_vals}


class _NoOp(ns.Logger):
    """An observer that records nothing: what running the graphs costs without any metric."""

    def forward(self, *args):
        return None


def flow_fxn_shadow_floor(f, q, xs, swaps):
    """The floor of compare(outputs+shadows): the same instrumented graphs, observers that do
    nothing (so every float op runs twice: in the float model and as a shadow)."""
    t = Timer()
    with t("setup"):
        m = ns.match(f, q)
        built = ns.instrument(m, outputs=lambda p: (_NoOp(), _NoOp()), shadows=lambda p: _NoOp())
    with t("run"):
        for x in xs:
            built.float_model(x)
            built.quant_model(x)
    return t.phases, {"shadowed": len(built.shadow_observers)}


def _flow_fxn_compare(comparisons):
    def flow(f, q, xs, swaps):
        t = Timer()
        with t("setup"):
            m = ns.match(f, q)
        with t("run"):  # instrumentation, every batch, and building the report
            report = ns.compare(f, q, xs, comparisons=comparisons, matching=m, progress=False)
        return t.phases, {"logged": len(report.rows) if "outputs" in comparisons else 0,
                          "shadowed": sum(r.shadow_sqnr is not None for r in report.rows)}

    return flow


FLOWS = [
    ("floor", flow_floor, {"eager", "fx"}),
    ("torch-eager outputs", _outputs_flow(tns), {"eager"}),
    ("torch-eager stubs", _stubs_flow(tns), {"eager"}),
    ("torch-fx loggers", flow_torch_fx_loggers, {"eager", "fx"}),
    ("torch-fx shadows", flow_torch_fx_shadows, {"eager", "fx"}),
    ("fxnumeric outputs", _outputs_flow(ns), {"eager", "fx"}),
    ("fxnumeric stubs", _stubs_flow(ns), {"eager", "fx"}),
    ("fxnumeric graph (match+add_*)", flow_fxn_graph, {"eager", "fx"}),
    ("fxnumeric compare (outputs)", _flow_fxn_compare(("outputs",)), {"eager", "fx"}),
    ("fxnumeric compare (outputs+shadows)", _flow_fxn_compare(("outputs", "shadows")), {"eager", "fx"}),
    ("fxnumeric no-op observers + shadows", flow_fxn_shadow_floor, {"eager", "fx"}),
]


def run_flow(fn, f, q, xs, swaps, reps):
    """Median over reps of the flow's total; phases and counts of the median run."""
    results = []
    for _ in range(reps):
        fc, qc = copy.deepcopy(f), copy.deepcopy(q)  # not timed
        # torch's FX suite prints one "skipping shadow loggers ..." line per unshadowable node
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            phases, counts = fn(fc, qc, xs, swaps)
        results.append((sum(phases.values()), phases, counts))
        del fc, qc
    results.sort(key=lambda r: r[0])
    return results[len(results) // 2]


def _measure(flows, name, kind, f, q, xs, swaps, reps, best_of, errors):
    """``{flow name: (total, phases, counts) or the exception it raised}`` for the flows of
    this pair. With ``best_of``, ``best_of`` rounds each running every flow once, in order
    (floor and candidates interleaved: a slow spell of a shared machine hits them alike), each
    flow keeping its fastest round; else each flow's median of ``reps`` runs, flow after flow."""
    found: dict = {}
    rounds = best_of or 1
    for _ in range(rounds):
        for flow_name, fn, kinds in flows:
            if kind not in kinds or isinstance(found.get(flow_name), Exception):
                continue
            try:
                got = run_flow(fn, f, q, xs, swaps, 1 if best_of else reps)
            except Exception as e:  # noqa: BLE001
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                errors.append((name, kind, flow_name, msg))
                if not flow_name.startswith("torch-fx") or kind != "eager":
                    traceback.print_exc()
                found[flow_name] = e
                continue
            if flow_name not in found or got[0] < found[flow_name][0]:
                found[flow_name] = got
    return found


def fmt(v):
    return "" if v is None else f"{v:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="resnet18 only, batches 1 and 4")
    p.add_argument("--models", default=",".join(ALL_MODELS))
    p.add_argument("--batches", default="1,16")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median) for 1-batch runs")
    p.add_argument("--best-of", type=int, default=0,
                   help="rounds, each running every flow once (interleaved), keeping each flow's "
                        "fastest (default: median of --reps at 1 batch, one run otherwise)")
    p.add_argument("--flows", default="",
                   help="comma-separated flow names to run (default all; the floor always runs)")
    p.add_argument("--pairs", default="eager,fx", help="which pairs to build: eager, fx")
    p.add_argument("--cpu-time", action="store_true",
                   help="time this process's CPU time instead of wall time (one thread: other "
                        "jobs on a shared machine move it far less)")
    p.add_argument("--profile", action="store_true",
                   help="cProfile fxnumeric's per-batch path (graph API forwards) on the first model")
    args = p.parse_args()
    global _CLOCK
    if args.cpu_time:
        _CLOCK = time.process_time
    chosen = {name.strip() for name in args.flows.split(",") if name.strip()}
    unknown = chosen - {fl[0] for fl in FLOWS}
    if unknown:
        p.error(f"unknown flows {sorted(unknown)}; choose from {[fl[0] for fl in FLOWS]}")
    flows = [fl for fl in FLOWS if not chosen or fl[0] == "floor" or fl[0] in chosen]
    models = ["resnet18"] if args.quick else args.models.split(",")
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]

    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"threads={torch.get_num_threads()}, cores={os.cpu_count()}, "
          f"python {platform.python_version()}, {platform.machine()}")
    print(f"models={models} batches={batches} reps(1-batch)={args.reps} best-of={args.best_of} "
          f"clock={'process CPU time' if args.cpu_time else 'wall'} loadavg={os.getloadavg()}")

    calib = make_inputs(1, seed=1234)[0]
    rows: dict[int, list] = {b: [] for b in batches}
    counts_rows: list = []
    errors: list = []
    t_start = time.perf_counter()

    for name in models:
        for kind, builder in (("eager", build_eager_pair), ("fx", build_fx_pair)):
            if kind not in args.pairs.split(","):
                continue
            try:
                f, q = builder(name, calib)
            except Exception as e:  # noqa: BLE001
                errors.append((name, kind, "build", f"{type(e).__name__}: {e}"))
                continue
            swaps = swap_list(f)
            warm = make_inputs(1, seed=99)
            with torch.no_grad():
                f(warm[0]), q(warm[0])
            counts: dict[str, dict] = {}
            for nb in batches:
                xs = make_inputs(nb, seed=0)
                reps = args.reps if nb == 1 else 1
                floor_total = None
                measured = _measure(flows, name, kind, f, q, xs, swaps, reps, args.best_of, errors)
                for flow_name, _, kinds in flows:
                    if kind not in kinds:
                        rows[nb].append([name, kind, flow_name, "n/a", "", "", "", ""])
                        continue
                    found = measured[flow_name]
                    if isinstance(found, Exception):
                        rows[nb].append([name, kind, flow_name, f"fails ({type(found).__name__})",
                                         "", "", "", ""])
                        counts.setdefault(flow_name, {"fails": type(found).__name__})
                        continue
                    total, phases, c = found
                    if flow_name == "floor":
                        floor_total = total
                    ratio = total / floor_total if floor_total else None
                    rows[nb].append([name, kind, flow_name, fmt(total), f"{ratio:.2f}x" if ratio else "",
                                     fmt(phases.get("setup")), fmt(phases.get("run")), fmt(phases.get("extract"))])
                    if c:
                        counts[flow_name] = c
                print(f"  done {name}/{kind} batches={nb} ({time.perf_counter() - t_start:.0f}s elapsed)",
                      file=sys.stderr, flush=True)
            cr = [name, kind]
            for flow_name, _, kinds in flows[1:]:
                if kind not in kinds:
                    cr.append("n/a")
                    continue
                c = counts.get(flow_name, {})
                if "fails" in c:
                    cr.append("fails")
                elif "skipped" in c:
                    cr.append(f"{c['logged']} / {c['shadowed']} (+{c['skipped']} skipped)")
                else:
                    cr.append(str(c.get("logged", c.get("shadowed", "?"))))
            counts_rows.append(cr)

            if args.profile and name == models[0] and kind == "fx":
                profile_per_batch(f, q, max(batches))
            del f, q

    headers = ["model", "pair", "flow", "total s", "ratio", "setup s", "run s", "extract s"]
    for nb in batches:
        note = (f"best of {args.best_of} interleaved rounds" if args.best_of
                else f"median of {args.reps}" if nb == 1 else "single run")
        print(f"\n### {nb} batch{'es' if nb > 1 else ''} of 1x3x224x224 ({note})\n")
        print(tabulate(rows[nb], headers=headers, tablefmt="github"))
    print("\n### layers logged / shadowed (len of each tool's result dict)\n")
    print(tabulate(counts_rows, headers=["model", "pair"] + [fl[0] for fl in flows[1:]], tablefmt="github"))
    if errors:
        print("\n### exceptions\n")
        seen = set()
        uniq = []
        for e in errors:
            if e not in seen:
                seen.add(e)
                uniq.append(e)
        print(tabulate(uniq, headers=["model", "pair", "flow", "message"], tablefmt="github"))
    if not args.quick and not chosen:
        print("\n### one-time cost on large generated graphs (stacks of conv1x1-relu-add blocks)\n")
        print(tabulate(large_graph_rows([1000, 5000, 20000]), tablefmt="github", headers=[
            "float fx nodes", "trace s", "match s", "add_loggers s", "add_shadows s", "total s", "µs / node"]))
    print(f"\nwall time {time.perf_counter() - t_start:.0f}s, loadavg={os.getloadavg()}")


def large_graph_rows(sizes: list[int]) -> list[list]:
    """trace, match and instrument generated models of growing size: the cost should grow linearly."""
    import gc

    from _synthetic import make_pair

    rows = []
    for nodes in sizes:
        f, q = make_pair("residual chain", nodes)
        gc.collect()
        gc.freeze()
        t0 = time.perf_counter()
        float_gm = ns.trace(f)
        t1 = time.perf_counter()
        m = ns.match(f, q)
        t2 = time.perf_counter()
        ns.add_loggers(f, q, matching=m)
        t3 = time.perf_counter()
        ns.add_shadows(f, q, matching=m)
        t4 = time.perf_counter()
        gc.unfreeze()
        n = len(float_gm.graph.nodes)
        total = (t2 - t1) + (t3 - t2) + (t4 - t3)  # match traces both models itself
        rows.append([n, fmt(t1 - t0), fmt(t2 - t1), fmt(t3 - t2), fmt(t4 - t3), fmt(total), f"{total * 1e6 / n:.0f}"])
        print(f"  large graph {n} nodes: {total:.1f}s", file=sys.stderr, flush=True)
    return rows


def profile_per_batch(f, q, nb):
    xs = make_inputs(nb, seed=0)
    with torch.no_grad():
        float_gm, quant_gm, shadow_gm, _ = fxn_graph_setup(copy.deepcopy(f), copy.deepcopy(q))
        fxn_graph_run(float_gm, quant_gm, shadow_gm, xs[:1])  # warm-up
        pr = cProfile.Profile()
        pr.enable()
        fxn_graph_run(float_gm, quant_gm, shadow_gm, xs)
        pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(5)
    print(f"\n### cProfile: fxnumeric per-batch path (float_gm, quant_gm, shadow_gm forwards), "
          f"{nb} batches, fx pair\n")
    print(s.getvalue())


if __name__ == "__main__":
    main()
