"""Beyond one machine's memory and one process: offloaded float models and data-parallel ranks.

Usage::

    .venv/bin/python benchmarks/bench_scale.py [--model smollm2|tiny] [--part offload,ranks]
                                               [--batches 16] [--threads 2]

``offload``: SmolLM2-135M (float32, 513 MiB) against its torchao ``Int8WeightOnlyConfig`` model
in memory, the float model either in memory or loaded with ``from_pretrained(checkpoint,
device_map={"": "disk"}, offload_folder=...)`` (accelerate's hooks read each weight from disk
at each call). Each configuration runs in a fresh process: the models are built, compared
once on one batch (warm-up), garbage is collected, the RSS high-water mark is reset (``/proc/self/clear_refs``), then ``compare``
runs once (timed) and the peak RSS above the baseline is read from ``VmHWM``. The offloaded
report is checked against the in-memory one (largest relative difference of any number).

``ranks``: the same pair in memory over ``--batches`` batches of 2 sentences, ``compare``
timed in one process (``--threads`` threads and 1 thread) and under ``torchrun
--nproc_per_node 2`` (1 thread per rank, gloo); rank 0's report is checked against the
one-process report. Times are of ``compare`` alone (models built and warmed up on one batch
before), the wall time of the whole command beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _timing import reset_peak_rss as _reset_peak  # noqa: E402
from _timing import rss_kib as _rss_kib  # noqa: E402
from tabulate import tabulate  # noqa: E402

_CHECKPOINT = "checkpoint"


def _float_model(name: str):
    from fxnumeric.zoo_llm import smollm2, tiny_llama

    if name == "tiny":
        return tiny_llama()
    return smollm2()[0]


def _batches(name: str, n: int, per_batch: int = 2):
    from fxnumeric.zoo_llm import (
        LLM_HELDOUT_TEXTS,
        LLM_TEXTS,
        llm_batches,
        smollm2_cache_dir,
        tiny_llm_batches,
    )

    if name == "tiny":
        return tiny_llm_batches(n=n, batch_size=per_batch)
    from transformers import AutoTokenizer

    _float_model(name)  # builds the cache on first use
    tokenizer = AutoTokenizer.from_pretrained(smollm2_cache_dir())
    texts = list(LLM_TEXTS + LLM_HELDOUT_TEXTS)
    wanted = [texts[i % len(texts)] for i in range(n * per_batch)]
    return llm_batches(tokenizer, wanted, batch_size=per_batch)


def _quantized(float_model):
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    q = copy.deepcopy(float_model)
    quantize_(q, Int8WeightOnlyConfig())
    return q


def _checkpoint(name: str, work: Path) -> Path:
    path = work / f"{name}-{_CHECKPOINT}"
    if not (path / "config.json").exists():
        _float_model(name).save_pretrained(path)
    return path


def child_offload(args) -> None:
    """One configuration in this process; prints a JSON line."""
    import fxnumeric as ns

    torch.set_num_threads(args.threads)
    batches = _batches(args.model, args.batches)
    float_model = _float_model(args.model)
    quant_model = _quantized(float_model)
    if args.where == "disk":
        from transformers import AutoModelForCausalLM

        del float_model
        float_model = AutoModelForCausalLM.from_pretrained(
            args.checkpoint, device_map={"": "disk"},
            offload_folder=tempfile.mkdtemp(dir=args.work))
    comparisons = tuple(args.comparisons.split(","))
    ns.compare(float_model, quant_model, batches[:1], comparisons=comparisons,
               progress=False)  # warm-up: first calls of torch and torchao kernels
    gc.collect()
    _reset_peak()
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    report = ns.compare(float_model, quant_model, batches, comparisons=comparisons,
                        progress=False)
    seconds = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    Path(args.out).write_bytes(pickle.dumps(report))
    print(json.dumps({"where": args.where, "comparisons": args.comparisons,
                      "baseline_mib": base / 1024, "added_mib": (peak - base) / 1024,
                      "seconds": seconds, "sqnr": report.model_output["sqnr"]}))


def _numbers(x, path=""):
    """Every number of a report, by path (for the largest relative difference)."""
    import dataclasses

    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            if f.name not in ("activations", "torch_version"):
                yield from _numbers(getattr(x, f.name), f"{path}.{f.name}")
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}[{k}]")
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, float(x)


def max_relative_difference(a, b) -> float:
    na, nb = dict(_numbers(a)), dict(_numbers(b))
    if na.keys() != nb.keys():
        return math.inf
    worst = 0.0
    for key, x in na.items():
        y = nb[key]
        if (math.isnan(x) and math.isnan(y)) or x == y:
            continue
        worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-300))
    return worst


def part_offload(args, work: Path) -> None:
    checkpoint = _checkpoint(args.model, work)
    rows, reports = [], {}
    for comparisons in ("weights,outputs,shadows", "outputs,shadows"):
        for where in ("memory", "disk"):
            out = work / f"offload-{where}-{comparisons}.pkl"
            cmd = [sys.executable, __file__, "--child", "offload", "--where", where,
                   "--comparisons", comparisons, "--model", args.model, "--out", str(out),
                   "--checkpoint", str(checkpoint), "--work", str(work),
                   "--batches", str(args.batches), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
            reports[where, comparisons] = pickle.loads(out.read_bytes())
            diff = max_relative_difference(reports[where, comparisons],
                                           reports["memory", comparisons])
            rows.append((where, comparisons, f"{found['baseline_mib']:.0f}",
                         f"{found['added_mib']:.0f}", f"{found['seconds']:.1f}",
                         f"{found['sqnr']:.3f}", f"{diff:.1e}"))
    print(f"## offload ({args.model}, {args.batches} batches of 2 sentences, torchao int8 "
          f"weight-only in memory, {args.threads} threads)\n")
    print(tabulate(rows, headers=("float model", "comparisons", "RSS before MiB",
                                  "peak RSS added MiB", "compare s", "output SQNR dB",
                                  "max rel diff vs memory"), tablefmt="github"))


def child_ranks(args) -> None:
    """compare in this process (under torchrun: one rank); prints a JSON line on rank 0."""
    import fxnumeric as ns
    from fxnumeric.distributed import torchrun_group

    torch.set_num_threads(args.threads)
    batches = _batches(args.model, args.batches)
    float_model = _float_model(args.model)
    quant_model = _quantized(float_model)
    ns.compare(float_model, quant_model, batches[:1], progress=False,
               distributed=False)  # warm-up: first calls of torch and torchao kernels
    with torchrun_group() as ranks:
        start = time.perf_counter()
        report = ns.compare(float_model, quant_model, batches, progress=False)
        seconds = time.perf_counter() - start
    if ranks.rank == 0:
        Path(args.out).write_bytes(pickle.dumps(report))
        print(json.dumps({"seconds": seconds, "batches": report.batches}))


def part_ranks(args, work: Path) -> None:
    rows, reports = [], {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    runs = [(f"1 process, {args.threads} threads", args.threads, False),
            ("1 process, 1 thread", 1, False), ("torchrun, 2 ranks x 1 thread", 1, True)]
    for label, threads, parallel in runs:
        out = work / f"ranks-{threads}-{parallel}.pkl"
        child = [__file__, "--child", "ranks", "--model", args.model, "--out", str(out),
                 "--batches", str(args.batches), "--threads", str(threads)]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *child]
               if parallel else [sys.executable, *child])
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        found = json.loads(done.stdout.strip().splitlines()[-1])
        reports[label] = pickle.loads(out.read_bytes())
        diff = max_relative_difference(reports[label], reports[runs[1][0]]) if (
            label != runs[0][0]) else math.nan
        rows.append((label, found["batches"], f"{found['seconds']:.1f}", f"{wall:.1f}",
                     f"{diff:.1e}"))
    print(f"## ranks ({args.model}, {args.batches} batches of 2 sentences, torchao int8 "
          "weight-only, weights+outputs+shadows)\n")
    print(tabulate(rows, headers=("run", "batches", "compare s", "command wall s",
                                  "max rel diff vs 1 process 1 thread"), tablefmt="github"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--part", default="offload,ranks")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for checkpoints and offloads")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--where", default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--comparisons", default="weights,outputs,shadows",
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    if args.child == "offload":
        child_offload(args)
        return
    if args.child == "ranks":
        child_ranks(args)
        return
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores\n")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        for part in args.part.split(","):
            {"offload": part_offload, "ranks": part_ranks}[part](args, work)
            print()


if __name__ == "__main__":
    main()
