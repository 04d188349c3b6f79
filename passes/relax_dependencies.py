"""Drop the ``dependency`` operand of prefetches, for compilers that order by position.

The dependency exists for torchair/GE, where it becomes a control edge into ``Cmo``. In
inductor it is a data edge: it forces the dependency's buffer to be materialized and splits
the fused kernel that would have computed it (measured in ``benchmarks/bench_decode_latency.py``).
Inductor emits side-effecting calls in graph order, and the pass already put each prefetch
right after its dependency, so the operand carries no information there.
"""

from __future__ import annotations

from torch.fx import GraphModule

from fxprefetch.ops import PREFETCH_OP
from passes.graph_utils import finalize


def relax_prefetch_dependencies(gm: GraphModule, recompile: bool = True) -> int:
    """Set the dependency of every ``fxprefetch.prefetch`` node to None; returns the count."""
    count = 0
    for node in gm.graph.find_nodes(op="call_function", target=PREFETCH_OP):
        if len(node.args) > 1 and node.args[1] is not None:
            node.args = (node.args[0], None, *node.args[2:])
            count += 1
    if count:
        finalize(gm, recompile)
    return count
