"""Lower ``fxprefetch.prefetch`` to torch_npu's ``npu.npu_prefetch`` for torchair/GE.

Both ops share one schema, so the rewrite only changes the target. torchair converts
``npu_prefetch`` into the GE ``Cmo`` op and needs a dependency: a prefetch without one is an
error here, before GE sees it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxprefetch.errors import NpuLoweringError
from fxprefetch.ops import PREFETCH_OP, PREFETCH_OPS
from fxprefetch.passes.analysis.graph_utils import get_arg
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass


def npu_prefetch_op() -> torch._ops.OpOverload:
    """``torch.ops.npu.npu_prefetch.default``; raises when torch_npu (or a stand-in) is absent."""
    try:
        return torch.ops.npu.npu_prefetch.default
    except (AttributeError, RuntimeError) as exc:
        raise NpuLoweringError(
            "torch.ops.npu.npu_prefetch is not registered: install torch_npu (with CANN) to lower "
            "prefetches for the NPU"
        ) from exc


@graph_pass(requires=("plan_prefetches",), conflicts=("relax_dependencies",))
def lower_npu(gm: GraphModule, ctx: PassContext) -> PassResult:
    """The npu lowering pass: :func:`lower_prefetch_to_npu`, for a GE graph where
    ``ctx.npu_graph_engine``. It needs the dependencies relaxing drops."""
    lowered = lower_prefetch_to_npu(gm, graph_engine=ctx.npu_graph_engine)
    return PassResult("lower_to_npu_prefetch", lowered)


def lower_prefetch_to_npu(gm: GraphModule, graph_engine: bool = False) -> int:
    """Retarget every ``fxprefetch.prefetch`` node to ``npu.npu_prefetch``; returns the count.
    Neither lints nor regenerates ``gm.code`` (the pipeline's driver does).

    All or nothing: every node is checked before any is changed, so a refusal leaves the graph
    as it was (for the caller to strip). ``graph_engine``: the graph becomes a GE graph, where
    only ``npu_prefetch`` converts; a prefetch decided at run time (a token bound on a
    symbolic count, a weight found by layer name) is refused there. Graphs that run their
    ops while captured (aclgraph, npugraph_ex) keep them.
    """
    target = npu_prefetch_op()
    torch.fx.node.has_side_effect(target)  # torch_npu does this too; stand-ins may not
    run_time = [op for op in PREFETCH_OPS if op is not PREFETCH_OP]
    if graph_engine:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in run_time:
                raise NpuLoweringError(
                    f"{node.name} ({node.target}): a prefetch decided at run time has no GE "
                    "converter; in a GE graph (torchair mode 'max-autotune') only npu_prefetch "
                    "can stay (use mode 'reduce-overhead' or static token counts)"
                )
    nodes = list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))
    for node in nodes:
        if get_arg(node, "dependency") is None:
            raise NpuLoweringError(
                f"{node.name} (prefetch of {get_arg(node, 'self')}): npu_prefetch in graph mode "
                "needs a dependency, got None (torchair's Cmo converter refuses it); a prefetch "
                "called by hand in the model must pass the tensor it may start after"
            )
    for node in nodes:
        node.target = target
    return len(nodes)
