"""``torch.ops.fxprefetch.prefetch``: the side-effecting prefetch op the pass inserts.

Its schema is torch_npu's ``npu_prefetch`` to the letter, so lowering to the NPU is a change
of target and nothing else::

    prefetch(Tensor weight, Tensor? dependency, int max_size, int offset=0) -> ()

Kernels:
- fake/meta: argument checks only (``max_size > 0``, ``0 <= offset < nbytes``);
- CPU: a hint that moves no memory (there is no L2 prefetch to ask for), counted in
  :mod:`fxprefetch.runtime_stats`;
- other devices: counted, then handed to the device's own prefetch where one is registered
  (``torch.ops.npu.npu_prefetch`` on Ascend), else a hint like on CPU.

The op returns nothing, so it is registered with :func:`torch.fx.node.has_side_effect`:
FX dead-code elimination, AOT autograd and inductor's scheduler all keep it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx.node import has_side_effect

from fxprefetch import runtime_stats

NAMESPACE = "fxprefetch"
SCHEMA = "prefetch(Tensor weight, Tensor? dependency, int max_size, int offset=0) -> ()"

_lib = torch.library.Library(NAMESPACE, "DEF")
_lib.define(SCHEMA, tags=())

PREFETCH_OP = torch.ops.fxprefetch.prefetch.default
has_side_effect(PREFETCH_OP)
has_side_effect(torch.ops.fxprefetch.prefetch)


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor covers (``numel * itemsize``); symbolic sizes stay symbolic."""
    return t.numel() * t.element_size()


def check_prefetch_args(weight: torch.Tensor, max_size: int, offset: int) -> None:
    """The argument checks of torch_npu's meta kernel."""
    torch._check(max_size > 0, lambda: f"prefetch: max_size must be > 0, got {max_size}")
    nbytes = tensor_nbytes(weight)
    torch._check(
        0 <= offset < nbytes,
        lambda: (
            f"prefetch: offset must be in [0, {nbytes}) for a tensor of {nbytes} bytes, "
            f"got {offset}"
        ),
    )


@torch.library.register_fake("fxprefetch::prefetch", lib=_lib)
def _prefetch_fake(
    weight: torch.Tensor, dependency: torch.Tensor | None, max_size: int, offset: int = 0
) -> None:
    check_prefetch_args(weight, max_size, offset)


# device type -> the device's own prefetch, with the same arguments.
_NATIVE_PREFETCH: dict[str, Callable[..., None]] = {}


def register_native_prefetch(device_type: str, fn: Callable[..., None]) -> None:
    """Route prefetches on ``device_type`` tensors to ``fn(weight, dependency, size, offset)``."""
    _NATIVE_PREFETCH[device_type] = fn


def _native_npu_prefetch() -> Callable[..., None] | None:
    npu_ns = getattr(torch.ops, "npu", None)
    try:
        return npu_ns.npu_prefetch.default if npu_ns is not None else None
    except AttributeError:
        return None


def native_prefetch_devices() -> set[str]:
    """Device types whose prefetches reach hardware."""
    devices = set(_NATIVE_PREFETCH)
    if _native_npu_prefetch() is not None:
        devices.add("npu")
    return devices


def has_native_prefetch(device_type: str) -> bool:
    """Whether prefetches on ``device_type`` reach hardware (else they are only hints)."""
    if device_type in _NATIVE_PREFETCH:
        return True
    return device_type == "npu" and _native_npu_prefetch() is not None


def _checked_size(weight: torch.Tensor, max_size: int, offset: int) -> int:
    """:func:`check_prefetch_args` on concrete integers (the hot path: no symbolic
    machinery, 4x cheaper), returning the clamped size."""
    nbytes = weight.nbytes
    if max_size <= 0:
        raise RuntimeError(f"prefetch: max_size must be > 0, got {max_size}")
    if not 0 <= offset < nbytes:
        raise RuntimeError(
            f"prefetch: offset must be in [0, {nbytes}) for a tensor of {nbytes} bytes, "
            f"got {offset}"
        )
    return min(max_size, nbytes - offset)


def _cpu_kernel(
    weight: torch.Tensor, dependency: torch.Tensor | None, max_size: int, offset: int = 0
) -> None:
    """CPU has no L2 prefetch to ask for: check, count, and return."""
    runtime_stats.record(weight, max_size, _checked_size(weight, max_size, offset))
    native = _NATIVE_PREFETCH.get("cpu") if _NATIVE_PREFETCH else None
    if native is not None:
        native(weight, dependency, max_size, offset)


def _device_kernel(
    weight: torch.Tensor, dependency: torch.Tensor | None, max_size: int, offset: int = 0
) -> None:
    """Accelerators: check, count, then the device's own prefetch where one exists."""
    runtime_stats.record(weight, max_size, _checked_size(weight, max_size, offset))
    device = weight.device.type
    native = _NATIVE_PREFETCH.get(device)
    if native is None and device == "npu":
        native = _native_npu_prefetch()
        if native is not None:
            _NATIVE_PREFETCH["npu"] = native
    if native is not None:
        native(weight, dependency, max_size, offset)


_lib.impl("prefetch", _cpu_kernel, "CPU")
for _key in ("CUDA", "XPU", "PrivateUse1"):
    _lib.impl("prefetch", _device_kernel, _key)


