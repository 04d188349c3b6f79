"""A picture of the overlap: one decoder layer of each kind, two lanes.

Compute lane: each linear's vector window and the linear itself, in graph order. Prefetch
lane: each prefetch as a bar from its dependency to its linear, labelled with its bytes and
whether it was capped. Drawn with matplotlib (``pip install 'fxprefetch[viz]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fxprefetch.plan.records import LinearRecord, PrefetchPlan
from fxprefetch.plan.render import format_bytes
from fxprefetch.roles import MOE_GATE_UP


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


def draw_timeline(plans: Sequence[PrefetchPlan], path: str | Path, title: str = "") -> Path:
    """Write the timeline to ``path`` (format from its suffix: .svg or .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = representative_layers(plans)
    if not panels:
        raise ValueError("no decoder layer in the plans: nothing to draw")
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 3.2 * len(panels)), squeeze=False)
    for ax, (label, records) in zip(axes[:, 0], panels, strict=True):
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
