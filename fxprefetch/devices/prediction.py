"""The prediction model: what each prefetch saves, from a device profile's measured constants.

A **model**, never a measurement: its constants come from a device profile
(:mod:`fxprefetch.devices.profile_file`), each labelled spec, measured, fitted, derived or assumed
(``docs/prediction.md`` lists them per device). For one prefetch of ``b`` MB behind a window
whose ops move ``w`` bytes in ``k`` kernels (``passes/analysis/window_cost.py`` reads them
from the FX graph), on a device of streaming read bandwidth ``B_read``::

    window_us = w / B_read + k * kernel_us
    landed_mb = min(b, (window_us - shared_us) * B_read)     # what lands before the linear
    hidden_us = δ(tokens) * useful(landed_mb) - c_fixed - β * b

``δ`` is what one MB made L2-resident saves the consumer (measured hot versus cold, at 1 and
16 tokens: linear in between, clamped outside, the smaller of the two where the count is not
known); ``c_fixed`` and ``β`` are what one prefetch costs the compute stream, per lowering
(``side_stream`` with its fork and join, ``compute_stream``, ``ascend_cmo``,
``ascend_side_stream``). ``useful`` keeps the share of the landed range that the linear
reads: a strided part (``W[:, :128]``) is credited with its own bytes, not its span's.
Prefetches behind one window share it: ``shared_us`` is the read time of those before it.

``"auto"`` sizes a prefetch to what lands in its window, and to nothing where that loses
(on the H200 every side-stream MB costs more than it saves, β > δ). On a GPU a prefetch
whose saving is not above the profile's margin is not emitted (``force_prefetch`` emits it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxprefetch.devices import profile_catalog
from fxprefetch.devices.profile_file import (
    Constant,
    DeviceProfile,
    LoweringCost,
    ProfileError,
    from_dict,
    read,
)

if TYPE_CHECKING:
    from fxprefetch.plan import LinearRecord, PrefetchPlan

MB = 10**6
MiB = 1 << 20
AUTO_ALIGN = 4096  # "auto" sizes are whole 4 KiB pages

#: The built-in profiles, read from the catalogue's data like any profile file.
PROFILES: dict[str, DeviceProfile] = {
    p.name: p for p in (from_dict(d) for d in profile_catalog.catalogue())
}

_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bB200\b|\bGB200\b", "b200"),
    (r"\bH200\b|\bGH200\b", "h200"),
    (r"\bH100\b", "h100"),
    (r"\bA100\b", "a100"),
    (r"910_?9[3-9]|\bA3\b", "ascend-a3"),
    (r"910B", "ascend-910b"),
)


def profile(name: str) -> DeviceProfile:
    """The profile named ``name`` (a key of :data:`PROFILES`); ``KeyError`` names them all."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise KeyError(
            f"unknown device profile {name!r}; expected one of {list(PROFILES)}"
        ) from None


def resolve_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or the profile file at a path (``device_profile``).
    :class:`ProfileError` says what was wrong."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ProfileError(
            "device_profile", f"expected a profile name or a file path, got {name_or_path!r}"
        )
    if name_or_path.lower() in PROFILES:
        return PROFILES[name_or_path.lower()]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists() or "/" in name_or_path:
        return read(path)
    raise ProfileError(
        repr(name_or_path),
        f"unknown device profile; expected a built-in one ({list(PROFILES)}) or a profile "
        "file's path (.json)",
    )


def match_profile(device_name: str) -> DeviceProfile | None:
    """The profile of a device by its reported name (``NVIDIA H200``, ``Ascend910B2``)."""
    for pattern, name in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return PROFILES[name]
    return None


def gpu_profile(device_name: str, bytes_per_s: float, l2_bytes: int, sms: int) -> DeviceProfile:
    """The profile of a GPU present here: the matching built-in profile with what the device
    reports (peak bandwidth, L2, SMs); an unknown GPU gets the H200's constants scaled to its
    reported bandwidth, labelled derived."""
    reported = "reported by the device (torch.cuda.get_device_properties)"
    base = match_profile(device_name)
    if base is None or base.kind != "gpu":
        h200 = PROFILES["h200"]
        scale = bytes_per_s / h200.hbm_bytes_per_s if bytes_per_s > 0 else 1.0
        why = "derived: the H200's, scaled to this GPU's reported peak bandwidth"
        base = replace(
            h200,
            name="gpu",
            read_bytes_per_s=Constant(h200.read_bytes_per_s.value * scale, "derived", why),
            delta_1=Constant(h200.delta_1.value / scale, "derived", why),
            delta_16=Constant(h200.delta_16.value / scale, "derived", why),
        )
    return replace(
        base,
        label=device_name,
        hbm_peak_bytes_per_s=Constant(bytes_per_s, "measured", reported),
        l2_bytes=Constant(float(l2_bytes), "measured", reported),
        cores=Constant(float(sms), "measured", reported),
    )


