"""Peak memory over many batches: torch eager Numeric Suite vs fxnumeric.compare.

Usage::

    .venv/bin/python benchmarks/bench_memory.py [--quick] [--batches 10,500] [--input-size 64]
                                                [--flows floor,eager,...]

Pair: torchvision.models.quantization.resnet18(weights=None, quantize=False), seed 0, eval,
fuse_model(), qconfig get_default_qconfig("x86"), prepare / calibrate (4 seeded batches) /
convert. The float side is the fused float model. Inputs are 1x3xSxS (default S=64), seeded,
generated one at a time while the flow runs (so the inputs themselves are never all alive).

Flows (each in a fresh subprocess, torch.set_num_threads(1)):

* ``floor``: float forward + quantized forward per batch, under torch.no_grad().
* ``eager``: torch.ao.ns._numeric_suite.prepare_model_outputs(float, q) + forwards of both per
  batch + get_matching_activations at the end, run as in the tutorial (grad mode left on).
* ``eager-nograd``: the same with the forwards under torch.no_grad().
* ``fxn-outputs``: fxnumeric.compare(float, q, data, comparisons=("outputs",)).
* ``fxn-all``: fxnumeric.compare(float, q, data) (weights, outputs, shadows).
* ``fxn-keep``: fxnumeric.compare(..., comparisons=("outputs",), keep_activations=True).

Each child builds the pair, records ru_maxrss as the baseline, runs the flow (timed), keeps
its result alive, and reports ru_maxrss again as the peak. ru_maxrss is the process's high-water
RSS (KiB on Linux), so "growth" is what the flow added above everything seen while building.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

FLOWS = ["floor", "eager", "eager-nograd", "fxn-outputs", "fxn-all", "fxn-keep"]
FLOW_DESC = {
    "floor": "float + quant forwards (no_grad)",
    "eager": "torch eager suite (grad on, as tutorial)",
    "eager-nograd": "torch eager suite (no_grad)",
    "fxn-outputs": "fxnumeric.compare outputs",
    "fxn-all": "fxnumeric.compare weights+outputs+shadows",
    "fxn-keep": "fxnumeric.compare outputs, keep_activations=True",
}


def maxrss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)


def current_rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except OSError:
        return None


# ---------------------------------------------------------------- child


def build_pair(size: int):
    import torch
    import torchvision
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    torch.manual_seed(0)
    m = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    m.fuse_model()
    float_model = copy.deepcopy(m)
    m.qconfig = get_default_qconfig("x86")
    prepare(m, inplace=True)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _ in range(4):
            m(torch.randn(1, 3, size, size, generator=g))
    convert(m, inplace=True)
    return float_model.eval(), m.eval()


def batches(n: int, size: int):
    import torch

    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield torch.randn(1, 3, size, size, generator=g)


class _Sized:
    """Seeded batches generated lazily, with a len() (like a DataLoader)."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return batches(self.n, self.size)


