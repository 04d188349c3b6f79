"""The window a prefetch hides behind: the vector work before a linear, and its dependency.

Walk back from the linear's activations in reverse graph order: vector ancestors form the
window, views are transparent, the first other ancestor is the dependency (see the README's
table). The walk crosses a collective when vector work lies behind it. With attention
windows on, it also crosses attention (SDPA, flash attention, vLLM's attention op, and the
matmuls of two computed operands that a math attention decomposes into): the attention joins
the window and the walk goes on behind it, so o_proj's prefetch starts before attention. It
stops at the dependency, so the pass is linear in the size of the graph.
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from torch.fx import Node

from fxprefetch.passes.analysis.collectives import is_collective, is_wait
from fxprefetch.passes.analysis.graph_utils import flatten_nodes, get_arg, op_name, tensor_value
from fxprefetch.passes.analysis.op_classes import NodeKind, classify
from fxprefetch.passes.tables.rules import PrefetchRules


@dataclass
class Window:
    dependency: Node  # the node the prefetch follows (a tensor-valued node)
    ops: list[Node] = field(default_factory=list)  # the window's work, reverse graph order
    collective: Node | None = None  # set when a collective window hides the prefetch
    crossed: tuple[Node, ...] = ()  # collectives walked through to reach vector work
    attention: tuple[Node, ...] = ()  # attention ops in ``ops`` (an attention window)

    @property
    def vector_ops(self) -> list[Node]:
        """The vector work of the window (its ops less the attention)."""
        return [n for n in self.ops if n not in self.attention]

    @property
    def kind(self) -> str:
        if self.collective is not None:
            return "collective"
        return "attention" if self.attention else "vector"

    @property
    def empty(self) -> bool:
        return not self.ops and self.collective is None

    def op_names(self) -> tuple[str, ...]:
        ops = [op_name(n) for n in reversed(self.ops)]
        if self.collective is not None:
            ops.insert(0, op_name(self.collective))
        return tuple(ops)


def _walk(
    starts: Sequence[Node],
    index: Mapping[Node, int],
    rules: PrefetchRules,
    attention: Collection[Node] | None = None,
) -> Window | None:
    """Walk back from ``starts`` in reverse graph order to the first barrier or leaf.

    ``attention``: None when attention windows are off; else extra nodes to cross as
    attention (a math attention's matmuls) beside the rules' attention ops."""
    heap: list[tuple[int, str, Node]] = []
    seen: set[Node] = set()
    via: dict[Node, Node] = {}

    def push(node: Node, parent: Node | None) -> None:
        if node not in seen and node in index:
            seen.add(node)
            if parent is not None:
                via[node] = parent
            heapq.heappush(heap, (-index[node], node.name, node))

    for start in starts:
        push(start, None)
    ops: list[Node] = []
    crossed: list[Node] = []
    leaf: Node | None = None
    while heap:
        _, _, node = heapq.heappop(heap)
        kind = classify(node, rules)
        if kind is NodeKind.IGNORE:
            continue
        if kind is NodeKind.LEAF:
            leaf = leaf or node
            continue
        if kind is NodeKind.BARRIER:
            if attention is None or not _is_attention(node, rules, attention):
                return Window(_tensor_of(node, via), ops, attention=tuple(crossed))
            crossed.append(node)
            ops.append(node)
        if kind is NodeKind.VECTOR:
            ops.append(node)
        for inp in node.all_input_nodes:
            push(inp, node)
    if leaf is None:
        return None
    return Window(_tensor_of(leaf, via), ops, attention=tuple(crossed))


def _is_attention(node: Node, rules: PrefetchRules, extra: Collection[Node]) -> bool:
    return node in extra or op_name(node) in rules.attention_ops


def find_window(
    starts: Sequence[Node],
    index: Mapping[Node, int],
    rules: PrefetchRules,
    collective_windows: bool = False,
    attention: Collection[Node] | None = None,
) -> Window | None:
    """The vector work before the linear's activations, and the node the prefetch follows.

    The walk crosses a collective when vector work lies behind it (sequence parallelism puts
    an all-gather between the norm and qkv): the window is that vector work, and the prefetch
    starts before it, overlapping the norm and the collective. A collective with nothing but
    a barrier behind it ends the walk, unless collective windows are on. ``attention`` (None:
    attention windows off) lists matmuls to cross as attention beside the rules' attention
    ops; see :func:`attention_matmuls`.
    """
    window = _walk(starts, index, rules, attention)
    crossed: list[Node] = []
    while window is not None:
        collective = _collective_at(window.dependency, rules)
        if collective is None or collective in crossed:
            break
        behind = _walk(_collective_inputs(collective, rules), index, rules, attention)
        if behind is None or not behind.vector_ops:
            break
        crossed.append(collective)
        window = Window(
            behind.dependency,
            window.ops + behind.ops,
            attention=window.attention + behind.attention,
        )
    if window is None:
        return None
    window.crossed = tuple(crossed)
    if collective_windows:
        window = _collective_window(window, rules)
    return window


def _tensor_of(node: Node, via: Mapping[Node, Node]) -> Node:
    """A tensor-valued node standing for ``node`` (its ``getitem`` when it returns a tuple)."""
    if tensor_value(node) is not None or "val" not in node.meta:
        return node
    child = via.get(node)
    if child is not None and tensor_value(child) is not None:
        return child
    for user in node.users:
        if tensor_value(user) is not None:
            return user
    return node


def _collective_at(node: Node, rules: PrefetchRules) -> Node | None:
    """The collective ``node`` is, or waits on; None for any other node."""
    if is_wait(node, rules):
        inner = flatten_nodes(node.args[:1])
        if inner and is_collective(inner[0], rules):
            return inner[0]
    return node if is_collective(node, rules) else None


def _collective_inputs(collective: Node, rules: PrefetchRules) -> list[Node]:
    """The tensors a collective sends (its argument the rules name; the first argument when
    none is named)."""
    for name in rules.collective_inputs:
        value = get_arg(collective, name)
        if value is not None:
            return [n for n in flatten_nodes(value) if tensor_value(n) is not None]
    return [n for n in flatten_nodes(collective.args[:1]) if tensor_value(n) is not None]


def _collective_window(window: Window, rules: PrefetchRules) -> Window:
    """Start the prefetch at the input of the collective the window begins with."""
    collective = _collective_at(window.dependency, rules)
    if collective is None:
        return window
    inputs = _collective_inputs(collective, rules)
    if not inputs:
        return window
    return Window(inputs[0], window.ops, collective, window.crossed, window.attention)


def attention_matmuls(matmuls: Sequence[Node]) -> frozenset[Node]:
    """The matmuls whose operands are both computed (``q @ k.T``, ``p @ v``): what attention
    decomposes into where no fused attention op is used (math SDPA, eager attention)."""

    def computed(value: object) -> bool:
        node = value
        while isinstance(node, Node) and node.op == "call_function":
            if node.target is operator.getitem or len(node.all_input_nodes) != 1:
                break
            node = node.all_input_nodes[0]  # look through views of an input
        return isinstance(node, Node) and node.op == "call_function"

    return frozenset(
        n
        for n in matmuls
        if len(n.all_input_nodes) >= 2 and all(computed(i) for i in n.all_input_nodes)
    )