@dataclass(frozen=True)
class WindowTraffic:
    """What a window moves: bytes its ops read and write, and the kernels it launches."""

    nbytes: int
    kernels: int


def window_us(device: DeviceProfile, traffic: WindowTraffic) -> float:
    """The window's time: its bytes at the read bandwidth, plus a fixed time per kernel."""
    return traffic.nbytes / device.bytes_per_us + traffic.kernels * device.kernel_us.value


def delta_us_per_mb(device: DeviceProfile, tokens: int | None) -> float:
    """δ at ``tokens`` tokens: linear between the 1- and 16-token values, clamped outside;
    the smaller of the two where the count is not known (symbolic)."""
    d1, d16 = device.delta_1.value, device.delta_16.value
    if tokens is None:
        return min(d1, d16)
    t = min(max(tokens, 1), 16)
    return d1 + (d16 - d1) * (t - 1) / 15


def net_us(
    device: DeviceProfile,
    prefetch_bytes: int,
    landed_bytes: float,
    tokens: int | None = None,
    useful: float = 1.0,
) -> float:
    """``δ·useful·landed − c_fixed − β·bytes`` (µs): the formula, on byte counts."""
    cost = device.cost()
    gain = delta_us_per_mb(device, tokens) * useful * landed_bytes / MB
    return gain - cost.fixed_us.value - cost.per_mb_us.value * prefetch_bytes / MB


def hideable_bytes(
    device: DeviceProfile,
    traffic: WindowTraffic,
    shared_us: float = 0.0,
    tokens: int | None = None,
    useful: float = 1.0,
) -> int:
    """The bytes an "auto" prefetch loads: what lands in what is left of the window, in whole
    4 KiB pages; none where that would not save anything (beyond the window a byte only
    costs, so the best size is all that lands, or nothing)."""
    free_us = window_us(device, traffic) - shared_us
    if free_us <= 0:
        return 0
    size = math.floor(free_us * device.bytes_per_us / AUTO_ALIGN) * AUTO_ALIGN
    if size <= 0 or net_us(device, size, size, tokens, useful) <= 0:
        return 0
    return size


@dataclass(frozen=True)
class Saving:
    """The model's numbers for one prefetch (µs)."""

    window_us: float
    transfer_us: float  # the prefetch's own read time, bytes / B_read
    cost_us: float  # c_fixed + β·bytes
    shared_us: float = 0.0  # the window's time that earlier prefetches behind it take
    gain_us: float = 0.0  # δ·useful·landed

    @property
    def hidden_us(self) -> float:
        """``gain - cost``: negative where the prefetch costs more than it saves."""
        return self.gain_us - self.cost_us


def predict(
    device: DeviceProfile,
    traffic: WindowTraffic,
    prefetch_bytes: int,
    shared_us: float = 0.0,
    tokens: int | None = None,
    useful: float = 1.0,
) -> Saving:
    """One prefetch's numbers. ``useful``: the share of its range the linear reads (1 for a
    whole weight; ``weight_bytes / span_bytes`` for a strided part)."""
    window = window_us(device, traffic)
    landed = min(float(prefetch_bytes), max(0.0, window - shared_us) * device.bytes_per_us)
    cost = device.cost()
    return Saving(
        window_us=window,
        transfer_us=prefetch_bytes / device.bytes_per_us,
        cost_us=cost.fixed_us.value + cost.per_mb_us.value * prefetch_bytes / MB,
        shared_us=shared_us,
        gain_us=delta_us_per_mb(device, tokens) * useful * landed / MB,
    )


def emits(device: DeviceProfile, saving: Saving) -> bool:
    """Whether a prefetch is worth emitting: on a GPU, a saving above the margin; on Ascend
    always (the user's ratios are honoured)."""
    return device.kind != "gpu" or saving.hidden_us > device.margin_us.value


def loss_note(device: DeviceProfile, hidden_us: float) -> str:
    """The skip note of a prefetch the gate drops (``predicted loss on NVIDIA H200: -1.4 µs``)."""
    word = "loss" if hidden_us <= 0 else "saving below the margin"
    return (
        f"predicted {word} on {device.label}: {hidden_us:+.2f} µs "
        f"(margin {device.margin_us.value:g} µs, {device.lowering}); force_prefetch emits it"
    )


# -- per step ---------------------------------------------------------------------------------


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
        lines.append(
            f"  not emitted: {len(dropped)} prefetches predicted not to pay (best "
            f"{worst:+.2f} µs); force_prefetch emits them"
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


__all__ = [
    "AUTO_ALIGN",
    "MB",
    "PROFILES",
    "Constant",
    "DeviceProfile",
    "LoweringCost",
    "ProfileError",
    "Saving",
    "StepShape",
    "WindowTraffic",
    "delta_us_per_mb",
    "emits",
    "gpu_profile",
    "hideable_bytes",
    "loss_note",
    "match_profile",
    "net_us",
    "predict",
    "profile",
    "render_prediction",
    "resolve_profile",
    "step_bound",
    "weight_bytes_per_step",
    "window_us",
]
