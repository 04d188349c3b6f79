"""STAND-INS for torch_npu's operators, for machines without Ascend hardware or CANN.

Nothing here runs on an NPU. torch_npu cannot be imported without CANN, so these tests
register, when torch_npu is absent, the ``torch.ops.npu.*`` operators the tests call with the
exact schemas of torch_npu 2.13.0 (``tests/data/torch_npu_schemas.txt``, copied from the
wheel's codegen yaml) and simple reference kernels. ``npu_prefetch`` is side-effecting, as
torch_npu registers it, and its kernel records each call in :data:`PREFETCH_CALLS`.

torchair is NOT stood in for: the NPU tests run torchair's real code (``torchair_real.py``).

:class:`StreamRecorder` is a STAND-IN for torch_npu's stream runtime (``torch.npu.Stream``,
``current_stream``, ``stream``): it runs nothing asynchronously, it records on which stream
each graph node and each ``npu_prefetch`` is queued and every ``wait_stream``, so a test can
read the order a real NPU would enforce.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "torch_npu_schemas.txt"
_lib: torch.library.Library | None = None


@dataclass(frozen=True)
class PrefetchCall:
    """One call of the ``npu_prefetch`` stand-in kernel: what it would have prefetched."""

    shape: tuple[int, ...]
    data_ptr: int
    has_dependency: bool
    max_size: int
    offset: int


PREFETCH_CALLS: list[PrefetchCall] = []


def _schemas() -> dict[str, str]:
    out = {}
    for line in SCHEMAS.read_text().splitlines():
        if line and not line.startswith("#"):
            out[line.split("(", 1)[0]] = line
    return out


def _npu_prefetch(self, dependency, max_size, offset=0):
    torch._check(max_size > 0, lambda: "npu_prefetch: max_size must be > 0")
    nbytes = self.numel() * self.element_size()
    torch._check(0 <= offset < nbytes, lambda: "npu_prefetch: offset out of range")
    if self.device.type == "cpu" and not isinstance(self, torch._subclasses.FakeTensor):
        if StreamRecorder.active is not None:
            StreamRecorder.active.record("prefetch", self.data_ptr(), max_size)
        PREFETCH_CALLS.append(
            PrefetchCall(
                tuple(self.shape), self.data_ptr(), dependency is not None, max_size, offset
            )
        )


def _rms(x, gamma, epsilon):
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
    return (x.float() * rstd).to(x.dtype) * gamma, rstd


def _npu_rms_norm(self, gamma, epsilon=1e-6):
    return _rms(self, gamma, epsilon)


def _npu_add_rms_norm(x1, x2, gamma, epsilon=1e-6):
    s = x1 + x2
    y, rstd = _rms(s, gamma, epsilon)
    return y, rstd, s


def _npu_swiglu(self, dim=-1):
    a, b = self.chunk(2, dim=dim)
    return torch.nn.functional.silu(a) * b


def _npu_dynamic_quant(
    input,
    *,
    smooth_scales=None,
    group_index=None,
    dst_type=None,
    quant_mode="pertoken",
    dst_type_max=0.0,
):
    scale = input.abs().amax(-1).float().clamp(min=1e-6) / 127
    q = torch.clamp(torch.round(input.float() / scale.unsqueeze(-1)), -128, 127).to(torch.int8)
    return q, scale


def _npu_quant_matmul(
    x1,
    x2,
    scale,
    *,
    offset=None,
    pertoken_scale=None,
    bias=None,
    output_dtype=None,
    x1_dtype=None,
    x2_dtype=None,
    pertoken_scale_dtype=None,
    scale_dtype=None,
    group_sizes=None,
    y_scale=None,
):
    out = (x1.float() @ x2.float()) * scale.float()
    if pertoken_scale is not None:
        out = out * pertoken_scale.float().unsqueeze(-1)
    return out.to(torch.bfloat16)


def _npu_weight_quant_batchmatmul(
    x,
    weight,
    antiquant_scale,
    antiquant_offset=None,
    quant_scale=None,
    quant_offset=None,
    bias=None,
    antiquant_group_size=0,
    inner_precise=0,
    weight_dtype=None,
):
    return x @ (weight.to(x.dtype) * antiquant_scale.to(x.dtype))


def _npu_grouped_matmul(
    x,
    weight,
    *,
    bias=None,
    scale=None,
    offset=None,
    antiquant_scale=None,
    antiquant_offset=None,
    per_token_scale=None,
    group_list=None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item=0,
    group_type=None,
    group_list_type=0,
    act_type=0,
    tuning_config=None,
    output_dtype=None,
    x_dtype=None,
    weight_dtype=None,
    scale_dtype=None,
    per_token_scale_dtype=None,
):
    # one x [T, K], one stacked weight [E, K, N], group_list = cumulative token counts
    tokens, w = x[0], weight[0]
    pieces, start = [], 0
    ends = group_list.tolist() if group_list is not None else [tokens.shape[0]]
    for e, end in enumerate(ends):
        pieces.append(tokens[start:end] @ w[e])
        start = end
    return [torch.cat(pieces)]


def _npu_grouped_matmul_fake(x, weight, **kwargs):
    return [x[0].new_empty(x[0].shape[0], weight[0].shape[-1])]


def _npu_moe_gating_top_k_softmax(x, finished=None, k=1):
    probs = torch.softmax(x.float(), -1)
    w, idx = torch.topk(probs, k, -1)
    return w.to(x.dtype), idx.to(torch.int32), idx.to(torch.int32)


_KERNELS = {
    "npu_prefetch": _npu_prefetch,
    "npu_rms_norm": _npu_rms_norm,
    "npu_add_rms_norm": _npu_add_rms_norm,
    "npu_swiglu": _npu_swiglu,
    "npu_dynamic_quant": _npu_dynamic_quant,
    "npu_quant_matmul": _npu_quant_matmul,
    "npu_weight_quant_batchmatmul": _npu_weight_quant_batchmatmul,
    "npu_moe_gating_top_k_softmax": _npu_moe_gating_top_k_softmax,
}


def torch_npu_present() -> bool:
    try:
        return hasattr(torch.ops.npu, "npu_prefetch")
    except (AttributeError, RuntimeError):
        return False


def install_op_standins() -> None:
    """Register every torch_npu schema in ``torch.ops.npu`` (once), with reference kernels."""
    global _lib  # noqa: PLW0603 - registered once per process
    if _lib is not None or torch_npu_present():
        return
    _lib = torch.library.Library("npu", "DEF")
    for name, schema in _schemas().items():
        _lib.define(schema)
        if name == "npu_grouped_matmul":
            _lib.impl(name, _npu_grouped_matmul, "CPU")
            torch.library.register_fake(f"npu::{name}", _npu_grouped_matmul_fake, lib=_lib)
        elif name in _KERNELS:
            _lib.impl(name, _KERNELS[name], "CompositeExplicitAutograd")
    torch.fx.node.has_side_effect(torch.ops.npu.npu_prefetch.default)  # as torch_npu does


# -- meta kernels npugraph_ex's pattern passes trace (shapes as torch_npu 2.13.0's
#    op_plugin/meta/_meta_registrations.py, with the default int8 quantized dtype) -------------


def _quantize_meta(self, scales, zero_points, dtype, axis=1, div_mode=True):
    return torch.empty_like(self, dtype=torch.int8)


def _add_rms_norm_quant_meta(x1, x2, gamma, scales1, zero_points1=None, *args, **kwargs):
    int8 = x1.new_empty(x1.shape, dtype=torch.int8)
    return int8, torch.empty_like(int8), x1.new_empty(x1.shape)


def _add_rms_norm_dynamic_quant_meta(
    x1, x2, gamma, *, smooth_scale1=None, smooth_scale2=None, **kw
):
    two = smooth_scale1 is not None and smooth_scale2 is not None
    rows = x1.shape[:-1]
    return (
        x1.new_empty(x1.shape, dtype=torch.int8),
        x1.new_empty(x1.shape if two else (0,), dtype=torch.int8),
        x1.new_empty(x1.shape),
        x1.new_empty(rows, dtype=torch.float32),
        x1.new_empty(rows if two else (0,), dtype=torch.float32),
    )


def _add_rms_norm_cast_meta(x1, x2, gamma, epsilon=1e-6):
    rstd = [x1.size(i) if i < x1.dim() - gamma.dim() else 1 for i in range(x1.dim())]
    fp32 = x1.new_empty(x1.shape, dtype=torch.float32)
    return (
        fp32,
        x1.new_empty(x1.shape),
        x1.new_empty(rstd, dtype=torch.float32),
        x1.new_empty(x1.shape),
    )


def _transpose_batchmatmul_meta(input, weight, *, scale=None, perm_x1=None, perm_x2=None, **kw):
    perm_x1, perm_x2 = perm_x1 or [0, 1, 2], perm_x2 or [0, 1, 2]
    m, batch = input.size(perm_x1.index(1)), input.size(perm_x1.index(0))
    n = weight.size(perm_x2.index(2))
    if scale is not None:
        return input.new_empty((m, 1, batch * n), dtype=torch.int8)
    return input.new_empty((m, batch, n))


def _dtype_cast_meta(self, dtype):
    return self.new_empty(self.shape, dtype=dtype)


META_STANDINS = {
    "npu_quantize": _quantize_meta,
    "npu_add_rms_norm_quant": _add_rms_norm_quant_meta,
    "npu_add_rms_norm_dynamic_quant": _add_rms_norm_dynamic_quant_meta,
    "npu_add_rms_norm_cast": _add_rms_norm_cast_meta,
    "npu_transpose_batchmatmul": _transpose_batchmatmul_meta,
    "_npu_dtype_cast": _dtype_cast_meta,
}
_meta_lib: torch.library.Library | None = None


def _has_meta(name: str) -> bool:
    op = getattr(torch.ops.npu, name).default
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")


def install_meta_standins() -> None:
    """Meta kernels for :data:`META_STANDINS` where none is registered (schemas must exist)."""
    global _meta_lib  # noqa: PLW0603 - registered once per process
    if _meta_lib is not None:
        return
    _meta_lib = torch.library.Library("npu", "IMPL", "Meta")
    for name, kernel in META_STANDINS.items():
        if not _has_meta(name):
            _meta_lib.impl(name, kernel)


# -- STAND-IN stream runtime ---------------------------------------------------------------------


@dataclass(frozen=True)
class StreamEvent:
    """One thing queued on a stream: ``kind`` "node" (a graph node, ``what`` its name),
    "prefetch" (``npu_prefetch``, ``what`` the weight's data_ptr, ``size`` its max_size) or
    "wait" (``stream`` waits for everything queued so far on ``other``)."""

    kind: str
    stream: int
    what: Any = None
    size: int | None = None
    other: int | None = None


class _Stream:
    """STAND-IN ``torch.npu.Stream``: an id; ``wait_stream`` is recorded."""

    def __init__(self, recorder: StreamRecorder, sid: int) -> None:
        self.recorder, self.stream_id = recorder, sid
        self.device_index, self.device_type = 0, 20  # as the stand-in torch_npu gives

    def wait_stream(self, other: _Stream) -> None:
        self.recorder.events.append(StreamEvent("wait", self.stream_id, other=other.stream_id))


class StreamRecorder:
    """STAND-IN for torch_npu's stream runtime while active (see the module docstring).

    Stream 0 is the compute stream. While active it also registers the Ascend prefetch
    stream (``fxprefetch.devices.npu_streams``) for CPU tensors, which stand in for NPU ones, and
    restores everything it changed on exit.
    """

    active: StreamRecorder | None = None

    def __init__(self) -> None:
        self.events: list[StreamEvent] = []
        self.streams = [_Stream(self, 0)]
        self.current = self.streams[0]

    def record(self, kind: str, what: Any = None, size: int | None = None) -> None:
        self.events.append(StreamEvent(kind, self.current.stream_id, what, size))

    def _new_stream(self, *args: Any, **kwargs: Any) -> _Stream:
        stream = _Stream(self, len(self.streams))
        self.streams.append(stream)
        return stream

    @contextlib.contextmanager
    def _stream(self, stream: _Stream) -> Iterator[None]:
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    @contextlib.contextmanager
    def installed(self) -> Iterator[StreamRecorder]:
        from fxprefetch import ops
        from fxprefetch.devices import npu_streams

        npu = getattr(torch, "npu", None)
        holder = npu if npu is not None else types.SimpleNamespace()
        names = {"Stream": self._new_stream, "current_stream": lambda *a: self.current,
                 "stream": self._stream}  # fmt: skip
        saved = {name: getattr(holder, name, None) for name in names}
        native = dict(ops._NATIVE_L2)
        for name, value in names.items():
            setattr(holder, name, value)
        torch.npu = holder
        StreamRecorder.active = self
        npu_streams._STREAMS.__init__()  # this thread's streams: made under this runtime
        try:
            install_op_standins()  # npu_prefetch, which the prefetch stream issues
            assert npu_streams.register_npu_streams("cpu")
            yield self
        finally:
            StreamRecorder.active = None
            ops._NATIVE_L2.clear()
            ops._NATIVE_L2.update(native)
            npu_streams._STREAMS.__init__()
            for name, value in saved.items():
                setattr(holder, name, value)
            if npu is None:
                del torch.npu

    def run(self, gm: torch.fx.GraphModule, *args: Any) -> Any:
        """Run ``gm`` node by node, recording each node on the stream it is queued on."""
        recorder = self

        class Logged(torch.fx.Interpreter):
            def run_node(self, n: torch.fx.Node) -> Any:
                if n.op == "call_function":
                    recorder.record("node", n.name)
                return super().run_node(n)

        return Logged(gm).run(*args)

    def index(self, kind: str, what: Any, start: int = 0) -> int:
        """Where the first ``kind`` event of ``what`` at or after ``start`` is."""
        for i in range(start, len(self.events)):
            if self.events[i].kind == kind and self.events[i].what == what:
                return i
        raise AssertionError(f"no {kind} event for {what!r} after position {start}")

    def fork_join(self, fork: str, join: str) -> tuple[list[StreamEvent], list[StreamEvent]]:
        """The events a fork node and its join node queued: each node's own event and what
        its kernel did (up to the next node)."""
        at_fork = self.index("node", fork)
        at_join = self.index("node", join, at_fork)
        return self.queued_at(at_fork), self.queued_at(at_join)

    def queued_at(self, at: int) -> list[StreamEvent]:
        """The node event at ``at`` and what its kernel queued (up to the next node)."""
        end = next((i for i in range(at + 1, len(self.events)) if self.events[i].kind == "node"),
                   len(self.events))  # fmt: skip
        return self.events[at:end]
