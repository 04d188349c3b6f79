"""fxprefetch/runtime_stats.py: the counters of prefetches that ran and of planned hints,
process-wide and per ``collect_stats()`` block, per weight where asked."""

from __future__ import annotations

import threading

import torch

import fxprefetch
from fxprefetch import runtime_stats


def test_a_prefetch_that_ran_is_counted_in_the_process_and_in_each_open_block():
    weight = torch.zeros(4, 8)
    with fxprefetch.collect_stats() as outer:
        runtime_stats.record(weight, requested=256, prefetched=128)
        with fxprefetch.collect_stats() as inner:
            runtime_stats.record(weight, requested=64, prefetched=64)
    runtime_stats.record(weight, requested=32, prefetched=32)  # no block open
    assert (outer.calls, outer.bytes_requested, outer.bytes_prefetched) == (2, 320, 192)
    assert (inner.calls, inner.bytes_requested, inner.bytes_prefetched) == (1, 64, 64)
    total = fxprefetch.stats()
    assert (total.calls, total.bytes_requested, total.bytes_prefetched) == (3, 352, 224)
    fxprefetch.reset_stats()
    assert fxprefetch.stats() == runtime_stats.PrefetchStats()


def test_per_weight_counts_use_the_names_in_scope():
    a, b = torch.zeros(2, 2), torch.zeros(3, 3)
    with fxprefetch.collect_stats(per_weight=True) as s:
        with runtime_stats.naming({a.data_ptr(): "layers.0.mlp.down_proj.weight"}):
            runtime_stats.record(a, requested=16, prefetched=16)
            runtime_stats.record(a, requested=16, prefetched=8)
        runtime_stats.record_hint(b, 36)
    down = s.per_weight["layers.0.mlp.down_proj.weight"]
    assert (down.calls, down.bytes_requested, down.bytes_prefetched) == (2, 32, 24)
    assert (down.shape, down.dtype) == ((2, 2), "torch.float32")
    (unnamed,) = (w for name, w in s.per_weight.items() if name != down.name)
    assert (unnamed.hints, unnamed.calls) == (1, 0)
    assert (s.hints, s.hint_bytes) == (1, 36)


def test_planned_prefetches_count_as_calls_when_they_ran_and_as_hints_when_not():
    planned = [
        runtime_stats.PlannedPrefetch("w1", (4,), "torch.float32", 64, 16, None),
        runtime_stats.PlannedPrefetch("w2", (8,), "torch.float32", 64, 32, None),
    ]
    with fxprefetch.collect_stats() as s:
        runtime_stats.record_planned(planned, None, ran=True)
        runtime_stats.record_planned(planned, None, ran=False)
    assert (s.calls, s.bytes_requested, s.bytes_prefetched) == (2, 128, 48)
    assert (s.hints, s.hint_bytes) == (2, 48)


def test_a_block_counts_its_own_thread_only():
    weight = torch.zeros(2)

    def other_thread():
        runtime_stats.record(weight, requested=8, prefetched=8)

    with fxprefetch.collect_stats() as s:
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert s.calls == 0
    assert fxprefetch.stats().calls == 1  # the process counts it
