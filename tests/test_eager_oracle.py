"""Oracle tests: fxnumeric's eager-compatible API against torch's own eager Numeric Suite.

Each test runs ``torch.ao.ns._numeric_suite`` (the oracle) and ``fxnumeric`` on separate fresh
copies of the same float/quantized pair and compares keys and tensors. Where fxnumeric
deviates from the eager suite on purpose, the test asserts the documented deviation exactly:

(a) ShadowLogger keeps the whole tensor (eager keeps only sample 0 of a batch); for tuple
    outputs both keep element 0 of the tuple.
(b) compare_weights splits a dynamic LSTM layer's ``..._all_weight_values.N.param`` into
    ``...param.weight_ih`` and ``...param.weight_hh`` (eager overwrites ih with hh).
(c) OutputLogger stores detached tensors: values are compared, not autograd history.
(d) compare_model_outputs / compare_model_stub leave both models untouched.
(e) get_matching_activations works with custom loggers: it returns their ``.stats`` dicts
    (eager crashes with ``KeyError: 'tensor_val'``).
(f) get_matching_activations before any forward pass raises FxNumericError (eager: ``{}``).
(g) float and quantized ops are paired by graph, so an unfused float model pairs with the
    quantized model of its fused copy at the fused-op outputs.
(h) prepare_model_outputs is idempotent: preparing twice does not stack loggers.

One more eager quirk, found while writing these tests and not copied by fxnumeric: eager logs
the float output of a fused ``nn.Sequential`` module (``nni.ConvReLU2d``, ...) twice per
forward pass (see ``_eager_entries``); fxnumeric logs every site once per pass.
"""

from __future__ import annotations

import copy
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.ao.ns._numeric_suite as tns
import torch.nn as nn
import torchvision

import fxnumeric as ns

try:  # tests/ on sys.path (pytest's default rootdir-based import mode)
    from _models import QatFunctional, UntracedGated, functional_values, qat_functional_pair
except ImportError:  # pragma: no cover - tests/ imported as a package
    from tests._models import (
        QatFunctional,
        UntracedGated,
        functional_values,
        qat_functional_pair,
    )

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _qparams(t: torch.Tensor) -> tuple:
    """Return the quantization parameters of a quantized tensor, comparable with ``==``."""
    scheme = t.qscheme()
    if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return (scheme, t.q_scale(), t.q_zero_point())
    return (
        scheme,
        t.q_per_channel_scales().tolist(),
        t.q_per_channel_zero_points().tolist(),
        t.q_per_channel_axis(),
    )


def assert_same(actual: Any, expected: Any, where: str = "value") -> None:
    """Assert that two (nested) values hold exactly the same tensors.

    Tensors are compared by value (``torch.equal`` after ``detach``; autograd history is
    ignored, deviation (c)); quantized tensors must also be quantized with the same dtype,
    scheme, scale and zero point, and equal integer representation. Tuples and lists are
    interchangeable containers, dicts must have the same keys, TorchScript objects (packed
    LSTM cell params) are compared through ``__getstate__``.
    """
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {type(actual)}"
        assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
        assert actual.dtype == expected.dtype, f"{where}: dtype {actual.dtype} != {expected.dtype}"
        if expected.is_quantized:
            assert actual.is_quantized, f"{where}: expected a quantized tensor"
            assert _qparams(actual) == _qparams(expected), f"{where}: quantization params differ"
            assert torch.equal(actual.int_repr(), expected.int_repr()), f"{where}: int_repr differs"
            assert torch.equal(actual.dequantize(), expected.dequantize()), (
                f"{where}: values differ"
            )
        else:
            assert not actual.is_quantized, f"{where}: unexpected quantized tensor"
            assert torch.equal(actual.detach(), expected.detach()), (
                f"{where}: values differ (max abs diff "
                f"{(actual.detach() - expected.detach()).abs().max().item():.3g})"
            )
    elif isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)), (
            f"{where}: expected a sequence, got {type(actual)}"
        )
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a dict, got {type(actual)}"
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for k in expected:
            assert_same(actual[k], expected[k], f"{where}[{k!r}]")
    elif isinstance(expected, torch.ScriptObject):
        assert isinstance(actual, torch.ScriptObject), f"{where}: expected a ScriptObject"
        assert_same(actual.__getstate__(), expected.__getstate__(), f"{where}.__getstate__()")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def assert_close(actual: Any, expected: Any, where: str = "value", atol: float = 1e-5) -> None:
    """Like :func:`assert_same` for float tensors, but allow float reordering noise."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_close(a, e, f"{where}[{i}]", atol)
        return
    assert isinstance(actual, torch.Tensor) and not actual.is_quantized, where
    assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
    assert torch.allclose(actual.detach(), expected.detach(), atol=atol), (
        f"{where}: max abs diff {(actual.detach() - expected.detach()).abs().max().item():.3g}"
    )


def sqnr_db(ref: torch.Tensor, actual: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``actual`` against ``ref``, in dB."""
    ref = ref.detach().float()
    actual = actual.detach().dequantize() if actual.is_quantized else actual.detach()
    return float(20 * torch.log10(ref.norm() / (ref - actual).norm()))


def _tensors(value: Any) -> list[torch.Tensor]:
    """All tensors in a nested tuple/list value, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value for t in _tensors(v)]


def _is_logger(mod: nn.Module) -> bool:
    return isinstance(mod, (ns.Logger, tns.Logger))


@dataclass(frozen=True)
class _Snapshot:
    model_type: type
    module_names: list[str]
    module_types: list[type]
    state: dict[str, Any]
    hooks: dict[str, tuple[int, int]]
    output: Any


def _snapshot(model: nn.Module, data: tuple) -> _Snapshot:
    with torch.no_grad():
        output = model(*data)
    return _Snapshot(
        model_type=type(model),
        module_names=[n for n, _ in model.named_modules()],
        module_types=[type(m) for _, m in model.named_modules()],
        state=copy.deepcopy(model.state_dict()),
        hooks={
            n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
        },
        output=output,
    )


def assert_unchanged(model: nn.Module, before: _Snapshot, data: tuple, which: str) -> None:
    """Assert deviation (d): ``model`` is exactly as it was when ``before`` was taken."""
    after = _snapshot(model, data)
    assert after.model_type is before.model_type, f"{which} model: type changed"
    assert after.module_names == before.module_names, f"{which} model: submodules changed"
    assert after.module_types == before.module_types, f"{which} model: submodule types changed"
    loggers = [n for n, m in model.named_modules() if _is_logger(m)]
    assert not loggers, f"{which} model: loggers left behind at {loggers}"
    assert list(after.state) == list(before.state), f"{which} model: state_dict keys changed"
    assert_same(after.state, before.state, f"{which}.state_dict()")
    assert after.hooks == before.hooks, f"{which} model: forward hooks left behind"
    assert "forward" not in vars(model), f"{which} model: forward was patched on the instance"
    assert_same(after.output, before.output, f"{which} model output")


# --------------------------------------------------------------------------------------------
# The model pairs under test
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One float/quantized pair, the tutorial's inputs for it and its shadow swap list."""

    name: str
    make: Callable[[], tuple[nn.Module, nn.Module]]
    data: tuple  # the positional inputs of one forward pass
    batches: list[tuple]  # inputs of the two forward passes used with prepare_*
    swap_list: list[type]
    batch_size: int


def _image_case(name: str, make_pair, swap_list: list[type]) -> Case:
    _, _, img_data = make_pair()

    def make():
        float_model, qmodel, _ = make_pair()
        return float_model, qmodel

    return Case(
        name=name,
        make=make,
        data=(img_data[0][0],),
        batches=[(image,) for image, _ in img_data],
        swap_list=swap_list,
        batch_size=img_data[0][0].shape[0],
    )


def _lstm_case(make_pair) -> Case:
    _, _, input_, hidden = make_pair()
    other_input = (input_ + 3) % 10  # a second, different token for the second pass

    def make():
        float_model, qmodel, _, _ = make_pair()
        return float_model, qmodel

    return Case(
        name="lstm",
        make=make,
        data=(input_, hidden),
        batches=[(input_, hidden), (other_input, hidden)],
        swap_list=[nn.Linear, nn.LSTM],
        batch_size=1,
    )


def _make_case(request: pytest.FixtureRequest, name: str) -> Case:
    if name == "resnet18":
        return _image_case(
            name,
            request.getfixturevalue("make_resnet18_pair"),
            [torchvision.models.quantization.resnet.QuantizableBasicBlock],
        )
    if name == "mobilenet_v2":
        return _image_case(
            name,
            request.getfixturevalue("make_mobilenet_v2_pair"),
            [torchvision.models.quantization.mobilenetv2.QuantizableInvertedResidual],
        )
    if name == "lstm":
        return _lstm_case(request.getfixturevalue("make_lstm_pair"))
    raise ValueError(name)


ALL_CASES = ["resnet18", "lstm", "mobilenet_v2"]
STATIC_CASES = ["resnet18", "mobilenet_v2"]
CORE_CASES = ["resnet18", "lstm"]


@pytest.fixture(params=ALL_CASES)
def case(request) -> Case:
    return _make_case(request, request.param)


@pytest.fixture(params=CORE_CASES)
def core_case(request) -> Case:
    """The tutorial's two pairs: enough for the deviation tests, cheaper than ALL_CASES."""
    return _make_case(request, request.param)


