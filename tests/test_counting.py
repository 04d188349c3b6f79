"""Counting per graph call where the op's Python body does not run at replay (CUDA graphs).

A CUDA-graph replay runs the captured prefetch kernels but no Python, so the graph call
counts the prefetches its code holds, once per call that returns; the op kernels count
nothing during such a call (they run at warm-up and capture), so nothing is counted twice.
"""

from __future__ import annotations

import pytest
import torch

import fxprefetch
from fxprefetch import WeightPrefetchConfig, ops
from fxprefetch.compile_setup import CompileSetup
from fxprefetch.counting import with_counting
from fxprefetch.devices import DeviceSetup
from fxprefetch.ops import PREFETCH_OP, RANGE_OP
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets.inductor import uses_cudagraphs

from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace, pipeline_of


def _planner(native: frozenset[str]) -> tuple[GraphPlanner, list[str]]:
    """A planner that ran on a fake-traced 2-layer model: 4 prefetches."""
    model = SynthModel(SynthSpec(layers=2)).eval()
    gm, names = fake_trace(model, torch.randint(0, 64, (1, 4)))
    sources = [names.get(p.name) for p in gm.graph.find_nodes(op="placeholder")]
    planner = GraphPlanner(
        CompileSetup(
            WeightPrefetchConfig(enabled=True),
            DEFAULT_RULES,
            pipeline_of("inductor"),
            DeviceSetup(native=native),
        ),
        source_names=sources,
        record=False,
    )
    planner(gm)
    return planner, sources


def _inputs(sources: list[str | None]) -> list[torch.Tensor]:
    model = dict(SynthModel(SynthSpec(layers=2)).named_parameters())
    return [model[s] if s else torch.zeros(1, 4, dtype=torch.long) for s in sources]


def _replay(inputs: list[torch.Tensor], sources: list[str | None], planner: GraphPlanner):
    """A CUDA-graph tree's calls of the planned graph: the first call per input shapes warms
    up (the op bodies run), the later ones replay (no Python runs)."""
    weights = {s: t for s, t in zip(sources, inputs, strict=True) if s}
    seen: set[tuple[int, ...]] = set()

    def replay(*args):
        shape = tuple(args[sources.index(None)].shape)
        if shape not in seen:
            seen.add(shape)
            for r in planner.reports[0].plan.prefetched:
                PREFETCH_OP(weights[r.weight], None, r.prefetch_bytes)
        return "out"

    return replay


def test_a_replayed_graph_counts_its_prefetches_per_call():
    planner, sources = _planner(frozenset({"cpu"}))
    (report,) = planner.reports
    planned = report.plan.prefetched
    assert len(planned) == 4 and not report.hints_elided  # native: kept in the code
    inputs = _inputs(sources)

    counted = with_counting(_replay(inputs, sources, planner), planner, replayed=True)
    with fxprefetch.collect_stats(per_weight=True) as s:
        assert counted(*inputs) == "out"  # warm-up: the kernels run
        counted(*inputs)  # replay: nothing runs in Python
    assert s.calls == 2 * 4 and s.hints == 0
    assert s.bytes_requested == 2 * sum(r.prefetch_bytes for r in planned)
    per_weight = {name: w.calls for name, w in s.per_weight.items()}
    assert per_weight == {r.weight: 2 for r in planned}  # named by the graph's parameters
    assert fxprefetch.stats().calls == 8


def test_a_replay_counts_range_checked_prefetches_by_their_decision():
    """A replay runs what its capture ran: a prefetch whose token check said no at capture
    counts nothing at replay, one that said yes counts each call."""
    planner, sources = _planner(frozenset({"cpu"}))
    inputs = _inputs(sources)
    weight = inputs[sources.index("layers.0.self_attn.qkv_proj.weight")]
    seen: set[tuple[int, ...]] = set()

    def replay(*args):  # a range op bounded to 16 tokens, warmed up once per shape
        ids = args[sources.index(None)]
        if tuple(ids.shape) not in seen:
            seen.add(tuple(ids.shape))
            RANGE_OP(weight, None, 64, 0, ids.shape[1], 0, 16)
        return "out"

    counted = with_counting(replay, planner, replayed=True)
    ids_at = sources.index(None)
    for tokens, expected in ((32, 0), (8, 1)):
        inputs[ids_at] = torch.zeros(1, tokens, dtype=torch.long)
        with fxprefetch.collect_stats() as s:
            for _ in range(3):  # warm-up, then two replays
                counted(*inputs)
        assert (s.calls, s.bytes_prefetched) == (3 * expected, 3 * 64 * expected), tokens


def test_op_bodies_inside_a_counted_call_are_not_counted_twice():
    planner, sources = _planner(frozenset({"cpu"}))
    inputs = _inputs(sources)
    weight = inputs[sources.index("layers.0.self_attn.qkv_proj.weight")]

    def warm_up(*args):  # warm-up or capture: the compiled code runs the op bodies
        for _ in range(4):
            PREFETCH_OP(weight, None, 64)

    counted = with_counting(warm_up, planner, replayed=True)
    with fxprefetch.collect_stats() as s:
        counted(*inputs)
    assert s.calls == 4  # the graph call's count, not 4 + 4
    with fxprefetch.collect_stats() as s:
        PREFETCH_OP(weight, None, 64)  # outside a graph call the op counts itself
    assert s.calls == 1


