"""The torchao ``quantize_`` flow: modules keep their class, their weight becomes a tensor subclass.

``quantize_(model, Int8WeightOnlyConfig())`` leaves ``model.fc`` an ``nn.Linear`` whose
``.weight`` is a torchao ``Int8Tensor`` (a ``TorchAOBaseTensor``). The graph is the float
graph, op for op; what differs is the weight, so this flow

* counts a module whose weight is a torchao tensor as quantized (coverage), and
* hands the weight comparison its dequantized form: ``float_w - q_w`` on an ``Int8Tensor``
  raises ``NotImplementedError`` (no ``aten.sub`` for it), ``q_w.dequantize()`` does not.

torchao is never imported here: a torchao tensor can only exist if the user imported torchao,
so the check looks the base class up in ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from . import Flow

__all__ = ["TorchaoFlow", "is_torchao_tensor"]


def is_torchao_tensor(value: Any) -> bool:
    """Whether ``value`` is a torchao tensor subclass (``Int8Tensor``, ``Int4Tensor`` ...)."""
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None) if utils is not None else None
    return base is not None and isinstance(value, base)


class TorchaoFlow(Flow):
    """Models quantized in place by ``torchao.quantization.quantize_``."""

    name = "torchao"

    def is_quantized_module(self, module: nn.Module) -> bool:
        if "torchao.utils" not in sys.modules:
            return False  # no torchao tensor can exist before torchao is imported
        return any(is_torchao_tensor(p) for p in module.parameters(recurse=False))

    def dynamic_input(self, module: nn.Module) -> tuple[str, float] | None:
        """``Int8DynamicActivationInt8WeightConfig``: each token (row) of the input quantized
        symmetric int8 (255 steps over ``±max|x|``), or the whole tensor per call."""
        weight = getattr(module, "weight", None)
        kwargs = getattr(weight, "act_quant_kwargs", None) if is_torchao_tensor(weight) else None
        if kwargs is None:
            return None
        granularity = type(getattr(kwargs, "granularity", None)).__name__
        return ("token" if granularity == "PerRow" else "tensor", 255.0)

    def comparable_weight(self, weight: Any) -> torch.Tensor | None:
        if not is_torchao_tensor(weight):
            return None
        return weight.dequantize().detach().float()
