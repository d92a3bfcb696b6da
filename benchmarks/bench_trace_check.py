"""Cost of checking traced graphs against their modules on the first batch (capture.check).

Usage::

    .venv/bin/python benchmarks/bench_trace_check.py [--rounds 5]

Times ``match(f, q, example_inputs=batch)`` and ``compare(f, q, [batch])`` (one batch: the
check runs on the first batch only) with the check and with it switched off (the check
functions replaced by ones that accept every graph), in alternating rounds in one process,
CPU time of one thread, best round of each. Models: quantizable mobilenet_v2, eager-quantized
(traced whole: the model and its graph each run once more), one 224-px image; a tiny Llama
dynamically quantized (module tree: one more run of each model, with each region's graph run
on its module's call), a batch of 4 x 32 tokens. The floor is one float + one quantized
forward.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

import fxnumeric as ns
import fxnumeric.capture.tree as tree

match_module = importlib.import_module("fxnumeric.match")  # the package's `match` is the function


@contextlib.contextmanager
def _unchecked() -> Iterator[None]:
    """The check switched off: every graph accepted without running."""
    saved = match_module.check_whole, tree.check_regions
    match_module.check_whole = lambda *a, **k: None
    tree.check_regions = lambda *a, **k: {}
    try:
        yield
    finally:
        match_module.check_whole, tree.check_regions = saved


def _cpu_ms(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1e3


def _mobilenet() -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    import torchvision

    q = torchvision.models.quantization.mobilenet_v2(weights=None, quantize=False).eval()
    q.fuse_model()
    q.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    f = copy.deepcopy(q)
    torch.ao.quantization.prepare(q, inplace=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    q(x)
    torch.ao.quantization.convert(q, inplace=True)
    return f, q, x


def _llama() -> tuple[torch.nn.Module, torch.nn.Module, Any]:
    import transformers

    config = transformers.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    f = transformers.LlamaForCausalLM(config).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
    ids = torch.randint(0, 99, (4, 32), generator=torch.Generator().manual_seed(0))
    return f, q, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    torch.set_num_threads(1)
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, python "
          f"{sys.version.split()[0]}; CPU ms, best of {rounds} alternating rounds")
    print(f"{'model':14} {'flow':10} {'floor':>7} {'unchecked':>10} {'checked':>8} {'added':>7}")
    for name, build in (("mobilenet_v2", _mobilenet), ("llama tiny", _llama)):
        f, q, batch = build()
        flows = {
            "match": lambda f=f, q=q, batch=batch: ns.match(f, q, example_inputs=batch),
            "compare": lambda f=f, q=q, batch=batch: ns.compare(f, q, [batch], progress=False),
        }
        with torch.no_grad():
            run = (lambda: (f(**batch), q(**batch))) if isinstance(batch, dict) else (
                lambda: (f(batch), q(batch)))
            run()
            floor = min(_cpu_ms(run) for _ in range(rounds))
        for flow, fn in flows.items():
            fn()  # warm-up
            best = {"unchecked": float("inf"), "checked": float("inf")}
            for _ in range(rounds):
                with _unchecked():
                    best["unchecked"] = min(best["unchecked"], _cpu_ms(fn))
                best["checked"] = min(best["checked"], _cpu_ms(fn))
            added = best["checked"] - best["unchecked"]
            print(f"{name:14} {flow:10} {floor:7.1f} {best['unchecked']:10.1f} "
                  f"{best['checked']:8.1f} {added:7.1f}")


if __name__ == "__main__":
    main()
