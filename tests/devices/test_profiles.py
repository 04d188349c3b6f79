"""fxprefetch/devices/profiles.py: the profile of the device a compile runs on, or of one
simulated where there is none."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from fxprefetch.devices import simulated_setup
from fxprefetch.devices.prediction import ProfileError
from fxprefetch.devices.profile_catalog import profile
from fxprefetch.devices.profiles import cuda_profile, default_cap, npu_profile


def test_simulated_setup_gives_the_device_cap_profile_and_policy():
    setup = simulated_setup("h200", {"meta", "cpu"})
    assert setup.profiles == {"meta": profile("h200"), "cpu": profile("h200")}
    # a GPU's default cap: window x bandwidth as the CUDA lowering derives it (11 MiB on H200)
    assert setup.caps == {"meta": 11 << 20, "cpu": 11 << 20}
    # Ascend: no device cap, so the guide's 18 MiB applies; vllm-ascend's policy
    ascend = simulated_setup("ascend-910b")
    assert ascend.caps == {} and ascend.profiles["meta"].sequence_parallel_rule
    assert default_cap(profile("ascend-a3")) is None
    with pytest.raises(ProfileError, match="unknown device profile"):
        simulated_setup("tpu")


def test_a_cuda_device_is_profiled_from_what_it_reports(monkeypatch):
    props = SimpleNamespace(
        name="NVIDIA H200",
        memory_clock_rate=3_125_000,
        memory_bus_width=6144,
        L2_cache_size=50 * 10**6,
        multi_processor_count=132,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    found = cuda_profile(0)
    assert found.name == "h200" and found.cores.value == 132
    assert found.hbm_bytes_per_s == pytest.approx(4.8e12, rel=0.001)


def test_an_ascend_profile_needs_torch_npu_and_a_known_name(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert npu_profile() is None
    fake = SimpleNamespace(npu=SimpleNamespace(get_device_name=lambda index: "Ascend910B3"))
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    assert npu_profile().name == "ascend-910b"
    fake.npu.get_device_name = lambda index: "Ascend310P"
    assert npu_profile() is None
