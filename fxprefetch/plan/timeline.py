"""A picture of the overlap: one decoder layer of each kind, two lanes.

Compute lane: each linear's vector window and the linear itself, in graph order. Prefetch
lane: each prefetch as a bar from its dependency to its linear, labelled with its bytes and
whether it was capped. Drawn with matplotlib (``pip install 'fxprefetch[viz]'``).

With a device profile the x-axis is time in predicted microseconds (:func:`time_layout`): each
window takes its predicted time, each linear its weight's read time at the profile's read
bandwidth, in graph order; each prefetch starts with its window (after those sharing it) and
lasts its own read time. Without one, the x-axis is the graph position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fxprefetch.plan.records import LinearRecord, PrefetchPlan
from fxprefetch.plan.render import format_bytes
from fxprefetch.roles import MOE_GATE_UP

if TYPE_CHECKING:
    from fxprefetch.devices.prediction import DeviceProfile


@dataclass(frozen=True)
class Span:
    """One bar of the picture, in predicted µs."""

    start: float
    end: float


@dataclass(frozen=True)
class TimedLinear:
    """Where a linear, its window and its prefetch sit on the predicted time axis."""

    record: LinearRecord
    window: Span | None
    linear: Span
    prefetch: Span | None


def time_layout(records: Sequence[LinearRecord], device: DeviceProfile) -> list[TimedLinear]:
    """The layer's linears on a time axis (µs): windows of predicted length (one window shared
    by several linears is drawn once), then each linear's read time at ``B_read``; a prefetch
    from its window's start (plus the share taken by those before it) for its read time."""
    per_us = device.bytes_per_us
    t = 0.0
    windows: dict[tuple, Span] = {}
    out = []
    for r in sorted(records, key=lambda r: r.position):
        window = None
        p = r.prediction
        if p is not None:
            key = (r.dependency, r.window)
            if key not in windows:
                windows[key] = Span(t, t + p.window_us)
                t += p.window_us
            window = windows[key]
        linear = Span(t, t + max(r.weight_bytes, 0) / per_us)
        t = linear.end
        prefetch = None
        if r.prefetch_bytes > 0 and window is not None and p is not None:
            start = window.start + p.shared_us
            prefetch = Span(start, start + r.prefetch_bytes / per_us)
        out.append(TimedLinear(r, window, linear, prefetch))
    return out


def representative_layers(plans: Sequence[PrefetchPlan]) -> list[tuple[str, list[LinearRecord]]]:
    """The first dense and the first MoE decoder layer (by layer index) found in ``plans``."""
    layers: dict[int, list[LinearRecord]] = {}
    for plan in plans:
        for r in plan.records:
            if r.layer is not None and r.position >= 0:
                layers.setdefault(r.layer, []).append(r)
    chosen: dict[str, tuple[int, list[LinearRecord]]] = {}
    for index in sorted(layers):
        records = sorted(layers[index], key=lambda r: r.position)
        kind = (
            "MoE"
            if any(r.role == MOE_GATE_UP or (r.module or "").endswith("experts") for r in records)
            else "dense"
        )
        chosen.setdefault(kind, (index, records))
    return [
        (f"{kind} layer {index}", records)
        for kind, (index, records) in sorted(chosen.items(), key=lambda kv: kv[0] == "MoE")
    ]


