"""Ascend's prefetch stream: the guide's "separate pipeline" for ``prefetch_native`` on the NPU.

Where a graph is captured op by op (aclgraph: vllm-ascend's piecewise modes and torchair's
``reduce-overhead``; npugraph_ex: FULL / FULL_DECODE_ONLY), the npu pipeline lowers each
prefetch to ``fxprefetch.prefetch_native(..., stream="side")`` and joins it with
``fxprefetch.prefetch_join`` before the linear (``passes/lower_npu.py``, the same nodes and
ordering tokens as the CUDA lowering). Their kernels land here:

- :func:`fork`: this thread's prefetch stream on the weight's device waits for the current
  (compute) stream, so the prefetch starts after the work queued so far (its dependency);
  ``torch.ops.npu.npu_prefetch`` is issued on the prefetch stream (single-op mode: no
  dependency operand), and the fork is counted as open. Every fork forks, also when nothing
  is left to prefetch, so its join always has it;
- :func:`join`: the current stream waits for the prefetch stream, only while a fork is open
  (a capture never waits on a stream no fork of it touched).

This is what vllm-ascend 0.23's built-in did by hand (``vllm::prefetch_preprocess`` /
``prefetch_postprocess`` around a module-wide stream), with one prefetch stream per device
and per thread (two threads capturing at once never share one). npugraph_ex (torch-npu
2.13.0) closes a stream a post-grad pass opens with ``scope_enter`` only at the graph's entry
and output (``apply_event_closure_with_multi_stream``): the prefetch could then start before
its dependency and the linear would not wait for it, so these ops carry their own events.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from fxprefetch.errors import NpuStreamsUnavailableError

logger = logging.getLogger(__name__)


def _npu() -> Any:
    npu = getattr(torch, "npu", None)
    if npu is None or not hasattr(npu, "Stream"):
        raise NpuStreamsUnavailableError(
            "the Ascend prefetch stream needs torch_npu's stream runtime (torch.npu.Stream)"
        )
    return npu


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else 0


class _PrefetchStreams(threading.local):
    """This thread's prefetch stream per device, and its forks not yet joined."""

    def __init__(self) -> None:
        self.streams: dict[int, Any] = {}
        self.open: dict[int, int] = {}

    def get(self, index: int) -> Any:
        stream = self.streams.get(index)
        if stream is None:
            stream = self.streams[index] = _npu().Stream(device=index)
        return stream


_STREAMS = _PrefetchStreams()


def prefetch_stream(device: torch.device) -> Any:
    """This thread's prefetch stream on ``device`` (made on first use)."""
    return _STREAMS.get(_index(device))


def open_forks(device: torch.device) -> int:
    """Forks on ``device`` not yet joined, in this thread."""
    return _STREAMS.open.get(_index(device), 0)


def _issue(weight: torch.Tensor, max_size: int, offset: int) -> None:
    if min(max_size, weight.nbytes - offset) > 0:
        torch.ops.npu.npu_prefetch.default(weight, None, max_size, offset)


def fork(weight: torch.Tensor, max_size: int, offset: int, stream: str, cache_hint: str) -> None:
    """``prefetch_native`` on the NPU: ``stream`` "side" forks onto the prefetch stream after
    the work queued so far; "compute" issues ``npu_prefetch`` in the current stream."""
    if stream != "side":
        _issue(weight, max_size, offset)
        return
    npu = _npu()
    index = _index(weight.device)
    side = _STREAMS.get(index)
    side.wait_stream(npu.current_stream(index))
    _STREAMS.open[index] = _STREAMS.open.get(index, 0) + 1
    with npu.stream(side):
        _issue(weight, max_size, offset)


def join(weight: torch.Tensor) -> None:
    """``prefetch_join`` on the NPU: the current stream waits for the prefetch stream, if a
    fork is open on it."""
    index = _index(weight.device)
    if not _STREAMS.open.get(index):
        return
    _STREAMS.open[index] -= 1
    _npu().current_stream(index).wait_stream(_STREAMS.get(index))


def prepare(device: torch.device) -> None:
    """Make this thread's prefetch stream on ``device`` before any capture."""
    _STREAMS.get(_index(device))


def available() -> bool:
    """torch_npu's stream runtime and ``npu_prefetch`` are loaded."""
    try:
        _npu()
        torch.ops.npu.npu_prefetch.default  # noqa: B018 - raises where absent
    except (NpuStreamsUnavailableError, AttributeError, RuntimeError):
        return False
    return True


def register_npu_streams(device_type: str = "npu") -> bool:
    """Route ``prefetch_native`` / ``prefetch_join`` on ``device_type`` tensors here (the
    NPU; a test on the CPU standing in for it names "cpu"). True where registered."""
    if not available():
        return False
    from fxprefetch.ops import native_l2_devices, register_native_l2

    if device_type not in native_l2_devices():
        register_native_l2(device_type, fork, join, prepare)
        logger.info("Ascend prefetch stream registered for %s tensors", device_type)
    return True


__all__ = [
    "NpuStreamsUnavailableError",
    "available",
    "fork",
    "join",
    "open_forks",
    "prefetch_stream",
    "prepare",
    "register_npu_streams",
]
