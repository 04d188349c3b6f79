"""passes/analysis/window_cost.py: the bytes a window moves and the kernels it launches, read from
``meta['val']`` on the FX graph (the prediction model's input)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxprefetch import WeightPrefetchConfig
from fxprefetch.devices import DeviceSetup
from fxprefetch.devices.profile_catalog import profile
from fxprefetch.passes.analysis.window_cost import tensor_bytes
from fxprefetch.passes.analysis.windows import attention_matmuls
from fxprefetch.pipeline import run_weight_prefetch

from support.tracing import fake_trace

T, H, INTER = 3, 16, 32  # tokens, hidden, intermediate (fp32: 4 bytes each)


class Block(nn.Module):
    """norm -> up (gate/up) -> SiLU-and-mul -> down, as a GPU decoder's MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(H, eps=1e-6)
        self.mlp = nn.ModuleDict(
            {
                "gate_up_proj": nn.Linear(H, 2 * INTER, bias=False),
                "down_proj": nn.Linear(INTER, H, bias=False),
            }
        )

    def forward(self, x):
        gate, up = self.mlp["gate_up_proj"](self.norm(x)).chunk(2, -1)
        return self.mlp["down_proj"](F.silu(gate) * up)


def _plan(model, *inputs, windows=None):
    gm, names = fake_trace(model, *inputs)
    config = WeightPrefetchConfig(enabled=True, windows=windows)
    h200 = {"cpu": profile("h200")}  # fake tensors on the CPU stand for an H200's
    return run_weight_prefetch(gm, config, weight_names=names, devices=DeviceSetup(profiles=h200))


def test_a_fused_window_counts_what_enters_and_leaves_it():
    plan = _plan(Block(), torch.randn(T, H))
    (gate_up,) = plan.by_role("mlp.gate_up")
    # the norm reads x and its weight and writes its output; its intermediates (pow, mean,
    # rsqrt, ...) stay inside the fused kernel
    assert gate_up.prediction.window_bytes == 4 * (T * H + H + T * H)
    assert gate_up.prediction.window_kernels == 1
    (down,) = plan.by_role("mlp.down")
    # SiLU-and-mul reads both halves of the gate/up output and writes one half
    assert down.prediction.window_bytes == 4 * (2 * T * INTER + T * INTER)
    assert down.prediction.window_kernels == 1


def test_broadcast_dimensions_count_once():
    t = torch.empty(1, 8, device="meta").expand(5, 8)
    assert tensor_bytes(t) == 8 * 4
    assert tensor_bytes(torch.empty(2, 3, dtype=torch.bfloat16, device="meta").t()) == 12


class Attn(nn.Module):
    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.self_attn = nn.ModuleDict(
            {"qkv_proj": nn.Linear(H, 3 * H, bias=False), "o_proj": nn.Linear(H, H, bias=False)}
        )

    def forward(self, x, k_cache):
        q, k, _ = self.self_attn["qkv_proj"](x).chunk(3, -1)
        k = torch.cat([k_cache, k], 0)
        if self.sdpa:  # the fused op inductor keeps (F.scaled_dot_product_attention's, on CPUs)
            fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            out = fused(q[None, None], k[None, None], k[None, None])[0][0, 0]
        else:
            out = (q @ k.t()).softmax(-1) @ k
        return self.self_attn["o_proj"](out)


def test_an_attention_window_counts_attention_as_a_kernel_of_its_own():
    (o,) = _plan(Attn(sdpa=True), torch.randn(1, H), torch.randn(7, H)).by_role("attn.o")
    assert o.window_kind == "attention" and o.prediction.window_kernels == 2  # cat, attention
    cat = 4 * H * (7 + 1 + 8)  # reads the cache's 7 rows and the new row, writes 8 rows
    q_k_v_out = 4 * H * (1 + 8 + 8 + 1)  # attention reads q, k, v (k again) and writes 1 row
    logsumexp = 4  # its second output, one float per query
    assert o.prediction.window_bytes == cat + q_k_v_out + logsumexp


def test_math_attention_matmuls_are_attention_weight_matmuls_are_not():
    gm, names = fake_trace(Attn(sdpa=False), torch.randn(1, H), torch.randn(7, H))
    matmuls = [n for n in gm.graph.nodes if n.op == "call_function" and "mm" in str(n.target)]
    found = attention_matmuls(matmuls)
    assert len(found) == 2  # q @ k.T and p @ v; the qkv and o projections read parameters
    assert all(not any(i.name in names for i in n.all_input_nodes) for n in found)
