"""The flow hooks, and fxnumeric without torchao installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import fxnumeric as fxn
from fxnumeric import flows


def test_every_stage_consults_the_same_flows():
    assert [f.name for f in flows.FLOWS] == ["pt2e", "torchao", "fx"]
    # hooks answer None for what is not theirs: a plain FX graph is untouched
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    assert flows.normalise_model(model, "float") is model
    gm = fxn.trace(model)
    assert all(flows.pair_name(n) is None for n in gm.graph.nodes)
    assert flows.comparable_weight(model[0].weight) is model[0].weight


def test_without_torchao_everything_else_works(tmp_path):
    script = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torchao", "model_explorer"):
                    raise ImportError(f"No module named {name!r} (blocked)")
                return None

        sys.meta_path.insert(0, Block())
        import copy, torch
        import fxnumeric as fxn
        from torch.ao.quantization import quantize_dynamic
        f = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        q = quantize_dynamic(copy.deepcopy(f), {torch.nn.Linear})
        report = fxn.compare(f, q, [torch.randn(2, 8)])
        report.to_model_explorer(sys.argv[1])
        ep = torch.export.export(f, (torch.randn(2, 8),))
        assert len(fxn.match(ep, ep.module()).pairs) == 2  # pt2e capture needs no torchao
        from fxnumeric.models import quantize_pt2e
        try:
            quantize_pt2e(f, [torch.randn(2, 8)])
        except fxn.InputError as exc:
            assert "fxnumeric[torchao]" in str(exc)
        else:
            raise SystemExit("quantize_pt2e ran without torchao")
        assert not any(m.split(".")[0] == "torchao" for m in sys.modules)
        print("ok", len(report.rows))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["ok", "2"]
