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

Where a device registers a native L2 prefetch (:func:`register_native_l2`: CUDA), the
inductor pipeline lowers ``prefetch`` to ``prefetch_native`` (side stream or compute
stream, a cache hint) and closes each side-stream fork with a ``prefetch_join``; both carry
an ``order`` list that pins their place in inductor's schedule (``passes/lower_native.py``).

``prefetch_in_range`` (a prefetch that checks its token count when it runs) and the by-name
prefetches of integrations (``fxprefetch.vllm.moe``) are not lowered on CUDA: their kernels
call the device's prefetch directly (:func:`prefetch_tensor`), on the compute stream, so they
need no join. Ascend's side-stream lowering forks them (:data:`SIDE_FORK_OF`: a range
``prefetch_native``, the integration's fork op), joined like every fork. :data:`PREFETCH_OPS`
lists every prefetch op, :data:`FORK_OPS` those that fork.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.node import has_side_effect

from fxprefetch import runtime_stats

logger = logging.getLogger(__name__)

NAMESPACE = "fxprefetch"
SCHEMA = "prefetch(Tensor weight, Tensor? dependency, int max_size, int offset=0) -> ()"

_lib = torch.library.Library(NAMESPACE, "DEF")
DEVICE_KEYS = ("CPU", "CUDA", "XPU", "PrivateUse1")  # the dispatch keys our kernels serve


def define_op(
    lib: torch.library.Library,
    schema: str,
    fake: Callable[..., None],
    kernels: Mapping[str, Callable[..., None]],
) -> torch._ops.OpOverload:
    """Define the side-effecting op ``schema`` (``name(args) -> ()``) in ``lib``, with its
    ``fake`` (meta) function and a kernel per dispatch key; returns its overload, kept by
    dead-code elimination, AOT autograd and inductor (:func:`has_side_effect`)."""
    name = schema.split("(", 1)[0]
    lib.define(schema, tags=())
    torch.library.register_fake(f"{lib.ns}::{name}", fake, lib=lib)
    for key, kernel in kernels.items():
        lib.impl(name, kernel, key)
    packet = getattr(getattr(torch.ops, lib.ns), name)
    has_side_effect(packet.default)
    has_side_effect(packet)
    return packet.default


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


PREFETCH_OP = define_op(
    _lib,
    SCHEMA,
    _prefetch_fake,
    {"CPU": _cpu_kernel, **dict.fromkeys(DEVICE_KEYS[1:], _device_kernel)},
)


def prefetch_tensor(
    weight: torch.Tensor, dependency: torch.Tensor | None, max_size: int, offset: int = 0
) -> None:
    """The prefetch kernel for ``weight``'s device (a hint on the CPU without a native one).
    On CUDA it runs on the compute stream: nothing to join, legal under CUDA-graph capture."""
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


INT64_MAX = 2**63 - 1  # the schemas' ``int``: a larger argument fails before any kernel runs


def range_bounds(min_tokens: int, max_tokens: int | None) -> tuple[int, int]:
    """``(min_tokens, max_tokens)`` as the range op's ``int`` arguments (-1: no upper bound),
    whatever the bounds: a token count is a tensor size, never above ``INT64_MAX``, so a
    larger ``max_tokens`` bounds nothing and a larger ``min_tokens`` admits no real count."""
    low = min(max(min_tokens, 0), INT64_MAX)
    high = -1 if max_tokens is None or max_tokens >= INT64_MAX else max(max_tokens, 0)
    return low, high


def tokens_in_range(tokens: int, min_tokens: int, max_tokens: int) -> bool:
    """Whether a prefetch bounded to ``[min_tokens, max_tokens]`` runs (-1: no upper bound)."""
    return min_tokens <= tokens and (max_tokens < 0 or tokens <= max_tokens)


def skip_failed(op: str, fn: Callable[..., None], *args: Any) -> None:
    """Run a run-time checked prefetch's kernel ``fn(*args)``; where it fails, skip the
    prefetch (counted in ``failed``, logged) and let the model run on: a prefetch is a hint."""
    try:
        fn(*args)
    except Exception as exc:
        runtime_stats.record_failed()
        logger.warning("%s failed and was skipped (the model runs on): %s", op, exc)


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
    skip_failed(
        "prefetch_in_range",
        _prefetch_in_range,
        weight,
        dependency,
        max_size,
        offset,
        tokens,
        min_tokens,
        max_tokens,
    )


