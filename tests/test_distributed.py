"""Tensor- and sequence-parallel graphs on a real process group: gloo, 2 ranks on loopback.

Each rank compiles its shard with backend="npu_prefetch"; outputs must equal the unsharded
eager layer, and plans and runtime counters must show mlp.down only with sequence
parallelism, and collective windows only when opted in.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

from support.dist_harness import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.compile]

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


@pytest.fixture(scope="module")
def ranks():
    return run_ranks("support.dist_workloads:tp_sp_workload", world=2, timeout=420)


VARIANTS = ["tp", "tp-collective", "sp", "sp-collective", "sp-collective-inductor"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_equal_the_unsharded_layer(ranks, variant):
    for rank in ranks:
        assert rank[variant]["max_error"] < 1e-5


def test_tensor_parallel_plan(ranks):
    for rank in ranks:
        tp = rank["tp"]
        roles = tp["roles"]
        assert not tp["sequence_parallel"]
        assert roles["attn.qkv"]["prefetched"] and roles["attn.qkv"]["window_kind"] == "vector"
        assert roles["attn.o"]["skip_reason"] == "no vector work before the linear"
        gate_up = roles["mlp.gate_up"]
        assert gate_up["window_kind"] == "vector"
        assert gate_up["dependency_op"] == "_c10d_functional::wait_tensor"  # the all-reduce
        assert roles["mlp.down"]["skip_reason"] == "mlp.down needs sequence parallelism"
        assert tp["calls_per_forward"] == 2


def test_tensor_parallel_collective_window(ranks):
    for rank in ranks:
        v = rank["tp-collective"]
        gate_up = v["roles"]["mlp.gate_up"]
        assert gate_up["window_kind"] == "collective"
        assert gate_up["window"][0] == "_c10d_functional::all_reduce"
        assert v["roles"]["mlp.down"]["prefetched"] is False
        assert v["calls_per_forward"] == 2


def test_sequence_parallel_plan(ranks):
    for rank in ranks:
        sp = rank["sp"]
        roles = sp["roles"]
        assert sp["sequence_parallel"]
        down = roles["mlp.down"]
        assert down["prefetched"] and "aten::mul" in down["window"]
        # all-gathers sit right before qkv and gate_up, with the norms behind them: the walk
        # crosses each all-gather and the prefetch hides behind the norm and the all-gather
        for role in ("attn.qkv", "mlp.gate_up"):
            assert roles[role]["prefetched"] and roles[role]["window_kind"] == "vector"
            assert roles[role]["crossed"] == ["_c10d_functional::all_gather_into_tensor"]
            assert "aten::rsqrt" in roles[role]["window"]
            assert not any("c10d" in op for op in roles[role]["window"])
        # gate_up's prefetch follows the reduce-scatter of the attention output
        assert roles["mlp.gate_up"]["dependency_op"] == "_c10d_functional::wait_tensor"
        assert sp["calls_per_forward"] == 3


@pytest.mark.parametrize("variant", ["sp-collective", "sp-collective-inductor"])
def test_sequence_parallel_collective_windows(ranks, variant):
    for rank in ranks:
        v = rank[variant]
        roles = v["roles"]
        # behind qkv's all-gather lies the norm of the layer's input: nothing to widen
        assert roles["attn.qkv"]["window_kind"] == "vector"
        # behind gate_up's all-gather lie the norm and the attention's reduce-scatter: the
        # collective window starts before the reduce-scatter
        gate_up = roles["mlp.gate_up"]
        assert gate_up["window_kind"] == "collective"
        assert gate_up["window"][0] == "_c10d_functional::reduce_scatter_tensor"
        assert gate_up["crossed"] == ["_c10d_functional::all_gather_into_tensor"]
        assert roles["mlp.down"]["window_kind"] == "vector"
        # eager runs the op's CPU kernel; inductor on the CPU leaves hints out and counts them
        done = v["calls_per_forward"] if variant == "sp-collective" else v["hints_per_forward"]
        assert done == 3


def test_a_failing_rank_fails_fast_and_cleanly():
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_ranks("support.dist_workloads:fail_on_rank_one", world=2, timeout=120)
