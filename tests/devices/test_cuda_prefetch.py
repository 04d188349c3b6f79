"""The native CUDA L2 prefetch (``fxprefetch.devices.cuda_prefetch``): machine code, ranges and the
runtime fork/join here, behaviour on a GPU where one is present (those tests skip without CUDA).
The lowering passes it serves are tested in test_lower_native.py and test_insert_joins.py."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fxprefetch.devices.cuda_prefetch import (
    ALIGN,
    MAX_BULK,
    clamp_range,
    compile_for,
    launch_params,
    register,
    tensor_range,
)

from support.emitted_order import check_fork_window_join_gemm, emitted_events
from support.synthetic import SynthModel, SynthSpec

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
    ("capability", "cache_hint", "ptx", "sass"),
    [
        (90, "none", "cp.async.bulk.prefetch.L2.global [", "UBLKPF.L2 [UR"),
        (90, "evict_last", "cp.async.bulk.prefetch.L2.global.L2::cache_hint", "UBLKPF.L2"),
        (80, "none", "prefetch.global.L2 [", "CCTL.E.PF2"),
        (80, "evict_last", "prefetch.global.L2::evict_last", "CCTL.E.PML2"),
    ],
)
def test_the_kernel_compiles_to_the_l2_prefetch_instruction(capability, cache_hint, ptx, sass):
    kernel = compile_for(capability, cache_hint=cache_hint)  # no GPU needed: Triton ships ptxas
    assert ptx in kernel.asm["ptx"]
    machine = _sass(kernel)
    assert sass in machine
    if capability == 90:
        assert "sm_90a" in kernel.asm["ptx"]  # the bulk prefetch needs the arch-specific target
        # the size operand keeps 16 bits of size >> 4: the reason for MAX_BULK
        assert "SHF.R.U32.HI" in machine and MAX_BULK == 0xFFFF << 4
    if cache_hint == "evict_last" and capability == 90:
        assert "createpolicy.fractional.L2::evict_last" in kernel.asm["ptx"]


_PREFETCH_PTX = re.compile(r"cp\.async\.bulk\.prefetch\.L2|prefetch\.global\.L2")


@pytest.mark.parametrize(("capability", "num_warps"), [(90, None), (90, 4), (80, None), (80, 1)])
def test_each_range_is_issued_by_exactly_one_thread(capability, num_warps):
    """From the compiled code: a program's threads (``.reqntid``) times the prefetch
    instructions each thread's code holds (each runs once per loop step, one range each)
    equals the ranges (lanes) a program covers: no thread repeats another's range. (Triton's
    default 4 warps over 8 lanes gave 128 threads for 8 ranges: each issued 16 times.)"""
    kernel = compile_for(capability, num_warps=num_warps)
    ptx = kernel.asm["ptx"]
    body = ptx[ptx.index(".entry") :]
    (threads,) = map(int, re.findall(r"\.reqntid (\d+)", body))
    instructions = len(_PREFETCH_PTX.findall(body))
    launch = launch_params(1 << 20, capability >= 90, 132, num_warps)
    assert threads == kernel.metadata.num_warps * 32 == launch.num_warps * 32
    assert instructions * threads == launch.lanes  # one instruction per lane's range
    assert f"{launch.lanes - 1}" in body  # lane = tid & (lanes - 1): every thread its own lane


@given(
    size=st.integers(1, 1 << 32).map(lambda n: n * ALIGN),
    bulk=st.booleans(),
    sms=st.integers(1, 160),
    warps=st.sampled_from([None, 1, 2, 4, 8]),
    per_program=st.sampled_from([None, 16, 4096, 1 << 20, 8 << 20]),
)
def test_launch_covers_the_range_on_at_most_one_program_per_sm(size, bulk, sms, warps, per_program):
    launch = launch_params(size, bulk, sms, warps, per_program)
    unit = ALIGN if bulk else 128
    lanes = launch.grid * launch.lanes
    assert launch.per_lane % unit == 0 and lanes * launch.per_lane >= size  # all covered
    assert launch.steps == (1 if bulk else launch.per_lane // 128)
    if bulk:
        assert launch.per_lane <= MAX_BULK  # what one UBLKPF can encode
    needed = -(-size // (launch.lanes * MAX_BULK)) if bulk else 1
    assert launch.grid <= max(sms, needed)
    chunk = per_program or (64 << 10)
    if size >= sms * chunk:
        assert launch.grid >= sms  # the whole GPU, not one SM per MiB
    else:
        assert launch.grid == -(-size // chunk)


def test_ranges_end_where_the_storage_ends():
    """An expanded view reports numel x itemsize bytes, far more than its storage holds."""
    base = torch.zeros(4, 1)  # 16 bytes
    view = base.expand(4, 1000)
    assert view.nbytes == 16000
    start, size = tensor_range(view, 1 << 20, 0)
    storage = base.untyped_storage()
    assert start >= storage.data_ptr()
    assert start + size <= storage.data_ptr() + storage.nbytes()
    strided = torch.zeros(64, 64)[8:, ::2]  # starts 8 rows in, spans to the storage's end
    start, size = tensor_range(strided, 1 << 20, 0)
    end = strided.untyped_storage().data_ptr() + strided.untyped_storage().nbytes()
    assert start == strided.data_ptr() and start + size <= end


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

    assert "cuda" not in ops.native_prefetch_devices() and "cuda" not in ops.native_l2_devices()


# -- the runtime fork/join (CUDA stream calls recorded, on the CPU) ------------------------------


class _Stream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits {other.name}")


@pytest.fixture
def fake_streams(monkeypatch):
    """cuda_prefetch's stream calls on recorded stand-ins: fork/join logic without a GPU."""
    import contextlib

    from fxprefetch.devices import cuda_prefetch

    log: list[str] = []
    monkeypatch.setattr(cuda_prefetch, "_SIDE", cuda_prefetch._SideStreams())
    monkeypatch.setattr(cuda_prefetch._SideStreams, "get", lambda self, i: _Stream("side", log))
    monkeypatch.setattr(cuda_prefetch, "_index", lambda device: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream("main", log))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(
        cuda_prefetch, "launch_prefetch", lambda start, size, *a, **k: log.append(f"{size} B")
    )
    return log


