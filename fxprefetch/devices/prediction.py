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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fxprefetch.devices.profile_file import (
    Constant,
    DeviceProfile,
    LoweringCost,
    ProfileError,
)

if TYPE_CHECKING:
    pass

MB = 10**6
MiB = 1 << 20
AUTO_ALIGN = 4096  # "auto" sizes are whole 4 KiB pages


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
    size = landing_bytes(device, traffic, shared_us)
    if size <= 0 or net_us(device, size, size, tokens, useful) <= 0:
        return 0
    return size


def landing_bytes(device: DeviceProfile, traffic: WindowTraffic, shared_us: float = 0.0) -> int:
    """What lands in what is left of the window, in whole 4 KiB pages (0 where nothing is
    left), whether or not it pays."""
    free_us = window_us(device, traffic) - shared_us
    if free_us <= 0:
        return 0
    return max(0, math.floor(free_us * device.bytes_per_us / AUTO_ALIGN) * AUTO_ALIGN)


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


__all__ = [
    "AUTO_ALIGN",
    "MB",
    "Constant",
    "DeviceProfile",
    "LoweringCost",
    "ProfileError",
    "Saving",
    "WindowTraffic",
    "delta_us_per_mb",
    "emits",
    "hideable_bytes",
    "loss_note",
    "net_us",
    "predict",
    "window_us",
]
