"""A native L2 prefetch for NVIDIA GPUs (sm_80+): a Triton kernel, on a side stream or not.

The instruction: on sm_90+ PTX ``cp.async.bulk.prefetch.L2.global [addr], size;`` (ptxas
emits ``UBLKPF.L2``), fire-and-forget, 16-byte aligned address and a size multiple of 16, at
most ``MAX_BULK`` (1 MiB - 16 B: the machine code keeps 16 bits of ``size >> 4``); on sm_80
``prefetch.global.L2 [addr];`` (``CCTL.E.PML2``), one 128-byte line each. Both take an
optional L2 cache hint (``evict_last``; without a persisting L2 set-aside it may protect
nothing, so it is an option, measured by ``benchmarks/probe_gpu_kernel.py``). Triton emits
either through ``tl.inline_asm_elementwise(..., is_pure=False)``; the kernel takes the
address as an integer, so it reads no tensor and torch's mutation analysis never sees it.

One instruction per range: a program has exactly one lane per thread (``32 * num_warps``
lanes), so no thread repeats another's range; the grid covers the prefetch with at most one
program per SM (and at least ``bytes_per_program`` bytes per program), unless a lane's share
would pass ``MAX_BULK``. ``tests/devices/test_cuda_prefetch.py`` checks both from the compiled code.

Streams, two lowerings (``fxprefetch.ops.prefetch_native``):

- ``side``: :func:`fork` makes this thread's side stream wait for the current one, launches
  there, and counts the fork as open; :func:`join` makes the current stream wait for the side
  stream, and only while a fork is open (so a join never waits on a stream no fork touched,
  which CUDA-graph capture refuses). Every fork forks, even of an empty range.
- ``compute``: :func:`prefetch_on_compute_stream` launches on the current stream, no join:
  a bulk prefetch does not wait for its data, so the kernel ends within microseconds.

Side streams are per device and per thread (two threads capturing at once never share one).
:func:`prepare` compiles the kernel and makes the stream for one device, before any capture;
the inductor pipeline calls it for the devices a graph prefetches on.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

ALIGN = 16  # cp.async.bulk.prefetch: 16-byte aligned address, size a multiple of 16
LINE = 128  # prefetch.global.L2: one cache line per instruction
MAX_BULK = (1 << 20) - ALIGN  # the largest size one UBLKPF encodes (16 bits of size >> 4)
WARP = 32
CACHE_HINTS = ("none", "evict_last")  # the kernel's L2 hints (the ``cache_hint`` option's values)
STREAMS = ("side", "compute")

# Launch defaults until benchmarks/probe_gpu_kernel.py has measured them on a GPU.
BULK_WARPS = 1  # UBLKPF takes uniform registers: a warp's lanes issue one after another
LINE_WARPS = 4
BYTES_PER_PROGRAM = 64 << 10  # the least a program prefetches before another is added

FALLBACK_BYTES_PER_S = 3.35e12  # H100 SXM HBM3, where the device does not report its memory


def peak_bandwidth(props: Any) -> float:
    """Peak HBM bandwidth in bytes/s from the device's memory clock (kHz, double data rate)
    and bus width (bits); the H100 figure where torch does not report them."""
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz <= 0 or bus_bits <= 0:
        return FALLBACK_BYTES_PER_S
    return clock_khz * 1e3 * 2 * bus_bits / 8


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


def tensor_range(weight: torch.Tensor, max_size: int, offset: int) -> tuple[int, int]:
    """:func:`clamp_range` of ``weight``'s bytes, which end where its storage ends: an
    expanded or strided view covers fewer bytes than ``numel * itemsize``."""
    itemsize = weight.element_size()
    storage = weight.untyped_storage()
    first = weight.storage_offset() * itemsize
    nbytes = max(0, min(weight.numel() * itemsize, storage.nbytes() - first))
    if nbytes <= offset:  # the view reaches past its storage: nothing is left to prefetch
        return storage.data_ptr() + first, 0
    return clamp_range(storage.data_ptr() + first, nbytes, max_size, offset)


@dataclass(frozen=True)
class Launch:
    """How one prefetch of ``size`` bytes is launched."""

    grid: int  # programs
    num_warps: int  # per program; one lane per thread
    per_lane: int  # bytes each lane prefetches (its share; the last lanes may get less)
    steps: int  # instructions per lane (1 for the bulk prefetch, lines for sm_80)

    @property
    def lanes(self) -> int:
        return WARP * self.num_warps


def launch_params(
    size: int,
    bulk: bool,
    sms: int,
    num_warps: int | None = None,
    bytes_per_program: int | None = None,
) -> Launch:
    """The launch of a ``size``-byte prefetch on a device with ``sms`` multiprocessors: one
    program per ``bytes_per_program`` bytes, at most one per SM, more only where a bulk lane's
    share would exceed ``MAX_BULK``."""
    warps = num_warps or (BULK_WARPS if bulk else LINE_WARPS)
    chunk = bytes_per_program or BYTES_PER_PROGRAM
    if warps < 1 or warps & (warps - 1) or chunk < 1 or sms < 1:
        raise ValueError(f"prefetch launch: bad num_warps={warps}, bytes_per_program={chunk}")
    lanes = WARP * warps
    unit = ALIGN if bulk else LINE
    programs = min(max(1, -(-size // chunk)), sms)
    if bulk:
        programs = max(programs, -(-size // (lanes * MAX_BULK)))
    per_lane = max(unit, -(-size // (programs * lanes * unit)) * unit)
    if bulk and per_lane > MAX_BULK:  # unreachable by construction; the instruction would wrap
        raise AssertionError(f"bulk prefetch lane of {per_lane} B > {MAX_BULK} B")
    return Launch(programs, warps, per_lane, 1 if bulk else per_lane // LINE)


@functools.cache
def kernel() -> Any:
    """The Triton kernel (compiled per target on first launch, or by :func:`compile_for`)."""
    import triton
    import triton.language as tl

    @triton.jit
    def l2_prefetch(
        address,
        size,
        per_lane,
        steps,
        lanes: tl.constexpr,
        bulk: tl.constexpr,
        asm: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, lanes).to(tl.int64)
        first = (pid * lanes + lane) * per_lane
        left = tl.maximum(tl.minimum(size - first, per_lane), 0)
        if bulk:  # one instruction for the lane's whole share
            tl.inline_asm_elementwise(
                asm, "=r,l,r", [address + first, left.to(tl.int32)], dtype=tl.int32,
                is_pure=False, pack=1,
            )  # fmt: skip
        else:  # one instruction per 128-byte line of the share
            for k in range(steps):
                at = k * 128
                tl.inline_asm_elementwise(
                    asm, "=r,l,r", [address + first + at, (left - at).to(tl.int32)],
                    dtype=tl.int32, is_pure=False, pack=1,
                )  # fmt: skip

    return l2_prefetch


def _asm(instruction: str) -> str:
    """One lane's instruction, skipped where its share is empty: $1 address, $2 bytes left."""
    return f"{{ .reg .pred p; setp.gt.s32 p, $2, 0; {instruction} mov.u32 $0, 0; }}"


