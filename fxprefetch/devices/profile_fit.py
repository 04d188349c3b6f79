"""Fitting a device profile's constants to measurements (code, not typed-in numbers).

- From a micro-benchmark (``benchmarks/bench_gpu_prefetch.py``'s ``micro`` rows: a GEMV of a
  32 MiB weight with arms ``none``, ``hot``, ``fork``, ``same``): δ (:func:`micro_delta`), the
  fork/join's fixed cost (:func:`micro_fork_us`), a compute-stream lowering's fixed and per-MB
  cost (:func:`compute_stream_cost`).
- From a measured step (a benchmark row, or a published result): β of a lowering
  (:func:`fit_per_mb`) or δ (:func:`fit_delta`), each solved so that the model's prediction for
  the planned prefetches equals the measured saving. The planned prefetches are re-predicted
  under the profile (:func:`step_saving_us`), windows and shares included.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fxprefetch.devices.prediction import (
    MB,
    Constant,
    DeviceProfile,
    LoweringCost,
    WindowTraffic,
    predict,
)

WEIGHT_MB = 32 * (1 << 20) / MB  # the micro-benchmark's weight: 32 MiB


def _rows(micro: Iterable[Mapping[str, Any]], m: int, min_window_us: float) -> list:
    rows = [r for r in micro if r["m"] == m and r["window_us"] >= min_window_us]
    if not rows:
        raise ValueError(f"no micro-benchmark row with m = {m} and window >= {min_window_us} µs")
    return rows


def micro_delta(micro: Iterable[Mapping[str, Any]], m: int, min_window_us: float = 2) -> float:
    """δ (µs per MB): the median hot-versus-cold gap of the whole weight, per MB."""
    rows = _rows(micro, m, min_window_us)
    return statistics.median(r["none"] - r["hot"] for r in rows) / WEIGHT_MB


def micro_fork_us(micro: Iterable[Mapping[str, Any]], m: int, min_window_us: float = 2) -> float:
    """The fork/join alone (µs): the median of ``fork - none``."""
    rows = _rows(micro, m, min_window_us)
    return statistics.median(r["fork"] - r["none"] for r in rows)


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = a + b·x``: returns ``(a, b)``."""
    n = len(points)
    if n < 2 or len({x for x, _ in points}) < 2:
        raise ValueError("a line needs points at two x values at least")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def compute_stream_cost(
    micro: Iterable[Mapping[str, Any]], m: int, delta: float, min_window_us: float = 2
) -> tuple[float, float]:
    """A compute-stream prefetch's ``(fixed_us, per_mb_us)``: ``same - none`` is its cost
    less what it saved (δ·MB), so ``same - none + δ·MB = fixed + per_mb·MB``."""
    rows = _rows(micro, m, min_window_us)
    points = [
        (r["prefetch_mb"] * (1 << 20) / MB, r["same"] - r["none"] + delta * r["prefetch_mb"])
        for r in rows
    ]
    return fit_line(points)


@dataclass(frozen=True)
class Planned:
    """One planned prefetch, as the model needs it to predict it under any profile."""

    nbytes: int
    window_bytes: int
    window_kernels: int
    group: tuple  # prefetches behind one window share it (in order)
    useful: float = 1.0  # share of its range the linear reads
    tokens: int | None = None


def planned(plans: Iterable[Any], tokens: int | None = None) -> list[Planned]:
    """The emitted prefetches of ``plans`` that carry a prediction (their window's traffic)."""
    found = []
    for p in plans:
        for r in p.records:
            if r.prefetched and r.prediction is not None:
                span = r.span_bytes or r.weight_bytes
                found.append(
                    Planned(
                        r.prefetch_bytes,
                        r.prediction.window_bytes,
                        r.prediction.window_kernels,
                        (p.graph, r.layer, r.dependency, r.window),
                        min(1.0, r.weight_bytes / span) if span > 0 else 1.0,
                        tokens,
                    )
                )
    return found


