"""A large Linear's output, read a block of rows at a time: computed from the Linear and its
input when read, never made whole.

A language model's logits are one Linear's output many times the size of its input: a
512-token SmolLM2 sequence's are 96 MiB in float32 (1 GiB for Llama-3's 128256 words x 2048
tokens), made from 1.1 MiB of hidden states. :func:`fxnumeric.compare` compares them with the
quantized model's, as a layer's output and as the model's output (KL, top-1 agreement), a
block of rows at a time; held whole, the float logits stayed alive through the whole
quantized forward, beside the quantized logits it makes. A :class:`LinearRows` holds the
Linear's weight and a copy of its input instead, and computes the rows asked for: three more
passes of the Linear (the layer's row, the model output's sums, its KL), which is why only an
output past :data:`HELD_PAST` bytes is held so.

Each row of a Linear's output reads the same row of its input alone, so a block of rows
computed alone holds the values of those rows of the whole, up to the rounding of the matrix
product: BLAS kernels add a dot product's terms in an order that may depend on the number of
rows (a few float32 ulps apart, 5e-5 on logits of scale 20: far below any quantization error).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._heap import return_free_pages
from ._tensors import version

__all__ = ["LinearRows", "ROW_BLOCK", "HELD_PAST", "LINEAR_FUNCTIONS", "linear_operands",
           "row_pick", "rows_per_block"]

ROW_BLOCK = 1 << 22
"""Values of a Linear's output past which it is read a block of rows at a time (as many
values per block at most, one row at least): 16 MiB in float32, as :mod:`fxnumeric.metrics`
sums a large tensor a chunk at a time. Read by :class:`LinearRows` and by a one-Linear shadow
(:class:`fxnumeric.instrument.graph.RowShadow`)."""

HELD_PAST = 32 << 20
"""Bytes of a Linear's output past which :meth:`LinearRows.of` holds it as rows: below, the
output costs little memory, and computing its rows again costs time (three more passes of the
Linear: SmolLM2's logits of four 22-token sentences, 16 MiB, stay whole; of one 512-token
sequence, 96 MiB, are held as rows)."""

LINEAR_FUNCTIONS = (F.linear, torch.ops.aten.linear.default)
"""The functions that are a Linear: ``F.linear`` and ATen's ``linear``."""


