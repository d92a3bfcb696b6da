"""Several quantized variants in one ``compare`` against one ``compare`` per variant.

Run from the repository root::

    .venv/bin/python benchmarks/bench_variants.py            # ~2 min

``compare(float_model, {"fx": q1, "pt2e": q2, "dynamic": q3}, data)`` runs the float model once
per batch for every variant whose matching captured it alike (one float capture), where three
separate ``compare`` calls run it three times. The table gives, side by side in one run, for
torchvision resnet18 (random weights, BatchNorm statistics from seeded batches; FX x86,
pt2e XNNPACK and dynamic variants, as ``fxnumeric report --quant fx,pt2e,dynamic`` builds
them) and the tiny Llama of :mod:`fxnumeric.zoo_llm` (torchao int4 g32, int8 weight-only, int8
dynamic): how many float forwards each way ran per batch (counted at
``fxnumeric.compare.run_model``), the wall time of each way (median of 3 after a warm-up, the
matchings built once beforehand so both ways time the same work: instrumenting, running,
collecting), and their ratio. It also checks that every variant's report equals the one
comparing it alone. One thread.
"""

from __future__ import annotations

import copy
import importlib
import warnings
from collections import Counter
from typing import Any

import torch
from _timing import timed
from tabulate import tabulate

import fxnumeric as ns
from fxnumeric.models import build_variants, random_batches

compare_module = importlib.import_module("fxnumeric.compare")  # the module, not the function


def _resnet18() -> tuple[Any, dict[str, Any], list[Any]]:
    calibration = random_batches((2, 3, 64, 64), 2, seed=1)
    float_model, variants, _ = build_variants("torchvision:resnet18", ["fx", "pt2e", "dynamic"],
                                              calibration)
    return float_model, variants, random_batches((2, 3, 64, 64), 8)


def _tiny_llama() -> tuple[Any, dict[str, Any], list[Any]]:
    from torchao.quantization import quantize_

    from fxnumeric.models import torchao_config, untied_linears
    from fxnumeric.zoo_llm import tiny_llama, tiny_llm_batches

    float_model = tiny_llama()
    variants = {}
    for mode in ("int4-weight-only", "int8-weight-only", "int8-dynamic"):
        q = copy.deepcopy(float_model)
        quantize_(q, torchao_config(mode), filter_fn=untied_linears(q))
        variants[mode] = q
    return float_model, variants, tiny_llm_batches(n=8)


def _counting() -> Counter[str]:
    """Count ``run_model`` calls in ``fxnumeric.compare`` by model side, from now on."""
    calls: Counter[str] = Counter()
    original = compare_module.run_model

    def run_model(model: Any, batch: Any, *, which: str = "model") -> Any:
        calls["float" if which == "float" else "quantized"] += 1
        return original(model, batch, which=which)

    compare_module.run_model = run_model  # type: ignore[assignment]
    return calls


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    calls = _counting()
    rows = []
    for label, build in (("resnet18 (fx, pt2e, dynamic)", _resnet18),
                         ("tiny Llama (torchao int4, int8, int8-dynamic)", _tiny_llama)):
        float_model, variants, data = build()
        matchings = {name: ns.match(float_model, q, data[0]) for name, q in variants.items()}

        def together() -> Any:
            return ns.compare(float_model, variants, data, matching=matchings)

        def apart() -> dict[str, Any]:
            return {name: ns.compare(float_model, q, data, matching=matchings[name])
                    for name, q in variants.items()}

        calls.clear()
        joint = together()
        float_together = calls["float"] / joint.batches
        calls.clear()
        alone = apart()
        float_apart = calls["float"] / joint.batches
        assert all(alone[name] == joint.variants[name] for name in variants), label
        time_together, _ = timed(together, 3)
        time_apart, _ = timed(apart, 3)
        rows.append((label, joint.batches, float_together, float_apart, time_together,
                     time_apart, time_apart / time_together))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=("model (variants)", "batches", "float runs / batch, together",
                                  "float runs / batch, apart", "together s", "apart s",
                                  "apart / together"),
                   floatfmt=(".0f", ".0f", ".0f", ".0f", ".2f", ".2f", ".2f")))


if __name__ == "__main__":
    main()