def step_saving_us(prefetches: Sequence[Planned], device: DeviceProfile) -> float:
    """The model's saving (µs) of ``prefetches`` on ``device``, windows shared in order."""
    shared: dict[tuple, float] = {}
    total = 0.0
    for pf in prefetches:
        used = shared.get(pf.group, 0.0)
        traffic = WindowTraffic(pf.window_bytes, pf.window_kernels)
        saving = predict(device, traffic, pf.nbytes, used, pf.tokens, pf.useful)
        shared[pf.group] = used + saving.transfer_us
        total += saving.hidden_us
    return total


def with_cost(
    device: DeviceProfile,
    fixed_us: float | None = None,
    per_mb_us: float | None = None,
    source: str = "fit",
) -> DeviceProfile:
    """``device`` with its active lowering's cost replaced (for fitting)."""
    cost = device.cost()
    new = LoweringCost(
        Constant(fixed_us, "fitted", source) if fixed_us is not None else cost.fixed_us,
        Constant(per_mb_us, "fitted", source) if per_mb_us is not None else cost.per_mb_us,
    )
    lowerings = tuple((n, new if n == device.lowering else c) for n, c in device.lowerings)
    return replace(device, lowerings=lowerings)


def with_delta(device: DeviceProfile, delta: float, source: str = "fit") -> DeviceProfile:
    """``device`` with δ = ``delta`` at every token count."""
    c = Constant(delta, "fitted", source)
    return replace(device, delta_1=c, delta_16=c)


def fit_per_mb(
    prefetches: Sequence[Planned], measured_saving_us: float, device: DeviceProfile
) -> float:
    """β (µs per MB) of the device's lowering such that the model predicts the measured
    saving of ``prefetches`` (negative where the step got slower)."""
    total_mb = sum(pf.nbytes for pf in prefetches) / MB
    if total_mb <= 0:
        raise ValueError("no prefetched bytes to fit β on")
    free = step_saving_us(prefetches, with_cost(device, per_mb_us=0.0))
    return (free - measured_saving_us) / total_mb


def fit_delta(
    prefetches: Sequence[Planned], measured_saving_us: float, device: DeviceProfile
) -> float:
    """δ (µs per MB) such that the model predicts the measured saving of ``prefetches``."""
    at_zero = step_saving_us(prefetches, with_delta(device, 0.0))
    at_one = step_saving_us(prefetches, with_delta(device, 1.0))
    landed = at_one - at_zero  # δ's coefficient: the useful MB that land
    if landed <= 0:
        raise ValueError("no prefetched byte lands in its window: δ cannot be fitted")
    return (measured_saving_us - at_zero) / landed


def as_planned_2026_11_30(h200: DeviceProfile) -> DeviceProfile:
    """The model the 2026-11-30 H200 benchmark planned (and sized "auto") with, pre-measurement:
    peak 4.8 TB/s, 2.5 µs per window kernel, 1.0 µs per prefetch, and a prefetched byte
    saving its whole transfer time (δ = 1 / bandwidth, β = 0). Used to rebuild the prefetches
    as they ran, not to predict."""
    why = "the spec model fxprefetch planned with on 2026-11-30 (before the measured model)"
    peak = 4.8e12
    delta = Constant(MB / (peak / 1e6), "assumed", why)
    device = replace(
        h200,
        name="h200-as-planned-2026-11-30",
        read_bytes_per_s=Constant(peak, "spec", why),
        hbm_peak_bytes_per_s=Constant(peak, "spec", why),
        kernel_us=Constant(2.5, "assumed", why),
        delta_1=delta,
        delta_16=delta,
        margin_us=Constant(0.0, "assumed", why),
    )
    device = with_cost(device, 1.0, 0.0, why)
    return device


__all__ = [
    "Planned",
    "as_planned_2026_11_30",
    "compute_stream_cost",
    "fit_delta",
    "fit_line",
    "fit_per_mb",
    "micro_delta",
    "micro_fork_us",
    "planned",
    "step_saving_us",
    "with_cost",
    "with_delta",
]
