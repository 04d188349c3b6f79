"""Graphs lowered for a native prefetch device, the CPU standing in for a GPU: the inductor
target's pipeline on a two-layer ``SynthModel``, and the forks and joins it leaves."""

from __future__ import annotations

from collections.abc import Collection

from torch.fx import GraphModule, Node

from fxprefetch.devices import DeviceSetup
from fxprefetch.ops import JOIN_OP, NATIVE_OP

from support.tracing import run_synth_pipeline


def native_pipeline(join_devices: Collection[str], model=None, l2=frozenset({"cpu"})):
    """Run the inductor pipeline with the CPU as a native device; joins on ``join_devices``."""
    native = frozenset({"cpu"})
    devices = DeviceSetup(native=native, joins=frozenset(join_devices), l2=frozenset(l2))
    return run_synth_pipeline("inductor", devices=devices, model=model)


def forks_and_joins(gm: GraphModule) -> tuple[list[Node], list[Node]]:
    """The native prefetches (forks) and joins of ``gm``, in graph order."""
    forks = list(gm.graph.find_nodes(op="call_function", target=NATIVE_OP))
    joins = list(gm.graph.find_nodes(op="call_function", target=JOIN_OP))
    return forks, joins
