"""Tensor- and sequence-parallel Llama-style blocks, run on every rank by tests/test_distributed.py.

TP: column-parallel qkv and gate_up, row-parallel o and down followed by an all-reduce.
SP: like TP, but activations outside attention and MLP are sharded along the sequence: the
row-parallel outputs are reduce-scattered, and the norms' outputs all-gathered before qkv and
gate_up (a reduce-scatter before the post-attention norm, an all-gather before the MLP).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

import fxprefetch

HIDDEN, HEADS, INTERMEDIATE, TOKENS = 32, 4, 64, 8


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Block(nn.Module):
    """One decoder layer; ``world`` > 1 makes it the rank's shard of the parallel layer."""

    def __init__(self, world: int = 1, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.world, self.sp = world, sequence_parallel
        h, i = HIDDEN, INTERMEDIATE
        self.input_layernorm = RMSNorm(h)
        self.post_attention_layernorm = RMSNorm(h)
        self.self_attn = nn.ModuleDict(
            {
                "qkv_proj": nn.Linear(h, 3 * h // world, bias=False),
                "o_proj": nn.Linear(h // world, h, bias=False),
            }
        )
        self.mlp = nn.ModuleDict(
            {
                "gate_up_proj": nn.Linear(h, 2 * i // world, bias=False),
                "down_proj": nn.Linear(i // world, h, bias=False),
            }
        )

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_gather_tensor(x, 0, dist.group.WORLD) if self.sp else x

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return x
        if self.sp:
            return funcol.reduce_scatter_tensor(x, "sum", 0, dist.group.WORLD)
        return funcol.all_reduce(x, "sum", dist.group.WORLD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = HEADS // self.world
        h = self._gather(self.input_layernorm(x))
        q, k, v = self.self_attn["qkv_proj"](h).chunk(3, -1)
        q, k, v = (t.view(-1, heads, HIDDEN // HEADS).transpose(0, 1) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn.transpose(0, 1).reshape(-1, HIDDEN // self.world)
        x = x + self._reduce(self.self_attn["o_proj"](attn))
        h = self._gather(self.post_attention_layernorm(x))
        gate, up = self.mlp["gate_up_proj"](h).chunk(2, -1)
        return x + self._reduce(self.mlp["down_proj"](F.silu(gate) * up))


def shard(full: Block, rank: int, world: int, sequence_parallel: bool) -> Block:
    """This rank's shard of ``full``: rows of qkv/gate_up per part, columns of o/down."""
    part = Block(world, sequence_parallel)

    def rows(w: torch.Tensor, parts: int) -> torch.Tensor:
        return torch.cat([c.chunk(world)[rank] for c in w.chunk(parts)])

    with torch.no_grad():
        part.input_layernorm.weight.copy_(full.input_layernorm.weight)
        part.post_attention_layernorm.weight.copy_(full.post_attention_layernorm.weight)
        part.self_attn["qkv_proj"].weight.copy_(rows(full.self_attn["qkv_proj"].weight, 3))
        part.self_attn["o_proj"].weight.copy_(full.self_attn["o_proj"].weight.chunk(world, 1)[rank])
        part.mlp["gate_up_proj"].weight.copy_(rows(full.mlp["gate_up_proj"].weight, 2))
        part.mlp["down_proj"].weight.copy_(full.mlp["down_proj"].weight.chunk(world, 1)[rank])
    return part


VARIANTS = {  # name: (sequence_parallel, windows, target)
    "tp": (False, ["vector"], "eager"),
    "tp-collective": (False, ["vector", "collective"], "eager"),
    "sp": (True, ["vector"], "eager"),
    "sp-collective": (True, ["vector", "collective"], "eager"),
    "sp-collective-inductor": (True, ["vector", "collective"], "inductor"),
}


def _summary(plan: fxprefetch.PrefetchPlan) -> dict[str, Any]:
    return {
        r.role: {
            "prefetched": r.prefetched,
            "window_kind": r.window_kind,
            "window": list(r.window),
            "crossed": list(r.crossed),
            "dependency_op": r.dependency_op,
            "skip_reason": r.skip_reason,
            "bytes": r.prefetch_bytes,
        }
        for r in plan.records
    }


def tp_sp_workload(rank: int, world: int) -> dict[str, Any]:
    torch.manual_seed(0)  # every rank builds the same full layer and input
    full = Block().eval()
    x = torch.randn(TOKENS, HIDDEN)
    with torch.no_grad():
        expected = full(x)
    results = {}
    for name, (sp, windows, target) in VARIANTS.items():
        torch._dynamo.reset()
        fxprefetch.clear_plans()
        block = shard(full, rank, world, sp).eval()
        local_x = x.chunk(world)[rank] if sp else x
        local_expected = expected.chunk(world)[rank] if sp else expected
        compiled = torch.compile(
            block,
            backend="npu_prefetch",
            options={"target": target, "weight_prefetch_config": {"windows": windows}},
        )
        with torch.no_grad():
            compiled(local_x)  # compile
            with fxprefetch.collect_stats() as ran:
                out = compiled(local_x)
        (plan,) = fxprefetch.last_plans()
        results[name] = {
            "max_error": (out - local_expected).abs().max().item(),
            "calls_per_forward": ran.calls,  # prefetch kernels that ran
            "hints_per_forward": ran.hints,  # planned hints of compiled code that left them out
            "sequence_parallel": plan.sequence_parallel,
            "roles": _summary(plan),
        }
    return results


def fail_on_rank_one(rank: int, world: int) -> None:
    """Rank 1 raises; rank 0 waits in a collective that can never complete."""
    if rank == 1:
        raise ValueError("rank one fails on purpose")
    dist.barrier()
