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
follow the same rule: on the prefetch stream they become their fork op
(``fxprefetch.ops.SIDE_FORK_OF``: ``prefetch_native`` with its token bounds, the by-name
``prefetch_layer_weight_fork``), with a token and a join like every fork; the fork happens
always, the token count decides only whether it issues bytes, and a by-name weight is still
found when it runs. ``in_stream`` keeps their own kernels (``npu_prefetch`` in the current
stream, recorded :data:`ASCEND_IN_STREAM`); GE refuses them.

Each lowered node's record says which (:data:`ASCEND_CMO`, :data:`ASCEND_SIDE_STREAM`,
:data:`ASCEND_IN_STREAM`); the plan's records carry it (``LinearRecord.lowering``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.fx import GraphModule, Node

from fxprefetch.devices.setup import ASCEND_LOWERINGS
from fxprefetch.errors import NpuLoweringError
from fxprefetch.ops import (
    PREFETCH_OP,
    PREFETCH_OPS,
    SIDE_FORK_OF,
    native_l2_devices,
    prepare_native,
)
from fxprefetch.passes.analysis.graph_utils import get_arg, tensor_value
from fxprefetch.passes.analysis.native_lowering import graph_owned, lower_to_native, new_token
from fxprefetch.passes.analysis.prefetch_meta import TokenMeta, prefetch_meta, set_meta
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
        nodes += _run_time_prefetches(gm)
        count = lower_prefetch_to_stream(gm, ctx.devices.cache_hint)
    else:
        count = lower_prefetch_to_npu(gm, graph_engine=ctx.npu_graph_engine)
    for node in nodes:  # all or nothing: every one was lowered
        meta = prefetch_meta(node)
        if meta is not None:
            set_meta(node, replace(meta, lowering=lowering))
    # in_stream: prefetches decided at run time (token bounds, weights found by name) keep
    # their own kernels, which issue npu_prefetch in the current stream
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
    run_time = {node: _fork_device(node) for node in _run_time_prefetches(gm)}
    for device in run_time.values():
        devices.setdefault(device.type, device)
    missing = sorted(set(devices) - native_l2_devices())
    if missing:
        raise NpuLoweringError(
            f"no Ascend prefetch stream for {missing[0]} tensors: torch_npu's stream runtime "
            "is not loaded (fxprefetch.devices.npu_streams.register_npu_streams); use "
            "ascend_lowering 'in_stream' or load torch_npu"
        )
    count = lower_to_native(gm.graph, set(devices), set(devices), cache_hint)
    for node, device in run_time.items():
        _fork_run_time(gm, node, device, cache_hint)
    for device in devices.values():
        prepare_native(device)
    return count + len(run_time)


def _run_time_prefetches(gm: GraphModule) -> list[Node]:
    """The prefetches decided at run time that have a fork op (``ops.SIDE_FORK_OF``)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SIDE_FORK_OF]


def _fork_device(node: Node) -> torch.device:
    """The device a prefetch decided at run time prefetches on: its weight's, else (a weight
    found by name) its dependency's, else the device type its record names."""
    for name in ("weight", "dependency"):
        arg = get_arg(node, name)
        value = tensor_value(arg) if isinstance(arg, Node) else None
        if value is not None:
            return value.device
    meta = prefetch_meta(node)
    if meta is not None and meta.device is not None:
        return torch.device(meta.device)
    raise NpuLoweringError(f"{node.name} ({node.target}): a prefetch on no known device")


def _fork_run_time(gm: GraphModule, node: Node, device: torch.device, cache_hint: str) -> None:
    """Retarget ``node`` (a prefetch decided at run time) in place to its fork op on the
    prefetch stream: its arguments by name, ``order`` a fresh token then its dependency
    (where the graph computes it), as ``lower_native.lower_to_native`` does."""
    fork = SIDE_FORK_OF[node.target]
    weight, dependency = get_arg(node, "weight"), get_arg(node, "dependency")
    anchor = weight if isinstance(weight, Node) else dependency
    if isinstance(anchor, Node) and tensor_value(anchor) is not None:
        token = new_token(gm.graph, anchor, node)
    else:
        token = _token_on(gm, device, node)
    order = [token]
    if isinstance(dependency, Node) and graph_owned(dependency):
        order.append(dependency)
    given = {"order": order, "stream": "side", "cache_hint": cache_hint}
    args: list[object] = []
    kwargs: dict[str, object] = {}
    for arg in fork._schema.arguments:
        value = given[arg.name] if arg.name in given else get_arg(node, arg.name)
        if arg.has_default_value() or arg.kwarg_only:
            kwargs[arg.name] = value
        else:
            args.append(value)
    node.target = fork  # in place: the plan names this node
    node.args, node.kwargs = tuple(args), kwargs
    meta = prefetch_meta(node)
    if meta is not None:
        set_meta(node, replace(meta, stream="side"))
    set_meta(token, TokenMeta(token_of=node.name))


def _token_on(gm: GraphModule, device: torch.device, before: Node) -> Node:
    """A zero-size uint8 tensor on ``device``, where no tensor on it is at hand."""
    kwargs = {"dtype": torch.uint8, "device": device, "pin_memory": False}
    with gm.graph.inserting_before(before):
        token = gm.graph.call_function(torch.ops.aten.empty.memory_format, ([0],), kwargs)
    token.meta["val"] = torch.empty(0, dtype=torch.uint8, device="meta")
    return token


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
