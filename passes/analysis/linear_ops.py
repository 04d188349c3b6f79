"""Matching a node against the linear-op table: its spec, and the conditions a spec may name
(``only_if``: a convolution is a linear when it is a pointwise kernel)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from torch.fx import Node

from fxprefetch.passes.analysis.graph_utils import get_arg, op_name, tensor_value
from fxprefetch.passes.tables.linear_ops import LinearOpSpec


def _ints(value: object) -> list[int] | None:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None  # symbolic or missing


def is_pointwise_conv(node: Node) -> bool:
    """A convolution that is a linear over the channels: a kernel 1 wide in every spatial
    dimension, stride 1, no padding, one group, not transposed (``Conv1d(k=1)``)."""
    weight = get_arg(node, "weight")
    value = tensor_value(weight) if isinstance(weight, Node) else None
    if value is None or value.dim() < 3:
        return False
    kernel = _ints(list(value.shape[2:]))
    stride, padding = _ints(get_arg(node, "stride")), _ints(get_arg(node, "padding"))
    return (
        kernel is not None
        and all(k == 1 for k in kernel)
        and stride is not None
        and all(s == 1 for s in stride)
        and padding is not None
        and all(p == 0 for p in padding)
        and get_arg(node, "groups") == 1
        and get_arg(node, "transposed") is False
    )


LINEAR_CONDITIONS: Mapping[str, Callable[[Node], bool]] = MappingProxyType(
    {"pointwise_conv": is_pointwise_conv}
)


def linear_spec(node: Node, table: Mapping[str, LinearOpSpec]) -> LinearOpSpec | None:
    """The spec of ``node`` when it is a linear under ``table``, else None."""
    if node.op != "call_function":
        return None
    spec = table.get(op_name(node))
    if spec is None or (spec.only_if is not None and not LINEAR_CONDITIONS[spec.only_if](node)):
        return None
    return spec
