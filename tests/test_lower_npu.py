"""NPU lowering (``lower_npu``): in a GE graph prefetches become torch_npu's ``npu_prefetch``
with the same arguments, all or none of them; in a graph captured op by op they fork onto the
prefetch stream and are joined before their linear (``fxprefetch.devices.npu_streams``, run here on
the STAND-IN stream runtime of ``support.npu_standins``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxprefetch import devices, ops
from fxprefetch.errors import PassFailedError
from fxprefetch.passes import lower_prefetch_to_npu
from fxprefetch.passes.analysis.prefetch_meta import join_meta, prefetch_meta
from fxprefetch.passes.lower_npu import NpuLoweringError

from support.npu_standins import install_op_standins
from support.planning import planned_synth, prefetch_nodes
from support.synthetic import SynthModel, SynthSpec


@pytest.fixture
def planned():
    return planned_synth()


def test_npu_lowering_retargets_with_the_same_arguments(planned):
    install_op_standins()
    gm, _ = planned
    before = [n.args for n in prefetch_nodes(gm)]
    assert lower_prefetch_to_npu(gm) == 4
    lowered = prefetch_nodes(gm, torch.ops.npu.npu_prefetch.default)
    assert [n.args for n in lowered] == before and not prefetch_nodes(gm)
    gm.graph.eliminate_dead_code()  # torch_npu marks npu_prefetch side-effecting too
    assert len(prefetch_nodes(gm, torch.ops.npu.npu_prefetch.default)) == 4


def test_npu_lowering_refuses_a_missing_dependency(planned):
    install_op_standins()
    gm, _ = planned
    last = prefetch_nodes(gm)[-1]
    last.args = (last.args[0], None, *last.args[2:])  # only the last one lacks it
    with pytest.raises(NpuLoweringError, match="needs a dependency"):
        lower_prefetch_to_npu(gm)
    # all or nothing: none was retargeted, so stripping ours restores the graph
    assert len(prefetch_nodes(gm)) == 4
    assert not prefetch_nodes(gm, torch.ops.npu.npu_prefetch.default)


def test_a_ge_graph_refuses_prefetches_decided_at_run_time(planned):
    """GE converts npu_prefetch only: a token-bounded prefetch on a symbolic count is refused
    there (the planner then compiles the graph without prefetch); aclgraph keeps it."""
    install_op_standins()
    gm, _ = planned
    first = prefetch_nodes(gm)[0]
    with gm.graph.inserting_after(first):
        gm.graph.call_function(ops.RANGE_OP, (first.args[0], first.args[1], 64, 0, 8, 96, 4096))
    with pytest.raises(NpuLoweringError, match="no GE converter"):
        lower_prefetch_to_npu(gm, graph_engine=True)
    assert len(prefetch_nodes(gm)) == 4  # all or nothing
    assert lower_prefetch_to_npu(gm) == 4  # aclgraph and npugraph_ex run the op when captured
    assert len(prefetch_nodes(gm, ops.RANGE_OP)) == 1


# -- captured graphs: the prefetch stream -------------------------------------------------------


def _npu_pipeline(model=None, ascend_lowering="side_stream", **context):
    from fxprefetch.devices import DeviceSetup

    from support.tracing import run_synth_pipeline

    devices = DeviceSetup(ascend_lowering=ascend_lowering)
    return run_synth_pipeline("npu", model=model, devices=devices, **context)


def _pairs(gm):
    """Each fork (side-stream prefetch_native) with the joins of it that come after it."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    joins = list(gm.graph.find_nodes(op="call_function", target=ops.JOIN_OP))
    forks = list(gm.graph.find_nodes(op="call_function", target=ops.NATIVE_OP))
    return (
        order,
        [
            (fork, [j for j in joins if join_meta(j).joins == fork.name and order[j] > order[fork]])
            for fork in forks
        ],
        joins,
    )


def test_a_ge_graph_keeps_cmo_and_a_captured_one_forks():
    """One lowering per mode: GE (max-autotune) npu_prefetch -> Cmo, no fork; a captured graph
    forks every prefetch onto the prefetch stream (a token each) and joins it once; the
    records say which."""
    from support.npu_standins import StreamRecorder

    install_op_standins()
    gm, report = _npu_pipeline(npu_graph_engine=True)
    assert len(prefetch_nodes(gm, torch.ops.npu.npu_prefetch.default)) == 4
    assert not prefetch_nodes(gm, ops.NATIVE_OP) and not prefetch_nodes(gm, ops.JOIN_OP)
    assert {r.lowering for r in report.plan.prefetched} == {"ascend_cmo"}
    assert report.plan.lowering.startswith("ascend_cmo")
    with StreamRecorder().installed():
        gm, report = _npu_pipeline()
    _order, pairs, joins = _pairs(gm)
    assert len(pairs) == len(joins) == 4 and all(len(mine) == 1 for _, mine in pairs)
    assert all(f.args[4] == "side" for f, _ in pairs)
    assert {r.lowering for r in report.plan.prefetched} == {"ascend_side_stream"}


