"""Smoke-run each benchmark script at its smallest size: it runs, prints a table and writes
JSON with its goal. (Numbers are recorded in benchmarks/README.md, never asserted here.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.compile

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPTS = {
    "bench_pass_scaling.py": ("exponent", "compile_share"),
    "bench_compile_overhead.py": ("rows",),
    "bench_decode_latency.py": ("ratio", "planned_hints_per_step"),
    "bench_memory.py": ("ratio",),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_benchmark_smoke(script, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=BENCHMARKS,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "goal" in proc.stdout and "----" in proc.stdout  # a table and its goal
    data = json.loads(out.read_text())
    assert data["environment"]["torch"] and data["goals"]
    for key in SCRIPTS[script]:
        assert key in data


# -- bench_gpu_prefetch.py: its GPU numbers need a GPU; its plumbing is checked here ----------


@pytest.fixture
def gpu_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu_prefetch

    return bench_gpu_prefetch


def test_gpu_bench_without_a_gpu_says_so_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_gpu_prefetch.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
    )
    assert proc.stdout.strip().splitlines() == [
        "bench_gpu_prefetch: no CUDA GPU here; nothing to measure"
    ]


def test_gpu_bench_layer_part_runs_and_counts_prefetches_on_the_cpu(
    gpu_bench, monkeypatch, fresh_dynamo
):
    """The layer part with tiny shapes on the CPU (a native CPU prefetch keeps the prefetches
    in the code): every variant compiles and runs, each prefetch variant runs 2 prefetches
    per layer per step (qkv, gate/up), capped at the variant's cap."""
    import torch

    from fxprefetch import ops

    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *args: None)
    shapes = {"hidden": 64, "inter": 128, "heads": 4, "kv_heads": 2, "past": 8}
    cap = 4096  # below every qkv / gate_up weight (>= 64 x 128 x 4 bytes)
    rows = gpu_bench.layers(
        True,
        device="cpu",
        shapes=shapes,
        dtype=torch.float32,
        mode="default",
        caps=[cap],
        defaults=True,
    )
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {
        "inductor",
        gpu_bench.DEFAULT_ARM,
        f"prefetch {cap / gpu_bench.MB:g} MB",
    }
    default = by_variant[gpu_bench.DEFAULT_ARM]  # the backend with no options, measured
    assert default["ratio"] > 0 and "predicted_saved_us" in default
    ours = by_variant[f"prefetch {cap / gpu_bench.MB:g} MB"]
    assert (
        ours["prefetches_per_step"] == 2 * 2 and by_variant["inductor"]["prefetches_per_step"] == 0
    )
    assert ours["prefetch_mb_per_step"] * gpu_bench.MB == 4 * cap
    assert all(r["median_us"] > 0 and r["ratio"] > 0 for r in rows)


def test_gpu_bench_goals_read_from_rows(gpu_bench):
    mb = gpu_bench.MB
    row = {"window_us": 4, "prefetch_mb": 8, "none": 30.0, "side": 27.0}
    saved, bound = gpu_bench.micro_goal(row, bytes_per_us=4 * mb)  # 8 MB / 4 MB per µs = 2 µs
    assert (saved, bound) == (3.0, 2.0)
    micro = [
        {**row, "saved_us": 1.5, "bound_us": 2.0},
        {"window_us": 1, "saved_us": 0, "bound_us": 1},
    ]
    layers = [
        {"batch": 1, "variant": "inductor", "ratio": 1.0},
        {"batch": 1, "variant": "prefetch 8 MB", "ratio": 1.05},
        {"batch": 16, "variant": "prefetch 8 MB", "ratio": 0.9},
        {"batch": 1, "variant": gpu_bench.DEFAULT_ARM, "ratio": 1.2},  # not a prefetch variant
        {"batch": 16, "variant": gpu_bench.DEFAULT_ARM, "ratio": 0.994},
    ]
    met = gpu_bench.goals_met(micro, layers)
    assert met == {
        "default_arm_worst": 0.994,
        "default_arm": False,  # below 0.995 at batch 16
        "micro_worst_saving_share": 0.75,
        "micro": True,
        "layer_best_speedup_batch1": 1.05,
        "layers": True,
    }
    assert gpu_bench.goals_met([], [])["layers"] is None


# -- 4 prefetches per layer on a GPU, predicted beside measured --------------------------------

GPU_ROLES = ["attn.o", "attn.qkv", "mlp.down", "mlp.gate_up"]


