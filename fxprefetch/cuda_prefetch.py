"""A native L2 prefetch for NVIDIA GPUs (sm_80+): a Triton kernel on a side stream.

The instruction: on sm_90+ PTX ``cp.async.bulk.prefetch.L2.global [addr], size;`` (ptxas
emits ``UBLKPF.L2``), fire-and-forget, 16-byte aligned address and a size multiple of 16; on
sm_80 ``prefetch.global.L2::evict_last [addr];`` (``CCTL.E.PML2``), one 128-byte line each.
Triton emits either through ``tl.inline_asm_elementwise(..., is_pure=False)``; the kernel
takes the address as an integer, so it reads no tensor and torch's mutation analysis never
sees it (no ``triton_op``: with impure asm, torch would assume every input is mutated).

Streams: a prefetch on the compute stream adds a kernel boundary that eats a short vector
window, so it runs on a per-device side stream. :func:`prefetch_cuda` forks (the side stream
waits for the current one: the prefetch sits after its dependency in the graph), launches,
and returns; :func:`join_cuda` makes the current stream wait for the side stream, right
before the linear that reads the weight (the inductor pipeline inserts that join; see
``passes/prefetch_joins.py``). Every fork rejoins in the same graph, so CUDA-graph capture
sees a closed fork/join. Nothing is allocated on the side stream.

Registered by :func:`register` only where CUDA and Triton are present and every visible
device is sm_80+; elsewhere nothing changes.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

logger = logging.getLogger("fxprefetch")

ALIGN = 16  # cp.async.bulk.prefetch: 16-byte aligned address, size a multiple of 16
LINE = 128  # prefetch.global.L2: one cache line per instruction
BULK_CHUNK = 1 << 20  # bytes per program on sm_90+ (LANES lanes of BULK_CHUNK // LANES)
BULK_LANES = 8  # UBLKPF takes uniform registers: lanes run one after another
LINE_CHUNK = 1 << 16  # bytes per program on sm_80 (one lane per 128-byte line)

# The default cap: a prefetch hides at most window x bandwidth bytes. A norm or activation
# window before a decode linear lasts about 2.5 µs; at H100's 3.35 TB/s that is 8 MiB (the
# Ascend guide's 18 MiB would run far past the window). benchmarks/bench_gpu_prefetch.py
# sweeps the cap to check it.
WINDOW_US = 2.5
FALLBACK_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, where the device does not report its memory
MiB = 1 << 20


def peak_bandwidth(props: Any) -> float:
    """Peak HBM bandwidth in bytes/s from the device's memory clock (kHz, double data rate)
    and bus width (bits); the H100 figure where torch does not report them."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz <= 0 or bus_bits <= 0:
        return FALLBACK_BYTES_PER_S
    return clock_khz * 1e3 * 2 * bus_bits / 8


