"""A prediction model of what each prefetch hides. A **model** from public specs, never a
measurement: ``benchmarks/bench_gpu_prefetch.py`` prints it beside the measured speed-up, so
one GPU run validates or corrects it.

For one prefetch of ``b`` bytes behind a window whose ops move ``w`` bytes in ``k`` kernels
(the pass reads ``w`` from the tensor sizes, ``meta['val']``, on the FX graph; see
``passes/window_cost.py``), on a device of HBM bandwidth ``B``::

    window_us   = w / B + k * kernel_us        # the window's time
    transfer_us = b / B                        # the prefetch's own time
    hidden_us   = min(window_us - shared_us, transfer_us) - prefetch_cost_us

Prefetches behind one window (q, k and v behind one norm) share it: ``shared_us`` is the
transfer time of those before it, so together they hide at most the window.

``kernel_us`` (the fixed time of one small kernel in a replayed graph) and
``prefetch_cost_us`` (what one prefetch costs the compute stream) are assumptions of the
model, not specs; the micro-benchmark's ``fork`` arm measures the second. The model assumes
the window leaves HBM idle: a window that is itself bandwidth-bound (attention over a long
KV cache at a large batch) hides less than it predicts.

``"max_prefetch_bytes": "auto"`` (or a role's ratio ``"auto"``) sizes a prefetch to what its
window can hide: ``(window_us - shared_us) * B`` bytes, and none where that time does not
exceed the prefetch's cost.

Device profiles also carry the window policy of their kind: on Ascend, ``mlp.down`` needs
sequence parallelism (vllm-ascend's rule) and attention windows are off; on a GPU,
``down_proj`` behind SiLU-and-mul is an ordinary vector window and attention is a window
for ``o_proj`` wherever fork and join stay in one graph.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fxprefetch.plan import PrefetchPlan

MB = 10**6
MiB = 1 << 20

#: Model assumptions (not specs), per device kind.
GPU_KERNEL_US = 2.5  # one small vector kernel in a CUDA-graph replay (launch, ramp, tail)
GPU_PREFETCH_COST_US = 1.0  # a one-block prefetch kernel with its fork and join, replayed
NPU_KERNEL_US = 3.0  # one vector op in a GE graph (an assumption: not measured here)
NPU_PREFETCH_COST_US = 1.0  # one Cmo task (an assumption: not measured here)
AUTO_ALIGN = 4096  # "auto" sizes are whole 4 KiB pages


@dataclass(frozen=True)
class DeviceProfile:
    """What the model knows of one device: public specs plus two labelled assumptions."""

    name: str  # the CLI's name: "h200"
    label: str  # "NVIDIA H200 SXM 141GB"
    kind: Literal["gpu", "npu"]
    hbm_bytes_per_s: float  # peak HBM bandwidth (spec)
    l2_bytes: int  # L2 (GPU) or L2 cache (Ascend) size (spec)
    cores: int  # SMs (GPU) or AI cores (Ascend) (spec)
    kernel_us: float  # model assumption
    prefetch_cost_us: float  # model assumption
    source: str  # where the spec numbers come from

    @property
    def bytes_per_us(self) -> float:
        return self.hbm_bytes_per_s / 1e6

    @property
    def sequence_parallel_rule(self) -> bool:
        """Whether vllm-ascend's rule applies: ``mlp.down`` only with sequence parallelism."""
        return self.kind == "npu"

    @property
    def attention_windows(self) -> bool:
        """Whether attention is a window by default (where fork and join stay in one graph)."""
        return self.kind == "gpu"

    def key(self) -> tuple:
        """Every value that changes a plan, for compile-cache keys."""
        return (
            self.name,
            self.kind,
            self.hbm_bytes_per_s,
            self.l2_bytes,
            self.kernel_us,
            self.prefetch_cost_us,
        )


def _gpu(name: str, label: str, tb_per_s: float, l2_mb: int, sms: int, source: str):
    return DeviceProfile(
        name,
        label,
        "gpu",
        tb_per_s * 1e12,
        l2_mb * MB,
        sms,
        GPU_KERNEL_US,
        GPU_PREFETCH_COST_US,
        source,
    )


def _npu(name: str, label: str, tb_per_s: float, l2_mb: int, cores: int, source: str):
    return DeviceProfile(
        name,
        label,
        "npu",
        tb_per_s * 1e12,
        l2_mb * MB,
        cores,
        NPU_KERNEL_US,
        NPU_PREFETCH_COST_US,
        source,
    )