def test_the_llama_decoder_plans_four_prefetches_per_layer_on_a_gpu_profile(gpu_bench):
    """Llama-3-8B shapes on the meta device, planned as on an H200: qkv behind the norm, o
    behind attention, gate/up behind the norm, down behind SiLU-and-mul. On Ascend, down
    needs sequence parallelism and attention is no window."""
    import torch

    import fxprefetch

    model = gpu_bench.Decoder(2, gpu_bench.LLAMA3_8B).to(device="meta", dtype=torch.bfloat16)
    shapes = gpu_bench.LLAMA3_8B
    x = torch.empty(1, shapes["hidden"], device="meta", dtype=torch.bfloat16)
    dim = shapes["hidden"] // shapes["heads"]
    cache = (1, shapes["kv_heads"], shapes["past"], dim)
    caches = [
        tuple(torch.empty(cache, device="meta", dtype=torch.bfloat16) for _ in "kv")
        for _ in range(2)
    ]
    forced = {"force_prefetch": True}  # the H200's profile predicts each to lose
    (plan,) = fxprefetch.explain(model, x, caches, config=forced, device_profile="h200")
    for layer in (0, 1):
        done = [r for r in plan.prefetched if r.layer == layer]
        assert sorted(r.role for r in done) == GPU_ROLES
        assert {r.role: r.window_kind for r in done}["attn.o"] == "attention"
        assert all(r.prediction is not None and r.prediction.device == "h200" for r in done)
    assert plan.predicted().per_step_us < 0  # a loss on the H200's side stream
    (ascend,) = fxprefetch.explain(model, x, caches, device_profile="ascend-910b")
    assert not any(r.window_kind == "attention" for r in ascend.prefetched)
    assert all(
        r.skip_reason == fxprefetch.SkipReason.NEEDS_SEQUENCE_PARALLEL
        for r in ascend.by_role("mlp.down")
    )


def test_gpu_bench_layers_on_a_simulated_gpu_profile_predict_beside_measure(
    gpu_bench, monkeypatch, fresh_dynamo
):
    """The layer part compiled with the H200's device setup (the CPU standing in, with a
    native prefetch and join): 4 prefetches per layer ran per step, every fork joined, and
    each row carries the model's predicted saving beside the measured one."""
    import torch

    import fxprefetch
    from fxprefetch import ops
    from fxprefetch.devices import simulated_setup

    events: list[str] = []
    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *args: None)
    monkeypatch.setitem(
        ops._NATIVE_L2,
        "cpu",
        ops.NativeL2(
            lambda *args: events.append("fork"),
            lambda *args: events.append("join"),
            lambda device: None,
        ),
    )
    monkeypatch.setattr(
        "fxprefetch.targets.device_setup",
        lambda **_: simulated_setup("h200", {"cpu"}),
    )
    shapes = {"hidden": 64, "inter": 128, "heads": 4, "kv_heads": 2, "past": 8}
    rows = gpu_bench.layers(
        True, device="cpu", shapes=shapes, dtype=torch.float32, mode="default", caps=[None]
    )
    ours = next(r for r in rows if r["variant"] == "prefetch, default cap")
    assert ours["prefetches_per_layer"] == 4 and ours["prefetches_per_step"] == 8
    assert events.count("fork") == events.count("join") > 0
    assert ours["predicted_saved_us"] is not None and ours["predicted_device"] == "h200"
    (plan,) = fxprefetch.last_plans()
    assert sorted(r.role for r in plan.prefetched) == sorted(GPU_ROLES * 2)
    table = gpu_bench.layer_table(rows, 1)
    assert "predicted" in table and "prefetch, default cap" in table


