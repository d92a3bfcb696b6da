"""Live tensor bytes during one compare of a long SmolLM2 sequence, both threads, and who holds
them at the peak: what a glibc-independent memory floor for ``bench_llm.py --parts long`` is.

    .venv/bin/python benchmarks/bench_live_tensors.py [--config int8-weight-only] [--tokens 512]

Every tensor an ATen op returns (a ``TorchDispatchMode`` in the caller's thread and in compare's
turns helper thread) is counted by its storage until the last tensor on that storage dies;
storages alive before the call (parameters, buffers, their views) are not counted. Internal
workspaces of kernels are not seen. Prints the peak and the largest storages alive at it, each
with the op and the innermost fxnumeric/transformers/torchao frames that made it.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import traceback
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
import bench_llm  # noqa: E402

import fxnumeric as ns  # noqa: E402
from fxnumeric import lockstep  # noqa: E402

_FRAMES = ("fxnumeric", "modeling_llama", "torchao")


class _Live(TorchDispatchMode):
    """Bytes of the storages ops returned, alive now and at the peak."""

    def __init__(self, ledger: dict) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if type(t) is torch.Tensor and t.device.type == "cpu":
                _count(self.ledger, t, func)
        return out


def _where() -> str:
    frames = [f"{Path(f.filename).name}:{f.lineno}:{f.name}"
              for f in traceback.extract_stack()[:-4] if any(k in f.filename for k in _FRAMES)]
    return " < ".join(reversed(frames[-5:]))


def _count(ledger: dict, t: torch.Tensor, func) -> None:
    key = t.untyped_storage().data_ptr()
    if key == 0 or key in ledger["before"]:
        return
    with ledger["lock"]:
        entry = ledger["live"].get(key)
        if entry is None:
            entry = ledger["live"][key] = [t.untyped_storage().nbytes(), 0,
                                           f"{func} {tuple(t.shape)} {t.dtype} | {_where()}"]
            ledger["total"] += entry[0]
            if ledger["total"] > ledger["peak"]:
                ledger["peak"] = ledger["total"]
                ledger["at_peak"] = [(n, w) for n, _, w in ledger["live"].values()]
        entry[1] += 1
    weakref.finalize(t, _dead, ledger, key)


def _dead(ledger: dict, key: int) -> None:
    with ledger["lock"]:
        entry = ledger["live"].get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                ledger["total"] -= entry[0]
                del ledger["live"][key]


def _plain(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: a tensor subclass's inner tensors (torchao's),
    read through ``__tensor_flatten__`` as ``fxnumeric.storage`` reads them."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) or not hasattr(type(t), "__tensor_flatten__"):
        return [t]
    inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
    return [x for tensor in inner if isinstance(tensor, torch.Tensor) for x in _plain(tensor)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="int8-weight-only", choices=list(bench_llm.CONFIGS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    float_model, quant_model, tokenizer = bench_llm._models(getattr(torch, args.dtype),
                                                            args.config)
    text = " ".join(bench_llm._texts(64))
    enc = tokenizer([text], truncation=True, max_length=args.tokens, return_tensors="pt")
    batch = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}]
    before = {t.untyped_storage().data_ptr()
              for model in (float_model, quant_model)
              for p in (*model.parameters(), *model.buffers()) for t in _plain(p)}
    ledger = {"before": before, "live": {}, "total": 0, "peak": 0, "at_peak": [],
              "lock": threading.Lock()}
    run_quant_side = lockstep.Lockstep._quant_side

    def quant_side(self):  # the helper thread needs a mode of its own (modes are per thread)
        with _Live(ledger):
            return run_quant_side(self)

    lockstep.Lockstep._quant_side = quant_side
    with _Live(ledger):
        ns.compare(float_model, quant_model, batch, comparisons=bench_llm.TARGET,
                   progress=False)
    lockstep.Lockstep._quant_side = run_quant_side
    params = bench_llm._param_bytes(float_model)
    print(f"torch {torch.__version__}, {args.dtype} {args.config}, "
          f"{int(enc['input_ids'].shape[1])} tokens, threads={args.threads}")
    print(f"peak live tensor bytes added: {ledger['peak'] / 2**20:.0f} MiB "
          f"({ledger['peak'] / params:.2f}x of {params / 2**20:.0f} MiB of float parameters)")
    by_origin = collections.Counter()
    for nbytes, where in ledger["at_peak"]:
        by_origin[where.split(" ", 1)[0] + " |" + where.split("|", 1)[1]] += nbytes
    for where, nbytes in by_origin.most_common(args.top):
        print(f"{nbytes / 2**20:8.1f} MiB  {where[:220]}")


if __name__ == "__main__":
    main()
