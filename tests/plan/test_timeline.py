"""fxprefetch/plan/timeline.py: with a device profile the picture's x-axis is predicted time; the
positions it computes (not pixels)."""

from __future__ import annotations

import pytest

from fxprefetch.devices.profile_catalog import profile
from fxprefetch.plan import LinearRecord, PredictedSaving
from fxprefetch.plan.timeline import Span, time_layout


def _record(name, position, weight_bytes, window=None, prefetch=0, shared=0.0, emitted=True):
    prediction = None
    if window is not None:
        prediction = PredictedSaving("h200", 0, 1, window, shared, 0.0, 0.0, -1.0)
    return LinearRecord(
        node=name,
        op="aten::mm",
        module=None,
        weight=f"layers.0.{name}.weight",
        layer=0,
        role="attn.qkv",
        weight_shape=(1, 1),
        dtype="torch.bfloat16",
        weight_bytes=weight_bytes,
        prefetch_bytes=prefetch,
        position=position,
        dependency="norm" if window is not None else None,
        window=("aten::mul",) if window is not None else (),
        prefetch_node=f"pf_{name}" if emitted and prefetch else None,
        prediction=prediction,
    )


def test_time_layout_places_windows_linears_and_prefetches_in_predicted_microseconds():
    h200 = profile("h200")
    per_us = h200.bytes_per_us
    mb = round(per_us)  # one µs of reading
    q = _record("q", 5, 2 * mb, window=1.5, prefetch=mb)
    k = _record("k", 6, mb, window=1.5, prefetch=mb, shared=1.0)  # behind the same window
    o = _record("o", 9, 3 * mb, emitted=False)  # no window, no prefetch
    laid = {t.record.node: t for t in time_layout([o, k, q], h200)}  # any order in
    assert laid["q"].window == Span(0.0, 1.5) and laid["k"].window == Span(0.0, 1.5)
    assert laid["q"].linear == Span(1.5, pytest.approx(3.5))
    assert laid["k"].linear.start == pytest.approx(3.5)
    assert laid["k"].linear.end == pytest.approx(4.5)
    assert laid["o"].window is None and laid["o"].linear.end == pytest.approx(7.5)
    assert laid["q"].prefetch == Span(0.0, pytest.approx(1.0))
    assert laid["k"].prefetch.start == pytest.approx(1.0)  # after q's share of the window
    assert laid["o"].prefetch is None
