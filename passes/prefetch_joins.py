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

from fxprefetch.ops import JOIN_OF
from passes.graph_utils import finalize, prefetch_nodes, tensor_value
from passes.weight_prefetch import META_KEY


def _only_views_of(node: Node, weight: Node) -> bool:
    """Whether ``node`` is ``weight`` or a chain of one-input ops (views) over it."""
    while node is not weight:
        inputs = node.all_input_nodes
        if len(inputs) != 1:
            return False
        node = inputs[0]
    return True


def activation_inputs(linear: Node, weight: Node | None) -> list[Node]:
    """The linear's tensor inputs that are not (views of) the prefetched weight (all of them
    for a weight found by name at run time)."""
    return [
        n
        for n in linear.all_input_nodes
        if tensor_value(n) is not None and (weight is None or not _only_views_of(n, weight))
    ]


def weight_key(node: Node) -> tuple:
    """The arguments of a prefetch that name its weight: those before ``dependency``."""
    names = [a.name for a in node.target._schema.arguments]
    return tuple(node.args[: names.index("dependency")])


def prefetch_device(node: Node) -> str | None:
    """The device type of a prefetch's weight: its tensor's, or the one the pass recorded
    for a weight found by name."""
    key = weight_key(node)
    value = tensor_value(key[0]) if key and isinstance(key[0], Node) else None
    if value is not None:
        return value.device.type
    return (node.meta.get(META_KEY) or {}).get("device")


def insert_prefetch_joins(
    gm: GraphModule, join_devices: Collection[str], recompile: bool = True
) -> int:
    """Insert a join before the linear of every prefetch on a device in ``join_devices``."""
    by_name = {n.name: n for n in gm.graph.nodes}
    joins = set(JOIN_OF.values())
    joined = {
        tuple(n.args[:-1]) for n in gm.graph.nodes if n.op == "call_function" and n.target in joins
    }
    count = 0
    for node in prefetch_nodes(gm.graph):
        key = weight_key(node)
        if prefetch_device(node) not in join_devices or key in joined:
            continue
        linear = by_name.get((node.meta.get(META_KEY) or {}).get("linear", ""))
        if linear is None:
            raise ValueError(f"{node.name}: a side-stream prefetch needs its linear to join")
        weight = key[0] if len(key) == 1 and tensor_value(key[0]) is not None else None
        with gm.graph.inserting_before(linear):
            join = gm.graph.call_function(
                JOIN_OF[node.target], (*key, activation_inputs(linear, weight))
            )
        join.meta["val"] = None
        join.meta[META_KEY] = {"joins": node.name, "linear": linear.name}
        joined.add(key)
        count += 1
    if count:
        finalize(gm, recompile)
    return count