@pytest.fixture(params=STATIC_CASES)
def static_case(request) -> Case:
    return _make_case(request, request.param)


@pytest.fixture
def resnet18_case(request) -> Case:
    return _make_case(request, "resnet18")


def _shadow_view(fx_value: Any, case: Case) -> Any:
    """Map an fxnumeric ShadowLogger entry to what eager's ShadowLogger keeps (deviation (a))."""
    if isinstance(fx_value, torch.Tensor) and case.batch_size > 1:
        assert fx_value.shape[0] == case.batch_size, (
            f"fxnumeric's ShadowLogger should keep the whole batch, got shape {fx_value.shape}"
        )
        return fx_value[0]
    return fx_value


def _assert_shadow_dicts_match(fx: dict, eager: dict, case: Case, n_passes: int) -> None:
    assert set(fx) == set(eager)
    assert eager, "the oracle logged nothing: the test setup is broken"
    for key in eager:
        assert set(fx[key]) == {"float", "quantized"}, key
        for side in ("float", "quantized"):
            assert len(eager[key][side]) == n_passes, (key, side)
            assert len(fx[key][side]) == n_passes, (key, side)
            for i, (f_val, e_val) in enumerate(zip(fx[key][side], eager[key][side], strict=True)):
                assert_same(_shadow_view(f_val, case), e_val, f"{key}[{side!r}][{i}]")


def _eager_entries(entries: list, side: str, n_passes: int, where: str) -> list:
    """Return the eager OutputLogger entries of one key, one per forward pass.

    Eager quirk (not copied by fxnumeric): a fused float module that is an ``nn.Sequential``
    (``nni.ConvReLU2d``, ``nni.LinearReLU``, ...) gets its logger as an extra *child*, so
    ``Sequential.forward`` runs the logger once more besides the observer hook, and every
    forward pass is logged twice (the very same tensor). fxnumeric logs it once per pass.
    """
    if side == "float" and len(entries) == 2 * n_passes:
        firsts, seconds = entries[0::2], entries[1::2]
        for i, (a, b) in enumerate(zip(firsts, seconds, strict=True)):
            assert a is b, f"{where}: eager's duplicated entry {i} is not the same tensor"
        return firsts
    assert len(entries) == n_passes, f"{where}: eager logged {len(entries)} entries"
    return entries


def _assert_activation_dicts_match(fx: dict, eager: dict, n_passes: int) -> None:
    assert list(fx) == list(eager), "keys differ or are in a different order"
    assert eager, "the oracle logged nothing: the test setup is broken"
    for key in eager:
        assert set(fx[key]) == {"float", "quantized"}, key
        for side in ("float", "quantized"):
            where = f"{key}[{side!r}]"
            expected = _eager_entries(eager[key][side], side, n_passes, where)
            assert len(fx[key][side]) == n_passes, f"{where}: {len(fx[key][side])} entries"
            assert_same(fx[key][side], expected, where)


# --------------------------------------------------------------------------------------------
# 1. compare_weights on state dicts
# --------------------------------------------------------------------------------------------


def test_compare_weights_state_dicts_match_eager(static_case: Case) -> None:
    float_model, qmodel = static_case.make()
    eager = tns.compare_weights(float_model.state_dict(), qmodel.state_dict())
    float_model, qmodel = static_case.make()
    fx = ns.compare_weights(float_model.state_dict(), qmodel.state_dict())

    assert eager
    assert set(fx) == set(eager)
    for key in eager:
        assert_same(fx[key], eager[key], key)


@pytest.mark.filterwarnings("ignore::fxnumeric.FxNumericWarning")  # the unpaired Linear's
def test_compare_weights_of_one_modules_state_dicts_match_eager() -> None:
    """A single module's state dicts (keys without a module path: ``weight``) pair as in
    torch; a dynamic Linear's ``_packed_params._packed_params`` pairs with nothing in both."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 1).eval()
    qconv = torch.ao.nn.quantized.Conv2d(3, 3, 1)
    qconv.set_weight_bias(torch.quantize_per_tensor(conv.weight.detach(), 0.01, 0, torch.qint8),
                          conv.bias.detach())
    linear = nn.Linear(4, 4).eval()
    qlinear = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(linear)),
                                                     {nn.Linear})[0]
    for f, q in ((conv, qconv), (linear, qlinear)):
        eager = tns.compare_weights(f.state_dict(), q.state_dict())
        fx = ns.compare_weights(f.state_dict(), q.state_dict())
        assert list(fx) == list(eager)
        for key in eager:
            assert_same(fx[key], eager[key], key)
    assert list(fx) == [] and list(eager) == []
    assert list(ns.compare_weights(conv.state_dict(), qconv.state_dict())) == ["weight"]


def test_compare_weights_lstm_splits_ih_and_hh(make_lstm_pair) -> None:
    """Deviation (b): one key per LSTM weight matrix; eager keeps only weight_hh."""
    float_model, qmodel, _, _ = make_lstm_pair()
    eager = tns.compare_weights(float_model.state_dict(), qmodel.state_dict())
    float_model, qmodel, _, _ = make_lstm_pair()
    q_state = qmodel.state_dict()
    fx = ns.compare_weights(float_model.state_dict(), q_state)

    lstm_keys = [k for k in eager if "._all_weight_values." in k]
    assert lstm_keys == [f"rnn._all_weight_values.{n}.param" for n in range(5)]
    other_keys = set(eager) - set(lstm_keys)
    assert other_keys == {"encoder.weight", "decoder._packed_params._packed_params"}
    expected_keys = other_keys | {f"{k}.{w}" for k in lstm_keys for w in ("weight_ih", "weight_hh")}
    assert set(fx) == expected_keys
    for key in lstm_keys:
        assert key not in fx

    for key in other_keys:
        assert_same(fx[key], eager[key], key)

    for key in lstm_keys:
        layer = key.split(".")[-2]
        # weight_hh: what eager ends up reporting under the bare key
        assert_same(fx[f"{key}.weight_hh"], eager[key], f"{key}.weight_hh")
        assert torch.equal(
            fx[f"{key}.weight_hh"]["float"],
            getattr(float_model.rnn, f"weight_hh_l{layer}").detach(),
        )

        # weight_ih: what eager computes and then overwrites
        ih = fx[f"{key}.weight_ih"]
        assert set(ih) == {"float", "quantized"}
        float_ih = getattr(float_model.rnn, f"weight_ih_l{layer}").detach()
        assert_same(ih["float"], float_ih, f"{key}.weight_ih float")
        q_ih = ih["quantized"]
        assert isinstance(q_ih, torch.Tensor) and q_ih.is_quantized
        assert q_ih.dtype == torch.qint8
        assert q_ih.shape == float_ih.shape
        packed_ih = q_state[key].__getstate__()[0][4][0].__getstate__()[0][0]
        assert_same(q_ih, packed_ih, f"{key}.weight_ih quantized")
        assert (q_ih.dequantize() - float_ih).abs().max() <= q_ih.q_scale()
        assert sqnr_db(float_ih, q_ih) > 30


def test_compare_weights_of_a_bidirectional_lstm_pairs_each_direction() -> None:
    # cells are numbered layer * 2 + direction; cell 1 (l0_reverse) was paired with float
    # layer 1 (a shape mismatch) and cells 2 and 3 were left out
    torch.manual_seed(0)
    f = nn.Sequential(nn.LSTM(8, 6, num_layers=2, bidirectional=True)).eval()
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(f), {nn.LSTM})
    by_state = ns.compare_weights(f.state_dict(), q.state_dict())
    names = ["l0", "l0_reverse", "l1", "l1_reverse"]
    assert list(by_state) == [f"0._all_weight_values.{cell}.param.{w}" for cell in range(4)
                              for w in ("weight_ih", "weight_hh")]
    for key, pair in by_state.items():
        cell, which = int(key.split(".")[2]), key.split(".")[-1]
        assert torch.equal(pair["float"], getattr(f[0], f"{which}_{names[cell]}"))
        assert sqnr_db(pair["float"], pair["quantized"]) > 30  # the same matrix, quantized
    by_model = ns.compare_weights(f, q)
    assert list(by_model) == list(by_state)
    for key in by_state:
        assert_same(by_model[key], by_state[key], key)



class _PackedWeights(nn.Module):
    """Layers whose quantized state dicts hold the weight packed under another name."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.bag = nn.Embedding(30, 8), nn.EmbeddingBag(30, 8)
        self.cell, self.gcell = nn.LSTMCell(8, 8), nn.GRUCell(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.cell(self.emb(ids).mean(1) + self.bag(ids))
        return self.fc(self.gcell(h))


def test_compare_weights_of_state_dicts_pairs_embedding_and_cell_weights() -> None:
    """Deviation 32: the quantized state dict holds an Embedding's weight as
    ``emb._packed_params._packed_weight`` and a dynamic cell's as ``cell._packed_weight_ih``
    (packed): torch's suite, and fxnumeric, returned only ``fc._packed_params._packed_params``.
    Oracle: the float state dict beside the weights read by hand from the quantized modules."""
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        quantize_dynamic,
    )

    torch.manual_seed(0)
    f = _PackedWeights().eval()
    embedding, dynamic = float_qparams_weight_only_qconfig, default_dynamic_qconfig
    q = quantize_dynamic(copy.deepcopy(f), {nn.Embedding: embedding, nn.EmbeddingBag: embedding,
                                            nn.LSTMCell: dynamic, nn.GRUCell: dynamic,
                                            nn.Linear: dynamic})
    eager = tns.compare_weights(f.state_dict(), q.state_dict())
    assert list(eager) == ["fc._packed_params._packed_params"]
    ours = ns.compare_weights(f.state_dict(), q.state_dict())
    by_hand = {"emb._packed_params._packed_weight": (f.emb.weight, q.emb.weight()),
               "bag._packed_params._packed_weight": (f.bag.weight, q.bag.weight())}
    for cell in ("cell", "gcell"):
        for w in ("ih", "hh"):
            packed = getattr(getattr(q, cell), f"_packed_weight_{w}")
            by_hand[f"{cell}._packed_weight_{w}"] = (
                getattr(getattr(f, cell), f"weight_{w}"),
                torch.ops.quantized.linear_unpack(packed)[0])
    assert list(ours) == [*by_hand, "fc._packed_params._packed_params"]
    assert set(ours) <= set(q.state_dict())
    for key, (float_weight, quant_weight) in by_hand.items():
        assert_same(ours[key], {"float": float_weight, "quantized": quant_weight}, key)
        assert sqnr_db(float_weight, quant_weight) > 30
    assert_same(ours["fc._packed_params._packed_params"],
                eager["fc._packed_params._packed_params"], "fc")
    # the same weights, given the models (keyed by the quantized modules' accessors)
    by_model = ns.compare_weights(f, q)
    for key, (float_weight, quant_weight) in by_hand.items():
        path, _, name = key.partition(".")
        model_key = f"{path}.weight{name[-3:] if 'weight_' in name else ''}"
        assert_same(by_model[model_key], {"float": float_weight, "quantized": quant_weight}, key)
    # an FX-quantized Embedding (float_qparams_weight_only_qconfig) is held so too
    from torch.ao.quantization import QConfigMapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    ids = torch.randint(0, 30, (2, 5))
    fx_q = convert_fx(prepare_fx(copy.deepcopy(f), QConfigMapping().set_object_type(
        nn.Embedding, embedding), (ids,)))
    ours = ns.compare_weights(f.state_dict(), fx_q.state_dict())  # the others left float
    assert_same(ours["emb._packed_params._packed_weight"],
                {"float": f.emb.weight, "quantized": fx_q.emb.weight()}, "fx")


