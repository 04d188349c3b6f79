"""Drop the ``dependency`` operand of prefetches, for compilers that order by position.

The dependency exists for torchair/GE, where it becomes a control edge into ``Cmo``. In
inductor it is a data edge: it forces the dependency's buffer to be materialized and splits
the fused kernel that would have computed it (measured in ``benchmarks/bench_decode_latency.py``).
Inductor emits side-effecting calls in graph order, and the pass already put each prefetch
right after its dependency, so the operand carries no information there.
"""

from __future__ import annotations

from torch.fx import GraphModule

from fxprefetch.ops import PREFETCH_OP, RANGE_OP
from fxprefetch.passes.analysis.graph_utils import get_arg, prefetch_nodes, set_arg
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass
from fxprefetch.passes.invariants import DEPENDENCIES_KEPT

# prefetches whose weight is a graph tensor; a by-name prefetch keeps its dependency, its only
# tensor argument (the op is dispatched on it)
RELAXED = (PREFETCH_OP, RANGE_OP)


@graph_pass(requires=("plan_prefetches",), relaxes=(DEPENDENCIES_KEPT,))
def relax_dependencies(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Set the dependency of every prefetch of a graph tensor to None; counts them."""
    count = 0
    for node in prefetch_nodes(gm.graph):
        if node.target in RELAXED and get_arg(node, "dependency") is not None:
            set_arg(node, "dependency", None)
            count += 1
    return PassResult(count)
