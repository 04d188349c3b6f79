"""The native CUDA L2 prefetch (issue #14): machine code, ranges and fork/join placement here,
behaviour on a GPU where one is present (those tests skip without CUDA)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxprefetch.cuda_prefetch import ALIGN, clamp_range, compile_for, register
from fxprefetch.ops import JOIN_OP, PREFETCH_OP
from passes import DEFAULT_RULES
from passes.vector_ops import NodeKind, classify

from emitted_order import check_fork_window_join_gemm, emitted_events
from synthetic import SynthModel, SynthSpec
from tracing import run_synth_pipeline

triton = pytest.importorskip("triton")


def needs_gpu(test):
    """A GPU test: ``pytest -m gpu`` selects it (benchmarks/gpu_check.sh); skips without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


# on a GPU every decoder layer has 4 windows: the norm (qkv), attention (o), the norm
# (gate/up) and SiLU-and-mul (down; only with sequence parallelism on Ascend)
GPU_ROLES_PER_LAYER = ("attn.o", "attn.qkv", "mlp.down", "mlp.gate_up")


def _sass(kernel) -> str:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        out = subprocess.run(
            [str(nvdisasm), f.name], capture_output=True, text=True, timeout=120, check=True
        )
    finally:
        os.unlink(f.name)
    return out.stdout


@pytest.mark.parametrize(
    ("capability", "ptx", "sass"),
    [
        (90, "cp.async.bulk.prefetch.L2.global", "UBLKPF.L2"),
        (80, "prefetch.global.L2::evict_last", "CCTL.E.PML2"),
    ],
)
def test_the_kernel_compiles_to_the_l2_prefetch_instruction(capability, ptx, sass):
    kernel = compile_for(capability)  # no GPU needed: Triton ships ptxas
    assert ptx in kernel.asm["ptx"]
    machine = _sass(kernel)
    assert sass in machine
    if capability == 90:
        assert "sm_90a" in kernel.asm["ptx"]  # the bulk prefetch needs the arch-specific target


@given(
    address=st.integers(0, 1 << 40),
    nbytes=st.integers(1, 1 << 30),
    max_size=st.integers(1, 1 << 30),
    data=st.data(),
)
def test_ranges_are_clamped_and_aligned(address, nbytes, max_size, data):
    offset = data.draw(st.integers(0, nbytes - 1))
    start, size = clamp_range(address, nbytes, max_size, offset)
    wanted_end = address + offset + min(max_size, nbytes - offset)
    assert start % ALIGN == 0 and size % ALIGN == 0 and size >= 0
    assert start >= address + offset and start + size <= max(wanted_end, start)
    assert wanted_end - (start + size) < 2 * ALIGN or size == 0  # lose < 16 B at each end


@pytest.mark.parametrize("bad", [(0, 0), (16, 16), (16, -1)])
def test_bad_ranges_are_refused(bad):
    max_size, offset = bad
    with pytest.raises(ValueError, match="bad range"):
        clamp_range(0, 16, max_size, offset)


def test_without_cuda_nothing_is_registered():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert register() is False
    from fxprefetch import ops

    assert "cuda" not in ops.native_prefetch_devices() and not ops.native_join_devices()


def _pipeline(join_devices):
    # a native prefetch (kept in the code) that runs on a side stream
    devices = frozenset(join_devices)
    return run_synth_pipeline("inductor", native_devices=devices, join_devices=devices)


def test_joins_close_every_fork_after_the_window_and_before_the_linear():
    # the placement logic is device-independent: treat the CPU as a side-stream device
    gm, report = _pipeline({"cpu"})
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    forks = list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))
    joins = list(gm.graph.find_nodes(op="call_function", target=JOIN_OP))
    assert report.changed("insert_prefetch_joins") == len(joins) == len(forks) == 4
    by_name = {n.name: n for n in gm.graph.nodes}
    for record in report.plan.prefetched:
        fork = by_name[record.prefetch_node]
        linear = by_name[record.node]
        (join,) = [j for j in joins if j.args[0] is fork.args[0]]
        # fork ... window ... join, then the linear
        assert order[fork] < order[join] < order[linear]
        window_ops = [
            n
            for n in gm.graph.nodes
            if order[fork] < order[n] < order[linear]
            and classify(n, DEFAULT_RULES) is NodeKind.VECTOR
        ]
        assert window_ops and all(order[n] < order[join] for n in window_ops)
        assert join not in linear.all_input_nodes  # the join is not a data input
        # it reads the linear's activation (emitted after the window's tail), not the weight
        (activation,) = join.args[1]
        assert activation in linear.all_input_nodes and fork.args[0] not in join.args[1]


