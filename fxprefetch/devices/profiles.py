"""The device profile (``fxprefetch.devices.prediction``) of the device a compile runs on, and the
byte cap a profile implies (``fxprefetch.devices.simulated_setup`` builds a whole setup from
a profile where there is no such device)."""

from __future__ import annotations

import sys
from typing import Any

import torch

from fxprefetch.config import ConfigError
from fxprefetch.devices.prediction import DeviceProfile, ProfileError
from fxprefetch.devices.profile_catalog import gpu_profile, match_profile, resolve_profile


def cuda_profile(device: torch.device | int | None = None) -> DeviceProfile:
    """The profile of a CUDA device here, from what it reports (bandwidth, L2, SMs)."""
    from fxprefetch.devices.cuda_prefetch import peak_bandwidth

    props = torch.cuda.get_device_properties(
        device if device is not None else torch.cuda.current_device()
    )
    return gpu_profile(
        props.name, peak_bandwidth(props), props.L2_cache_size, props.multi_processor_count
    )


def npu_profile() -> DeviceProfile | None:
    """The Ascend profile matching torch_npu's device name, where torch_npu is loaded."""
    torch_npu = sys.modules.get("torch_npu")
    if torch_npu is None:
        return None
    try:
        name = torch_npu.npu.get_device_name(0)
    except Exception:  # no device, or an older torch_npu: no profile, no prediction
        return None
    found = match_profile(str(name))
    return found if found is not None and found.kind == "npu" else None


# The cap rule on a GPU: a prefetch hides at most window x bandwidth bytes. A norm or
# activation window before a decode linear lasts about 2.5 µs; at H100's 3.35 TB/s that is
# 8 MiB (the Ascend guide's 18 MiB would run far past the window).
# benchmarks/bench_gpu_prefetch.py sweeps the cap to check it.
WINDOW_US = 2.5
MiB = 1 << 20


def cap_for(bytes_per_s: float, l2_bytes: int) -> int:
    """``WINDOW_US`` of bandwidth in whole MiB (at least 1), and at most a quarter of L2."""
    window_bytes = max(1, round(WINDOW_US * 1e-6 * bytes_per_s / MiB)) * MiB
    return min(window_bytes, max(MiB, l2_bytes // 4 // MiB * MiB))


def default_cap(device: DeviceProfile) -> int | None:
    """The one cap rule: the byte cap a compile for ``device`` uses where the config writes
    none: window x bandwidth on a GPU (a GPU here: :func:`cuda_profile`, from what it
    reports), the config's default (the guide's 18 MiB) on Ascend (None)."""
    if device.kind != "gpu":
        return None
    return cap_for(device.hbm_bytes_per_s, int(device.l2_bytes.value))


def device_profile_option(value: Any, path: str = "options.device_profile") -> DeviceProfile:
    """A ``device_profile`` value (a built-in name, a profile file's path, or a profile)."""
    if isinstance(value, DeviceProfile):
        return value
    if not isinstance(value, str):
        raise ConfigError(
            path, f"expected a device profile name or a file path, got {type(value).__name__}"
        )
    try:
        return resolve_profile(value)
    except ProfileError as exc:
        raise ConfigError(path, str(exc)) from None
