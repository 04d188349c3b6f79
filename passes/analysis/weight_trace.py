"""Which stored tensor a matmul operand reads, and which of its bytes.

A weight reaches a matmul through views of its storage (transposes, reshapes, dtype views,
slices, one part of a split fused weight), and sometimes through a conversion (a cast, a
dequantize ``w.to(dt) * scale``) or a tensor index (one expert of a stacked weight). The
prefetch must name the *stored* bytes, the ones HBM delivers: :func:`trace_operand` walks
back from the operand to the placeholder or ``get_attr`` that holds them and returns what
lies between. Which ops it walks through is data (:mod:`tables.weight_ops`, held by the
rules).

Whether that root is a weight at all (a parameter, buffer or constant, not a user input)
is decided by the caller, which knows dynamo's sources.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
from torch.fx import Node

from fxprefetch.passes.analysis.graph_utils import op_name, tensor_value
from fxprefetch.passes.tables.rules import PrefetchRules


@dataclass(frozen=True)
class WeightTrace:
    """What a matmul operand reads.

    ``root``: the placeholder or ``get_attr`` holding the stored tensor, or None when the
    operand is computed (``computed_by`` names the op). ``stored``: the view of ``root`` whose
    bytes are read. ``converted_by``: casts or dequantize ops between the stored bytes and the
    matmul. ``indexed_by``: the tensor-index op that picks a part at run time, if any.
    """

    root: Node | None
    stored: Node | None = None
    converted_by: tuple[str, ...] = ()
    indexed_by: str | None = None
    computed_by: str | None = None


def _dequantized_operand(node: Node) -> Node | None:
    """The operand of an elementwise dequantize step that is as large as its result."""
    out = tensor_value(node)
    if out is None:
        return None
    full = [
        a
        for a in node.args
        if isinstance(a, Node)
        and (v := tensor_value(a)) is not None
        and v.dim() == out.dim()
        and v.shape == out.shape
    ]
    return full[0] if len(full) == 1 else None


def trace_operand(operand: Node, rules: PrefetchRules) -> WeightTrace:
    """Walk from a matmul operand back to the tensor it reads (see the module docstring),
    through the ops the rules' weight tables name (views, casts, dequantize steps, indexing)."""
    node = operand
    stored = operand  # the last node from which down to the root there are only views
    converted: list[str] = []
    indexed: str | None = None
    while node.op == "call_function":
        name = op_name(node)
        first = node.args[0] if node.args else None
        if node.target is operator.getitem or name in rules.weight_views:
            nxt = first
        elif name in rules.weight_casts:
            converted.append(name)
            nxt = first
        elif name in rules.weight_dequantize:
            converted.append(name)
            nxt = _dequantized_operand(node)
        elif name in rules.weight_index:
            indexed = indexed or name
            nxt = first
        else:
            return WeightTrace(None, computed_by=name)
        if not isinstance(nxt, Node):
            return WeightTrace(None, computed_by=name)
        if not (node.target is operator.getitem or name in rules.weight_views):
            stored = nxt  # the bytes read are those of this op's input, whatever comes after
        node = nxt
    if node.op not in ("placeholder", "get_attr") or tensor_value(node) is None:
        return WeightTrace(None, computed_by=op_name(node))
    return WeightTrace(node, stored, tuple(reversed(converted)), indexed)


def known_int(value: int | torch.SymInt) -> int | None:
    """``value`` when it is known without adding a guard (an int or a constant SymInt)."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        return value.node.maybe_as_int()
    return None


@dataclass(frozen=True)
class StoredPart:
    """The bytes of a stored tensor a matmul reads.

    ``offset``: bytes into the stored tensor where the part starts. ``nbytes``: the bytes the
    matmul reads. ``span``: the bytes from ``offset`` to the last one read, which a contiguous
    prefetch of the part covers (more than ``nbytes`` for a strided part, a column slice).
    ``shape``: the part in the stored tensor's own orientation (a row slice ``W[8:]`` of a
    64x16 weight is 56x16, however the matmul transposes it).
    """

    offset: int
    nbytes: int | torch.SymInt
    span: int | torch.SymInt
    shape: tuple[int, ...]


def byte_range(root: torch.Tensor, used: torch.Tensor) -> StoredPart | None:
    """The part of ``root`` that its view ``used`` reads.

    Each storage offset counts in its own tensor's element size (a ``view(dtype)`` changes
    it). The part's shape lists the view's dimensions in storage order (largest stride
    first), without broadcast (stride 0) and size-1 dimensions, counted in ``root``'s
    elements (a ``view(dtype)``'s innermost dimension rescaled). None when a size, stride or
    offset is symbolic: reading it would add a guard.
    """
    values = [used.storage_offset(), root.storage_offset(), used.numel()]
    values += list(used.shape) + list(used.stride())
    known = [known_int(v) for v in values]
    if any(v is None for v in known):
        return None
    used_offset, root_offset, numel, *rest = known
    sizes, strides = rest[: used.dim()], rest[used.dim() :]
    offset = used_offset * used.element_size() - root_offset * root.element_size()
    if numel == 0:
        return StoredPart(offset, 0, 0, tuple(sizes))
    dims = sorted(
        (
            (stride, size)
            for size, stride in zip(sizes, strides, strict=True)
            if size != 1 and stride
        ),
        key=lambda d: -d[0],
    )
    shape = tuple(size for _, size in dims) or (1,)
    span = 1 + sum((size - 1) * stride for size, stride in zip(sizes, strides, strict=True))
    read = min(math.prod(shape), span)  # overlapping strides (as_strided) read each byte once
    if dims and used.element_size() != root.element_size():
        shape = _in_root_elements(shape, dims[-1][0], used.element_size(), root.element_size())
    return StoredPart(offset, read * used.element_size(), span * used.element_size(), shape)


def _in_root_elements(
    shape: tuple[int, ...], inner_stride: int, used_size: int, root_size: int
) -> tuple[int, ...]:
    """A dtype view's part shape in the stored tensor's elements: its contiguous innermost
    dimension rescaled by the element sizes (kept where it covers a fraction of one)."""
    inner_bytes = shape[-1] * used_size
    if inner_stride != 1 or inner_bytes % root_size:
        return shape
    return (*shape[:-1], inner_bytes // root_size)


def stored_bytes(trace: WeightTrace) -> StoredPart:
    """The part of the stored tensor a traced operand reads.

    The whole stored tensor when the part is symbolic, picked at run time, or all of it.
    """
    assert trace.root is not None and trace.stored is not None
    root = tensor_value(trace.root)
    used = tensor_value(trace.stored)
    assert root is not None
    whole = root.numel() * root.element_size()
    part = None
    if used is not None and trace.indexed_by is None:
        try:
            part = byte_range(root, used)
        except (RuntimeError, NotImplementedError):  # opaque layouts (prepacked weights)
            part = None
    size = known_int(whole)
    if part is None or (part.offset, part.nbytes, part.span) == (0, size, size):
        return StoredPart(0, whole, whole, tuple(root.shape))
    return part
