"""Target-specific lowering passes: NPU retargeting, dependency relaxing and hint elision."""

from __future__ import annotations

import pytest
import torch

import fxprefetch
from fxprefetch import WeightPrefetchConfig, ops
from fxprefetch.ops import PREFETCH_OP
from fxprefetch.passes import DEFAULT_RULES, lower_prefetch_to_npu, run_weight_prefetch
from fxprefetch.passes.contract import PassContext
from fxprefetch.passes.elide_hints import elide_hints, hint_only
from fxprefetch.passes.lower_npu import NpuLoweringError
from fxprefetch.passes.relax_dependencies import relax_dependencies

from support.npu_standins import install_op_standins
from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace

ON = WeightPrefetchConfig(enabled=True)


@pytest.fixture
def planned():
    gm, names = fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))
    plan = run_weight_prefetch(gm, ON, weight_names=names)
    assert len(plan.prefetched) == 4
    return gm, plan


def _ctx(**fields) -> PassContext:
    return PassContext(ON, DEFAULT_RULES, "g", **fields)


def _prefetches(gm, target=PREFETCH_OP):
    return list(gm.graph.find_nodes(op="call_function", target=target))


def test_npu_lowering_retargets_with_the_same_arguments(planned):
    install_op_standins()
    gm, _ = planned
    before = [n.args for n in _prefetches(gm)]
    assert lower_prefetch_to_npu(gm) == 4
    lowered = _prefetches(gm, torch.ops.npu.npu_prefetch.default)
    assert [n.args for n in lowered] == before and not _prefetches(gm)
    gm.graph.eliminate_dead_code()  # torch_npu marks npu_prefetch side-effecting too
    assert len(_prefetches(gm, torch.ops.npu.npu_prefetch.default)) == 4


def test_npu_lowering_refuses_a_missing_dependency(planned):
    install_op_standins()
    gm, _ = planned
    last = _prefetches(gm)[-1]
    last.args = (last.args[0], None, *last.args[2:])  # only the last one lacks it
    with pytest.raises(NpuLoweringError, match="needs a dependency"):
        lower_prefetch_to_npu(gm)
    # all or nothing: none was retargeted, so stripping ours restores the graph
    assert len(_prefetches(gm)) == 4
    assert not _prefetches(gm, torch.ops.npu.npu_prefetch.default)


def test_a_ge_graph_refuses_prefetches_decided_at_run_time(planned):
    """GE converts npu_prefetch only: a token-bounded prefetch on a symbolic count is refused
    there (the planner then compiles the graph without prefetch); aclgraph keeps it."""
    install_op_standins()
    gm, _ = planned
    first = _prefetches(gm)[0]
    with gm.graph.inserting_after(first):
        gm.graph.call_function(ops.RANGE_OP, (first.args[0], first.args[1], 64, 0, 8, 96, 4096))
    with pytest.raises(NpuLoweringError, match="no GE converter"):
        lower_prefetch_to_npu(gm, graph_engine=True)
    assert len(_prefetches(gm)) == 4  # all or nothing
    assert lower_prefetch_to_npu(gm) == 4  # aclgraph and npugraph_ex run the op when captured
    assert len(_prefetches(gm, ops.RANGE_OP)) == 1


def test_relaxing_keeps_position_and_size(planned):
    gm, _ = planned
    order = [(n.prev.name, n.args[0].name, n.args[2]) for n in _prefetches(gm)]
    assert relax_dependencies(gm, _ctx()).changed == 4
    assert all(n.args[1] is None for n in _prefetches(gm))
    assert [(n.prev.name, n.args[0].name, n.args[2]) for n in _prefetches(gm)] == order
    assert relax_dependencies(gm, _ctx()).changed == 0


def test_cpu_prefetches_are_hints_and_are_elided(planned):
    gm, _ = planned
    assert hint_only(gm, native_devices=())
    assert elide_hints(gm, _ctx(native_devices=frozenset({"npu"}))).changed == 4
    assert not _prefetches(gm)


def test_a_native_prefetch_keeps_them(planned):
    gm, _ = planned
    assert not hint_only(gm, native_devices={"cpu"})
    assert elide_hints(gm, _ctx(native_devices=frozenset({"cpu"}))).changed == 0
    assert len(_prefetches(gm)) == 4


@pytest.mark.compile
def test_inductor_on_cpu_elides_hints_but_counts_them(fresh_dynamo):
    from torch._inductor.utils import run_and_get_code

    model = SynthModel(SynthSpec(layers=2)).eval()
    ids = torch.randint(0, 64, (1, 4))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad():
        out, code = run_and_get_code(compiled, ids)
        with fxprefetch.collect_stats(per_weight=True) as s:
            compiled(ids)
    torch.testing.assert_close(out, model(ids), rtol=1e-4, atol=1e-4)
    assert "fxprefetch" not in "".join(code)  # no call into Python per prefetch
    # no kernel ran: the planned hints are counted per graph call, and called so
    assert s.calls == 0 and s.hints == 4
    assert set(s.per_weight) == {
        f"layers.{i}.{m}.weight" for i in (0, 1) for m in ("self_attn.qkv_proj", "mlp.gate_up_proj")
    }
    assert all(w.hints == 1 and w.calls == 0 for w in s.per_weight.values())
    assert s.hint_bytes == sum(r.prefetch_bytes for r in fxprefetch.last_plans()[0].prefetched)


@pytest.mark.compile
def test_inductor_keeps_prefetches_where_they_reach_hardware(fresh_dynamo, monkeypatch):
    from torch._inductor.utils import run_and_get_code

    calls = []
    monkeypatch.setitem(
        ops._NATIVE_PREFETCH,
        "cpu",
        lambda w, dep, size, off: calls.append((tuple(w.shape), dep, size)),
    )
    model = SynthModel(SynthSpec(layers=1)).eval()
    ids = torch.randint(0, 64, (1, 4))
    compiled = torch.compile(model, backend="npu_prefetch", options={"target": "inductor"})
    with torch.no_grad():
        _, code = run_and_get_code(compiled, ids)
    source = "".join(code)
    assert source.count("torch.ops.fxprefetch.prefetch.default(") == 2
    with torch.no_grad(), fxprefetch.collect_stats(per_weight=True) as s:
        compiled(ids)
    assert s.calls == 2 and s.hints == 0  # kernels that ran
    assert set(s.per_weight) == {
        "layers.0.self_attn.qkv_proj.weight",
        "layers.0.mlp.gate_up_proj.weight",
    }
    # the dependency operand is dropped for inductor: it would only force a buffer to exist
    assert calls[:2] == [((96, 32), None, 96 * 32 * 4), ((128, 32), None, 128 * 32 * 4)]
