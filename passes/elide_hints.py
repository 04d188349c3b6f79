"""Drop prefetches that are only hints on their device, for compiled code.

On a device without a hardware prefetch (the CPU, or any device not in the context's
``native_devices``) a prefetch does nothing but cost a call from compiled code into Python.
An FX graph is straight-line, so every prefetch it holds would run exactly once per
execution: the backend counts them as planned hints at the graph call instead
(``fxprefetch.runtime_stats.record_hints``), and the compiled code carries none. Measured in
``benchmarks/bench_decode_latency.py``.

A body that runs a number of times known only at run time (a ``torch.cond`` branch, a loop
body) cannot be counted at the graph call: there each hint-only prefetch becomes
``fxprefetch.prefetch_hint`` instead, whose kernel counts one
planned hint each time it runs.

A graph with a prefetch whose run is decided at run time (``prefetch_in_range``: token
bounds on a symbolic token count) keeps its prefetches in the code; where every one of them
is only a hint, each becomes ``fxprefetch.prefetch_hint`` (the range checks keeping their
token bounds), which counts a planned hint when it runs (in range), as elided hints count.
A graph whose weight is found at run time (by layer name), or lowered to a native prefetch
already, keeps its prefetches as they are: their kernels count what really runs, so the
counts stay exact.
"""

from __future__ import annotations

from collections.abc import Collection

from torch.fx import GraphModule

from fxprefetch.ops import HINT_OP, PREFETCH_OP, RANGE_OP
from fxprefetch.passes.analysis.graph_utils import prefetch_nodes
from fxprefetch.passes.contract import PassContext, PassResult, graph_pass
from fxprefetch.passes.strip_prefetch import remove_prefetches


def hint_only(
    gm: GraphModule, native_devices: Collection[str], targets: Collection[object] = (PREFETCH_OP,)
) -> bool:
    """True when every prefetch of ``gm`` is a plain ``prefetch`` (or one of ``targets``) of a
    tensor on a device not in ``native_devices`` (none lowered to a native prefetch, checked
    at run time, found by name, or kept as a hint already)."""
    devices = set()
    for node in prefetch_nodes(gm.graph):
        if node.target not in targets:
            return False
        val = node.args[0].meta.get("val")
        devices.add(val.device.type if val is not None else "unknown")
    return bool(devices) and not devices & set(native_devices)


ELIDED = "removed"  # PassResult.mode: the prefetches are counted per graph call
KEPT_AS_HINTS = "kept as hints"  # ... each prefetch_hint counts itself when it runs


@graph_pass(requires=("plan_prefetches",))
def elide_hints(gm: GraphModule, ctx: PassContext) -> PassResult:
    """If every prefetch of ``gm`` is hint-only (:func:`hint_only` on ``ctx.devices.native``):
    remove them all, or where the graph runs a varying number of times (``ctx.runs`` None) or
    some are checked at run time (``prefetch_in_range``) turn them into
    ``fxprefetch.prefetch_hint`` calls that count themselves when they run (in range)."""
    counted_per_call = ctx.runs is not None  # else its hints count themselves when they run
    if counted_per_call and hint_only(gm, ctx.devices.native):
        return PassResult(remove_prefetches(gm), mode=ELIDED)
    # hints that run on some calls only (a body run a varying number of times, or token
    # bounds checked at run time): kept in the code, counting themselves when they run
    if not hint_only(gm, ctx.devices.native, (PREFETCH_OP, RANGE_OP)):
        return PassResult(0)
    nodes = [n for n in prefetch_nodes(gm.graph) if n.target in (PREFETCH_OP, RANGE_OP)]
    for node in nodes:  # the range op's arguments are the hint's (token bounds last)
        node.target = HINT_OP
    return PassResult(len(nodes), mode=KEPT_AS_HINTS)
