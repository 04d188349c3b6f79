"""Remove prefetch nodes, leaving a graph equivalent to the one before the pass."""

from __future__ import annotations

from torch.fx import GraphModule

from fxprefetch.ops import HINT_OP, JOIN_OP, NATIVE_OP, PREFETCH_OP
from passes.graph_utils import finalize
from passes.weight_prefetch import META_KEY


def strip_prefetch(gm: GraphModule, recompile: bool = True) -> int:
    """Erase every prefetch of ``gm`` (``fxprefetch.prefetch``, ``prefetch_hint``, or the native
    lowering with its joins and tokens); returns how many prefetches were removed."""
    graph = gm.graph
    for join in list(graph.find_nodes(op="call_function", target=JOIN_OP)):
        graph.erase_node(join)
    nodes = [
        *graph.find_nodes(op="call_function", target=PREFETCH_OP),
        *graph.find_nodes(op="call_function", target=NATIVE_OP),
        *graph.find_nodes(op="call_function", target=HINT_OP),
    ]
    tokens = [t for n in nodes if n.target is NATIVE_OP for t in n.args[1] if _is_token(t)]
    for node in nodes:
        graph.erase_node(node)
    for token in tokens:
        if not token.users:
            graph.erase_node(token)
    if nodes or tokens:
        finalize(gm, recompile)
    return len(nodes)


def _is_token(node: object) -> bool:
    return "token_of" in (getattr(node, "meta", {}).get(META_KEY) or {})
