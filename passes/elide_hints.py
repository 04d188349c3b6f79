"""Drop prefetches that are only hints on their device, for compiled code.

On a device without a hardware prefetch (the CPU, or any device not in the context's
``native_devices``) a prefetch does nothing but cost a call from compiled code into Python.
An FX graph is straight-line, so every prefetch it holds would run exactly once per
execution: the backend counts them as planned hints at the graph call instead
(``fxprefetch.runtime_stats.record_hints``), and the compiled code carries none. Measured in
``benchmarks/bench_decode_latency.py``.

A graph with a prefetch whose run is decided at run time (token bounds on a symbolic token
count) or whose weight is found at run time (by layer name) keeps its prefetches: their
kernels count what really runs, so the counts stay exact.
"""

from __future__ import annotations

from collections.abc import Collection

from torch.fx import GraphModule

from fxprefetch.ops import PREFETCH_OP
from passes.graph_utils import prefetch_nodes
from passes.strip_prefetch import strip_prefetch

META_KEY = "fxprefetch"


def hint_only(gm: GraphModule, native_devices: Collection[str]) -> bool:
    """True when every prefetch of ``gm`` is a plain ``prefetch`` of a tensor on a device not
    in ``native_devices``."""
    devices = set()
    for node in prefetch_nodes(gm.graph):
        if node.target is not PREFETCH_OP:
            return False
        val = node.args[0].meta.get("val")
        devices.add(val.device.type if val is not None else "unknown")
    return bool(devices) and not devices & set(native_devices)


def elide_hint_prefetches(
    gm: GraphModule, native_devices: Collection[str], recompile: bool = True
) -> int:
    """Remove the prefetches of ``gm`` if they are all hint-only; returns how many."""
    return strip_prefetch(gm, recompile) if hint_only(gm, native_devices) else 0
