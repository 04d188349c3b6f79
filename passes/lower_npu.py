"""Lower ``fxprefetch.prefetch`` to torch_npu's ``npu.npu_prefetch`` for torchair/GE.

Both ops share one schema, so the rewrite only changes the target. torchair converts
``npu_prefetch`` into the GE ``Cmo`` op and needs a dependency: a prefetch without one is an
error here, before GE sees it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxprefetch.ops import PREFETCH_OP
from passes.graph_utils import finalize, get_arg


class NpuLoweringError(RuntimeError):
    """The graph cannot be lowered to ``npu.npu_prefetch``."""


def npu_prefetch_op() -> torch._ops.OpOverload:
    """``torch.ops.npu.npu_prefetch.default``; raises when torch_npu (or a stand-in) is absent."""
    try:
        return torch.ops.npu.npu_prefetch.default
    except (AttributeError, RuntimeError) as exc:
        raise NpuLoweringError(
            "torch.ops.npu.npu_prefetch is not registered: install torch_npu (with CANN) to lower "
            "prefetches for the NPU"
        ) from exc


def lower_prefetch_to_npu(gm: GraphModule, recompile: bool = True) -> int:
    """Retarget every ``fxprefetch.prefetch`` node to ``npu.npu_prefetch``; returns the count.

    All or nothing: every node is checked before any is changed, so a refusal leaves the graph
    as it was (for the caller to strip).
    """
    target = npu_prefetch_op()
    torch.fx.node.has_side_effect(target)  # torch_npu does this too; stand-ins may not
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
    if nodes:
        finalize(gm, recompile)
    return len(nodes)
