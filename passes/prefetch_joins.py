"""Join each side-stream prefetch before the linear that reads its weight.

Where a device's native prefetch runs on a side stream (CUDA), the prefetch node forks: the
side stream waits for the compute stream at the prefetch's position, right after its
dependency. ``fxprefetch.prefetch_join(weight)`` makes the compute stream wait for the side
stream; this pass puts one right before each such prefetch's linear, so the join comes after
every op of the window and every fork rejoins inside the graph (CUDA-graph capture needs it).
"""

from __future__ import annotations

from collections.abc import Collection

from torch.fx import GraphModule

from fxprefetch.ops import JOIN_OP, PREFETCH_OP
from passes.graph_utils import finalize, tensor_value
from passes.weight_prefetch import META_KEY


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
            join = gm.graph.call_function(JOIN_OP, (weight,))
        join.meta["val"] = None
        join.meta[META_KEY] = {"joins": node.name, "linear": linear.name}
        joined.add(weight)
        count += 1
    if count:
        finalize(gm, recompile)
    return count
