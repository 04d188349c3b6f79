"""Only real weights are prefetched, and every matmul is in the plan (``analysis.linears``,
``analysis.weight_sources``).

Generated layers put each shape of code real models contain in front of a matmul: a plain
parameter, a weight in the first operand (``W @ x.T``), one part of a fused weight, a dtype
view, an int8 dequantize, a forward argument in the weight slot, an expert picked with a
tensor index, with or without sequence-parallel collectives around the norm. The generator
knows which bytes each matmul reads; the properties compare the plan with that.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxprefetch
from fxprefetch import SkipReason, WeightPrefetchConfig
from fxprefetch.ops import PREFETCH_OP
from fxprefetch.passes import DEFAULT_LINEAR_OPS
from fxprefetch.passes.analysis.graph_utils import op_name
from fxprefetch.pipeline import run_weight_prefetch

from support.tracing import fake_trace

KINDS = ("param", "swapped", "fused", "dtype_view", "dequant", "user", "indexed")
ON = WeightPrefetchConfig(enabled=True)


@dataclass(frozen=True)
class Expected:
    prefetched: bool
    offset: int = 0
    nbytes: int = 0
    dtype: str = ""
    skip: SkipReason | None = None


class Operand(nn.Module):
    """One matmul ``h @ W.T`` of an ``hidden x hidden`` weight ``W``, in the shape ``kind``."""

    def __init__(self, kind: str, hidden: int, part: int) -> None:
        super().__init__()
        self.kind, self.hidden, self.part = kind, hidden, part
        h = hidden
        if kind in ("param", "swapped"):
            self.weight = nn.Parameter(torch.randn(h, h), requires_grad=False)
        elif kind == "fused":
            self.weight = nn.Parameter(torch.randn(3 * h, h), requires_grad=False)
        elif kind == "dtype_view":  # bf16 rows stored as fp32 pairs
            stored = torch.randn(3 * h, h, dtype=torch.bfloat16).view(torch.float32)
            self.weight = nn.Parameter(stored, requires_grad=False)
        elif kind == "dequant":
            self.register_buffer("qweight", torch.randint(-8, 8, (h, h), dtype=torch.int8))
            self.scale = nn.Parameter(torch.rand(h, 1) / 8, requires_grad=False)
        elif kind == "indexed":
            self.weight = nn.Parameter(torch.randn(4, h, h), requires_grad=False)

    def forward(self, x: torch.Tensor, act: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h, k = self.hidden, self.part
        if self.kind == "param":
            return x @ self.weight.t()
        if self.kind == "swapped":
            return (self.weight @ x.t()).t()
        if self.kind == "fused":
            return x @ self.weight.chunk(3)[k].t()
        if self.kind == "dtype_view":
            rows = self.weight.view(torch.bfloat16)[k * h : (k + 1) * h]
            return x @ rows.float().t()
        if self.kind == "dequant":
            return x @ (self.qweight.to(x.dtype) * self.scale).t()
        if self.kind == "user":
            return x @ act
        return x @ self.weight[idx][0].t()

    def expected(self) -> Expected:
        h, k = self.hidden, self.part
        if self.kind in ("param", "swapped"):
            return Expected(True, 0, h * h * 4, "torch.float32")
        if self.kind == "fused":
            return Expected(True, k * h * h * 4, h * h * 4, "torch.float32")
        if self.kind == "dtype_view":
            return Expected(True, k * h * h * 2, h * h * 2, "torch.float32")
        if self.kind == "dequant":
            return Expected(True, 0, h * h, "torch.int8")
        if self.kind == "user":
            return Expected(False, skip=SkipReason.NOT_A_WEIGHT)
        return Expected(False, 0, 4 * h * h * 4, "torch.float32", SkipReason.INDEXED_WEIGHT)


class Layer(nn.Module):
    """A norm (optionally between a reduce-scatter and an all-gather), then ``up_proj``."""

    def __init__(self, kind: str, hidden: int, part: int, sequence_parallel: bool) -> None:
        super().__init__()
        self.sp = sequence_parallel
        self.up_proj = Operand(kind, hidden, part)

    def forward(self, x: torch.Tensor, act: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.sp:
            x = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.reduce_scatter_tensor(x, "sum", 2, "0")
            )
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.sp:
            x = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_gather_into_tensor(x, 2, "0")
            )
        return self.up_proj(x, act, idx)


class Stack(nn.Module):
    def __init__(self, kinds: list[tuple[str, int]], hidden: int, sp: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(kind, hidden, part, sp) for kind, part in kinds)

    def forward(self, x: torch.Tensor, act: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, act, idx)
        return x


layers_strategy = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 2)), min_size=1, max_size=5
)


@given(kinds=layers_strategy, hidden=st.sampled_from([8, 16]), sp=st.booleans())
def test_only_weights_exact_bytes_one_record_per_matmul(kinds, hidden, sp):
    model = Stack(kinds, hidden, sp)
    inputs = (torch.randn(4, hidden), torch.randn(hidden, hidden), torch.tensor([1]))
    gm, names = fake_trace(model, *inputs)
    matmuls = [n.name for n in gm.graph.nodes if op_name(n) in DEFAULT_LINEAR_OPS]
    plan = run_weight_prefetch(gm, ON, weight_names=names)

    # every matmul-class node has exactly one record
    assert sorted(r.node for r in plan.records) == sorted(matmuls)
    assert len(matmuls) == len(kinds)
    # records come in graph order, one per layer
    for layer, record in zip(
        model.layers, sorted(plan.records, key=lambda r: r.position), strict=True
    ):
        want = layer.up_proj.expected()
        assert record.prefetched is want.prefetched, (layer.up_proj.kind, record)
        if want.skip is not None:
            assert record.skip_reason == want.skip
        if want.dtype:
            assert (record.offset, record.weight_bytes, record.dtype) == (
                want.offset,
                want.nbytes,
                want.dtype,
            )
        if record.prefetched:
            assert record.role == "mlp.gate_up"
            assert record.crossed == (("_c10d_functional::all_gather_into_tensor",) if sp else ())
    # only parameters and buffers are prefetched, and inside their stored bytes
    placeholders = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for node in gm.graph.find_nodes(op="call_function", target=PREFETCH_OP):
        weight = node.args[0]
        assert weight.name in names, f"{weight.name} is not a parameter or buffer"
        stored = state[names[weight.name]]
        offset = node.args[3] if len(node.args) > 3 else 0
        assert offset >= 0 and offset + node.args[2] <= stored.numel() * stored.element_size()
        assert placeholders[weight.name] is weight
    if not sp:  # collectives need a process group to run
        real = gm(dict(model.named_parameters()) | dict(model.named_buffers()), *inputs)
        torch.testing.assert_close(real, model(*inputs))


class UpProj(nn.Module):
    """An ``up_proj`` whose forward multiplies by whatever its caller gives it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16), requires_grad=False)

    def forward(self, x: torch.Tensor, act: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "act":
            return torch.matmul(x.relu(), act)
        return (self.weight @ x.relu().t()).t()


class Experts(nn.Module):
    def forward(self, h: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        return torch.bmm(h.relu(), routing)


def compile_eager(model: nn.Module, *args) -> list[fxprefetch.PrefetchPlan]:
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args))
    return fxprefetch.last_plans()