def run_child(flow: str, n: int, size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    f, q = build_pair(size)
    baseline = maxrss_mib()
    baseline_cur = current_rss_mib()
    t0 = time.perf_counter()
    keep = None
    info: dict = {}
    if flow == "floor":
        with torch.no_grad():
            for x in batches(n, size):
                f(x)
                q(x)
    elif flow in ("eager", "eager-nograd"):
        import torch.ao.ns._numeric_suite as tns

        tns.prepare_model_outputs(f, q)
        ctx = torch.no_grad() if flow == "eager-nograd" else torch.enable_grad()
        with ctx:
            for x in batches(n, size):
                f(x)
                q(x)
        keep = tns.get_matching_activations(f, q)
        info["layers"] = len(keep)
        info["logged_per_layer"] = len(next(iter(keep.values()))["float"]) if keep else 0
    elif flow.startswith("fxn-"):
        import fxnumeric

        comps = ("weights", "outputs", "shadows") if flow == "fxn-all" else ("outputs",)
        keep = fxnumeric.compare(f, q, _Sized(n, size), comparisons=comps,
                                 keep_activations=(flow == "fxn-keep"), progress=False)
        info["layers"] = len(keep.rows)
        info["report_batches"] = keep.batches
    else:
        raise SystemExit(f"unknown flow {flow!r}")
    elapsed = time.perf_counter() - t0
    peak = maxrss_mib()
    end_cur = current_rss_mib()
    del keep
    return {
        "flow": flow, "batches": n, "baseline": baseline, "peak": peak, "growth": peak - baseline,
        "time": elapsed, "baseline_cur": baseline_cur, "end_cur": end_cur, **info,
    }


# ---------------------------------------------------------------- parent


def spawn(flow: str, n: int, size: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", flow, "--batches", str(n),
           "--input-size", str(size)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"flow": flow, "batches": n, "error": f"timeout after {timeout:.0f}s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"flow": flow, "batches": n, "error": f"exit {p.returncode}: {tail[:120]}"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            r["process_time"] = time.perf_counter() - t0
            return r
    return {"flow": flow, "batches": n, "error": "no RESULT line"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default=None, help="comma-separated batch counts (default 10,500)")
    ap.add_argument("--input-size", type=int, default=64, help="input is 1x3xSxS (default 64)")
    ap.add_argument("--quick", action="store_true", help="10 and 50 batches")
    ap.add_argument("--flows", default=",".join(FLOWS), help="comma-separated subset of " + ",".join(FLOWS))
    ap.add_argument("--timeout", type=float, default=300.0, help="per-child timeout in seconds")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        n = int(args.batches or 10)
        print("RESULT " + json.dumps(run_child(args.child, n, args.input_size)), flush=True)
        return

    import torch
    import torchvision
    from tabulate import tabulate

    counts = [int(b) for b in (args.batches or ("10,50" if args.quick else "10,500")).split(",")]
    flows = [f for f in args.flows.split(",") if f]
    for fl in flows:
        if fl not in FLOWS:
            raise SystemExit(f"unknown flow {fl!r}; choose from {', '.join(FLOWS)}")
    print(f"date {datetime.date.today()}  torch {torch.__version__}  torchvision {torchvision.__version__}  python {platform.python_version()}  "
          f"{platform.machine()}  cpus {os.cpu_count()}  threads per child 1 (torch.set_num_threads(1))")
    print(f"pair: torchvision quantizable resnet18 eager (fused float vs x86 converted), "
          f"input 1x3x{args.input_size}x{args.input_size}")
    t_all = time.perf_counter()
    results: dict[tuple[str, int], dict] = {}
    for fl in flows:
        for n in counts:
            r = spawn(fl, n, args.input_size, args.timeout)
            results[(fl, n)] = r
            msg = r.get("error") or f"peak {r['peak']:.1f} MiB growth {r['growth']:.1f} MiB time {r['time']:.1f}s"
            print(f"  [{fl} x{n}] {msg}", file=sys.stderr, flush=True)

    rows = []
    for fl in flows:
        for n in counts:
            r = results[(fl, n)]
            if "error" in r:
                rows.append([fl, n, "-", "-", "-", "-", r["error"]])
                continue
            note = f"{r['layers']} layers" if "layers" in r else ""
            if "logged_per_layer" in r:
                note += f", {r['logged_per_layer']} tensors/layer kept"
            rows.append([fl, n, f"{r['baseline']:.1f}", f"{r['peak']:.1f}", f"{r['growth']:.1f}",
                         f"{r['time']:.1f}", note])
    print()
    print(tabulate(rows, headers=["flow", "batches", "baseline MiB", "peak MiB", "growth MiB", "time s", "notes"],
                   tablefmt="github"))

    if len(counts) >= 2:
        lo, hi = min(counts), max(counts)
        ratio_rows = []
        for fl in flows:
            a, b = results[(fl, lo)], results[(fl, hi)]
            if "error" in a or "error" in b:
                ratio_rows.append([fl, FLOW_DESC[fl], "-", "-", "-"])
                continue
            g = (f"{b['growth'] / a['growth']:.2f}" if a["growth"] >= 1.0 else f"n/a ({a['growth']:.1f} -> {b['growth']:.1f})")
            per_batch = (b["growth"] - a["growth"]) / (hi - lo) * 1024.0
            ratio_rows.append([fl, FLOW_DESC[fl], f"{b['peak'] / a['peak']:.2f}", g, f"{per_batch:.1f}"])
        print()
        print(tabulate(ratio_rows, headers=["flow", "what", f"peak({hi})/peak({lo})", f"growth({hi})/growth({lo})",
                                            "KiB per extra batch"], tablefmt="github"))
    print(f"\nwall time {time.perf_counter() - t_all:.0f}s, loadavg {tuple(round(x, 2) for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
