"""Remove prefetch nodes, leaving a graph equivalent to the one before the pass."""

from __future__ import annotations

from torch.fx import GraphModule

from passes.graph_utils import finalize, prefetch_nodes


def strip_prefetch(gm: GraphModule, recompile: bool = True) -> int:
    """Erase every prefetch node of ``gm`` (every op of ``fxprefetch.ops.PREFETCH_OPS``, and
    the joins of by-name prefetches); returns how many prefetches were removed."""
    from fxprefetch.ops import JOIN_OPS

    nodes = prefetch_nodes(gm.graph)
    joins = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in JOIN_OPS]
    for node in (*joins, *nodes):
        gm.graph.erase_node(node)
    if nodes or joins:
        finalize(gm, recompile)
    return len(nodes)
