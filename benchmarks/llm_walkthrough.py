"""The run behind docs/llm.md: SmolLM2-135M-Instruct in bf16 against torchao int4 g32 and int8
weight-only, every output the document shows, with the time each step took.

Usage::

    .venv/bin/python benchmarks/llm_walkthrough.py [--threads 2] [--target 0.15]

Steps, in the document's order: load the model and the texts; quantize; ``compare`` with the
int4 model (summary, the LLM metrics, the first rows of the layer table, the block table);
``compare`` with both variants; ``advise`` among them for ``metric="kl"``; the advice applied
with ``quantize_`` and measured on the same texts and on held-out ones. Everything runs on the
CPU in this one process; the first call of each torchao kernel is part of the step that makes
it (no warm-up), as a user's first run would be.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from _llm import llm_metrics  # noqa: E402

_TIMES: list[tuple[str, float]] = []


@contextmanager
def step(name: str):
    """Time a step: wall seconds, and the process's CPU seconds (all threads), which other
    jobs on a shared machine barely move."""
    start, cpu = time.perf_counter(), time.process_time()
    yield
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    _TIMES.append((name, seconds, cpu))
    print(f"[{name}: {seconds:.1f} s wall, {cpu:.1f} s CPU]\n", flush=True)


def section(title: str) -> None:
    print(f"\n## {title}\n", flush=True)


def show(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in values.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.15)
    parser.add_argument("--rows", type=int, default=14, help="layer-table rows shown")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import torchao
    import transformers
    from tabulate import tabulate
    from torchao.quantization import quantize_

    import fxnumeric as ns
    from fxnumeric.models import torchao_config, untied_linears
    from fxnumeric.zoo_llm import LLM_HELDOUT_TEXTS, LLM_TEXTS, llm_batches, smollm2

    print(f"torch {torch.__version__}, torchao {torchao.__version__}, transformers "
          f"{transformers.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.2f}")

    section("load")
    with step("smollm2(dtype=torch.bfloat16) from the cache"):
        model, tokenizer = smollm2(dtype=torch.bfloat16)
    data = llm_batches(tokenizer, LLM_TEXTS)
    held_out = llm_batches(tokenizer, LLM_HELDOUT_TEXTS)
    for name, batches in (("LLM_TEXTS", data), ("LLM_HELDOUT_TEXTS", held_out)):
        b = batches[0]
        print(f"{name}: {len(batches)} batch, input_ids {tuple(b['input_ids'].shape)}, "
              f"{int(b['attention_mask'].sum())} real tokens")
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, "
          f"{model.dtype}")
    # the float model is a dequantized Q4_1 GGUF: how many values each block of 32 holds
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj",
                 "model.embed_tokens"):
        blocks = model.get_submodule(name).weight.float().reshape(-1, 32)
        distinct = torch.tensor([len(torch.unique(b)) for b in blocks[:2000]])
        print(f"{name}: at most {int(distinct.max())} distinct values per block of 32 "
              f"(first 2000 blocks)")

    section("quantize")

    def variant(mode: str):
        q = copy.deepcopy(model)
        quantize_(q, torchao_config(mode), filter_fn=untied_linears(q))
        return q

    with step("quantize_ int4 g32 weight-only"):
        q4 = variant("int4-weight-only")
    with step("quantize_ int8 weight-only"):
        q8 = variant("int8-weight-only")
    with step("quantize_ int8 dynamic (int8 activations per token)"):
        q8d = variant("int8-dynamic")

    section("compare: int4 g32")
    with step("ns.compare(model, q4, data)"):
        report = ns.compare(model, q4, data, progress=False)
    print(report.summary())
    print()
    print({k: round(v, 4) for k, v in report.model_output.items()})
    print()
    kinds = Counter(r.kind for r in report.rows)
    print(f"{len(report.rows)} rows: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    print()
    quantized = [r for r in report.rows if r.quantized]
    weights = [r.weight_sqnr for r in quantized]
    gaps = [r.floor_sqnr - r.shadow_sqnr for r in quantized if r.floor_sqnr is not None]
    print(f"{len(quantized)} quantized rows: weight SQNR {min(weights):.2f}-{max(weights):.2f} dB; "
          f"shadow SQNR below floor SQNR by {min(gaps):.2f} to {max(gaps):.2f} dB "
          f"({len(gaps)} with a floor); not quantized: "
          + ", ".join(sorted({r.kind for r in report.rows if not r.quantized})))
    print()
    print("\n".join(report.table().splitlines()[:args.rows + 2]))
    print("...")
    print()
    print(report.block_table())
    print()
    worst = sorted(report.blocks, key=lambda b: b.shadow_sqnr)[:3]
    print("lowest block shadow SQNR: " + ", ".join(f"{b.name} {b.shadow_sqnr:.2f}" for b in worst))

    section("the float residual stream entering each block (real tokens)")
    with torch.no_grad():
        hidden = model(**data[0], output_hidden_states=True, use_cache=False).hidden_states
    real = data[0]["attention_mask"].bool()
    rows = []
    for i, h in enumerate(hidden[:-1]):  # the last one is after the final norm
        x = h[real].float()
        energy = x.pow(2).sum(0)
        top = energy.topk(2)
        rows.append((f"model.layers.{i}", f"{x.pow(2).mean().sqrt():.2f}",
                     f"{x.abs().max():.0f}", str(top.indices.tolist()),
                     f"{float(top.values.sum() / energy.sum()):.3f}"))
    print(tabulate(rows, headers=("entering", "RMS", "max |x|", "top-2 channels",
                                  "their share of the energy")))

    section("compare: int4, int8 and int8 dynamic in one report")
    with step("ns.compare(model, {'int4': q4, 'int8': q8, 'int8-dynamic': q8d}, data)"):
        both = ns.compare(model, {"int4": q4, "int8": q8, "int8-dynamic": q8d}, data,
                          progress=False)
    print(both.summary())
    print()
    rows = [(name, *(f"{v.model_output[k]:.4f}" for k in ("kl", "kl_p99", "kl_max",
                                                          "top1_agreement", "ppl_quantized")))
            for name, v in both.variants.items()]
    print(tabulate(rows, headers=("variant", "kl", "kl_p99", "kl_max", "top1", "ppl quantized")))
    print(f"ppl float {both.model_output['ppl_float']:.4f}")
    print()
    print("\n".join(both.table().splitlines()[:8]))
    print("...")

    section(f"advise: metric='kl', target={args.target}")
    with step("ns.advise(model, {'int4': q4, 'int8': q8}, data, metric='kl')"):
        advice = ns.advise(model, {"int4": q4, "int8": q8}, data, metric="kl",
                           target=args.target, progress=False)
    print(advice.message)
    print(f"search {advice.seconds:.0f} s, {advice.evaluations} hybrids")
    print(repr(advice))
    print()
    print(advice.table())
    print()
    counts = Counter(advice.assignment.values())
    print(f"assignment: {dict(counts)}, bits {advice.bits:.3f}")
    by_kind: dict[str, Counter] = {}
    for path, choice in advice.assignment.items():
        by_kind.setdefault(path.rsplit(".", 1)[-1], Counter())[choice] += 1
    print(tabulate([(k, c.get("int4", 0), c.get("int8", 0), c.get("float", 0))
                    for k, c in by_kind.items()], headers=("Linear", "int4", "int8", "float")))
    print()
    print("\n".join(advice.torchao_lines().splitlines()[:5]))
    print("    ...")

    section("advice applied with quantize_, measured")
    configs = {"int4": torchao_config("int4-weight-only"),
               "int8": torchao_config("int8-weight-only")}
    with step("quantize_(copy, advice.to_torchao(configs), filter_fn=None)"):
        applied = copy.deepcopy(model)
        quantize_(applied, advice.to_torchao(configs), filter_fn=None)
    with step("KL of the applied model, same and held-out texts"):
        rows = []
        for label, batches in (("same text (LLM_TEXTS)", data),
                               ("held-out (LLM_HELDOUT_TEXTS)", held_out)):
            for name, q in (("advised", applied), ("int4", q4), ("int8", q8)):
                v = llm_metrics(model, q, batches)
                rows.append((label, name, f"{v['kl']:.5f}", f"{v['top1_agreement']:.4f}",
                             f"{v['ppl_float']:.2f}", f"{v['ppl_quantized']:.2f}"))
    print(tabulate(rows, headers=("text", "model", "kl", "top1", "ppl float",
                                  "ppl quantized")))

    section("torch.ao quantize_dynamic (float32 model only)")
    model32 = smollm2()[0]
    try:
        torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear})(**data[0])
    except RuntimeError as exc:
        print(f"on the bf16 model: RuntimeError: {exc}")
    with step("quantize_dynamic(float32 model, {nn.Linear}) and its KL"):
        qdyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model32), {torch.nn.Linear})
        rows = [(label, show(llm_metrics(model32, qdyn, batches)))
                for label, batches in (("same text", data), ("held-out", held_out))]
    print(tabulate(rows, headers=("text", "float32 vs quantize_dynamic (lm_head quantized too)")))

    section("times")
    print(tabulate([(n, f"{s:.1f}", f"{c:.1f}") for n, s, c in _TIMES],
                   headers=("step", "wall s", "CPU s")))
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min), "
          f"{os.getloadavg()[2]:.2f} (15 min): other processes share the cores above 0")


if __name__ == "__main__":
    main()
