"""fxprefetch.explain: plans without running on a device."""

from __future__ import annotations

import pytest
import torch

import fxprefetch
from fxprefetch.explainer import explain
from fxprefetch.models import build_model, example_inputs

from synthetic import TwoGraphs

pytest.importorskip("transformers")


def test_explain_on_meta_device_matches_the_backend():
    model = build_model("llama-tiny", device="meta")
    plans = explain(model, **example_inputs(model))
    (plan,) = plans
    assert len(plan.prefetched) == 10 and fxprefetch.stats().calls == 0
    assert fxprefetch.last_plans() == []  # explaining compiles nothing for real
    assert all(p.device.type == "meta" for p in model.parameters())

    real = build_model("llama-tiny")
    torch.compile(real, backend="npu_prefetch", options={"target": "eager"})(**example_inputs(real))
    (compiled,) = fxprefetch.last_plans()

    def decisions(p):
        # node names, positions and the attention op (math bmm on meta, flash on CPU) differ;
        # the math attention's matmuls are recorded as "not a weight"
        return [
            (r.weight, r.role, r.prefetch_bytes, r.capped, r.window, r.skip_reason)
            for r in p.records
            if r.skip_reason != fxprefetch.SkipReason.NOT_A_WEIGHT
        ]

    assert decisions(compiled) == decisions(plan)


def test_explain_takes_a_config_and_sees_graph_breaks():
    plans = fxprefetch.explain(
        TwoGraphs(), torch.randint(0, 64, (1, 4)), config={"prefetch_ratio": {"attn": {"qkv": 0.5}}}
    )
    assert len(plans) == 2
    for plan in plans:
        (qkv,) = plan.by_role("attn.qkv")
        assert qkv.prefetch_bytes == 96 * 32 * 4 // 2


def test_explain_uses_the_caps_a_compile_for_the_device_would_use(monkeypatch):
    """On a GPU a compile caps at window x bandwidth; explain must show the same bytes.
    (The CPU stands in for the device here, with a 1000-byte cap.)"""
    from fxprefetch import explainer
    from fxprefetch.devices import DeviceSetup

    monkeypatch.setattr(explainer, "device_setup", lambda target: DeviceSetup(caps={"cpu": 1000}))
    (plan, *_) = fxprefetch.explain(TwoGraphs(), torch.randint(0, 64, (1, 4)))
    assert plan.prefetched and all(r.prefetch_bytes == 1000 and r.capped for r in plan.prefetched)
    (plan, *_) = fxprefetch.explain(
        TwoGraphs(), torch.randint(0, 64, (1, 4)), config={"max_prefetch_bytes": 512}
    )
    assert all(r.prefetch_bytes == 512 for r in plan.prefetched)  # a written cap wins
