"""fxnumeric.storage reads the bits each flow really stores per weight."""

from __future__ import annotations

import copy
import doctest
import warnings

import pytest
import torch
from torch import nn

from fxnumeric import storage
from fxnumeric.storage import tensor_storage_bits, weight_storage_bits


def test_plain_tensors_and_modules():
    assert weight_storage_bits(torch.zeros(3, 5)) == (3 * 5 * 32, 15)
    assert weight_storage_bits(torch.zeros(3, 5, dtype=torch.bfloat16)) == (3 * 5 * 16, 15)
    model = nn.Sequential(nn.Linear(8, 4), nn.LayerNorm(4), nn.Embedding(10, 4))
    assert weight_storage_bits(model) == ((32 + 4 + 40) * 32, 76)  # biases do not count


def test_a_shared_weight_counts_once():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert weight_storage_bits(nn.ModuleList([emb, head])) == (40 * 32, 40)


def test_torch_quantized_tensors():
    w = torch.randn(6, 16)
    per_tensor = torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)
    assert tensor_storage_bits(per_tensor) == 96 * 8 + 128
    per_channel = torch.quantize_per_channel(w, torch.rand(6) + 0.1, torch.zeros(6, dtype=torch.long),
                                             0, torch.qint8)
    assert tensor_storage_bits(per_channel) == 96 * 8 + 6 * 64 + 6 * 64  # double scales, int64 zps


def test_nominal_torch_quantized_tensors_count_zero_points_only_when_one_is_not_zero():
    # the nominal rule torchao tensors follow: per-channel FX weights read 2 bits a weight
    # dearer (12.0 instead of 10.0 for 32 inputs) for int64 zero points that are all 0
    w = torch.randn(6, 16)
    scales = torch.rand(6, dtype=torch.double) + 0.1
    symmetric = torch.quantize_per_channel(w, scales, torch.zeros(6, dtype=torch.long), 0,
                                           torch.qint8)
    assert symmetric.q_per_channel_zero_points().dtype == torch.int64  # what torch stores
    assert tensor_storage_bits(symmetric, nominal=True) == 96 * 8 + 6 * 64
    affine = torch.quantize_per_channel(w, scales, torch.tensor([0, 0, 3, 0, 0, 0]), 0,
                                        torch.quint8)
    assert tensor_storage_bits(affine, nominal=True) == 96 * 8 + 6 * 64 + 6 * 64
    assert tensor_storage_bits(torch.quantize_per_tensor(w, 0.1, 0, torch.qint8),
                               nominal=True) == 96 * 8 + 64
    assert tensor_storage_bits(torch.quantize_per_tensor(w, 0.1, 5, torch.quint8),
                               nominal=True) == 96 * 8 + 128


def test_fx_per_channel_weights_cost_nominally_what_their_scales_add():
    from torch.ao.quantization import QConfigMapping, default_qconfig, get_default_qconfig
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    example = torch.randn(4, 32)
    for qconfig, scale_bits in ((get_default_qconfig("x86"), lambda out: 64 * out),
                                (default_qconfig, lambda out: 64)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(copy.deepcopy(model), QConfigMapping().set_global(qconfig),
                                  (example,))
            prepared(example)
            quantized = convert_fx(prepared)
        for name, (out, inp) in (("0", (64, 32)), ("2", (10, 64))):
            weight = quantized.get_submodule(name).weight()
            by_hand = out * inp * 8 + scale_bits(out)  # symmetric qint8: every zero point 0
            assert weight_storage_bits(weight, nominal=True) == (by_hand, out * inp)
            assert weight_storage_bits(weight)[0] == by_hand + scale_bits(out)  # + int64 zps


def test_quantize_dynamic_modules_are_read_through_weight_method():
    model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                           dtype=torch.qint8)
    bits, numel = weight_storage_bits(quantized)
    assert numel == 96 + 18
    assert bits == (96 + 18) * 8 + 2 * 128  # per-tensor: one scale and zero point per layer


