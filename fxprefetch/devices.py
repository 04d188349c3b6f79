"""What the devices of this process offer the pipeline: native prefetches, side-stream joins
and byte caps. One answer for every entry point (the backend, the vLLM pass), fixed when a
planner is made, so it also enters the compile-cache key."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fxprefetch.ops import native_join_devices, native_prefetch_devices
from fxprefetch.prediction import DeviceProfile


@dataclass(frozen=True)
class DeviceSetup:
    native: frozenset[str] = frozenset()  # device types whose prefetch reaches hardware
    joins: frozenset[str] = frozenset()  # ... from a side stream that must be joined
    caps: Mapping[str, int] = field(default_factory=dict)  # byte caps where none is written
    # device type -> profile: window policy (mlp.down, attention), "auto" sizes, predictions
    profiles: Mapping[str, DeviceProfile] = field(default_factory=dict)


@functools.cache
def _native_cuda_prefetch() -> bool:
    """Register the CUDA L2 prefetch once, where CUDA, Triton and sm_80+ are present."""
    from fxprefetch.cuda_prefetch import register

    return register()


def device_setup(target: str) -> DeviceSetup:
    """The setup for ``target``: the inductor target turns on the CUDA prefetch where the
    machine has one, with its window x bandwidth cap and the GPU's profile (window policy,
    "auto" sizes, predictions: ``fxprefetch.device_profiles``); the npu target gets the
    Ascend profile where torch_npu names a known device."""
    caps: dict[str, int] = {}
    profiles: dict[str, DeviceProfile] = {}
    if target == "inductor" and torch.cuda.is_available() and _native_cuda_prefetch():
        from fxprefetch.cuda_prefetch import default_cap
        from fxprefetch.device_profiles import cuda_profile

        caps["cuda"] = default_cap()
        profiles["cuda"] = cuda_profile()
    if target == "npu":
        from fxprefetch.device_profiles import npu_profile

        found = npu_profile()
        if found is not None:
            profiles["npu"] = found
    return DeviceSetup(
        frozenset(native_prefetch_devices()), frozenset(native_join_devices()), caps, profiles
    )
