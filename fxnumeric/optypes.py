"""Op types: the vocabulary every op table speaks, in a module that imports nothing of fxnumeric.

:mod:`fxnumeric.ops` (torch's own modules and functions) and each quantization flow in
:mod:`fxnumeric.flows` (pt2e's ATen and q/dq ops) answer the same question, "what does this
node compute?", with an :class:`OpClass`. Both import the type from here, and :mod:`fxnumeric.ops`
consults the flows, so the dependency runs one way only::

    optypes  <-  flows  <-  ops  <-  view  <-  match ...

The roles:

* ``"op"``: a computation the matcher pairs (``conv2d``, ``linear``, ``add`` ...);
* ``"plumbing"``: passes its input through (Identity, eval-mode dropout, observers, loggers);
  :data:`DEQUANTIZE` is plumbing too, with a signature of its own, so that the stages that
  must know where a quantized value becomes float (hybrid models) ask the class, not a name;
* ``"optional"``: a quantize (:data:`QUANTIZE`), paired when both sides have one, otherwise
  transparent.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OpClass", "PLUMBING", "QUANTIZE", "DEQUANTIZE", "ROLES"]

ROLES = ("op", "plumbing", "optional")


@dataclass(frozen=True)
class OpClass:
    """What a node computes, as the matcher sees it.

    Attributes:
        signature: the base op kinds it computes, in order: ``("conv2d", "relu")`` for a
            fused ConvReLU2d.
        role: ``"op"``, ``"plumbing"`` or ``"optional"`` (see the module docstring).
        quantized: a quantized compute op (it must be paired for full coverage).

    Example:
        >>> OpClass(("conv2d", "relu")).kind
        'conv2d-relu'
        >>> DEQUANTIZE.is_dequantize, PLUMBING.is_dequantize
        (True, False)
    """

    signature: tuple[str, ...]
    role: str = "op"
    quantized: bool = False

    @property
    def kind(self) -> str:
        """The signature joined with ``-``, e.g. ``conv2d-relu``."""
        return "-".join(self.signature)

    @property
    def is_dequantize(self) -> bool:
        """Whether the node turns a quantized value into a float one."""
        return self.role == "plumbing" and self.signature == ("dequantize",)

    @property
    def is_quantize(self) -> bool:
        """Whether the node is a quantize step of the dataflow (a quantize role)."""
        return self.role == "optional" and self.signature == ("quantize",)


PLUMBING = OpClass(("plumbing",), "plumbing")
QUANTIZE = OpClass(("quantize",), "optional")
DEQUANTIZE = OpClass(("dequantize",), "plumbing")
