"""Remove prefetch nodes, leaving a graph equivalent to the one before the pass."""

from __future__ import annotations

from torch.fx import GraphModule

from fxprefetch.ops import HINT_OP, PREFETCH_OP
from passes.graph_utils import finalize


def strip_prefetch(gm: GraphModule, recompile: bool = True) -> int:
    """Erase every ``fxprefetch.prefetch`` (and ``prefetch_hint``) node of ``gm``; returns
    how many were removed."""
    nodes = [
        node
        for target in (PREFETCH_OP, HINT_OP)
        for node in gm.graph.find_nodes(op="call_function", target=target)
    ]
    for node in nodes:
        gm.graph.erase_node(node)
    if nodes:
        finalize(gm, recompile)
    return len(nodes)
