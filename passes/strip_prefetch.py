"""Remove prefetch nodes, leaving a graph equivalent to the one before the pass."""

from __future__ import annotations

from torch.fx import Graph, GraphModule, Node

from fxprefetch.ops import JOIN_OP, NATIVE_OP
from fxprefetch.passes.analysis.graph_utils import finalize, flatten_nodes, get_arg, prefetch_nodes
from fxprefetch.passes.plan_prefetches import META_KEY


def strip_prefetch(gm: GraphModule, recompile: bool = True) -> int:
    """Erase every prefetch of ``gm`` (every op of ``fxprefetch.ops.PREFETCH_OPS``: the plain,
    hint, run-time-checked and by-name prefetches, the native lowering with its joins and
    tokens), and the token counts only they read; returns how many prefetches were removed."""
    graph = gm.graph
    for join in list(graph.find_nodes(op="call_function", target=JOIN_OP)):
        graph.erase_node(join)
    nodes = prefetch_nodes(graph)
    made: list[Node] = []  # tokens of native forks, token counts of run-time checks
    for node in nodes:
        if node.target is NATIVE_OP:
            made += [t for t in node.args[1] if _is_token(t)]
        elif "tokens" in (a.name for a in node.target._schema.arguments):
            made += flatten_nodes(get_arg(node, "tokens"))
    for node in nodes:
        graph.erase_node(node)
    removed = _erase_unused(graph, made)
    if nodes or removed:
        finalize(gm, recompile)
    return len(nodes)


def _erase_unused(graph: Graph, made: list[Node]) -> int:
    """Erase the nodes of ``made`` nobody reads any more, then their inputs that only they
    read (a token count's ``sym_size`` and products); returns how many."""
    count = 0
    todo = list(made)
    while todo:
        node = todo.pop()
        if getattr(node, "_erased", False) or node.users or node.op != "call_function":
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        count += 1
        todo += inputs
    return count


def _is_token(node: object) -> bool:
    return "token_of" in (getattr(node, "meta", {}).get(META_KEY) or {})