def test_gpu_check_dry_run_runs_the_cpu_forms_and_says_what_it_would_run(tmp_path):
    """``gpu_check.sh --dry-run``: calibrate on a simulated H200 writes the profile, the
    lowering arms run at tiny sizes on the CPU (every arm, both decoders, outputs equal,
    predictions read from the plan), the decision line reaches the summary, and every GPU
    part says what it would run."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("GPU_CHECK_DRY", None)
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        env=env,
    )
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    for part in ("calibrate", "lowerings"):
        assert f"gpu_check: {part} (no-GPU form): exit 0" in summary, summary
    for part in ("install", "calibrate", "gpu_tests", "lowerings", "bench_b1", "bench_b16"):
        assert f"would run {part} (budget" in summary, summary
    assert "-m gpu tests/devices/test_cuda_prefetch.py" in summary
    assert "--only layers --check --batch 16" in summary
    assert json.loads((tmp_path / "facts.json").read_text())["torch"]
    profile = json.loads((tmp_path / "device-profile.json").read_text())
    assert profile["schema"] == "fxprefetch.device_profile" and profile["name"] == "h200-simulated"
    lowerings = json.loads((tmp_path / "lowerings.json").read_text())
    rows = {(r["config"], r["arm"]): r for r in lowerings["rows"]}
    assert set(rows) == {(c, a) for c in ("dense-b1", "tp4-b1") for a in LOWERING_ARMS}
    assert all(r["same_output"] and r["reference_rel_err"] == 0 for r in rows.values())
    for config in ("dense-b1", "tp4-b1"):
        assert rows[config, "base"]["prefetches_per_layer"] == 0
        for arm in LOWERING_ARMS[1:]:
            assert rows[config, arm]["prefetches_per_layer"] == 4  # qkv, o, gate/up, down
            assert rows[config, arm]["predicted_saved_us"] is not None
    assert lowerings["sm90_compile"] == [
        f"{k}/pf={on}: ok" for k in ("rmsnorm", "silu_mul", "spin") for on in (False, True)
    ] or lowerings["sm90_compile"].startswith("skipped")
    assert "gpu_check: decision: [dry run, CPU times mean nothing]" in summary
    assert summary.splitlines()[-1].startswith("gpu_check: done")


LOWERING_ARMS = ("base", "side", "compute", "fused")


def test_the_lowering_decision_follows_the_long_window_rows(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_lowerings

    def row(config, arm, med, p25):
        return {"config": config, "arm": arm, "speedup": {"med": med, "p25": p25}}

    rows = [row("dense-b1", "fused", 1.5, 1.4), row("tp4-b1", "side", 0.97, 0.96)]
    assert "the GPU default stays off" in bench_lowerings.decision(rows)
    rows.append(row("tp4-b1", "fused", 1.021, 1.001))
    assert "fused measured >= 1.02x on long windows" in bench_lowerings.decision(rows)
    rows[-1] = row("tp4-b1", "fused", 1.021, 0.999)  # the lower quartile loses
    assert "stays off" in bench_lowerings.decision(rows)
    assert "undecided" in bench_lowerings.decision(rows[:1])


def test_fused_extra_programs_cover_the_weight_in_aligned_lanes(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fused_prefetch as fp

    extra = fp.extra_programs(1 << 12, 11 * (1 << 20) + 5, sms=132)
    assert extra.nbytes == 11 * (1 << 20)  # whole 16-byte units
    assert extra.programs * extra.per_program >= extra.nbytes
    assert (extra.programs - 1) * extra.per_program < extra.nbytes and extra.programs <= 132
    assert extra.per_program % (fp.LANES * 16) == 0
    assert fp.extra_programs(16, 8, sms=132) == fp.NONE
    with pytest.raises(ValueError, match="aligned"):
        fp.extra_programs(8, 4096, sms=132)


def test_the_benchmarks_default_arm_emits_no_prefetch_on_a_simulated_h200(
    gpu_bench, monkeypatch, fresh_dynamo
):
    """The default arm is the backend with no options: on an H200 (simulated, the CPU standing
    in) the model predicts every side-stream prefetch to lose, so none is emitted or run, and
    each skipped record carries its predicted µs."""
    import torch

    import fxprefetch
    from fxprefetch import ops
    from fxprefetch.devices import simulated_setup

    events: list[str] = []
    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *args: events.append("prefetch"))
    monkeypatch.setitem(
        ops._NATIVE_L2,
        "cpu",
        ops.NativeL2(
            lambda *args: events.append("fork"),
            lambda *args: events.append("join"),
            lambda device: None,
        ),
    )
    monkeypatch.setattr(
        "fxprefetch.targets.device_setup", lambda **_: simulated_setup("h200", {"cpu"})
    )
    shapes = {"hidden": 64, "inter": 128, "heads": 4, "kv_heads": 2, "past": 8}
    rows = gpu_bench.layers(
        True,
        device="cpu",
        shapes=shapes,
        dtype=torch.float32,
        mode="default",
        caps=[],
        defaults=True,
    )
    default = next(r for r in rows if r["variant"] == gpu_bench.DEFAULT_ARM)
    assert default["prefetches_per_step"] == 0 and events == []
    loss = fxprefetch.SkipReason.PREDICTED_LOSS
    skipped = [r for p in fxprefetch.last_plans() for r in p.records if r.skip_reason == loss]
    assert len(skipped) == 8 and all(r.prediction.hidden_us < 0 for r in skipped)
