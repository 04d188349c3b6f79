"""Token bounds: in which token counts a prefetch runs (``weight_prefetch_config.token_range``).

A linear's token count is the number of rows of its activation (every dimension but the
last). Where it is a number, or where what is known of a symbolic count (the shape
environment's range of its symbol, and the graph's compile range, e.g. vLLM's) lies wholly
inside or outside the prefetch's range, the pass decides once, for this graph. Otherwise the
prefetch gets the count as a ``SymInt`` graph value and checks it when it runs. Nothing here
compares a symbolic value (``bound_sympy`` only reads ranges), so no guard is added and no
graph is compiled again.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from enum import Enum

import sympy
import torch
from torch.fx import Graph, Node

from fxprefetch.config import TokenRange
from fxprefetch.passes.analysis.graph_utils import tensor_value


class TokenCheck(str, Enum):
    ALWAYS = "always"  # every count the graph can see lies in the range: no check
    NEVER = "never"  # none does: no prefetch
    RUN_TIME = "run time"  # the prefetch checks the count when it runs


@dataclass(frozen=True)
class TokenDecision:
    check: TokenCheck
    tokens: str | None  # the count, for the plan: "128" or "s0"
    seen: tuple[int, int | None] | None  # the counts the graph can see (None: unknown)
    count: int | torch.SymInt | None = None


def token_count(starts: tuple[Node, ...]) -> int | torch.SymInt | None:
    """Rows of the first activation (its numel over its last dimension)."""
    for start in starts:
        value = tensor_value(start)
        if value is not None:
            return math.prod(value.shape[:-1]) if value.dim() > 1 else 1
    return None


def _seen(count: int | torch.SymInt, graph_range: TokenRange | None) -> tuple[int, int | None]:
    """The counts ``count`` can take: its symbol's range, narrowed by the graph's range."""
    if isinstance(count, int):
        return count, count
    node = count.node
    ranges = node.shape_env.bound_sympy(node.expr)
    low = _finite(ranges.lower) or 0
    high = _finite(ranges.upper)
    if graph_range is not None and isinstance(node.expr, sympy.Symbol):
        low = max(low, graph_range.min_tokens)
        if graph_range.max_tokens is not None:
            high = graph_range.max_tokens if high is None else min(high, graph_range.max_tokens)
    return max(low, 0), high


def _finite(bound: sympy.Expr) -> int | None:
    """A range bound as an int; None for an infinite one (sympy's or torch's ``int_oo``)."""
    return int(bound) if isinstance(bound, sympy.Integer) else None


def decide(
    starts: tuple[Node, ...], bounds: TokenRange, graph_range: TokenRange | None = None
) -> TokenDecision:
    """Whether the prefetch of a linear with activations ``starts`` runs, per ``bounds``."""
    count = token_count(starts)
    label = None if count is None else str(count)
    if bounds.unbounded:
        return TokenDecision(TokenCheck.ALWAYS, label, None, count)
    if count is None:
        return TokenDecision(TokenCheck.NEVER, None, None)
    low, high = _seen(count, graph_range)
    seen = TokenRange(low, high) if high is None or high >= low else None
    if seen is None or bounds.intersect(seen) is None:
        return TokenDecision(TokenCheck.NEVER, label, (low, high), count)
    inside = low >= bounds.min_tokens and (
        bounds.max_tokens is None or (high is not None and high <= bounds.max_tokens)
    )
    check = TokenCheck.ALWAYS if inside else TokenCheck.RUN_TIME
    return TokenDecision(check, label, (low, high), count)


def _symbol_values(graph: Graph) -> dict[sympy.Symbol, Node | tuple[Node, int]]:
    """Graph values that hold each free symbol: a SymInt placeholder, or a tensor
    placeholder's dimension."""
    found: dict[sympy.Symbol, Node | tuple[Node, int]] = {}
    for node in graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            found.setdefault(value.node.expr, node)
        elif isinstance(value, torch.Tensor):
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    found.setdefault(size.node.expr, (node, dim))
    return found


def count_node(graph: Graph, count: torch.SymInt, before: Node) -> Node | None:
    """A graph value equal to ``count``, built from placeholders right before ``before``
    (None when ``count`` is not a product of the graph's symbols and numbers)."""
    expr = count.node.expr
    factors = expr.args if isinstance(expr, sympy.Mul) else (expr,)
    values = _symbol_values(graph)
    parts: list[Node | int] = []
    for factor in factors:
        if factor.is_Integer:
            parts.append(int(factor))
        elif isinstance(factor, sympy.Symbol) and factor in values:
            parts.append(values[factor])  # type: ignore[arg-type]
        else:
            return None
    made: Node | int | None = None
    with graph.inserting_before(before):
        for part in parts:
            value: Node | int
            if isinstance(part, tuple):
                tensor, dim = part
                value = graph.call_function(torch.ops.aten.sym_size.int, (tensor, dim))
                value.meta["val"] = tensor.meta["val"].shape[dim]
            else:
                value = part
            if made is None:
                made = value
                continue
            product = graph.call_function(operator.mul, (made, value))
            product.meta["val"] = _value(made) * _value(value)
            made = product
    return made if isinstance(made, Node) else None


def _value(part: Node | int) -> int | torch.SymInt:
    return part.meta["val"] if isinstance(part, Node) else part
