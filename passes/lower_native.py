"""Lower prefetches on devices with a native L2 prefetch (CUDA) to ``fxprefetch.prefetch_native``,
in an order inductor's scheduler cannot change.

Inductor orders nodes by their data dependencies only, and its peak-memory reordering (BFS,
DFS, LPMF) moves a node that has none anywhere. So the lowered node carries real ones: it is
declared to mutate (it writes nothing) an ``order`` list of

- the prefetch's dependency, where that is a buffer the graph computes: every later reader
  of it, so every op of the window, then runs after the prefetch;
- for the side stream, a fresh zero-size token, which only this prefetch's join mutates
  next (``passes/insert_joins.py``): the join follows its fork, and every join has
  exactly one fork.

Inductor's graph partitioning (on by default, for CUDA graphs) runs the graph as separate
captures split at the nodes it cannot capture; a fork in one and its join in the next would
break both. Where the graph holds such a node (:func:`partition_points`), the pipeline lowers its
prefetches to the compute stream instead: no fork, no join, nothing to split.

A graph input is never declared mutated (inductor would copy it back, and CUDA graphs would
be skipped): where the dependency is one, the prefetch depends on nothing, and every order
inductor has keeps a node without inputs early. The dependency operand is gone after this
pass (like ``relax_dependencies`` for hints), so no buffer is materialized for it.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from fxprefetch.ops import HINT_OP, NATIVE_OP, PREFETCH_OP, prepare_native
from fxprefetch.passes.analysis.graph_utils import prefetch_nodes, tensor_value
from fxprefetch.passes.analysis.native_lowering import lower_to_native
from fxprefetch.passes.analysis.prefetch_meta import prefetch_meta
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass


def _partitioning() -> bool:
    """Whether inductor splits this compile into captured partitions."""
    from torch._inductor import config
    from torch._inductor import utils as inductor_utils

    wrapper = getattr(getattr(inductor_utils, "_unstable_customized_partition_wrapper", None),
                      "wrapper", None)  # fmt: skip
    cudagraphs = bool(config.triton.cudagraphs) or wrapper is not None
    return bool(getattr(config, "graph_partition", False)) and cudagraphs


def partition_points(gm: GraphModule, device_type: str) -> list[str]:
    """Nodes at which inductor's graph partitioning may split ``gm`` (where it partitions):
    ops named in ``custom_should_partition_ops``, ops it cannot capture, control flow,
    data-dependent sizes, and tensors on another device than ``device_type``."""
    if not _partitioning():
        return []
    from torch._inductor import config
    from torch._inductor import utils as inductor_utils

    custom = set(getattr(config, "custom_should_partition_ops", None) or ())
    unsafe = getattr(inductor_utils, "is_cudagraph_unsafe_fx_node", None)
    points = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        names = set()
        if isinstance(target, torch._ops.OpOverload):
            names = {target.name(), f"{target.name()}.{target._overloadname}"}
        value = tensor_value(node)
        if (
            names & custom
            or isinstance(target, torch._ops.HigherOrderOperator)
            or node.meta.get("unbacked_bindings")
            or (value is not None and value.device.type != device_type)
            or (unsafe is not None and _safely(unsafe, node))
        ):
            points.append(node.name)
    return points


def _safely(check: object, node: Node) -> bool:
    try:
        return bool(check(node))  # type: ignore[operator]
    except Exception:  # an inductor helper that expects more than a post-grad node holds
        return False


@graph_pass(requires=("plan_prefetches",), conflicts=("relax_dependencies",))
def lower_native(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Retarget each plain prefetch on a device in ``ctx.devices.l2`` (and
    ``ctx.devices.native``) to ``fxprefetch.prefetch_native``: on the side stream where the
    device is in ``ctx.devices.joins`` and the graph has no :func:`partition_points`, else on
    the compute stream. Then make the native kernels ready (compiled, streams made) for every
    device they run on, before any capture."""
    setup = ctx.devices
    devices = setup.l2 & setup.native
    joins = {d for d in setup.joins if d in devices and not partition_points(gm, d)}
    lowered = lower_to_native(gm.graph, devices, joins, setup.cache_hint)
    used = {
        n.args[0].meta["val"].device
        for n in gm.graph.find_nodes(op="call_function", target=NATIVE_OP)
    }
    used |= _compute_stream_devices(gm, devices)
    for device in sorted(used, key=str):
        prepare_native(device)
    return PassResult(lowered)


def _compute_stream_devices(gm: GraphModule, l2_devices: frozenset[str]) -> set[torch.device]:
    """Devices in ``l2_devices`` of the prefetches left unlowered (run-time-checked, by name):
    their kernels launch the native prefetch on the compute stream, also inside a capture."""
    found: set[torch.device] = set()
    for node in prefetch_nodes(gm.graph):
        if node.target in (PREFETCH_OP, NATIVE_OP, HINT_OP):
            continue
        weight = node.args[0] if node.args else None
        value = tensor_value(weight) if isinstance(weight, Node) else None
        if value is not None:
            device = value.device
        else:  # a weight found by name: the device type the pass recorded
            meta = prefetch_meta(node)
            recorded = meta.device if meta is not None else None
            device = torch.device(recorded) if recorded is not None else None
        if device is not None and device.type in l2_devices:
            found.add(device)
    return found
