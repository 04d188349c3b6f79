"""Which ops are vector work (the work a prefetch can hide behind), and which are transparent.

Classification order: the tables of :class:`tables.rules.PrefetchRules` (these defaults plus
user extensions), then the torch op tags the rules name (``pointwise``, ``reduction``), then
"barrier" for everything else (matmuls, attention, convolutions, collectives, embeddings,
unknown opaque ops).
"""

from __future__ import annotations

import enum
import functools
import operator

import torch
from torch.fx import Node

from fxprefetch.passes.analysis.graph_utils import fake_value, flatten_nodes, op_name
from fxprefetch.passes.tables.rules import PrefetchRules, current_rules


class NodeKind(enum.Enum):
    VECTOR = "vector"  # elementwise, reductions, norms, activations, quantize, gating/routing
    TRANSPARENT = "transparent"  # views, getitem, layout copies: neither work nor a barrier
    LEAF = "leaf"  # graph inputs, constants, factories: available from the start
    BARRIER = "barrier"  # anything else: the walk stops here
    IGNORE = "ignore"  # symbolic ints and other non-tensor values


@functools.cache
def _vector_tags(names: frozenset[str]) -> tuple[torch.Tag, ...]:
    """The ``torch.Tag`` members named (a name this torch does not know tags no op)."""
    return tuple(getattr(torch.Tag, name) for name in sorted(names) if hasattr(torch.Tag, name))


def _is_tensorish(node: Node) -> bool:
    val = fake_value(node)
    if val is None:
        return True  # unknown: let the op decide
    if isinstance(val, torch.Tensor):
        return True
    return isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val)


def classify(node: Node, rules: PrefetchRules | None = None) -> NodeKind:
    """The kind of one node for the vector-window walk, under ``rules`` (default: current)."""
    if rules is None:
        rules = current_rules()
    if node.op in ("placeholder", "get_attr"):
        return NodeKind.LEAF if _is_tensorish(node) else NodeKind.IGNORE
    if node.op != "call_function" or not _is_tensorish(node):
        return NodeKind.IGNORE if node.op == "call_function" else NodeKind.BARRIER
    if node.target is operator.getitem:
        return NodeKind.TRANSPARENT
    name = op_name(node)
    if name in rules.barrier_ops or name in rules.attention_ops:
        return NodeKind.BARRIER
    if name in rules.transparent_ops:
        return NodeKind.TRANSPARENT
    if not any(_is_tensorish(n) for n in flatten_nodes((node.args, node.kwargs))):
        return NodeKind.LEAF  # factories: full, iota, scalar_tensor, arange
    if name in rules.vector_ops:
        return NodeKind.VECTOR
    tags = getattr(node.target, "tags", ())
    if any(tag in tags for tag in _vector_tags(rules.vector_tags)):
        return NodeKind.VECTOR
    return NodeKind.BARRIER