def linear_operands(linear: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[Any, Any, Any] | None:
    """``(input, weight, bias)`` of a Linear called as ``linear(*args, **kwargs)``: an
    ``nn.Linear`` whose forward is torch's own (no hook, no forward of its own), or
    ``F.linear`` / ATen's ``linear``; ``None`` for any other call.

    >>> fc = nn.Linear(3, 2)
    >>> x, w, b = linear_operands(fc, (torch.ones(3),), {})
    >>> w is fc.weight, b is fc.bias
    (True, True)
    """
    if isinstance(linear, nn.Module):
        plain = (isinstance(linear, nn.Linear) and type(linear).forward is nn.Linear.forward
                 and "forward" not in vars(linear) and not linear._forward_hooks
                 and not linear._forward_pre_hooks)
        if not plain or len(args) != 1 or kwargs:
            return None
        return args[0], linear.weight, linear.bias
    if linear not in LINEAR_FUNCTIONS:
        return None
    names = ("input", "weight", "bias")
    if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
        return None
    given = dict(zip(names, args, strict=False)) | kwargs
    if "input" not in given or "weight" not in given:
        return None
    return given["input"], given["weight"], given.get("bias")


class LinearRows:
    """The output of ``F.linear(x, weight, bias)``, its rows computed when read.

    Holds ``x`` (read as rows: its leading dims flattened) and the weight, and computes
    :meth:`rows` on demand; :attr:`shape`, :attr:`dtype` and :attr:`device` are the whole
    output's. Made by :meth:`of`, for an output worth it.

    Example:
        >>> fc = nn.Linear(4, 6)
        >>> x = torch.randn(2, 3, 4)
        >>> out = fc(x)
        >>> rows = LinearRows(out, x, fc.weight, fc.bias)
        >>> rows.shape, torch.allclose(rows.rows(slice(1, 3)), out.reshape(-1, 6)[1:3])
        (torch.Size([2, 3, 6]), True)
    """

    def __init__(self, output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        # a copy: the model may write into its input after the Linear read it
        self.input = x.detach().reshape(-1, x.shape[-1]).clone()
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.shape, self.dtype, self.device = output.shape, output.dtype, output.device
        self._output = weakref.ref(output)
        self._version = version(output)  # None: an inference tensor keeps none

    @classmethod
    def of(cls, output: Any, linear: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
           ) -> LinearRows | None:
        """``output``, the value of ``linear(*args, **kwargs)``, held as rows when that is
        worth it: a floating output past :data:`HELD_PAST` bytes and :data:`ROW_BLOCK`
        values, each row of which reads the same row of the input, at least 4 times the
        input's size (logits against hidden states), from real (not meta) tensors. ``None``
        otherwise: hold the output itself."""
        # the size first: compare asks this of every float Linear's output, every batch
        if (not isinstance(output, torch.Tensor) or not output.is_floating_point()
                or output.numel() <= ROW_BLOCK or output.nbytes <= HELD_PAST):
            return None
        operands = linear_operands(linear, args, kwargs)
        if operands is None:
            return None
        x, weight, bias = operands
        tensors = (x, weight) if bias is None else (x, weight, bias)
        if (not all(isinstance(t, torch.Tensor) and not t.is_meta for t in tensors)
                or weight.dim() != 2 or x.dim() < 1 or output.shape[:-1] != x.shape[:-1]
                or output.shape[-1] != weight.shape[0] or x.numel() * 4 > output.numel()):
            return None
        return cls(output, x, weight, bias)

    @property
    def nbytes(self) -> int:
        """The bytes held: the input's copy (the weight is the model's own)."""
        return self.input.nbytes

    def dim(self) -> int:
        """The whole output's number of dims, as ``Tensor.dim()``."""
        return len(self.shape)

    def stands_for(self, value: Any) -> bool:
        """Whether ``value`` is the very output these rows are of, as the Linear made it (not
        written into since: a model may scale its logits in place)."""
        return (self._version is not None and self._output() is value
                and version(value) == self._version)

    def rows(self, pick: slice | torch.Tensor) -> torch.Tensor:
        """Rows ``pick`` (a slice, or indices) of the output read as ``(rows, width)``.

        Each call first gives the free pages of glibc's heaps back (:mod:`fxnumeric._heap`):
        a block (:data:`ROW_BLOCK` values, 8-16 MiB) does not fit in the smaller pieces the
        layers before it left free, so it would be touched on top of them. On a 512-token
        SmolLM2 sequence in bfloat16, a trim before its logits were read took one compare's
        peak RSS added from 180 to 155 MiB."""
        return_free_pages()
        with torch.no_grad():
            return F.linear(self.input[pick], self.weight, self.bias)

    @property
    def block_rows(self) -> int:
        """Rows of :data:`ROW_BLOCK` values (:func:`rows_per_block`): what one product
        computes."""
        return rows_per_block(self.shape[-1])

    def chunks(self, index: torch.Tensor, step: int) -> Iterator[torch.Tensor]:
        """Rows ``index`` (ascending), ``step`` of them at a time, each chunk a view of a block
        of about :data:`ROW_BLOCK` values computed at once (a product of a few rows at a time
        runs several times slower per row)."""
        per_block = max(1, self.block_rows // step) * step
        for start in range(0, index.numel(), per_block):
            block = self.rows(row_pick(index[start:start + per_block]))
            for first in range(0, block.shape[0], step):
                yield block[first:first + step]


def rows_per_block(width: int) -> int:
    """Rows of ``width`` values that make :data:`ROW_BLOCK` values, one at least."""
    return max(1, ROW_BLOCK // max(width, 1))


def row_pick(index: torch.Tensor) -> slice | torch.Tensor:
    """Rows ``index`` (ascending) as a slice where they are consecutive, else the indices."""
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == index.numel() else index
