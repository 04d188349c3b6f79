"""fxprefetch.explain: plans without running on a device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxprefetch
from fxprefetch.explainer import explain
from fxprefetch.plan import SkipReason
from fxprefetch.presets import build_model, example_inputs

from support.synthetic import SynthModel, SynthSpec, TwoGraphs

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
    from fxprefetch.devices import DeviceSetup

    monkeypatch.setattr(
        "fxprefetch.targets.device_setup",
        lambda **_: DeviceSetup(caps={"cpu": 1000}),
    )
    (plan, *_) = fxprefetch.explain(TwoGraphs(), torch.randint(0, 64, (1, 4)))
    assert plan.prefetched and all(r.prefetch_bytes == 1000 and r.capped for r in plan.prefetched)
    (plan, *_) = fxprefetch.explain(
        TwoGraphs(), torch.randint(0, 64, (1, 4)), config={"max_prefetch_bytes": 512}
    )
    assert all(r.prefetch_bytes == 512 for r in plan.prefetched)  # a written cap wins


# -- explain() leaves the process alone ----------------------------------------------------------


class _BrokenQkv(nn.Module):
    """A norm and a qkv projection, twice, with a graph break between: two small graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(16, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.qkv_proj(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x)
        torch._dynamo.graph_break()
        return self.qkv_proj(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x)


@pytest.mark.compile
def test_explain_leaves_no_compiled_entries_behind():
    """Dynamo allows 8 entries per code object: 10 explains of a model (with a graph break,
    so its own code runs as dynamo frames) leave none, and keep what the user compiled."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries
    from torch._dynamo.testing import CompileCounter

    def user_fn(x):
        return torch.sin(x) + 1

    counter = CompileCounter()
    compiled_fn = torch.compile(user_fn, backend=counter)
    compiled_fn(torch.randn(3))
    (user_entry,) = cache_entries(user_fn)

    model, x = _BrokenQkv().eval(), torch.randn(2, 16)
    for _ in range(10):
        assert [len(p.prefetched) for p in fxprefetch.explain(model, x)] == [1, 1]
    left_behind = cache_entries(_BrokenQkv.forward)

    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    assert [len(p.prefetched) for p in fxprefetch.last_plans()] == [1, 1]  # no eager fallback
    assert fxprefetch.stats().calls == 2
    assert left_behind == []

    compiled_fn(torch.randn(3))
    assert counter.frame_count == 1 and cache_entries(user_fn) == [user_entry]


@pytest.mark.compile
def test_explain_of_a_module_compiled_in_place_traces_its_forward():
    """``m.compile()`` sends ``m(...)`` to the user's compiled code: explain traces m's own
    forward (no graph break, nothing outside the graphs) and compiles nothing for real."""
    model, ids = SynthModel(SynthSpec(layers=1)).eval(), torch.randint(0, 64, (1, 4))
    (expected,) = fxprefetch.explain(model, ids)
    model.compile(backend="npu_prefetch", options={"target": "eager"})
    (plan,) = fxprefetch.explain(model, ids)
    assert plan.graph.endswith("(inference)") and len(plan.prefetched) == 2
    assert [(r.weight, r.prefetch_bytes, r.skip_reason) for r in plan] == [
        (r.weight, r.prefetch_bytes, r.skip_reason) for r in expected
    ]
    assert fxprefetch.last_plans() == []  # the user's backend never ran
    with torch.no_grad():
        model(ids)
    assert len(fxprefetch.last_plans()) == 1  # and it still compiles when the user calls m


class _RunsOneSkipsOne(torch.nn.Module):
    """``ran`` is compiled, ``eager`` runs outside any graph (dynamo-disabled, a graph
    break), ``spare`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.ran, self.eager, self.spare = (SynthModel(SynthSpec(layers=1)) for _ in range(3))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch._dynamo.disable(self.eager)(self.ran(ids).argmax(-1))


def test_explain_tells_unused_weights_from_graph_breaks():
    model = _RunsOneSkipsOne().eval()
    *graphs, outside = fxprefetch.explain(model, torch.randint(0, 64, (1, 4)))
    assert outside.graph == "outside compiled graphs"
    reasons = {r.weight: r.skip_reason for r in outside.records}
    layer = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    assert reasons == {
        f"{part}.layers.0.{linear}.weight": reason
        for part, reason in (("eager", SkipReason.OUTSIDE_GRAPHS), ("spare", SkipReason.UNUSED))
        for linear in layer
    }
    assert {r.weight.split(".")[0] for p in graphs for r in p.prefetched} == {"ran"}
