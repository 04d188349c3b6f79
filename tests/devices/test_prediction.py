"""fxprefetch/devices/prediction.py: device profiles from public specs, and the model's arithmetic
(a model, never a measurement)."""

from __future__ import annotations

import math

import pytest

from fxprefetch.devices.prediction import (
    WindowTraffic,
    delta_us_per_mb,
    hideable_bytes,
    predict,
    window_us,
)
from fxprefetch.devices.profile_catalog import PROFILES, gpu_profile, match_profile, profile
from fxprefetch.devices.profile_file import PROVENANCE_KINDS
from fxprefetch.plan import LinearRecord, PredictedSaving, PrefetchPlan
from fxprefetch.plan.predicted_step import (
    StepShape,
    render_prediction,
    speedup_bound,
    step_bound,
    weight_bytes_per_step,
)


@pytest.mark.parametrize(
    ("name", "peak_tb_per_s", "kind"),
    [
        ("a100", 2.039, "gpu"),
        ("h100", 3.35, "gpu"),
        ("h200", 4.8, "gpu"),
        ("b200", 8.0, "gpu"),
        ("ascend-910b", 1.6, "npu"),
        ("ascend-a3", 1.6, "npu"),
    ],
)
def test_profiles_carry_their_constants_with_provenance_and_window_policy(
    name, peak_tb_per_s, kind
):
    device = profile(name)
    assert device.hbm_bytes_per_s == pytest.approx(peak_tb_per_s * 1e12) and device.kind == kind
    for key, const in device.constants().items():
        assert const.kind in PROVENANCE_KINDS and const.source, key
    # Ascend keeps vllm-ascend's rule for mlp.down and no attention windows; GPUs the reverse
    assert device.sequence_parallel_rule is (kind == "npu")
    assert device.attention_windows is (kind == "gpu")
    assert device.lowering == ("side_stream" if kind == "gpu" else "ascend_cmo")


def test_only_the_h200_is_measured_the_others_derived_and_ascend_fitted():
    kinds = {n: {c.kind for c in p.constants().values()} for n, p in PROFILES.items()}
    assert "measured" in kinds["h200"] and "fitted" in kinds["h200"]
    assert "derived" not in kinds["h200"]
    for name in ("a100", "h100", "b200"):
        assert "measured" not in kinds[name] and "derived" in kinds[name]
    assert profile("ascend-a3").delta_1.kind == "fitted"
    assert "112 -> 102 ms" in profile("ascend-a3").delta_1.source


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
    # an H100 PCIe is no H100 SXM: its own bandwidth, L2 and SMs, H100's constants
    pcie = gpu_profile("NVIDIA H100 PCIe", 2.0e12, 50 * 10**6, 114)
    assert pcie.name == "h100" and pcie.hbm_bytes_per_s == 2.0e12 and pcie.cores.value == 114
    assert pcie.cores.kind == "measured"
    unknown = gpu_profile("Some GPU", 1e12, 10**6, 10)
    assert unknown.kind == "gpu" and unknown.attention_windows and unknown.label == "Some GPU"
    assert unknown.delta_1.kind == "derived"


def test_the_model_arithmetic():
    h200 = profile("h200")
    b = h200.bytes_per_us
    cost = h200.cost()
    traffic = WindowTraffic(nbytes=round(b), kernels=2)  # 1 µs of bytes, 2 kernels
    window = 1 + 2 * h200.kernel_us.value
    assert window_us(h200, traffic) == pytest.approx(window)
    d1 = h200.delta_1.value
    small = predict(h200, traffic, 2_000_000, tokens=1)  # lands whole
    assert small.gain_us == pytest.approx(d1 * 2)
    assert small.cost_us == pytest.approx(cost.fixed_us.value + cost.per_mb_us.value * 2)
    assert small.hidden_us == pytest.approx(small.gain_us - small.cost_us)
    big = predict(h200, traffic, 100_000_000, tokens=1)  # the window bounds what lands
    assert big.gain_us == pytest.approx(d1 * window * b / 1e6)
    # a second prefetch behind the same window lands in what the first left of it
    left = predict(h200, traffic, 100_000_000, shared_us=window - 0.25, tokens=1)
    assert left.gain_us == pytest.approx(d1 * 0.25 * b / 1e6)
    # on the H200's side stream every MB costs more than it saves: a loss, whatever the window
    assert cost.per_mb_us.value > h200.delta_16.value
    assert big.hidden_us < 0 and small.hidden_us < 0


def test_delta_is_interpolated_between_1_and_16_tokens_and_clamped_outside():
    h200 = profile("h200")
    d1, d16 = h200.delta_1.value, h200.delta_16.value
    assert delta_us_per_mb(h200, 1) == d1 and delta_us_per_mb(h200, 16) == d16
    assert delta_us_per_mb(h200, 0) == d1 and delta_us_per_mb(h200, 4096) == d16
    assert delta_us_per_mb(h200, 8) == pytest.approx(d1 + (d16 - d1) * 7 / 15)
    assert delta_us_per_mb(h200, None) == min(d1, d16)  # symbolic: the smaller


def test_a_strided_part_is_credited_with_its_own_bytes_only():
    """W[:, :128] of a 4096 x 8192 fp16 weight reads 1 MiB, spread over a 64 MiB span: the
    prefetch of its range is credited with that 1 MiB, never more than its own read time."""
    h200 = profile("h200")
    read, span = 4096 * 128 * 2, 4096 * 8192 * 2
    size = 11 << 20
    long_window = WindowTraffic(nbytes=10**9, kernels=0)
    whole = predict(h200, long_window, size, tokens=16)
    part = predict(h200, long_window, size, tokens=16, useful=read / span)
    assert part.gain_us == pytest.approx(whole.gain_us * read / span)
    assert part.gain_us <= read / h200.bytes_per_us
    assert part.cost_us == whole.cost_us  # the whole range is still moved