def test_compare_weights_of_state_dicts_names_a_quantized_weight_it_cannot_pair() -> None:
    """A quantized weight with no float weight of its name was left out without a word (as
    in torch's suite): a single dynamic Linear's ``_packed_params._packed_params``."""
    torch.manual_seed(0)
    linear = nn.Linear(4, 4).eval()
    qlinear = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(linear)),
                                                     {nn.Linear})[0]
    with pytest.warns(ns.FxNumericWarning, match=r"1 quantized weight of the quantized state "
                      r"dict \(`_packed_params._packed_params`\) has no float weight of the "
                      r"same name.*Fix: compare the two models"):
        assert ns.compare_weights(linear.state_dict(), qlinear.state_dict()) == {}


# --------------------------------------------------------------------------------------------
# 2. compare_model_outputs
# --------------------------------------------------------------------------------------------


def test_compare_model_outputs_matches_eager(case: Case) -> None:
    float_model, qmodel = case.make()
    eager = tns.compare_model_outputs(float_model, qmodel, *case.data)
    float_model, qmodel = case.make()
    fx = ns.compare_model_outputs(float_model, qmodel, *case.data)

    _assert_activation_dicts_match(fx, eager, n_passes=1)


def test_compare_model_outputs_lstm_logs_output_and_state_tuples(make_lstm_pair) -> None:
    float_model, qmodel, input_, hidden = make_lstm_pair()
    fx = ns.compare_model_outputs(float_model, qmodel, input_, hidden)
    assert list(fx) == ["encoder.stats", "rnn.stats", "decoder.stats"]
    for side in ("float", "quantized"):
        output, (h, c) = fx["rnn.stats"][side][0]
        assert output.shape == (1, 1, 256)
        assert h.shape == c.shape == (5, 1, 256)


class _PackedLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True)
        return self.fc(out)


def test_an_lstm_fed_a_packed_sequence_logs_as_eager_does() -> None:
    # a PackedSequence (a named tuple) was rebuilt from one generator: "the float model failed
    # on the input", and prepare_model_outputs left the user's model failing the same way
    torch.manual_seed(0)
    make = lambda: (lambda f: (f, torch.ao.quantization.quantize_dynamic(  # noqa: E731
        copy.deepcopy(f), {nn.LSTM, nn.Linear})))(_PackedLSTM().eval())
    data = (torch.randn(3, 5, 8), torch.tensor([5, 3, 2]))
    torch.manual_seed(0)
    eager = tns.compare_model_outputs(*make(), *data)
    torch.manual_seed(0)
    _assert_activation_dicts_match(ns.compare_model_outputs(*make(), *data), eager, n_passes=1)
    torch.manual_seed(0)
    float_model, qmodel = make()
    expected = float_model(*data)
    ns.prepare_model_outputs(float_model, qmodel)
    torch.testing.assert_close(float_model(*data), expected, rtol=0, atol=0)
    qmodel(*data)
    assert list(ns.get_matching_activations(float_model, qmodel)) == list(eager)


