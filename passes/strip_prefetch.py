"""Remove prefetch nodes, leaving a graph equivalent to the one before the pass."""

from __future__ import annotations

from torch.fx import Graph, GraphModule, Node

from fxprefetch.ops import FORK_OPS, JOIN_OP
from fxprefetch.passes.analysis.graph_utils import flatten_nodes, get_arg, prefetch_nodes
from fxprefetch.passes.analysis.prefetch_meta import token_meta


def strip_prefetch(gm: GraphModule, recompile: bool = True) -> int:
    """Undo the passes (not a pass: the planner calls it when the pipeline fails): erase every
    prefetch of ``gm`` (:func:`remove_prefetches`), then lint the graph and, where
    ``recompile``, regenerate ``gm.code``; returns how many prefetches were removed."""
    removed, others = _strip(gm.graph)
    if removed or others:
        gm.graph.lint()
        if recompile:
            gm.recompile()
    return removed


def remove_prefetches(gm: GraphModule) -> int:
    """Erase every prefetch of ``gm`` (every op of ``fxprefetch.ops.PREFETCH_OPS``: the plain,
    hint, run-time-checked and by-name prefetches, the native lowering with its joins and
    tokens), and the token counts only they read; returns how many prefetches were removed.
    Neither lints nor regenerates ``gm.code``."""
    return _strip(gm.graph)[0]


def _strip(graph: Graph) -> tuple[int, int]:
    """Erase the prefetches and what only they read: (prefetches, other nodes) erased."""
    for join in list(graph.find_nodes(op="call_function", target=JOIN_OP)):
        graph.erase_node(join)
    nodes = prefetch_nodes(graph)
    made: list[Node] = []  # tokens of native forks, token counts of run-time checks
    for node in nodes:
        if node.target in FORK_OPS:
            made += [t for t in get_arg(node, "order") if _is_token(t)]
        if "tokens" in (a.name for a in node.target._schema.arguments):
            made += flatten_nodes(get_arg(node, "tokens"))
    for node in nodes:
        graph.erase_node(node)
    return len(nodes), _erase_unused(graph, made)


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
    return token_meta(node) is not None
