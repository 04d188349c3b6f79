"""What runs on each post-autograd aten graph, in order, per target.

::

    npu:      plan_prefetches -> lower_to_npu_prefetch                    -> clean-up
    inductor: plan_prefetches -> lower_native_prefetches -> relax_dependencies
              -> elide_hint_prefetches -> insert_prefetch_joins              -> clean-up
    eager:    plan_prefetches                                             -> clean-up

The bodies of higher-order ops (``torch.cond`` branches, nested compile regions) are graphs
of their own: :class:`fxprefetch.planner.GraphPlanner` runs the pipeline on each, with the
weight sources their call sites give and how often they run (``PassContext.runs``).

Only plain ``fxprefetch.prefetch`` nodes are lowered to ``prefetch_native`` (and joined where
they fork onto a side stream). Run-time-checked (``prefetch_in_range``) and by-name
(``fxprefetch.vllm_moe``) prefetches stay as they are: their kernels prefetch on the compute
stream, so they need no join, and they stay in the code, counting what really runs.

Every pass has one signature, ``(gm, ctx) -> PassResult``: it takes the graph and a
:class:`PassContext` (everything it may read) and says what it changed. The clean-up lints
the graph and regenerates its code where the target needs it (inductor does that itself).
:func:`run_pipeline` returns a :class:`CompileReport`, which flows forward to whoever needs
it: the plan registry behind ``last_plans()``, and the stats wrapping of the compiled graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from fxprefetch.config import TokenRange, WeightPrefetchConfig
from fxprefetch.ops import HINT_OP, NATIVE_OP, PREFETCH_OP, prepare_native
from fxprefetch.passes.analysis.graph_utils import prefetch_nodes, tensor_value
from fxprefetch.passes.analysis.hidden_weights import HiddenWeightSource
from fxprefetch.passes.analysis.weight_sources import WeightSources
from fxprefetch.passes.elide_hints import elide_hint_prefetches, keep_hints_in_code
from fxprefetch.passes.insert_joins import insert_prefetch_joins
from fxprefetch.passes.lower_native import lower_native_prefetches, partition_points
from fxprefetch.passes.lower_npu import lower_prefetch_to_npu
from fxprefetch.passes.plan_prefetches import META_KEY, run_weight_prefetch
from fxprefetch.passes.relax_dependencies import relax_prefetch_dependencies
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.plan import PrefetchPlan
from fxprefetch.prediction import DeviceProfile


@dataclass(frozen=True)
class PassContext:
    """Everything a pass may read."""

    config: WeightPrefetchConfig
    rules: PrefetchRules
    graph_name: str
    # placeholders that are parameters/buffers (None: nothing is known, none is taken)
    weight_names: WeightSources | Mapping[str, str] | None = None
    native_devices: frozenset[str] = frozenset()  # devices whose prefetch reaches hardware
    join_devices: frozenset[str] = frozenset()  # ... from a side stream that must be joined
    device_caps: Mapping[str, int] | None = None  # byte caps where the config writes none
    native_l2: frozenset[str] = frozenset()  # native devices lowered to prefetch_native
    cache_hint: str = "none"  # the L2 cache hint of prefetch_native
    lowering: Mapping[str, str] | None = None  # device type -> what its prefetches become
    # device type -> the device's profile: window policy, "auto" sizes, predicted savings
    device_profiles: Mapping[str, DeviceProfile] | None = None
    split_at_attention: bool = False  # the caller splits graphs at attention (vLLM)
    runs: int | None = 1  # times the graph runs per call of the compiled graph; None: varies
    hidden_weights: HiddenWeightSource | None = None  # finds weights fused ops look up by name
    graph_tokens: TokenRange | None = None  # token counts the graph is compiled for
    # the npu graph becomes a GE graph (torchair "max-autotune"): GE converts npu_prefetch
    # only, so a prefetch decided at run time (token bounds, by-name weights) cannot stay
    npu_graph_engine: bool = False


@dataclass(frozen=True)
class PassResult:
    """What one pass changed: ``changed`` nodes inserted, retargeted or removed."""

    name: str
    changed: int
    plan: PrefetchPlan | None = None


GraphPass = Callable[[GraphModule, PassContext], PassResult]


def plan_prefetches(gm: GraphModule, ctx: PassContext) -> PassResult:
    """The planning pass: insert ``fxprefetch.prefetch`` nodes, return the plan."""
    plan = run_weight_prefetch(
        gm,
        ctx.config,
        weight_names=ctx.weight_names,
        rules=ctx.rules,
        graph_name=ctx.graph_name,
        device_caps=ctx.device_caps,
        device_profiles=ctx.device_profiles,
        split_at_attention=ctx.split_at_attention,
        recompile=False,
        hidden_weights=ctx.hidden_weights,
        graph_tokens=ctx.graph_tokens,
    )
    return PassResult("plan_prefetches", len(plan.prefetched), plan)


def lower_to_npu_prefetch(gm: GraphModule, ctx: PassContext) -> PassResult:
    lowered = lower_prefetch_to_npu(gm, recompile=False, graph_engine=ctx.npu_graph_engine)
    return PassResult("lower_to_npu_prefetch", lowered)


def lower_native(gm: GraphModule, ctx: PassContext) -> PassResult:
    devices = ctx.native_l2 & ctx.native_devices
    joins = {d for d in ctx.join_devices if d in devices and not partition_points(gm, d)}
    lowered = lower_native_prefetches(gm, devices, joins, ctx.cache_hint, recompile=False)
    used = {
        n.args[0].meta["val"].device
        for n in gm.graph.find_nodes(op="call_function", target=NATIVE_OP)
    }
    used |= _compute_stream_devices(gm, devices)
    for device in sorted(used, key=str):  # kernels compiled, streams made: before any capture
        prepare_native(device)
    return PassResult("lower_native_prefetches", lowered)


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
            recorded = (node.meta.get(META_KEY) or {}).get("device")
            device = torch.device(recorded) if recorded is not None else None
        if device is not None and device.type in l2_devices:
            found.add(device)
    return found


def relax_dependencies(gm: GraphModule, ctx: PassContext) -> PassResult:
    return PassResult("relax_dependencies", relax_prefetch_dependencies(gm, recompile=False))


def elide_hints(gm: GraphModule, ctx: PassContext) -> PassResult:
    if ctx.runs is None:  # runs only on some calls: its hints count themselves when they run
        kept = keep_hints_in_code(gm, ctx.native_devices, recompile=False)
        return PassResult("keep_hints_in_code", kept)
    removed = elide_hint_prefetches(gm, ctx.native_devices, recompile=False)
    return PassResult("elide_hint_prefetches", removed)


def insert_joins(gm: GraphModule, ctx: PassContext) -> PassResult:
    return PassResult("insert_prefetch_joins", insert_prefetch_joins(gm, recompile=False))


PIPELINES: Mapping[str, tuple[GraphPass, ...]] = {
    "npu": (plan_prefetches, lower_to_npu_prefetch),
    "inductor": (plan_prefetches, lower_native, relax_dependencies, elide_hints, insert_joins),
    "eager": (plan_prefetches,),
}
# inductor regenerates the code after its post-grad passes; the others run gm.forward
RECOMPILES: Mapping[str, bool] = {"npu": True, "inductor": False, "eager": True}
TARGETS = tuple(PIPELINES)  # each entry of fxprefetch.targets.TARGETS runs one of these


@dataclass(frozen=True)
class CompileReport:
    """What the pipeline did to one graph."""

    target: str
    results: tuple[PassResult, ...]
    runs: int | None = 1  # times the graph runs per call of the compiled graph; None: varies
    # per run (as many as ``runs``; empty: every run uses the plan's names): the plan's
    # weight name -> the weight that run reads (a region shared by layers: each layer's own)
    run_names: tuple[Mapping[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.run_names and len(self.run_names) != self.runs:
            raise ValueError(f"{len(self.run_names)} run_names for {self.runs} runs")

    def weights_per_run(self) -> tuple[Mapping[str, str], ...]:
        """One mapping per run (none when the runs vary): plan name -> the weight it reads."""
        if self.runs is None:
            return ()
        return tuple(self.run_names) or ({},) * self.runs

    @property
    def plan(self) -> PrefetchPlan:
        return next(r.plan for r in self.results if r.plan is not None)

    def changed(self, name: str) -> int:
        return sum(r.changed for r in self.results if r.name == name)

    @property
    def hints_elided(self) -> bool:
        """The compiled code carries no prefetch: its planned hints are counted per call."""
        return self.changed("elide_hint_prefetches") > 0


def run_pipeline(gm: GraphModule, target: str, ctx: PassContext) -> CompileReport:
    """Run the target's passes in order on ``gm`` (in place), then the clean-up."""
    if target not in PIPELINES:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    results = tuple(graph_pass(gm, ctx) for graph_pass in PIPELINES[target])
    if any(r.changed for r in results):
        gm.graph.lint()
        if RECOMPILES[target]:
            gm.recompile()
    report = CompileReport(target, results, ctx.runs)
    report.plan.lowering = describe_lowering(report, ctx)
    return report


def describe_lowering(report: CompileReport, ctx: PassContext) -> str | None:
    """What the plan's prefetches became in the compiled code, for the plan."""
    if not report.plan.prefetched:
        return None
    if report.target == "npu":
        return "npu_prefetch"
    if report.target == "eager":
        return "fxprefetch.prefetch, run eagerly"
    notes = dict(ctx.lowering or {})
    if report.changed("lower_native_prefetches"):
        devices = sorted(ctx.native_l2 & ctx.native_devices)
        if report.changed("insert_prefetch_joins") == 0 and ctx.join_devices & set(devices):
            notes = {
                d: f"{notes.get(d, '')}; on the compute stream instead: inductor partitions "
                "this graph for CUDA graphs at nodes between which a fork and its join could "
                "fall"
                for d in devices
            }
    elif report.hints_elided:
        return "hints, left out of the compiled code" + "".join(
            f"; {device}: {note}" for device, note in sorted(notes.items())
        )
    else:
        devices = sorted(ctx.native_devices)
    return "; ".join(f"{d}: {notes.get(d, 'fxprefetch.prefetch')}" for d in devices) or None