@pytest.mark.compile
def test_a_forward_argument_in_the_weight_slot_is_not_a_weight(fresh_dynamo):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up_proj = UpProj()
            self.experts = Experts()

        def forward(self, x, act, routing):
            y = self.up_proj(x, act, "act")
            return self.experts(y.view(1, 4, 16), routing)

    (plan,) = compile_eager(M(), torch.randn(4, 16), torch.randn(16, 16), torch.randn(1, 16, 8))
    assert [r.skip_reason for r in plan.records] == [SkipReason.NOT_A_WEIGHT] * 2
    assert all(r.role is None and r.note.startswith("user input") for r in plan.records)
    assert not plan.prefetched


@pytest.mark.compile
def test_a_weight_in_the_first_operand_is_found(fresh_dynamo):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = UpProj()

        def forward(self, x):
            return self.gate_proj(x, x, "swapped")

    (plan,) = compile_eager(M(), torch.randn(4, 16))
    (record,) = plan.records
    assert record.prefetched and record.weight == "gate_proj.weight"
    assert record.role == "mlp.gate_up" and record.prefetch_bytes == 16 * 16 * 4


@pytest.mark.compile
def test_bf16_autocast_prefetches_the_stored_fp32_weight(fresh_dynamo):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.RMSNorm(16)
            self.up_proj = nn.Linear(16, 32, bias=False)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.up_proj(self.norm(x))

    (plan,) = compile_eager(M(), torch.randn(4, 16))
    (record,) = plan.records
    assert record.prefetched, record.skip_reason
    assert (record.dtype, record.weight_bytes) == ("torch.float32", 32 * 16 * 4)
    assert "converted by convert_element_type" in record.note


