"""Join each side-stream prefetch before the linear that reads its weight.

A ``fxprefetch.prefetch_native`` node on the side stream forks: the side stream waits for
the compute stream there. ``fxprefetch.prefetch_join(weight, order)`` makes the compute
stream wait for the side stream; this pass puts one right before the linear of **each**
such node (a weight read by two linears has two forks and gets two joins), so every fork
rejoins inside the graph, as CUDA-graph (and NPU-graph) capture needs. It follows whichever
pass made the side-stream nodes: ``lower_native`` (CUDA) or ``lower_npu`` (Ascend).

``order`` holds what the join is declared to mutate (it writes nothing), so that inductor's
scheduler keeps, whatever order it picks:

- the fork's token (``passes/lower_native.py``): the join after its own fork;
- the linear's activation inputs that the graph computes: the join after the window's
  lazily computed tail, and the GEMM, which reads them, after the join.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from fxprefetch.ops import FORK_OPS, JOIN_OP
from fxprefetch.passes.analysis.graph_utils import get_arg, is_side_fork, tensor_value
from fxprefetch.passes.analysis.native_lowering import graph_owned
from fxprefetch.passes.analysis.prefetch_meta import JoinMeta, join_meta, prefetch_meta, set_meta
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass
from fxprefetch.passes.invariants import FORKS_JOINED


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


@graph_pass(requires_any=("lower_native", "lower_npu"), ensures=(FORKS_JOINED,))
def insert_joins(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Insert a join before the linear of every side-stream fork (``prefetch_native``, and
    the fork ops of ``fxprefetch.ops.FORK_OPS``). A fork whose weight is found by name when
    it runs joins on its token (on the weight's device: the join only needs the device)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    joined = {
        meta.joins
        for n in gm.graph.find_nodes(op="call_function", target=JOIN_OP)
        if (meta := join_meta(n)) is not None
    }
    count = 0
    forks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in FORK_OPS]
    for node in forks:
        if not is_side_fork(node) or node.name in joined:
            continue
        meta = prefetch_meta(node)
        linear = by_name.get(meta.linear) if meta is not None else None
        if linear is None:
            raise ValueError(f"{node.name}: a side-stream prefetch needs its linear to join")
        token = get_arg(node, "order")[0]
        weight = get_arg(node, "weight")
        if not isinstance(weight, Node) or tensor_value(weight) is None:
            weight = token
        after = [n for n in activation_inputs(linear, weight) if graph_owned(n)]
        with gm.graph.inserting_before(linear):
            join = gm.graph.call_function(JOIN_OP, (weight, [token, *after]))
        join.meta["val"] = None
        set_meta(join, JoinMeta(joins=node.name, linear=linear.name))
        count += 1
    return PassResult(count)
