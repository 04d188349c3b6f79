"""The planning pass (``plan_prefetches``) on hand-made and synthetic graphs: what it records
for each linear, where it places each prefetch, sizes under a device profile, and a second
run, dead-code elimination, logging and symbolic shapes."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprefetch
from fxprefetch import SkipReason, WeightPrefetchConfig
from fxprefetch.ops import PREFETCH_OP as PREFETCH
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.prefetch_meta import prefetch_meta
from fxprefetch.pipeline import run_weight_prefetch

from support.planning import ON, fresh_export, node_named, node_order, plan_synth, prefetch_nodes
from support.synthetic import SynthModel, SynthSpec
from support.tracing import export_aten, run_graph

FORCED = WeightPrefetchConfig(enabled=True, force_prefetch=True)  # the GPU gate off


def test_llama_layer_windows_and_dependencies(dense):
    _, _, gm, names = fresh_export(dense)
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
    _, _, gm, names = fresh_export(dense)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    order = node_order(gm)
    for r in plan.prefetched:
        pf, dep, lin = (
            node_named(gm, r.prefetch_node),
            node_named(gm, r.dependency),
            node_named(gm, r.node),
        )
        assert order[dep] < order[pf] < order[lin]
        between = [n for n in gm.graph.nodes if order[dep] < order[n] < order[pf]]
        assert all(n.target is PREFETCH for n in between)  # only other prefetches
        assert pf.args[0].op == "placeholder" and names[pf.args[0].name] == r.weight
        assert pf.args[1] is dep
    # q/k/v-style siblings behind one dependency keep graph order; here: two layers' qkv
    deps = {}
    for r in plan.prefetched:
        deps.setdefault(r.dependency, []).append(order[node_named(gm, r.prefetch_node)])
    assert all(v == sorted(v) for v in deps.values())


def test_outputs_unchanged_and_prefetches_execute(dense):
    model, ids, gm, names = fresh_export(dense)
    ref = run_graph(gm, model, names, ids)
    plan = run_weight_prefetch(gm, ON, weight_names=names)

    with fxprefetch.collect_stats() as s:
        out = run_graph(gm, model, names, ids)
    assert all(torch.equal(a, b) for a, b in zip(ref, out, strict=True))
    assert s.calls == len(plan.prefetched) == 4
    assert s.bytes_requested == sum(r.prefetch_bytes for r in plan.prefetched)


def test_ratio_zero_and_disabled_insert_nothing(dense):
    _, _, gm, names = fresh_export(dense)
    cfg = WeightPrefetchConfig.from_dict(
        {"enabled": True, "prefetch_ratio": {"attn": {"qkv": 0}, "mlp": {"gate_up": 0}}}
    )
    plan = run_weight_prefetch(gm, cfg, weight_names=names)
    assert not prefetch_nodes(gm)
    assert {r.skip_reason for r in plan.by_role("attn.qkv")} == {SkipReason.ZERO_RATIO}
    plan = run_weight_prefetch(gm, WeightPrefetchConfig(), weight_names=names)
    assert not prefetch_nodes(gm)
    assert all(r.skip_reason in (SkipReason.DISABLED, SkipReason.NO_ROLE) for r in plan)


def test_mlp_down_with_declared_sequence_parallel(dense):
    _, _, gm, names = fresh_export(dense)
    plan = run_weight_prefetch(
        gm, WeightPrefetchConfig(enabled=True, sequence_parallel=True), weight_names=names
    )
    downs = plan.by_role("mlp.down")
    assert len(downs) == 2 and all(r.prefetched for r in downs)
    assert all({"aten::mul"} <= set(r.window) for r in downs)


@pytest.mark.parametrize(
    ("device", "down_prefetched"), [(None, False), ("ascend-910b", False), ("h200", True)]
)
def test_mlp_down_needs_sequence_parallelism_on_ascend_only(device, down_prefetched):
    _, plan = plan_synth(device, FORCED)
    downs = plan.by_role("mlp.down")
    assert len(downs) == 2 and all(r.prefetched is down_prefetched for r in downs)
    if down_prefetched:  # SiLU-and-mul is the window
        assert all(r.window_kind == "vector" and "aten::mul" in r.window for r in downs)
    else:
        assert all(r.skip_reason == SkipReason.NEEDS_SEQUENCE_PARALLEL for r in downs)


def test_auto_sizes_each_prefetch_to_what_its_window_hides():
    """On a GPU profile where a landed MB pays (δ > β), "auto" sizes each prefetch to what
    lands in its window; on the H200's side stream (β > δ) it sizes none."""
    from fxprefetch.devices.prediction import WindowTraffic, hideable_bytes
    from fxprefetch.devices.profile_catalog import profile
    from fxprefetch.devices.profile_fit import with_cost, with_delta

    paying = with_delta(with_cost(profile("h200"), 0.1, 0.0), 1.0)
    auto = WeightPrefetchConfig(enabled=True, max_prefetch_bytes="auto", force_prefetch=True)
    _, plan = plan_synth(paying, auto, hidden=512, intermediate=2048)
    assert len(plan.prefetched) == 8
    for r in plan.prefetched:
        p = r.prediction
        traffic = WindowTraffic(p.window_bytes, p.window_kernels)
        wanted = hideable_bytes(paying, traffic, p.shared_us, 4)
        assert p.auto_bytes == wanted
        assert r.prefetch_bytes == min(r.weight_bytes, wanted)
        assert r.capped is False  # "auto" sizes are no byte cap
    _, plan = plan_synth("h200", auto, hidden=512, intermediate=2048)
    assert plan.prefetched == []
    assert all(r.skip_reason == SkipReason.PREDICTED_LOSS for r in plan.by_role("attn.qkv"))
    assert all("every MB costs" in r.note for r in plan.by_role("attn.qkv"))
    # a role's ratio "auto" caps that role only, under the written cap
    down_auto = WeightPrefetchConfig.from_dict(
        {
            "enabled": True,
            "max_prefetch_bytes": 4096,
            "prefetch_ratio": {"mlp": {"down": "auto"}},
            "force_prefetch": True,
        }
    )
    _, plan = plan_synth(paying, down_auto, hidden=512, intermediate=2048)
    assert all(r.prefetch_bytes == 4096 for r in plan.prefetched)
    assert all(r.prediction.auto_bytes is not None for r in plan.by_role("mlp.down"))
    assert all(r.prediction.auto_bytes is None for r in plan.by_role("attn.qkv"))