class _Functional(nn.Module):
    """A conv, a FloatFunctional's add, add_scalar and mul_scalar, and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv = nn.Conv2d(3, 4, 3)
        self.add = torch.ao.nn.quantized.FloatFunctional()
        self.addsc = torch.ao.nn.quantized.FloatFunctional()
        self.mulsc = torch.ao.nn.quantized.FloatFunctional()
        self.fc = nn.Linear(4, 2)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.quant(x))
        x = self.mulsc.mul_scalar(self.addsc.add_scalar(self.add.add(x, x), 1.0), 0.5)
        return self.dequant(self.fc(x.mean((2, 3))))


def _functional_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    f, x = _Functional().eval(), torch.randn(2, 3, 8, 8)
    q = copy.deepcopy(f)
    q.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    torch.ao.quantization.prepare(q, inplace=True)
    q(x)
    return f, torch.ao.quantization.convert(q), x


@pytest.mark.parametrize("allow_list", [None, [nn.Conv2d, torch.ao.nn.quantized.Conv2d], []],
                         ids=["default", "conv", "empty"])
def test_allow_lists_and_floatfunctionals_log_as_eager(allow_list) -> None:
    # torch observes a FloatFunctional whatever the allow list, never its add_scalar or
    # mul_scalar, and keeps a name only where both models logged it: fxnumeric logged
    # add_scalar under its node name, dropped `add` from a given list and kept `fc`
    f, q, x = _functional_pair()
    eager = tns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), x,
                                      allow_list=allow_list)
    fx = ns.compare_model_outputs(f, q, x, allow_list=allow_list)
    _assert_activation_dicts_match(fx, eager, n_passes=1)


@pytest.mark.parametrize("api", ["compare_model_outputs", "prepare_model_outputs"])
def test_output_logger_stores_detached_tensors(core_case: Case, api: str) -> None:
    """Deviation (c): fxnumeric's OutputLogger detaches; eager keeps the autograd graph.

    The prepare path runs the user's own forward passes with autograd enabled.
    """
    float_model, qmodel = core_case.make()
    eager = tns.compare_model_outputs(float_model, qmodel, *core_case.data)
    assert any(  # the eager quirk
        t.grad_fn is not None for t in _tensors(eager[next(iter(eager))]["float"])
    )

    float_model, qmodel = core_case.make()
    with torch.enable_grad():
        if api == "compare_model_outputs":
            fx = ns.compare_model_outputs(float_model, qmodel, *core_case.data)
        else:
            ns.prepare_model_outputs(float_model, qmodel)
            float_model(*core_case.data)
            qmodel(*core_case.data)
            fx = ns.get_matching_activations(float_model, qmodel)
    assert fx
    for key, entry in fx.items():
        for side in ("float", "quantized"):
            for t in _tensors(entry[side]):
                assert t.grad_fn is None and not t.requires_grad, (key, side)


@pytest.mark.parametrize("api", ["compare_model_outputs", "prepare_model_outputs"])
def test_a_qat_float_models_floatfunctionals_log_after_their_fake_quantize(api: str) -> None:
    """A QAT float model hands on a FloatFunctional's value after its activation_post_process
    (a fake-quantize), as a QAT conv hands on its own after the fake-quantize hooked on it:
    the float entry is that value (docs/eager_compat.md, row 24). Logged before it, the float
    ``add`` was off by 0.30, ``cat`` by 0.019, from what the QAT model computes. Oracle:
    forward hooks on the activation_post_process of both models (torch's suite logs nothing
    of a QAT float model)."""
    qat, q, x = qat_functional_pair()
    assert tns.compare_model_outputs(copy.deepcopy(qat), copy.deepcopy(q), x) == {}
    float_values, quant_values = functional_values(qat, x), functional_values(q, x)
    if api == "compare_model_outputs":
        fx = ns.compare_model_outputs(qat, q, x)
    else:
        ns.prepare_model_outputs(qat, q)
        qat(x)
        q(x)
        fx = ns.get_matching_activations(qat, q)
    for name in QatFunctional.OBSERVED:
        before, after = float_values[name]
        assert (after - before).abs().max() > 5e-3, f"{name}: its fake-quantize changes nothing"
        entry = fx[f"{name}.stats"]
        assert_close(entry["float"][0], after, f"{name}['float']", atol=1e-6)
        assert_close(entry["quantized"][0].dequantize(), quant_values[name][1],
                     f"{name}['quantized']", atol=1e-6)


@pytest.mark.parametrize("api", ["compare_model_stub", "prepare_model_with_stubs"])
def test_a_qat_float_models_floatfunctional_shadows_match_eager(api: str) -> None:
    """The shadow of a QAT FloatFunctional runs its fake-quantize too, as torch's ``Shadow``
    calls the whole FloatFunctional method: the float entries of ``add``, ``add_relu``,
    ``mul`` and ``cat`` equal torch's (they read 0.013, 0.0094, 0.015 and 0.019 off them).
    ``add_scalar`` is not shadowed (row 20)."""
    qat, q, x = qat_functional_pair()
    swap = [torch.ao.nn.quantized.FloatFunctional]
    if api == "compare_model_stub":
        eager = tns.compare_model_stub(copy.deepcopy(qat), copy.deepcopy(q), swap, x)
        fx = ns.compare_model_stub(qat, q, swap, x)
    else:
        eager_q = copy.deepcopy(q)
        tns.prepare_model_with_stubs(copy.deepcopy(qat), eager_q, swap, tns.ShadowLogger)
        eager_q(x)
        eager = tns.get_logger_dict(eager_q)
        ns.prepare_model_with_stubs(qat, q, swap, ns.ShadowLogger)
        q(x)
        fx = ns.get_logger_dict(q)
    assert set(eager) - set(fx) == {"addsc.stats"}
    assert sorted(fx) == sorted(f"{name}.stats" for name in QatFunctional.OBSERVED)
    for key in fx:
        assert_close(fx[key]["float"][0][0], eager[key]["float"][0], f"{key}['float']",
                     atol=1e-6)
        assert_same(fx[key]["quantized"][0][0], eager[key]["quantized"][0], f"{key}['quantized']")


# --------------------------------------------------------------------------------------------
# 3. prepare_model_outputs + forward passes + get_matching_activations
# --------------------------------------------------------------------------------------------


def _prepared_activations(suite, case: Case, logger_cls=None) -> dict:
    """prepare_model_outputs on fresh models, one forward of each per batch, then read them."""
    float_model, qmodel = case.make()
    if logger_cls is None:
        suite.prepare_model_outputs(float_model, qmodel)
    else:
        suite.prepare_model_outputs(float_model, qmodel, logger_cls)
    for batch in case.batches:
        float_model(*batch)
        qmodel(*batch)
    return suite.get_matching_activations(float_model, qmodel)


def test_prepare_model_outputs_and_get_matching_activations_match_eager(case: Case) -> None:
    eager = _prepared_activations(tns, case)
    fx = _prepared_activations(ns, case)

    _assert_activation_dicts_match(fx, eager, n_passes=len(case.batches))


def test_fused_sequential_float_output_logged_once_per_pass(resnet18_case: Case) -> None:
    """Eager logs the fused ``conv1`` (an ``nni.ConvReLU2d`` Sequential) twice; fxnumeric once."""
    float_model, qmodel = resnet18_case.make()
    eager = tns.compare_model_outputs(float_model, qmodel, *resnet18_case.data)
    assert len(eager["conv1.stats"]["float"]) == 2  # the eager quirk
    assert eager["conv1.stats"]["float"][0] is eager["conv1.stats"]["float"][1]
    assert len(eager["conv1.stats"]["quantized"]) == 1

    float_model, qmodel = resnet18_case.make()
    fx = ns.compare_model_outputs(float_model, qmodel, *resnet18_case.data)
    assert len(fx["conv1.stats"]["float"]) == 1
    assert len(fx["conv1.stats"]["quantized"]) == 1
    assert_same(fx["conv1.stats"]["float"][0], eager["conv1.stats"]["float"][0])


# --------------------------------------------------------------------------------------------
# 4. compare_model_stub
# --------------------------------------------------------------------------------------------


def test_compare_model_stub_matches_eager(case: Case) -> None:
    float_model, qmodel = case.make()
    eager = tns.compare_model_stub(float_model, qmodel, case.swap_list, *case.data)
    float_model, qmodel = case.make()
    fx = ns.compare_model_stub(float_model, qmodel, case.swap_list, *case.data)

    _assert_shadow_dicts_match(fx, eager, case, n_passes=1)


def test_a_generator_as_the_swap_list_is_read_once_for_everything(resnet18_case: Case) -> None:
    """``module_swap_list`` given as a generator shadows what the same list does (torch's suite
    returns ``{}``: docs/eager_compat.md); the oracle is torch's suite given the list."""
    float_model, qmodel = resnet18_case.make()
    eager = tns.compare_model_stub(float_model, qmodel, resnet18_case.swap_list,
                                   *resnet18_case.data)
    float_model, qmodel = resnet18_case.make()
    fx = ns.compare_model_stub(float_model, qmodel, (t for t in resnet18_case.swap_list),
                               *resnet18_case.data)
    assert eager
    _assert_shadow_dicts_match(fx, eager, resnet18_case, n_passes=1)
    float_model, qmodel = resnet18_case.make()
    ns.prepare_model_with_stubs(float_model, qmodel, iter(resnet18_case.swap_list),
                                ns.ShadowLogger)
    qmodel(*resnet18_case.data)
    assert list(ns.get_logger_dict(qmodel)) == list(fx)


def test_shadow_logger_keeps_whole_batch(resnet18_case: Case) -> None:
    """Deviation (a), spelled out on the tutorial's printout: eager keeps sample 0 only."""
    float_model, qmodel = resnet18_case.make()
    eager = tns.compare_model_stub(
        float_model, qmodel, resnet18_case.swap_list, *resnet18_case.data
    )
    float_model, qmodel = resnet18_case.make()
    fx = ns.compare_model_stub(float_model, qmodel, resnet18_case.swap_list, *resnet18_case.data)

    assert eager["layer1.0.stats"]["float"][0].shape == (64, 3, 3)
    assert fx["layer1.0.stats"]["float"][0].shape == (2, 64, 3, 3)
    assert fx["layer1.0.stats"]["quantized"][0].shape == (2, 64, 3, 3)
    for side in ("float", "quantized"):
        assert_same(fx["layer1.0.stats"][side][0][0], eager["layer1.0.stats"][side][0])


# --------------------------------------------------------------------------------------------
# 5. prepare_model_with_stubs + forward passes + get_logger_dict
# --------------------------------------------------------------------------------------------


def test_prepare_model_with_stubs_and_get_logger_dict_match_eager(case: Case) -> None:
    float_model, qmodel = case.make()
    tns.prepare_model_with_stubs(float_model, qmodel, case.swap_list, tns.ShadowLogger)
    for batch in case.batches:
        qmodel(*batch)
    eager = tns.get_logger_dict(qmodel)

    float_model, qmodel = case.make()
    ns.prepare_model_with_stubs(float_model, qmodel, case.swap_list, ns.ShadowLogger)
    for batch in case.batches:
        qmodel(*batch)
    fx = ns.get_logger_dict(qmodel)

    _assert_shadow_dicts_match(fx, eager, case, n_passes=len(case.batches))


@pytest.mark.parametrize("swap", ["ConvReLU2d", "QuantizableBasicBlock"])
def test_a_float_weight_changed_after_preparing_reaches_the_shadows_as_in_eager(
        resnet18_case: Case, swap: str) -> None:
    """torch's ``Shadow`` holds the float module itself. fxnumeric's shadows call it too where
    calling it changes nothing, but torch's ``fuse_modules`` leaves the fused ``ConvReLU2d``
    (an ``nn.Sequential``) in training mode around eval-mode children, so it (and every block
    holding one) was deep-copied at prepare time: a float weight scaled afterwards reached
    Conv2d shadows and not these (maxdiff 1.99 against torch's)."""
    swap_list = ([torch.ao.nn.intrinsic.ConvReLU2d] if swap == "ConvReLU2d"
                 else resnet18_case.swap_list)
    entries = []
    for suite in (tns, ns):
        float_model, qmodel = resnet18_case.make()
        assert float_model.layer1[0].conv1.training  # as torch's fuse leaves it
        suite.prepare_model_with_stubs(float_model, qmodel, swap_list, suite.ShadowLogger)
        with torch.no_grad():
            float_model.layer1[0].conv1[0].weight.mul_(2)
        qmodel(*resnet18_case.data)
        key = "layer1.0.conv1.stats" if swap == "ConvReLU2d" else "layer1.0.stats"
        entries.append(suite.get_logger_dict(qmodel)[key])
    eager, fx = entries
    for side in ("float", "quantized"):
        assert_same(_shadow_view(fx[side][0], resnet18_case), eager[side][0], side)


def _my_shadow_logger(base: type) -> type:
    """The tutorial's MyShadowLogger, on top of ``base`` (fxnumeric's or torch's Logger)."""

    class MyShadowLogger(base):
        r"""Customized logger class"""

        def __init__(self):
            super().__init__()

        def forward(self, x, y):
            # Custom functionalities
            # ...
            return x

    return MyShadowLogger


