"""Property-based fuzz tests: random small conv/linear DAGs, eager- and FX-quantized.

Each example draws a list of blocks (conv 3x3/1x1 [+bn] [+relu/relu6/hardswish], linear,
add / mul / cat of earlier tensors, max/avg pool, flatten, dropout, standalone activations),
in module form or functional form, and builds two variants:

* eager: QuantStub / DeQuantStub, FloatFunctional for add/mul/cat, module activations,
  optionally ``fuse_modules``-fused, quantized with ``prepare`` / ``convert`` (x86 qconfig);
* FX: the plain float module (functional forms mixed in) quantized with ``prepare_fx`` /
  ``convert_fx`` (x86 qconfig mapping).

Properties, for each (float, quantized) pair:

1. every quantized compute op is paired (``coverage == 1.0``, no quantized misses);
2. loggers and shadows change no output, bit for bit;
3. a float model against an exact deepcopy of itself logs identical values in every pair;
4. nothing raises;
5. neither user model is changed.

Long run: ``FXNUMERIC_FUZZ_EXAMPLES=500 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import torch
import torch.ao.nn.quantized as nnq
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    fuse_modules,
    get_default_qconfig,
    get_default_qconfig_mapping,
    prepare,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import fxnumeric as ns
from fxnumeric import sqnr

if "x86" in torch.backends.quantized.supported_engines:
    torch.backends.quantized.engine = "x86"

FUZZ = settings(
    max_examples=int(os.environ.get("FXNUMERIC_FUZZ_EXAMPLES", 15)),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ACTS = ("relu", "relu6", "hardswish")
_ACT_MODULES = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish}
_ACT_FUNCS = {"relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish}


# --------------------------------------------------------------------------- generator
# A spec is a list of steps (plain tuples); value 0 is the input (3x8x8), each step appends one.
# Shapes: ("4d", C, H) or ("2d", F).


@st.composite
def specs(draw, functional_dropout: bool = True):
    shapes = [("4d", 3, 8)]
    steps = []
    n = draw(st.integers(1, 8))
    kinds = ["conv", "conv", "linear", "add", "mul", "cat", "pool", "flatten", "dropout", "act"]
    for _ in range(n):
        kind = draw(st.sampled_from(kinds))
        cur = len(shapes) - 1
        shp = shapes[cur]
        form = draw(st.sampled_from(["module", "functional", "operator"]))
        if kind == "conv":
            four = [i for i, s in enumerate(shapes) if s[0] == "4d"]
            if not four:
                continue
            src = cur if shp[0] == "4d" and draw(st.booleans()) else draw(st.sampled_from(four))
            _, c, h = shapes[src]
            k = draw(st.sampled_from([1, 3]))
            cout = draw(st.integers(4, 8))
            bn = draw(st.booleans())
            act = draw(st.sampled_from((None,) + ACTS))
            inplace = draw(st.booleans())
            steps.append(("conv", src, c, cout, k, bn, act, form, inplace))
            shapes.append(("4d", cout, h))
        elif kind == "linear":
            if shp[0] == "4d":
                steps.append(("flatten", cur, form))
                shapes.append(("2d", shp[1] * shp[2] * shp[2]))
                cur += 1
            fin = shapes[cur][1]
            fout = draw(st.integers(4, 8))
            act = draw(st.sampled_from((None, "relu")))
            steps.append(("linear", cur, fin, fout, act, form))
            shapes.append(("2d", fout))
        elif kind in ("add", "mul"):
            same = [i for i, s in enumerate(shapes) if s == shp]
            other = draw(st.sampled_from(same))
            act = draw(st.sampled_from((None, "relu"))) if kind == "add" else None
            steps.append((kind, cur, other, form, act))
            shapes.append(shp)
        elif kind == "cat":
            if shp[0] == "4d":
                ok = [i for i, s in enumerate(shapes) if s[0] == "4d" and s[2] == shp[2] and s[1] + shp[1] <= 16]
            else:
                ok = [i for i, s in enumerate(shapes) if s[0] == "2d" and s[1] + shp[1] <= 1024]
            if not ok:
                continue
            other = draw(st.sampled_from(ok))
            steps.append(("cat", cur, other, form))
            shapes.append((shp[0], shp[1] + shapes[other][1]) + shp[2:])
        elif kind == "pool":
            if shp[0] != "4d" or shp[2] < 4:
                continue
            steps.append(("pool", cur, draw(st.sampled_from(["max", "avg"])), form))
            shapes.append(("4d", shp[1], shp[2] // 2))
        elif kind == "flatten":
            if shp[0] != "4d":
                continue
            steps.append(("flatten", cur, form))
            shapes.append(("2d", shp[1] * shp[2] * shp[2]))
        elif kind == "dropout":
            if not functional_dropout:
                form = "module"  # F.dropout under FX: see test_fx_functional_dropout_is_paired
            steps.append(("dropout", cur, form))
            shapes.append(shp)
        else:  # standalone activation
            steps.append(("act", cur, draw(st.sampled_from(ACTS)), form))
            shapes.append(shp)
    if all(s[0] == "dropout" for s in steps):
        # a model with no compute op at all: see test_model_without_ops_compare_outputs
        steps.append(("conv", len(steps), 3, 4, 3, True, "relu", "module", False))
    return steps


_FORM_INDEX = {"conv": 7, "linear": 5, "add": 3, "mul": 3, "cat": 3}


class Net(nn.Module):
    """Interprets a spec. ``eager=True``: stubs, FloatFunctionals and module forms only."""

    def __init__(self, steps, eager: bool, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.steps = [self._norm(s, eager) for s in steps]
        self.eager = eager
        if eager:
            self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.fusable = []
        for i, s in enumerate(self.steps):
            kind, form = s[0], self._form(s)
            if kind == "conv":
                _, _, cin, cout, k, bn, act, _, inplace = s
                setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k, padding=k // 2))
                group = [f"conv{i}"]
                if bn:
                    b = nn.BatchNorm2d(cout)
                    with torch.no_grad():
                        b.weight.copy_(torch.rand(cout, generator=gen) + 0.5)
                        b.bias.copy_(torch.randn(cout, generator=gen) * 0.5)
                        b.running_mean.copy_(torch.randn(cout, generator=gen) * 0.5)
                        b.running_var.copy_(torch.rand(cout, generator=gen) + 0.5)
                    setattr(self, f"bn{i}", b)
                    group.append(f"bn{i}")
                if act and form == "module":
                    mod = _ACT_MODULES[act](inplace=True) if (act != "hardswish" and inplace) else _ACT_MODULES[act]()
                    setattr(self, f"act{i}", mod)
                    if act == "relu":
                        group.append(f"act{i}")
                if len(group) > 1:
                    self.fusable.append(group)
            elif kind == "linear":
                _, _, fin, fout, act, _ = s
                setattr(self, f"fc{i}", nn.Linear(fin, fout))
                if act and form == "module":
                    setattr(self, f"act{i}", nn.ReLU())
            elif kind in ("add", "mul", "cat"):
                if eager:
                    setattr(self, f"ff{i}", nnq.FloatFunctional())
                if kind == "add" and s[4] and form == "module":
                    setattr(self, f"act{i}", nn.ReLU())
            elif kind == "pool" and form == "module":
                setattr(self, f"pool{i}", nn.MaxPool2d(2) if s[2] == "max" else nn.AvgPool2d(2))
            elif kind == "flatten" and form == "module":
                setattr(self, f"flat{i}", nn.Flatten())
            elif kind == "dropout" and form == "module":
                setattr(self, f"drop{i}", nn.Dropout(0.5))
            elif kind == "act" and form == "module":
                setattr(self, f"act{i}", _ACT_MODULES[s[2]]())

    @staticmethod
    def _form(s):
        return s[_FORM_INDEX.get(s[0], len(s) - 1)]

    @staticmethod
    def _norm(s, eager):
        if not eager:
            return s
        s = list(s)
        idx = _FORM_INDEX.get(s[0], len(s) - 1)
        s[idx] = "module"
        return tuple(s)

    def _act(self, i, name, x, form):
        if form == "module":
            return getattr(self, f"act{i}")(x)
        return _ACT_FUNCS[name](x)

    def forward(self, x):
        vals = [self.quant(x) if self.eager else x]
        for i, s in enumerate(self.steps):
            kind, form = s[0], self._form(s)
            a = vals[s[1]]
            if kind == "conv":
                y = getattr(self, f"conv{i}")(a)
                if s[5]:
                    y = getattr(self, f"bn{i}")(y)
                if s[6]:
                    if form == "module":
                        y = getattr(self, f"act{i}")(y)
                    elif s[8] and s[6] != "hardswish":
                        y = _ACT_FUNCS[s[6]](y, inplace=True)
                    else:
                        y = _ACT_FUNCS[s[6]](y)
            elif kind == "linear":
                y = getattr(self, f"fc{i}")(a)
                if s[4]:
                    y = self._act(i, "relu", y, form)
            elif kind in ("add", "mul"):
                b = vals[s[2]]
                if self.eager:
                    y = getattr(getattr(self, f"ff{i}"), kind)(a, b)
                elif form == "operator":
                    y = a + b if kind == "add" else a * b
                else:
                    y = torch.add(a, b) if kind == "add" else torch.mul(a, b)
                if kind == "add" and s[4]:
                    y = self._act(i, "relu", y, form)
            elif kind == "cat":
                b = vals[s[2]]
                y = getattr(self, f"ff{i}").cat([a, b], dim=1) if self.eager else torch.cat([a, b], dim=1)
            elif kind == "pool":
                if form == "module":
                    y = getattr(self, f"pool{i}")(a)
                else:
                    y = F.max_pool2d(a, 2) if s[2] == "max" else F.avg_pool2d(a, 2)
            elif kind == "flatten":
                if form == "module":
                    y = getattr(self, f"flat{i}")(a)
                elif form == "functional":
                    y = torch.flatten(a, 1)
                else:
                    y = a.flatten(1)
            elif kind == "dropout":
                y = getattr(self, f"drop{i}")(a) if form == "module" else F.dropout(a, 0.5, training=self.training)
            else:
                y = self._act(i, s[2], a, form)
            vals.append(y)
        out = vals[-1]
        return self.dequant(out) if self.eager else out


# --------------------------------------------------------------------------- builders


def _inputs(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=gen)
    calib = [torch.randn(2, 3, 8, 8, generator=gen) for _ in range(2)]
    return x, calib


def build_eager(steps, seed: int, fuse: bool):
    x, calib = _inputs(seed)
    f = Net(steps, eager=True, seed=seed).eval()
    m = copy.deepcopy(f)
    if fuse and m.fusable:
        m = fuse_modules(m, m.fusable)
    m.qconfig = get_default_qconfig("x86")
    m = prepare(m)
    with torch.no_grad():
        for c in calib:
            m(c)
    q = convert(m)
    return f, q, x


def build_fx(steps, seed: int):
    x, calib = _inputs(seed)
    f = Net(steps, eager=False, seed=seed).eval()
    m = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("x86"), (x,))
    with torch.no_grad():
        for c in calib:
            m(c)
    q = convert_fx(m)
    return f, q, x


# --------------------------------------------------------------------------- properties


def _deq(t):
    return t.dequantize() if isinstance(t, torch.Tensor) and t.is_quantized else t


def _equal(a, b) -> bool:
    return torch.equal(_deq(a), _deq(b))


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: _deq(v).clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
        "keys": list(model.state_dict().keys()),
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "training": [m.training for m in model.modules()],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "forward_override": "forward" in model.__dict__,
    }


def _assert_unchanged(before: dict, after: dict, which: str) -> None:
    for key in ("keys", "modules", "training", "hooks", "forward_override"):
        assert before[key] == after[key], f"{which} model changed: {key}"
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"{which} model changed: state_dict[{k!r}]"


def check_pair(f: nn.Module, q: nn.Module, x: torch.Tensor, *, eager: bool) -> None:
    snap_f, snap_q = _snapshot(f), _snapshot(q)
    with torch.no_grad():
        ref_f, ref_q = f(x), q(x)

    # 1. every quantized compute op paired
    m = ns.match(f, q)
    missed = [u for u in m.unmatched_quant if u.quantized]
    assert not missed, "quantized ops unpaired:\n" + m.table()
    assert m.coverage == 1.0, m.table()
    if any(p.quantized for p in m.pairs):
        m.check()

    # 2. instrumentation changes no output
    with torch.no_grad():
        float_gm, quant_gm = ns.add_loggers(f, q)
        assert _equal(float_gm(x), ref_f), "add_loggers float_gm output differs from float model"
        assert _equal(quant_gm(x), ref_q), "add_loggers quant_gm output differs from quantized model"
        for name, lg in ns.loggers_of(quant_gm).items():
            assert lg.stats["tensor_val"], f"quantized logger {name} never called"
        for name, lg in ns.loggers_of(float_gm).items():
            assert lg.stats["tensor_val"], f"float logger {name} never called"
        shadow_gm, _skipped = ns.add_shadows(f, q)
        assert _equal(shadow_gm(x), ref_q), "add_shadows quant_gm output differs from quantized model"

    # 4. the eager API runs too
    with torch.no_grad():
        ns.compare_model_outputs(f, q, x)
        if eager:
            ns.compare_weights(f.state_dict(), q.state_dict())

    # 5. user models untouched, and still compute the same
    _assert_unchanged(snap_f, _snapshot(f), "float")
    _assert_unchanged(snap_q, _snapshot(q), "quantized")
    with torch.no_grad():
        assert _equal(f(x), ref_f)
        assert _equal(q(x), ref_q)


def check_self(f: nn.Module, x: torch.Tensor) -> None:
    """3. a float model against an exact deepcopy of itself: identical logs in every pair."""
    twin = copy.deepcopy(f)
    snap = _snapshot(f)
    with warnings.catch_warnings():  # a float "quantized" model is the point here
        warnings.simplefilter("ignore", ns.FxNumericWarning)
        m = ns.match(f, twin)
    assert not m.unmatched_quant, "deepcopy has unpaired ops:\n" + m.table()
    assert not m.unmatched_float, "float model has ops unpaired with its deepcopy:\n" + m.table()
    with torch.no_grad():
        float_gm, twin_gm = ns.add_loggers(f, twin, matching=m)
        float_gm(x)
        twin_gm(x)
    fl, tl = ns.loggers_of(float_gm), ns.loggers_of(twin_gm)
    assert set(fl) == set(tl) == {p.name for p in m.pairs}
    for p in m.pairs:
        a, b = fl[p.name].stats["tensor_val"], tl[p.name].stats["tensor_val"]
        assert a and b, f"pair {p.name} logged nothing"
        assert torch.equal(a[0], b[0]), f"pair {p.name} ({p.kind}) logs differ against a deepcopy"
        assert math.isinf(sqnr(a[0], b[0])), p.name
    _assert_unchanged(snap, _snapshot(f), "float")


# --------------------------------------------------------------------------- tests


@FUZZ
@given(steps=specs(), seed=st.integers(0, 2**16), fuse=st.booleans())
def test_fuzz_eager_quantized(steps, seed, fuse):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, q, x = build_eager(steps, seed, fuse)
    check_pair(f, q, x, eager=True)
    check_self(f, x)


@FUZZ
@given(steps=specs(), seed=st.integers(0, 2**16))
def test_fuzz_fx_quantized(steps, seed):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f, q, x = build_fx(steps, seed)
    check_pair(f, q, x, eager=False)
    check_self(f, x)


# --------------------------------------------------------------------------- findings


def test_fx_functional_dropout_is_paired():
    steps = [("conv", 0, 3, 4, 3, False, None, "module", False), ("dropout", 1, "functional")]
    f, q, x = build_fx(steps, seed=0)
    check_pair(f, q, x, eager=False)

