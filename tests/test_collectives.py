"""Collectives (``analysis.collectives``): c10d's and vLLM's collectives are barriers, and their
order in the graph says whether it is sequence-parallel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.graph_utils import op_name
from fxprefetch.passes.analysis.op_classes import classify
from fxprefetch.pipeline import run_weight_prefetch

from support.planning import ON, SPBlock
from support.tracing import fake_trace


@pytest.mark.parametrize("collectives", [False, True])
def test_mlp_down_follows_sequence_parallel_collectives_in_the_graph(collectives):
    gm, names = fake_trace(SPBlock(collectives), torch.randn(8, 16))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (down,) = plan.by_role("mlp.down")
    assert plan.sequence_parallel is collectives
    assert down.prefetched is collectives


def _vllm_collectives() -> None:
    """Stand-ins for vLLM's custom collectives (identity kernels; only their names matter)."""
    if hasattr(torch.ops, "vllm") and hasattr(torch.ops.vllm, "reduce_scatter"):
        return
    lib = torch.library.Library("vllm", "FRAGMENT")
    for name in ("all_reduce", "reduce_scatter", "all_gather"):
        lib.define(f"{name}(Tensor x) -> Tensor")
        lib.impl(name, lambda x: x.clone(), "CompositeExplicitAutograd")
    _vllm_collectives.lib = lib  # keep the registrations alive


class VllmSPBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.post_attention_layernorm = nn.LayerNorm(16)
        self.mlp = nn.ModuleDict(
            {
                "gate_up_proj": nn.Linear(16, 64, bias=False),
                "down_proj": nn.Linear(32, 16, bias=False),
            }
        )

    def forward(self, x):
        h = torch.ops.vllm.all_gather(
            self.post_attention_layernorm(torch.ops.vllm.reduce_scatter(x))
        )
        gate, up = self.mlp["gate_up_proj"](h).chunk(2, -1)
        return torch.ops.vllm.all_reduce(self.mlp["down_proj"](F.silu(gate) * up))


def test_vllm_collectives_are_barriers_and_mean_sequence_parallel():
    _vllm_collectives()
    gm, names = fake_trace(VllmSPBlock(), torch.randn(8, 16))
    kinds = {
        op_name(n): classify(n).value for n in gm.graph.nodes if op_name(n).startswith("vllm::")
    }
    assert kinds == {
        "vllm::reduce_scatter": "barrier",
        "vllm::all_gather": "barrier",
        "vllm::all_reduce": "barrier",
    }
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    assert plan.sequence_parallel
    (gate_up,) = plan.by_role("mlp.gate_up")
    # the walk crosses vLLM's all-gather to the norm behind it, and stops at the scatter
    assert gate_up.prefetched and gate_up.crossed == ("vllm::all_gather",)
    assert gate_up.dependency_op == "vllm::reduce_scatter"
    (down,) = plan.by_role("mlp.down")
    assert down.prefetched


def test_all_gather_before_reduce_scatter_is_not_sequence_parallel():
    from fxprefetch.passes.analysis.collectives import has_sequence_parallel_collectives

    class Backwards(nn.Module):
        def forward(self, x):
            return torch.ops.vllm.reduce_scatter(torch.ops.vllm.all_gather(x))

    _vllm_collectives()
    gm, _ = fake_trace(Backwards(), torch.randn(4, 4))
    assert not has_sequence_parallel_collectives(gm.graph.nodes, DEFAULT_RULES)
