"""The real devices of ``fxprefetch calibrate``: a CUDA GPU, and an Ascend NPU where
``torch_npu`` imports (written against torch_npu's events, streams and graphs, and not yet
run on an NPU).

CUDA: the streaming read is :func:`read_kernel` (a Triton kernel of 16-byte loads that
bypass L1, summed into a sink so nothing is optimized away); the window is
``torch.cuda._sleep`` (a spin, memory idle) calibrated in cycles per µs; the prefetches are
fxprefetch's own (``fxprefetch.devices.cuda_prefetch``: ``fork``/``join`` on the side stream, or the
compute-stream launch), as compiled graphs run them.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fxprefetch.devices.calibrate import CalibrationError, Facts

READ_TILE = 4096  # int32 per load step: 16 KiB
READ_PROGRAMS_PER_SM = 4


@functools.cache
def read_kernel() -> Any:
    """A Triton streaming read: each program sums its ``per_program`` int32 words (16-byte
    loads with ``.cg``: cached in L2 only) into ``sink``, so the loads cannot be dropped."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["words", "per_program"])
    def stream_read(src, words, per_program, sink, TILE: tl.constexpr):  # noqa: N803
        # words and per_program are whole tiles: no mask, so the loads vectorize
        pid = tl.program_id(0)
        first = pid.to(tl.int64) * per_program
        here = tl.maximum(tl.minimum(per_program, words - first), 0)
        acc = tl.zeros([TILE], dtype=tl.int32)
        for step in range(0, here, TILE):
            at = tl.multiple_of(first + step, TILE) + tl.arange(0, TILE)
            acc += tl.load(src + at, cache_modifier=".cg")
        tl.store(sink + pid, tl.sum(acc, 0))

    return stream_read


def compile_read_kernel(capability: int = 90) -> Any:
    """Compile :func:`read_kernel` for ``sm_<capability>`` without a GPU (Triton's ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=read_kernel(),
        signature={"src": "*i32", "words": "i64", "per_program": "i64", "sink": "*i32"},
        constexprs={"TILE": READ_TILE},
        attrs={(0,): [["tt.divisibility", 16]]},  # as a launch with a tensor specializes it
    )
    return triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 8}
    )


def read_launch(nbytes: int, sms: int) -> tuple[int, int, int]:
    """``(words, words per program, programs)`` of a read of ``nbytes``: whole tiles only
    (a remainder under 16 KiB is not read)."""
    words = nbytes // 4 // READ_TILE * READ_TILE
    programs = max(1, READ_PROGRAMS_PER_SM * sms)
    per = -(-words // (programs * READ_TILE)) * READ_TILE
    return words, per, -(-words // per)


def _nvidia_driver() -> str:
    """The kernel driver's version (``570.86.15``) where /proc says it, else the CUDA driver
    API version torch reports (``CUDA driver API 12080``), else ``unknown``."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        text = ""
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    try:
        return f"CUDA driver API {torch._C._cuda_getDriverVersion()}"
    except (AttributeError, RuntimeError):
        return "unknown"


class _GraphedDevice:
    """What the CUDA and NPU devices share: bf16 tensors on ``self.device``, captured graphs
    of ``self.runtime`` (``torch.cuda`` or ``torch.npu``), timed by its events."""

    device: torch.device
    runtime: Any  # torch.cuda or torch.npu
    graph_type: str  # the runtime's graph class: "CUDAGraph" or "NPUGraph"

    def clock(self) -> float:
        return time.monotonic()

    def weight(self, nbytes: int, k: int) -> torch.Tensor:
        return torch.randn(nbytes // (2 * k), k, device=self.device, dtype=torch.bfloat16)

    def inputs(self, tokens: int, k: int) -> torch.Tensor:
        return torch.randn(tokens, k, device=self.device, dtype=torch.bfloat16)

    def capture(self, body: Callable[[], None]) -> Any:
        body()  # warm-up outside the capture: Triton compiles, library handles
        self.runtime.synchronize(self.device)
        graph = getattr(self.runtime, self.graph_type)()
        with self.runtime.graph(graph):
            body()
        return graph

    def replay_us(self, graph: Any, prime: Any = None) -> float:
        start, end = (self.runtime.Event(enable_timing=True) for _ in range(2))
        if prime is not None:
            prime.replay()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    def release(self) -> None:
        self.runtime.synchronize(self.device)
        self.runtime.empty_cache()


class CudaDevice(_GraphedDevice):
    """:class:`fxprefetch.calibrate.Device` on CUDA device ``index``."""

    lowerings = ("side_stream", "compute_stream")
    runtime = torch.cuda
    graph_type = "CUDAGraph"

    def __init__(self, index: int = 0) -> None:
        from fxprefetch.devices import cuda_prefetch

        if not cuda_prefetch.available():
            raise CalibrationError("the CUDA prefetch needs Triton and an sm_80+ GPU")
        self.cp = cuda_prefetch
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)
        self.props = torch.cuda.get_device_properties(self.device)
        cuda_prefetch.prepare(self.device)
        self.sink = torch.zeros(1 << 16, dtype=torch.int32, device=self.device)
        self.tiny = torch.zeros(256, dtype=torch.float32, device=self.device)
        self.cycles_per_us = self._sleep_rate()

    def _sleep_rate(self) -> float:
        cycles = 1_000_000
        graph = self.capture(lambda: torch.cuda._sleep(cycles))
        return cycles / statistics.median(self.replay_us(graph) for _ in range(5))

    def facts(self) -> Facts:
        p = self.props
        return Facts(
            p.name, "gpu", _nvidia_driver(), torch.__version__, f"CUDA {torch.version.cuda}",
            platform.node() or "unknown", p.L2_cache_size, p.multi_processor_count,
            self.lowerings,
        )  # fmt: skip

    def read(self, buffer: torch.Tensor) -> None:
        words, per, programs = read_launch(buffer.nbytes, self.props.multi_processor_count)
        if programs > self.sink.numel():
            raise CalibrationError(f"read of {buffer.nbytes} B needs {programs} programs")
        flat = buffer.view(-1).view(torch.int32)
        read_kernel()[(programs,)](flat, words, per, self.sink, TILE=READ_TILE, num_warps=8)

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        torch.nn.functional.linear(x, weight)

    def small_kernel(self) -> None:
        self.tiny.add_(1.0)

    def spin(self, us: float) -> None:
        torch.cuda._sleep(max(1, int(us * self.cycles_per_us)))

    def prefetch(self, lowering: str, weight: torch.Tensor, nbytes: int) -> Callable[[], None]:
        if lowering == "side_stream":
            self.cp.fork(weight, nbytes)
            return lambda: self.cp.join(weight)
        if lowering == "compute_stream":
            self.cp.prefetch_on_compute_stream(weight, nbytes)
            return lambda: None
        raise ValueError(f"unknown CUDA lowering {lowering!r}; expected one of {self.lowerings}")