def _prefetch_in_range(
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


RANGE_OP = define_op(_lib, RANGE_SCHEMA, _range_fake, dict.fromkeys(DEVICE_KEYS, _range_kernel))


# -- the native L2 prefetch as the inductor pipeline lowers it -------------------------------
# ``prefetch_native`` replaces ``prefetch`` where a device registers a native L2 prefetch
# (CUDA). ``stream``: "side" forks onto a side stream that a ``prefetch_join`` closes, or
# "compute" runs on the current stream with no join. ``order``: tensors the op is declared to
# mutate, so that inductor's scheduler must keep it after their producers and before their
# later readers; the op itself writes nothing. ``passes/lower_native.py`` fills it.
# ``tokens``, ``min_tokens``, ``max_tokens`` (keyword arguments): a ``prefetch_in_range``
# lowered to the side stream (Ascend) forks always, and issues its bytes only where
# :func:`tokens_in_range`; the defaults bound nothing.
NATIVE_SCHEMA = (
    "prefetch_native(Tensor weight, Tensor(a!)[] order, int max_size, int offset, "
    "str stream, str cache_hint, SymInt tokens=0, int min_tokens=0, int max_tokens=-1) -> ()"
)

# ``prefetch_join``: the current stream waits for the side stream of the fork(s) before it.
# ``order`` as above: the fork's token (so the join follows its fork) and the linear's
# activation (so the join follows the window's lazily computed tail, and the GEMM the join).
JOIN_SCHEMA = "prefetch_join(Tensor weight, Tensor(a!)[] order) -> ()"


@dataclass(frozen=True)
class NativeL2:
    """A device's native L2 prefetch: ``prefetch(weight, max_size, offset, stream,
    cache_hint)``, ``join(weight)``, and ``prepare(device)`` (run at compile time, before any
    CUDA-graph capture, for each device a graph prefetches on)."""

    prefetch: Callable[[torch.Tensor, int, int, str, str], None]
    join: Callable[[torch.Tensor], None]
    prepare: Callable[[torch.device], None]


_NATIVE_L2: dict[str, NativeL2] = {}


def register_native_l2(
    device_type: str,
    prefetch: Callable[[torch.Tensor, int, int, str, str], None],
    join: Callable[[torch.Tensor], None],
    prepare: Callable[[torch.device], None] = lambda device: None,
) -> None:
    """Lower prefetches on ``device_type`` to ``prefetch_native`` and route it to ``prefetch``."""
    _NATIVE_L2[device_type] = NativeL2(prefetch, join, prepare)


def native_l2_devices() -> set[str]:
    """Device types whose prefetches the inductor pipeline lowers to ``prefetch_native``."""
    return set(_NATIVE_L2)


def prepare_native(device: torch.device) -> None:
    """Ready ``device``'s native prefetch (kernel compiled, side stream made)."""
    native = _NATIVE_L2.get(device.type)
    if native is not None:
        native.prepare(device)


def _native_fake(
    weight: torch.Tensor,
    order: list[torch.Tensor],
    max_size: int,
    offset: int,
    stream: str,
    cache_hint: str,
    tokens: int = 0,
    min_tokens: int = 0,
    max_tokens: int = -1,
) -> None:
    check_prefetch_args(weight, max_size, offset)


def native_fork(
    weight: torch.Tensor, max_size: int, offset: int, stream: str, cache_hint: str, issue: bool
) -> None:
    """The device's native prefetch of ``weight`` (a fork where ``stream`` is "side"). Where
    ``issue`` is false (a token count out of range) nothing is counted and no byte is asked
    for, but a side-stream fork still forks, so that its join always has it."""
    size = _checked_size(weight, max_size, offset)
    if issue:
        runtime_stats.record(weight, max_size, size)
    native = _NATIVE_L2.get(weight.device.type)
    if native is not None and (issue or stream == "side"):
        native.prefetch(weight, max_size if issue else 0, offset, stream, cache_hint)


def _native_kernel(
    weight: torch.Tensor,
    order: list[torch.Tensor],
    max_size: int,
    offset: int,
    stream: str,
    cache_hint: str,
    tokens: int = 0,
    min_tokens: int = 0,
    max_tokens: int = -1,
) -> None:
    in_range = tokens_in_range(tokens, min_tokens, max_tokens)
    native_fork(weight, max_size, offset, stream, cache_hint, in_range)


def _join_fake(weight: torch.Tensor, order: list[torch.Tensor]) -> None:
    return None


def _join_kernel(weight: torch.Tensor, order: list[torch.Tensor]) -> None:
    native = _NATIVE_L2.get(weight.device.type)
    if native is not None:
        native.join(weight)


NATIVE_OP = define_op(_lib, NATIVE_SCHEMA, _native_fake, dict.fromkeys(DEVICE_KEYS, _native_kernel))
JOIN_OP = define_op(_lib, JOIN_SCHEMA, _join_fake, dict.fromkeys(DEVICE_KEYS, _join_kernel))


# -- hint kept in code: a hint-only prefetch in a body that runs only on some calls ------------
# A graph call counts the hints its compiled code left out, which is exact for code that runs
# once per call. A ``torch.cond`` branch or a loop body runs a number of times known only at
# run time: there the prefetch becomes this op, whose kernel counts one planned hint each
# time it runs (``hints``, never ``calls``: no prefetch kernel ran). A hint whose token count
# is checked at run time (a ``prefetch_in_range`` on a device without a prefetch) passes
# ``tokens`` and its bounds, as ``prefetch_in_range`` does: it counts only when in range.
HINT_SCHEMA = (
    "prefetch_hint(Tensor weight, Tensor? dependency, int max_size, int offset=0, "
    "SymInt tokens=0, int min_tokens=0, int max_tokens=-1) -> ()"
)


def _hint_fake(
    weight: torch.Tensor,
    dependency: torch.Tensor | None,
    max_size: int,
    offset: int = 0,
    tokens: int = 0,
    min_tokens: int = 0,
    max_tokens: int = -1,
) -> None:
    check_prefetch_args(weight, max_size, offset)  # never reads ``tokens``: no guard


def _hint_kernel(
    weight: torch.Tensor,
    dependency: torch.Tensor | None,
    max_size: int,
    offset: int = 0,
    tokens: int = 0,
    min_tokens: int = 0,
    max_tokens: int = -1,
) -> None:
    if tokens_in_range(tokens, min_tokens, max_tokens):
        runtime_stats.record_hint(weight, _checked_size(weight, max_size, offset))


HINT_OP = define_op(_lib, HINT_SCHEMA, _hint_fake, dict.fromkeys(DEVICE_KEYS, _hint_kernel))


# -- the registry of prefetch ops ----------------------------------------------------------------
# Every op that prefetches (the by-name ops of integrations register theirs): the passes that
# relax, elide and strip prefetches treat them alike. None of them but a side-stream
# ``prefetch_native`` (and the fork ops integrations register, :data:`FORK_OPS`) forks:
# ``prefetch_in_range`` and the by-name ops run the device's prefetch on the compute stream
# (fire-and-forget, legal under CUDA-graph capture), so they never need a ``prefetch_join``;
# Ascend's side-stream lowering turns them into forks (``passes/lower_npu.py``).
PREFETCH_OPS: list[torch._ops.OpOverload] = [PREFETCH_OP, NATIVE_OP, HINT_OP, RANGE_OP]

# Ops that fork onto a side stream where their ``stream`` argument is "side": their
# ``order`` argument's first tensor is then the fork's token, which its join mutates next
# (``passes/insert_joins.py``). ``prefetch_native``, and the by-name fork of integrations.
FORK_OPS: list[torch._ops.OpOverload] = [NATIVE_OP]

# A prefetch decided at run time -> the fork op that Ascend's side-stream lowering
# retargets it to, argument by argument (same names, plus ``order``, ``stream`` and
# ``cache_hint``): ``prefetch_in_range`` -> ``prefetch_native`` with its token bounds.
SIDE_FORK_OF: dict[torch._ops.OpOverload, torch._ops.OpOverload] = {RANGE_OP: NATIVE_OP}


def register_prefetch_op(op: torch._ops.OpOverload) -> None:
    """Declare ``op`` a prefetch: its arguments before ``dependency`` name its weight, and its
    kernel prefetches on the compute stream (through :func:`prefetch_tensor`)."""
    has_side_effect(op)
    if op not in PREFETCH_OPS:
        PREFETCH_OPS.append(op)


def register_fork_op(
    op: torch._ops.OpOverload, lowers: torch._ops.OpOverload | None = None
) -> None:
    """Declare ``op`` a prefetch that forks like ``prefetch_native`` (``order``, ``stream``);
    ``lowers``: the prefetch op it replaces on a side stream (see :data:`SIDE_FORK_OF`)."""
    register_prefetch_op(op)
    if op not in FORK_OPS:
        FORK_OPS.append(op)
    if lowers is not None:
        SIDE_FORK_OF[lowers] = op
