"""Hold a bounded amount of float values while the quantized model catches up.

:func:`fxnumeric.compare` compares each quantized layer's output with its float twin's. Run
one after the other, the float model's forward ends before the quantized one starts, so every
float value of the batch is held until the quantized model reaches it: one whole forward of
activations (on a 512-token SmolLM2 sequence about 370 MiB in float32; on a CNN batch of 64
images, gigabytes).

:class:`Lockstep` keeps that order while the float values held stay under a budget: the float
model runs in the caller's thread, and the quantized model runs after it
(:meth:`Lockstep.finish`). Once the values held reach the budget
(:meth:`Lockstep.produced`), the quantized model starts in a helper thread and the two take
turns: the quantized model runs until a comparator needs a float value not produced yet
(:meth:`Lockstep.need`), then the float model runs until that value is there and the budget
is reached again, and so on. Exactly one of the two threads runs at any time, so nothing is
computed concurrently and every value is the one a sequential run gives.

Why only past the budget: torch's OpenMP workers of one thread spin for a while after its last
op, against the other thread's work, and a model forward in a second thread ran 10-50% slower
on two cores (SmolLM2, bfloat16). A batch whose float values fit in the budget runs as before,
in one thread.

Memory. Each thread allocates from a glibc heap of its own, and glibc keeps what a thread frees
for that thread's later allocations: in turns, the process would hold the free pages of two
heaps beside the values alive. Every time the turn passes (and when turns start and end), the
free pages of every heap go back to the system (``malloc_trim(0)``, where the C library has it;
values alive are untouched). A turn of the quantized side may be long (a 512-token SmolLM2
sequence passes the turn 8 times), and once the float forward has ended the quantized one runs
to its end without the turn passing: the pages also go back each time :data:`READ_PER_TRIM` of
the budget was read (:meth:`Lockstep.consumed`), and before a value of a quarter of the budget
or more is read (:meth:`Lockstep.reading`). Measured as the peak RSS above the live memory
before the call (``benchmarks/README.md``): a 512-token SmolLM2 sequence, float32 under int8
weight-only, went from 470-478 MiB to 317-318 MiB in the same time once the pages went back at
every turn and after the float forward's end; a torchvision resnet18 batch of 16 images, which
takes turns too, peaks 100-180 MiB lower for 5-9% more CPU time (pages faulted in again). In
bfloat16 the same sequence read 209-212 MiB until the pages also went back within turns and
before each block of rows of the logits (:meth:`fxnumeric.rows.LinearRows.rows`), 156-160 MiB
after, 142-147 MiB once they went back every sixteenth of the budget read, not every quarter,
and a bfloat16 block of rows was summed by chunks (:mod:`fxnumeric.metrics`).

Errors keep the order of a sequential run: the float model's error wins (it runs first); the
quantized model's error is raised once the float forward has ended.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch

from ._heap import return_free_pages
from .rows import LinearRows

__all__ = ["Lockstep", "return_free_pages"]

_FLOAT, _QUANT = "float", "quantized"

READ_PER_TRIM = 1 / 16
"""Share of the budget read (and dropped) in turns between two returns of the free pages
(:meth:`Lockstep.consumed`). The quantized side's own passing values pile up in its heap
between them too: on a 512-token SmolLM2 sequence in bfloat16 (a 64 MiB budget), a quarter
read 154-159 MiB of peak RSS added, a sixteenth 139-142 MiB, in the same time (a resnet18 batch
of 16 images, which takes turns too, read the same CPU time; a malloc_trim with nothing to
give back costs 0.3-0.7 ms)."""


class _Stopped(BaseException):
    """Unwinds the quantized forward when the float one failed."""


class Lockstep:
    """The quantized forward (``run_quant()``) run after, or in turns with, the float forward
    the caller runs; at most about ``budget`` bytes of float values are held ahead of it.

    Float observers call :meth:`produced` after keeping a value, comparators :meth:`need` when
    their twin holds no value yet and :meth:`consumed` after reading one. After the float
    forward the caller calls :meth:`finish` (the quantized output), or :meth:`close` if the
    float forward failed.
    """

    def __init__(self, run_quant: Callable[[], Any], budget: int) -> None:
        self._run_quant = run_quant
        self.budget = budget
        self.held = 0
        """Bytes of float values produced and not read yet."""
        self._freed = 0  # bytes read since the heaps' free pages last went back
        self._turn = threading.Condition()
        self._holder = _FLOAT
        self._waiting: Any = None  # the twin the quantized side waits for
        self._helper: threading.Thread | None = None
        self._stopping = False
        self.float_done = False
        self.quant_done = False
        self._result: Any = None
        self._error: BaseException | None = None
        # autocast is thread-local: the helper runs the quantized model under the caller's
        self._autocast = [(device, torch.get_autocast_dtype(device))
                          for device in ("cpu", "cuda") if torch.is_autocast_enabled(device)]

    def _quant_side(self) -> None:
        try:
            with contextlib.ExitStack() as stack:
                for device, dtype in self._autocast:
                    stack.enter_context(torch.autocast(device, dtype=dtype))
                self._result = self._run_quant()
        except _Stopped:
            pass
        except BaseException as exc:  # raised in the caller's thread by finish()
            self._error = exc
        finally:
            with self._turn:
                self.quant_done = True
                self._holder = _FLOAT
                self._turn.notify_all()

    def _give_back(self) -> None:
        """The free pages of every heap go back; the reads since are counted from here."""
        return_free_pages()
        self._freed = 0

    def _hand_over(self, to: str, me: str) -> None:
        self._give_back()  # what ``me`` freed since it last held the turn goes back
        with self._turn:
            self._holder = to
            self._turn.notify_all()
            self._turn.wait_for(lambda: self._holder == me)

    def _resume_quant(self) -> None:
        """Caller's thread: the quantized side runs until it waits or ends."""
        if self._helper is None:
            self._give_back()  # turns start: what the caller's heap keeps free goes back
            self._helper = threading.Thread(target=self._quant_side, name="fxnumeric-quant",
                                            daemon=True)
            with self._turn:
                self._holder = _QUANT
            self._helper.start()
            with self._turn:
                self._turn.wait_for(lambda: self._holder == _FLOAT)
        else:
            self._hand_over(_QUANT, _FLOAT)

    def produced(self, value: Any) -> None:
        """Float side: a twin now holds ``value``. Past the budget the quantized side runs
        (starting it the first time), once the value it waits for is there."""
        self.held += _nbytes(value)
        if self.held < self.budget or self.quant_done:
            return
        waiting = self._waiting
        if self._helper is None or (waiting is not None and waiting.pending):
            self._resume_quant()

    def need(self, twin: Any) -> None:
        """Quantized side: let the float model run until ``twin.pending`` (anything with a
        ``pending`` list) holds a value, or its forward has ended."""
        while not twin.pending and not self.float_done:
            self._waiting = twin
            self._hand_over(_FLOAT, _QUANT)
            if self._stopping:
                raise _Stopped
        self._waiting = None

    def reading(self, value: Any) -> None:
        """Quantized side: a comparator is about to read ``value``. Before a large one (a
        quarter of the budget or more) the free pages of every heap go back: the read's
        float copies of several MiB do not fit in the smaller pieces the layers before it left
        free, so they would be touched on top of them. A Linear's output held as rows counts
        as what it holds: its blocks give the pages back as they are computed
        (:meth:`fxnumeric.rows.LinearRows.rows`)."""
        if self._helper is not None and _nbytes(value) >= self.budget // 4:
            self._give_back()

    def consumed(self, value: Any) -> None:
        """Quantized side: a comparator has read ``value`` (and drops it).

        With turns, each time :data:`READ_PER_TRIM` of the budget was read (and dropped) since
        the free pages last went back, they go back: a turn of the quantized side reads up to a
        budget of float values made in the caller's heap while its own layers' passing values
        pile up in its heap, and once the float forward has ended it runs to its end without
        the turn passing."""
        nbytes = _nbytes(value)
        self.held -= nbytes
        if self._helper is None:
            return  # one thread: the batch fits in the budget
        if self._freed >= self.budget * READ_PER_TRIM:  # those read before this one are gone
            self._give_back()
        self._freed += nbytes

    def finish(self) -> Any:
        """After the float forward: the quantized forward run to its end; its output (or its
        error)."""
        self.float_done = True
        if self._helper is None:
            return self._run_quant()
        while not self.quant_done:
            self._hand_over(_QUANT, _FLOAT)
        self._helper.join()
        self._give_back()  # what the helper's heap keeps free is not the next batch's
        if self._error is not None:
            raise self._error
        return self._result

    def close(self) -> None:
        """The float forward failed: the quantized forward, if it runs in turns, is stopped."""
        self.float_done = True
        if self._helper is None:
            return
        self._stopping = True
        while not self.quant_done:
            self._hand_over(_QUANT, _FLOAT)
        self._helper.join()


def _nbytes(value: Any) -> int:
    """The bytes a float value held takes (a Linear's output held as rows: its input's)."""
    return value.nbytes if isinstance(value, (torch.Tensor, LinearRows)) else 0
