"""pt2e figures: coverage, torchao's numeric debugger beside fxnumeric, match time vs convert_fx.

Run from the repository root (needs torchao)::

    .venv/bin/python benchmarks/bench_pt2e.py              # resnet18, mobilenet_v2, transformer
    .venv/bin/python benchmarks/bench_pt2e.py --repeat 3 --models resnet18

For each model (seeded random weights and BatchNorm statistics, 1x3x64x64 inputs; the
transformer block takes 2x8x32):

1. Pairing of ``export(model)`` with its ``convert_pt2e`` form (XNNPACK symmetric): pairs,
   unpaired float / quantized nodes, coverage of quantized ops.
2. The oracle table: torchao's ``prepare_for_propagation_comparison`` /
   ``extract_results_from_loggers`` / ``compare_results`` on the same pair and one batch,
   beside fxnumeric's per-pair output SQNR, by category (see ``tests/_pt2e_models.py``):
   ``same`` (the same two values: max |difference| with torchao's SQNR definition, which takes
   the quantized tensor as signal), ``bn-folded`` (torchao compares the float conv before its
   BatchNorm with the BN-folded quantized conv; both values listed with ``--folded``),
   ``in-place`` (torchao's logged tensor was overwritten by the next in-place op), ``other``
   (torchao logs a different quantized node than the value the next op reads).
3. ``fxnumeric.match`` time on the pt2e pair (float ``ep.module()`` vs ``convert_pt2e``) against
   ``fxnumeric.match`` on the same float model quantized with ``prepare_fx``/``convert_fx``
   (x86 default qconfig mapping; the float model traced beforehand by ``fxnumeric.trace``),
   median of ``--repeat`` runs after a warm-up, one thread.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import _pt2e_models as M  # noqa: E402
import torch  # noqa: E402
from _timing import median_time  # noqa: E402
from tabulate import tabulate  # noqa: E402

import fxnumeric as fxn  # noqa: E402


def _fx_pair(name: str):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    float_model = M.model(name)
    data = M.batches(name, 2)
    prepared = prepare_fx(copy.deepcopy(float_model), get_default_qconfig_mapping("x86"),
                          (data[0],))
    for x in data:
        prepared(x)
    return fxn.trace(float_model), convert_fx(prepared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "transformer"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--folded", action="store_true", help="list every BN-folded layer")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    coverage, oracle, timing, folded = [], [], [], []
    for name in args.models:
        ep, float_gm, quant = M.pt2e_pair(name)
        m = fxn.match(ep, quant)
        coverage.append((name, len(m.pairs), len(m.unmatched_float), len(m.unmatched_quant),
                         f"{m.coverage:.0%}"))
        rows = M.oracle_rows(ep, quant, M.batches(name, 1, seed=5)[0])
        cats = Counter(r[-1] for r in rows)
        same = [abs(r[4] - r[5]) for r in rows if r[-1] == "same"]
        oracle.append((name, cats["same"], f"{max(same):.1e}" if same else "-", cats["bn-folded"],
                       cats["in-place"], cats["other"], cats["absent"]))
        folded += [(name, r[0], r[1], f"{r[3]:.2f}", f"{r[5]:.2f}")
                   for r in rows if r[-1] == "bn-folded"]
        fx_float, fx_quant = _fx_pair(name)
        t_pt2e = median_time(lambda: fxn.match(float_gm, quant), args.repeat)
        t_fx = median_time(lambda: fxn.match(fx_float, fx_quant), args.repeat)
        timing.append((name, sum(1 for n in quant.graph.nodes), f"{t_pt2e * 1e3:.1f}",
                       sum(1 for n in fx_quant.graph.nodes), f"{t_fx * 1e3:.1f}",
                       f"{t_pt2e / t_fx:.2f}"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print(tabulate(coverage, headers=("model", "pairs", "unpaired float", "unpaired quantized",
                                      "coverage"), tablefmt="github"))
    print()
    print(tabulate(oracle, headers=("model", "same", "max |dSQNR| dB", "bn-folded", "in-place",
                                    "other", "absent"), tablefmt="github"))
    print()
    shown = folded if args.folded else folded[:6]
    print(tabulate(shown, headers=("model", "pair", "torchao float node",
                                   "fxnumeric SQNR dB", "torchao SQNR dB"), tablefmt="github"))
    if not args.folded and len(folded) > len(shown):
        print(f"... {len(folded) - len(shown)} more BN-folded layers (--folded lists them)")
    print()
    print(tabulate(timing, headers=("model", "pt2e nodes", "match pt2e ms", "convert_fx nodes",
                                    "match convert_fx ms", "ratio"), tablefmt="github"))


if __name__ == "__main__":
    main()