def test_auto_sizes_fill_what_lands_and_nothing_where_a_byte_loses():
    h200 = profile("h200")
    traffic = WindowTraffic(nbytes=0, kernels=4)
    assert hideable_bytes(h200, traffic) == 0  # beta > delta on the H200: no size pays
    a3 = profile("ascend-a3")
    size = hideable_bytes(a3, traffic)
    free = 4 * a3.kernel_us.value
    assert size % 4096 == 0 and size <= free * a3.bytes_per_us < size + 4096
    assert hideable_bytes(a3, traffic, shared_us=free - 0.01) == 0  # lands too little
    assert hideable_bytes(a3, WindowTraffic(0, 0)) == 0


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
    assert "not a measurement" in text and "saves 1.50 µs (layers 0-1)" in text
    assert "48.0 µs for all 32 layers" in text  # 1.5 µs x 32
    h200 = profile("h200")
    weights = 32 * (3 * (64 << 20) / 2)  # the mean layer, x 32
    floor = weights / h200.bytes_per_us
    assert f"{floor:.1f} µs" in text
    idle = 32 * 2.5  # one window of 2.5 µs per layer
    saved, bound = step_bound(h200, floor, idle, weights)
    assert saved == pytest.approx(h200.delta_1.value * idle * h200.bytes_per_us / 1e6)
    assert f"{bound:.3f}x" in text and 1 < bound < 1.03
    # every constant is shown with its provenance
    assert "delta_us_per_mb_1_token = 0.0553  [measured: benchmarks/results/gpu-h200" in text
    assert "side_stream.per_mb_us" in text and "[fitted:" in text
    assert speedup_bound(1.0, 2.0) == math.inf


def _moe_record(layer, module, nbytes, role="moe.gate_up"):
    return LinearRecord(
        node=f"mm_{layer}_{module}",
        op="aten::mm",
        module=f"model.layers.{layer}.{module}",
        weight=f"model.layers.{layer}.{module}.weight",
        layer=layer,
        role=role,
        weight_shape=(1, nbytes // 2),
        dtype="torch.bfloat16",
        weight_bytes=nbytes,
    )


def test_the_moe_step_floor_counts_routed_experts_only_top_k_of_n_plus_shared():
    """128 experts of 1 MB each, 8 run per token, a 2 MB shared expert, a 4 MB attention:
    a step reads 8 + 2 + 4 MB per layer, not 128 + 2 + 4."""
    layer = [_moe_record(0, f"mlp.experts.{e}.gate_proj", 10**6) for e in range(128)]
    layer += [_moe_record(0, "mlp.shared_experts.gate_proj", 2 * 10**6, "mlp.gate_up")]
    layer += [_moe_record(0, "self_attn.qkv_proj", 4 * 10**6, "attn.qkv")]
    plan = PrefetchPlan(records=layer)
    shape = StepShape(layers_total=94, dense_layers=0, experts=128, top_k=8)
    assert weight_bytes_per_step([plan], shape) == 94 * 14 * 10**6
    assert weight_bytes_per_step([plan], 94) == 94 * 134 * 10**6  # no shape: every expert


def test_mixed_dense_and_moe_layers_are_totalled_per_kind():
    """deepseek-v3: 3 dense layers of 10 MB and 58 MoE layers (256 experts of 1 MB, 8 run):
    built layers 0 (dense) and 3 (MoE) are scaled by their own kind's count."""
    dense = [_moe_record(0, "mlp.gate_proj", 10 * 10**6, "mlp.gate_up")]
    moe = [_moe_record(3, f"mlp.experts.{e}.gate_proj", 10**6) for e in range(256)]
    plan = PrefetchPlan(records=dense + moe)
    shape = StepShape(layers_total=61, dense_layers=3, experts=256, top_k=8)
    assert weight_bytes_per_step([plan], shape) == 3 * 10 * 10**6 + 58 * 8 * 10**6


def test_step_shape_reads_a_hugging_face_config():
    from types import SimpleNamespace

    ds = SimpleNamespace(
        num_hidden_layers=61, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3
    )
    assert StepShape.from_config(ds) == StepShape(61, 3, 256, 8)
    llama = SimpleNamespace(num_hidden_layers=32)
    assert StepShape.from_config(llama) == StepShape(32, 32, None, None)


def test_the_idle_time_and_the_ceiling_do_not_depend_on_the_sizes():
    """The windows' idle time and the step's ceiling are the model's and the windows': the
    same with the default cap and with "auto" sizes (which size nothing on an H200)."""
    from fxprefetch import WeightPrefetchConfig

    from support.planning import plan_synth

    lines = {}
    for sizes in (18 << 20, "auto"):
        config = WeightPrefetchConfig(enabled=True, max_prefetch_bytes=sizes)
        _, plan = plan_synth("h200", config)
        out = render_prediction([plan], profile("h200")).splitlines()
        lines[sizes] = [line for line in out if "idle (the windows)" in line]
        assert any(line.startswith("  not emitted: 8 prefetches") for line in out), sizes
    assert lines[18 << 20] == lines["auto"] and len(lines["auto"]) == 1
    assert "idle (the windows): 0.0 µs" not in lines["auto"][0]
