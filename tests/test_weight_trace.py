"""Exactly the bytes a linear reads, through any chain of views, and no guard added
(``analysis.weight_trace``).

Each model compiles end to end with the eager target (dynamo + AOT autograd, no codegen), so
the weights reach the pass with dynamo's real sources and fake tensors' real strides.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fxprefetch
from fxprefetch.backend import npu_prefetch

pytestmark = pytest.mark.compile


class Holder(nn.Module):
    """A module named after the projection, holding its stored weight."""

    def __init__(self, weight: torch.Tensor, buffer: bool = False) -> None:
        super().__init__()
        if buffer:
            self.register_buffer("weight", weight)
        else:
            self.weight = nn.Parameter(weight, requires_grad=False)


class Mlp(nn.Module):
    """RMSNorm (the vector window), then a matmul with a view of ``up_proj.weight``."""

    def __init__(
        self, weight: torch.Tensor, view, buffer: bool = False, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.up_proj = Holder(weight, buffer)
        self.view = view
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).to(self.dtype) @ self.view(self.up_proj.weight)


def compile_eager(model: nn.Module, *args: torch.Tensor) -> fxprefetch.PrefetchPlan:
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args))
    (plan,) = fxprefetch.last_plans()
    return plan


def test_a_uint8_buffer_viewed_as_fp32_and_sliced(fresh_dynamo):
    # 64 rows of 16 fp32 stored as uint8; rows 16..31 are read: bytes 1024..2047 of fp32
    stored = torch.randn(64, 16).view(torch.uint8).reshape(-1).clone()
    model = Mlp(stored, lambda w: w.view(torch.float32).view(64, 16)[16:32].t(), buffer=True)
    (record,) = compile_eager(model, torch.randn(2, 16)).prefetched
    assert (record.offset, record.prefetch_bytes) == (16 * 16 * 4, 16 * 16 * 4)
    assert record.dtype == "torch.uint8" and record.weight == "up_proj.weight"
    assert record.weight_shape == (16, 16 * 4)  # in the stored uint8 elements


def test_an_fp32_parameter_viewed_as_bf16(fresh_dynamo):
    # 32 x 8 fp32 = 1024 bytes, viewed as 32 x 16 bf16; rows 16..31: the second 512 bytes
    stored = torch.randn(32, 16, dtype=torch.bfloat16).view(torch.float32)  # finite as bf16
    model = Mlp(stored, lambda w: w.view(torch.bfloat16)[16:].t(), dtype=torch.bfloat16)
    plan = compile_eager(model, torch.randn(2, 16))
    (record,) = plan.records
    assert record.prefetched, record.skip_reason
    assert (record.offset, record.prefetch_bytes) == (512, 512)
    assert record.offset + record.prefetch_bytes <= stored.numel() * stored.element_size()
    # 16 rows of 16 bf16, labelled in the stored fp32 elements: 16 rows of 8
    assert (record.weight_shape, record.dtype) == ((16, 8), "torch.float32")


def _read_elements(weight: torch.Tensor, view) -> torch.Tensor:
    """Indices of the stored elements that ``view(weight)`` reads."""
    index = torch.arange(weight.numel()).view(weight.shape)
    return view(index).reshape(-1).unique()


@pytest.mark.parametrize(
    ("shape", "view", "part"),
    [
        ((64, 16), lambda w: w[8:].t(), (56, 16)),  # row slice: contiguous
        ((64, 32), lambda w: w[:, :16].t(), (64, 16)),  # column slice: strided
        ((64, 32), lambda w: w[:, 16:].t(), (64, 16)),  # column slice with an offset
        ((64, 16), lambda w: w[::2].t(), (32, 16)),  # every other row
        ((16, 64), lambda w: w[:, 8:40], (16, 32)),  # columns, not transposed
    ],
    ids=["rows", "columns", "columns-offset", "strided-rows", "columns-untransposed"],
)
def test_a_slice_shows_its_own_orientation_and_the_bytes_read_and_spanned(
    shape, view, part, fresh_dynamo
):
    weight = torch.randn(shape)
    model = Mlp(weight, view)
    (record,) = compile_eager(model, torch.randn(2, 16)).records
    read = _read_elements(weight, view)
    assert record.weight_shape == part  # the weight's orientation, not the transposed view
    assert record.weight_bytes == read.numel() * 4 == part[0] * part[1] * 4
    # the prefetch is one contiguous range: from the first element read to the last
    first, last = int(read.min()), int(read.max())
    assert (record.offset, record.span_bytes) == (first * 4, (last - first + 1) * 4)
    assert record.prefetched and record.prefetch_bytes == record.span_bytes


class FusedQkv(nn.Module):
    """One stored qkv weight, split three ways (``chunk``/``split``/``unbind``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.qkv_proj = Holder(torch.randn(3 * 8, 16))
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qkv_proj.weight
        if self.how == "chunk":
            parts = w.chunk(3)
        elif self.how == "split":
            parts = w.split([8, 8, 8])
        else:
            parts = w.view(3, 8, 16).unbind(0)
        h = self.norm(x)
        return sum(F.linear(h, p).sum(-1) for p in parts)


@pytest.mark.parametrize("how", ["chunk", "split", "unbind"])
def test_each_part_of_a_fused_weight_gets_its_own_bytes(how, fresh_dynamo):
    plan = compile_eager(FusedQkv(how), torch.randn(2, 16))
    assert len(plan.records) == 3 and all(r.role == "attn.qkv" for r in plan.records)
    part = 8 * 16 * 4
    got = sorted((r.offset, r.prefetch_bytes) for r in plan.prefetched)
    assert got == [(0, part), (part, part), (2 * part, part)]


class Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.experts = Holder(torch.randn(4, 16, 16))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return self.norm(x) @ self.experts.weight[i]


def _compiles(backend, model: nn.Module, x: torch.Tensor, indices: list[int]) -> int:
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for i in indices:
            torch.testing.assert_close(compiled(x, i), model(x, i))
    return counter.frame_count


def test_a_python_int_expert_index_adds_no_guard(fresh_dynamo):
    """``weight[i]`` with a changing int becomes symbolic; reading its storage offset as an
    int would add a guard per value, and dynamo's recompile limit then drops to eager."""
    model, x = Experts().eval(), torch.randn(2, 16)
    indices = [0, 1, 2, 3, 0, 1, 2, 3, 1, 2]
    ours = functools.partial(npu_prefetch, options={"target": "eager"})
    assert _compiles(ours, model, x, indices) == _compiles("aot_eager", model, x, indices)
    plans = fxprefetch.last_plans()
    # the graph with a symbolic index prefetches from the whole stacked weight
    assert any(r.weight_shape == (4, 16, 16) and r.offset == 0 for p in plans for r in p.prefetched)
    # the first graph (a constant index) prefetches exactly the expert it reads
    assert plans[0].prefetched[0].weight_shape == (16, 16)


class IntViews(nn.Module):
    """A weight read through an int-parameterized view: ``select``, ``narrow`` or a slice."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.norm = nn.RMSNorm(16)
        self.up_proj = Holder(torch.randn(4, 16, 16))

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        w = self.up_proj.weight
        if self.how == "select":
            part = w.select(0, i)
        elif self.how == "narrow":
            part = w.reshape(64, 16).narrow(0, i * 4, 16)
        else:
            part = w.reshape(64, 16)[i : i + 16]
        return self.norm(x) @ part.t()


@settings(max_examples=4, deadline=None)
@given(
    how=st.sampled_from(["select", "narrow", "slice"]),
    indices=st.lists(st.integers(0, 3), min_size=3, max_size=6),
)
def test_compile_count_equals_aot_eager_over_generated_int_views(how, indices):
    """Property: whatever int-parameterized view reaches the matmul, the pass adds no guard."""
    fxprefetch.clear_plans()
    model, x = IntViews(how).eval(), torch.randn(2, 16)
    ours = functools.partial(npu_prefetch, options={"target": "eager"})
    assert _compiles(ours, model, x, indices) == _compiles("aot_eager", model, x, indices)
    for plan in fxprefetch.last_plans():
        for r in plan.prefetched:  # inside the stored tensor, whatever the index
            assert r.offset >= 0 and r.offset + r.prefetch_bytes <= 4 * 16 * 16 * 4
    torch._dynamo.reset()
