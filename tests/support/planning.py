"""Planning small graphs for the tests of single passes and analyses: the models they plan,
the plan, and lookups of the nodes the pass placed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from fxprefetch import PrefetchPlan, WeightPrefetchConfig
from fxprefetch.devices import DeviceSetup
from fxprefetch.devices.prediction import DeviceProfile
from fxprefetch.ops import PREFETCH_OP
from fxprefetch.pipeline import run_weight_prefetch

from support.synthetic import SynthModel, SynthSpec
from support.tracing import export_aten, fake_trace, trace_constants

ON = WeightPrefetchConfig(enabled=True)

Dense = tuple[SynthModel, torch.Tensor, GraphModule, dict[str, str]]


def dense_llama() -> Dense:
    """Two fused Llama-style layers, token ids, and the model exported to an aten graph."""
    model = SynthModel(SynthSpec(layers=2, fused=True)).eval()
    ids = torch.randint(0, 64, (1, 6))
    return model, ids, *export_aten(model, ids)


def fresh_export(dense: Dense) -> Dense:
    """``dense`` with a newly exported graph, for a test that changes its graph."""
    model, ids, _, _ = dense
    gm, names = export_aten(model, ids)
    return model, ids, gm, names


def plan_synth(
    profile_name: str | DeviceProfile | None = None,
    config: WeightPrefetchConfig = ON,
    split_at_attention: bool = False,
    **spec,
) -> tuple[GraphModule, PrefetchPlan]:
    """Plan a fake-traced two-layer ``SynthModel``, for the device ``profile_name`` (a
    built-in profile's name, or a profile) if given."""
    from fxprefetch.devices.profile_catalog import profile

    gm, names = fake_trace(SynthModel(SynthSpec(layers=2, **spec)), torch.randint(0, 64, (1, 4)))
    if isinstance(profile_name, str):
        profile_name = profile(profile_name)
    profiles = {"cpu": profile_name} if profile_name is not None else {}
    plan = run_weight_prefetch(
        gm,
        config,
        weight_names=names,
        devices=DeviceSetup(profiles=profiles),
        split_at_attention=split_at_attention,
    )
    return gm, plan


def planned_synth() -> tuple[GraphModule, PrefetchPlan]:
    """A fake-traced two-layer ``SynthModel`` after the planning pass: four prefetches."""
    gm, names = fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    assert len(plan.prefetched) == 4
    return gm, plan


def prefetch_nodes(gm: GraphModule, target=PREFETCH_OP) -> list[Node]:
    """The nodes of ``gm`` calling ``target`` (the prefetch op by default), in graph order."""
    return list(gm.graph.find_nodes(op="call_function", target=target))


def node_named(gm: GraphModule, name: str) -> Node:
    """The node of ``gm`` called ``name``."""
    return next(n for n in gm.graph.nodes if n.name == name)


def node_order(gm: GraphModule) -> Mapping[Node, int]:
    """Each node's position in ``gm``'s graph."""
    return {n: i for i, n in enumerate(gm.graph.nodes)}


class SPBlock(nn.Module):
    """A sequence-parallel layer: reduce-scatter before the norm, all-gather before the MLP."""

    def __init__(self, collectives: bool) -> None:
        super().__init__()
        self.collectives = collectives
        self.post_attention_layernorm = nn.LayerNorm(16)
        self.mlp = nn.ModuleDict(
            {
                "gate_up_proj": nn.Linear(16, 64, bias=False),
                "down_proj": nn.Linear(32, 16, bias=False),
            }
        )

    def forward(self, x):
        if self.collectives:
            x = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.reduce_scatter_tensor(x, "sum", 2, "0")
            )
        h = self.post_attention_layernorm(x)
        if self.collectives:
            h = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_gather_into_tensor(h, 2, "0")
            )
        gate, up = self.mlp["gate_up_proj"](h).chunk(2, -1)
        return self.mlp["down_proj"](F.silu(gate) * up)


def hf_moe_plan(tokens: int, implementation: str, mode: str = "fake") -> PrefetchPlan:
    """The plan of transformers' tiny Qwen3-MoE (2 of 4 experts per token) with experts from
    96 tokens (vllm-ascend's rule), traced at ``tokens`` tokens."""
    import pytest

    pytest.importorskip("transformers")
    from fxprefetch.presets import build_model

    model = build_model("qwen3-moe-tiny").to(torch.bfloat16)  # grouped_mm needs bf16 here
    model.config._experts_implementation = implementation

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(ids, use_cache=False).logits

    gm = trace_constants(model, forward, torch.randint(0, 64, (1, tokens)), mode)
    config = WeightPrefetchConfig.from_dict(
        {"enabled": True, "token_range": {"moe": {"gate_up": {"min_tokens": 96}}}}
    )
    return run_weight_prefetch(gm, config)
