"""Retargeting plain prefetches to ``fxprefetch.prefetch_native``, with the ``order`` list
that pins each in inductor's schedule (see ``passes/lower_native.py``): shared by the CUDA
lowering (``lower_native``) and the Ascend side-stream lowering (``lower_npu``), and
:func:`graph_owned`, which ``insert_joins`` asks too."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import torch
from torch.fx import Graph, Node

from fxprefetch.ops import NATIVE_OP, PREFETCH_OP
from fxprefetch.passes.analysis.graph_utils import tensor_value
from fxprefetch.passes.analysis.prefetch_meta import TokenMeta, prefetch_meta, set_meta


def graph_owned(node: Node | None) -> bool:
    """Whether ``node``'s value is a tensor stored in a buffer the graph itself computes (not a
    graph input, a constant, or a view of one), so declaring it mutated is safe."""
    while node is not None:
        if tensor_value(node) is None or node.op != "call_function":
            return False
        target = node.target
        schema = getattr(target, "_schema", None)
        aliases = schema is not None and any(r.alias_info is not None for r in schema.returns)
        if not aliases and not getattr(target, "is_view", False):
            return True
        inputs = [n for n in node.all_input_nodes if tensor_value(n) is not None]
        node = inputs[0] if len(inputs) == 1 else None
    return False


def new_token(graph: Graph, weight: Node, before: Node) -> Node:
    """A zero-size uint8 tensor on ``weight``'s device, inserted before ``before``."""
    value = tensor_value(weight)
    assert value is not None
    kwargs = {"dtype": torch.uint8, "device": value.device, "pin_memory": False}
    with graph.inserting_before(before):
        token = graph.call_function(torch.ops.aten.empty.memory_format, ([0],), kwargs)
    fake_mode = getattr(value, "fake_mode", None)
    if fake_mode is not None:
        with fake_mode:
            token.meta["val"] = torch.empty(0, dtype=torch.uint8, device=value.device)
    else:
        token.meta["val"] = torch.empty(0, dtype=torch.uint8, device="meta")
    return token


def lower_to_native(
    graph: Graph, l2_devices: Collection[str], join_devices: Collection[str], cache_hint: str
) -> int:
    """Retarget each prefetch on a device in ``l2_devices``; the side stream where the device
    is in ``join_devices``, else the compute stream. Returns how many were lowered."""
    count = 0

    for node in list(graph.find_nodes(op="call_function", target=PREFETCH_OP)):
        weight = node.args[0]
        value = tensor_value(weight)
        if value is None or value.device.type not in l2_devices:
            continue
        dependency = node.args[1] if len(node.args) > 1 else None
        max_size = node.args[2]
        offset = node.args[3] if len(node.args) > 3 else 0
        stream = "side" if value.device.type in join_devices else "compute"
        order: list[Node] = []
        if stream == "side":
            order.append(new_token(graph, weight, node))
        if isinstance(dependency, Node) and graph_owned(dependency):
            order.append(dependency)
        node.target = NATIVE_OP  # in place: the plan names this node
        node.args = (weight, order, max_size, offset, stream, cache_hint)
        meta = prefetch_meta(node)
        if meta is not None:  # a prefetch placed by hand has no record to complete
            set_meta(node, replace(meta, stream=stream))
        if stream == "side":
            set_meta(order[0], TokenMeta(token_of=node.name))
        count += 1
    return count
