"""Cost and memory of ``compare`` on an LLM (issue 19, part 4): SmolLM2-135M under torchao and
``quantize_dynamic``, float32 and bfloat16.

Usage::

    .venv/bin/python benchmarks/bench_llm.py [--dtype float32,bfloat16]
        [--configs int8-weight-only,int8-dynamic,int4-weight-only,dynamic]
        [--batches 4] [--rounds 2] [--flat 1,10,100] [--flat-configs int8-weight-only]
        [--long 512] [--threads 1] [--parts time,memory,long] [--collector-ab]

Each measurement runs in a fresh process (memory freed by an earlier compare stays in the
process's heap and would hide the next one's peak). In it, the float model
(``fxnumeric.zoo_llm.smollm2(dtype)``) and its quantized copy (``quantize_(m, torchao_config(mode), filter_fn=untied_linears(m))``, or
``quantize_dynamic`` on every ``nn.Linear`` for ``dynamic``) are built, and then:

``time``: ``--batches`` batches of 4 sentences (``LLM_TEXTS`` and ``LLM_HELDOUT_TEXTS`` in
turn). The floor is one warm float forward plus one quantized forward per batch, under
``torch.no_grad()``. Every compare below is the whole call, tracing and pairing included (a
user calls it so), and also, for the 3x target's comparisons, with a ``matching`` built once
before (what compare costs per batch). All candidates run interleaved with the floor, in
``--rounds`` rounds (after one compare of one batch that warms the kernels up); each keeps
its fastest round, and the ratio is
fastest over the floor's fastest.

With ``--collector-ab`` the time part also runs the target's compare as it was before it
deferred Python's young collections (``fxnumeric/_collector.py``), interleaved with the rest.

``memory``: peak RSS added by ``compare(weights, outputs, shadows)`` over 1 batch and over
each ``--flat`` count (batches of 1 sentence), each in its own process after one warm float and
quantized forward (no compare before it): after ``gc.collect()`` the RSS high-water mark is
reset (``/proc/self/clear_refs``), and the peak (``VmHWM``) above the RSS just before is read,
as a fraction of the float model's parameter bytes. The default comparisons
(with ``blocks``) are measured on 1 batch too.

``long``: one sequence of ``--long`` tokens (the texts repeated): floor, compare and its peak
RSS added, beside the peak RSS the plain forwards themselves add (their logits and
activations, which compare's forwards need too).

``--malloc-mmap-threshold BYTES`` sets glibc's ``MALLOC_MMAP_THRESHOLD_`` in the measuring
processes: by default glibc raises its threshold after the first large free, and the freed
1-4 MB buffers of the quantized forwards (a torchao int4 or ``quantize_dynamic`` layer's
dequantized weight) then stay in the heap, so that some runs of the same measurement peak
~320 MiB higher than others.

``--malloc-arena-max N`` sets glibc's ``MALLOC_ARENA_MAX``: past the turns' budget the quantized
model runs in a helper thread (:mod:`fxnumeric.lockstep`), which glibc gives a heap (arena) of
its own, so memory one side frees is not reused by the other and the peak is the two sides'
working sets added; with ``1`` every thread shares one heap.

Every configuration checks that the float and quantized models' parameters keep their dtype
(a bfloat16 model is not upcast) and reads the peak RSS against the size a float32 copy of the
float model would take. Prints a table per part and the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from _timing import reset_peak_rss as _reset_peak  # noqa: E402
from _timing import rss_kib as _rss_kib  # noqa: E402
from tabulate import tabulate  # noqa: E402

CONFIGS = ("int8-weight-only", "int8-dynamic", "int4-weight-only", "dynamic")
CONFIG_NAMES = {
    "int8-weight-only": "Int8WeightOnlyConfig",
    "int8-dynamic": "Int8DynamicActivationInt8WeightConfig",
    "int4-weight-only": "IntxWeightOnlyConfig(int4, PerGroup(32))",
    "dynamic": "quantize_dynamic (qint8)",
}
TARGET = ("weights", "outputs", "shadows")  # the 3x target
CANDIDATES = (("weights",), ("outputs",), ("shadows",), TARGET,
              ("weights", "outputs", "shadows", "blocks"))


def _models(dtype: torch.dtype, config: str):
    from fxnumeric.models import torchao_config, untied_linears
    from fxnumeric.zoo_llm import smollm2

    float_model, tokenizer = smollm2(dtype)
    quant_model = copy.deepcopy(float_model)
    if config == "dynamic":
        from torch.ao.quantization import quantize_dynamic

        quant_model = quantize_dynamic(quant_model, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        from torchao.quantization import quantize_

        quantize_(quant_model, torchao_config(config), filter_fn=untied_linears(quant_model))
    return float_model, quant_model, tokenizer


def _texts(n: int) -> list[str]:
    from fxnumeric.zoo_llm import LLM_HELDOUT_TEXTS, LLM_TEXTS

    texts = list(LLM_TEXTS + LLM_HELDOUT_TEXTS)
    return [texts[i % len(texts)] for i in range(n)]


def _dtypes(model) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})


def _param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def _floor(float_model, quant_model, batches) -> None:
    with torch.no_grad():
        for b in batches:
            float_model(**b)
            quant_model(**b)


def _peak_added(fn) -> tuple[float, float, object]:
    """(MiB added at the peak, seconds, result) of one call of ``fn``."""
    gc.collect()
    _reset_peak()
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return (_rss_kib("VmHWM") - base) / 1024, seconds, result


def child(args) -> None:
    """One (dtype, config) in this process; prints one JSON line."""
    import fxnumeric as ns
    from fxnumeric.zoo_llm import llm_batches

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    float_model, quant_model, tokenizer = _models(dtype, args.config)
    float_dtypes, quant_dtypes = _dtypes(float_model), _dtypes(quant_model)
    param_mib = _param_bytes(float_model) / 2**20
    found: dict = {"dtype": args.dtype, "config": args.config, "param_mib": param_mib,
                   "rss_models_mib": _rss_kib("VmRSS") / 1024}

    def run(batches, comparisons, matching=None):
        return ns.compare(float_model, quant_model, batches, comparisons=comparisons,
                          matching=matching, progress=False)

    if args.memory:  # one measurement in a fresh process: no earlier compare's pages kept
        comparisons, count = args.memory.split(":")
        comparisons = CANDIDATES[-1] if comparisons == "default" else tuple(comparisons.split("+"))
        data = llm_batches(tokenizer, _texts(int(count)), batch_size=1)
        _floor(float_model, quant_model, data[:1])  # warm: what any user has run before
        found["added_mib"] = _peak_added(lambda: run(data, comparisons))[0]
    if args.long_tokens:
        text = " ".join(_texts(64))
        enc = tokenizer([text], truncation=True, max_length=args.long_tokens, return_tensors="pt")
        long = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]
        _floor(float_model, quant_model, long)
        floors = [_peak_added(lambda: _floor(float_model, quant_model, long)) for _ in range(2)]
        comparisons = tuple(args.long_comparisons.split(","))
        added, seconds, report = _peak_added(lambda: run(long, comparisons))
        found["long"] = {"tokens": int(long[0]["input_ids"].shape[1]),
                         "floor_s": min(f[1] for f in floors),
                         "floor_added_mib": max(f[0] for f in floors),
                         "compare_s": seconds, "added_mib": added,
                         "sqnr": report.model_output["sqnr"]}
    if args.time:
        batches = llm_batches(tokenizer, _texts(4 * args.batches), batch_size=4)
        run(batches[:1], CANDIDATES[-1])  # warm-up: the first calls of torch's, torchao's kernels
        matching = ns.match(float_model, quant_model, example_inputs=batches[0])
        candidates = {"floor": lambda: _floor(float_model, quant_model, batches)}
        for comparisons in CANDIDATES:
            candidates[",".join(comparisons)] = lambda c=comparisons: run(batches, c)
        for comparisons in (TARGET,):
            candidates[",".join(comparisons) + " (matching reused)"] = (
                lambda c=comparisons: run(batches, c, matching))
        if args.collector_ab:  # compare without its deferral of Python's collector
            undeferred = ns.compare.__wrapped__
            candidates[",".join(TARGET) + " (collector not deferred)"] = (
                lambda: undeferred(float_model, quant_model, batches, comparisons=TARGET,
                                   progress=False))
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(args.rounds):
            for name, fn in candidates.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
                if "not deferred" in name:
                    gc.collect()  # its garbage, left to the collector: not the next one's time
        found["time"] = best
    found["dtypes_after"] = {"float": _dtypes(float_model), "quant": _dtypes(quant_model)}
    found["dtypes_kept"] = (found["dtypes_after"]["float"] == float_dtypes
                            and found["dtypes_after"]["quant"] == quant_dtypes)
    found["float32_copy_mib"] = sum(p.numel() for p in float_model.parameters()) * 4 / 2**20
    print(json.dumps(found))


def _memory_key(measure: str) -> str:
    comparisons, count = measure.split(":")
    return f"{'default' if comparisons == 'default' else 'target'}, {count}"


def _ratio(times: dict, name: str) -> str:
    return f"{times[name] / times['floor']:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32,bfloat16")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batches", type=int, default=4, help="batches of 4 sentences timed")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds (best of)")
    parser.add_argument("--flat", default="1,10,100", help="batch counts of the memory series")
    parser.add_argument("--flat-configs", default="int8-weight-only",
                        help="configs whose memory is measured over --flat (others: 1 batch)")
    parser.add_argument("--long", type=int, default=512, help="tokens of the long sequence "
                                                              "(0: none)")
    parser.add_argument("--long-configs", default=",".join(CONFIGS),
                        help="configs whose long sequence is measured")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ in the measuring processes "
                             "(0: glibc's dynamic default)")
    parser.add_argument("--malloc-arena-max", type=int, default=0,
                        help="glibc's MALLOC_ARENA_MAX in the measuring processes "
                             "(0: glibc's default, 8 per core)")
    parser.add_argument("--parts", default="time,memory,long")
    parser.add_argument("--collector-ab", action="store_true",
                        help="time: also compare with Python's collector not deferred")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--time", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--long-tokens", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--long-comparisons", default=",".join(TARGET),
                        help="what compare runs on the long sequence (weights,outputs: how "
                             "much of its memory the shadows take)")
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    if args.child:
        args.dtype = args.dtype.split(",")[0]
        child(args)
        return
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} cores, threads={args.threads}, "
          f"MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'dynamic'}, "
          f"MALLOC_ARENA_MAX={args.malloc_arena_max or 'default'}, "
          f"loadavg before {os.getloadavg()}")
    start = time.perf_counter()
    parts = set(args.parts.split(","))
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.malloc_arena_max:
        env["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    results: list[dict] = []
    failed: list[tuple[str, str, str, str]] = []
    for dtype in args.dtype.split(","):
        for config in args.configs.split(","):
            base = [sys.executable, __file__, "--child", "--config", config, "--dtype", dtype,
                    "--threads", str(args.threads)]
            found: dict = {}
            jobs = []
            if "time" in parts:
                jobs.append(("time", ["--time", "--batches", str(args.batches),
                                      "--rounds", str(args.rounds)]
                             + (["--collector-ab"] if args.collector_ab else [])))
            if "long" in parts and args.long and config in args.long_configs.split(","):
                jobs.append(("long", ["--long-tokens", str(args.long),
                                      "--long-comparisons", args.long_comparisons]))
            if "memory" in parts:
                counts = args.flat.split(",") if config in args.flat_configs.split(",") else ["1"]
                for measure in ["default:1"] + [f"weights+outputs+shadows:{n}" for n in counts]:
                    jobs.append((measure, ["--memory", measure]))
            for what, extra in jobs:
                done = subprocess.run(base + extra, capture_output=True, text=True, env=env)
                if done.returncode:  # reported beside the tables (bf16 + quantize_dynamic)
                    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
                    failed.append((dtype, config, what, lines[-1][:300] if lines else "?"))
                    break
                one = json.loads(done.stdout.strip().splitlines()[-1])
                if "added_mib" in one:
                    found.setdefault("memory", {})[_memory_key(what)] = one.pop("added_mib")
                for key, value in one.items():
                    if key == "dtypes_kept":
                        found[key] = found.get(key, True) and value
                    else:
                        found.setdefault(key, value)
            if "dtype" in found:
                results.append(found)
            print(f"  done {dtype} {config} ({time.perf_counter() - start:.0f}s)",
                  file=sys.stderr, flush=True)
    parts = set(args.parts.split(","))
    if "time" in parts and results:
        names = list(results[0]["time"])
        print(f"\n## compare / floor (SmolLM2, {args.batches} batches of 4 sentences, best of "
              f"{args.rounds} rounds interleaved; target: weights,outputs,shadows <= 3x)\n")
        rows = [[r["dtype"], r["config"], f"{r['time']['floor']:.2f}"]
                + [_ratio(r["time"], n) for n in names[1:]] for r in results if "time" in r]
        print(tabulate(rows, headers=["dtype", "config", "floor s", *names[1:]],
                       tablefmt="github"))
    if "memory" in parts and results:
        keys = sorted({k for r in results for k in r.get("memory", {})},
                      key=lambda k: (k.split(",")[0] != "default", int(k.split(", ")[1])))
        print("\n## peak RSS added by compare, MiB (fraction of the float model's parameter "
              "bytes; target <= 0.5x, flat in the batch count; batches of 1 sentence)\n")
        rows = [[r["dtype"], r["config"], f"{r['param_mib']:.0f}"]
                + [(f"{r['memory'][k]:.0f} ({r['memory'][k] / r['param_mib']:.2f}x)"
                    if k in r.get("memory", {}) else "") for k in keys] for r in results]
        print(tabulate(rows, headers=["dtype", "config", "float params MiB",
                                      *[f"{k} batch(es)" for k in keys]], tablefmt="github"))
    if "long" in parts and args.long and results:
        print("\n## one long sequence (weights,outputs,shadows)\n")
        rows = [[r["dtype"], r["config"], r["long"]["tokens"], f"{r['long']['floor_s']:.2f}",
                 f"{r['long']['compare_s']:.2f}",
                 f"{r['long']['compare_s'] / r['long']['floor_s']:.2f}x",
                 f"{r['long']['floor_added_mib']:.0f}",
                 f"{r['long']['added_mib']:.0f} ({r['long']['added_mib'] / r['param_mib']:.2f}x)",
                 f"{r['long']['sqnr']:.2f}"] for r in results if "long" in r]
        print(tabulate(rows, headers=["dtype", "config", "tokens", "floor s", "compare s",
                                      "ratio", "forwards' own peak RSS added MiB",
                                      "compare's peak RSS added MiB", "logits SQNR dB"],
                       tablefmt="github"))
    print("\n## dtypes (a bfloat16 model is not upcast)\n")
    rows = [[r["dtype"], r["config"], ",".join(r["dtypes_after"]["float"]),
             ",".join(r["dtypes_after"]["quant"]), "yes" if r["dtypes_kept"] else "NO",
             f"{r['float32_copy_mib']:.0f}"] for r in results]
    print(tabulate(rows, headers=["dtype", "config", "float params after", "quant params after",
                                  "unchanged", "a float32 copy would add MiB"],
                   tablefmt="github"))
    if failed:
        print("\n## failed\n")
        print(tabulate(failed, headers=["dtype", "config", "measure", "last line of stderr"],
                       tablefmt="github"))
    print(f"\nwall time {time.perf_counter() - start:.0f}s, loadavg after {os.getloadavg()}")


if __name__ == "__main__":
    main()
