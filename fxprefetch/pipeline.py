"""The driver: runs a target's pipeline on each post-autograd aten graph, in order.

A :class:`Pipeline` is a value: a target's passes in order, whether the driver regenerates
the code after them, and how the plan describes what the prefetches became. Each target
module defines its own (``fxprefetch.targets.npu.PIPELINE`` and so on); the driver lists no
target. The built-in ones::

    npu:      plan_prefetches -> lower_npu                                   -> clean-up
    inductor: plan_prefetches -> lower_native -> relax_dependencies
              -> elide_hints -> insert_joins                                 -> clean-up
    eager:    plan_prefetches                                                -> clean-up

The bodies of higher-order ops (``torch.cond`` branches, nested compile regions) are graphs
of their own: :class:`fxprefetch.planner.GraphPlanner` runs the pipeline on each, with the
weight sources their call sites give and how often they run (``PassContext.runs``).

Every pass keeps one contract (:mod:`fxprefetch.passes.contract`): ``(gm, ctx) -> PassResult``,
with the passes it requires before it and those it conflicts with; a pipeline's order is
checked when it is built. Passes never lint nor regenerate code: the driver lints after each
pass that changed the graph, checks the invariants after every pass where
``FXPREFETCH_CHECK_INVARIANTS=1`` (:mod:`fxprefetch.passes.invariants`), and regenerates the
code at the end where the pipeline says so (inductor does that itself).
:func:`run_pipeline` returns a :class:`CompileReport`, which flows forward to whoever needs
it: the plan registry behind ``last_plans()``, and the stats wrapping of the compiled graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch.fx import GraphModule

from fxprefetch.passes.analysis.prefetch_meta import prefetch_meta
from fxprefetch.passes.contract import GraphPass, PassContext, PassResult, check_order
from fxprefetch.passes.invariants import check_invariants, hand_placed, invariants_enabled
from fxprefetch.plan import PrefetchPlan

__all__ = [
    "CompileReport",
    "GraphPass",
    "PassContext",
    "PassResult",
    "Pipeline",
    "run_passes",
    "run_pipeline",
]

_ordered: set[tuple[GraphPass, ...]] = set()  # sequences check_order accepted


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
        found = next((r.plan for r in self.results if r.plan is not None), None)
        if found is None:
            ran = [r.name for r in self.results]
            raise ValueError(f"no pass of the {self.target} pipeline made a plan (ran {ran})")
        return found

    def changed(self, name: str) -> int:
        return sum(r.changed for r in self.results if r.name == name)

    @property
    def hints_elided(self) -> bool:
        """The compiled code carries no prefetch: its planned hints are counted per call."""
        return self.changed("elide_hint_prefetches") > 0


LoweringNote = Callable[[CompileReport, PassContext], str | None]


def _no_note(report: CompileReport, ctx: PassContext) -> str | None:
    return None


@dataclass(frozen=True)
class Pipeline:
    """One target's passes, in order, and what the driver does around them.

    ``recompiles``: the driver regenerates ``gm.code`` after the passes (False where the
    compiler does it itself, as inductor does after its post-grad passes). ``lowering_note``:
    what the plan's prefetches became in the compiled code, for the plan (asked only where the
    plan prefetches something). The order is checked when the pipeline is built.
    """

    target: str
    passes: tuple[GraphPass, ...]
    recompiles: bool = True
    lowering_note: LoweringNote = _no_note

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target:
            raise ValueError(f"Pipeline.target: expected a target's name, got {self.target!r}")
        object.__setattr__(self, "passes", tuple(self.passes))
        if not self.passes:
            raise ValueError(f"pipeline {self.target!r} has no pass; it needs a planning pass")
        for graph_pass in self.passes:
            if not isinstance(graph_pass, GraphPass):
                raise TypeError(
                    f"pipeline {self.target!r}: {graph_pass!r} is not a declared pass; "
                    "decorate a (gm, ctx) -> PassResult function with @graph_pass"
                )
        names = [p.name for p in self.passes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"pipeline {self.target!r} runs {repeated[0]!r} twice: {names}")
        check_order(self.passes)

    def with_passes(self, passes: Sequence[GraphPass]) -> Pipeline:
        """This pipeline running ``passes`` instead (order checked)."""
        return replace(self, passes=tuple(passes))

    def key(self) -> dict[str, Any]:
        """What identifies the pipeline in a cache key (the passes' sources are added by
        :meth:`fxprefetch.compile_setup.CompileSetup.cache_key`)."""
        return {
            "target": self.target,
            "passes": [p.name for p in self.passes],
            "recompiles": self.recompiles,
        }


def run_passes(
    gm: GraphModule, passes: Sequence[GraphPass], ctx: PassContext
) -> tuple[PassResult, ...]:
    """Run ``passes`` in order on ``gm`` (in place): their order checked (once per sequence),
    the graph linted after each that changed it, the invariants checked after each where
    enabled. Leaves ``gm.code`` to the caller."""
    passes = tuple(passes)
    if passes not in _ordered:
        check_order(passes)
        _ordered.add(passes)
    checking = invariants_enabled()
    given = hand_placed(gm.graph) if checking else frozenset()
    results = []
    for i, graph_pass in enumerate(passes):
        result = graph_pass(gm, ctx)
        if result.changed:
            gm.graph.lint()
        if checking:
            ran = [p.name for p in passes[: i + 1]]
            check_invariants(gm, ctx, graph_pass.name, ran=ran, given=given)
        results.append(result)
    return tuple(results)


#: the lowering of a plan that prefetches nothing (no weight planned, or all out of range)
NOTHING_LOWERED = "none: the plan prefetches no weight in this graph"


def run_pipeline(gm: GraphModule, pipeline: Pipeline, ctx: PassContext) -> CompileReport:
    """Run the pipeline's passes in order on ``gm`` (in place), then the clean-up."""
    results = run_passes(gm, pipeline.passes, ctx)
    if pipeline.recompiles and any(r.changed for r in results):
        gm.recompile()
    report = CompileReport(pipeline.target, results, ctx.runs)
    if report.plan.prefetched:
        report.plan.lowering = pipeline.lowering_note(report, ctx)
        _record_lowerings(gm, report.plan)
    else:  # said, never left unset
        report.plan.lowering = NOTHING_LOWERED
    return report


def _record_lowerings(gm: GraphModule, plan: PrefetchPlan) -> None:
    """Copy each prefetch node's lowering (``PrefetchMeta.lowering``) into its record."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, record in enumerate(plan.records):
        node = nodes.get(record.prefetch_node) if record.prefetch_node else None
        meta = prefetch_meta(node) if node is not None else None
        if meta is not None and meta.lowering is not None:
            plan.records[i] = replace(record, lowering=meta.lowering)
