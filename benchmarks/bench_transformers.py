"""Hugging Face transformers models (which torch.fx cannot trace whole): keys and time.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_transformers.py [--repeat 5]

Part 1, keys: for each tiny transformers model of ``tests/test_transformers.py`` (random
weights, dynamic qint8 and float16 Linear), the number of keys torch's eager Numeric Suite
returns from ``compare_model_outputs`` and ``compare_weights``, the number fxnumeric returns,
and whether fxnumeric's are a superset.

Part 2, time: ``fxnumeric.compare()`` (match + instrument + one batch, all three comparisons)
on a ``BertModel`` with the all-MiniLM-L6-v2 shape (6 layers, 384 wide, 12 heads, random
weights), dynamic qint8, one batch of 8 sentences x 16 tokens, one thread, against its anchor:
one float forward plus one quantized forward on the same batch (medians of ``--repeat`` runs).
The last line is what each batch after the first adds, (9 batches - 1 batch) / 8: the setup
(capture, instrumentation, weight comparison) is paid once per call.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
import torch.ao.ns._numeric_suite as tns
from tabulate import tabulate
from torch import nn

import fxnumeric as ns

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")

from _timing import median_time  # noqa: E402


def keys_table() -> str:
    import test_transformers as cases

    rows = []
    for case in cases.CASES:
        torch.manual_seed(0)
        float_model = case.build().eval()
        x = case.inputs()
        for dtype_name, dtype in cases.DTYPES.items():
            quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear},
                                                           dtype=dtype)
            theirs_out = tns.compare_model_outputs(copy.deepcopy(float_model),
                                                   copy.deepcopy(quant), x)
            ours_out = ns.compare_model_outputs(float_model, quant, x)
            theirs_w = tns.compare_weights(float_model.state_dict(), quant.state_dict())
            ours_w = ns.compare_weights(float_model, quant)
            rows.append((
                case.name, dtype_name,
                len(theirs_out), len(ours_out), set(theirs_out) <= set(ours_out),
                len(theirs_w), len(ours_w), set(theirs_w) <= set(ours_w),
            ))
    headers = ("model", "dtype", "eager outputs", "fxnumeric outputs", "superset",
               "eager weights", "fxnumeric weights (model form)", "superset")
    return tabulate(rows, headers=headers)


def time_table(repeat: int) -> str:
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                  num_attention_heads=12, intermediate_size=1536)
    torch.manual_seed(0)
    float_model = transformers.BertModel(cfg).eval()
    quant = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear})
    ids = torch.randint(1000, 30000, (8, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def forwards() -> None:
        with torch.no_grad():
            float_model(**batch)
            quant(**batch)

    def compare() -> None:
        ns.compare(float_model, quant, [batch])

    def compare_outputs_only() -> None:
        ns.compare(float_model, quant, [batch], comparisons=("outputs",))

    def compare_nine_batches() -> None:
        ns.compare(float_model, quant, [batch] * 9)

    forwards()  # warm up kernels and lazy imports once
    compare()
    floor = median_time(forwards, repeat, warmup=False)
    rows = [("float + quantized forward (anchor)", floor, 1.0)]
    for label, fn in (("fxnumeric.compare() weights+outputs+shadows", compare),
                      ("fxnumeric.compare() outputs only", compare_outputs_only)):
        t = median_time(fn, repeat, warmup=False)
        rows.append((label, t, t / floor))
    # what each batch after the first costs: setup (capture, instrumentation, weights) once
    one, nine = rows[1][1], median_time(compare_nine_batches, max(1, repeat // 2), warmup=False)
    per_batch = (nine - one) / 8
    rows.append(("  each further batch (9 batches - 1 batch) / 8", per_batch, per_batch / floor))
    table = tabulate(rows, headers=("BertModel 6x384, 8x16 tokens", "seconds", "ratio"),
                     floatfmt=".3f")
    return table + f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(keys_table())
    print()
    print(time_table(args.repeat))


if __name__ == "__main__":
    main()