def test_auto_sizes_nothing_where_the_model_predicts_a_loss_on_every_device():
    """ "auto" never sizes a prefetch the model predicts to lose (Ascend too: there the
    margin is 0); the record says the µs and that force_prefetch cannot emit it. Ascend's
    fixed ratios stay honoured (the guide's semantics), whatever the prediction."""
    auto = WeightPrefetchConfig(enabled=True, max_prefetch_bytes="auto", force_prefetch=True)
    _, plan = plan_synth("ascend-a3", auto)
    assert plan.prefetched == []
    lost = [r for r in plan if r.skip_reason == SkipReason.PREDICTED_LOSS]
    assert len(lost) == 4
    for r in lost:
        assert r.prefetch_bytes == 0 and r.prediction.hidden_us <= 0
        assert f"{r.prediction.hidden_us:+.2f} µs for the" in r.note
        assert "force_prefetch emits only what the sizes give" in r.note
    _, fixed = plan_synth("ascend-a3", ON)
    qkv = fixed.by_role("attn.qkv")
    assert len(qkv) == 2 and all(r.prefetched and r.prediction.hidden_us <= 0 for r in qkv)
    _, plan = plan_synth("h200", auto)  # every MB loses: the note says why force emits none
    assert plan.prefetched == []
    assert all(
        "every MB costs" in r.note and "force_prefetch emits only what the sizes give" in r.note
        for r in plan
        if r.role is not None
    )


def test_an_auto_size_below_the_cap_is_not_capped():
    from fxprefetch.devices.profile_catalog import profile
    from fxprefetch.devices.profile_fit import with_cost, with_delta

    paying = with_delta(with_cost(profile("h200"), 0.1, 0.0), 1.0)
    config = WeightPrefetchConfig.from_dict(
        {
            "enabled": True,
            "max_prefetch_bytes": 18 << 20,
            "prefetch_ratio": {"mlp": {"gate_up": "auto"}},
            "force_prefetch": True,
        }
    )
    _, plan = plan_synth(paying, config, hidden=512, intermediate=2048)
    gate_up = plan.by_role("mlp.gate_up")
    assert len(gate_up) == 2
    for r in gate_up:
        assert r.prefetched and 0 < r.prefetch_bytes < r.weight_bytes < 18 << 20
        assert r.prefetch_bytes == r.prediction.auto_bytes and r.capped is False


def test_auto_without_a_device_profile_warns_and_uses_the_cap(caplog):
    auto = WeightPrefetchConfig(enabled=True, max_prefetch_bytes="auto")
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        _, plan = plan_synth(None, auto)
    assert "no device profile" in caplog.text
    assert plan.prefetched and all(r.prediction is None for r in plan.prefetched)