def test_an_empty_range_still_forks_and_a_join_needs_a_fork(fake_streams):
    from fxprefetch.devices import cuda_prefetch

    cuda_prefetch.join(torch.zeros(4))  # no fork open: waiting would be illegal in a capture
    assert fake_streams == []
    tiny = torch.zeros(3, dtype=torch.uint8)[1:]  # 2 bytes: nothing aligned to prefetch
    cuda_prefetch.fork(tiny, 1 << 20)
    cuda_prefetch.join(tiny)
    assert fake_streams == ["side waits main", "0 B", "main waits side"]
    weight = torch.zeros(64, 64)
    cuda_prefetch.fork(weight, 4096)
    cuda_prefetch.fork(weight, 4096)  # a weight read by two linears: two forks, two joins
    cuda_prefetch.join(weight)
    cuda_prefetch.join(weight)
    cuda_prefetch.join(weight)  # a third join has no fork: nothing
    assert fake_streams[3:] == ["side waits main", "4096 B"] * 2 + ["main waits side"] * 2


def test_side_streams_are_per_thread():
    import threading

    from fxprefetch.devices import cuda_prefetch

    seen = []
    state = cuda_prefetch._SideStreams()
    state.open[0] = 1
    thread = threading.Thread(target=lambda: seen.append(dict(state.open)))
    thread.start()
    thread.join()
    assert seen == [{}] and state.open == {0: 1}  # another thread sees its own, empty state


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
@pytest.mark.parametrize("lowering", ["side_stream", "compute_stream"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_outputs_equal_plain_inductor_and_capture_works(mode, lowering, fresh_dynamo):
    import fxprefetch

    model = _layer()
    ids = torch.randint(0, 64, (1, 8), device="cuda")
    options = {"target": "inductor", "mode": mode, "cuda_lowering": lowering}
    ours = torch.compile(model, backend="npu_prefetch", options=options)
    plain = torch.compile(model, backend="inductor", mode=None if mode == "default" else mode)
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
    planned = len(plan.prefetched)
    if mode == "default":  # "auto": no CUDA graphs, so hints, left out of the code
        assert kernels == 0 and ran.calls == 0 and ran.hints == planned
        assert plan.lowering.startswith("hints")
    else:
        assert kernels == planned  # the prefetch kernels really ran, in the replay
        assert ran.calls == planned  # counted once per graph call
        assert "native L2 prefetch" in plan.lowering


@needs_gpu
@pytest.mark.compile
def test_native_prefetch_always_runs_kernels_in_default_mode(fresh_dynamo):
    import fxprefetch

    model = _layer()
    ids = torch.randint(0, 64, (1, 8), device="cuda")
    options = {"target": "inductor", "native_prefetch": "always", "cache_hint": "evict_last"}
    ours = torch.compile(model, backend="npu_prefetch", options=options)
    with torch.no_grad():
        ours(ids)
        with fxprefetch.collect_stats() as ran:
            kernels = _prefetch_kernels_run(lambda: ours(ids))
    assert kernels == ran.calls == len(GPU_ROLES_PER_LAYER) * 2


@needs_gpu
def test_eager_single_calls_and_a_hand_captured_fork_join():
    import fxprefetch

    assert register()
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)  # 32 MiB
    prefetch, native = torch.ops.fxprefetch.prefetch, torch.ops.fxprefetch.prefetch_native
    join = torch.ops.fxprefetch.prefetch_join
    with fxprefetch.collect_stats() as s:
        kernels = _prefetch_kernels_run(lambda: prefetch(weight, None, 8 << 20))
        prefetch(weight, None, 1 << 30)  # clamped to the tensor; the compute stream: no join
        torch.cuda.synchronize()
    assert kernels == 1
    assert s.calls == 2 and s.bytes_prefetched == (8 << 20) + weight.nbytes
    tiny = weight.view(-1)[:4]  # 8 bytes: nothing aligned, still a fork
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # every fork rejoins inside the capture
        prefetch(weight, None, 4 << 20)
        native(weight, [], 4 << 20, 0, "side", "none")
        native(tiny, [], 8, 0, "side", "evict_last")
        total = weight.float().sum()
        join(weight, [])
        join(tiny, [])
        join(weight, [])  # no fork left: a no-op, not an illegal wait
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(total, weight.float().sum())
    assert _prefetch_kernels_run(graph.replay) == 2  # the empty range launches nothing


@needs_gpu
@pytest.mark.compile
def test_generated_code_orders_fork_window_join_gemm(fresh_dynamo):
    from torch._inductor.utils import run_and_get_code

    model = _layer()
    ids = torch.randint(0, 64, (1, 8), device="cuda")
    options = {"target": "inductor", "native_prefetch": "always"}
    compiled = torch.compile(model, backend="npu_prefetch", options=options)
    with torch.no_grad():
        _, (code, *_) = run_and_get_code(compiled, ids)
    assert check_fork_window_join_gemm(emitted_events(code)) == 8, code


# -- inductor's real scheduler, on the CPU -------------------------------------------------------
# The scheduler is device-independent: with the CPU standing in as a side-stream device (its
# native prefetch and join record what they are called with), the code inductor emits must
# keep fork -> vector kernels -> join -> GEMM under each order inductor may pick, and every
# call must close each fork.


@pytest.fixture
def cpu_side_stream(monkeypatch):
    from fxprefetch import ops

    events: list[tuple[str, int]] = []
    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *_: None)
    monkeypatch.setitem(
        ops._NATIVE_L2,
        "cpu",
        ops.NativeL2(
            lambda w, *_: events.append(("fork", w.data_ptr())),
            lambda w: events.append(("join", w.data_ptr())),
            lambda device: None,
        ),
    )
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