_ASM = {
    (True, "none"): _asm("@p cp.async.bulk.prefetch.L2.global [$1], $2;"),
    (True, "evict_last"): _asm(
        ".reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
        "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol;"
    ),
    (False, "none"): _asm("@p prefetch.global.L2 [$1];"),
    (False, "evict_last"): _asm("@p prefetch.global.L2::evict_last [$1];"),
}


def constexprs(bulk: bool, launch: Launch, cache_hint: str = "none") -> dict[str, Any]:
    if cache_hint not in CACHE_HINTS:
        raise ValueError(f"prefetch: cache_hint {cache_hint!r} is not one of {CACHE_HINTS}")
    return {"lanes": launch.lanes, "bulk": bulk, "asm": _ASM[bulk, cache_hint]}


def compile_for(capability: int, num_warps: int | None = None, cache_hint: str = "none") -> Any:
    """Compile the kernel for ``sm_<capability>`` without a GPU (Triton ships ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bulk = capability >= 90
    launch = launch_params(1, bulk, 1, num_warps)
    source = ASTSource(
        fn=kernel(),
        signature={"address": "i64", "size": "i64", "per_lane": "i64", "steps": "i32"},
        constexprs=constexprs(bulk, launch, cache_hint),
    )
    return triton.compile(
        source,
        target=GPUTarget("cuda", capability, WARP),
        options={"num_warps": launch.num_warps},
    )


@functools.cache
def _device_facts(index: int) -> tuple[bool, int]:
    """(bulk prefetch available, multiprocessors) of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    return props.major >= 9, props.multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def launch_prefetch(
    start: int,
    size: int,
    device: torch.device,
    *,
    cache_hint: str = "none",
    num_warps: int | None = None,
    bytes_per_program: int | None = None,
) -> Launch | None:
    """Launch the kernel on the current stream for ``size`` bytes from the 16-byte aligned
    ``start``; None when ``size`` is 0 (nothing launched)."""
    if size <= 0:
        return None
    bulk, sms = _device_facts(_index(device))
    launch = launch_params(size, bulk, sms, num_warps, bytes_per_program)
    kernel()[(launch.grid,)](
        start,
        size,
        launch.per_lane,
        launch.steps,
        **constexprs(bulk, launch, cache_hint),
        num_warps=launch.num_warps,
    )
    return launch


