"""Join each side-stream prefetch before the linear that reads its weight.

Where a device's native prefetch runs on a side stream (CUDA), the prefetch node forks: the
side stream waits for the compute stream at the prefetch's position, right after its
dependency. ``fxprefetch.prefetch_join(weight, after)`` makes the compute stream wait for the
side stream; this pass puts one right before each such prefetch's linear, so every fork
rejoins inside the graph (CUDA-graph capture needs it).

``after`` lists the linear's other inputs. Inductor computes a pointwise tail of the window
lazily, where the linear realizes its input; a join that reads that input is emitted after the
tail, so the whole window runs between fork and join (``tests/test_cuda_prefetch.py`` reads
the emitted code).
"""

from __future__ import annotations

from collections.abc import Collection

from torch.fx import GraphModule, Node

from fxprefetch.ops import JOIN_OP, PREFETCH_OP
from passes.graph_utils import finalize, tensor_value
from passes.weight_prefetch import META_KEY


def _only_views_of(node: Node, weight: Node) -> bool:
    """Whether ``node`` is ``weight`` or a chain of one-input ops (views) over it."""
    while node is not weight:
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return True


def activation_inputs(linear: Node, weight: Node) -> list[Node]:
    """The linear's tensor inputs that are not (views of) the prefetched weight."""
    return [
        n
        for n in linear.all_input_nodes
        if tensor_value(n) is not None and not _only_views_of(n, weight)
    ]


def insert_prefetch_joins(
    gm: GraphModule, join_devices: Collection[str], recompile: bool = True
) -> int:
    """Insert a join before the linear of every prefetch on a device in ``join_devices``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    joined = {n.args[0] for n in gm.graph.find_nodes(op="call_function", target=JOIN_OP)}
    count = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP)):
        weight = node.args[0]
        value = tensor_value(weight)
        if value is None or value.device.type not in join_devices or weight in joined:
            continue
        linear = by_name.get((node.meta.get(META_KEY) or {}).get("linear", ""))
        if linear is None:
            raise ValueError(f"{node.name}: a side-stream prefetch needs its linear to join")
        with gm.graph.inserting_before(linear):
            join = gm.graph.call_function(JOIN_OP, (weight, activation_inputs(linear, weight)))
        join.meta["val"] = None
        join.meta[META_KEY] = {"joins": node.name, "linear": linear.name}
        joined.add(weight)
        count += 1
    if count:
        finalize(gm, recompile)
    return count
