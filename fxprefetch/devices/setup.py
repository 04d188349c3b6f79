"""What the devices of this process offer the pipeline: native prefetches, side-stream joins
and byte caps. One answer for every entry point (the backend, the vLLM pass), fixed when a
planner is made, so it also enters the compile-cache key.

Where a native prefetch pays (``native_prefetch``):

- ``"auto"`` (default): native where the compiled graph is replayed as a CUDA graph
  (inductor's ``reduce-overhead``, vLLM's CUDA graphs). Elsewhere each prefetch and join is
  a host call into Python (about 25-40 µs each on a GPU, more than a decode window hides):
  there prefetches stay hints, left out of the compiled code like on the CPU.
- ``"always"`` / ``"never"``: native, or hints, whatever the mode.

``cuda_lowering``: ``"side_stream"`` (default: a fork onto a side stream, joined before the
linear) or ``"compute_stream"`` (a fire-and-forget kernel on the compute stream, no join);
``cache_hint``: the L2 hint of the prefetch instruction (``"none"`` or ``"evict_last"``).
``benchmarks/probe_gpu_kernel.py`` measures both choices.

``ascend_lowering`` (the npu target, graphs captured op by op): ``"side_stream"`` (default:
each prefetch forked onto the prefetch stream, joined before its linear) or ``"in_stream"``
(``npu_prefetch`` in the captured compute stream, for experiments). GE graphs always get
``Cmo``. See ``docs/ascend.md``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from fxprefetch.devices.prediction import DeviceProfile
from fxprefetch.devices.profile_catalog import resolve_profile
from fxprefetch.devices.profiles import cuda_profile, default_cap, npu_profile
from fxprefetch.ops import native_l2_devices, native_prefetch_devices
from fxprefetch.validation import expect_choice

log = logging.getLogger(__name__)

NATIVE_POLICIES = ("auto", "always", "never")
CUDA_LOWERINGS = ("side_stream", "compute_stream")
ASCEND_LOWERINGS = ("side_stream", "in_stream")


@dataclass(frozen=True)
class DeviceSetup:
    native: frozenset[str] = frozenset()  # device types whose prefetch reaches hardware
    joins: frozenset[str] = frozenset()  # ... from a side stream that must be joined
    caps: Mapping[str, int] = field(default_factory=dict)  # byte caps where none is written
    l2: frozenset[str] = frozenset()  # native devices lowered to fxprefetch.prefetch_native
    cache_hint: str = "none"
    lowering: Mapping[str, str] = field(default_factory=dict)  # device -> what it uses, why
    # device type -> profile: window policy (mlp.down, attention), "auto" sizes, predictions
    profiles: Mapping[str, DeviceProfile] = field(default_factory=dict)
    ascend_lowering: str = "side_stream"  # captured Ascend graphs: or "in_stream"
    # the profile the options asked for (``device_profile``), kept even where no device here
    # uses it, so that it is part of the compile-cache key
    requested_profile: DeviceProfile | None = None


@functools.cache
def _native_cuda_prefetch() -> bool:
    """Register the CUDA L2 prefetch once, where CUDA, Triton and sm_80+ are present."""
    from fxprefetch.devices.cuda_prefetch import register

    return register()


def _npu_streams() -> bool:
    """Register the Ascend prefetch stream where torch_npu's stream runtime is loaded."""
    from fxprefetch.devices.npu_streams import register_npu_streams

    return register_npu_streams()


#: the environment variable that sets ``ascend_lowering`` where no backend option can
#: (vLLM's route: ``fxprefetch.vllm.plugin``)
ASCEND_LOWERING_ENV = "FXPREFETCH_ASCEND_LOWERING"


