"""Windows (``analysis.windows``): the walk back from a linear across collectives to the vector
work behind them, collective and attention windows, and a walk linear in the graph's size."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fxprefetch import SkipReason, WeightPrefetchConfig
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.graph_utils import op_name
from fxprefetch.passes.tables.collectives import COLLECTIVES
from fxprefetch.pipeline import run_weight_prefetch

from support.planning import ON, SPBlock, node_named, node_order, plan_synth
from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace

# the window tests are about where prefetches go, not whether the H200 model gates them
FORCED = WeightPrefetchConfig(enabled=True, force_prefetch=True)


def test_sequence_parallel_walk_crosses_the_all_gather_to_the_norm():
    # the walk from gate_up must not stop at the all-gather ("no vector work"): the norm
    # lies right behind it
    gm, names = fake_trace(SPBlock(True), torch.randn(8, 16))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (gate_up,) = plan.by_role("mlp.gate_up")
    assert gate_up.prefetched, gate_up.skip_reason
    assert gate_up.window_kind == "vector"
    assert gate_up.crossed == ("_c10d_functional::all_gather_into_tensor",)
    assert not any(op in COLLECTIVES for op in gate_up.window)  # not counted as vector work
    assert "aten::var_mean" in gate_up.window  # the layer norm
    # the prefetch starts before the norm: right after the reduce-scatter's wait
    assert gate_up.dependency_op == "_c10d_functional::wait_tensor"
    order = node_order(gm)
    pf = node_named(gm, gate_up.prefetch_node)
    norm = next(n for n in gm.graph.nodes if op_name(n) == "aten::var_mean")
    gather = next(
        n for n in gm.graph.nodes if op_name(n) == "_c10d_functional::all_gather_into_tensor"
    )
    scatter = next(
        n for n in gm.graph.nodes if op_name(n) == "_c10d_functional::reduce_scatter_tensor"
    )
    assert order[scatter] < order[pf] < order[norm] < order[gather]


def test_a_collective_with_no_vector_work_behind_it_ends_the_walk():
    class GatherOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up_proj = nn.Linear(16, 16, bias=False)

        def forward(self, x):
            h = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_gather_into_tensor(x, 2, "0")
            )
            return self.up_proj(h)

    gm, names = fake_trace(GatherOnly(), torch.randn(8, 16))
    (up,) = run_weight_prefetch(gm, ON, weight_names=names).records
    assert up.skip_reason == SkipReason.EMPTY_WINDOW and up.crossed == ()
    assert up.dependency_op == "_c10d_functional::wait_tensor"
    gm, names = fake_trace(GatherOnly(), torch.randn(8, 16))
    cfg = WeightPrefetchConfig(enabled=True, windows=("vector", "collective"))
    (up,) = run_weight_prefetch(gm, cfg, weight_names=names).records
    assert up.prefetched and up.window_kind == "collective"


def test_collective_window_starts_at_the_collective_input():
    gm, names = fake_trace(SPBlock(True), torch.randn(8, 16))
    cfg = WeightPrefetchConfig(enabled=True, windows=("vector", "collective"))
    plan = run_weight_prefetch(gm, cfg, weight_names=names)
    (gate_up,) = plan.by_role("mlp.gate_up")
    # behind the all-gather lies the norm, behind the norm the reduce-scatter: the window
    # spans all three, and the prefetch goes with the reduce-scatter's input
    assert gate_up.window_kind == "collective"
    assert gate_up.window[0] == "_c10d_functional::reduce_scatter_tensor"
    assert gate_up.crossed == ("_c10d_functional::all_gather_into_tensor",)
    pf = node_named(gm, gate_up.prefetch_node)
    scatter = next(
        n for n in gm.graph.nodes if op_name(n) == "_c10d_functional::reduce_scatter_tensor"
    )
    order = node_order(gm)
    assert pf.args[1] is scatter.args[0] and order[pf] < order[scatter]


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "math"])
def test_attention_is_a_window_for_o_proj_on_a_gpu(sdpa):
    gm, plan = plan_synth("h200", FORCED, sdpa=sdpa)
    assert sorted(r.role for r in plan.prefetched) == sorted(
        ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down") * 2
    )
    order = node_order(gm)
    for o in plan.by_role("attn.o"):
        qkv = next(r for r in plan.by_role("attn.qkv") if r.layer == o.layer)
        # SDPA's fused op, or the math attention's q @ k.T and p @ v
        attention = DEFAULT_RULES.attention_ops if sdpa else {"aten::bmm"}
        assert o.window_kind == "attention" and set(o.window) & attention
        assert o.dependency == qkv.node  # the prefetch starts right after the qkv GEMM
        pf, linear = node_named(gm, o.prefetch_node), node_named(gm, o.node)
        ops = [n for n in gm.graph.nodes if op_name(n) in attention]
        inside = [n for n in ops if order[node_named(gm, qkv.node)] < order[n] < order[linear]]
        assert inside and all(order[pf] < order[n] for n in inside)


def test_attention_windows_are_off_where_graphs_split_at_attention_or_where_written_off(caplog):
    _, plan = plan_synth("h200", FORCED, split_at_attention=True)  # vLLM's piecewise graphs
    assert all(r.skip_reason == SkipReason.EMPTY_WINDOW for r in plan.by_role("attn.o"))
    written_off = WeightPrefetchConfig(enabled=True, windows=("vector",), force_prefetch=True)
    _, plan = plan_synth("h200", written_off)
    assert all(not r.prefetched for r in plan.by_role("attn.o"))
    assert all(r.prefetched for r in plan.by_role("mlp.down"))  # a device policy, not a window
    written_on = WeightPrefetchConfig(
        enabled=True, windows=("vector", "attention"), force_prefetch=True
    )
    _, plan = plan_synth(None, written_on)  # opted in without a profile
    assert all(r.window_kind == "attention" for r in plan.by_role("attn.o"))
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        _, plan = plan_synth("h200", written_on, split_at_attention=True)
    assert "attention windows are off here" in caplog.text
    assert not any(r.prefetched for r in plan.by_role("attn.o"))


def test_walk_is_linear_in_graph_size(monkeypatch):
    """Classify calls grow with the layer count, not with its square (the residual stream)."""
    import fxprefetch.passes.analysis.windows as windows_module

    counts = {}
    for layers in (2, 8):
        model = SynthModel(SynthSpec(layers=layers, hidden=16, intermediate=32)).eval()
        gm, names = fake_trace(model, torch.randint(0, 64, (1, 4)))
        calls = 0
        real = windows_module.classify

        def counting(node, rules, real=real):
            nonlocal calls
            calls += 1
            return real(node, rules)

        monkeypatch.setattr(windows_module, "classify", counting)
        run_weight_prefetch(gm, ON, weight_names=names)
        monkeypatch.setattr(windows_module, "classify", real)
        counts[layers] = calls
    assert counts[8] <= 4.5 * counts[2], counts