def test_a_call_that_raises_counts_nothing():
    planner, sources = _planner(frozenset({"cpu"}))

    def fails(*args):
        raise RuntimeError("boom")

    counted = with_counting(fails, planner, replayed=True)
    with fxprefetch.collect_stats() as s, pytest.raises(RuntimeError, match="boom"):
        counted(*_inputs(sources))
    assert s.calls == 0


def test_graphs_not_replayed_leave_counting_to_the_op():
    planner, sources = _planner(frozenset({"cpu"}))
    assert with_counting(len, planner, replayed=False) is not None
    with fxprefetch.collect_stats() as s:
        with_counting(lambda *a: None, planner, replayed=False)(*_inputs(sources))
    assert s.calls == 0  # no op ran, and none is assumed to


def test_cudagraph_modes():
    assert uses_cudagraphs("reduce-overhead") and uses_cudagraphs("max-autotune")
    assert not uses_cudagraphs("default") and not uses_cudagraphs(None)
    assert not uses_cudagraphs("max-autotune-no-cudagraphs")


@pytest.mark.compile
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_counts_equal_the_prefetches_that_ran(mode, monkeypatch, fresh_dynamo):
    """On the CPU, inductor skips CUDA graphs and runs the op bodies: in both modes the ops
    count, equal to the native prefetches run."""
    ran: list[int] = []
    monkeypatch.setitem(ops._NATIVE_PREFETCH, "cpu", lambda w, *_: ran.append(w.data_ptr()))
    model = SynthModel(SynthSpec(layers=2)).eval()
    ids = torch.randint(0, 64, (1, 4))
    options = {"target": "inductor", "mode": mode}
    compiled = torch.compile(model, backend="npu_prefetch", options=options)
    with torch.no_grad(), fxprefetch.collect_stats(per_weight=True) as s:
        for _ in range(3):
            out = compiled(ids)
    torch.testing.assert_close(out, model(ids))
    (plan,) = fxprefetch.last_plans()
    assert len(plan.prefetched) == 4
    assert s.calls == len(ran) == 3 * 4
    assert {w.calls for w in s.per_weight.values()} == {3}
    assert set(s.per_weight) == {r.weight for r in plan.prefetched}


def test_per_weight_counts_keep_each_field_apart():
    """Kernel calls, hints and planned counts land in the weight's own named fields."""
    from fxprefetch import runtime_stats
    from fxprefetch.runtime_stats import PlannedPrefetch, WeightStats

    weight = torch.zeros(4, 8)  # 128 bytes
    planned = PlannedPrefetch(
        weight="w", shape=(4, 8), dtype="torch.float32", requested=96, nbytes=64, arg_index=0
    )
    ptrs = {0: weight.data_ptr()}
    names = {weight.data_ptr(): "layers.0.w"}
    with fxprefetch.collect_stats(per_weight=True) as s, runtime_stats.naming(names):
        runtime_stats.record(weight, requested=100, prefetched=80)
        runtime_stats.record_hint(weight, nbytes=32)
        runtime_stats.record_planned([planned], ptrs, ran=True)
        runtime_stats.record_planned([planned], ptrs, ran=False)
        runtime_stats.record_planned([planned], None, ran=False)  # no pointer: keyed by name
    assert s.per_weight == {
        "layers.0.w": WeightStats(
            name="layers.0.w",
            shape=(4, 8),
            dtype="torch.float32",
            calls=2,
            bytes_requested=196,
            bytes_prefetched=144,
            hints=2,
        ),
        "w": WeightStats(name="w", shape=(4, 8), dtype="torch.float32", hints=1),
    }
    assert (s.calls, s.bytes_requested, s.bytes_prefetched, s.hints, s.hint_bytes) == (
        2,
        196,
        144,
        3,
        32 + 64 + 64,
    )


@pytest.mark.compile
def test_range_checked_prefetches_count_what_ran(fresh_dynamo):
    """One dynamic graph checks the token count at run time (``max_tokens`` 16): 32 tokens
    run no prefetch and count none, 8 tokens run both, under reduce-overhead too (on the CPU
    inductor never replays a CUDA graph); the plan says what the prefetches became."""
    model = SynthModel(SynthSpec(layers=1)).eval()
    options = {
        "target": "inductor",
        "mode": "reduce-overhead",
        "weight_prefetch_config": {"token_range": {"max_tokens": 16}},
    }
    compiled = torch.compile(model, backend="npu_prefetch", options=options, dynamic=True)
    counts = []
    with torch.no_grad():
        for tokens in (32, 8, 32):
            ids = torch.randint(0, 64, (1, tokens))
            with fxprefetch.collect_stats() as s:
                torch.testing.assert_close(compiled(ids), model(ids))
            counts.append((s.calls, s.bytes_prefetched))
    (plan,) = fxprefetch.last_plans()
    size = sum(r.prefetch_bytes for r in plan.prefetched)
    assert [r.token_check for r in plan.prefetched] == ["run time"] * 2
    assert counts == [(0, 0), (2, size), (0, 0)]
    assert plan.lowering is not None and "2 of 2 as fxprefetch.prefetch_in_range" in plan.lowering
