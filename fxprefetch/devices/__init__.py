"""The devices' room: what the devices of this process offer the pipeline (``setup``), their
profiles (``profiles``), the prediction model (``prediction``), the CUDA prefetch kernel
(``cuda_prefetch``) and Ascend's prefetch stream (``npu_streams``).

``fxprefetch.devices`` re-exports the setup, so ``from fxprefetch.devices import
DeviceSetup`` keeps working.
"""

from __future__ import annotations

from fxprefetch.devices.cuda_prefetch import CACHE_HINTS
from fxprefetch.devices.setup import (
    ASCEND_LOWERINGS,
    CUDA_LOWERINGS,
    NATIVE_POLICIES,
    DeviceSetup,
    device_setup,
    simulated_setup,
)

__all__ = [
    "ASCEND_LOWERINGS",
    "CACHE_HINTS",
    "CUDA_LOWERINGS",
    "NATIVE_POLICIES",
    "DeviceSetup",
    "device_setup",
    "simulated_setup",
]
