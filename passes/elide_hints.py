"""Drop prefetches that are only hints on their device, for compiled code.

On a device without a hardware prefetch (the CPU; see ``fxprefetch.ops.has_native_prefetch``)
a prefetch does nothing but cost a call from compiled code into Python. An FX graph is
straight-line, so every prefetch it holds runs exactly once per execution: the backend counts
them at the graph call instead (``fxprefetch.runtime_stats.record_graph_call``), and the
compiled code carries none. Measured in ``benchmarks/bench_decode_latency.py``.
"""

from __future__ import annotations

from torch.fx import GraphModule

from fxprefetch.ops import PREFETCH_OP, has_native_prefetch
from passes.strip_prefetch import strip_prefetch


def hint_only(gm: GraphModule) -> bool:
    """True when no prefetch of ``gm`` targets a device with a hardware prefetch."""
    devices = set()
    for node in gm.graph.find_nodes(op="call_function", target=PREFETCH_OP):
        val = node.args[0].meta.get("val")
        devices.add(val.device.type if val is not None else "unknown")
    return bool(devices) and not any(has_native_prefetch(d) for d in devices)


def elide_hint_prefetches(gm: GraphModule, recompile: bool = True) -> int:
    """Remove the prefetches of ``gm`` if they are all hint-only; returns how many."""
    return strip_prefetch(gm, recompile) if hint_only(gm) else 0
