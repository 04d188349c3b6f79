"""Which nodes are collectives, and whether a graph is sequence-parallel (by the rules' tables)."""

from __future__ import annotations

from collections.abc import Iterable

from torch.fx import Node

from fxprefetch.passes.analysis.graph_utils import op_name
from fxprefetch.passes.tables.rules import PrefetchRules


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