def _forced_order(method: str):
    """A stand-in for inductor's ``reorder_for_peak_memory`` that always returns ``method``'s
    order (inductor would keep whichever estimates the least memory)."""
    from torch._inductor import memory

    def reorder(nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs, **_):
        if method == "none":
            return nodes
        _, freeable = memory.prepare_planning_info(
            nodes, name_to_buf, name_to_fused_node, graph_inputs, graph_outputs
        )
        if method == "lpmf":
            return memory.topological_sort_lpmf(nodes, freeable, name_to_buf, graph_outputs)
        return getattr(memory, f"topological_sort_{method}")(nodes)

    return reorder


def _dense():
    return SynthModel(SynthSpec(layers=2, hidden=64, intermediate=128))


def _split_actquant():
    return SynthModel(SynthSpec(layers=2, fused=False, naming="hf", act_quant=True))


def _llama():
    from fxprefetch.presets import build_model

    return build_model("llama-tiny", layers=2)


@pytest.mark.compile
@pytest.mark.parametrize(
    ("build", "order"),
    [
        pytest.param(_dense, "default", id="dense"),
        pytest.param(_split_actquant, "default", id="split-actquant"),
        *(pytest.param(_llama, o, id=f"llama-tiny-{o}") for o in ("default", "none", "bfs")),
        *(pytest.param(_llama, o, id=f"llama-tiny-{o}") for o in ("dfs", "lpmf")),
    ],
)
def test_inductor_emits_fork_window_join_gemm_on_the_cpu(
    build, order, cpu_side_stream, fresh_dynamo, monkeypatch
):
    """Under inductor's default order and each peak-memory order forced (none, BFS, DFS,
    LPMF): BFS and DFS broke fork -> window -> join -> GEMM before the prefetch carried
    dependencies inductor respects."""
    from torch._inductor import memory
    from torch._inductor.utils import run_and_get_code

    import fxprefetch

    if order != "default":
        monkeypatch.setattr(memory, "reorder_for_peak_memory", _forced_order(order))
    model = build()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    options = {"target": "inductor", "native_prefetch": "always"}
    compiled = torch.compile(model, backend="npu_prefetch", options=options)
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
    """With a GPU's device setup (an H200's, the CPU standing in), o_proj hides
    behind attention and down_proj behind SiLU-and-mul: 4 forks per layer, each fork ->
    window -> join -> GEMM in the code inductor emits, every fork closed, outputs equal.
    (``force_prefetch``: the H200's profile predicts each of them to lose.)"""
    from torch._inductor.utils import run_and_get_code

    import fxprefetch
    from fxprefetch.devices import simulated_setup

    monkeypatch.setattr(
        "fxprefetch.targets.device_setup",
        lambda **_: simulated_setup("h200", {"cpu"}),
    )
    model = SynthModel(SynthSpec(layers=2, hidden=64, intermediate=128))
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    forced = {"target": "inductor", "weight_prefetch_config": {"force_prefetch": True}}
    compiled = torch.compile(model, backend="npu_prefetch", options=forced)
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