@pytest.mark.parametrize("api", ["compare_model_stub", "prepare_model_with_stubs"])
def test_tutorial_custom_shadow_logger_matches_eager(resnet18_case: Case, api: str) -> None:
    """The tutorial's MyShadowLogger records nothing: every key maps to an empty stats dict."""
    case = resnet18_case
    results = []
    for suite in (tns, ns):
        float_model, qmodel = case.make()
        logger_cls = _my_shadow_logger(suite.Logger)
        if api == "compare_model_stub":
            results.append(
                suite.compare_model_stub(
                    float_model, qmodel, case.swap_list, *case.data, logger_cls=logger_cls
                )
            )
        else:
            suite.prepare_model_with_stubs(float_model, qmodel, case.swap_list, logger_cls)
            for batch in case.batches:
                qmodel(*batch)
            results.append(suite.get_logger_dict(qmodel))
    eager, fx = results
    assert len(eager) == 8 and all(v == {} for v in eager.values())
    assert fx == eager


# --------------------------------------------------------------------------------------------
# 6. compare_weights on two models (fxnumeric-only extension)
# --------------------------------------------------------------------------------------------


def test_compare_weights_of_models_matches_eager_on_state_dicts(static_case: Case) -> None:
    float_model, qmodel = static_case.make()
    eager = tns.compare_weights(float_model.state_dict(), qmodel.state_dict())
    float_model, qmodel = static_case.make()
    fx = ns.compare_weights(float_model, qmodel)

    assert set(fx) == set(eager)
    for key in eager:
        assert_same(fx[key], eager[key], key)


# --------------------------------------------------------------------------------------------
# 7. a quantized model passed as the float model (eager_compat.md row 30)
# --------------------------------------------------------------------------------------------


def test_every_eager_call_refuses_a_quantized_float_side_where_torch_measures_q_against_q() -> None:
    """torch's suite (the oracle of what it returns) compares the quantized model with itself:
    its compare_weights puts the quantized weight under 'float' (for a packed Linear the value
    is the dtype ``torch.qint8``), its compare_model_outputs logs quantized against quantized.
    fxnumeric refuses each call with compare's error, naming the first quantized tensor or op,
    before anything runs; the float model the quantized one was made from passes, with
    torch's numbers."""
    f, q, x = _functional_pair()
    with torch.no_grad():
        expected = q(x)
    eager = tns.compare_weights(q.state_dict(), q.state_dict())
    assert eager["conv.weight"]["float"].is_quantized
    assert eager["fc._packed_params._packed_params"]["float"] is torch.qint8
    assert list(tns.compare_model_outputs(copy.deepcopy(q), copy.deepcopy(q), x)) == [
        "quant.stats", "conv.stats", "add.stats", "dequant.stats"]
    with pytest.raises(ns.InputError, match=r"the float state dict is quantized too: it holds 2 "
                       r"quantized tensors or packed params \(`conv.weight`, "
                       r"`fc._packed_params._packed_params`\).*passed twice\?\nFix: pass the "
                       r"state_dict\(\) of the float model"):
        ns.compare_weights(q.state_dict(), q.state_dict())
    twice = (r"the float model is quantized too: it computes 5 quantized ops or quantize nodes "
             r"\(`conv`, `add`, `add_scalar`, ...\).*passed twice\?\nFix: pass as the float "
             r"model the one the quantized model was made from")
    calls = {
        "compare_weights": lambda: ns.compare_weights(copy.deepcopy(q), q),
        "compare_model_outputs": lambda: ns.compare_model_outputs(copy.deepcopy(q), q, x),
        "compare_model_outputs(q, q)": lambda: ns.compare_model_outputs(q, q, x),
        "compare_model_stub": lambda: ns.compare_model_stub(copy.deepcopy(q), q,
                                                            [nn.Conv2d, nn.Linear], x),
        "prepare_model_outputs": lambda: ns.prepare_model_outputs(copy.deepcopy(q), q),
        "prepare_model_with_stubs": lambda: ns.prepare_model_with_stubs(
            copy.deepcopy(q), q, [nn.Conv2d, nn.Linear], ns.ShadowLogger),
    }
    for name, call in calls.items():
        with pytest.raises(ns.InputError, match=twice):
            call()
        assert ns.get_logger_dict(q) == {}, name  # nothing prepared
    with torch.no_grad():
        assert torch.equal(q(x), expected)
    # a dynamic model's state dict passed twice: packed params under 'float'
    g = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    gq = torch.ao.quantization.quantize_dynamic(copy.deepcopy(g), {nn.Linear})
    eager = tns.compare_weights(gq.state_dict(), gq.state_dict())
    assert [entry["float"] for entry in eager.values()] == [torch.qint8, torch.qint8]
    with pytest.raises(ns.InputError, match=r"the float state dict is quantized too: it holds 2 "
                       r"quantized tensors or packed params \(`0._packed_params._packed_params`"):
        ns.compare_weights(gq.state_dict(), gq.state_dict())
    # the float models pass, with torch's numbers
    for float_model, quant_model in ((f, q), (g, gq)):
        eager = tns.compare_weights(float_model.state_dict(), quant_model.state_dict())
        ours = ns.compare_weights(float_model.state_dict(), quant_model.state_dict())
        assert eager and list(ours) == list(eager)
        for key in eager:
            assert_same(ours[key], eager[key], key)


# --------------------------------------------------------------------------------------------
# Key order (the tutorial prints ``.keys()``): beyond the key sets compared above
# --------------------------------------------------------------------------------------------


def _split_lstm_keys(keys: list[str]) -> list[str]:
    """Eager's key order with each bare LSTM ``...param`` key replaced by its ih, hh keys."""
    out = []
    for key in keys:
        if "._all_weight_values." in key:
            out += [f"{key}.weight_ih", f"{key}.weight_hh"]
        else:
            out.append(key)
    return out


def test_key_order_matches_eager(case: Case) -> None:
    float_model, qmodel = case.make()
    eager_weights = tns.compare_weights(float_model.state_dict(), qmodel.state_dict())
    fx_weights = ns.compare_weights(float_model.state_dict(), qmodel.state_dict())
    fx_model_weights = ns.compare_weights(float_model, qmodel)
    assert list(fx_weights) == _split_lstm_keys(list(eager_weights))
    assert list(fx_model_weights) == list(fx_weights)

    eager_stub = tns.compare_model_stub(float_model, qmodel, case.swap_list, *case.data)
    float_model, qmodel = case.make()
    fx_stub = ns.compare_model_stub(float_model, qmodel, case.swap_list, *case.data)
    assert list(fx_stub) == list(eager_stub)


def test_a_float_model_without_quantstub_keys_the_input_quantize_as_the_quantwrapper() -> None:
    """A float model without a QuantStub against its ``QuantWrapper``-quantized model: the
    input quantize's key is the quantized model's (``quant.stats``, first), as torch's suite
    gives it on the wrapped float model (the oracle: a QuantStub computes nothing in float)."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 3, 4, 4)
    prepared = torch.ao.quantization.QuantWrapper(copy.deepcopy(inner)).eval()
    prepared.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    torch.ao.quantization.prepare(prepared, inplace=True)
    prepared(x)
    q = torch.ao.quantization.convert(prepared)
    wrapped = torch.ao.quantization.QuantWrapper(copy.deepcopy(inner)).eval()
    eager = tns.compare_model_outputs(wrapped, copy.deepcopy(q), x)
    assert list(eager) == ["quant.stats", "module.0.stats", "module.3.stats"]
    fx = ns.compare_model_outputs(inner, q, x)
    assert list(fx) == list(eager)
    for key in eager:
        assert_same(fx[key], eager[key], key)
    ns.prepare_model_outputs(inner, q)
    inner(x)
    q(x)
    prepared_fx = ns.get_matching_activations(inner, q)
    assert "quant.stats" in ns.get_logger_dict(q)
    for model in (inner, q):
        ns.remove_instrumentation(model)
    assert list(prepared_fx) == list(eager)
    for key in eager:
        assert_same(prepared_fx[key], eager[key], key)
    # compare's own row keeps the name of the float input it measures
    assert "input.quantize" in [r.name for r in ns.compare(inner, q, [x], progress=False).rows]


def test_a_floatfunctional_under_untraceable_code_logs_and_shadows_as_eager() -> None:
    """A FloatFunctional called through ``add`` from a forward torch.fx cannot trace is
    logged and shadowed as torch's suite does (keys and tensors); compare's row for it reads
    what the add hands on (its parent's output, read by a forward hook)."""
    torch.manual_seed(0)
    f = UntracedGated().eval()
    x = torch.randn(2, 3, 4, 4)
    prepared = copy.deepcopy(f)
    prepared.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    torch.ao.quantization.prepare(prepared, inplace=True)
    prepared(x)
    q = torch.ao.quantization.convert(prepared)
    swap = [nn.Conv2d, torch.ao.nn.quantized.FloatFunctional]
    eager = tns.compare_model_outputs(copy.deepcopy(f), copy.deepcopy(q), x)
    fx = ns.compare_model_outputs(f, q, x)
    assert list(eager) == ["quant.stats", "gate.conv.stats", "gate.add.stats"]
    assert list(fx) == list(eager)
    for key in eager:
        assert_same(fx[key], eager[key], key)
    eager = tns.compare_model_stub(copy.deepcopy(f), copy.deepcopy(q), swap, x)
    fx = ns.compare_model_stub(f, q, swap, x)
    assert list(eager) == ["gate.conv.stats", "gate.add.stats"]
    assert list(fx) == list(eager)
    for key in eager:  # batch of 2: torch's ShadowLogger keeps sample 0 (row 1)
        for side in ("float", "quantized"):
            assert_same(fx[key][side][0][0], eager[key][side][0], f"{key}[{side}]")
    outputs = {}
    for side, model in (("float", f), ("quant", q)):
        handle = model.gate.register_forward_hook(
            lambda _m, _a, out, side=side: outputs.__setitem__(side, out))
        with torch.no_grad():
            model(x)
        handle.remove()
    row = ns.compare(f, q, [x], keep_activations=True, progress=False).row("gate.add")
    (kept_ref, kept_actual), = row.activations
    assert torch.equal(kept_ref, outputs["float"])
    actual = kept_actual.dequantize() if kept_actual.is_quantized else kept_actual
    assert torch.equal(actual, outputs["quant"].dequantize())
    # without a batch, which method `gate` calls is not known: refused with the fix
    with pytest.raises(ns.MatchError, match=r'known from a run only.*leaf_modules=\["gate"\]'):
        ns.prepare_model_outputs(f, q)


# --------------------------------------------------------------------------------------------
# (d) compare_model_outputs and compare_model_stub leave the models untouched
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["compare_model_outputs", "compare_model_stub"])
def test_compare_functions_do_not_modify_models(core_case: Case, api: str) -> None:
    float_model, qmodel = core_case.make()
    float_before = _snapshot(float_model, core_case.data)
    q_before = _snapshot(qmodel, core_case.data)

    if api == "compare_model_outputs":
        result = ns.compare_model_outputs(float_model, qmodel, *core_case.data)
    else:
        result = ns.compare_model_stub(float_model, qmodel, core_case.swap_list, *core_case.data)
    assert result

    assert_unchanged(float_model, float_before, core_case.data, "float")
    assert_unchanged(qmodel, q_before, core_case.data, "quantized")


