"""Runtime counters of prefetches: the ones that reached a kernel, and planned hints.

Two kinds of count, never mixed:

- ``calls`` / ``bytes_*``: prefetches that ran. Counted by the op's kernels
  (:func:`record`), except in graphs replayed as CUDA graphs, where the op's Python body runs
  only while the graph is warmed up and captured: during such a graph's calls the kernels
  hand what they ran to the call (:func:`counted_per_call`), which counts it once it
  returns (:func:`record_ran`), with what a replay runs (see :mod:`fxprefetch.counting`).
- ``hints`` / ``hint_bytes``: prefetches the plan put in a graph whose compiled code left them
  out, because on that device a prefetch is only a hint (inductor on the CPU). The compiled
  graph is straight-line, so each graph call counts its planned hints once
  (:func:`record_planned` with ``ran=False``); no kernel ran for them.

Semantics:

- :func:`stats` is process-wide (every thread) since the last :func:`reset_stats`, and
  carries no per-weight data.
- :func:`collect_stats` counts what the *current thread* runs inside its block. Nested blocks
  each count exactly their own span; :func:`reset_stats` does not touch blocks; another
  thread's prefetches never land in a block. ``per_weight=True`` adds counts per weight
  tensor, named by the compiled graph's parameter paths (two tensors with one name stay
  apart: the later ones get their address appended).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class WeightStats:
    """Prefetches of one weight tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    calls: int = 0
    bytes_requested: int = 0
    bytes_prefetched: int = 0
    hints: int = 0


@dataclass(frozen=True)
class PrefetchStats:
    """A snapshot of the counters.

    ``bytes_requested`` sums the ``max_size`` arguments of kernel calls; ``bytes_prefetched``
    sums what they cover after clamping to the tensor (``min(max_size, nbytes - offset)``).
    ``hints`` / ``hint_bytes`` count planned hint-only prefetches per graph call.
    """

    calls: int = 0
    bytes_requested: int = 0
    bytes_prefetched: int = 0
    hints: int = 0
    hint_bytes: int = 0
    per_weight: Mapping[str, WeightStats] = field(default_factory=dict)
    failed: int = 0  # run-time checked prefetches skipped because their kernel failed


@dataclass(frozen=True)
class Ran:
    """One prefetch a kernel ran during a graph call that counts its own (hashable: a
    replay counts again what its capture ran)."""

    data_ptr: int
    shape: tuple[int, ...]
    dtype: str
    requested: int
    prefetched: int


@dataclass(slots=True)
class _WeightTally:
    """The running counts of one weight tensor in one block (mutable: counted in place on
    every prefetch; :meth:`snapshot` gives the frozen :class:`WeightStats`)."""

    name: str | None  # None until a graph call names the tensor
    shape: tuple[int, ...]
    dtype: str
    calls: int = 0
    requested: int = 0
    prefetched: int = 0
    hints: int = 0

    def snapshot(self, label: str) -> WeightStats:
        return WeightStats(
            name=label,
            shape=self.shape,
            dtype=self.dtype,
            calls=self.calls,
            bytes_requested=self.requested,
            bytes_prefetched=self.prefetched,
            hints=self.hints,
        )


class _Tally:
    """Counts of one scope (the process, or one ``collect_stats`` block)."""

    __slots__ = (
        "calls",
        "failed",
        "hint_bytes",
        "hints",
        "per_weight",
        "prefetched",
        "requested",
    )

    def __init__(self, per_weight: bool = False) -> None:
        self.calls = self.requested = self.prefetched = self.hints = self.hint_bytes = 0
        self.failed = 0
        # keyed by data_ptr, or by name where no pointer is known
        self.per_weight: dict[int | str, _WeightTally] | None = {} if per_weight else None

    def snapshot(self) -> PrefetchStats:
        per_weight: dict[str, WeightStats] = {}
        for key, weight in (self.per_weight or {}).items():
            label = weight.name or (key if isinstance(key, str) else f"tensor@{key:#x}")
            if label in per_weight:  # another tensor with the same name (another model)
                label = f"{label} (tensor@{key:#x})" if isinstance(key, int) else f"{label}#2"
            per_weight[label] = weight.snapshot(label)
        return PrefetchStats(
            calls=self.calls,
            bytes_requested=self.requested,
            bytes_prefetched=self.prefetched,
            hints=self.hints,
            hint_bytes=self.hint_bytes,
            per_weight=per_weight,
            failed=self.failed,
        )


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.blocks: list[_Tally] = []
        self.per_weight_blocks = 0
        self.names: list[Mapping[int, str]] = []  # data_ptr -> name, pushed per graph call
        # inside graph calls that count their own prefetches: what the kernels ran, per call
        self.per_call: list[list[Ran]] = []


