"""A plan's predicted saving per layer and per decode step, as text (``fxprefetch plan
--device``): the prediction model (:mod:`fxprefetch.devices.prediction`) summed over a
model's layers, bounded by the step's weight-read floor. It draws on a device's profile, so
it sits in the devices layer, like the timeline, though it lives beside the plan's text."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fxprefetch.devices.prediction import MB, DeviceProfile, MiB, delta_us_per_mb
from fxprefetch.plan import LinearRecord, PrefetchPlan


@dataclass(frozen=True)
class StepShape:
    """What the whole model has beyond the built layers: its decoder layers, how many of them
    are dense (the rest MoE), and its routed experts (``top_k`` of ``experts`` run per token)."""

    layers_total: int | None = None
    dense_layers: int | None = None
    experts: int | None = None
    top_k: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> StepShape:
        """From a Hugging Face config (duck-typed: ``num_hidden_layers``, ``num_experts`` /
        ``num_local_experts`` / ``n_routed_experts``, ``num_experts_per_tok``,
        ``first_k_dense_replace``)."""
        layers = getattr(config, "num_hidden_layers", None)
        experts = next(
            (
                getattr(config, k)
                for k in ("num_experts", "num_local_experts", "n_routed_experts")
                if isinstance(getattr(config, k, None), int) and getattr(config, k) > 0
            ),
            None,
        )
        top_k = getattr(config, "num_experts_per_tok", None) if experts else None
        first_dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
        dense = layers if experts is None else first_dense
        return cls(layers, dense, experts, top_k if isinstance(top_k, int) else None)


_ROUTED = re.compile(r"(^|\.)experts(\.|$)")


def routed_expert(r: LinearRecord) -> bool:
    """Whether a record's weight belongs to routed experts (not shared ones)."""
    name = r.module or r.weight
    return bool(_ROUTED.search(name)) and "shared" not in name


def layer_kinds(plans: Sequence[PrefetchPlan]) -> dict[int, str]:
    """Each built decoder layer's kind: ``"moe"`` where it has routed experts, else ``"dense"``."""
    kinds: dict[int, str] = {}
    for p in plans:
        for r in p.records:
            if r.layer is not None:
                moe = routed_expert(r) or r.role == "moe.gate_up"
                kinds[r.layer] = "moe" if moe or kinds.get(r.layer) == "moe" else "dense"
    return kinds


def kind_counts(kinds: dict[int, str], shape: StepShape | None) -> dict[str, int]:
    """Layers of each kind in the whole model (the built ones where the shape says nothing)."""
    built = {k: sum(1 for v in kinds.values() if v == k) for k in ("dense", "moe")}
    if shape is None or shape.layers_total is None:
        return built
    dense = shape.dense_layers if shape.dense_layers is not None else built["dense"]
    if not built["moe"]:
        dense = shape.layers_total if shape.experts is None else dense
    return {"dense": min(dense, shape.layers_total), "moe": max(0, shape.layers_total - dense)}


def _weight_bytes(r: LinearRecord, shape: StepShape | None) -> float:
    if routed_expert(r) and shape is not None and shape.experts and shape.top_k:
        return r.weight_bytes * min(1.0, shape.top_k / shape.experts)  # top_k of n run
    return float(r.weight_bytes)


def per_kind_totals(
    plans: Sequence[PrefetchPlan], shape: StepShape | None, value
) -> tuple[float, list[str]]:
    """``value(record)`` summed over a step of the whole model: the built layers' mean per
    kind x that kind's layers, plus what is outside layers; and the kinds not built."""
    kinds = layer_kinds(plans)
    counts = kind_counts(kinds, shape)
    sums: dict[str, float] = {"dense": 0.0, "moe": 0.0}
    other = 0.0
    for p in plans:
        for r in p.records:
            v = value(r)
            if r.layer is None:
                other += v
            else:
                sums[kinds[r.layer]] += v
    total = other
    missing = []
    for kind in ("dense", "moe"):
        built = sum(1 for v in kinds.values() if v == kind)
        if built:
            total += sums[kind] / built * counts[kind]
        elif counts[kind]:
            missing.append(f"{counts[kind]} {kind} layers (none built)")
    return total, missing


def weight_bytes_per_step(
    plans: Sequence[PrefetchPlan], shape: StepShape | int | None = None
) -> int:
    """Bytes of every weight a step reads once: the built layers per kind scaled to the whole
    model; of routed experts only the ``top_k`` of ``experts`` a token runs. An int ``shape``
    is the model's decoder layers."""
    from fxprefetch.plan import SkipReason

    if isinstance(shape, int):
        shape = StepShape(layers_total=shape)

    def value(r: LinearRecord) -> float:
        if r.weight_bytes <= 0 or r.skip_reason == SkipReason.NOT_A_WEIGHT:
            return 0.0
        return _weight_bytes(r, shape)

    total, _ = per_kind_totals(plans, shape, value)
    return round(total)


def idle_us_per_step(plans: Sequence[PrefetchPlan], shape: StepShape | None) -> float:
    """The model's HBM-idle time of a step: every distinct window's time (each once), per kind
    scaled to the whole model."""
    seen: set[tuple] = set()

    def value(r: LinearRecord) -> float:
        if r.prediction is None:
            return 0.0
        key = (r.layer, r.dependency, r.window)
        if key in seen:
            return 0.0
        seen.add(key)
        return r.prediction.window_us

    total, _ = per_kind_totals(plans, shape, value)
    return total


