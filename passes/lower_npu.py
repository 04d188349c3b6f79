"""Lower ``fxprefetch.prefetch`` for Ascend: one lowering per graph mode.

- GE graph (torchair ``max-autotune``): ``npu.npu_prefetch``, which torchair converts into
  the GE ``Cmo`` op with a control edge from its dependency; GE runs it on a stream of its
  own. Both ops share one schema, so the rewrite only changes the target. A prefetch without
  a dependency is an error here, before GE sees it.
- a graph captured op by op (aclgraph, npugraph_ex): ``fxprefetch.prefetch_native`` on the
  prefetch stream (``stream="side"``), with the CUDA lowering's ordering tokens
  (``analysis.native_lowering.lower_to_native``); ``insert_joins`` then joins each before
  its linear.
  Its kernels fork and join on the NPU (``fxprefetch.devices.npu_streams``).
- ``ascend_lowering="in_stream"`` (experiments): ``npu.npu_prefetch`` queued in the
  captured compute stream, as before the prefetch stream existed.

Prefetches decided at run time (``prefetch_in_range``, the by-name ``prefetch_layer_weight``)
are not forked yet: their kernels issue ``npu_prefetch`` in the current stream, and their
records say :data:`ASCEND_IN_STREAM`.

Each lowered node's record says which (:data:`ASCEND_CMO`, :data:`ASCEND_SIDE_STREAM`,
:data:`ASCEND_IN_STREAM`); the plan's records carry it (``LinearRecord.lowering``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.fx import GraphModule, Node

from fxprefetch.devices.setup import ASCEND_LOWERINGS
from fxprefetch.errors import NpuLoweringError
from fxprefetch.ops import PREFETCH_OP, PREFETCH_OPS, native_l2_devices, prepare_native
from fxprefetch.passes.analysis.graph_utils import get_arg, tensor_value
from fxprefetch.passes.analysis.native_lowering import lower_to_native
from fxprefetch.passes.analysis.prefetch_meta import prefetch_meta, set_meta
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass

ASCEND_CMO = "ascend_cmo"  # GE: npu_prefetch -> Cmo, control edge from its dependency
ASCEND_SIDE_STREAM = "ascend_side_stream"  # captured: forked onto the prefetch stream, joined
ASCEND_IN_STREAM = "ascend_in_stream"  # captured: npu_prefetch in the compute stream


def npu_prefetch_op() -> torch._ops.OpOverload:
    """``torch.ops.npu.npu_prefetch.default``; raises when torch_npu (or a stand-in) is absent."""
    try:
        return torch.ops.npu.npu_prefetch.default
    except (AttributeError, RuntimeError) as exc:
        raise NpuLoweringError(
            "torch.ops.npu.npu_prefetch is not registered: install torch_npu (with CANN) to lower "
            "prefetches for the NPU"
        ) from exc


def ascend_lowering(ctx: PassContext) -> str:
    """The lowering of this graph's prefetches: :data:`ASCEND_CMO` in a GE graph, else
    :data:`ASCEND_SIDE_STREAM`, or :data:`ASCEND_IN_STREAM` where the option asks for it."""
    if ctx.devices.ascend_lowering not in ASCEND_LOWERINGS:
        raise ValueError(
            f"ascend_lowering: expected one of {list(ASCEND_LOWERINGS)}, "
            f"got {ctx.devices.ascend_lowering!r}"
        )
    if ctx.npu_graph_engine:
        return ASCEND_CMO
    return ASCEND_SIDE_STREAM if ctx.devices.ascend_lowering == "side_stream" else ASCEND_IN_STREAM


@graph_pass(requires=("plan_prefetches",), conflicts=("relax_dependencies",))
def lower_npu(gm: GraphModule, ctx: PassContext) -> PassResult:
    """The npu lowering pass, one lowering per graph (:func:`ascend_lowering`): a GE graph
    (``ctx.npu_graph_engine``) or ``in_stream`` get :func:`lower_prefetch_to_npu`; a captured
    graph :func:`lower_prefetch_to_stream`. It needs the dependencies relaxing drops."""
    lowering = ascend_lowering(ctx)
    nodes = list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))
    if lowering == ASCEND_SIDE_STREAM:
        count = lower_prefetch_to_stream(gm, ctx.devices.cache_hint)
    else:
        count = lower_prefetch_to_npu(gm, graph_engine=ctx.npu_graph_engine)
    for node in nodes:  # all or nothing: every one was lowered
        meta = prefetch_meta(node)
        if meta is not None:
            set_meta(node, replace(meta, lowering=lowering))
    # prefetches decided at run time (token bounds, weights found by name) keep their own
    # kernels, which issue npu_prefetch in the current stream: not yet on the prefetch stream
    for node in gm.graph.nodes:
        meta = prefetch_meta(node) if node.op == "call_function" else None
        if meta is not None and meta.lowering is None and node.target in PREFETCH_OPS:
            set_meta(node, replace(meta, lowering=ASCEND_IN_STREAM))
    return PassResult(count)


def lower_prefetch_to_stream(gm: GraphModule, cache_hint: str = "none") -> int:
    """Retarget every ``fxprefetch.prefetch`` node to ``prefetch_native`` on the prefetch
    stream (forks, with their tokens); returns the count. ``insert_joins`` joins them.

    All or nothing, like :func:`lower_prefetch_to_npu`. Each weight's device type needs the
    prefetch stream registered for it (``npu_streams.register_npu_streams``): a prefetch whose
    kernel would find none is refused here, never dropped when it runs.
    """
    nodes = list(gm.graph.find_nodes(op="call_function", target=PREFETCH_OP))
    devices: dict[str, torch.device] = {}
    for node in nodes:
        value = tensor_value(node.args[0]) if isinstance(node.args[0], Node) else None
        if value is None:
            raise NpuLoweringError(f"{node.name}: a prefetch whose weight is not a tensor")
        devices.setdefault(value.device.type, value.device)
    missing = sorted(set(devices) - native_l2_devices())
    if missing:
        raise NpuLoweringError(
            f"no Ascend prefetch stream for {missing[0]} tensors: torch_npu's stream runtime "
            "is not loaded (fxprefetch.devices.npu_streams.register_npu_streams); use "
            "ascend_lowering 'in_stream' or load torch_npu"
        )
    count = lower_to_native(gm.graph, set(devices), set(devices), cache_hint)
    for device in devices.values():
        prepare_native(device)
    return count


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