_PROCESS = _Tally()
_LOCK = threading.Lock()
_THREAD = _ThreadState()


def _weight_entry(
    tally: _Tally, key: int | str, name: str | None, shape: tuple[int, ...], dtype: str
) -> _WeightTally:
    """The block's running counts of one weight, made on its first prefetch."""
    assert tally.per_weight is not None
    entry = tally.per_weight.get(key)
    if entry is None:
        entry = tally.per_weight[key] = _WeightTally(name, shape, dtype)
    elif entry.name is None and name is not None:
        entry.name = name
    return entry


def _name_of(data_ptr: int) -> str | None:
    for names in reversed(_THREAD.names):
        name = names.get(data_ptr)
        if name is not None:
            return name
    return None


def record(weight: torch.Tensor, requested: int, prefetched: int) -> None:
    """Count one prefetch that reached a kernel (called by the op's kernels)."""
    if _THREAD.per_call:  # the enclosing graph call counts it (see record_ran)
        _THREAD.per_call[-1].append(
            Ran(weight.data_ptr(), tuple(weight.shape), str(weight.dtype), requested, prefetched)
        )
        return
    with _LOCK:
        _PROCESS.calls += 1
        _PROCESS.requested += requested
        _PROCESS.prefetched += prefetched
    blocks = _THREAD.blocks
    if not blocks:
        return
    key = weight.data_ptr() if _THREAD.per_weight_blocks else 0
    for block in blocks:
        block.calls += 1
        block.requested += requested
        block.prefetched += prefetched
        if block.per_weight is not None:
            entry = _weight_entry(block, key, _name_of(key), tuple(weight.shape), str(weight.dtype))
            entry.calls += 1
            entry.requested += requested
            entry.prefetched += prefetched


def record_hint(weight: torch.Tensor, nbytes: int) -> None:
    """Count one planned hint at the moment its code runs (``fxprefetch.prefetch_hint``:
    hints of bodies that run only on some calls, such as a ``torch.cond`` branch)."""
    with _LOCK:
        _PROCESS.hints += 1
        _PROCESS.hint_bytes += nbytes
    blocks = _THREAD.blocks
    if not blocks:
        return
    key = weight.data_ptr() if _THREAD.per_weight_blocks else 0
    for block in blocks:
        block.hints += 1
        block.hint_bytes += nbytes
        if block.per_weight is not None:
            entry = _weight_entry(block, key, _name_of(key), tuple(weight.shape), str(weight.dtype))
            entry.hints += 1


def record_failed() -> None:
    """Count one run-time checked prefetch whose kernel failed, and was skipped."""
    with _LOCK:
        _PROCESS.failed += 1
    for block in _THREAD.blocks:
        block.failed += 1


@dataclass(frozen=True)
class PlannedPrefetch:
    """A prefetch of a compiled graph, counted at each call of that graph."""

    weight: str  # the plan's name for the weight
    shape: tuple[int, ...]
    dtype: str
    requested: int  # the op's max_size
    nbytes: int  # what it covers: min(max_size, weight bytes - offset)
    arg_index: int | None  # which graph input holds the weight, when known


def record_planned(
    prefetches: Sequence[PlannedPrefetch], ptrs: Mapping[int, int] | None, ran: bool
) -> None:
    """Count the prefetches of one call of a straight-line graph, in one update: as calls
    that ran (``ran``: a CUDA-graph replay) or as planned hints the code left out.
    ``ptrs``: graph input index -> data pointer, to key per-weight counts by tensor."""
    count = len(prefetches)
    requested = sum(p.requested for p in prefetches)
    nbytes = sum(p.nbytes for p in prefetches)
    with _LOCK:
        _count(_PROCESS, count, requested, nbytes, ran)
    for block in _THREAD.blocks:
        _count(block, count, requested, nbytes, ran)
        if block.per_weight is None:
            continue
        for p in prefetches:
            ptr = ptrs.get(p.arg_index) if ptrs and p.arg_index is not None else None
            key = ptr if ptr is not None else p.weight
            # the call's own name for the tensor (a graph run by several layers: each's)
            name = (_name_of(ptr) if ptr is not None else None) or p.weight
            entry = _weight_entry(block, key, name, p.shape, p.dtype)
            if ran:
                entry.calls += 1
                entry.requested += p.requested
                entry.prefetched += p.nbytes
            else:
                entry.hints += 1