def test_without_a_stream_runtime_the_captured_lowering_is_refused():
    """No prefetch stream for the weights' device (torch_npu's runtime not loaded): refused
    before any node changes, never a prefetch dropped when it runs; in_stream still lowers."""
    from fxprefetch.passes.lower_npu import lower_prefetch_to_stream

    install_op_standins()
    gm, _ = planned_synth()
    with pytest.raises(NpuLoweringError, match="no Ascend prefetch stream for cpu tensors"):
        lower_prefetch_to_stream(gm)
    assert len(prefetch_nodes(gm)) == 4
    gm, report = _npu_pipeline(ascend_lowering="in_stream")
    assert len(prefetch_nodes(gm, torch.ops.npu.npu_prefetch.default)) == 4
    assert {r.lowering for r in report.plan.prefetched} == {"ascend_in_stream"}


def _with_range_prefetches(recorder_run=None):
    """A planned synth graph with two ``prefetch_in_range`` nodes of the first prefetch's
    weight and linear added by hand: 8 tokens, one in ``[0, 16]``, one in ``[96, 4096]``."""
    from dataclasses import replace

    from fxprefetch.passes.analysis.prefetch_meta import set_meta

    from support.tracing import run_synth_pipeline

    model = SynthModel(SynthSpec(layers=2)).eval()
    gm, _ = run_synth_pipeline("eager", model=model)  # planned only
    first = prefetch_nodes(gm)[0]
    bounded = []
    for low, high in ((0, 16), (96, 4096)):
        with gm.graph.inserting_after(first):
            node = gm.graph.call_function(
                ops.RANGE_OP, (first.args[0], first.args[1], 64, 0, 8, low, high)
            )
        node.meta["val"] = None
        set_meta(node, replace(prefetch_meta(first), max_size=64))
        bounded.append(node)
    return model, gm, first, bounded


def test_a_prefetch_decided_at_run_time_forks_and_joins_in_or_out_of_range():
    """prefetch_in_range in a captured graph forks onto the prefetch stream (prefetch_native
    with its token bounds) and gets its own join before the linear; run on the STAND-IN
    stream runtime, the one in range issues its bytes on the prefetch stream, the one out of
    range forks and joins but issues none. ``in_stream`` keeps its kernel in the compute
    stream, recorded as such."""
    from fxprefetch.passes.insert_joins import insert_joins
    from fxprefetch.passes.lower_npu import lower_npu

    from support.npu_standins import StreamEvent, StreamRecorder

    ids = torch.randint(0, 64, (1, 4))
    with StreamRecorder().installed() as recorder:
        model, gm, first, (inside, outside) = _with_range_prefetches()
        lower_npu(gm, _context())
        insert_joins(gm, _context())
        gm.recompile()
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        real = [t.detach() for t in state.values()]
        with torch.no_grad():
            got = recorder.run(gm, *real, ids)
            torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, model(ids))
    assert inside.target is ops.NATIVE_OP and outside.target is ops.NATIVE_OP
    assert [n.kwargs for n in (inside, outside)] == [
        {"tokens": 8, "min_tokens": 0, "max_tokens": 16},
        {"tokens": 8, "min_tokens": 96, "max_tokens": 4096},
    ]
    assert {prefetch_meta(n).lowering for n in (first, inside, outside)} == {"ascend_side_stream"}
    order, pairs, joins = _pairs(gm)
    assert len(pairs) == len(joins) == 6 and all(len(mine) == 1 for _, mine in pairs)
    mine = {fork.name: js[0] for fork, js in pairs}
    linear = {n.name: n for n in gm.graph.nodes}[prefetch_meta(inside).linear]
    ptr = real[list(gm.graph.find_nodes(op="placeholder")).index(first.args[0])].data_ptr()
    for node, issued in ((inside, [StreamEvent("prefetch", 1, ptr, 64)]), (outside, [])):
        fork, join = recorder.fork_join(node.name, mine[node.name].name)
        assert fork == [StreamEvent("node", 0, node.name), StreamEvent("wait", 1, other=0), *issued]
        assert join == [StreamEvent("node", 0, mine[node.name].name),
                        StreamEvent("wait", 0, other=1)]  # fmt: skip
        assert order[mine[node.name]] < order[linear]
    with StreamRecorder().installed():
        _model, gm, first, bounded = _with_range_prefetches()
        lower_npu(gm, _context(devices=devices.DeviceSetup(ascend_lowering="in_stream")))
    assert all(n.target is ops.RANGE_OP for n in bounded)
    assert {prefetch_meta(n).lowering for n in bounded} == {"ascend_in_stream"}