def cap_for(bytes_per_s: float, l2_bytes: int) -> int:
    """``WINDOW_US`` of bandwidth in whole MiB (at least 1), and at most a quarter of L2."""
    window_bytes = max(1, round(WINDOW_US * 1e-6 * bytes_per_s / MiB)) * MiB
    return min(window_bytes, max(MiB, l2_bytes // 4 // MiB * MiB))


def default_cap(device: torch.device | int | None = None) -> int:
    """The byte cap of a CUDA prefetch where the config writes no ``max_prefetch_bytes``."""
    props = torch.cuda.get_device_properties(
        device if device is not None else torch.cuda.current_device()
    )
    return cap_for(peak_bandwidth(props), props.L2_cache_size)


def clamp_range(address: int, nbytes: int, max_size: int, offset: int) -> tuple[int, int]:
    """``(start, size)`` to prefetch: ``min(max_size, nbytes - offset)`` bytes from
    ``address + offset``, the start rounded up to 16 bytes and the size down to a multiple
    of 16 (what the instruction accepts). ``size`` is 0 when nothing aligned is left."""
    if max_size <= 0 or not 0 <= offset < nbytes:
        raise ValueError(f"prefetch: bad range (max_size={max_size}, offset={offset}, {nbytes} B)")
    start = address + offset
    size = min(max_size, nbytes - offset)
    aligned = -(-start // ALIGN) * ALIGN
    size -= aligned - start
    return aligned, max(size, 0) // ALIGN * ALIGN


def grid_size(size: int, bulk: bool) -> int:
    chunk = BULK_CHUNK if bulk else LINE_CHUNK
    return max(1, -(-size // chunk))


@functools.cache
def kernel() -> Any:
    """The Triton kernel (compiled per target on first launch, or by :func:`compile_for`)."""
    import triton
    import triton.language as tl

    @triton.jit
    def l2_prefetch(address, size, chunk: tl.constexpr, lanes: tl.constexpr, asm: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, lanes).to(tl.int64)
        per_lane: tl.constexpr = chunk // lanes
        first = pid * chunk + lane * per_lane
        left = tl.minimum(size - first, per_lane)
        left = tl.where(left > 0, left, 0).to(tl.int32)
        tl.inline_asm_elementwise(
            asm, "=r,l,r", [address + first, left], dtype=tl.int32, is_pure=False, pack=1
        )

    return l2_prefetch


# One lane's instruction, skipped where its share of the range is empty: $1 address, $2 size.
_BULK_ASM = (
    "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
    "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }"
)
_LINE_ASM = (
    "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }"
)


def constexprs(bulk: bool) -> dict[str, Any]:
    if bulk:
        return {"chunk": BULK_CHUNK, "lanes": BULK_LANES, "asm": _BULK_ASM}
    return {"chunk": LINE_CHUNK, "lanes": LINE_CHUNK // LINE, "asm": _LINE_ASM}


def compile_for(capability: int) -> Any:
    """Compile the kernel for ``sm_<capability>`` without a GPU (Triton ships ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bulk = capability >= 90
    source = ASTSource(
        fn=kernel(), signature={"address": "i64", "size": "i64"}, constexprs=constexprs(bulk)
    )
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))


class _SideStreams:
    def __init__(self) -> None:
        self.streams: dict[int, torch.cuda.Stream] = {}

    def get(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self.streams.get(index)
        if stream is None:  # created before any capture: prepare() runs at registration
            stream = self.streams[index] = torch.cuda.Stream(device=index)
        return stream


_STREAMS = _SideStreams()


def _bulk(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def prefetch_cuda(
    weight: torch.Tensor, dependency: torch.Tensor | None, max_size: int, offset: int = 0
) -> None:
    """Fork onto the side stream and prefetch ``weight``'s bytes into L2 there."""
    address = weight.untyped_storage().data_ptr() + weight.storage_offset() * weight.element_size()
    start, size = clamp_range(address, weight.nbytes, max_size, offset)
    if size == 0:
        return
    device = weight.device
    side = _STREAMS.get(device)
    side.wait_stream(torch.cuda.current_stream(device))
    bulk = _bulk(device)
    with torch.cuda.stream(side):
        kernel()[(grid_size(size, bulk),)](start, size, **constexprs(bulk))


def join_cuda(weight: torch.Tensor) -> None:
    """The current stream waits for the side stream's prefetches (before the linear)."""
    device = weight.device
    torch.cuda.current_stream(device).wait_stream(_STREAMS.get(device))


def available() -> bool:
    """CUDA and Triton present, and every visible device sm_80+."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    count = torch.cuda.device_count()
    return count > 0 and all(torch.cuda.get_device_capability(i)[0] >= 8 for i in range(count))


def prepare() -> None:
    """Create the side streams and compile the kernel now, before any CUDA-graph capture."""
    for index in range(torch.cuda.device_count()):
        device = torch.device("cuda", index)
        _STREAMS.get(device)
        weight = torch.empty(4096, dtype=torch.uint8, device=device)
        prefetch_cuda(weight, None, 4096)
        join_cuda(weight)
    torch.cuda.synchronize()


def register() -> bool:
    """Make the CUDA prefetch native where :func:`available`; True if registered."""
    if not available():
        return False
    from fxprefetch.ops import register_native_join, register_native_prefetch

    prepare()
    register_native_prefetch("cuda", prefetch_cuda)
    register_native_join("cuda", join_cuda)
    logger.info("fxprefetch: native CUDA L2 prefetch registered (side stream, Triton kernel)")
    return True
