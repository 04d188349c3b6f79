"""torch_npu's linear ops in the linear-op table (``analysis.linear_ops``), on their stand-ins
with the exact schemas (tests/support/npu_standins.py): quantized, grouped and fused
matmul-and-all-reduce linears, with the windows in front of them."""

from __future__ import annotations

import torch
from torch import nn

from fxprefetch.passes import run_weight_prefetch

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
