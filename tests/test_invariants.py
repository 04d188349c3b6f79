"""The invariant checker: what it catches, that the real pipelines keep every invariant, and
that the driver checks them after every pass."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch.fx import GraphModule

from fxprefetch import WeightPrefetchConfig
from fxprefetch.devices import DeviceSetup
from fxprefetch.ops import JOIN_OP, NATIVE_OP, PREFETCH_OP
from fxprefetch.passes import DEFAULT_RULES
from fxprefetch.passes.analysis.prefetch_meta import (
    META_KEY,
    JoinMeta,
    PrefetchMeta,
    TokenMeta,
    join_meta,
    prefetch_meta,
    set_meta,
    token_meta,
)
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass
from fxprefetch.passes.invariants import (
    CHECK_INVARIANTS_ENV,
    InvariantError,
    check_invariants,
    hand_placed,
    invariants_enabled,
)
from fxprefetch.passes.lower_native import lower_native
from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.passes.relax_dependencies import relax_dependencies
from fxprefetch.pipeline import run_passes, run_pipeline
from fxprefetch.planner import GraphPlanner
from fxprefetch.targets import make_compile_setup

from support.npu_standins import install_op_standins
from support.synthetic import SynthModel, SynthSpec
from support.tracing import fake_trace, pipeline_of, swap_passes

CPU = frozenset({"cpu"})
JOINED = {"devices": DeviceSetup(native=CPU, l2=CPU, joins=CPU)}


def _traced(**context) -> tuple[GraphModule, PassContext]:
    gm, names = fake_trace(SynthModel(SynthSpec(layers=2)), torch.randint(0, 64, (1, 4)))
    config = WeightPrefetchConfig(enabled=True)
    return gm, PassContext(config, DEFAULT_RULES, "g", weight_names=names, **context)


def _planned() -> tuple[GraphModule, PassContext, list]:
    gm, ctx = _traced()
    assert plan_prefetches(gm, ctx).changed == 4
    return gm, ctx, list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))


def _joined() -> tuple[GraphModule, PassContext]:
    gm, ctx = _traced(**JOINED)
    run_passes(gm, pipeline_of("inductor").passes, ctx)
    assert len(gm.graph.find_nodes(op="call_function", target=JOIN_OP)) == 4
    return gm, ctx


def test_the_suite_checks_invariants():
    assert invariants_enabled()


@pytest.mark.parametrize(("value", "enabled"), [("1", True), ("0", False), ("", False)])
def test_the_environment_switches_the_checks(monkeypatch, value, enabled):
    monkeypatch.setenv(CHECK_INVARIANTS_ENV, value)
    assert invariants_enabled() is enabled


# -- the real pipelines keep them ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "context"),
    [
        ("eager", {}),
        ("npu", {"npu_graph_engine": True}),
        ("npu", {}),
        ("npu", {"devices": DeviceSetup(ascend_lowering="in_stream")}),
        ("inductor", {}),
        ("inductor", JOINED),
    ],
    ids=["eager", "npu-ge", "npu-captured", "npu-in-stream", "inductor-hints", "inductor-joined"],
)
def test_the_real_pipelines_keep_every_invariant(target, context):
    from support.npu_standins import StreamRecorder

    if target == "npu":
        install_op_standins()
    gm, ctx = _traced(**context)
    with StreamRecorder().installed():  # the STAND-IN stream runtime, for the captured npu
        report = run_pipeline(
            gm, pipeline_of(target), ctx
        )  # checks after every pass (the suite enables it)
    assert len(report.plan.prefetched) == 4
    check_invariants(gm, ctx, pipeline_of(target).passes)


def test_every_record_is_typed():
    gm, _ = _joined()
    forks = gm.graph.find_nodes(op="call_function", target=NATIVE_OP)
    joins = gm.graph.find_nodes(op="call_function", target=JOIN_OP)
    for fork in forks:
        meta = prefetch_meta(fork)
        assert isinstance(meta, PrefetchMeta) and meta.stream == "side"
        assert meta.role is not None and meta.max_size == fork.args[2] and meta.device == "cpu"
        assert token_meta(fork.args[1][0]) == TokenMeta(token_of=fork.name)
    assert {join_meta(j) for j in joins} == {
        JoinMeta(joins=f.name, linear=prefetch_meta(f).linear) for f in forks
    }


# -- planted breakage ----------------------------------------------------------------------------


def test_a_prefetch_without_a_dependency_is_caught():
    gm, ctx, prefetches = _planned()
    prefetches[1].args = (prefetches[1].args[0], None, *prefetches[1].args[2:])
    with pytest.raises(InvariantError, match=rf"g: after plan_prefetches: {prefetches[1].name} "):
        check_invariants(gm, ctx, (plan_prefetches,))
    # relaxing drops dependencies on purpose
    check_invariants(gm, ctx, (plan_prefetches, relax_dependencies))


def test_a_prefetch_without_a_weight_is_caught():
    gm, ctx, prefetches = _planned()
    prefetches[0].args = (None, *prefetches[0].args[1:])
    with pytest.raises(InvariantError, match="has no weight operand"):
        check_invariants(gm, ctx, (plan_prefetches,))


def test_a_prefetch_without_its_record_is_caught_unless_the_model_placed_it():
    gm, ctx, prefetches = _planned()
    given = hand_placed(gm.graph)
    assert given == frozenset()
    del prefetches[2].meta[META_KEY]
    with pytest.raises(InvariantError, match=rf"{prefetches[2].name} .* has no PrefetchMeta"):
        check_invariants(gm, ctx, (plan_prefetches,))
    check_invariants(gm, ctx, (plan_prefetches,), given=hand_placed(gm.graph))


def test_an_untyped_record_is_caught():
    gm, ctx, prefetches = _planned()
    prefetches[0].meta[META_KEY] = {"linear": "mm", "role": "attn.qkv"}  # the old, untyped form
    with pytest.raises(InvariantError, match="has no PrefetchMeta"):
        check_invariants(gm, ctx, (plan_prefetches,))


def test_a_graph_that_does_not_lint_is_caught():
    gm, ctx, prefetches = _planned()
    linear = next(n for n in gm.graph.nodes if n.name == prefetch_meta(prefetches[0]).linear)
    prefetches[0].args = (prefetches[0].args[0], linear, *prefetches[0].args[2:])  # used early
    with pytest.raises(InvariantError, match="after plan_prefetches: the graph does not lint"):
        check_invariants(gm, ctx, (plan_prefetches,))


def test_a_fork_without_a_join_is_caught():
    gm, ctx = _joined()
    ran = pipeline_of("inductor").passes
    join = gm.graph.find_nodes(op="call_function", target=JOIN_OP)[0]
    fork = join_meta(join).joins
    gm.graph.erase_node(join)
    with pytest.raises(InvariantError, match=f"{fork} forks onto the side stream with 0 joins"):
        check_invariants(gm, ctx, ran)
    # before joins are inserted, a fork has none yet
    check_invariants(gm, ctx, ran[:-1])


def test_a_join_before_its_fork_or_a_second_join_is_caught():
    gm, ctx = _joined()
    ran = pipeline_of("inductor").passes
    join = gm.graph.find_nodes(op="call_function", target=JOIN_OP)[0]
    with gm.graph.inserting_after(join):
        second = gm.graph.call_function(JOIN_OP, join.args)
    set_meta(second, join_meta(join))
    with pytest.raises(InvariantError, match="with 2 joins"):
        check_invariants(gm, ctx, ran)


def test_a_fork_without_its_own_token_is_caught():
    gm, ctx = _joined()
    first, second = gm.graph.find_nodes(op="call_function", target=NATIVE_OP)[:2]
    set_meta(first.args[1][0], TokenMeta(token_of=second.name))
    with pytest.raises(InvariantError, match=f"{first.name} forks onto the side stream without"):
        check_invariants(gm, ctx, (plan_prefetches, lower_native))


def test_a_record_that_disagrees_with_the_stream_is_caught():
    gm, ctx = _joined()
    fork = gm.graph.find_nodes(op="call_function", target=NATIVE_OP)[0]
    set_meta(fork, replace(prefetch_meta(fork), stream="compute"))
    with pytest.raises(InvariantError, match="runs on the side stream, its record says compute"):
        check_invariants(gm, ctx, (lower_native,))


# -- checked after every pass --------------------------------------------------------------------


@graph_pass(requires=("plan_prefetches",))
def drop_a_record(gm: GraphModule, ctx: PassContext) -> PassResult:
    """A broken pass: forgets one prefetch's record."""
    node = gm.graph.find_nodes(op="call_function", target=PREFETCH_OP)[0]
    del node.meta[META_KEY]
    return PassResult(1)


