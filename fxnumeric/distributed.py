"""Data-parallel compare: each process of a ``torch.distributed`` group runs a share of the
batches, and the streaming sums of every process are combined.

Launched with ``torchrun --nproc_per_node N`` (any backend; ``gloo`` on CPU), every rank calls
:func:`fxnumeric.compare` with the *same* models and the *same* ``data``. Rank ``r`` of ``N``
runs the batches whose index ``i`` has ``i % N == r`` (it still iterates over the others,
without running a model on them), so the ranks split the model work, not the data loading.
After the last batch every rank gathers every rank's sums (:meth:`Accumulator.state
<fxnumeric.metrics.Accumulator.state>`: a few numbers per layer; for model-output KL, every
token's KL, 4 bytes a token, so that the p99 is exact) and merges them in rank order, so every
rank ends with the same sums and returns the same :class:`~fxnumeric.Report`, equal to a
one-process run over all batches up to the order of float64 additions (relative 1e-16):
batches, skipped batches (by their global index), NaN/Inf origins, spread and custom metrics
included, what one process keeps from its last batch (a shape mismatch, the logits' rows)
from the batch of the highest index, and what it reads on its first (which of the tensors the
model returns is compared) from the lowest. Weights are compared on every rank (they do not depend
on the data; leave ``"weights"`` out of ``comparisons`` on ranks other than 0 to save that
time).

:func:`fxnumeric.compare` goes data-parallel by itself when a process group of two or more
ranks is initialised (``distributed=None``); ``distributed=False`` makes each rank compare all
of its own ``data`` alone. What it refuses, before any batch runs:

* a DataLoader whose sampler is a ``DistributedSampler`` (each rank would see another data
  set, and fxnumeric would split it again);
* ``keep_activations=True`` (raw tensors stay in the process that logged them);
* ranks that captured the models differently: the pairs' names and kinds, both models'
  parameter names and shapes, the accumulators (the error names the first difference);
* ranks whose first batches differ.

Every rank must call :func:`fxnumeric.compare`: one that does not (``if rank == 0:
compare(...)``) leaves the others waiting at the first exchange, which logs a warning after
:data:`WAIT_WARNING` seconds and raises :class:`~fxnumeric.InputError` at the process
group's timeout. Pass ``distributed=False`` to compare on one rank alone.

A rank that fails (an exception in a model) leaves the others waiting for its sums: ``torchrun``
and ``torch.multiprocessing.spawn`` stop the other ranks when one exits with an error.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler

from .errors import InputError
from .run import batch_tensors, stored_tensors

__all__ = ["Ranks", "ONE_PROCESS", "data_parallel", "Mergeable", "torchrun_group", "WAIT_WARNING"]

_log = logging.getLogger(__name__)

WAIT_WARNING = 60.0
"""Seconds a rank waits for the others at the start of a data-parallel compare before it logs
a warning (a rank loading a large model may come later; one that never calls compare leaves
the others waiting until the process group's timeout, then :class:`~fxnumeric.InputError`)."""


class Mergeable(Protocol):
    """What :meth:`Ranks.reduce` combines: :class:`fxnumeric.metrics.Accumulator` and
    :class:`fxnumeric.llm_metrics.LogitsAccumulator` (``state()`` picklable, its
    ``merged(other)``, and ``load(state)``)."""

    def state(self) -> Any: ...

    def load(self, state: Any) -> None: ...


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel compare: ``rank`` of ``size`` processes.

    ``Ranks(0, 1)`` (:data:`ONE_PROCESS`) is an ordinary one-process run: :meth:`share` yields
    every batch and :meth:`reduce` changes nothing.
    """

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        """Whether there is more than one process."""
        return self.size > 1

    def count(self, total: int | None) -> int | None:
        """How many of ``total`` batches (indices ``0..total-1``) this rank runs."""
        if total is None:
            return None
        return max(0, (total - self.rank + self.size - 1) // self.size)

    def share(self, batches: Iterable[tuple[int, Any]], accumulators: Sequence[Mergeable],
              capture: Sequence[str] = ()) -> Iterator[tuple[int, Any]]:
        """The ``(index, batch)`` pairs this rank runs: those with ``index % size == rank``.

        Before the first, the ranks check that they hold the same capture (``capture``: lines
        such as the pairs' names and the parameters' shapes, and the accumulators' kinds) and
        the same first batch, and that none keeps raw tensors; every rank raises the same
        error if not.
        """
        if self.parallel:
            batches = iter(batches)
            first = next(batches, None)
            self._check(accumulators, None if first is None else _fingerprint(first[1]),
                        capture)
            batches = itertools.chain([first] if first is not None else [], batches)
        for index, batch in batches:
            if index % self.size == self.rank:
                yield index, batch

    def reduce(self, accumulators: Sequence[Mergeable], batches: int,
               skipped: Sequence[int]) -> tuple[int, tuple[int, ...]]:
        """Merge every rank's accumulators into each, in rank order; return the total number
        of batches compared and the sorted global indices of those left out (NaN/Inf)."""
        if not self.parallel:
            return batches, tuple(skipped)
        mine = (batches, tuple(skipped), [acc.state() for acc in accumulators])
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, mine)
        for i, acc in enumerate(accumulators):
            acc.load(functools.reduce(lambda a, b: a.merged(b), (r[2][i] for r in every)))
        return sum(r[0] for r in every), tuple(sorted(i for r in every for i in r[1]))

    def _check(self, accumulators: Sequence[Mergeable], first: str | None,
               capture: Sequence[str] = ()) -> None:
        mine = ([*capture, *(f"sums of {type(acc).__name__}" for acc in accumulators)],
                any(getattr(acc, "kept", None) is not None for acc in accumulators), first)
        every = self._gather(mine)
        if any(keep for _, keep, _ in every):
            raise InputError(
                "compare(..., keep_activations=True) under torch.distributed: each rank keeps "
                "the tensors of its own batches only, and raw tensors are not sent between "
                "ranks.\nFix: run one process for raw activations (distributed=False), or "
                "drop keep_activations")
        differ = next(((rank, lines) for rank, (lines, _, _) in enumerate(every)
                       if lines != every[0][0]), None)
        if differ is not None:
            rank, lines = differ
            at, ours, theirs = next(
                (i, a, b) for i, (a, b) in enumerate(itertools.zip_longest(
                    every[0][0], lines, fillvalue="nothing more")) if a != b)
            raise InputError(
                f"the ranks captured the models differently: rank {rank} has {theirs} where "
                f"rank 0 has {ours} (the first difference, line {at + 1} of their captures): "
                "their sums cannot be combined. Every rank must pass the same models and the "
                "same data (its first batch is the capture's example).\n"
                "Fix: build the models and data identically on every rank (same seed, same "
                "checkpoint), or pass each rank the same fxnumeric.match result as matching=")
        differ = [rank for rank, (_, _, seen) in enumerate(every) if seen != every[0][2]]
        if differ:
            raise InputError(
                f"the ranks hold different data: the first batch of rank {differ[0]} is not "
                "rank 0's. compare splits the batches between the ranks itself, so every rank "
                "must pass the same data, all of it (rank r runs batches r, r + size, ...).\n"
                "Fix: build the data identically on every rank (same seed, same files, no "
                "DistributedSampler)")

    def _gather(self, mine: Any) -> list[Any]:
        """Every rank's ``mine``: the first exchange of a compare, where a rank that never
        calls compare (``if rank == 0: compare(...)``) leaves the others waiting until the
        process group's timeout (30 minutes by default)."""
        every: list[Any] = [None] * self.size
        waiting = threading.Timer(WAIT_WARNING, _log.warning, args=(
            "rank %d has waited %d s for the other ranks to start compare: under a process "
            "group every rank must call it (distributed=False compares on one rank alone)",
            self.rank, WAIT_WARNING))
        waiting.daemon = True
        waiting.start()
        try:
            dist.all_gather_object(every, mine)
        except RuntimeError as exc:  # gloo's and NCCL's timeouts, a rank gone
            raise InputError(
                f"rank {self.rank} of {self.size} waited for the other ranks at the start of a "
                f"data-parallel compare, and they did not come ({type(exc).__name__}: "
                f"{str(exc).strip()[:200]}). Under an initialised process group of "
                f"{self.size} ranks, compare is data-parallel: every rank must call it, with "
                "the same models and data.\nFix: call compare on every rank, or pass "
                "distributed=False to compare on this rank alone (if rank == 0: "
                "compare(..., distributed=False))") from exc
        finally:
            waiting.cancel()
        return every


def _fingerprint(batch: Any) -> str:
    """A digest of every tensor in ``batch`` (where it sits, its dtype, layout, shape and
    bytes; a sparse tensor's indices and values): equal on two ranks exactly when they hold
    the same first batch."""
    digest = hashlib.sha256()
    for where, tensor in batch_tensors(batch):
        digest.update(f"{where}{tensor.dtype}{tensor.layout}{tuple(tensor.shape)}".encode())
        for part in stored_tensors(tensor.detach()):
            part = part.cpu().contiguous()
            digest.update(f"{part.dtype}{tuple(part.shape)}".encode())
            digest.update(part.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


ONE_PROCESS = Ranks()
"""An ordinary, one-process compare."""


def data_parallel(distributed: bool | None, data: Any = None) -> Ranks:
    """This process's :class:`Ranks` for ``compare(..., distributed=...)``.

    Args:
        distributed: ``None``: data-parallel when ``torch.distributed`` is initialised with
            two ranks or more; ``True``: data-parallel, the process group must be initialised;
            ``False``: one process, whatever is initialised.
        data: the batches, checked for a ``DistributedSampler``.

    Raises:
        InputError: ``distributed=True`` without an initialised process group, or ``data``
            already split between ranks by a ``DistributedSampler``.
    """
    if distributed is False:
        return ONE_PROCESS
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise InputError(
                "compare(..., distributed=True) needs an initialised torch.distributed process "
                "group, and there is none.\nFix: launch with torchrun --nproc_per_node N and "
                "call torch.distributed.init_process_group('gloo') (or 'nccl') before compare")
        return ONE_PROCESS
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    if ranks.parallel and _distributed_sampler(data):
        raise InputError(
            "data is a DataLoader with a DistributedSampler: each rank already holds a "
            "different part of the data, and a data-parallel compare splits the batches "
            "between ranks itself.\nFix: pass every rank the same DataLoader without the "
            "DistributedSampler, or compare each rank's part alone with distributed=False")
    return ranks


def _distributed_sampler(data: Any) -> bool:
    samplers = (getattr(data, "sampler", None),
                getattr(getattr(data, "batch_sampler", None), "sampler", None))
    return any(isinstance(s, DistributedSampler) for s in samplers)


@contextlib.contextmanager
def torchrun_group(backend: str = "gloo") -> Iterator[Ranks]:
    """Under ``torchrun`` with two ranks or more (``WORLD_SIZE`` in the environment) and no
    process group yet, a process group for the block (``init_process_group(backend)`` from
    torchrun's environment), destroyed after it; else nothing. Yields this process's
    :class:`Ranks`. The command line uses it, so that ``torchrun --nproc_per_node 2 -m
    fxnumeric.cli report ...`` compares data-parallel; a library never initialises a group of
    its own accord.
    """
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size < 2 or not dist.is_available() or dist.is_initialized():
        yield data_parallel(None)
        return
    dist.init_process_group(backend)
    try:
        yield data_parallel(True)
    finally:
        dist.destroy_process_group()
