"""The pass on real Hugging Face models (small configs, random weights, no download):
the expected role, window and dependency for every linear of every layer, and outputs
identical to the unmodified graph."""

from __future__ import annotations

import pytest
import torch

from fxprefetch import SkipReason, WeightPrefetchConfig
from fxprefetch.pipeline import run_weight_prefetch
from fxprefetch.presets import build_model

from support.tracing import export_aten, run_graph

pytest.importorskip("transformers")

ON = WeightPrefetchConfig(enabled=True)


@pytest.fixture(scope="module", params=["llama-tiny", "qwen3-moe-tiny", "mixtral-tiny"])
def traced(request):
    model = build_model(request.param)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    gm, names = export_aten(model, ids, use_cache=False)
    reference = run_graph(gm, model, names, ids)
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    return request.param, model, ids, gm, names, reference, plan


def test_every_linear_of_every_layer(traced):
    name, model, _, gm, _, _, plan = traced
    rec = {r.weight: r for r in plan}
    by_node = {n.name: n for n in gm.graph.nodes}
    moe = name != "llama-tiny"
    layers = model.config.num_hidden_layers
    prev_out = None
    for i in range(layers):
        p = f"model.layers.{i}"
        q, k, v = (rec[f"{p}.self_attn.{x}_proj.weight"] for x in "qkv")
        o = rec[f"{p}.self_attn.o_proj.weight"]
        for r in (q, k, v):
            assert r.role == "attn.qkv" and r.prefetched and r.window_kind == "vector"
            assert {"aten::pow", "aten::mean", "aten::rsqrt"} <= set(r.window)
            if i == 0:
                assert r.dependency_op == "aten::embedding"
            else:
                assert r.dependency == prev_out  # the previous layer's last matmul
        assert o.role == "attn.o" and o.skip_reason == SkipReason.EMPTY_WINDOW
        assert (
            by_node[o.dependency].args[0].target
            is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
        )
        if moe:
            router = rec[f"{p}.mlp.gate.weight"]
            up = rec[f"{p}.mlp.experts.gate_up_proj"]
            down = rec[f"{p}.mlp.experts.down_proj"]
            assert router.role is None and router.skip_reason == SkipReason.NO_ROLE
            assert up.role == "moe.gate_up" and up.prefetched
            assert up.dependency == router.node  # the router logits
            assert {"aten::topk", "aten::sort", "aten::index"} <= set(up.window)
            assert up.prefetch_bytes == int(0.8 * up.weight_bytes)
            assert down.role is None
            prev_out = down.node
        else:
            gate, upp = rec[f"{p}.mlp.gate_proj.weight"], rec[f"{p}.mlp.up_proj.weight"]
            down = rec[f"{p}.mlp.down_proj.weight"]
            for r in (gate, upp):
                assert r.role == "mlp.gate_up" and r.prefetched
                assert r.dependency == o.node and {"aten::add", "aten::rsqrt"} <= set(r.window)
            assert down.role == "mlp.down"
            assert down.skip_reason == SkipReason.NEEDS_SEQUENCE_PARALLEL
            assert down.dependency == upp.node and "aten::mul" in down.window
            prev_out = down.node
    assert rec["lm_head.weight"].role is None
    expected = layers * (3 + (1 if moe else 2))
    assert len(plan.prefetched) == expected


def test_outputs_identical_to_unmodified_graph(traced):
    _, model, ids, gm, names, reference, plan = traced
    import fxprefetch

    with fxprefetch.collect_stats() as s:
        out = run_graph(gm, model, names, ids)
    assert all(torch.equal(a, b) for a, b in zip(reference, out, strict=True))
    assert s.calls == len(plan.prefetched)