def step_bound(
    device: DeviceProfile, floor_us: float, idle_us: float, weight_bytes: float, tokens=None
) -> tuple[float, float]:
    """The ceiling: all of the idle time converted at no cost, ``δ x min(idle x B_read,
    weights)`` saved off a step of ``floor + idle``. Returns (µs saved, speed-up)."""
    landed = min(idle_us * device.bytes_per_us, weight_bytes)
    saved = delta_us_per_mb(device, tokens) * landed / MB
    step = floor_us + idle_us
    return saved, (step / (step - saved) if step > saved else math.inf)


def speedup_bound(floor_us: float, saved_us: float) -> float:
    """``floor / (floor - saved)`` (kept for callers that have a measured step time)."""
    return floor_us / (floor_us - saved_us) if floor_us > saved_us else math.inf


def describe_profile(device: DeviceProfile) -> list[str]:
    """One line per constant: value and provenance (``fxprefetch plan --device``)."""
    lines = [f"  profile {device.name} ({device.origin}); lowering {device.lowering}:"]
    for key, c in device.constants().items():
        value = f"{c.value:.4g}"
        lines.append(f"    {key} = {value}  [{c.kind}: {c.source}]")
    return lines


def render_prediction(
    plans: Sequence[PrefetchPlan],
    device: DeviceProfile,
    layers_total: int | None = None,
    shape: StepShape | None = None,
) -> str:
    """The predicted saving per layer and per step, labelled a model, with the profile's
    constants and their provenance (``fxprefetch plan --device``). ``layers_total`` /
    ``shape``: the whole model, where fewer layers were built."""
    from fxprefetch.plan import predicted_saving

    if shape is None and layers_total is not None:
        shape = StepShape(layers_total=layers_total)
    cost = device.cost()
    head = [
        f"prediction on {device.name} ({device.label}: "
        f"{device.read_bytes_per_s.value / 1e12:.2f} TB/s read, "
        f"{device.l2_bytes.value / MB:g} MB L2). A model, not a measurement:",
        "  hidden = δ·min(bytes, (window - shared)·B_read) - c_fixed - β·bytes; "
        f"δ = {device.delta_1.value:g} (1 token) to {device.delta_16.value:g} (16 tokens) "
        f"µs/MB, c_fixed = {cost.fixed_us.value:g} µs, β = {cost.per_mb_us.value:g} µs/MB",
        *describe_profile(device),
    ]
    lines = list(head)
    dropped = [
        r
        for p in plans
        for r in p.records
        if r.prediction is not None and not r.prefetched and r.skip_reason is not None
    ]
    if dropped:
        worst = max(r.prediction.hidden_us for r in dropped if r.prediction is not None)
        sized = sum(1 for r in dropped if r.prefetch_bytes > 0)
        force = (
            "force_prefetch emits them"
            if sized == len(dropped)
            else '"auto" sized them to nothing: force_prefetch emits none'
            if sized == 0
            else f'force_prefetch emits the {sized} sized ("auto" sized the rest to nothing)'
        )
        lines.append(
            f"  not emitted: {len(dropped)} prefetches predicted not to pay (best "
            f"{worst:+.2f} µs); {force}"
        )
    summary = predicted_saving(plans)
    if summary is None:
        lines.append("  no emitted prefetch has a prediction")
    else:
        done = [r for p in plans for r in p.records if r.prefetched and r.prediction is not None]
        per_layer = summary.per_layer_us
        if per_layer:
            values = list(per_layer.values())
            layers = list(per_layer)
            count = sum(1 for r in done if r.layer is not None) / len(layers)
            mib = sum(r.prefetch_bytes for r in done if r.layer is not None) / len(layers) / MiB
            low, high = min(values), max(values)
            hides = (
                f"{low:.2f} to {high:.2f} µs" if f"{low:.2f}" != f"{high:.2f}" else f"{low:.2f} µs"
            )
            which = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
            lines.append(
                f"  per layer: {count:g} prefetches, {mib:.1f} MiB, saves {hides} ({which})"
            )
        step, missing = per_kind_totals(
            plans,
            shape,
            lambda r: r.prediction.hidden_us if r.prefetched and r.prediction is not None else 0,
        )
        built = len(layer_kinds(plans))
        line = f"  per step: {summary.per_step_us:.2f} µs"
        if shape is not None and shape.layers_total and shape.layers_total > built:
            line += f" over {built} built layers; {step:.1f} µs for all {shape.layers_total}"
            line += " layers (totalled per layer kind)"
        if missing:
            line += "; not counted: " + ", ".join(missing)
        lines.append(line)
    weights = weight_bytes_per_step(plans, shape)
    floor = weights / device.bytes_per_us
    if floor > 0:
        idle = idle_us_per_step(plans, shape)
        saved, bound = step_bound(device, floor, idle, weights)
        routed = " (routed experts: top_k of n)" if shape is not None and shape.top_k else ""
        lines.append(
            f"  step floor (every weight read once at B_read{routed}): {floor:.1f} µs; "
            f"idle (the windows): {idle:.1f} µs; all idle landed at no cost saves "
            f"{saved:.1f} µs: speed-up at most {bound:.3f}x"
        )
    return "\n".join(lines)