@pytest.mark.compile
def test_inductor_freezing_prepacked_linears_are_recorded(fresh_dynamo):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.up_proj = nn.Linear(64, 128)

        def forward(self, x):
            return self.up_proj(self.norm(x))

    model = M().eval()
    compiled = torch.compile(
        model, backend="npu_prefetch", options={"weight_prefetch_config": {"enabled": True}}
    )
    x = torch.randn(4, 64)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    records = [r for p in fxprefetch.last_plans() for r in p.records]
    assert len(records) == 1
    (record,) = records
    assert record.op in ("mkl::_mkl_linear", "mkldnn::_linear_pointwise", "aten::addmm")
    if record.op != "aten::addmm":  # no MKL on this CPU: inductor keeps addmm
        assert record.skip_reason == SkipReason.UNSUPPORTED_WEIGHT, record.note
        assert "prepacked" in record.note
    assert record.role == "mlp.gate_up"


@pytest.mark.compile
def test_hf_moe_eager_experts_are_listed_outside_compiled_graphs():
    transformers = pytest.importorskip("transformers")
    from fxprefetch.presets import example_inputs, load_config

    config = load_config("mixtral-tiny", 1)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation="eager"
    ).eval()
    plans = fxprefetch.explain(model, **example_inputs(model))
    outside = plans[-1]
    assert outside.graph == "outside compiled graphs"
    (record,) = outside.records
    assert record.weight == "model.layers.0.mlp.experts.gate_up_proj"
    assert record.role == "moe.gate_up" and record.skip_reason == SkipReason.OUTSIDE_GRAPHS
    # everything the graphs did read has a record of its own
    assert sum(len(p.records) for p in plans[:-1]) >= 5  # q, k, v, o, router, lm_head


# -- every matmul in the plan -------------------------------------------------------------------


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Int8WeightOnly(nn.Module):
    """CPU int8 weight-only linears, as torchao and gpt-fast produce: an int8 weight (N, K)
    and per-row scales (``_weight_int8pack_mm``), or int8 x int8 (``_int_mm``)."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.register_buffer("weight", torch.randint(-128, 128, (32, 16), dtype=torch.int8))
        self.register_buffer("scales", torch.rand(32) / 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "int8pack":
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        q = (x * 16).round().clamp(-128, 127).to(torch.int8)
        return torch._int_mm(q, self.weight.t()).float()


class Block(nn.Module):
    """A norm, then ``up_proj``."""

    def __init__(self, up_proj: nn.Module) -> None:
        super().__init__()
        self.up_proj = up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(_norm(x))


def _run(gm, model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return gm(dict(model.named_parameters()) | dict(model.named_buffers()), *inputs)


@pytest.mark.parametrize(
    ("op", "name"), [("int8pack", "aten::_weight_int8pack_mm"), ("int_mm", "aten::_int_mm")]
)
def test_int8_weight_only_matmuls_prefetch_the_int8_weight(op, name):
    model = Block(Int8WeightOnly(op))
    x = torch.randn(32, 16)
    gm, names = fake_trace(model, x)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (record,) = plan.records
    assert record.op == name and record.weight == "up_proj.weight"
    assert record.role == "mlp.gate_up" and record.prefetched, record.skip_reason
    # the int8 weight in its own (N, K) layout, all of it; the scales are not the weight
    assert (record.dtype, record.weight_shape) == ("torch.int8", (32, 16))
    assert (record.offset, record.weight_bytes, record.prefetch_bytes) == (0, 32 * 16, 32 * 16)
    (prefetch,) = gm.graph.find_nodes(op="call_function", target=PREFETCH_OP)
    assert names[prefetch.args[0].name] == "up_proj.weight" and prefetch.args[2] == 32 * 16
    torch.testing.assert_close(_run(gm, model, x), model(x))


class Int4WeightOnly(nn.Module):
    """int4 weight-only on the CPU: a packed uint8 weight (N, K / 2), scales and zeros."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randint(0, 16, (32, 64), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w, 2)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", torch.rand(2, 32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, sz = self.weight, self.scales_and_zeros
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, 32, sz)


