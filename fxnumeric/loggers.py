"""Logger modules, compatible with ``torch.ao.ns._numeric_suite``'s.

A logger is an ``nn.Module`` with a ``stats`` dict. fxnumeric calls it as a side branch of the
graph: its return value is never used, so what a custom logger returns cannot change the
model's outputs. It is handed the tensor itself, as in torch: one that writes into it in place
changes what the model computes after it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._tensors import dequantize_all, detach, first_output

__all__ = ["Logger", "OutputLogger", "ShadowLogger", "Shadow"]


class Logger(nn.Module):
    """Base class for stats logging: subclass it and record into ``self.stats``.

    Example:
        >>> class MaxLogger(Logger):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.stats["max"] = []
        ...     def forward(self, x):
        ...         self.stats["max"].append(float(x.max()))
        ...         return x
        >>> MaxLogger()(torch.tensor([1.0, 3.0]))
        tensor([1., 3.])
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, Any] = {}
        # Kept for compatibility with torch's Logger, which FX mode reads as an observer dtype.
        self.dtype = torch.quint8

    def forward(self, x: Any) -> Any:  # noqa: D102 - a no-op logger records nothing
        return x


class OutputLogger(Logger):
    """Record every value it is called with in ``stats["tensor_val"]``.

    Unlike torch's OutputLogger, tensors are stored detached, so keeping them does not keep
    the autograd graph of the forward pass alive.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats["tensor_val"] = []

    def forward(self, x: Any) -> Any:
        self.stats["tensor_val"].append(detach(x))
        return x


class ShadowLogger(Logger):
    """Record the quantized output and its float shadow's output.

    ``forward(x, y)`` takes the quantized output ``x`` and the float output ``y``. For
    tuple outputs (an LSTM's ``(output, (h, c))``) element 0 is kept. Unlike torch's
    ShadowLogger, a batched tensor is kept whole: torch's ``if len(x) > 1: x = x[0]`` keeps
    only the first sample of a batch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stats["float"] = []
        self.stats["quantized"] = []

    def forward(self, x: Any, y: Any) -> None:  # type: ignore[override]
        self.stats["quantized"].append(detach(first_output(x)))
        self.stats["float"].append(detach(first_output(y)))


class Shadow(nn.Module):
    """Run a float module as the shadow of its quantized counterpart on the same input.

    Same contract as ``torch.ao.ns._numeric_suite.Shadow``: the quantized module's output is
    returned unchanged; the float module gets the dequantized inputs; the logger receives
    ``(quantized_output, float_output)``.

    Args:
        q_module: the quantized module.
        float_module: the float module it was quantized from.
        logger_cls: logger class, called as ``logger(quantized_output, float_output)``.
    """

    def __init__(self, q_module: nn.Module, float_module: nn.Module, logger_cls: type) -> None:
        super().__init__()
        self.orig_module = q_module
        self.shadow_module = float_module
        self.logger = logger_cls()

    def forward(self, *x: Any) -> Any:
        output = self.orig_module(*x)
        self.logger(output, self.shadow_module(*dequantize_all(x)))
        return output

    def _binary(self, op: str, x: Any, y: Any) -> Any:
        output = getattr(self.orig_module, op)(x, y)
        self.logger(output, getattr(self.shadow_module, op)(*dequantize_all((x, y))))
        return output

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._binary("add", x, y)

    def add_scalar(self, x: torch.Tensor, y: float) -> torch.Tensor:
        return self._binary("add_scalar", x, y)

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._binary("mul", x, y)

    def mul_scalar(self, x: torch.Tensor, y: float) -> torch.Tensor:
        return self._binary("mul_scalar", x, y)

    def add_relu(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._binary("add_relu", x, y)

    def cat(self, x: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
        output = self.orig_module.cat(x, dim)
        self.logger(output, self.shadow_module.cat(dequantize_all(list(x)), dim))
        return output
