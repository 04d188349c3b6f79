"""vLLM's op names in the pass's rules, on graphs traced here (no vLLM needed).

STAND-INS: ``_C::rms_norm`` and ``vllm::moe_forward`` are defined with vLLM 0.32's exact
schemas (read from its registered ops) and trivial kernels, so the graphs hold the same nodes
vLLM's do: the mutating norm inside ``auto_functionalized``, the fused MoE as one opaque op.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxprefetch import SkipReason, WeightPrefetchConfig


@pytest.fixture(scope="module")
def vllm_standin_ops():
    if hasattr(torch.ops._C, "rms_norm"):
        pytest.skip("vLLM's own _C ops are loaded in this process")
    c = torch.library.Library("_C", "FRAGMENT")
    c.define("rms_norm(Tensor(a!) out, Tensor input, Tensor? weight, float epsilon) -> ()")

    def rms_norm(out, x, weight, eps):
        out.copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight)

    c.impl("rms_norm", rms_norm, "CompositeExplicitAutograd")
    v = torch.library.Library("vllm", "FRAGMENT")
    v.define(
        "moe_forward(Tensor(a0!) hidden_states, Tensor router_logits, "
        "Tensor? shared_experts_input, Tensor? input_ids, str layer_name, "
        "SymInt hidden_dim_unpadded) -> Tensor"
    )
    v.impl("moe_forward", lambda h, *rest: h.clone(), "CompositeExplicitAutograd")
    yield
    del c, v


class VllmLayer(nn.Module):
    """vLLM's shapes: a mutating RMSNorm custom op, qkv, and a fused MoE call."""

    def __init__(self) -> None:
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(16))
        self.qkv_proj = nn.Linear(16, 48, bias=False)
        self.gate = nn.Linear(16, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, self.norm_weight, 1e-6)
        q = self.qkv_proj(out)
        logits = self.gate(out)
        moe = torch.ops.vllm.moe_forward(out.clone(), logits, None, None, "layers.0.mlp", 16)
        return q.sum() + moe.sum()


@pytest.mark.compile
def test_a_functionalized_vllm_norm_is_vector_work_and_fused_moe_is_reported(
    vllm_standin_ops, fresh_dynamo
):
    import fxprefetch

    model = VllmLayer()
    x = torch.randn(4, 16)
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    (plan,) = fxprefetch.last_plans()
    (qkv,) = plan.by_role("attn.qkv")
    # the norm reached the pass inside auto_functionalized, and counts as vector work
    assert qkv.prefetched and "_C::rms_norm" in qkv.window, qkv
    hidden = [r for r in plan.records if r.op == "vllm::moe_forward"]
    assert len(hidden) == 1
    assert hidden[0].skip_reason == SkipReason.HIDDEN_WEIGHTS and hidden[0].role == "moe.gate_up"
    assert "by layer name" in hidden[0].note


def test_the_vllm_pass_joins_side_stream_prefetches_like_the_backend(monkeypatch):
    """Where a device's prefetch runs on a side stream (CUDA; the CPU stands in here) and vLLM
    replays its graphs as CUDA graphs, vLLM's pass closes every fork before its linear, as the
    backend does: an unjoined fork would break the capture. Without CUDA graphs the
    prefetches stay hints. The pass's uuid covers that setup."""
    from types import SimpleNamespace

    from fxprefetch import ops
    from fxprefetch.ops import JOIN_OP, NATIVE_OP, PREFETCH_OP
    from fxprefetch.vllm import plugin as vllm_plugin
    from fxprefetch.vllm.plugin import WeightPrefetchPass

    from support.synthetic import SynthModel, SynthSpec
    from support.tracing import fake_trace

    def vllm_config(mode: str) -> SimpleNamespace:
        compilation = SimpleNamespace(cudagraph_mode=SimpleNamespace(name=mode))
        return SimpleNamespace(compilation_config=compilation, model_config=None)

    vllm_pass = WeightPrefetchPass()
    plain_uuid = vllm_pass.uuid()
    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda *args: None)
    monkeypatch.setitem(ops._NATIVE_L2, "cpu", ops.NativeL2(print, print, print))
    monkeypatch.setattr(vllm_plugin, "current_vllm_config", lambda: vllm_config("PIECEWISE"))
    graphs_uuid = vllm_pass.uuid()
    assert graphs_uuid != plain_uuid
    gm, names = fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))
    # what AOT's static inputs tell the pass inside vLLM's compile: these are the weights
    monkeypatch.setattr(vllm_plugin, "_static_input_names", lambda gm: names)
    vllm_pass(gm.graph)
    forks = gm.graph.find_nodes(op="call_function", target=NATIVE_OP)
    joins = gm.graph.find_nodes(op="call_function", target=JOIN_OP)
    assert len(forks) == len(joins) == 4
    assert {j.args[0] for j in joins} == {f.args[0] for f in forks}

    monkeypatch.setattr(vllm_plugin, "current_vllm_config", lambda: vllm_config("NONE"))
    assert vllm_pass.uuid() not in (plain_uuid, graphs_uuid)
    gm, names = fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))
    vllm_pass(gm.graph)  # no CUDA graphs: hints, left out of the code
    assert not gm.graph.find_nodes(op="call_function", target=NATIVE_OP)
    assert not gm.graph.find_nodes(op="call_function", target=PREFETCH_OP)


def test_the_vllm_pass_on_a_gpu_takes_down_but_never_an_attention_window(monkeypatch):
    """On a GPU (an H200's setup, the CPU standing in) down_proj behind
    SiLU-and-mul is a window in vLLM too, but attention is not: vLLM splits its graphs at
    attention, so a fork before it could not rejoin before o_proj. The uuid covers it."""
    from fxprefetch.devices import simulated_setup
    from fxprefetch.vllm import plugin as vllm_plugin
    from fxprefetch.vllm.plugin import WeightPrefetchPass

    from support.synthetic import SynthModel, SynthSpec
    from support.tracing import fake_trace

    # where prefetches go, not whether the H200 model gates them: force them
    vllm_pass = WeightPrefetchPass(bound=WeightPrefetchConfig(enabled=True, force_prefetch=True))
    plain_uuid = vllm_pass.uuid()
    monkeypatch.setattr(
        "fxprefetch.targets.device_setup",
        lambda **_: simulated_setup("h200", {"cpu"}),
    )
    assert vllm_pass.uuid() != plain_uuid
    gm, names = fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))
    monkeypatch.setattr(vllm_plugin, "_static_input_names", lambda gm: names)
    plans = []
    monkeypatch.setattr(vllm_plugin._VllmGraphPlanner, "keep", lambda self, r: plans.append(r))
    vllm_pass(gm.graph)
    (report,) = plans
    roles = sorted(r.role for r in report.plan.prefetched)
    assert roles == sorted(["attn.qkv", "mlp.gate_up", "mlp.down"] * 2)
    assert all(r.skip_reason == SkipReason.EMPTY_WINDOW for r in report.plan.by_role("attn.o"))