@graph_pass(requires=("plan_prefetches",))
def harmless(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Changes nothing."""
    return PassResult(0)


def test_the_driver_names_the_pass_that_broke_an_invariant(monkeypatch):
    swap_passes(monkeypatch, "eager", (plan_prefetches, drop_a_record, harmless))
    gm, ctx = _traced()
    with pytest.raises(InvariantError, match=r"g: after drop_a_record: .* has no PrefetchMeta"):
        run_pipeline(gm, pipeline_of("eager"), ctx)


def test_the_driver_checks_nothing_when_switched_off(monkeypatch):
    swap_passes(monkeypatch, "eager", (plan_prefetches, drop_a_record))
    monkeypatch.setenv(CHECK_INVARIANTS_ENV, "0")
    gm, ctx = _traced()
    assert run_pipeline(gm, pipeline_of("eager"), ctx).changed(drop_a_record) == 1


def test_a_broken_invariant_is_never_hidden_by_the_fallback(monkeypatch):
    """The planner turns a failing pass into a graph without prefetch; a broken invariant is
    a bug in a pass, so it surfaces instead."""
    swap_passes(monkeypatch, "eager", (plan_prefetches, drop_a_record))
    gm, ctx = _traced()
    planner = GraphPlanner(
        make_compile_setup(WeightPrefetchConfig(enabled=True), target="eager"), record=False
    )
    monkeypatch.setattr(planner, "weight_names", lambda _: ctx.weight_names)
    with pytest.raises(InvariantError, match="after drop_a_record"):
        planner(gm)


def test_prefetches_the_model_placed_are_its_own(monkeypatch):
    """A prefetch written in the model has no record; the checks leave it alone."""
    gm, ctx = _traced()
    placeholders = gm.graph.find_nodes(op="placeholder")
    with gm.graph.inserting_after(placeholders[-1]):
        by_hand = gm.graph.call_function(PREFETCH_OP, (placeholders[0], None, 64))
    by_hand.meta["val"] = None
    assert hand_placed(gm.graph) == {by_hand.name}
    report = run_pipeline(gm, pipeline_of("eager"), ctx)
    assert report.changed(plan_prefetches) == 4 and prefetch_meta(by_hand) is None