def ascend_lowering_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``ascend_lowering`` from ``$FXPREFETCH_ASCEND_LOWERING`` (unset or empty: the
    default), checked like the backend option (a ``ConfigError`` naming the variable)."""
    value = (os.environ if environ is None else environ).get(ASCEND_LOWERING_ENV)
    return expect_choice(value or ASCEND_LOWERINGS[0], ASCEND_LOWERING_ENV, ASCEND_LOWERINGS)


def device_setup(
    *,
    native_l2: bool = False,
    ascend: bool = False,
    cudagraphs: bool = False,
    native_prefetch: str = "auto",
    cuda_lowering: str = "side_stream",
    cache_hint: str = "none",
    ascend_lowering: str = "side_stream",
    device_profile: DeviceProfile | None = None,
) -> DeviceSetup:
    """The setup for a target (its :class:`fxprefetch.targets.TargetSpec` says which flags):

    ``native_l2``: its pipeline lowers to native L2 prefetches (inductor's): the CUDA prefetch
    is turned on where the machine has one (with its window x bandwidth cap and the GPU's
    profile: window policy, "auto" sizes, predictions, ``fxprefetch.devices.profiles``) and
    where it pays (see the module docstring); ``cudagraphs``: the compiled graph is replayed
    as a CUDA graph. ``ascend``: its graphs run on Ascend: the NPU's profile where torch_npu
    names a known device, and its prefetch stream where torch_npu is loaded
    (``ascend_lowering``, see the module docstring). ``device_profile``: the profile to
    predict with on this process's GPU or NPU instead of the built-in one its name matches
    (a calibrated file)."""
    if ascend_lowering not in ASCEND_LOWERINGS:
        raise ValueError(
            f"ascend_lowering: expected one of {list(ASCEND_LOWERINGS)}, got {ascend_lowering!r}"
        )
    caps: dict[str, int] = {}
    profiles: dict[str, DeviceProfile] = {}
    if native_l2 and torch.cuda.is_available() and _native_cuda_prefetch():
        here = cuda_profile()
        cap = default_cap(here)
        if cap is not None:
            caps["cuda"] = cap
        found = here if device_profile is None else device_profile
        profiles["cuda"] = found.with_lowering(cuda_lowering) if found.kind == "gpu" else found
    if ascend:
        found = npu_profile() if device_profile is None else device_profile
        if found is not None:
            profiles["npu"] = found
        if ascend_lowering == "side_stream":
            _npu_streams()
    if device_profile is not None and not profiles:
        _warn_unused_profile(device_profile, native_l2=native_l2, ascend=ascend)
    native = set(native_prefetch_devices())
    l2 = native_l2_devices() & native if native_l2 else set()
    use = native_prefetch == "always" or (native_prefetch == "auto" and cudagraphs)
    why = f"native_prefetch {native_prefetch!r}" + (
        f", {'' if cudagraphs else 'no '}CUDA graphs" if native_prefetch == "auto" else ""
    )
    stream = "side stream, joined" if cuda_lowering == "side_stream" else "compute stream"
    lowering = {}
    for device in sorted(l2):
        if use:
            hint = f"cache hint {cache_hint}"
            lowering[device] = f"native L2 prefetch on the {stream}, {hint} ({why})"
        else:
            lowering[device] = f"hints ({why})"
            native.discard(device)
    l2 = l2 & native
    joins = l2 if cuda_lowering == "side_stream" else set()
    return DeviceSetup(
        frozenset(native),
        frozenset(joins),
        caps,
        frozenset(l2),
        cache_hint,
        lowering,
        profiles,
        ascend_lowering,
        device_profile,
    )


def _warn_unused_profile(device: DeviceProfile, *, native_l2: bool, ascend: bool) -> None:
    """One warning per profile and process: ``device_profile`` only replaces the profile of
    a GPU or NPU that this compile runs on; it simulates no device."""
    key = (device.name, device.origin)
    if key in _WARNED_UNUSED:
        return
    _WARNED_UNUSED.add(key)
    if device.kind == "gpu":
        why = (
            "this compile's target has no native L2 prefetch"
            if not native_l2
            else "no CUDA GPU with Triton's L2 prefetch (sm_80+) is present"
        )
    else:
        why = "this compile's target does not run on an Ascend NPU"
    log.warning(
        "device_profile %r (%s) is unused on this machine: %s. The option replaces the "
        "profile of the GPU or NPU a compile runs on; to plan as on that device without it, "
        "use explain(..., device_profile=...) or `fxprefetch plan --device`.",
        device.name,
        device.label,
        why,
    )


#: the profiles already warned about as unused (one warning each per process)
_WARNED_UNUSED: set[tuple[str, str]] = set()


def simulated_setup(
    name: str | DeviceProfile, device_types: Iterable[str] = ("meta",)
) -> DeviceSetup:
    """A compile's setup as on the device profile ``name``, for weights on ``device_types``
    (the meta device of ``fxprefetch plan``; the CPU standing in for a GPU in tests): the
    device's default cap, window policy and predictions. Native prefetches stay those
    registered in this process, used as under CUDA graphs (``native_prefetch: "always"``).
    ``name``: a built-in profile's name, a profile file's path, or a profile."""
    device = resolve_profile(name) if isinstance(name, str) else name
    cap = default_cap(device)
    types = sorted(set(device_types))
    return replace(
        device_setup(native_l2=True, native_prefetch="always"),
        caps={t: cap for t in types} if cap is not None else {},
        profiles={t: device for t in types},
        requested_profile=device,
    )
