"""What the input guards cost: ``fxnumeric.guards.check_pair`` against ``fxnumeric.match``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_guards.py

``match`` calls ``check_pair`` once on the views of the two traced graphs (it counts quantized
ops, quantize nodes, observers and fake-quants from the op classes the views already hold). The table gives, for torchvision models with
random weights (eager static resnet18, FX mobilenet_v2 and resnet50), the median of 5 runs of
each after a warm-up, and the guard's share of ``match``. One thread.
"""

from __future__ import annotations

import warnings

import torch
from _timing import median_time
from tabulate import tabulate

import fxnumeric as ns
from fxnumeric.guards import check_pair
from fxnumeric.models import build_pair, random_batches


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    batches = random_batches((1, 3, 64, 64), 1)
    pairs = {
        f"{name} ({label})": build_pair(f"torchvision:{name}", quant, batches)
        for name, quant, label in (("resnet18", "static", "eager static"),
                                   ("mobilenet_v2", "fx", "fx"), ("resnet50", "fx", "fx"))
    }
    rows = []
    for label, built in pairs.items():
        f, q = built.float_model, built.quant_model
        fv, qv = ns.GraphView(ns.trace(f)), ns.GraphView(ns.trace(q))
        guard = median_time(lambda fv=fv, qv=qv: check_pair(fv, qv))
        whole = median_time(lambda f=f, q=q: ns.match(f, q))
        rows.append((label, len(qv.nodes), guard * 1e3, whole * 1e3, guard / whole))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=("model", "quant nodes", "check_pair ms", "match ms",
                                  "guard / match"), floatfmt=(".0f", ".0f", ".1f", ".1f", ".3f")))


if __name__ == "__main__":
    main()
