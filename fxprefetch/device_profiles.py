"""The device profile (``fxprefetch.prediction``) of the device a compile runs on, or of a
device simulated where there is none (``fxprefetch plan --device h200`` on the meta device;
tests that stand the CPU in for a GPU)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import replace

import torch

from fxprefetch.devices import DeviceSetup, device_setup
from fxprefetch.prediction import DeviceProfile, gpu_profile, match_profile, profile


def cuda_profile(device: torch.device | int | None = None) -> DeviceProfile:
    """The profile of a CUDA device here, from what it reports (bandwidth, L2, SMs)."""
    from fxprefetch.cuda_prefetch import peak_bandwidth

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


def default_cap(device: DeviceProfile) -> int | None:
    """The byte cap a compile for ``device`` uses where the config writes none: window x
    bandwidth on a GPU (as the CUDA lowering derives it), the guide's 18 MiB on Ascend."""
    if device.kind != "gpu":
        return None
    from fxprefetch.cuda_prefetch import cap_for

    return cap_for(device.hbm_bytes_per_s, device.l2_bytes)


def simulated_setup(name: str, device_types: Iterable[str] = ("meta",)) -> DeviceSetup:
    """A compile's setup as on the device profile ``name``, for weights on ``device_types``
    (the meta device of ``fxprefetch plan``; the CPU standing in for a GPU in tests): the
    device's default cap, window policy and predictions. Native prefetches stay those
    registered in this process, used as under CUDA graphs (``native_prefetch: "always"``)."""
    device = profile(name)
    cap = default_cap(device)
    types = sorted(set(device_types))
    return replace(
        device_setup("inductor", native_prefetch="always"),
        caps={t: cap for t in types} if cap is not None else {},
        profiles={t: device for t in types},
    )