def test_prefetches_behind_one_window_share_it():
    # split q/k/v behind one norm: each later prefetch gets what the earlier ones left
    _, plan = plan_synth("h200", FORCED, fused=False, hidden=512)
    for layer in (0, 1):
        q, k, v = (r for r in plan.by_role("attn.qkv") if r.layer == layer)
        assert q.prediction.shared_us == 0
        assert k.prediction.shared_us == pytest.approx(q.prediction.transfer_us)
        assert v.prediction.shared_us == pytest.approx(
            q.prediction.transfer_us + k.prediction.transfer_us
        )


def test_second_run_adds_nothing(dense):
    _, _, gm, names = fresh_export(dense)
    first = run_weight_prefetch(gm, ON, weight_names=names)
    nodes = len(gm.graph.nodes)
    second = run_weight_prefetch(gm, ON, weight_names=names)
    assert len(gm.graph.nodes) == nodes and not second.prefetched
    assert {r.node for r in second if r.skip_reason == SkipReason.ALREADY_PREFETCHED} == {
        r.node for r in first.prefetched
    }


def test_prefetch_nodes_survive_dce_and_carry_meta(dense):
    _, _, gm, names = fresh_export(dense)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    gm.graph.eliminate_dead_code()
    nodes = prefetch_nodes(gm)
    assert len(nodes) == len(plan.prefetched)
    for n in nodes:
        assert "val" in n.meta and n.meta["val"] is None
        assert prefetch_meta(n).max_size == n.args[2]
        assert "nn_module_stack" in n.meta


def test_plan_is_logged(dense, caplog):
    _, _, gm, names = fresh_export(dense)
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
    pf = node_named(gm, rec.prefetch_node)
    assert order[pf.args[0]] < order[pf] and order[mm0] < order[pf] < order[silu]


# -- do no harm: on a GPU, only prefetches the device profile predicts to pay are emitted ----


def test_on_the_h200_no_prefetch_is_emitted_by_default_and_each_says_its_predicted_loss(caplog):
    """The built-in H200 profile, today's side stream: every planned prefetch loses (β > δ), so
    none is emitted; each record keeps its prediction and says it in its note; the log says so
    once, with how to force."""
    from fxprefetch.passes import plan_prefetches as pass_module

    pass_module._LOGGED_DROPS.clear()
    with caplog.at_level(logging.WARNING, logger="fxprefetch"):
        gm, plan = plan_synth("h200", hidden=512, intermediate=2048)
        plan_synth("h200", hidden=512, intermediate=2048)  # a second graph: no second warning
    assert prefetch_nodes(gm) == [] and plan.prefetched == []
    dropped = [r for r in plan if r.skip_reason == SkipReason.PREDICTED_LOSS]
    assert len(dropped) == 8
    for r in dropped:
        assert r.prediction is not None and r.prediction.hidden_us < 0
        assert f"predicted loss on NVIDIA H200 SXM 141GB: {r.prediction.hidden_us:+.2f} µs" in (
            r.note
        )
    assert caplog.text.count("force_prefetch") == 1
    assert plan.predicted() is None  # nothing emitted: nothing predicted saved


def test_force_prefetch_emits_every_planned_prefetch():
    gm, plan = plan_synth("h200", FORCED, hidden=512, intermediate=2048)
    assert len(plan.prefetched) == len(prefetch_nodes(gm)) == 8
    assert all(r.prediction.hidden_us < 0 for r in plan.prefetched)  # still predicted a loss


def test_a_profile_where_prefetches_pay_emits_those_above_the_margin():
    """A profile whose side stream costs nothing per MB and 0.1 µs fixed: a prefetch pays where
    δ x landed exceeds 0.1 µs plus the 0.5 µs margin."""
    from fxprefetch.devices.profile_catalog import profile
    from fxprefetch.devices.profile_fit import with_cost, with_delta

    cheap = with_delta(with_cost(profile("h200"), 0.1, 0.0), 1.0)
    gm, plan = plan_synth(cheap, hidden=512, intermediate=2048)
    emitted = {r.node for r in plan.prefetched}
    for r in plan:
        if r.prediction is not None:
            assert (r.node in emitted) is (r.prediction.hidden_us > 0.5)
    assert emitted and len(prefetch_nodes(gm)) == len(emitted)


def test_on_ascend_the_users_ratios_are_honoured_whatever_the_prediction():
    _, plan = plan_synth("ascend-a3", hidden=512, intermediate=2048)
    assert plan.prefetched and not any(r.skip_reason == SkipReason.PREDICTED_LOSS for r in plan)
