"""Remove prefetch nodes, leaving a graph equivalent to the one before the pass."""

from __future__ import annotations

from torch.fx import GraphModule

from fxprefetch.ops import PREFETCH_OP
from passes.graph_utils import finalize


def strip_prefetch(gm: GraphModule, recompile: bool = True) -> int:
    """Erase every ``fxprefetch.prefetch`` node of ``gm``; returns how many were removed."""
    nodes = list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))
    for node in nodes:
        gm.graph.erase_node(node)
    if nodes:
        finalize(gm, recompile)
    return len(nodes)