def prefetch_tensor(
    weight: torch.Tensor, dependency: torch.Tensor | None, max_size: int, offset: int = 0
) -> None:
    """The prefetch kernel for ``weight``'s device (a hint on the CPU without a native one)."""
    kernel = _cpu_kernel if weight.device.type == "cpu" else _device_kernel
    kernel(weight, dependency, max_size, offset)


# -- token bounds checked at run time ----------------------------------------------------------
# Where a graph's token count is symbolic and its range straddles a prefetch's token bounds,
# the pass inserts this op instead: ``tokens`` is the linear's token count as a SymInt graph
# value (passing it adds no guard), and the kernel prefetches only when
# ``min_tokens <= tokens <= max_tokens`` (``max_tokens`` -1: no upper bound).
RANGE_SCHEMA = (
    "prefetch_in_range(Tensor weight, Tensor? dependency, int max_size, int offset, "
    "SymInt tokens, int min_tokens, int max_tokens) -> ()"
)
_lib.define(RANGE_SCHEMA, tags=())
RANGE_OP = torch.ops.fxprefetch.prefetch_in_range.default
has_side_effect(RANGE_OP)
has_side_effect(torch.ops.fxprefetch.prefetch_in_range)


def tokens_in_range(tokens: int, min_tokens: int, max_tokens: int) -> bool:
    """Whether a prefetch bounded to ``[min_tokens, max_tokens]`` runs (-1: no upper bound)."""
    return min_tokens <= tokens and (max_tokens < 0 or tokens <= max_tokens)


@torch.library.register_fake("fxprefetch::prefetch_in_range", lib=_lib)
def _range_fake(
    weight: torch.Tensor,
    dependency: torch.Tensor | None,
    max_size: int,
    offset: int,
    tokens: int,
    min_tokens: int,
    max_tokens: int,
) -> None:
    check_prefetch_args(weight, max_size, offset)  # never reads ``tokens``: no guard


def _range_kernel(
    weight: torch.Tensor,
    dependency: torch.Tensor | None,
    max_size: int,
    offset: int,
    tokens: int,
    min_tokens: int,
    max_tokens: int,
) -> None:
    if tokens_in_range(tokens, min_tokens, max_tokens):
        prefetch_tensor(weight, dependency, max_size, offset)


for _key in ("CPU", "CUDA", "XPU", "PrivateUse1"):
    _lib.impl("prefetch_in_range", _range_kernel, _key)


# -- join: where a device's native prefetch runs on a side stream ------------------------------
# ``after``: the linear's other inputs. Inductor emits a pointwise kernel lazily, where its
# buffer is first needed, so the tail of a window is computed when the linear's input is
# realized; the join reads those inputs so that it is emitted after that tail, not before.
JOIN_SCHEMA = "prefetch_join(Tensor weight, Tensor[] after) -> ()"
_lib.define(JOIN_SCHEMA, tags=())
JOIN_OP = torch.ops.fxprefetch.prefetch_join.default
has_side_effect(JOIN_OP)
has_side_effect(torch.ops.fxprefetch.prefetch_join)

# device type -> "wait for this device's prefetches" (the compute stream waits for the side one)
_NATIVE_JOIN: dict[str, Callable[[torch.Tensor], None]] = {}


def register_native_join(device_type: str, fn: Callable[[torch.Tensor], None]) -> None:
    """Route ``prefetch_join`` on ``device_type`` tensors to ``fn(weight)``."""
    _NATIVE_JOIN[device_type] = fn


def native_join_devices() -> set[str]:
    """Device types whose native prefetch must be joined before the linear reads the weight."""
    return set(_NATIVE_JOIN)


@torch.library.register_fake("fxprefetch::prefetch_join", lib=_lib)
def _join_fake(weight: torch.Tensor, after: list[torch.Tensor]) -> None:
    return None


def _join_kernel(weight: torch.Tensor, after: list[torch.Tensor]) -> None:
    native = _NATIVE_JOIN.get(weight.device.type)
    if native is not None:
        native(weight)


for _key in ("CPU", "CUDA", "XPU", "PrivateUse1"):
    _lib.impl("prefetch_join", _join_kernel, _key)


def join_tensor(weight: torch.Tensor) -> None:
    """Wait for the side-stream prefetches of ``weight``'s device, where it has a join."""
    native = _NATIVE_JOIN.get(weight.device.type)
    if native is not None:
        native(weight)


# Every op that prefetches, with the join that closes its fork (the by-name ops of
# integrations register theirs): the passes that relax, elide, join or strip prefetches treat
# them alike. A prefetch op's arguments before ``dependency`` name its weight; its join takes
# those, then ``Tensor[] after``.
PREFETCH_OPS: list[torch._ops.OpOverload] = []
JOIN_OPS: list[torch._ops.OpOverload] = [JOIN_OP]
JOIN_OF: dict[torch._ops.OpOverload, torch._ops.OpOverload] = {}


def register_prefetch_op(op: torch._ops.OpOverload, join: torch._ops.OpOverload) -> None:
    """Declare ``op`` a prefetch whose side-stream fork ``join`` closes."""
    for each in (op, join):
        has_side_effect(each)
    if op not in PREFETCH_OPS:
        PREFETCH_OPS.append(op)
    if join not in JOIN_OPS:
        JOIN_OPS.append(join)
    JOIN_OF[op] = join


register_prefetch_op(PREFETCH_OP, JOIN_OP)
register_prefetch_op(RANGE_OP, JOIN_OP)