#: Public specs. GPUs: NVIDIA's datasheets for bandwidth; L2 and SM counts from NVIDIA's
#: architecture whitepapers (Ampere GA100: 40 MB L2, 108 SMs on A100; Hopper GH100: 50 MB
#: L2 and 132 SMs on the SXM5 parts, H100 and H200 alike; Blackwell B200: 148 SMs and
#: 126 MB L2 as reported by independent measurements, chipsandcheese 2025). Ascend: Huawei
#: publishes HBM capacity, not bandwidth or L2, per chip; the figures below are the ones
#: commonly cited for Atlas A2 (910B) and, per die, Atlas A3 (910_93, two dies, each a
#: device to torch_npu), and are marked approximate.
PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        _gpu(
            "a100",
            "NVIDIA A100 SXM4 80GB",
            2.039,
            40,
            108,
            "A100 datasheet: HBM2e 2,039 GB/s; A100 whitepaper: 40 MB L2, 108 SMs",
        ),
        _gpu(
            "h100",
            "NVIDIA H100 SXM5 80GB",
            3.35,
            50,
            132,
            "H100 datasheet: HBM3 3.35 TB/s; Hopper whitepaper: 50 MB L2, 132 SMs",
        ),
        _gpu(
            "h200",
            "NVIDIA H200 SXM 141GB",
            4.8,
            50,
            132,
            "H200 datasheet: HBM3e 4.8 TB/s; same GH100 as H100 SXM5: 50 MB L2, 132 SMs",
        ),
        _gpu(
            "b200",
            "NVIDIA B200 192GB",
            8.0,
            126,
            148,
            "DGX B200 datasheet: HBM3e 8 TB/s per GPU; 126 MB L2 and 148 SMs as measured "
            "(chipsandcheese, 2025)",
        ),
        _npu(
            "ascend-910b",
            "Huawei Ascend 910B (Atlas A2)",
            1.6,
            192,
            24,
            "approximate: 64 GB HBM2e at about 1.6 TB/s, 192 MB L2, 24 AI cores "
            "(commonly cited figures; Huawei publishes no bandwidth)",
        ),
        _npu(
            "ascend-a3",
            "Huawei Ascend 910_93 die (Atlas A3)",
            1.6,
            192,
            24,
            "approximate, per die (a device to torch_npu): 64 GB HBM at about 1.6 TB/s, "
            "192 MB L2, 24 AI cores (commonly cited figures)",
        ),
    )
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


def match_profile(device_name: str) -> DeviceProfile | None:
    """The profile of a device by its reported name (``NVIDIA H200``, ``Ascend910B2``)."""
    for pattern, name in _NAME_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return PROFILES[name]
    return None


def gpu_profile(device_name: str, bytes_per_s: float, l2_bytes: int, sms: int) -> DeviceProfile:
    """The profile of a GPU present here: its reported bandwidth, L2 and SMs (an H100 PCIe is
    no H100 SXM), with the name and assumptions of the matching profile."""
    base = match_profile(device_name)
    if base is None or base.kind != "gpu":
        base = _gpu("gpu", device_name, 0.0, 0, 0, "reported by the device")
    return replace(
        base,
        label=device_name,
        hbm_bytes_per_s=bytes_per_s,
        l2_bytes=l2_bytes,
        cores=sms,
        source="reported by the device (torch.cuda.get_device_properties)",
    )


@dataclass(frozen=True)
class WindowTraffic:
    """What a window moves: bytes its ops read and write, and the kernels it launches."""

    nbytes: int
    kernels: int


def window_us(device: DeviceProfile, traffic: WindowTraffic) -> float:
    """The window's time: its bytes at peak bandwidth, plus a fixed time per kernel."""
    return traffic.nbytes / device.bytes_per_us + traffic.kernels * device.kernel_us


def hideable_bytes(device: DeviceProfile, traffic: WindowTraffic, shared_us: float = 0.0) -> int:
    """The bytes a prefetch can load in what is left of the window ("auto" sizes): none
    where that time does not exceed the prefetch's cost."""
    free_us = window_us(device, traffic) - shared_us
    if free_us <= device.prefetch_cost_us:
        return 0
    return math.floor(free_us * device.bytes_per_us / AUTO_ALIGN) * AUTO_ALIGN


