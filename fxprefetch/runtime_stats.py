"""Runtime counters of the prefetches that really executed.

The op's kernels call :func:`record` once per executed prefetch. Totals are plain integer
additions (cheap enough to leave on); per-weight accounting costs a dict update and is only
done inside :func:`collect_stats` with ``per_weight=True``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class WeightStats:
    """Prefetches of one weight tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    calls: int
    bytes_requested: int
    bytes_prefetched: int


@dataclass(frozen=True)
class PrefetchStats:
    """A snapshot of the counters.

    ``bytes_requested`` sums the ``max_size`` arguments; ``bytes_prefetched`` sums what the op
    actually covers after clamping to the tensor (``min(max_size, nbytes - offset)``).
    """

    calls: int = 0
    bytes_requested: int = 0
    bytes_prefetched: int = 0
    per_weight: Mapping[str, WeightStats] = field(default_factory=dict)

    def __sub__(self, other: PrefetchStats) -> PrefetchStats:
        return PrefetchStats(
            calls=self.calls - other.calls,
            bytes_requested=self.bytes_requested - other.bytes_requested,
            bytes_prefetched=self.bytes_prefetched - other.bytes_prefetched,
        )


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.bytes_requested = 0
        self.bytes_prefetched = 0
        self.per_weight_depth = 0
        # data_ptr (op kernels) or weight name (prefetches counted at the graph call) -> counts
        self.per_weight: dict[int | str, list] = {}


_COUNTERS = _Counters()
# data_ptr -> readable name, filled by the backend for the weights it plans prefetches on.
_WEIGHT_NAMES: dict[int, str] = {}


def name_weight(tensor: torch.Tensor, name: str) -> None:
    """Give ``tensor`` a readable name in per-weight statistics."""
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return
    with contextlib.suppress(RuntimeError):  # fake/functional tensors have no storage
        _WEIGHT_NAMES[tensor.data_ptr()] = name


def record(weight: torch.Tensor, requested: int, prefetched: int) -> None:
    """Count one executed prefetch (called by the op's kernels)."""
    c = _COUNTERS
    with c.lock:
        c.calls += 1
        c.bytes_requested += requested
        c.bytes_prefetched += prefetched
        if c.per_weight_depth:
            _count_weight(
                weight.data_ptr(), tuple(weight.shape), str(weight.dtype), requested, prefetched
            )


def _count_weight(
    key: int | str, shape: tuple[int, ...], dtype: str, requested: int, prefetched: int
) -> None:
    """Per-weight counts (caller holds the lock)."""
    entry = _COUNTERS.per_weight.get(key)
    if entry is None:
        entry = _COUNTERS.per_weight[key] = [shape, dtype, 0, 0, 0]
    entry[2] += 1
    entry[3] += requested
    entry[4] += prefetched


@dataclass(frozen=True)
class CountedPrefetch:
    """A prefetch elided from compiled code and counted at the graph call instead."""

    weight: str  # the plan's name for the weight
    shape: tuple[int, ...]
    dtype: str
    requested: int
    prefetched: int


def record_graph_call(
    prefetches: tuple[CountedPrefetch, ...], requested: int, prefetched: int
) -> None:
    """Count every prefetch of one execution of a straight-line graph, in one update."""
    c = _COUNTERS
    with c.lock:
        c.calls += len(prefetches)
        c.bytes_requested += requested
        c.bytes_prefetched += prefetched
        if not c.per_weight_depth:
            return
        for p in prefetches:
            _count_weight(p.weight, p.shape, p.dtype, p.requested, p.prefetched)


def stats() -> PrefetchStats:
    """The counters since the last :func:`reset_stats`."""
    c = _COUNTERS
    with c.lock:
        per_weight = {}
        for key, (shape, dtype, calls, req, pre) in c.per_weight.items():
            name = key if isinstance(key, str) else _WEIGHT_NAMES.get(key, f"tensor@{key:#x}")
            per_weight[name] = WeightStats(name, shape, dtype, calls, req, pre)
        return PrefetchStats(c.calls, c.bytes_requested, c.bytes_prefetched, per_weight)


def reset_stats() -> None:
    c = _COUNTERS
    with c.lock:
        c.calls = c.bytes_requested = c.bytes_prefetched = 0
        c.per_weight.clear()


class StatsRecorder:
    """What :func:`collect_stats` yields: the counters of its own ``with`` block."""

    def __init__(self, start: PrefetchStats, per_weight: bool) -> None:
        self._start = start
        self._per_weight = per_weight
        self._final: PrefetchStats | None = None

    def _finish(self) -> None:
        self._final = self.current()

    def current(self) -> PrefetchStats:
        if self._final is not None:
            return self._final
        now = stats()
        delta = now - self._start
        per_weight = now.per_weight if self._per_weight else {}
        return PrefetchStats(delta.calls, delta.bytes_requested, delta.bytes_prefetched, per_weight)

    @property
    def calls(self) -> int:
        return self.current().calls

    @property
    def bytes_requested(self) -> int:
        return self.current().bytes_requested

    @property
    def bytes_prefetched(self) -> int:
        return self.current().bytes_prefetched

    @property
    def per_weight(self) -> Mapping[str, WeightStats]:
        return self.current().per_weight


@contextmanager
def collect_stats(per_weight: bool = False) -> Iterator[StatsRecorder]:
    """Count the prefetches that run inside the block.

    >>> with fxprefetch.collect_stats(per_weight=True) as s:
    ...     compiled(x)
    >>> s.calls, s.bytes_prefetched, s.per_weight
    """
    c = _COUNTERS
    if per_weight:
        with c.lock:
            if c.per_weight_depth == 0:
                c.per_weight.clear()
            c.per_weight_depth += 1
    recorder = StatsRecorder(stats(), per_weight)
    try:
        yield recorder
    finally:
        recorder._finish()
        if per_weight:
            with c.lock:
                c.per_weight_depth -= 1
