"""How many bits a model's weights really take, quantized or not.

Mixed-precision advice minimises the bytes of weights, so it needs each layer's weight as
stored, scales and zero points included, read from the tensors rather than from a config's
name. What the flows store (torch 2.14, torchao 0.18)::

    flow / config                              tensor                    stored per weight
    float                                      torch.Tensor              element size (32, 16)
    torchao Int8WeightOnlyConfig() and         Int8Tensor: qdata int8,   8 + (32 + 8) / in_features
      Int8DynamicActivationInt8WeightConfig()   scale (out, 1) float32    (8.07 for 576 inputs,
                                                (bf16 models too),        fp32 or bf16 model)
                                                zero_point (out, 1) int8
    torchao IntxWeightOnlyConfig(int4,         IntxUnpackedToInt8Tensor: 8 + (32 + 8) / 32 = 9.25
      PerGroup(32))                             qdata *int8* (int4 values (fp32 model; 8.75 bf16);
                                                unpacked), scale (model   nominal (symmetric, no
                                                dtype) and int8           zero points) 4 + 1 = 5.0
                                                zero_point per group      (4.5 bf16)
    torch quantize_dynamic, eager static,      quantized tensor (qint8)  8, plus a float64 scale
      FX convert_fx (per tensor or per                                    and an int64 zero point
      channel)                                                            per channel (one each per
                                                                          tensor); nominal, zero
                                                                          points only if not all 0:
                                                                          8 + 64 / in_features per
                                                                          channel

The nominal count (``nominal=True``) is one rule for every flow: values at their quantization
width, scales as stored, zero points only where one is not 0 (a symmetric format stores none;
torchao and torch keep zeros anyway, which the stored count includes).

A recurrent layer (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells) has no ``weight``:
its gate matrices (``weight_ih_l0``, ``weight_hh``...) count, float or dynamic quantized
(``get_weight()``; a float16 one unpacks to float32 and counts 16 bits a weight, as a float16
``Linear``); biases do not.

torchao's default int4 layout (``IntxPackingFormat.UNPACKED_TO_INT8``, meant for
``torch.export``) keeps each int4 value in a byte, so an "int4" model stores *more* than an
int8 one. :func:`weight_storage_bits` reports what is stored; ``nominal=True`` counts such
values at their target width (``target_dtype``), what a packed layout would store.

torchao tensors are read through the protocol every traceable tensor subclass implements,
``__tensor_flatten__() -> (inner tensor attribute names, metadata)``, so torchao is never
imported here and new subclasses are counted without a table.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["weight_storage_bits", "tensor_storage_bits", "module_weights",
           "named_module_weights", "dynamic_weight_dtype",
           "is_dynamic_module"]

_INT_BITS = {getattr(torch, f"int{b}"): b for b in range(1, 9) if hasattr(torch, f"int{b}")}
_QUANTIZED_BITS = {torch.qint8: 8, torch.quint8: 8, torch.qint32: 32, torch.quint4x2: 4,
                   torch.quint2x4: 2}


def tensor_storage_bits(tensor: torch.Tensor, nominal: bool = False) -> int:
    """Bits ``tensor`` stores: its data plus, for a quantized tensor, its scales and zero points.

    Args:
        tensor: a plain tensor, a torch quantized tensor, or a tensor subclass implementing
            ``__tensor_flatten__`` (torchao's ``Int8Tensor``, ``IntxUnpackedToInt8Tensor`` ...),
            whose inner tensors are counted recursively.
        nominal: count what a packed format needs: a subclass's ``qdata`` at the width of
            its ``target_dtype`` (``torch.int4``: 4 bits) instead of the int8 it is stored
            in, and zero points only where one is not zero (a symmetric format stores none;
            torchao keeps a tensor of zeros anyway, torch an int64 zero point per channel or
            per tensor).

    >>> tensor_storage_bits(torch.zeros(10, 4))
    1280
    """
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, meta = tensor.__tensor_flatten__()
        target_bits = _INT_BITS.get(getattr(tensor, "target_dtype", None)) if nominal else None
        total = 0
        for name in names:
            inner = getattr(tensor, name)
            if not isinstance(inner, torch.Tensor):
                continue  # an optional inner tensor left None
            if name == "qdata" and target_bits is not None:
                total += inner.numel() * target_bits
            elif nominal and "zero_point" in name and not bool(inner.any()):
                continue  # symmetric: all zero points are 0, a packed format keeps none
            else:
                total += tensor_storage_bits(inner, nominal)
        return total
    if tensor.is_quantized:
        bits = tensor.numel() * _QUANTIZED_BITS[tensor.dtype]
        if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                                torch.per_channel_affine_float_qparams):
            bits += _plain_bits(tensor.q_per_channel_scales())
            zero_points = tensor.q_per_channel_zero_points()
            if not nominal or bool(zero_points.any()):
                bits += _plain_bits(zero_points)
        else:
            bits += 64  # one double scale
            if not nominal or tensor.q_zero_point() != 0:
                bits += 64  # one int64 zero point
        return bits
    return _plain_bits(tensor)


def _plain_bits(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8


def module_weights(module: nn.Module) -> list[torch.Tensor]:
    """The weights ``module`` itself holds (not its submodules'), as its forward reads them
    (:func:`named_module_weights`)."""
    return list(named_module_weights(module).values())


def named_module_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights ``module`` itself holds (not its submodules'), as its forward reads them,
    by name.

    ``module.weight`` (``"weight"``), called if it is a method (torch's quantized modules
    unpack it); a recurrent layer has no ``weight`` but one per gate matrix: a float
    ``nn.LSTM``/``GRU``/``RNN`` or cell holds them as ``weight_ih_l0``, ``weight_hh``...
    parameters, and torch's dynamic quantized ones pack them, unpacked by ``get_weight()`` (a
    dict of them: ``weight_ih``, ``weight_hh``).
    """
    weight = getattr(module, "weight", None)
    if callable(weight) and not isinstance(weight, torch.Tensor):
        weight = weight()
    if isinstance(weight, torch.Tensor):
        return {"weight": weight}
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return {name: p for name, p in module.named_parameters(recurse=False)
                if name.startswith("weight")}
    if is_dynamic_module(module) and callable(getattr(module, "get_weight", None)):
        found = module.get_weight()
        if isinstance(found, dict):
            return {k: w for k, w in found.items() if isinstance(w, torch.Tensor)}
    return {}


def is_dynamic_module(module: nn.Module) -> bool:
    """One of torch's dynamic quantized modules (``quantize_dynamic``'s Linear, LSTM, GRU,
    LSTMCell, GRUCell, RNNCell), or one built on them: the fused ``LinearReLU`` of
    ``torch.ao.nn.intrinsic.quantized.dynamic`` (FX dynamic quantization fuses linear-relu)
    is a dynamic Linear that applies ReLU after it."""
    return any(cls.__module__.startswith("torch.ao.nn.quantized.dynamic")
               for cls in type(module).__mro__)


def dynamic_weight_dtype(module: nn.Module) -> torch.dtype | None:
    """The weight dtype a dynamic quantized module of torch's was built with (``torch.qint8``
    or ``torch.float16``); ``None`` for any other module.

    Each kind keeps it elsewhere: a Linear in ``_packed_params.dtype``, an LSTM or GRU in
    ``dtype``, a cell in ``weight_dtype``. The float16 ones unpack their weights to float32,
    so the dtype cannot be read from the weights.
    """
    if not is_dynamic_module(module):
        return None
    for owner, name in ((getattr(module, "_packed_params", None), "dtype"),
                        (module, "weight_dtype"), (module, "dtype")):
        dtype = getattr(owner, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return None


def weight_storage_bits(module_or_tensor: nn.Module | torch.Tensor,
                        nominal: bool = False) -> tuple[int, int]:
    """``(bits, numel)``: the storage of the weights in a module tree, or of one tensor.

    For a module, every submodule's weights count (:func:`module_weights`: ``nn.Linear``,
    ``nn.Embedding``, norms, torchao-quantized modules, torch's quantized modules whose
    ``weight()`` is a method, and the gate matrices of recurrent layers, float or dynamic
    quantized), each shared tensor once (a tied ``lm_head`` and embedding are one weight;
    ``quantize_`` unties them, and then both count). Biases do not count. ``bits / numel`` is
    the average bits per weight.

    Args:
        module_or_tensor: a model, a layer, or a weight tensor.
        nominal: see :func:`tensor_storage_bits`.

    >>> weight_storage_bits(nn.Linear(4, 2))
    (256, 8)
    """
    if isinstance(module_or_tensor, torch.Tensor):
        return tensor_storage_bits(module_or_tensor, nominal), module_or_tensor.numel()
    bits = numel = 0
    seen: dict[int, torch.Tensor] = {}  # holding each tensor keeps its id from being reused
    for module in module_or_tensor.modules():
        # a float16 dynamic module unpacks its weights to float32; it packs float16
        packs_float16 = dynamic_weight_dtype(module) == torch.float16
        for weight in module_weights(module):
            if id(weight) in seen:
                continue
            seen[id(weight)] = weight
            bits += (16 * weight.numel() if packs_float16
                     else tensor_storage_bits(weight, nominal))
            numel += weight.numel()
    return bits, numel

