"""The weight-prefetch pass on hand-made and synthetic graphs: windows, dependencies, sizes,
rules, node order, idempotence, stripping, torch_npu ops (stand-ins) and linear cost."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxprefetch import SkipReason, WeightPrefetchConfig
from fxprefetch.ops import PREFETCH_OP as PREFETCH
from fxprefetch.passes import (
    DEFAULT_RULES,
    add_role_rule,
    current_rules,
    register_linear_op,
    run_weight_prefetch,
    strip_prefetch,
)
from fxprefetch.passes.analysis.graph_utils import normalize_source_path, op_name
from fxprefetch.passes.analysis.op_classes import classify
from fxprefetch.passes.analysis.prefetch_meta import prefetch_meta
from fxprefetch.passes.analysis.roles import match_role
from fxprefetch.passes.tables.collectives import COLLECTIVES

from support.npu_standins import install_op_standins
from support.synthetic import SynthModel, SynthSpec
from support.tracing import export_aten, fake_trace, run_graph

ON = WeightPrefetchConfig(enabled=True)


def _prefetches(gm):
    return list(gm.graph.find_nodes(op="call_function", target=PREFETCH))


def _node(gm, name):
    return next(n for n in gm.graph.nodes if n.name == name)


def _order(gm):
    return {n: i for i, n in enumerate(gm.graph.nodes)}


@pytest.fixture(scope="module")
def dense():
    model = SynthModel(SynthSpec(layers=2, fused=True)).eval()
    ids = torch.randint(0, 64, (1, 6))
    return model, ids, *export_aten(model, ids)


def _fresh(dense):
    model, ids, _, _ = dense
    gm, names = export_aten(model, ids)
    return model, ids, gm, names


def test_llama_layer_windows_and_dependencies(dense):
    _, _, gm, names = _fresh(dense)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    rec = {r.weight: r for r in plan}
    qkv0 = rec["layers.0.self_attn.qkv_proj.weight"]
    qkv1 = rec["layers.1.self_attn.qkv_proj.weight"]
    assert qkv0.dependency_op == "aten::embedding"
    assert qkv1.dependency == rec["layers.0.mlp.down_proj.weight"].node  # previous down mm
    for r in (qkv0, qkv1):
        assert {"aten::pow", "aten::mean", "aten::rsqrt"} <= set(r.window)
        assert r.prefetched and r.window_kind == "vector"
    o = rec["layers.0.self_attn.o_proj.weight"]
    assert not o.prefetched and o.skip_reason == SkipReason.EMPTY_WINDOW
    gate_up = rec["layers.0.mlp.gate_up_proj.weight"]
    assert gate_up.dependency == o.node and "aten::add" in gate_up.window
    down = rec["layers.0.mlp.down_proj.weight"]
    assert down.skip_reason == SkipReason.NEEDS_SEQUENCE_PARALLEL
    assert down.dependency == gate_up.node  # recorded even when skipped
    assert rec["lm_head.weight"].skip_reason == SkipReason.NO_ROLE


def test_prefetch_sits_right_after_dependency_and_before_window(dense):
    _, _, gm, names = _fresh(dense)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    order = _order(gm)
    for r in plan.prefetched:
        pf, dep, lin = _node(gm, r.prefetch_node), _node(gm, r.dependency), _node(gm, r.node)
        assert order[dep] < order[pf] < order[lin]
        between = [n for n in gm.graph.nodes if order[dep] < order[n] < order[pf]]
        assert all(n.target is PREFETCH for n in between)  # only other prefetches
        assert pf.args[0].op == "placeholder" and names[pf.args[0].name] == r.weight
        assert pf.args[1] is dep
    # q/k/v-style siblings behind one dependency keep graph order; here: two layers' qkv
    deps = {}
    for r in plan.prefetched:
        deps.setdefault(r.dependency, []).append(order[_node(gm, r.prefetch_node)])
    assert all(v == sorted(v) for v in deps.values())


def test_outputs_unchanged_and_prefetches_execute(dense):
    model, ids, gm, names = _fresh(dense)
    ref = run_graph(gm, model, names, ids)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    import fxprefetch

    with fxprefetch.collect_stats() as s:
        out = run_graph(gm, model, names, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, out, strict=True))
    assert s.calls == len(plan.prefetched) == 4
    assert s.bytes_requested == sum(r.prefetch_bytes for r in plan.prefetched)


@pytest.mark.parametrize(
    ("ratio", "cap", "dtype"),
    [
        (1.0, 18 * 1024 * 1024, torch.float32),
        (0.5, 18 * 1024 * 1024, torch.bfloat16),
        (0.3, 1000, torch.float16),
        (0.77, 4096, torch.float32),
        (1e-6, 4096, torch.float32),
    ],
)
def test_sizes_follow_the_formula_and_cap(ratio, cap, dtype):
    model = SynthModel(SynthSpec(layers=1, hidden=64, intermediate=128, dtype=dtype)).eval()
    ids = torch.randint(0, 64, (1, 4))
    gm, names = export_aten(model, ids)
    cfg = WeightPrefetchConfig.from_dict(
        {
            "enabled": True,
            "max_prefetch_bytes": cap,
            "prefetch_ratio": {"attn": {"qkv": ratio}, "mlp": {"gate_up": ratio}},
        }
    )
    plan = run_weight_prefetch(gm, cfg, weight_names=names)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    expected = {
        "layers.0.self_attn.qkv_proj.weight": 3 * 64 * 64 * itemsize,
        "layers.0.mlp.gate_up_proj.weight": 2 * 128 * 64 * itemsize,
    }
    for r in plan:
        if r.weight not in expected:
            continue
        assert r.weight_bytes == expected[r.weight]
        wanted = int(ratio * expected[r.weight])
        if wanted == 0:
            assert r.skip_reason == SkipReason.ZERO_BYTES and not r.prefetched
            continue
        assert r.prefetch_bytes == min(wanted, cap) and r.capped == (wanted > cap)
        assert _node(gm, r.prefetch_node).args[2] == r.prefetch_bytes


def test_ratio_zero_and_disabled_insert_nothing(dense):
    _, _, gm, names = _fresh(dense)
    cfg = WeightPrefetchConfig.from_dict(
        {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 0}, "mlp": {"gate_up": 0}}}
    )
    plan = run_weight_prefetch(gm, cfg, weight_names=names)
    assert not _prefetches(gm)
    assert {r.skip_reason for r in plan.by_role("attn.qkv")} == {SkipReason.ZERO_RATIO}
    plan = run_weight_prefetch(gm, WeightPrefetchConfig(), weight_names=names)
    assert not _prefetches(gm)
    assert all(r.skip_reason in (SkipReason.DISABLED, SkipReason.NO_ROLE) for r in plan)


def test_mlp_down_with_declared_sequence_parallel(dense):
    _, _, gm, names = _fresh(dense)
    plan = run_weight_prefetch(
        gm, WeightPrefetchConfig(enabled=True, sequence_parallel=True), weight_names=names
    )
    downs = plan.by_role("mlp.down")
    assert len(downs) == 2 and all(r.prefetched for r in downs)
    assert all({"aten::mul"} <= set(r.window) for r in downs)


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


@pytest.mark.parametrize("collectives", [False, True])
def test_mlp_down_follows_sequence_parallel_collectives_in_the_graph(collectives):
    gm, names = fake_trace(SPBlock(collectives), torch.randn(8, 16))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (down,) = plan.by_role("mlp.down")
    assert plan.sequence_parallel is collectives
    assert down.prefetched is collectives


def test_sequence_parallel_walk_crosses_the_all_gather_to_the_norm():
    # issue #10 defect 6: the walk from gate_up met the all-gather and stopped ("no vector
    # work"), although the norm lies right behind it
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
    order = _order(gm)
    pf = _node(gm, gate_up.prefetch_node)
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
    pf = _node(gm, gate_up.prefetch_node)
    scatter = next(
        n for n in gm.graph.nodes if op_name(n) == "_c10d_functional::reduce_scatter_tensor"
    )
    order = _order(gm)
    assert pf.args[1] is scatter.args[0] and order[pf] < order[scatter]


# -- issue #21: windows per device (mlp.down, attention) and "auto" sizes ----------------------


def _synth_plan(profile_name=None, config=ON, split_at_attention=False, **spec):
    from fxprefetch.prediction import profile

    gm, names = fake_trace(SynthModel(SynthSpec(layers=2, **spec)), torch.randint(0, 64, (1, 4)))
    profiles = {"cpu": profile(profile_name)} if profile_name else None
    plan = run_weight_prefetch(
        gm,
        config,
        weight_names=names,
        device_profiles=profiles,
        split_at_attention=split_at_attention,
    )
    return gm, plan


@pytest.mark.parametrize(
    ("device", "down_prefetched"), [(None, False), ("ascend-910b", False), ("h200", True)]
)
def test_mlp_down_needs_sequence_parallelism_on_ascend_only(device, down_prefetched):
    _, plan = _synth_plan(device)
    downs = plan.by_role("mlp.down")
    assert len(downs) == 2 and all(r.prefetched is down_prefetched for r in downs)
    if down_prefetched:  # SiLU-and-mul is the window
        assert all(r.window_kind == "vector" and "aten::mul" in r.window for r in downs)
    else:
        assert all(r.skip_reason == SkipReason.NEEDS_SEQUENCE_PARALLEL for r in downs)


@pytest.mark.parametrize("sdpa", [True, False], ids=["sdpa", "math"])
def test_attention_is_a_window_for_o_proj_on_a_gpu(sdpa):
    gm, plan = _synth_plan("h200", sdpa=sdpa)
    assert sorted(r.role for r in plan.prefetched) == sorted(
        ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down") * 2
    )
    order = _order(gm)
    for o in plan.by_role("attn.o"):
        qkv = next(r for r in plan.by_role("attn.qkv") if r.layer == o.layer)
        # SDPA's fused op, or the math attention's q @ k.T and p @ v
        attention = DEFAULT_RULES.attention_ops if sdpa else {"aten::bmm"}
        assert o.window_kind == "attention" and set(o.window) & attention
        assert o.dependency == qkv.node  # the prefetch starts right after the qkv GEMM
        pf, linear = _node(gm, o.prefetch_node), _node(gm, o.node)
        ops = [n for n in gm.graph.nodes if op_name(n) in attention]
        inside = [n for n in ops if order[_node(gm, qkv.node)] < order[n] < order[linear]]
        assert inside and all(order[pf] < order[n] for n in inside)


def test_attention_windows_are_off_where_graphs_split_at_attention_or_where_written_off(caplog):
    _, plan = _synth_plan("h200", split_at_attention=True)  # vLLM's piecewise graphs
    assert all(r.skip_reason == SkipReason.EMPTY_WINDOW for r in plan.by_role("attn.o"))
    written_off = WeightPrefetchConfig(enabled=True, windows=("vector",))
    _, plan = _synth_plan("h200", written_off)
    assert all(not r.prefetched for r in plan.by_role("attn.o"))
    assert all(r.prefetched for r in plan.by_role("mlp.down"))  # a device policy, not a window
    written_on = WeightPrefetchConfig(enabled=True, windows=("vector", "attention"))
    _, plan = _synth_plan(None, written_on)  # opted in without a profile
    assert all(r.window_kind == "attention" for r in plan.by_role("attn.o"))
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        _, plan = _synth_plan("h200", written_on, split_at_attention=True)
    assert "attention windows are off here" in caplog.text
    assert not any(r.prefetched for r in plan.by_role("attn.o"))


def test_auto_sizes_each_prefetch_to_what_its_window_hides():
    from fxprefetch.prediction import WindowTraffic, hideable_bytes, profile

    h200 = profile("h200")
    auto = WeightPrefetchConfig(enabled=True, max_prefetch_bytes="auto")
    _, plan = _synth_plan("h200", auto, hidden=512, intermediate=2048)
    assert len(plan.prefetched) == 8
    for r in plan.prefetched:
        p = r.prediction
        wanted = hideable_bytes(h200, WindowTraffic(p.window_bytes, p.window_kernels), p.shared_us)
        assert p.auto_bytes == wanted
        assert r.prefetch_bytes == min(r.weight_bytes, wanted)
        assert r.capped is (r.weight_bytes > wanted)
    # a role's ratio "auto" caps that role only, under the written cap
    down_auto = WeightPrefetchConfig.from_dict(
        {"enabled": True, "max_prefetch_bytes": 4096, "prefetch_ratio": {"mlp": {"down": "auto"}}}
    )
    _, plan = _synth_plan("h200", down_auto, hidden=512, intermediate=2048)
    assert all(r.prefetch_bytes == 4096 for r in plan.prefetched)
    assert all(r.prediction.auto_bytes is not None for r in plan.by_role("mlp.down"))
    assert all(r.prediction.auto_bytes is None for r in plan.by_role("attn.qkv"))


def test_auto_without_a_device_profile_warns_and_uses_the_cap(caplog):
    auto = WeightPrefetchConfig(enabled=True, max_prefetch_bytes="auto")
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        _, plan = _synth_plan(None, auto)
    assert "no device profile" in caplog.text
    assert plan.prefetched and all(r.prediction is None for r in plan.prefetched)


def test_prefetches_behind_one_window_share_it():
    # split q/k/v behind one norm: each later prefetch gets what the earlier ones left
    _, plan = _synth_plan("h200", fused=False, hidden=512)
    for layer in (0, 1):
        q, k, v = (r for r in plan.by_role("attn.qkv") if r.layer == layer)
        assert q.prediction.shared_us == 0
        assert k.prediction.shared_us == pytest.approx(q.prediction.transfer_us)
        assert v.prediction.shared_us == pytest.approx(
            q.prediction.transfer_us + k.prediction.transfer_us
        )


def test_second_run_adds_nothing(dense):
    _, _, gm, names = _fresh(dense)
    first = run_weight_prefetch(gm, ON, weight_names=names)
    nodes = len(gm.graph.nodes)
    second = run_weight_prefetch(gm, ON, weight_names=names)
    assert len(gm.graph.nodes) == nodes and not second.prefetched
    assert {r.node for r in second if r.skip_reason == SkipReason.ALREADY_PREFETCHED} == {
        r.node for r in first.prefetched
    }


def test_strip_restores_the_original_code(dense):
    _, _, gm, names = _fresh(dense)
    before = gm.code
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    assert gm.code != before
    assert strip_prefetch(gm) == len(plan.prefetched)
    assert gm.code == before


def test_prefetch_nodes_survive_dce_and_carry_meta(dense):
    _, _, gm, names = _fresh(dense)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    gm.graph.eliminate_dead_code()
    nodes = _prefetches(gm)
    assert len(nodes) == len(plan.prefetched)
    for n in nodes:
        assert "val" in n.meta and n.meta["val"] is None
        assert prefetch_meta(n).max_size == n.args[2]
        assert "nn_module_stack" in n.meta


def test_plan_is_logged(dense, caplog):
    _, _, gm, names = _fresh(dense)
    with caplog.at_level(logging.INFO, logger="fxprefetch"):
        plan = run_weight_prefetch(gm, ON, weight_names=names, graph_name="g7")
    assert plan.summary_line() in caplog.text and "g7: 4/9 linears prefetched" in caplog.text


def test_symbolic_activation_shapes():
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 6))
    seq = torch.export.Dim("seq", min=2, max=64)
    with torch.no_grad():
        ep = torch.export.export(model, (ids,), dynamic_shapes=({1: seq},), strict=False)
    from torch._inductor.decomposition import select_decomp_table

    ep = ep.run_decompositions(select_decomp_table())
    gm, names = ep.graph_module, dict(ep.graph_signature.inputs_to_parameters)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    assert len(plan.prefetched) == 2
    assert all(isinstance(r.prefetch_bytes, int) for r in plan.prefetched)
    gm.graph.lint()


def test_moe_experts_behind_gating_and_routing():
    spec = SynthSpec(layers=1, moe=True, naming="vllm")
    model = SynthModel(spec).eval()
    ids = torch.randint(0, 64, (1, 6))
    gm, names = export_aten(model, ids)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (experts,) = plan.by_role("moe.gate_up")
    assert experts.weight == "layers.0.mlp.experts.w13_weight" and experts.op == "aten::bmm"
    router = next(r for r in plan if r.weight == "layers.0.mlp.gate.weight")
    assert router.skip_reason == SkipReason.NO_ROLE
    assert experts.dependency == router.node
    # softmax is decomposed (amax, exp, sum, div); top-k and scatter are routing
    assert {"aten::amax", "aten::exp", "aten::topk", "aten::scatter"} <= set(experts.window)
    assert experts.prefetch_bytes == int(0.8 * 4 * 128 * 32 * 4)


# -- torch_npu ops (stand-ins with the exact schemas; see tests/support/npu_standins.py) -------------


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
        _node(gm, o.dependency).args[0].target
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


# -- tables users extend -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "role"),
    [
        ("model.layers.3.self_attn.qkv_proj", "attn.qkv"),
        ("model.layers.3.self_attn.q_proj", "attn.qkv"),
        ("model.layers.3.self_attn.v_proj", "attn.qkv"),
        ("model.layers.3.self_attn.o_proj", "attn.o"),
        ("transformer.h.0.self_attention.dense", "attn.o"),
        ("model.layers.0.self_attn.q_a_proj", "attn.qkv"),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa", "attn.qkv"),
        ("model.layers.0.self_attn.kv_b_proj", "attn.qkv"),
        ("model.layers.0.self_attn.fused_qkv_a_proj", "attn.qkv"),
        ("model.layers.0.mlp.gate_up_proj", "mlp.gate_up"),
        ("model.layers.0.mlp.gate_proj", "mlp.gate_up"),
        ("model.layers.0.mlp.down_proj", "mlp.down"),
        ("model.layers.0.mlp.shared_experts.gate_up_proj", "mlp.gate_up"),
        ("model.layers.0.mlp.experts.w13_weight", "moe.gate_up"),
        ("model.layers.0.mlp.experts.gate_up_proj", "moe.gate_up"),
        ("model.layers.0.block_sparse_moe.experts.3.w1", "moe.gate_up"),
        ("model.layers.0.block_sparse_moe.experts.3.w3", "moe.gate_up"),
        ("model.layers.0.mlp.experts.7.up_proj", "moe.gate_up"),
        ("model.layers.0.mlp.experts.w2_weight", None),
        ("model.layers.0.block_sparse_moe.experts.3.w2", None),
        ("model.layers.0.mlp.gate", None),
        ("lm_head", None),
    ],
)
def test_default_role_rules(path, role):
    rule = match_role(path)
    assert rule is not None and rule.role == role


def test_user_role_rule_wins(dense):
    _, _, gm, names = _fresh(dense)
    add_role_rule(r"\.lm_head$|^lm_head$", "mlp.gate_up", "tied head")
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    head = next(r for r in plan if r.weight == "lm_head.weight")
    assert head.role == "mlp.gate_up" and head.prefetched
    with pytest.raises(ValueError, match="unknown role"):
        add_role_rule("x", "mlp.up")


def test_rules_passed_as_a_value_are_the_only_rules_read(dense):
    _, _, gm, names = _fresh(dense)
    rules = DEFAULT_RULES.with_role_rule(r"(^|\.)lm_head$", "mlp.gate_up", "tied head")
    assert rules.digest != DEFAULT_RULES.digest and current_rules() == DEFAULT_RULES
    plan = run_weight_prefetch(gm, ON, weight_names=names, rules=rules)
    assert next(r for r in plan if r.weight == "lm_head.weight").prefetched
    # the value is frozen, hashable and survives pickling (vLLM ships it to workers)
    import pickle

    again = pickle.loads(pickle.dumps(rules))
    assert again == rules and hash(again) == hash(rules) and again.digest == rules.digest


def test_user_linear_op():
    lib = torch.library.Library("fxtest", "FRAGMENT")
    lib.define("gemm(Tensor act, Tensor w) -> Tensor")
    lib.impl("gemm", lambda a, w: a @ w.t(), "CompositeExplicitAutograd")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.o_proj = nn.Linear(8, 8)

        def forward(self, x):
            return torch.ops.fxtest.gemm(torch.relu(x), self.o_proj.weight)

    gm, names = fake_trace(M(), torch.randn(2, 8))
    assert not run_weight_prefetch(gm, ON, weight_names=names).records
    register_linear_op("fxtest::gemm", "w", ("act",))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    (rec,) = plan.records
    assert rec.role == "attn.o" and rec.prefetched and rec.window == ("aten::relu",)
    with pytest.raises(ValueError, match="qualified"):
        register_linear_op("gemm", "w", ("act",))


def test_classification_of_common_ops(dense):
    _, _, gm, _ = _fresh(dense)
    kinds = {op_name(n): classify(n).value for n in gm.graph.nodes if n.op == "call_function"}
    assert kinds["aten::mm"] == "barrier" and kinds["aten::embedding"] == "barrier"
    assert kinds["aten::rsqrt"] == kinds["aten::mean"] == kinds["aten::mul"] == "vector"
    assert kinds["aten::view"] == kinds["aten::permute"] == "transparent"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ("L['self'].model.layers[0].mlp", "model.layers.0.mlp"),
        (
            "L['self']._modules['model']._modules['layers']._modules['0']._parameters['weight']",
            "model.layers.0.weight",
        ),
        ("L['args'][0].model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.q_proj"),
        ("getattr(L['self'].layers, '2').mlp", "layers.2.mlp"),
        ("layers.0.mlp", "layers.0.mlp"),
    ],
)
def test_source_paths_normalize(raw, path):
    assert normalize_source_path(raw) == path


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


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8, torch.bfloat16])
def test_frozen_get_attr_weights_of_any_dtype(dtype):
    """Inductor's freezing turns weights into get_attr constants, possibly after the window."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    root = nn.Module()
    root.register_buffer("w", torch.zeros(64, 32).to(dtype))
    g = torch.fx.Graph()
    x = g.placeholder("x")
    relu = g.call_function(torch.ops.aten.relu.default, (x,))
    mm0 = g.call_function(torch.ops.aten.mm.default, (relu, relu))  # a barrier: the dependency
    silu = g.call_function(torch.ops.aten.silu.default, (mm0,))
    w = g.get_attr("w")  # placed after the window starts
    t = g.call_function(torch.ops.aten.t.default, (w,))
    mm = g.call_function(torch.ops.aten.mm.default, (silu, t))
    g.output(mm)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(torch.zeros(32, 32)), mode.from_tensor(root.w)
        vals = {x: fx, w: fw}
        vals[relu] = torch.relu(fx)
        vals[mm0] = vals[relu] @ vals[relu]
        vals[silu] = F.silu(vals[mm0])
        vals[t] = fw.t()
        vals[mm] = vals[silu]  # shape only matters for the output
    for node, val in vals.items():
        node.meta["val"] = val
    gm = torch.fx.GraphModule(root, g)
    plan = run_weight_prefetch(
        gm, ON, weight_names={}, rules=DEFAULT_RULES.with_role_rule(r"^w$", "mlp.gate_up")
    )
    (rec,) = plan.prefetched
    itemsize = torch.tensor([], dtype=dtype).element_size()
    assert rec.weight == "w" and rec.dtype == str(dtype)
    assert rec.weight_bytes == rec.prefetch_bytes == 64 * 32 * itemsize
    assert rec.dependency == mm0.name and rec.window == ("aten::silu",)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pf = _node(gm, rec.prefetch_node)
    assert order[pf.args[0]] < order[pf] and order[mm0] < order[pf] < order[silu]
