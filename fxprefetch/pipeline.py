"""What runs on each post-autograd aten graph, in order, per target.

::

    npu:      plan_prefetches -> lower_to_npu_prefetch                    -> clean-up
    inductor: plan_prefetches -> relax_dependencies -> elide_hint_prefetches
              -> insert_prefetch_joins                                       -> clean-up
    eager:    plan_prefetches                                             -> clean-up

Every pass has one signature, ``(gm, ctx) -> PassResult``: it takes the graph and a
:class:`PassContext` (everything it may read) and says what it changed. The clean-up lints
the graph and regenerates its code where the target needs it (inductor does that itself).
:func:`run_pipeline` returns a :class:`CompileReport`, which flows forward to whoever needs
it: the plan registry behind ``last_plans()``, and the stats wrapping of the compiled graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch.fx import GraphModule

from fxprefetch.config import TokenRange, WeightPrefetchConfig
from fxprefetch.plan import PrefetchPlan
from passes.elide_hints import elide_hint_prefetches
from passes.hidden_weights import HiddenWeightSource
from passes.lower_npu import lower_prefetch_to_npu
from passes.prefetch_joins import insert_prefetch_joins
from passes.relax_dependencies import relax_prefetch_dependencies
from passes.rules import PrefetchRules
from passes.weight_prefetch import run_weight_prefetch

TARGETS = ("npu", "inductor", "eager")


@dataclass(frozen=True)
class PassContext:
    """Everything a pass may read."""

    config: WeightPrefetchConfig
    rules: PrefetchRules
    graph_name: str
    weight_names: Mapping[str, str] | None = None  # placeholders that are parameters/buffers
    native_devices: frozenset[str] = frozenset()  # devices whose prefetch reaches hardware
    join_devices: frozenset[str] = frozenset()  # ... from a side stream that must be joined
    device_caps: Mapping[str, int] | None = None  # byte caps where the config writes none
    hidden_weights: HiddenWeightSource | None = None  # finds weights fused ops look up by name
    graph_tokens: TokenRange | None = None  # token counts the graph is compiled for


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
        recompile=False,
        hidden_weights=ctx.hidden_weights,
        graph_tokens=ctx.graph_tokens,
    )
    return PassResult("plan_prefetches", len(plan.prefetched), plan)


def lower_to_npu_prefetch(gm: GraphModule, ctx: PassContext) -> PassResult:
    return PassResult("lower_to_npu_prefetch", lower_prefetch_to_npu(gm, recompile=False))


def relax_dependencies(gm: GraphModule, ctx: PassContext) -> PassResult:
    return PassResult("relax_dependencies", relax_prefetch_dependencies(gm, recompile=False))


def elide_hints(gm: GraphModule, ctx: PassContext) -> PassResult:
    removed = elide_hint_prefetches(gm, ctx.native_devices, recompile=False)
    return PassResult("elide_hint_prefetches", removed)


def insert_joins(gm: GraphModule, ctx: PassContext) -> PassResult:
    return PassResult(
        "insert_prefetch_joins", insert_prefetch_joins(gm, ctx.join_devices, recompile=False)
    )


PIPELINES: Mapping[str, tuple[GraphPass, ...]] = {
    "npu": (plan_prefetches, lower_to_npu_prefetch),
    "inductor": (plan_prefetches, relax_dependencies, elide_hints, insert_joins),
    "eager": (plan_prefetches,),
}
# inductor regenerates the code after its post-grad passes; the others run gm.forward
RECOMPILES: Mapping[str, bool] = {"npu": True, "inductor": False, "eager": True}


@dataclass(frozen=True)
class CompileReport:
    """What the pipeline did to one graph."""

    target: str
    results: tuple[PassResult, ...]

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
    return CompileReport(target, results)
