"""The package keeps to the style pyproject.toml configures (ruff, 100 columns)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean_on_the_package():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    done = subprocess.run([ruff, "check", "fxnumeric", "tests", "benchmarks"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_runs_without_torch_ao_ns():
    """torch deprecated its Numeric Suite (``torch.ao.ns``) and will remove it: fxnumeric must
    not need it. ``import fxnumeric`` loaded it (for one isinstance check of torch's Logger),
    so with it gone every call failed with ModuleNotFoundError. Here it is made unimportable,
    and the eager API and compare run and load nothing of it."""
    code = """
import sys, warnings
warnings.filterwarnings("ignore")
import torch
sys.modules["torch.ao.ns"] = None  # import torch.ao.ns raises ModuleNotFoundError
import fxnumeric as ns
f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
q = torch.ao.quantization.quantize_dynamic(f, {torch.nn.Linear})
x = torch.randn(2, 4)
assert list(ns.compare_weights(f.state_dict(), q.state_dict())) == ["0._packed_params._packed_params"]
assert list(ns.compare_model_outputs(f, q, x)) == ["0.stats"]
ns.prepare_model_with_stubs(f, q, {torch.nn.Linear}, ns.ShadowLogger)
q(x)
assert list(ns.get_logger_dict(q)) == ["0.stats"]
assert ns.compare(f, q, [x], progress=False).row("0").output["sqnr"] > 20
print(sorted(m for m, mod in sys.modules.items() if m.startswith("torch.ao.ns") and mod))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