_RECURRENT = {"lstm": (nn.LSTM(8, 8), 32), "gru": (nn.GRU(8, 8), 24),  # (layer, gate rows)
              "lcell": (nn.LSTMCell(8, 8), 32), "gcell": (nn.GRUCell(8, 8), 24),
              "rcell": (nn.RNNCell(8, 8), 8)}


@pytest.mark.parametrize("qconfig", ["float", "default", "per_channel", "float16"])
@pytest.mark.parametrize("kind", list(_RECURRENT))
def test_recurrent_layers_count_both_gate_matrices(kind, qconfig):
    # they have no `weight`: float or dynamic quantized, an LSTM or cell counted 0 bits, so
    # mixed-precision advice saw keeping one float as free
    layer, rows = _RECURRENT[kind]
    if qconfig != "float":
        qc = getattr(torch.ao.quantization, f"{qconfig}_dynamic_qconfig")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(copy.deepcopy(layer)), {"0": qc})[0]
    numel = 2 * rows * 8  # weight_ih (rows, 8) and weight_hh (rows, 8); biases do not count
    per_weight = {"float": numel * 32, "float16": numel * 16,
                  "default": numel * 8 + 2 * (64 + 64),  # a double scale, an int64 zero point
                  "per_channel": numel * 8 + 2 * rows * (64 + 64)}  # one per gate row
    assert weight_storage_bits(layer) == (per_weight[qconfig], numel)


@pytest.fixture(scope="module")
def ao():
    return pytest.importorskip("torchao.quantization")


def _quantized_linear(ao, config, in_features=128, out_features=64, dtype=torch.float32):
    linear = nn.Linear(in_features, out_features, bias=False).to(dtype)
    ao.quantize_(linear, config)
    return linear


def test_torchao_int8_is_eight_bits_plus_a_row_scale_and_zero_point(ao):
    for config in (ao.Int8WeightOnlyConfig(), ao.Int8DynamicActivationInt8WeightConfig()):
        weight = _quantized_linear(ao, config).weight
        assert type(weight).__name__ == "Int8Tensor"
        bits, numel = weight_storage_bits(weight)
        assert numel == 64 * 128
        assert bits == 64 * 128 * 8 + 64 * (32 + 8)  # qdata, fp32 scale and int8 zero per row
        # symmetric: every zero point is 0, which a packed format does not store
        assert weight_storage_bits(weight, nominal=True) == (bits - 64 * 8, numel)


def test_torchao_int4_groups_are_stored_in_int8(ao):
    config = ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(32))
    weight = _quantized_linear(ao, config).weight
    assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
    groups = 64 * 128 // 32
    bits, numel = weight_storage_bits(weight)
    assert bits / numel == 9.25  # int8 qdata + (32-bit scale + 8-bit zero point) / 32
    assert bits == numel * 8 + groups * (32 + 8)
    nominal, _ = weight_storage_bits(weight, nominal=True)
    assert nominal / numel == 5.0  # what a packed symmetric int4 layout stores: 4 + 32 / 32
    bf16 = _quantized_linear(ao, config, dtype=torch.bfloat16).weight
    assert weight_storage_bits(bf16, nominal=True)[0] / numel == 4.5  # bf16 scales


def test_a_model_mixes_float_and_quantized_layers(ao):
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 32, bias=False))
    ao.quantize_(model, ao.FqnToConfig({"1": ao.Int8WeightOnlyConfig()}), filter_fn=None)
    bits, numel = weight_storage_bits(model)
    assert numel == 64 * 64 + 64 * 32
    assert bits == 64 * 64 * 32 + (64 * 32 * 8 + 32 * 40)


def test_module_doctests():
    result = doctest.testmod(storage, extraglobs={"torch": torch, "nn": nn})
    assert result.failed == 0 and result.attempted > 0
