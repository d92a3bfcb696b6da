"""What the eager API's per-call check of a prepared model costs (issue 19, the eager target).

A model prepared by ``prepare_model_outputs`` refuses to run when a submodule its graph calls
was replaced since. Prints that check's time per call for quantizable mobilenet_v2's float
and quantized models: the parents' ``_modules`` links it reads now (``edges``), and the walk of
every path with ``get_submodule`` it did before (``walk``)::

    .venv/bin/python benchmarks/eager_check_cost.py
"""

from __future__ import annotations

import copy
import timeit
import warnings

import torch
import torchvision

import fxnumeric as ns


def _best_ms(fn, number: int = 100) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e3


def main() -> None:
    warnings.filterwarnings("ignore")  # torch's eager-quantization deprecation, here only
    torch.manual_seed(0)
    model = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False).eval()
    model.fuse_model()
    model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    prepared = torch.ao.quantization.prepare(copy.deepcopy(model))
    prepared(torch.randn(1, 3, 224, 224))
    quantized = torch.ao.quantization.convert(prepared)
    ns.prepare_model_outputs(model, quantized)
    for side, m in (("float", model), ("quantized", quantized)):
        installed = m.__dict__["forward"]
        edges = installed.edges
        links = _best_ms(lambda: any(p._modules.get(n) is not c for p, n, c in edges))
        calls, root = installed.calls, installed.model
        walk = _best_ms(lambda: [root.get_submodule(path) is module for path, module in calls])
        print(f"{side}: edges {len(edges)} links {links:.3f} ms; "
              f"walk {len(calls)} paths {walk:.3f} ms")


if __name__ == "__main__":
    main()
