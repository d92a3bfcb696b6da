"""Peak RSS a large Linear's shadow adds to ``compare``: an SmolLM2-sized ``lm_head``.

    .venv/bin/python benchmarks/bench_shadow_rows.py [--tokens 512] [--vocab 49152]

A float32 ``Linear(576, 576) -> ReLU -> Linear(576, vocab)`` and its ``quantize_dynamic`` copy
(the head quantized, as an untied ``lm_head`` is), one sequence of ``--tokens`` rows. The
matching is built and compare run once first (warm); then ``compare(outputs)`` and
``compare(outputs, shadows)`` each run once, the peak RSS (``VmHWM``, reset before each) read
above the RSS just before. The difference is what the shadows add: the head's shadow is
computed a block of rows at a time (``fxnumeric.instrument.graph.RowShadow``); before, its
float output and the floor's error of it were each a whole logits-sized tensor.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import reset_peak_rss  # noqa: E402


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def main() -> None:
    import fxnumeric as ns

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(576, 576), nn.ReLU(), nn.Linear(576, args.vocab)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.Linear})
    data = [torch.randn(1, args.tokens, 576)]
    matching = ns.match(f, q)
    ns.compare(f, q, data, comparisons=("outputs", "shadows"), matching=matching,
               progress=False)
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    rows = []
    for comparisons in (("outputs",), ("outputs", "shadows")):
        gc.collect()
        reset_peak_rss()
        base = _rss_kib("VmRSS")
        start = time.perf_counter()
        report = ns.compare(f, q, data, comparisons=comparisons, matching=matching,
                            progress=False)
        added = (_rss_kib("VmHWM") - base) / 1024
        rows.append(["+".join(comparisons), f"{added:.0f}", f"{added / logits_mib:.2f}x",
                     f"{time.perf_counter() - start:.2f}", report.row("2").shadow_sqnr])
    print(f"torch {torch.__version__}, threads={args.threads}, {args.tokens} tokens x "
          f"{args.vocab} words: one float32 logits tensor is {logits_mib:.0f} MiB")
    print(tabulate(rows, headers=["comparisons", "peak RSS added MiB", "/ logits",
                                  "compare s", "head shadow SQNR dB"], tablefmt="github"))


if __name__ == "__main__":
    main()
