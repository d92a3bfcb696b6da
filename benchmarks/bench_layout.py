"""What a CNN's outputs comparison pays for its two models' memory layouts.

Usage::

    .venv/bin/python benchmarks/bench_layout.py [--models mobilenet_v2,resnet18] [--pairs fx,eager]
                                               [--profile]

x86 (fbgemm) quantized convolutions return channels-last tensors while a torchvision float
model computes in NCHW. ``compare``'s outputs comparison reads each float activation against
its quantized twin value by value, so one of the two is read across the other's layout: a
transposition. This script takes the (float, dequantized quantized) pairs ``compare`` itself
compared (``keep_activations=True``, one 224 px image, one thread) and times, summed over the
layers, the subtraction the comparison runs as it runs it (across layouts where they differ),
the same subtraction with both sides in one layout, and the ways of putting one side in the
other's layout first: ``Tensor.contiguous``, a blocked 2-D transpose (``copy_`` of a
transposed matrix) and transposing the 1-byte quantized values before dequantizing. The
float and quantized forwards of the image are the floor they are read against. With
``--profile``, ``torch.profiler`` splits a whole ``compare(outputs, shadows)`` of 8 images.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench_overhead import build_eager_pair, build_fx_pair, make_inputs  # noqa: E402
from tabulate import tabulate  # noqa: E402

import fxnumeric as ns  # noqa: E402


def best_ms(fn, reps: int = 20, rounds: int = 5) -> float:
    """Fastest mean of ``rounds`` rounds of ``reps`` calls, in ms."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - start) / reps * 1e3)
    return best


def _blocked(a: torch.Tensor) -> torch.Tensor:
    """A channels-last 4-D ``a`` in NCHW: per image, a copy of the (positions, channels)
    matrix transposed, which torch copies in blocks."""
    n, c, h, w = a.shape
    out = torch.empty(n, c, h * w, dtype=a.dtype)
    for i in range(n):
        out[i].copy_(a[i].permute(1, 2, 0).reshape(h * w, c).t())
    return out.view(n, c, h, w)


def layer_times(float_model, quant_model, image) -> dict[str, float]:
    """Per-image sums over the compared layers (ms), and the floor's forwards."""
    report = ns.compare(float_model, quant_model, [image], comparisons=("outputs",),
                        keep_activations=True, progress=False)
    sums = {"layers": 0, "across layouts": 0, "sub as compared": 0.0, "sub in one layout": 0.0,
            "contiguous": 0.0, "blocked transpose": 0.0, "dequantize": 0.0,
            "uint8 transpose + dequantize": 0.0}
    for row in report.rows:
        if not row.activations:
            continue
        ref, actual = row.activations[0]
        if ref.dim() != 4 or ref.shape != actual.shape:
            continue
        sums["layers"] += 1
        layout = torch.channels_last if ref.is_contiguous(
            memory_format=torch.channels_last) and not ref.is_contiguous() else torch.contiguous_format
        if actual.is_contiguous(memory_format=layout):
            continue
        sums["across layouts"] += 1
        same = actual.contiguous(memory_format=layout)
        quant = torch.quantize_per_tensor(actual, float(actual.abs().max()) / 127 or 1.0, 128,
                                          torch.quint8)
        sums["sub as compared"] += best_ms(lambda r=ref, a=actual: r - a)
        sums["sub in one layout"] += best_ms(lambda r=ref, a=same: r - a)
        sums["contiguous"] += best_ms(lambda a=actual, f=layout: a.contiguous(memory_format=f))
        if layout is torch.contiguous_format and actual.is_contiguous(
                memory_format=torch.channels_last):
            sums["blocked transpose"] += best_ms(lambda a=actual: _blocked(a))
        sums["dequantize"] += best_ms(lambda q=quant: q.dequantize())
        sums["uint8 transpose + dequantize"] += best_ms(
            lambda q=quant, f=layout: q.contiguous(memory_format=f).dequantize())
    with torch.no_grad():
        sums["float forward"] = best_ms(lambda: float_model(image), reps=5)
        sums["quantized forward"] = best_ms(lambda: quant_model(image), reps=5)
    return sums


def profile(float_model, quant_model, images, rows: int = 12) -> str:
    matching = ns.match(float_model, quant_model)
    ns.compare(float_model, quant_model, images[:1], matching=matching, progress=False,
               comparisons=("outputs", "shadows"))
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        ns.compare(float_model, quant_model, images, matching=matching, progress=False,
                   comparisons=("outputs", "shadows"))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", default="mobilenet_v2,resnet18")
    p.add_argument("--pairs", default="fx,eager")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    calib, image = make_inputs(1, seed=1)[0], make_inputs(1, seed=0)[0]
    table = []
    for name in args.models.split(","):
        for kind in args.pairs.split(","):
            build = build_fx_pair if kind == "fx" else build_eager_pair
            float_model, quant_model = build(name, calib)
            sums = layer_times(float_model, quant_model, image)
            floor = sums["float forward"] + sums["quantized forward"]
            table.append([name, kind, f"{sums['across layouts']}/{sums['layers']}",
                          *(f"{sums[k]:.2f}" for k in (
                              "float forward", "quantized forward", "sub as compared",
                              "sub in one layout", "contiguous", "blocked transpose",
                              "dequantize", "uint8 transpose + dequantize")),
                          f"{sums['sub as compared'] / floor:.2f}x"])
            if args.profile:
                print(f"\n### {name} {kind}: torch.profiler, compare(outputs, shadows), 8 images\n")
                print(profile(float_model, quant_model, make_inputs(8, seed=0)))
    print("\n### ms per 224 px image, one thread, summed over the 4-D layers compared "
          "(best of 5 rounds)\n")
    print(tabulate(table, headers=[
        "model", "pair", "across layouts / layers", "float fwd", "quant fwd", "sub as compared",
        "sub in one layout", "contiguous", "blocked transpose", "dequantize",
        "uint8 transpose + dequantize", "sub as compared / floor"], tablefmt="github"))


if __name__ == "__main__":
    main()
