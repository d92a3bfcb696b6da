"""Facts about SmolLM2 under torchao and torch quantization, for issue 19's integration.

Usage::

    .venv/bin/python benchmarks/llm_facts.py [--repeat 5] [--threads 2] [--part all]

Parts (``--part``): ``load`` (cache build/load times), ``variants`` (fp32: each config's
quantize time, warm forward, KL / top-1 / perplexity against float, weight bits), ``plans``
(the issue's mixed int4/int8 plans through ``FqnToConfig``), ``copy`` (deepcopy and module
moves), ``bf16`` (the same configs on a bfloat16 model), ``memory`` (LogitsAccumulator's
peak memory on a 512 x 49152 batch). The evaluation batch is
:data:`fxnumeric.zoo_llm.LLM_TEXTS` (4 sentences, 22 tokens at most, 81 real tokens),
plus :data:`~fxnumeric.zoo_llm.LLM_HELDOUT_TEXTS` where marked. Times are medians of
``--repeat`` warm runs; the machine is shared, so the load average is printed with them.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from _timing import median_time as _wall_median  # noqa: E402

from fxnumeric.llm_metrics import LogitsAccumulator  # noqa: E402
from fxnumeric.storage import weight_storage_bits  # noqa: E402
from fxnumeric.zoo_llm import (  # noqa: E402
    LLM_HELDOUT_TEXTS,
    LLM_TEXTS,
    llm_batches,
    smollm2,
    smollm2_cache_dir,
)


def _configs():
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerGroup,
    )

    return {
        "int8 weight-only": Int8WeightOnlyConfig(),
        "int8 dyn act + int8 w": Int8DynamicActivationInt8WeightConfig(),
        "int4 g32 (IntxWeightOnly)": IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                          granularity=PerGroup(32)),
    }


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def median_time(fn, repeat):
    """Median wall time; with ``--cpu-time``, the median process CPU time instead (all threads:
    robust to other jobs on a shared machine when run with one thread)."""
    if not _CPU_TIME:
        return _wall_median(fn, repeat)
    fn()
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return sorted(times)[len(times) // 2]


_CPU_TIME = False


def _logits(model, batches):
    with torch.no_grad():
        return [model(**b).logits for b in batches]


def _metrics(ref_logits, model, batches):
    acc = LogitsAccumulator()
    for ref, out, batch in zip(ref_logits, _logits(model, batches), batches, strict=True):
        acc.update(ref, out, attention_mask=batch["attention_mask"],
                   input_ids=batch["input_ids"])
    return acc.values()


def _decoder_linears(model):
    return [m for name, m in model.named_modules()
            if name.startswith("model.layers.") and hasattr(m, "in_features")]


def _bits(model):
    """(actual, nominal) average bits per weight over the 210 decoder-layer Linears."""
    out = []
    for nominal in (False, True):
        bits = numel = 0
        for m in _decoder_linears(model):
            b, n = weight_storage_bits(m, nominal=nominal)
            bits, numel = bits + b, numel + n
        out.append(bits / numel)
    return out


def _quantize(float_model, config, skip_lm_head=False):
    from torchao.quantization import quantize_

    model = copy.deepcopy(float_model)
    start = time.perf_counter()
    if skip_lm_head:
        quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear)
                  and fqn != "lm_head")
    else:
        quantize_(model, config)
    return model, time.perf_counter() - start


def _quantize_dynamic(float_model):
    model = copy.deepcopy(float_model)
    start = time.perf_counter()
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model, time.perf_counter() - start


def part_load(args) -> None:
    start = time.perf_counter()
    smollm2()
    print(f"smollm2() from {smollm2_cache_dir()}: {time.perf_counter() - start:.2f} s "
          "(includes importing transformers when it is the first call)")
    start = time.perf_counter()
    smollm2()
    print(f"smollm2() again: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    smollm2(dtype=torch.bfloat16)
    print(f"smollm2(dtype=torch.bfloat16): {time.perf_counter() - start:.2f} s")


def part_variants(args, float_model, batches, heldout) -> None:
    ref = _logits(float_model, batches)
    ref_held = _logits(float_model, heldout)
    t_float = median_time(lambda: _logits(float_model, batches), args.repeat)
    rows = [("float fp32", "-", t_float * 1e3, 1.0, 0, 0, 0, 1, *_ppl(ref, float_model, batches),
             *_bits(float_model), "-")]
    builds = {name: (lambda c=c: _quantize(float_model, c)) for name, c in _configs().items()}
    builds["int4 g32, lm_head float"] = lambda: _quantize(
        float_model, _configs()["int4 g32 (IntxWeightOnly)"], skip_lm_head=True)
    builds["int8 weight-only, lm_head float"] = lambda: _quantize(
        float_model, _configs()["int8 weight-only"], skip_lm_head=True)
    builds["torch quantize_dynamic qint8"] = lambda: _quantize_dynamic(float_model)
    for name, build in builds.items():
        model, t_quant = build()
        t = median_time(lambda m=model: _logits(m, batches), args.repeat)
        v = _metrics(ref, model, batches)
        held = _metrics(ref_held, model, heldout)
        rows.append((name, f"{t_quant:.2f}", t * 1e3, t / t_float, v["kl"], v["kl_p99"],
                     v["kl_max"], v["top1_agreement"], v["ppl_float"], v["ppl_quantized"],
                     *_bits(model), f"{held['kl']:.3f} / {held['top1_agreement']:.3f}"))
        del model
        gc.collect()
    print(tabulate(rows, headers=("variant", "quantize_ s", "fwd ms", "x float", "KL",
                                  "KL p99", "KL max", "top-1", "ppl float", "ppl quant",
                                  "bits stored", "bits nominal", "held-out KL / top-1"),
                   floatfmt=".3f"))


def _ppl(ref, model, batches):
    v = _metrics(ref, model, batches)
    return v["ppl_float"], v["ppl_quantized"]


def part_plans(args, float_model, batches, heldout) -> None:
    """The issue's table: int4 g32 everywhere, int8 on some Linears, through FqnToConfig."""
    from torchao.quantization import FqnToConfig, quantize_

    configs = _configs()
    int8, int4 = configs["int8 weight-only"], configs["int4 g32 (IntxWeightOnly)"]
    ref, ref_held = _logits(float_model, batches), _logits(float_model, heldout)
    plans = {
        "all int4": (),
        "int8 down_proj": ("mlp.down_proj",),
        "int8 down, v, o": ("mlp.down_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "all int8": ("*",),
    }
    rows = []
    for lm_head in ("int4/int8 like the rest", "float"):
        for name, eight in plans.items():
            mapping = {}
            for fqn, module in float_model.named_modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                if fqn == "lm_head":
                    if lm_head == "float":
                        mapping[fqn] = None
                        continue
                    mapping[fqn] = int8 if eight == ("*",) else int4
                    continue
                mapping[fqn] = int8 if eight == ("*",) or fqn.endswith(eight) else int4
            model = copy.deepcopy(float_model)
            quantize_(model, FqnToConfig(mapping), filter_fn=None)
            v = _metrics(ref, model, batches)
            held = _metrics(ref_held, model, heldout)
            actual, nominal = _bits(model)
            issue = 4.5 + 3.5 * _int8_fraction(model)
            rows.append((name, lm_head, f"{issue:.2f}", f"{nominal:.2f}", f"{actual:.2f}",
                         v["top1_agreement"], v["kl"], held["top1_agreement"], held["kl"]))
            del model
            gc.collect()
    print(tabulate(rows, headers=("plan", "lm_head", "bits (4.5/8)", "bits nominal",
                                  "bits stored", "top-1", "KL", "held-out top-1",
                                  "held-out KL"), floatfmt=".3f"))


def _int8_fraction(model) -> float:
    linears = _decoder_linears(model)
    total = sum(m.weight.numel() for m in linears)
    return sum(m.weight.numel() for m in linears
               if type(m.weight).__name__ == "Int8Tensor") / total


def part_copy(args, float_model, batches) -> None:
    from torchao.quantization import quantize_

    configs = _configs()
    rows = []
    t = median_time(lambda: copy.deepcopy(float_model), args.repeat)
    rows.append(("deepcopy float fp32", t))
    for name, config in configs.items():
        model = copy.deepcopy(float_model)
        quantize_(model, config)
        t = median_time(lambda: copy.deepcopy(model), args.repeat)
        twin = copy.deepcopy(model)
        same = all(torch.equal(a, b) for a, b in zip(_logits(model, batches),
                                                     _logits(twin, batches), strict=True))
        rows.append((f"deepcopy {name} (same logits: {same})", t))
    int4 = copy.deepcopy(float_model)
    quantize_(int4, configs["int4 g32 (IntxWeightOnly)"])
    hybrid = copy.deepcopy(float_model)
    start = time.perf_counter()
    for fqn, module in int4.named_modules():
        if fqn.endswith("mlp.down_proj"):
            hybrid.set_submodule(fqn, module)
    t_move = time.perf_counter() - start
    ok = all(torch.isfinite(x).all() for x in _logits(hybrid, batches))
    rows.append((f"set_submodule 30 int4 down_proj into a float model (runs: {ok})", t_move))
    print(tabulate(rows, headers=("operation", "seconds"), floatfmt=".3f"))


def part_bf16(args, float_model, batches) -> None:
    bf16, _ = smollm2(dtype=torch.bfloat16)
    ref = _logits(float_model, batches)
    t32 = median_time(lambda: _logits(float_model, batches), args.repeat)
    t16 = median_time(lambda: _logits(bf16, batches), args.repeat)
    v = _metrics(ref, bf16, batches)
    rows = [("bf16 float", t16 * 1e3, t16 / t32, v["kl"], v["top1_agreement"], "-")]
    ref16 = _logits(bf16, batches)
    for name, config in _configs().items():
        try:
            model, _ = _quantize(bf16, config)
            t = median_time(lambda m=model: _logits(m, batches), args.repeat)
            v32 = _metrics(ref, model, batches)
            v16 = _metrics(ref16, model, batches)
            dtypes = {p.dtype for p in model.parameters()}
            rows.append((f"bf16 {name}", t * 1e3, t / t32, v32["kl"], v32["top1_agreement"],
                         f"{v16['kl']:.3f} / {v16['top1_agreement']:.3f} {sorted(map(str, dtypes))}"))
        except Exception as exc:  # a config that fails on bf16 is a fact to record
            rows.append((f"bf16 {name}: {type(exc).__name__}: {exc}"[:120], "", "", "", "", ""))
    print(f"fp32 float forward: {t32 * 1e3:.1f} ms")
    print(tabulate(rows, headers=("model", "fwd ms", "x fp32 float", "KL vs fp32",
                                  "top-1 vs fp32", "KL / top-1 vs bf16 float; param dtypes"),
                   floatfmt=".3f"))


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def part_memory(args) -> None:
    gen = torch.Generator().manual_seed(0)
    vocab, tokens = 49152, 512
    f = torch.randn(1, tokens, vocab, generator=gen) * 4
    q = f + torch.randn(1, tokens, vocab, generator=gen) * 0.3
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    mask = torch.ones(1, tokens, dtype=torch.long)
    logits_mib = f.numel() * 4 / 2**20
    rows = []

    def ours(ff, qq):
        acc = LogitsAccumulator()
        acc.update(ff, qq, attention_mask=mask, input_ids=ids)
        return acc.values()

    def naive(ff, qq):  # what a direct implementation allocates
        lp = torch.log_softmax(ff.double(), -1)
        lq = torch.log_softmax(qq.double(), -1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    for dtype in (torch.float32, torch.bfloat16):
        ff, qq = f.to(dtype), q.to(dtype)
        for name, fn in (("LogitsAccumulator.update", ours), ("float64 log_softmax", naive)):
            gc.collect()
            _reset_peak()
            base = _peak_rss_kib()
            t = median_time(lambda: fn(ff, qq), args.repeat)
            rows.append((f"{name} ({str(dtype)[6:]})", (_peak_rss_kib() - base) / 1024, t * 1e3))
    print(f"logits: 2 x (1, {tokens}, {vocab}) float32 = 2 x {logits_mib:.0f} MiB")
    print(tabulate(rows, headers=("computation", "peak RSS added MiB", "ms"), floatfmt=".1f"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with process CPU time instead of wall time")
    parser.add_argument("--part", default="all",
                        choices=("all", "load", "variants", "plans", "copy", "bf16", "memory"))
    args = parser.parse_args()
    global _CPU_TIME
    _CPU_TIME = args.cpu_time
    torch.set_num_threads(args.threads)
    import torchao
    import transformers

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, transformers "
          f"{transformers.__version__}, {torch.get_num_threads()} threads, load {_load()}, "
          f"times: {'CPU' if _CPU_TIME else 'wall'}")
    parts = [args.part] if args.part != "all" else ["load", "variants", "plans", "copy", "bf16",
                                                     "memory"]
    if "load" in parts:
        part_load(args)
    if any(p in parts for p in ("variants", "plans", "copy", "bf16")):
        float_model, tokenizer = smollm2()
        batches = llm_batches(tokenizer, LLM_TEXTS)
        heldout = llm_batches(tokenizer, LLM_HELDOUT_TEXTS)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        print(f"batch {tuple(batches[0]['input_ids'].shape)}, {tokens} real tokens")
        if "variants" in parts:
            part_variants(args, float_model, batches, heldout)
        if "plans" in parts:
            part_plans(args, float_model, batches, heldout)
        if "copy" in parts:
            part_copy(args, float_model, batches)
        if "bf16" in parts:
            part_bf16(args, float_model, batches)
    if "memory" in parts:
        part_memory(args)
    print(f"load at the end {_load()}")


if __name__ == "__main__":
    main()
