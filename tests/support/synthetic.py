"""Transformer-like models generated from a small spec, for property tests of the pass.

Dense or MoE, fused or split projections, vLLM or Hugging Face parameter names, optional
bias and optional activation quantize (fake-quant round/clamp before qkv and o).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SynthSpec:
    layers: int = 2
    hidden: int = 32
    intermediate: int = 64
    heads: int = 4
    dtype: torch.dtype = torch.float32
    moe: bool = False
    experts: int = 4
    top_k: int = 2
    fused: bool = True
    naming: str = "vllm"  # or "hf"
    bias: bool = False
    act_quant: bool = False
    vocab: int = 64
    sdpa: bool = True  # False: attention as explicit matmuls (graphs GE can convert)


def fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor int8 fake quantize: the decomposed round/clamp/div of an activation quant."""
    scale = x.abs().amax().clamp(min=1e-5) / 127
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + 1e-6)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: SynthSpec) -> None:
        super().__init__()
        self.s = s
        h = s.hidden
        if s.fused:
            self.qkv_proj = nn.Linear(h, 3 * h, bias=s.bias)
        else:
            self.q_proj = nn.Linear(h, h, bias=s.bias)
            self.k_proj = nn.Linear(h, h, bias=s.bias)
            self.v_proj = nn.Linear(h, h, bias=s.bias)
        self.o_proj = nn.Linear(h, h, bias=s.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        if self.s.act_quant:
            x = fake_quant(x)
        if self.s.fused:
            q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        heads = self.s.heads
        q, k, v = (y.view(b, t, heads, h // heads).transpose(1, 2) for y in (q, k, v))
        if self.s.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / (h // heads) ** 0.5
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        out = out.transpose(1, 2).reshape(b, t, h)
        if self.s.act_quant:
            out = fake_quant(out)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, s: SynthSpec) -> None:
        super().__init__()
        self.s = s
        if s.fused:
            self.gate_up_proj = nn.Linear(s.hidden, 2 * s.intermediate, bias=s.bias)
        else:
            self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=s.bias)
            self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=s.bias)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=s.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.s.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """Stacked expert weights, named like vLLM (w13_weight/w2_weight) or HF (gate_up_proj)."""

    def __init__(self, s: SynthSpec) -> None:
        super().__init__()
        self.s = s
        up = torch.randn(s.experts, 2 * s.intermediate, s.hidden) * 0.05
        down = torch.randn(s.experts, s.hidden, s.intermediate) * 0.05
        if s.naming == "vllm":
            self.w13_weight, self.w2_weight = nn.Parameter(up), nn.Parameter(down)
        else:
            self.gate_up_proj, self.down_proj = nn.Parameter(up), nn.Parameter(down)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.s.naming == "vllm":
            return self.w13_weight, self.w2_weight
        return self.gate_up_proj, self.down_proj

    def forward(self, x: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; dispatch: [T, E] routing weights (0 for unrouted tokens)
        w13, w2 = self.weights()
        routed = x.unsqueeze(0) * (dispatch.t().unsqueeze(-1) > 0).to(x.dtype)  # [E, T, H]
        gate, up = torch.bmm(routed, w13.transpose(1, 2)).chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))  # [E, T, H]
        return (out * dispatch.t().unsqueeze(-1).to(out.dtype)).sum(0)


class MoE(nn.Module):
    def __init__(self, s: SynthSpec) -> None:
        super().__init__()
        self.s = s
        self.gate = nn.Linear(s.hidden, s.experts, bias=False)
        self.experts = Experts(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        probs = torch.softmax(self.gate(flat).float(), dim=-1)
        weights, idx = torch.topk(probs, self.s.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        dispatch = torch.zeros_like(probs).scatter(1, idx, weights)
        return self.experts(flat, dispatch).reshape(b, t, h)


class Block(nn.Module):
    def __init__(self, s: SynthSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden)
        self.mlp = MoE(s) if s.moe else MLP(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class SynthModel(nn.Module):
    def __init__(self, s: SynthSpec) -> None:
        super().__init__()
        self.spec = s
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden)
        self.lm_head = nn.Linear(s.hidden, s.vocab, bias=False)
        self.to(s.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def expected_roles(s: SynthSpec) -> dict[str, str | None]:
    """Role of each parameter the model multiplies by, by its path."""
    roles: dict[str, str | None] = {"lm_head.weight": None}
    for i in range(s.layers):
        p = f"layers.{i}"
        names = ["qkv_proj"] if s.fused else ["q_proj", "k_proj", "v_proj"]
        roles |= {f"{p}.self_attn.{n}.weight": "attn.qkv" for n in names}
        roles[f"{p}.self_attn.o_proj.weight"] = "attn.o"
        if s.moe:
            roles[f"{p}.mlp.gate.weight"] = None
            up, down = (
                ("w13_weight", "w2_weight") if s.naming == "vllm" else ("gate_up_proj", "down_proj")
            )
            roles[f"{p}.mlp.experts.{up}"] = "moe.gate_up"
            roles[f"{p}.mlp.experts.{down}"] = None
        else:
            names = ["gate_up_proj"] if s.fused else ["gate_proj", "up_proj"]
            roles |= {f"{p}.mlp.{n}.weight": "mlp.gate_up" for n in names}
            roles[f"{p}.mlp.down_proj.weight"] = "mlp.down"
    return roles


class TwoGraphs(nn.Module):
    """Two one-layer models with a graph break between them: two compiled graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = SynthModel(SynthSpec(layers=1)), SynthModel(SynthSpec(layers=1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.a(ids).argmax(-1)
        torch._dynamo.graph_break()
        return self.b(x)