def _context(**fields):
    from fxprefetch import WeightPrefetchConfig
    from fxprefetch.passes import DEFAULT_RULES
    from fxprefetch.pipeline import PassContext

    return PassContext(WeightPrefetchConfig(enabled=True), DEFAULT_RULES, "g", **fields)


def test_an_unknown_ascend_lowering_is_refused():
    with pytest.raises(PassFailedError, match=r"ascend_lowering: expected one of \['side_str") as c:
        _npu_pipeline(ascend_lowering="side")  # the driver names the pass
    assert isinstance(c.value.__cause__, ValueError) and "'lower_npu' failed" in str(c.value)


def test_a_zero_size_prefetch_still_forks_and_joins():
    """A fork with nothing left to prefetch still makes the prefetch stream wait and is
    counted open, so its join waits for it: every join has its fork."""
    from fxprefetch.devices import npu_streams

    from support.npu_standins import StreamEvent, StreamRecorder

    install_op_standins()
    weight = torch.zeros(4, dtype=torch.uint8)
    with StreamRecorder().installed() as recorder:
        npu_streams.fork(weight[4:], 16, 0, "side", "none")  # an empty view: 0 bytes
        assert npu_streams.open_forks(weight.device) == 1
        npu_streams.join(weight)
        npu_streams.join(weight)  # a join with no fork open waits for nothing
    assert recorder.events == [StreamEvent("wait", 1, other=0), StreamEvent("wait", 0, other=1)]


def test_each_thread_gets_its_own_prefetch_stream():
    import threading

    from fxprefetch.devices import npu_streams

    from support.npu_standins import StreamRecorder

    device = torch.device("cpu")
    with StreamRecorder().installed():
        mine = npu_streams.prefetch_stream(device)
        theirs = []
        thread = threading.Thread(target=lambda: theirs.append(npu_streams.prefetch_stream(device)))
        thread.start()
        thread.join()
        assert npu_streams.prefetch_stream(device) is mine
    assert theirs[0] is not mine and theirs[0].stream_id != mine.stream_id


_specs = st.builds(
    SynthSpec,
    layers=st.integers(1, 3),
    hidden=st.sampled_from([16, 32]),
    intermediate=st.sampled_from([32, 64]),
    heads=st.just(4),
    moe=st.booleans(),
    fused=st.booleans(),
    act_quant=st.booleans(),
    sdpa=st.just(False),
)


@settings(max_examples=8, deadline=None)
@given(spec=_specs, tied=st.booleans(), split=st.booleans())
def test_every_fork_has_one_join_before_its_linear(spec, tied, split):
    """Random graphs, lowered as every captured Ascend mode lowers them (aclgraph's and
    npugraph_ex's pass gets the same context; vLLM's graphs split at attention): each fork
    has exactly one join, after it and before the linear that reads its weight, and run on
    the stand-in stream runtime every fork is joined within the graph's own run."""
    from fxprefetch.devices import npu_streams

    from support.npu_standins import StreamRecorder

    install_op_standins()
    torch.manual_seed(0)
    model = SynthModel(spec).eval()
    if tied and spec.layers > 1:
        model.layers[1] = model.layers[0]
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    real = [t.detach() for t in state.values()]  # before tracing (tied weights stay real)
    with StreamRecorder().installed() as recorder:
        gm, report = _npu_pipeline(model=model, split_at_attention=split)
        order, pairs, joins = _pairs(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        assert len(pairs) == len(joins) == len(report.plan.prefetched)
        for fork, mine in pairs:
            assert len(mine) == 1
            assert order[mine[0]] < order[by_name[prefetch_meta(fork).linear]]
        with torch.no_grad():
            recorder.run(gm, *real, torch.randint(0, 64, (1, 4)))
        assert npu_streams.open_forks(torch.device("cpu")) == 0
    waits = [(e.stream, e.other) for e in recorder.events if e.kind == "wait"]
    assert waits.count((1, 0)) == waits.count((0, 1)) == len(pairs)
