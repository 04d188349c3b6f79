"""What a window moves, read from the tensor sizes on the FX graph (``meta['val']``): the
input of the prediction model (``fxprefetch.devices.prediction``).

The window's vector work counts as one fused kernel, as inductor emits it: the bytes of the
tensors it takes from outside the window and of those it hands on (to the linear, to
attention, to later layers); intermediates between its ops are not counted. Attention,
the collective of a collective window, and collectives crossed are kernels of their own:
every input and output counts. A tensor counts its distinct elements (an expanded
scalar is one element). Sizes are read without guards: a symbolic size uses its
hint, and with no hint the window has no traffic (no prediction, no "auto" size).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.fx import Node

from fxprefetch.devices.prediction import WindowTraffic
from fxprefetch.passes.analysis.graph_utils import fake_value
from fxprefetch.passes.analysis.op_classes import NodeKind, classify
from fxprefetch.passes.analysis.windows import Window
from fxprefetch.passes.tables.rules import PrefetchRules


class _SymbolicSizeError(Exception):
    pass


def _hint(value: object) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        if isinstance(hint, int):
            return hint
    raise _SymbolicSizeError


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's distinct elements: a broadcast (stride 0) dimension counts once
    (``_SymbolicSizeError`` without size hints)."""
    sizes = [_hint(s) for s in t.shape]
    strides = [_hint(s) for s in t.stride()]
    elements = math.prod(
        size for size, stride in zip(sizes, strides, strict=True) if stride != 0 or size == 0
    )
    return elements * t.element_size()


def _value_bytes(node: Node) -> int:
    value = fake_value(node)
    tensors: Iterable = (
        value if isinstance(value, (list, tuple)) else (value,) if value is not None else ()
    )
    return sum(tensor_bytes(t) for t in tensors if isinstance(t, torch.Tensor))


def window_traffic(window: Window, rules: PrefetchRules) -> WindowTraffic | None:
    """Bytes the window's kernels read and write, and how many kernels it launches."""
    vector = set(window.vector_ops)
    internal: dict[Node, bool] = {}

    def is_internal(node: Node) -> bool:  # a vector op, or a view of window values only
        if node in vector:
            return True
        if node not in internal:
            internal[node] = False  # cycles cannot occur; guards re-entry
            internal[node] = (
                classify(node, rules) is NodeKind.TRANSPARENT
                and bool(node.all_input_nodes)
                and all(is_internal(i) for i in node.all_input_nodes)
            )
        return internal[node]

    def leaves(node: Node, seen: set[Node]) -> bool:  # a user outside the window reads it
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if not is_internal(user) or (user not in vector and leaves(user, seen)):
                return True
        return False

    try:
        nbytes = 0
        inputs: set[Node] = set()
        for node in vector:
            inputs.update(i for i in node.all_input_nodes if not is_internal(i))
            if leaves(node, set()):
                nbytes += _value_bytes(node)
        nbytes += sum(_value_bytes(i) for i in inputs)
        kernels = 1 if vector else 0
        others = [*window.attention, *window.crossed]
        if window.collective is not None:
            others.append(window.collective)
        for node in others:
            nbytes += _value_bytes(node) + sum(_value_bytes(i) for i in set(node.all_input_nodes))
            kernels += 1
    except _SymbolicSizeError:
        return None
    return WindowTraffic(nbytes, kernels)