def draw_timeline(
    plans: Sequence[PrefetchPlan],
    path: str | Path,
    title: str = "",
    device: DeviceProfile | None = None,
) -> Path:
    """Write the timeline to ``path`` (format from its suffix: .svg or .png); in predicted
    µs where ``device`` is given, else in graph positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = representative_layers(plans)
    if not panels:
        raise ValueError("no decoder layer in the plans: nothing to draw")
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.2 * len(panels)), squeeze=False)
    for ax, (label, records) in zip(axes[:, 0], panels, strict=True):
        if device is not None:
            _draw_timed_layer(ax, label, time_layout(records, device), device)
        else:
            _draw_layer(ax, label, records)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format=path.suffix.lstrip(".") or "svg")
    plt.close(fig)
    return path


def _short(r: LinearRecord) -> str:
    name = r.weight if "." in r.weight else (r.module or r.weight)
    parts = [p for p in name.split(".") if p not in ("weight",)]
    return parts[-1] if parts else name


def _draw_layer(ax, label: str, records: list[LinearRecord]) -> None:
    lo = (
        min(
            min(
                r.dependency_position if r.dependency_position is not None else r.position,
                r.window_start if r.window_start is not None else r.position,
            )
            for r in records
        )
        - 2
    )
    hi = max(r.position for r in records) + 2
    compute_y, prefetch_y = 1.0, 0.0
    for r in records:
        if r.window_start is not None:
            ax.broken_barh(
                [(r.window_start, r.position - r.window_start)],
                (compute_y - 0.3, 0.6),
                facecolors="#9ecae1",
                edgecolors="#3182bd",
                alpha=0.5,
                zorder=1,
            )
        color = "#fd8d3c" if r.prefetched else "#bdbdbd"
        ax.broken_barh(
            [(r.position - 0.5, 1.0)],
            (compute_y - 0.35, 0.7),
            facecolors=color,
            edgecolors="black",
            zorder=3,
        )
        ax.text(
            r.position,
            compute_y + 0.45,
            _short(r),
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=30,
        )
    prefetched = [r for r in records if r.prefetched and r.dependency_position is not None]
    for i, r in enumerate(prefetched):
        y = prefetch_y + 0.25 * (i % 3) - 0.25
        start = r.dependency_position
        ax.broken_barh(
            [(start, r.position - start)],
            (y - 0.1, 0.2),
            facecolors="#d62728" if r.capped else "#2ca02c",
            alpha=0.8,
        )
        ax.text(
            start + 0.2,
            y + 0.12,
            f"{_short(r)} {format_bytes(r.prefetch_bytes)}{' capped' if r.capped else ''}",
            fontsize=6,
            va="bottom",
        )
    ax.set_xlim(lo, hi)
    ax.set_ylim(-0.8, 2.0)
    ax.set_yticks([prefetch_y, compute_y], ["prefetch", "compute"])
    ax.set_xlabel("graph position (node index)")
    ax.set_title(
        f"{label}: blue = vector window, orange = linear with prefetch, "
        "grey = linear without; bars = prefetches (red = capped)",
        fontsize=9,
    )


def _draw_timed_layer(ax, label: str, timed: list[TimedLinear], device: DeviceProfile) -> None:
    compute_y, prefetch_y = 1.0, 0.0
    for i, item in enumerate(timed):
        r = item.record
        if item.window is not None:
            w = item.window
            ax.broken_barh(
                [(w.start, w.end - w.start)],
                (compute_y - 0.3, 0.6),
                facecolors="#9ecae1",
                edgecolors="#3182bd",
                alpha=0.5,
                zorder=1,
            )
        s = item.linear
        ax.broken_barh(
            [(s.start, s.end - s.start)],
            (compute_y - 0.35, 0.7),
            facecolors="#fd8d3c" if r.prefetched else "#bdbdbd",
            edgecolors="black",
            zorder=3,
        )
        ax.text(
            (s.start + s.end) / 2,
            compute_y + 0.45,
            _short(r),
            ha="center",
            va="bottom",
            fontsize=7,
            rotation=30,
        )
        if item.prefetch is not None:
            y = prefetch_y + 0.25 * (i % 3) - 0.25
            pf = item.prefetch
            ax.broken_barh(
                [(pf.start, pf.end - pf.start)],
                (y - 0.1, 0.2),
                facecolors="#2ca02c" if r.prefetched else "#d62728",
                alpha=0.8,
            )
            hidden = r.prediction.hidden_us if r.prediction is not None else 0.0
            state = "" if r.prefetched else " not emitted"
            ax.text(
                pf.start,
                y + 0.12,
                f"{_short(r)} {format_bytes(r.prefetch_bytes)} {hidden:+.2f} µs{state}",
                fontsize=6,
                va="bottom",
            )
    end = max((t.linear.end for t in timed), default=1.0)
    ax.set_xlim(0, end * 1.02)
    ax.set_ylim(-0.8, 2.0)
    ax.set_yticks([prefetch_y, compute_y], ["prefetch", "compute"])
    ax.set_xlabel(f"predicted time on {device.name} (µs; a model, not a measurement)")
    ax.set_title(
        f"{label}: blue = vector window, orange = linear with prefetch, grey = without; "
        "bars = prefetches (green = emitted, red = predicted not to pay)",
        fontsize=9,
    )