def test_eager_compare_model_outputs_does_modify_models(resnet18_case: Case) -> None:
    """The eager quirk that deviation (d) removes, so the contrast stays documented."""
    float_model, qmodel = resnet18_case.make()
    tns.compare_model_outputs(float_model, qmodel, *resnet18_case.data)
    assert any(_is_logger(m) for m in float_model.modules())
    assert any(_is_logger(m) for m in qmodel.modules())


# --------------------------------------------------------------------------------------------
# (e) custom loggers with get_matching_activations
# --------------------------------------------------------------------------------------------


def _my_output_logger(base: type) -> type:
    """The tutorial's MyOutputLogger, on top of ``base`` (fxnumeric's or torch's Logger)."""

    class MyOutputLogger(base):
        r"""Customized logger class"""

        def __init__(self):
            super().__init__()

        def forward(self, x):
            # Custom functionalities
            # ...
            return x

    return MyOutputLogger


def _max_logger(base: type) -> type:
    """A custom logger that records the maximum of every output it sees."""

    class MaxLogger(base):
        def __init__(self):
            super().__init__()
            self.stats["max"] = []

        def forward(self, x):
            t = x.dequantize() if x.is_quantized else x
            self.stats["max"].append(t.detach().max())
            return x

    return MaxLogger


def test_eager_crashes_on_tutorial_custom_output_logger(resnet18_case: Case) -> None:
    """The eager quirk behind deviation (e)."""
    my_logger = _my_output_logger(tns.Logger)
    float_model, qmodel = resnet18_case.make()
    with pytest.raises(KeyError, match="tensor_val"):
        tns.compare_model_outputs(float_model, qmodel, *resnet18_case.data, logger_cls=my_logger)

    with pytest.raises(KeyError, match="tensor_val"):
        _prepared_activations(tns, resnet18_case, my_logger)


def test_custom_output_logger_returns_its_stats(core_case: Case) -> None:
    """Deviation (e): the tutorial's MyOutputLogger records nothing, so every entry is empty."""
    my_logger = _my_output_logger(ns.Logger)
    float_model, qmodel = core_case.make()
    reference_keys = set(ns.compare_model_outputs(float_model, qmodel, *core_case.data))
    assert reference_keys

    float_model, qmodel = core_case.make()
    one_shot = ns.compare_model_outputs(float_model, qmodel, *core_case.data, logger_cls=my_logger)
    assert set(one_shot) == reference_keys
    for key, entry in one_shot.items():
        assert entry == {"float": {}, "quantized": {}}, key

    prepared = _prepared_activations(ns, core_case, my_logger)
    assert set(prepared) == reference_keys
    for key, entry in prepared.items():
        assert entry == {"float": {}, "quantized": {}}, key


def test_recording_custom_logger_returns_recorded_stats(resnet18_case: Case) -> None:
    eager = _prepared_activations(tns, resnet18_case)
    fx = _prepared_activations(ns, resnet18_case, _max_logger(ns.Logger))

    assert list(fx) == list(eager)
    for key in eager:
        assert set(fx[key]) == {"float", "quantized"}
        for side in ("float", "quantized"):
            stats = fx[key][side]
            assert set(stats) == {"max"}, (key, side)
            eager_entries = _eager_entries(eager[key][side], side, 2, f"{key}[{side!r}]")
            expected = [
                t.dequantize().max() if t.is_quantized else t.detach().max() for t in eager_entries
            ]
            assert len(stats["max"]) == len(resnet18_case.batches)
            assert_same(list(stats["max"]), expected, f"{key}[{side!r}]['max']")


# --------------------------------------------------------------------------------------------
# (f) get_matching_activations before any forward pass
# --------------------------------------------------------------------------------------------


def test_get_matching_activations_before_forward_raises(core_case: Case) -> None:
    float_model, qmodel = core_case.make()
    tns.prepare_model_outputs(float_model, qmodel)
    assert tns.get_matching_activations(float_model, qmodel) == {}  # eager: silently empty

    float_model, qmodel = core_case.make()
    ns.prepare_model_outputs(float_model, qmodel)
    with pytest.raises(ns.FxNumericError, match="forward"):
        ns.get_matching_activations(float_model, qmodel)


def _dynamic_linear_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear})
    return float_model, qmodel, torch.randn(3, 4)


@pytest.mark.parametrize("ran", ["float", "quantized"])
def test_get_matching_activations_after_one_model_ran_names_the_other(ran: str) -> None:
    """torch's suite gives ``{}`` when only the float model ran and entries with empty float
    lists when only the quantized one did; fxnumeric names the model that was not run."""
    float_model, qmodel, x = _dynamic_linear_pair()
    tns.prepare_model_outputs(float_model, qmodel)
    (float_model if ran == "float" else qmodel)(x)
    eager = tns.get_matching_activations(float_model, qmodel)
    assert all(not entry["float"] for entry in eager.values())  # nothing to compare

    float_model, qmodel, x = _dynamic_linear_pair()
    ns.prepare_model_outputs(float_model, qmodel)
    (float_model if ran == "float" else qmodel)(x)
    missing = "quantized" if ran == "float" else "float"
    with pytest.raises(ns.InstrumentationError,
                       match=f"the prepared {missing} model was not run"):
        ns.get_matching_activations(float_model, qmodel)
    (qmodel if ran == "float" else float_model)(x)  # now both ran: read as torch's
    float_model2, qmodel2, _ = _dynamic_linear_pair()
    tns.prepare_model_outputs(float_model2, qmodel2)
    float_model2(x), qmodel2(x)
    eager = tns.get_matching_activations(float_model2, qmodel2)
    ours = ns.get_matching_activations(float_model, qmodel)
    assert list(ours) == list(eager) == ["0.stats", "2.stats"]
    for key, entry in eager.items():
        for side in ("float", "quantized"):
            assert torch.equal(ours[key][side][0], entry[side][0])


def test_module_names_as_the_swap_list_are_refused_naming_their_type() -> None:
    """torch's suite selects by type: module names select nothing (``{}``). fxnumeric refused
    them talking of ``leaf_modules`` (an argument not passed) and returned ``[]`` for
    ``["0"]``; it now says the list takes types, and which type ``0`` is."""
    float_model, qmodel, x = _dynamic_linear_pair()
    assert tns.compare_model_stub(copy.deepcopy(float_model), copy.deepcopy(qmodel), ["0"],
                                  x) == {}
    eager = tns.compare_model_stub(copy.deepcopy(float_model), copy.deepcopy(qmodel),
                                   [nn.Linear], x)
    with pytest.raises(ns.InputError, match=r"(?s)module_swap_list holds '0', which is not a "
                       r"module type.*`0` is a Linear of the float model.*Fix: pass \[Linear\]"):
        ns.compare_model_stub(float_model, qmodel, ["0"], x)
    for swap in (["fc"], {"linear": [nn.Linear]}):
        with pytest.raises(ns.InputError, match="module_swap_list (holds 'fc'|is a dict)") as info:
            ns.compare_model_stub(float_model, qmodel, swap, x)
        assert "leaf_modules" not in str(info.value)
    with pytest.raises(ns.InputError, match="module_swap_list holds 'fc'"):
        ns.prepare_model_with_stubs(float_model, qmodel, ["fc"], ns.ShadowLogger)
    # the type the message names selects what torch's suite selects
    assert list(ns.compare_model_stub(float_model, qmodel, [nn.Linear], x)) == list(eager)


