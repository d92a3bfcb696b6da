"""What the input guards cost: ``fxnumeric.guards.check_pair`` against ``fxnumeric.match``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_guards.py

``match`` calls ``check_pair`` once on the two traced graphs (it counts quantized ops,
quantize nodes, observers and fake-quants). The table gives, for torchvision models with
random weights (eager static resnet18, FX mobilenet_v2 and resnet50), the median of 5 runs of
each after a warm-up, and the guard's share of ``match``. One thread.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch
import torchvision
from tabulate import tabulate
from torch.ao import quantization as tq
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxnumeric as ns
from fxnumeric.guards import check_pair
from fxnumeric.models import build_pair, random_batches


def _median(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fx_pair(name: str):
    torch.manual_seed(0)
    f = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.rand(1, 3, 64, 64)
    prepared = prepare_fx(copy.deepcopy(f), tq.get_default_qconfig_mapping("x86"), (x,))
    prepared(x)
    return f, convert_fx(prepared)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    built = build_pair("torchvision:resnet18", "static", random_batches((1, 3, 64, 64), 1))
    pairs = {
        "resnet18 (eager static)": (built.float_model, built.quant_model),
        "mobilenet_v2 (fx)": _fx_pair("mobilenet_v2"),
        "resnet50 (fx)": _fx_pair("resnet50"),
    }
    rows = []
    for label, (f, q) in pairs.items():
        fg, qg = ns.trace(f), ns.trace(q)
        guard = _median(lambda fg=fg, qg=qg: check_pair(fg, qg))
        whole = _median(lambda f=f, q=q: ns.match(f, q))
        rows.append((label, len(qg.graph.nodes), guard * 1e3, whole * 1e3, guard / whole))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=("model", "quant nodes", "check_pair ms", "match ms",
                                  "guard / match"), floatfmt=(".0f", ".0f", ".1f", ".1f", ".3f")))


if __name__ == "__main__":
    main()
