"""fxprefetch/devices/prediction.py: device profiles from public specs, and the model's arithmetic
(a model, never a measurement)."""

from __future__ import annotations

import math

import pytest

from fxprefetch.devices.prediction import (
    PROFILES,
    WindowTraffic,
    gpu_profile,
    hideable_bytes,
    match_profile,
    predict,
    profile,
    render_prediction,
    speedup_bound,
    window_us,
)
from fxprefetch.plan import LinearRecord, PredictedSaving, PrefetchPlan


@pytest.mark.parametrize(
    ("name", "tb_per_s", "l2_mb", "kind"),
    [
        ("a100", 2.039, 40, "gpu"),
        ("h100", 3.35, 50, "gpu"),
        ("h200", 4.8, 50, "gpu"),
        ("b200", 8.0, 126, "gpu"),
        ("ascend-910b", 1.6, 192, "npu"),
        ("ascend-a3", 1.6, 192, "npu"),
    ],
)
def test_profiles_carry_the_public_specs_and_their_window_policy(name, tb_per_s, l2_mb, kind):
    device = profile(name)
    assert device.hbm_bytes_per_s == tb_per_s * 1e12 and device.l2_bytes == l2_mb * 10**6
    assert device.kind == kind and device.source
    # Ascend keeps vllm-ascend's rule for mlp.down and no attention windows; GPUs the reverse
    assert device.sequence_parallel_rule is (kind == "npu")
    assert device.attention_windows is (kind == "gpu")


def test_profiles_are_matched_by_device_name_and_unknown_names_are_refused():
    assert match_profile("NVIDIA H200").name == "h200"
    assert match_profile("NVIDIA H100 80GB HBM3").name == "h100"
    assert match_profile("NVIDIA A100-SXM4-80GB").name == "a100"
    assert match_profile("NVIDIA B200").name == "b200"
    assert match_profile("Ascend910B2").name == "ascend-910b"
    assert match_profile("Ascend910_9391").name == "ascend-a3"
    assert match_profile("NVIDIA GeForce RTX 4090") is None
    with pytest.raises(KeyError, match=r"unknown device profile 'h300'.*h200"):
        profile("h300")
    assert set(PROFILES) == {"a100", "h100", "h200", "b200", "ascend-910b", "ascend-a3"}


def test_a_gpu_present_is_modelled_with_what_it_reports():
    # an H100 PCIe is no H100 SXM: its own bandwidth, L2 and SMs, H100's assumptions
    pcie = gpu_profile("NVIDIA H100 PCIe", 2.0e12, 50 * 10**6, 114)
    assert pcie.name == "h100" and pcie.hbm_bytes_per_s == 2.0e12 and pcie.cores == 114
    unknown = gpu_profile("Some GPU", 1e12, 10**6, 10)
    assert unknown.kind == "gpu" and unknown.attention_windows and unknown.label == "Some GPU"


def test_the_model_arithmetic():
    h200 = profile("h200")  # 4.8e6 bytes per µs
    traffic = WindowTraffic(nbytes=4_800_000, kernels=2)  # 1 µs of bytes, 2 kernels
    assert window_us(h200, traffic) == pytest.approx(1 + 2 * h200.kernel_us)
    small = predict(h200, traffic, 2_400_000)  # 0.5 µs of transfer: all of it hidden
    assert small.hidden_us == pytest.approx(0.5 - h200.prefetch_cost_us)
    big = predict(h200, traffic, 48_000_000)  # 10 µs of transfer: the window bounds it
    assert big.hidden_us == pytest.approx(window_us(h200, traffic) - h200.prefetch_cost_us)
    # a second prefetch behind the same window gets what the first left of it
    left = predict(h200, traffic, 48_000_000, shared_us=window_us(h200, traffic) - 0.25)
    assert left.hidden_us == pytest.approx(0.25 - h200.prefetch_cost_us)


def test_auto_sizes_fill_what_is_left_of_the_window_and_nothing_below_the_cost():
    h200 = profile("h200")
    traffic = WindowTraffic(nbytes=0, kernels=1)
    size = hideable_bytes(h200, traffic)
    assert size % 4096 == 0 and size <= h200.kernel_us * h200.bytes_per_us < size + 4096
    assert hideable_bytes(h200, traffic, shared_us=h200.kernel_us - h200.prefetch_cost_us) == 0
    assert hideable_bytes(h200, WindowTraffic(0, 0)) == 0


def test_the_plan_sums_predictions_per_layer_and_per_step_and_says_it_is_a_model():
    def record(layer, hidden):
        saving = PredictedSaving("h200", 1024, 1, 2.5, 0.0, 2.0, 1.0, hidden)
        return LinearRecord(
            node=f"mm{layer}{hidden}",
            op="aten::mm",
            module=None,
            weight=f"layers.{layer}.w",
            layer=layer,
            role="attn.qkv",
            weight_shape=(1024, 1024),
            dtype="torch.bfloat16",
            weight_bytes=64 << 20,
            prefetch_bytes=1 << 20,
            prefetch_node="pf",
            prediction=saving,
        )

    plan = PrefetchPlan(records=[record(0, 1.0), record(0, 0.5), record(1, 1.5)])
    predicted = plan.predicted()
    assert predicted.per_layer_us == {0: 1.5, 1: 1.5} and predicted.per_step_us == 3.0
    assert "(model)" in plan.summary_line()
    again = PrefetchPlan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict()
    assert again.records[0].prediction == record(0, 1.0).prediction
    text = render_prediction([plan], profile("h200"), layers_total=32)
    assert "not a measurement" in text and "hides 1.50 µs (layers 0-1)" in text
    assert "48.0 µs for all 32 layers" in text  # 1.5 µs x 32
    floor = 32 * (3 * (64 << 20) / 2) / profile("h200").bytes_per_us  # the mean layer, x 32
    assert f"{floor:.1f} µs" in text
    assert f"{speedup_bound(floor, 48.0):.3f}x" in text
    assert speedup_bound(1.0, 2.0) == math.inf