def test_int4_weight_only_matmul_prefetches_the_packed_weight():
    model = Block(Int4WeightOnly())
    x = torch.randn(4, 64)
    gm, names = fake_trace(model, x)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (record,) = plan.records
    assert record.op == "aten::_weight_int4pack_mm_for_cpu"
    assert (record.weight, record.dtype, record.weight_shape) == (
        "up_proj.weight",
        "torch.uint8",
        (32, 32),
    )
    assert record.prefetched and record.prefetch_bytes == record.weight_bytes == 32 * 32
    assert record.role == "mlp.gate_up"
    torch.testing.assert_close(_run(gm, model, x), model(x))


class Convs(nn.Module):
    """Pointwise convolutions used as linears, and convolutions that are not linears."""

    def __init__(self) -> None:
        super().__init__()
        self.up_proj = nn.Conv1d(16, 32, 1)  # a linear over the channels
        self.o_proj = nn.Conv2d(32, 16, 1, bias=False)  # 1x1 in 2-D: a linear too
        self.mix = nn.Conv1d(16, 16, 3, padding=1)  # not linears: a wider kernel,
        self.strided = nn.Conv1d(16, 16, 1, stride=2)  # a stride,
        self.grouped = nn.Conv1d(16, 16, 1, groups=2)  # groups,
        self.padded = nn.Conv1d(16, 16, 1, padding=1)  # padding
        self.transposed = nn.ConvTranspose1d(16, 16, 1)  # a transposed convolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up_proj(x.relu()).relu()
        h = self.o_proj(h.unsqueeze(-1)).squeeze(-1)
        h = self.mix(h.relu())
        return self.transposed(self.padded(self.grouped(self.strided(h))))


def test_a_pointwise_convolution_is_a_linear_and_other_convolutions_are_not():
    model = Convs()
    x = torch.randn(2, 16, 8)
    gm, names = fake_trace(model, x)
    convs = [n for n in gm.graph.nodes if op_name(n) == "aten::convolution"]
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    assert len(convs) == 7
    assert [(r.node, r.weight) for r in plan.records] == [
        (convs[0].name, "up_proj.weight"),
        (convs[1].name, "o_proj.weight"),
    ]
    up, o = plan.records
    assert (up.weight_shape, up.weight_bytes, up.offset) == ((32, 16, 1), 32 * 16 * 4, 0)
    assert (o.weight_shape, o.weight_bytes) == ((16, 32, 1, 1), 16 * 32 * 4)
    assert up.role == "mlp.gate_up" and up.prefetched and up.prefetch_bytes == 32 * 16 * 4
    assert o.role == "attn.o" and o.prefetched and o.window == ("aten::relu",)
    torch.testing.assert_close(_run(gm, model, x), model(x))


class NativeAttention(nn.Module):
    """What ``nn.MultiheadAttention``'s fast path calls in eval mode without grad."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        x = _norm(x)
        return torch._native_multi_head_attention(
            x, x, x, 32, 4, a.in_proj_weight, a.in_proj_bias, a.out_proj.weight,
            a.out_proj.bias, need_weights=False,
        )[0]  # fmt: skip


def test_native_multi_head_attention_is_listed_with_hidden_weights():
    model = NativeAttention().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        gm, names = fake_trace(model, x)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (record,) = plan.records
    assert record.op == "aten::_native_multi_head_attention"
    assert record.skip_reason == SkipReason.HIDDEN_WEIGHTS and record.role is None
    assert record.note == (
        "aten::_native_multi_head_attention runs the attention's matmuls inside one op: "
        "self_attn.in_proj_weight, self_attn.out_proj.weight"
    )
    assert not plan.prefetched


@pytest.mark.compile
def test_transformer_encoder_layer_fast_path_is_listed_with_hidden_weights(fresh_dynamo):
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval()
    (plan,) = compile_eager(layer, torch.randn(2, 5, 32))
    (record,) = plan.records  # the plan was silently empty
    assert record.op == "aten::_transformer_encoder_layer_fwd"
    assert record.skip_reason == SkipReason.HIDDEN_WEIGHTS and not record.prefetched
    assert record.note == (
        "aten::_transformer_encoder_layer_fwd runs the encoder layer's matmuls inside one op: "
        "self_attn.in_proj_weight, self_attn.out_proj.weight, linear1.weight, linear2.weight"
    )