@pytest.mark.parametrize("allow_list", [nn.Linear, "0", ["0"], nn.Linear(4, 4), 3])
@pytest.mark.parametrize("api", ["compare_model_outputs", "prepare_model_outputs"])
def test_an_allow_list_that_is_no_collection_of_types_is_an_input_error(allow_list,
                                                                         api: str) -> None:
    """A single type (``allow_list=nn.Linear``) raised a bare ``TypeError: 'type' object is
    not iterable``, outside fxnumeric's exception family."""
    float_model, qmodel, x = _dynamic_linear_pair()
    with pytest.raises(ns.InputError, match="allow_list (is a|holds)"):
        if api == "compare_model_outputs":
            ns.compare_model_outputs(float_model, qmodel, x, allow_list=allow_list)
        else:
            ns.prepare_model_outputs(float_model, qmodel, ns.OutputLogger, allow_list)
    eager = tns.compare_model_outputs(copy.deepcopy(float_model), copy.deepcopy(qmodel), x,
                                      allow_list={nn.Linear, type(qmodel[0])})
    ours = ns.compare_model_outputs(float_model, qmodel, x,
                                    allow_list=[nn.Linear, type(qmodel[0])])
    assert list(ours) == list(eager) == ["0.stats", "2.stats"]


# --------------------------------------------------------------------------------------------
# (g) an unfused float model pairs by graph with the quantized model of its fused copy
# --------------------------------------------------------------------------------------------


def test_unfused_float_model_pairs_at_fused_outputs(
    make_resnet18_pair, make_resnet18_unfused_pair
) -> None:
    fused_float, qmodel, img_data = make_resnet18_pair()
    x = img_data[0][0]
    eager_fused = tns.compare_model_outputs(fused_float, qmodel, x)

    unfused_float, qmodel, _ = make_resnet18_unfused_pair()
    fx = ns.compare_model_outputs(unfused_float, qmodel, x)

    assert list(fx) == list(eager_fused)
    for key in eager_fused:
        assert len(fx[key]["float"]) == 1 and len(fx[key]["quantized"]) == 1, key
        expected_float = _eager_entries(eager_fused[key]["float"], "float", 1, key)
        assert_close(fx[key]["float"], expected_float, f"{key}['float']")
        assert_same(fx[key]["quantized"], eager_fused[key]["quantized"], f"{key}['quantized']")

    # The eager quirk: pairing by module name logs the unfused conv1 before BN and ReLU.
    unfused_float, qmodel, _ = make_resnet18_unfused_pair()
    eager_unfused = tns.compare_model_outputs(unfused_float, qmodel, x)
    eager_conv1 = eager_unfused["conv1.stats"]["float"][0].detach()
    fused_conv1 = eager_fused["conv1.stats"]["float"][0].detach()
    assert eager_conv1.shape == fused_conv1.shape
    assert not torch.allclose(eager_conv1, fused_conv1, atol=1e-3)
    assert (eager_conv1 < 0).any()  # pre-ReLU values, which the quantized conv1 never outputs


# --------------------------------------------------------------------------------------------
# (h) preparing twice does not stack loggers
# --------------------------------------------------------------------------------------------


def test_prepare_model_outputs_twice_does_not_stack_loggers(core_case: Case) -> None:
    float_model, qmodel = core_case.make()
    reference_keys = list(tns.compare_model_outputs(float_model, qmodel, *core_case.data))

    float_model, qmodel = core_case.make()
    ns.prepare_model_outputs(float_model, qmodel)
    ns.prepare_model_outputs(float_model, qmodel)
    float_model(*core_case.data)
    qmodel(*core_case.data)
    fx = ns.get_matching_activations(float_model, qmodel)

    assert list(fx) == reference_keys
    for key, entry in fx.items():
        assert len(entry["float"]) == 1, key
        assert len(entry["quantized"]) == 1, key


# --------------------------------------------------------------------------------------------
# FX-quantized torchvision resnet18 (eager's suite cannot pair these; fxnumeric pairs by graph)
# --------------------------------------------------------------------------------------------


def test_compare_model_outputs_on_fx_quantized_resnet18(make_fx_resnet18_pair) -> None:
    float_model, qmodel, img_data = make_fx_resnet18_pair()
    x = img_data[0][0]
    result = ns.compare_model_outputs(float_model, qmodel, x)

    assert result
    assert all(key.endswith(".stats") for key in result), list(result)
    for key in ("conv1.stats", "layer1.0.conv1.stats", "fc.stats"):
        assert key in result, (key, list(result))
    add_nodes = [
        n.name
        for n in qmodel.graph.nodes
        if n.op == "call_function" and n.target is torch.ops.quantized.add_relu
    ]
    assert len(add_nodes) == 8
    for name in add_nodes:
        assert f"{name}.stats" in result, (name, list(result))

    for key, entry in result.items():
        assert set(entry) == {"float", "quantized"}, key
        assert len(entry["float"]) == 1 and len(entry["quantized"]) == 1, key
        f_val, q_val = entry["float"][0], entry["quantized"][0]
        assert isinstance(f_val, torch.Tensor) and isinstance(q_val, torch.Tensor), key
        assert f_val.shape == q_val.shape, (key, f_val.shape, q_val.shape)

    conv1 = result["conv1.stats"]
    assert conv1["float"][0].shape == (2, 64, 16, 16)
    assert sqnr_db(conv1["float"][0], conv1["quantized"][0]) > 15
    assert not math.isnan(
        sqnr_db(result["fc.stats"]["float"][0], result["fc.stats"]["quantized"][0])
    )


# --------------------------------------------------------------------------------------------
# Prepared models: what happens to them after prepare_* (copies, submodules, replacements)
# --------------------------------------------------------------------------------------------


def test_a_deep_copy_of_prepared_models_logs_and_reads_as_the_originals(
        resnet18_case: Case) -> None:
    """A deep copy of a prepared pair is prepared too, with loggers of its own: torch's suite
    (whose loggers are submodules) reads it, and so must fxnumeric."""
    float_model, qmodel = resnet18_case.make()
    ns.prepare_model_outputs(float_model, qmodel)
    float_copy, q_copy = copy.deepcopy(float_model), copy.deepcopy(qmodel)
    for model in (float_model, qmodel, float_copy, q_copy):
        model(*resnet18_case.data)
    original = ns.get_matching_activations(float_model, qmodel)
    copied = ns.get_matching_activations(float_copy, q_copy)

    assert list(copied) == list(original) and len(copied) > 10
    assert_same(copied, original)
    for name, stats in ns.get_logger_dict(q_copy).items():  # the copy's own loggers
        assert stats is not ns.get_logger_dict(qmodel)[name]
    ns.remove_instrumentation(q_copy)
    assert "forward" not in vars(q_copy) and ns.get_logger_dict(q_copy) == {}
    assert "forward" in vars(qmodel)  # the original stays prepared


@pytest.mark.parametrize("how", ["outputs", "stubs"])
def test_get_logger_dict_of_a_submodule_reads_its_loggers_as_eager(resnet18_case: Case,
                                                                    how: str) -> None:
    found = {}
    for suite in (tns, ns):
        float_model, qmodel = resnet18_case.make()
        if how == "outputs":
            suite.prepare_model_outputs(float_model, qmodel)
        else:
            suite.prepare_model_with_stubs(float_model, qmodel, [nn.Conv2d], suite.ShadowLogger)
        float_model(*resnet18_case.data)
        qmodel(*resnet18_case.data)
        found[suite] = suite.get_logger_dict(qmodel.layer1, prefix="l1")

    assert list(found[ns]) == list(found[tns]) and found[ns]  # 'l1.0.conv1.stats', ...
    if how == "outputs":
        assert_same(found[ns], found[tns])


def test_get_logger_dict_reads_torch_loggers(resnet18_case: Case) -> None:
    float_model, qmodel = resnet18_case.make()
    tns.prepare_model_outputs(float_model, qmodel)
    qmodel(*resnet18_case.data)

    assert_same(ns.get_logger_dict(qmodel), tns.get_logger_dict(qmodel))
    assert len(ns.get_logger_dict(qmodel)) > 10


def test_a_submodule_replaced_after_preparing_is_refused(resnet18_case: Case) -> None:
    """The prepared forward is the graph traced when preparing: a layer swapped in since would
    silently not run (torch's suite runs it, unlogged). fxnumeric says so instead."""
    float_model, qmodel = resnet18_case.make()
    ns.prepare_model_outputs(float_model, qmodel)
    qmodel.fc = nn.Identity()

    with pytest.raises(ns.InstrumentationError, match=r"`fc` .* replaced or removed"):
        qmodel(*resnet18_case.data)
    ns.prepare_model_outputs(float_model, qmodel)  # prepared again: runs the new module
    assert qmodel(*resnet18_case.data).shape[-1] == 512