def test_no_join_without_a_side_stream_device():
    gm, report = _pipeline(set())
    assert report.changed("insert_prefetch_joins") == 0
    assert not list(gm.graph.find_nodes(op="call_function", target=JOIN_OP))
    assert report.hints_elided  # the CPU: hints, left out


# -- on a GPU ----------------------------------------------------------------------------------


def _layer():
    torch.manual_seed(0)
    return SynthModel(SynthSpec(layers=2, hidden=256, intermediate=512)).cuda().eval()


def _prefetch_kernels_run(fn) -> int:
    """How many L2 prefetch kernels the GPU ran during ``fn()`` (CUDA-graph replays too)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "l2_prefetch" in e.name)


@needs_gpu
@pytest.mark.compile
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_outputs_equal_plain_inductor_and_capture_works(mode, fresh_dynamo):
    import fxprefetch

    model = _layer()
    ids = torch.randint(0, 64, (1, 8), device="cuda")
    options = {"target": "inductor", "mode": mode or "default"}
    ours = torch.compile(model, backend="npu_prefetch", options=options)
    plain = torch.compile(model, backend="inductor", mode=mode)
    with torch.no_grad():
        for _ in range(3):  # warm-up, capture, replay
            out = ours(ids).clone()  # a replay overwrites the outputs of the previous one
        expected = plain(ids).clone()
        with fxprefetch.collect_stats() as ran:
            kernels = _prefetch_kernels_run(lambda: ours(ids))
    torch.testing.assert_close(out, expected)
    (plan, *_) = fxprefetch.last_plans()
    assert sorted(r.role for r in plan.prefetched) == sorted(GPU_ROLES_PER_LAYER * 2)
    assert all(r.prediction is not None for r in plan.prefetched)  # the GPU's profile
    assert kernels == 8  # the prefetch kernels really ran (in the replay too)
    assert ran.calls == 8  # counted once per graph call, replayed or not


@needs_gpu
def test_eager_single_calls_and_a_hand_captured_fork_join():
    import fxprefetch

    assert register()
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)  # 32 MiB
    prefetch, join = torch.ops.fxprefetch.prefetch, torch.ops.fxprefetch.prefetch_join
    with fxprefetch.collect_stats() as s:
        kernels = _prefetch_kernels_run(lambda: (prefetch(weight, None, 8 << 20), join(weight, [])))
        prefetch(weight, None, 1 << 30)  # clamped to the tensor; no join: the next fork waits
        torch.cuda.synchronize()
    assert kernels == 1
    assert s.calls == 2 and s.bytes_prefetched == (8 << 20) + weight.nbytes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # a fork must rejoin inside the capture
        prefetch(weight, None, 4 << 20)
        total = weight.float().sum()
        join(weight, [])
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(total, weight.float().sum())


@needs_gpu
@pytest.mark.compile
def test_generated_code_orders_fork_window_join_gemm(fresh_dynamo):
    from torch._inductor.utils import run_and_get_code

    model = _layer()
    ids = torch.randint(0, 64, (1, 8), device="cuda")
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad():
        _, (code, *_) = run_and_get_code(compiled, ids)
    assert check_fork_window_join_gemm(emitted_events(code)) == 8, code


# -- inductor's real scheduler, on the CPU -------------------------------------------------------
# The scheduler is device-independent: with the CPU standing in as a side-stream device (its
# native prefetch and join record what they are called with), the code inductor emits must
# already keep fork -> vector kernels -> join -> GEMM, and every call must close each fork.


@pytest.fixture
def cpu_side_stream(monkeypatch):
    from fxprefetch import ops

    events: list[tuple[str, int]] = []
    monkeypatch.setitem(
        ops._NATIVE_PREFETCH, "cpu", lambda w, *_: events.append(("fork", w.data_ptr()))
    )
    monkeypatch.setitem(ops._NATIVE_JOIN, "cpu", lambda w: events.append(("join", w.data_ptr())))
    return events


def _balanced(events: list[tuple[str, int]]) -> None:
    """Each join closes an open fork of its weight, and no fork is open when the call ends."""
    open_forks: list[int] = []
    for kind, ptr in events:
        if kind == "fork":
            assert ptr not in open_forks, f"{ptr:#x} forked twice"
            open_forks.append(ptr)
        else:
            assert ptr in open_forks, f"join of {ptr:#x} without a fork"
            open_forks.remove(ptr)
    assert not open_forks


@pytest.mark.compile
@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda: SynthModel(SynthSpec(layers=2, hidden=64, intermediate=128)), id="dense"
        ),
        pytest.param(
            lambda: SynthModel(SynthSpec(layers=2, fused=False, naming="hf", act_quant=True)),
            id="split-actquant",
        ),
        pytest.param(lambda: _tiny("llama-tiny"), id="llama-tiny"),
    ],
)
def test_inductor_emits_fork_window_join_gemm_on_the_cpu(build, cpu_side_stream, fresh_dynamo):
    from torch._inductor.utils import run_and_get_code

    import fxprefetch

    model = build()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(compiled, ids)
        expected = model(ids)
    got = out.logits if hasattr(out, "logits") else out
    torch.testing.assert_close(got, expected.logits if hasattr(expected, "logits") else expected)
    (plan,) = fxprefetch.last_plans()
    forks = check_fork_window_join_gemm(emitted_events(code))
    assert forks == len(plan.prefetched) > 0
    assert [k for k, _ in cpu_side_stream].count("fork") == forks  # all ran, in order
    _balanced(cpu_side_stream)


@pytest.mark.compile
def test_on_a_gpu_profile_attention_and_down_windows_keep_fork_window_join_gemm(
    cpu_side_stream, fresh_dynamo, monkeypatch
):
    """Issue #21: with a GPU's device setup (an H200's, the CPU standing in), o_proj hides
    behind attention and down_proj behind SiLU-and-mul: 4 forks per layer, each fork ->
    window -> join -> GEMM in the code inductor emits, every fork closed, outputs equal."""
    from torch._inductor.utils import run_and_get_code

    import fxprefetch
    from fxprefetch import backend
    from fxprefetch.device_profiles import simulated_setup

    monkeypatch.setattr(backend, "device_setup", lambda target: simulated_setup("h200", {"cpu"}))
    model = SynthModel(SynthSpec(layers=2, hidden=64, intermediate=128))
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(compiled, ids)
        expected = model(ids)
    torch.testing.assert_close(out, expected)
    (plan,) = fxprefetch.last_plans()
    assert sorted(r.role for r in plan.prefetched) == sorted(GPU_ROLES_PER_LAYER * 2)
    assert {r.window_kind for r in plan.by_role("attn.o")} == {"attention"}
    assert check_fork_window_join_gemm(emitted_events(code)) == 8
    assert [k for k, _ in cpu_side_stream].count("fork") == 8
    _balanced(cpu_side_stream)


def _tiny(name: str) -> torch.nn.Module:
    from fxprefetch.models import build_model

    return build_model(name, layers=2)


# -- the default cap: window x bandwidth, not the Ascend 18 MiB ---------------------------------


def _props(clock_khz, bus_bits, l2_mb):
    from types import SimpleNamespace

    return SimpleNamespace(
        memory_clock_rate=clock_khz, memory_bus_width=bus_bits, L2_cache_size=l2_mb * 10**6
    )


@pytest.mark.parametrize(
    ("gpu", "props", "tb_per_s", "cap_mib"),
    [
        ("H100 SXM", _props(2_619_000, 5120, 50), 3.35, 8),
        ("H200", _props(3_125_000, 6144, 60), 4.8, 11),
        ("A100 40GB", _props(1_215_000, 5120, 40), 1.56, 4),
        ("unreported", _props(0, 0, 50), 3.35, 8),  # torch without the fields: H100's figure
    ],
)
def test_default_cap_is_window_times_bandwidth(gpu, props, tb_per_s, cap_mib):
    from fxprefetch.cuda_prefetch import cap_for, peak_bandwidth

    bandwidth = peak_bandwidth(props)
    assert bandwidth / 1e12 == pytest.approx(tb_per_s, rel=0.01), gpu
    assert cap_for(bandwidth, props.L2_cache_size) == cap_mib << 20, gpu


def test_default_cap_stays_within_a_quarter_of_l2():
    from fxprefetch.cuda_prefetch import cap_for

    assert cap_for(20e12, 40 * 10**6) == 9 << 20  # 40 MB / 4 in whole MiB
    assert cap_for(1e9, 50 * 10**6) == 1 << 20  # at least 1 MiB