class _SideStreams(threading.local):
    """This thread's side stream per device, and its forks not yet joined."""

    def __init__(self) -> None:
        self.streams: dict[int, torch.cuda.Stream] = {}
        self.open: dict[int, int] = {}

    def get(self, index: int) -> torch.cuda.Stream:
        stream = self.streams.get(index)
        if stream is None:
            stream = self.streams[index] = torch.cuda.Stream(device=index)
        return stream


_SIDE = _SideStreams()


def fork(weight: torch.Tensor, max_size: int, offset: int = 0, cache_hint: str = "none") -> None:
    """The side stream waits for the current one and prefetches ``weight``'s bytes into L2.
    It forks even where no aligned byte is left, so the join always has its fork."""
    device = weight.device
    index = _index(device)
    side = _SIDE.get(index)
    side.wait_stream(torch.cuda.current_stream(device))
    _SIDE.open[index] = _SIDE.open.get(index, 0) + 1
    start, size = tensor_range(weight, max_size, offset)
    with torch.cuda.stream(side):
        launch_prefetch(start, size, device, cache_hint=cache_hint)


def join(weight: torch.Tensor) -> None:
    """The current stream waits for this thread's side stream, if a fork is open on it."""
    index = _index(weight.device)
    if not _SIDE.open.get(index):
        return
    _SIDE.open[index] -= 1
    torch.cuda.current_stream(weight.device).wait_stream(_SIDE.get(index))


def prefetch_on_compute_stream(
    weight: torch.Tensor, max_size: int, offset: int = 0, cache_hint: str = "none"
) -> None:
    """Launch the prefetch on the current stream: nothing to join."""
    start, size = tensor_range(weight, max_size, offset)
    launch_prefetch(start, size, weight.device, cache_hint=cache_hint)


def native(weight: torch.Tensor, max_size: int, offset: int, stream: str, cache_hint: str) -> None:
    """``fxprefetch.prefetch_native`` on CUDA: fork onto the side stream, or not."""
    if stream == "side":
        fork(weight, max_size, offset, cache_hint)
    else:
        prefetch_on_compute_stream(weight, max_size, offset, cache_hint)


def prefetch_cuda(
    weight: torch.Tensor, dependency: torch.Tensor | None, max_size: int, offset: int = 0
) -> None:
    """``fxprefetch.prefetch`` on CUDA (eager code, the eager target): the compute-stream
    prefetch, which needs no join and is legal inside a CUDA-graph capture."""
    prefetch_on_compute_stream(weight, max_size, offset)


def available() -> bool:
    """CUDA and Triton present, and the current device sm_80+."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability()[0] >= 8


@functools.cache
def _prepared(index: int) -> None:
    device = torch.device("cuda", index)
    if torch.cuda.get_device_capability(index)[0] < 8:
        raise RuntimeError(f"fxprefetch: the CUDA prefetch needs sm_80+, {device} is older")
    weight = torch.empty(4096, dtype=torch.uint8, device=device)
    for cache_hint in CACHE_HINTS:  # compile every variant now, not inside a capture
        prefetch_on_compute_stream(weight, 4096, 0, cache_hint)
    torch.cuda.synchronize(device)


def prepare(device: torch.device) -> None:
    """Compile the kernel for ``device`` and make this thread's side stream there, before any
    CUDA-graph capture (once per device; the stream once per thread)."""
    index = _index(device)
    _prepared(index)
    _SIDE.get(index)


def register() -> bool:
    """Make the CUDA prefetch native where :func:`available`; True if registered. Touches no
    device: :func:`prepare` runs for the devices a compiled graph prefetches on."""
    if not available():
        return False
    from fxprefetch.ops import register_native_l2, register_native_prefetch

    register_native_prefetch("cuda", prefetch_cuda)
    register_native_l2("cuda", native, join, prepare)
    logger.info("fxprefetch: native CUDA L2 prefetch registered (Triton kernel)")
    return True
