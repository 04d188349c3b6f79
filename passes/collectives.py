"""Collective communication ops as they appear in aten graphs (the default tables; the pass
reads them from :class:`passes.rules.PrefetchRules`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from torch.fx import Node

from passes.graph_utils import op_name

if TYPE_CHECKING:
    from passes.rules import PrefetchRules

ALL_REDUCE = frozenset(
    {
        "_c10d_functional::all_reduce",
        "_c10d_functional::all_reduce_",
        "c10d::allreduce_",
        "vllm::all_reduce",
        "npu::npu_mm_all_reduce_base",
    }
)
REDUCE_SCATTER = frozenset(
    {
        "_c10d_functional::reduce_scatter_tensor",
        "c10d::_reduce_scatter_base_",
        "c10d::reduce_scatter_",
        "vllm::reduce_scatter",
    }
)
ALL_GATHER = frozenset(
    {
        "_c10d_functional::all_gather_into_tensor",
        "c10d::_allgather_base_",
        "c10d::allgather_",
        "vllm::all_gather",
    }
)
WAIT = frozenset({"_c10d_functional::wait_tensor", "c10d::wait"})
OTHER = frozenset(
    {
        "_c10d_functional::broadcast",
        "_c10d_functional::all_to_all_single",
        "c10d::broadcast_",
        "c10d::alltoall_base_",
    }
)
COLLECTIVES = ALL_REDUCE | REDUCE_SCATTER | ALL_GATHER | WAIT | OTHER


def is_collective(node: Node, rules: PrefetchRules) -> bool:
    return node.op == "call_function" and op_name(node) in rules.collective_ops


def is_wait(node: Node, rules: PrefetchRules) -> bool:
    return node.op == "call_function" and op_name(node) in rules.wait_ops


def has_sequence_parallel_collectives(nodes: Iterable[Node], rules: PrefetchRules) -> bool:
    """Sequence parallelism: a reduce-scatter (after attention, before the post-attention
    norm) followed later in the graph by an all-gather (before the MLP)."""
    seen_reduce_scatter = False
    for node in nodes:
        if node.op != "call_function":
            continue
        name = op_name(node)
        if name in rules.reduce_scatter_ops:
            seen_reduce_scatter = True
        elif name in rules.all_gather_ops and seen_reduce_scatter:
            return True
    return False