def _count(tally: _Tally, count: int, requested: int, nbytes: int, ran: bool) -> None:
    if ran:
        tally.calls += count
        tally.requested += requested
        tally.prefetched += nbytes
    else:
        tally.hints += count
        tally.hint_bytes += nbytes


@contextmanager
def counted_per_call() -> Iterator[list[Ran]]:
    """Within: the op kernels of the current thread count nothing; the list yielded
    collects what they ran, for the graph call to count (:func:`record_ran`)."""
    ran: list[Ran] = []
    _THREAD.per_call.append(ran)
    try:
        yield ran
    finally:
        _THREAD.per_call.pop()


def record_ran(prefetches: Sequence[Ran]) -> None:
    """Count prefetches that ran during one graph call, in one update (per weight: named
    by the graph call, see :func:`naming`)."""
    if not prefetches:
        return
    requested = sum(p.requested for p in prefetches)
    nbytes = sum(p.prefetched for p in prefetches)
    with _LOCK:
        _count(_PROCESS, len(prefetches), requested, nbytes, ran=True)
    for block in _THREAD.blocks:
        _count(block, len(prefetches), requested, nbytes, ran=True)
        if block.per_weight is None:
            continue
        for p in prefetches:
            key = p.data_ptr if _THREAD.per_weight_blocks else 0
            entry = _weight_entry(block, key, _name_of(key), p.shape, p.dtype)
            entry.calls += 1
            entry.requested += p.requested
            entry.prefetched += p.prefetched


def per_weight_wanted() -> bool:
    """Whether a block of the current thread collects per-weight counts (cheap)."""
    return _THREAD.per_weight_blocks > 0


@contextmanager
def naming(names: Mapping[int, str]) -> Iterator[None]:
    """Name weights by data pointer for the prefetches of one graph call."""
    _THREAD.names.append(names)
    try:
        yield
    finally:
        _THREAD.names.pop()


def stats() -> PrefetchStats:
    """Process-wide counters since the last :func:`reset_stats` (no per-weight data)."""
    with _LOCK:
        return _PROCESS.snapshot()


def reset_stats() -> None:
    """Zero the process-wide counters; blocks in progress keep counting their own span."""
    with _LOCK:
        _PROCESS.calls = _PROCESS.requested = _PROCESS.prefetched = 0
        _PROCESS.hints = _PROCESS.hint_bytes = _PROCESS.failed = 0


class StatsRecorder:
    """What :func:`collect_stats` yields: the counters of its own ``with`` block."""

    def __init__(self, tally: _Tally) -> None:
        self._tally = tally

    def current(self) -> PrefetchStats:
        return self._tally.snapshot()

    @property
    def calls(self) -> int:
        return self._tally.calls

    @property
    def bytes_requested(self) -> int:
        return self._tally.requested

    @property
    def bytes_prefetched(self) -> int:
        return self._tally.prefetched

    @property
    def hints(self) -> int:
        return self._tally.hints

    @property
    def hint_bytes(self) -> int:
        return self._tally.hint_bytes

    @property
    def failed(self) -> int:
        return self._tally.failed

    @property
    def per_weight(self) -> Mapping[str, WeightStats]:
        return self.current().per_weight


@contextmanager
def collect_stats(per_weight: bool = False) -> Iterator[StatsRecorder]:
    """Count the prefetches the current thread runs inside the block.

    >>> with fxprefetch.collect_stats(per_weight=True) as s:
    ...     compiled(x)
    >>> s.calls, s.hints, s.bytes_prefetched, s.per_weight
    """
    tally = _Tally(per_weight)
    state = _THREAD
    state.blocks.append(tally)
    state.per_weight_blocks += per_weight
    try:
        yield StatsRecorder(tally)
    finally:
        state.blocks.remove(tally)
        state.per_weight_blocks -= per_weight
