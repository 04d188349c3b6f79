"""Token bounds: in which token counts a prefetch runs (``weight_prefetch_config.token_range``).

A linear's token count (:func:`linear_tokens`, the one definition the bounds, the plan's
records and the prediction read) is the number of rows of its activation in the linear's own
orientation: ``x @ W`` and ``linear(x, W)`` count ``x``'s rows (every dimension but the
last: ``[batch, seq, hidden]`` is ``batch * seq``), ``W @ x.T`` counts ``x.T``'s columns
(times its batch dimensions), a pointwise convolution counts its positions (batch times
every spatial dimension). An expert linear (a weight with an expert dimension:
``grouped_mm``, ``bmm`` over stacked experts) counts the tokens routed into the MoE layer,
not the token-expert pairs: the rows of the tensor its dispatch (a gather of rows, a repeat)
replicates. A fused MoE op (vLLM's) takes the routed tokens themselves.

Where it is a number, or where what is known of a symbolic count (the shape environment's
range of its symbol, and the graph's compile range, e.g. vLLM's) lies wholly inside or
outside the prefetch's range, the pass decides once, for this graph. Otherwise the prefetch
gets the count as a ``SymInt`` graph value and checks it when it runs. Nothing here compares
a symbolic value (``bound_sympy`` only reads ranges), so no guard is added and no graph is
compiled again.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

import sympy
import torch
from torch.fx import Graph, Node

from fxprefetch.config import TokenRange
from fxprefetch.passes.analysis.graph_utils import flatten_nodes, get_arg, op_name, tensor_value
from fxprefetch.passes.analysis.linear_ops import linear_spec
from fxprefetch.passes.analysis.linears import LinearUse
from fxprefetch.passes.analysis.op_classes import NodeKind, classify
from fxprefetch.passes.tables.linear_ops import DISPATCH_OPS
from fxprefetch.passes.tables.rules import PrefetchRules

Count = int | torch.SymInt
_DISPATCH_STEPS = 16  # how far an expert's activation may lie from its dispatch


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


def _operand(node: Node, arg: str) -> Node | None:
    found = flatten_nodes(get_arg(node, arg))
    return found[0] if found else None


def _activation(use: LinearUse) -> Node | None:
    """The operand holding the tokens: the first activation, or the weight's slot where the
    weight stands in the activation's (``W @ x.T``)."""
    spec = use.spec
    return _operand(use.node, spec.weight if use.swapped else spec.activations[0])


def linear_tokens(
    use: LinearUse, rules: PrefetchRules, linears: Mapping[Node, LinearUse] | None = None
) -> Count | None:
    """The tokens of the linear ``use`` (see the module docstring): an int, or a ``SymInt``
    whose expression :func:`count_node` rebuilds as a graph value; None where the
    activation's shape is unknown. ``linears``: the graph's linears by node (from
    :func:`analysis.linears.find_linears`), so that the walk from an expert back to its
    dispatch passes the layer's other experts in their own orientation."""
    spec = use.spec
    activation = _activation(use)
    x = tensor_value(activation) if activation is not None else None
    if x is None:
        return None
    if spec.only_if == "pointwise_conv":  # [batch, channels, *spatial]
        return x.shape[0] * math.prod(x.shape[2:]) if x.dim() >= 2 else None
    if x.dim() < 2:
        return 1  # a vector: one token
    rows = x.shape[-1] if use.swapped else x.shape[-2]
    if spec.hidden or not _per_expert(use, x):
        return rows * math.prod(x.shape[:-2])
    assert activation is not None
    routed = _routed_tokens(activation, rules, linears or {})
    return routed if routed is not None else rows


def _per_expert(use: LinearUse, activation: torch.Tensor) -> bool:
    """Whether the weight has an expert dimension: a stored part of three or more
    dimensions, or a 3-D weight beside a 2-D activation (a grouped matmul)."""
    if len(use.shape) >= 3:
        return True
    weight = _operand(use.node, use.spec.activations[0] if use.swapped else use.spec.weight)
    value = tensor_value(weight) if weight is not None else None
    return use.root is None and value is not None and value.dim() >= 3 and activation.dim() == 2


def _routed_tokens(
    start: Node, rules: PrefetchRules, linears: Mapping[Node, LinearUse]
) -> Count | None:
    """The rows of the tensor the dispatch before an expert linear replicates: walk back
    from its activation through views, elementwise work and the layer's other expert
    linears to a dispatch op (:data:`tables.linear_ops.DISPATCH_OPS`); None without one."""
    node = start
    for _ in range(_DISPATCH_STEPS):
        if node.op != "call_function":
            return None
        source = DISPATCH_OPS.get(op_name(node))
        if source is not None:
            value = tensor_value(_operand(node, source) or node)
            if value is None or value.dim() == 0:
                return None
            return math.prod(value.shape[:-1]) if value.dim() > 1 else value.shape[0]
        spec = linear_spec(node, rules.linear_table)
        if node in linears:
            nxt = _activation(linears[node])
        elif spec is not None:
            nxt = _operand(node, spec.activations[0])
        elif node.target is operator.getitem or classify(node, rules) in (
            NodeKind.TRANSPARENT,
            NodeKind.VECTOR,
        ):
            nxt = next(iter(flatten_nodes(node.args)), None)
        else:
            return None
        if nxt is None:
            return None
        node = nxt
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
    count: Count | None, bounds: TokenRange, graph_range: TokenRange | None = None
) -> TokenDecision:
    """Whether the prefetch of a linear of ``count`` tokens (:func:`linear_tokens`) runs,
    per ``bounds``."""
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
