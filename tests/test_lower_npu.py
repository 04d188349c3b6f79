"""NPU lowering (``lower_npu``): prefetches become torch_npu's ``npu_prefetch`` with the same
arguments, all or none of them."""

from __future__ import annotations

import pytest
import torch

from fxprefetch import ops
from fxprefetch.passes import lower_prefetch_to_npu
from fxprefetch.passes.lower_npu import NpuLoweringError

from support.npu_standins import install_op_standins
from support.planning import planned_synth, prefetch_nodes


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