@pytest.mark.parametrize("change", ["nested", "deleted", "parent", "copy"])
def test_every_way_of_replacing_a_called_submodule_is_refused(resnet18_case: Case,
                                                             change: str) -> None:
    """The check reads each parent's ``_modules`` link rather than walking every path per
    call (12% of mobilenet_v2's prepared forwards): a leaf deep in the tree, a module
    deleted, a parent swapped for a copy of itself are still caught, each by its path, and a
    deep copy of the prepared model checks its own tree, not the original's."""
    float_model, qmodel = resnet18_case.make()
    ns.prepare_model_outputs(float_model, qmodel)
    model, path = qmodel, "layer1.0.conv1"
    if change == "nested":
        qmodel.layer1[0].conv1 = copy.deepcopy(qmodel.layer1[0].conv1)
    elif change == "deleted":
        del qmodel.fc
        path = "fc"
    elif change == "parent":
        qmodel.layer1 = copy.deepcopy(qmodel.layer1)
    else:
        model = copy.deepcopy(qmodel)
        model.layer1[0].conv1 = copy.deepcopy(model.layer1[0].conv1)
        qmodel(*resnet18_case.data)  # the original keeps its modules: it runs
    with pytest.raises(ns.InstrumentationError, match=rf"`{re.escape(path)}` .* replaced"):
        model(*resnet18_case.data)


def test_models_prepared_by_separate_calls_are_not_read_together(resnet18_case: Case) -> None:
    float_model, qmodel = resnet18_case.make()
    ns.prepare_model_outputs(float_model, qmodel)
    ns.prepare_model_with_stubs(float_model, qmodel, [nn.Conv2d], ns.ShadowLogger)
    float_model(*resnet18_case.data)
    qmodel(*resnet18_case.data)

    with pytest.raises(ns.InstrumentationError, match="prepared by separate calls"):
        ns.get_matching_activations(float_model, qmodel)


def test_a_logger_that_cannot_take_its_values_is_named(resnet18_case: Case) -> None:
    float_model, qmodel = resnet18_case.make()
    with pytest.raises(ns.InstrumentationError, match=r"OutputLogger\.forward\(x\) cannot take"):
        ns.compare_model_stub(float_model, qmodel, [nn.Conv2d], *resnet18_case.data,
                              logger_cls=ns.OutputLogger)
    with pytest.raises(ns.InstrumentationError, match=r"ShadowLogger\.forward\(x, y\)"):
        ns.compare_model_outputs(float_model, qmodel, *resnet18_case.data,
                                 logger_cls=ns.ShadowLogger)


# --------------------------------------------------------------------------------------------
# Hooks on the model itself, and prepared models saved and loaded
# --------------------------------------------------------------------------------------------


def _shift_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] + 5,)


def _scale_input(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    return (args[0] * 3,), kwargs


def _rescale_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 10 - 1


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.fc(x))


class _UntraceableNet(nn.Module):
    """torch.fx cannot trace the root (a data-dependent ``if``): captured through the module
    tree, its ``block`` traced as a graph of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:
            x = self.block(x)
        return self.head(x)


def _hooked_pair(make: Callable[[], nn.Module], hook: str) -> tuple[nn.Module, nn.Module]:
    """A float model and its dynamic quantization, both with ``hook`` on the model itself (and,
    for the untraceable model, on its traced ``block`` too)."""
    torch.manual_seed(0)
    float_model = make().eval()
    qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(float_model), {nn.Linear})
    for model in (float_model, qmodel):
        targets = [model] + ([model.block] if hasattr(model, "block") else [])
        for target in targets:
            if hook == "pre":
                target.register_forward_pre_hook(_shift_input)
            elif hook == "pre_kwargs":
                target.register_forward_pre_hook(_scale_input, with_kwargs=True)
            else:
                target.register_forward_hook(_rescale_output)
    return float_model, qmodel


def _layer_outputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """The oracle: each named layer's output when the model itself runs (its hooks too), read
    by forward hooks on the layers."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: seen.__setitem__(name, out.detach().clone()))
        for name in names]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return seen


_HOOKED = [
    pytest.param(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), ["0", "2"],
                 id="traced"),
    pytest.param(_UntraceableNet, ["block.fc", "head"], id="module-tree"),
]


@pytest.mark.parametrize("hook", ["pre", "pre_kwargs", "forward"])
@pytest.mark.parametrize(("make", "layers"), _HOOKED)
def test_hooks_on_the_model_itself_shape_every_logged_value(make, layers, hook: str) -> None:
    """A hook on the model (an input normalisation) runs around the compared graph as around
    ``model(x)``: torch.fx traces ``forward`` without it, and the values used to be those of
    the raw input (max |logged - true| 4.98 for ``x + 5``)."""
    float_model, qmodel = _hooked_pair(make, hook)
    x = torch.randn(3, 4)
    float_true = _layer_outputs(float_model, x, layers)
    quant_true = _layer_outputs(qmodel, x, layers)

    outputs = ns.compare_model_outputs(float_model, qmodel, x)
    stubs = ns.compare_model_stub(float_model, qmodel, [nn.Linear], x)
    prepared_f, prepared_q = copy.deepcopy(float_model), copy.deepcopy(qmodel)
    ns.prepare_model_outputs(prepared_f, prepared_q)
    prepared_f(x)
    prepared_q(x)
    prepared = ns.get_matching_activations(prepared_f, prepared_q)

    for name in layers:
        for found in (outputs, prepared):
            assert len(found[f"{name}.stats"]["float"]) == 1  # each hook ran once
            torch.testing.assert_close(found[f"{name}.stats"]["float"][0], float_true[name],
                                       rtol=0, atol=0)
            torch.testing.assert_close(found[f"{name}.stats"]["quantized"][0], quant_true[name],
                                       rtol=0, atol=0)
        # the quantized layer, and its float shadow on the same input
        torch.testing.assert_close(stubs[f"{name}.stats"]["quantized"][0], quant_true[name],
                                   rtol=0, atol=0)
    first = layers[0]  # reads the model's input: its shadow is the float layer on it
    torch.testing.assert_close(stubs[f"{first}.stats"]["float"][0], float_true[first],
                               rtol=0, atol=0)


def _saved_and_loaded(obj: Any) -> Any:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _assert_same_stats(found: dict, expected: dict) -> None:
    assert list(found) == list(expected)
    for key in expected:
        for side in ("float", "quantized"):
            assert len(found[key][side]) == len(expected[key][side])
            for got, want in zip(found[key][side], expected[key][side], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(("make", "layers"), _HOOKED)
def test_prepared_models_survive_torch_save_and_load(make, layers) -> None:
    """torch.load of a prepared model used to fail in fxnumeric's tracer (``_Tracer.__init__()
    missing 2 required positional arguments``): loaded, it has the loggers it was saved with
    and logs again, the model's own hooks included."""
    float_model, qmodel = _hooked_pair(make, "pre")
    x = torch.randn(3, 4)
    float_true, quant_true = (_layer_outputs(float_model, x, layers),
                              _layer_outputs(qmodel, x, layers))
    prepared_f, prepared_q = copy.deepcopy(float_model), copy.deepcopy(qmodel)
    ns.prepare_model_outputs(prepared_f, prepared_q)
    prepared_f(x)
    prepared_q(x)
    saved = ns.get_matching_activations(prepared_f, prepared_q)

    loaded_f, loaded_q = _saved_and_loaded((prepared_f, prepared_q))
    _assert_same_stats(ns.get_matching_activations(loaded_f, loaded_q), saved)
    loaded_f(x)
    loaded_q(x)
    logged = ns.get_matching_activations(loaded_f, loaded_q)
    for name in layers:
        assert len(logged[f"{name}.stats"]["float"]) == 2
        torch.testing.assert_close(logged[f"{name}.stats"]["float"][1], float_true[name],
                                   rtol=0, atol=0)
        torch.testing.assert_close(logged[f"{name}.stats"]["quantized"][1], quant_true[name],
                                   rtol=0, atol=0)
    inner = layers[0].rpartition(".")[0]
    if inner:  # a submodule of a loaded model: its own loggers, named relative to it
        assert list(ns.get_logger_dict(loaded_q.get_submodule(inner))) == list(
            ns.get_logger_dict(prepared_q.get_submodule(inner)))

    stubbed = copy.deepcopy(qmodel)
    ns.prepare_model_with_stubs(float_model, stubbed, [nn.Linear], ns.ShadowLogger)
    stubbed(x)
    loaded = _saved_and_loaded(stubbed)
    _assert_same_stats(ns.get_logger_dict(loaded), ns.get_logger_dict(stubbed))
    loaded(x)
    torch.testing.assert_close(ns.get_logger_dict(loaded)[f"{layers[0]}.stats"]["quantized"][1],
                               quant_true[layers[0]], rtol=0, atol=0)

    # the graphs fxnumeric hands out run as the model does, loaded too
    float_logged, _ = ns.add_loggers(float_model, qmodel, ns.OutputLogger)
    with torch.no_grad():
        expected = float_model(x)
        torch.testing.assert_close(_saved_and_loaded(float_logged)(x), expected, rtol=0, atol=0)
        if make is not _UntraceableNet:
            traced = ns.trace(float_model)
            torch.testing.assert_close(traced(x), expected, rtol=0, atol=0)
            torch.testing.assert_close(_saved_and_loaded(traced)(x), expected, rtol=0, atol=0)
