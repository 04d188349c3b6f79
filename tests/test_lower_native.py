"""Native lowering (``lower_native``): prefetches become native ones on the compute stream or a
side stream, none where inductor may partition the graph or the device has no native
prefetch (the CPU stands in as a native device)."""

from __future__ import annotations

from fxprefetch.ops import PREFETCH_OP

from support.lowered import forks_and_joins, native_pipeline


def test_the_compute_stream_lowering_has_no_joins_and_no_tokens():
    gm, report = native_pipeline(set())  # native, but not on a side stream
    forks, joins = forks_and_joins(gm)
    assert len(forks) == 4 and not joins
    assert all(f.args[4] == "compute" and len(f.args[1]) == 1 for f in forks)  # dependency only
    assert report.plan.lowering == "cpu: fxprefetch.prefetch"  # no lowering note in the context


def test_a_graph_inductor_may_partition_is_lowered_without_forks():
    """Inductor's graph partitioning (CUDA graphs) splits at nodes it cannot capture; a fork
    and its join on both sides would break the captures. Such a graph gets no fork at all."""
    from torch._inductor import config

    with config.patch({"triton.cudagraphs": True, "custom_should_partition_ops": ["aten::rsqrt"]}):
        gm, report = native_pipeline({"cpu"})
    forks, joins = forks_and_joins(gm)
    assert len(forks) == 4 and not joins
    assert {f.args[4] for f in forks} == {"compute"}
    assert "inductor partitions this graph" in report.plan.lowering
    with config.patch({"triton.cudagraphs": True}):  # nothing to partition at: side stream
        gm, _ = native_pipeline({"cpu"})
    forks, joins = forks_and_joins(gm)
    assert len(joins) == len(forks) == 4


def test_no_native_lowering_where_the_device_has_none():
    gm, _ = native_pipeline(set(), l2=frozenset())
    forks, joins = forks_and_joins(gm)
    assert not forks and not joins
    assert len(list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))) == 4