@pytest.mark.compile
def test_default_mode_uses_hints_and_the_plan_says_so(cpu_side_stream, fresh_dynamo):
    """``native_prefetch: "auto"`` without CUDA graphs: no prefetch in the compiled code."""
    from torch._inductor.utils import run_and_get_code

    import fxprefetch

    compiled = torch.compile(_dense(), backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad(), fxprefetch.collect_stats() as s:
        _, (code, *_) = run_and_get_code(compiled, torch.randint(0, 64, (1, 8)))
    assert "fxprefetch" not in code and not cpu_side_stream
    (plan,) = fxprefetch.last_plans()
    assert s.hints == len(plan.prefetched) == 4 and s.calls == 0
    assert plan.lowering == (
        "hints, left out of the compiled code; cpu: hints (native_prefetch 'auto', no CUDA graphs)"
    )


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
    from fxprefetch.devices.cuda_prefetch import peak_bandwidth
    from fxprefetch.devices.profiles import cap_for

    bandwidth = peak_bandwidth(props)
    assert bandwidth / 1e12 == pytest.approx(tb_per_s, rel=0.01), gpu
    assert cap_for(bandwidth, props.L2_cache_size) == cap_mib << 20, gpu


def test_default_cap_stays_within_a_quarter_of_l2():
    from fxprefetch.devices.profiles import cap_for

    assert cap_for(20e12, 40 * 10**6) == 9 << 20  # 40 MB / 4 in whole MiB
    assert cap_for(1e9, 50 * 10**6) == 1 << 20  # at least 1 MiB