@dataclass(frozen=True)
class Saving:
    """The model's numbers for one prefetch (µs)."""

    window_us: float
    transfer_us: float
    cost_us: float
    shared_us: float = 0.0  # the window's time that earlier prefetches behind it take

    @property
    def hidden_us(self) -> float:
        """``min(window - shared, transfer) - cost``: negative where it costs more."""
        return min(max(0.0, self.window_us - self.shared_us), self.transfer_us) - self.cost_us


def predict(
    device: DeviceProfile, traffic: WindowTraffic, prefetch_bytes: int, shared_us: float = 0.0
) -> Saving:
    return Saving(
        window_us=window_us(device, traffic),
        transfer_us=prefetch_bytes / device.bytes_per_us,
        cost_us=device.prefetch_cost_us,
        shared_us=shared_us,
    )


def step_floor_us(device: DeviceProfile, weight_bytes: int) -> float:
    """A decode step's floor: every weight read once at peak bandwidth."""
    return weight_bytes / device.bytes_per_us


def speedup_bound(floor_us: float, saved_us: float) -> float:
    """The speed-up if the step took its floor and the saving came off it: an upper bound."""
    return floor_us / (floor_us - saved_us) if floor_us > saved_us else math.inf


def weight_bytes_per_step(plans: Sequence[PrefetchPlan], layers_total: int | None = None) -> int:
    """Bytes of every weight the plans' linears read once per step; with ``layers_total``,
    the built decoder layers' bytes scaled to that many layers (identical layers)."""
    from fxprefetch.plan import SkipReason

    records = [
        r
        for p in plans
        for r in p.records
        if r.weight_bytes > 0 and r.skip_reason != SkipReason.NOT_A_WEIGHT
    ]
    in_layers = [r for r in records if r.layer is not None]
    other = sum(r.weight_bytes for r in records if r.layer is None)
    layers = {r.layer for r in in_layers}
    per_layer = sum(r.weight_bytes for r in in_layers) / max(1, len(layers))
    scale = layers_total if layers_total is not None and layers else len(layers)
    return round(per_layer * scale) + other


def render_prediction(
    plans: Sequence[PrefetchPlan], device: DeviceProfile, layers_total: int | None = None
) -> str:
    """The predicted saving per layer and per step, labelled a model (``fxprefetch plan
    --device``). ``layers_total``: the model's decoder layers, where fewer were built."""
    from fxprefetch.plan import predicted_saving

    head = (
        f"prediction on {device.name} ({device.label}: "
        f"{device.hbm_bytes_per_s / 1e12:.2f} TB/s HBM, {device.l2_bytes / MB:g} MB L2). "
        "A model from public specs, not a measurement;\n"
        f"  assumed: {device.kernel_us:g} µs per window kernel, "
        f"{device.prefetch_cost_us:g} µs per prefetch; hidden = min(window left, transfer) "
        "- cost"
    )
    summary = predicted_saving(plans)
    if summary is None:
        return head + "\n  no prefetch has a prediction"
    done = [r for p in plans for r in p.records if r.prefetched and r.prediction is not None]
    lines = [head]
    per_layer = summary.per_layer_us
    if per_layer:
        values = list(per_layer.values())
        layers = list(per_layer)
        count = sum(1 for r in done if r.layer is not None) / len(layers)
        mib = sum(r.prefetch_bytes for r in done if r.layer is not None) / len(layers) / MiB
        low, high = min(values), max(values)
        hides = f"{low:.2f} to {high:.2f} µs" if f"{low:.2f}" != f"{high:.2f}" else f"{low:.2f} µs"
        which = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
        lines.append(f"  per layer: {count:g} prefetches, {mib:.1f} MiB, hides {hides} ({which})")
    built = len(per_layer)
    step = summary.per_step_us
    line = f"  per step: {step:.2f} µs"
    if layers_total is not None and built and layers_total > built:
        full = step - summary.other_us
        full = full / built * layers_total + summary.other_us
        line += f" over {built} built layers; {full:.1f} µs for all {layers_total} layers"
        step = full
    lines.append(line)
    floor = step_floor_us(device, weight_bytes_per_step(plans, layers_total))
    if floor > 0:
        lines.append(
            f"  step floor (every weight read once at peak bandwidth): {floor:.1f} µs; "
            f"speed-up at most {speedup_bound(floor, step):.3f}x"
        )
    return "\n".join(lines)
