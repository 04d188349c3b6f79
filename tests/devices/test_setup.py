"""fxprefetch/devices/setup.py: what this process's devices offer the pipeline, decided once:
where prefetches reach hardware, where they are joined, their caps and profiles."""

from __future__ import annotations

import pytest

from fxprefetch import ops
from fxprefetch.devices import DeviceSetup, device_setup, simulated_setup
from fxprefetch.devices.profile_catalog import profile
from fxprefetch.devices.profiles import default_cap
from fxprefetch.errors import ProfileError


@pytest.fixture
def cpu_native_l2(monkeypatch):
    """The CPU standing in for a GPU with a native L2 prefetch (no kernel runs here)."""
    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *_: None)
    monkeypatch.setitem(
        ops._NATIVE_L2, "cpu", ops.NativeL2(lambda *_: None, lambda _: None, lambda _: None)
    )


@pytest.mark.parametrize(
    ("native_prefetch", "cudagraphs", "lowering", "native", "joined"),
    [
        ("auto", False, "hints (native_prefetch 'auto', no CUDA graphs)", False, False),
        ("never", True, "hints (native_prefetch 'never')", False, False),
        (
            "auto",
            True,
            "native L2 prefetch on the side stream, joined, cache hint none "
            "(native_prefetch 'auto', CUDA graphs)",
            True,
            True,
        ),
        (
            "always",
            False,
            "native L2 prefetch on the side stream, joined, cache hint none "
            "(native_prefetch 'always')",
            True,
            True,
        ),
    ],
)
def test_a_native_prefetch_is_used_where_it_pays(
    cpu_native_l2, native_prefetch, cudagraphs, lowering, native, joined
):
    setup = device_setup(native_l2=True, native_prefetch=native_prefetch, cudagraphs=cudagraphs)
    assert setup.lowering["cpu"] == lowering
    assert ("cpu" in setup.native, "cpu" in setup.l2) == (native, native)
    assert ("cpu" in setup.joins) == joined


def test_on_the_compute_stream_nothing_is_joined(cpu_native_l2):
    setup = device_setup(
        native_l2=True, native_prefetch="always", cuda_lowering="compute_stream",
        cache_hint="evict_last",
    )  # fmt: skip
    assert setup.l2 == {"cpu"} and setup.joins == frozenset()
    assert setup.lowering["cpu"].startswith(
        "native L2 prefetch on the compute stream, cache hint evict_last"
    )


def test_a_target_without_native_l2_lowers_nothing(cpu_native_l2):
    setup = device_setup(native_l2=False, native_prefetch="always")
    assert "cpu" in setup.native  # its prefetch op still reaches the (stand-in) hardware
    assert (setup.l2, setup.joins, setup.lowering) == (frozenset(), frozenset(), {})


def test_without_cuda_or_torch_npu_there_is_no_cap_and_no_profile():
    assert device_setup(native_l2=True, ascend=True) == DeviceSetup(
        native=frozenset(ops.native_prefetch_devices()),
        l2=frozenset(),
        lowering={},
    )


def test_a_simulated_device_has_its_profile_and_default_cap_on_each_device_type():
    h200 = profile("h200")
    setup = simulated_setup("h200", ("cpu", "meta"))
    assert setup.profiles == {"cpu": h200, "meta": h200}
    assert setup.caps == {"cpu": default_cap(h200), "meta": default_cap(h200)}
    with pytest.raises(ProfileError, match="unknown device profile"):
        simulated_setup("h9000")


def test_a_device_profile_for_a_device_not_present_warns_once_that_it_is_unused(
    monkeypatch, caplog
):
    """On the CPU, ``device_profile="h200"`` replaces no GPU's profile: the compile plans as
    without it, and one warning (per profile, per process) says so and why."""
    from fxprefetch.devices import setup as setup_module

    monkeypatch.setattr(setup_module, "_WARNED_UNUSED", set())
    monkeypatch.setattr(setup_module.torch.cuda, "is_available", lambda: False)
    h200 = profile("h200")
    with caplog.at_level("WARNING", logger="fxprefetch.devices.setup"):
        first = device_setup(native_l2=True, device_profile=h200)
        device_setup(native_l2=True, device_profile=h200)
        device_setup(native_l2=True, ascend=False, device_profile=profile("ascend-a3"))
    assert first.profiles == {} and first.requested_profile == h200
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith(
        "device_profile 'h200' (NVIDIA H200 SXM 141GB) is unused on this machine: no CUDA GPU"
    )
    assert "explain(..., device_profile=...)" in messages[0]
    assert "this compile's target does not run on an Ascend NPU" in messages[1]