class NpuDevice(_GraphedDevice):
    """:class:`fxprefetch.calibrate.Device` on an Ascend NPU through torch_npu: NPU graphs,
    events and streams; ``ascend_cmo`` is ``npu_prefetch`` on the compute stream (a Cmo
    task), ``ascend_side_stream`` the same on a side stream joined before the linear. The
    window is a chain of tiny kernels (torch_npu has no spin kernel), the read a sum.
    Written against torch_npu's API; not yet run on an NPU."""

    lowerings = ("ascend_cmo", "ascend_side_stream")
    graph_type = "NPUGraph"

    def __init__(self, index: int = 0) -> None:
        import torch_npu  # noqa: F401  (registers torch.npu)

        self.npu = self.runtime = torch.npu  # type: ignore[attr-defined]
        self.device = torch.device("npu", index)
        self.npu.set_device(self.device)
        self.prefetch_op = torch.ops.npu.npu_prefetch.default
        self.side = self.npu.Stream(device=self.device)
        self.sink = torch.zeros(1 << 16, dtype=torch.float32, device=self.device)
        self.tiny = torch.zeros(256, dtype=torch.float32, device=self.device)
        graph = self.capture(lambda: [self.small_kernel() for _ in range(64)])
        self.tiny_us = statistics.median(self.replay_us(graph) for _ in range(5)) / 64

    def facts(self) -> Facts:
        props = self.npu.get_device_properties(self.device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        cores = int(
            getattr(props, "cube_core_num", 0) or getattr(props, "multi_processor_count", 0)
        )
        version = getattr(importlib.import_module("torch_npu"), "__version__", "unknown")
        return Facts(
            str(self.npu.get_device_name(self.device)), "npu", "unknown",
            f"{torch.__version__} (torch_npu {version})", "CANN (version not reported)",
            platform.node() or "unknown", l2 or 192 * 10**6, cores, self.lowerings,
        )  # fmt: skip

    def read(self, buffer: torch.Tensor) -> None:
        total = buffer.view(-1).view(torch.float16).sum(dtype=torch.float32)
        self.sink[:1].copy_(total.view(1))

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        torch.nn.functional.linear(x, weight)

    def small_kernel(self) -> None:
        self.tiny.add_(1.0)

    def spin(self, us: float) -> None:
        for _ in range(max(1, round(us / getattr(self, "tiny_us", 1.0)))):
            self.small_kernel()

    def prefetch(self, lowering: str, weight: torch.Tensor, nbytes: int) -> Callable[[], None]:
        if lowering == "ascend_cmo":
            self.prefetch_op(weight, None, nbytes, 0)
            return lambda: None
        if lowering == "ascend_side_stream":
            current = self.npu.current_stream(self.device)
            self.side.wait_stream(current)
            with self.npu.stream(self.side):
                self.prefetch_op(weight, None, nbytes, 0)
            return lambda: current.wait_stream(self.side)
        raise ValueError(f"unknown NPU lowering {lowering!r}; expected one of {self.lowerings}")


def torch_npu_present() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def detect() -> CudaDevice | NpuDevice:
    """The device to calibrate: a CUDA GPU, else an NPU where torch_npu imports; else
    :class:`CalibrationError` saying there is neither."""
    if torch.cuda.is_available():
        return CudaDevice()
    if torch_npu_present():
        try:
            import torch_npu  # noqa: F401

            if torch.npu.is_available():  # type: ignore[attr-defined]
                return NpuDevice()
        except ImportError:
            pass
    raise CalibrationError(
        "no CUDA GPU or Ascend NPU here (torch.cuda.is_available() is False and torch_npu "
        "reports no device): nothing to calibrate"
    )
