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
``FXPREFETCH_CHECK_INVARIANTS=1`` (:mod:`fxprefetch.passes.invariants`: those of every graph,
and those the passes run so far ``ensures``), and regenerates the code at the end where the
pipeline says so (inductor does that itself). It speaks for each pass: it stamps the pass's
name on its result, logs it at debug (name, nodes changed, time), and re-raises a pass's
failure as :class:`~fxprefetch.errors.PassFailedError` naming the pass and those before it.
:func:`run_pipeline` returns a :class:`CompileReport`, which flows forward to whoever needs
it: the plan registry behind ``last_plans()``, and the stats wrapping of the compiled graph.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch.fx import GraphModule

from fxprefetch.config import WeightPrefetchConfig
from fxprefetch.errors import PassFailedError
from fxprefetch.passes.analysis.prefetch_meta import prefetch_meta
from fxprefetch.passes.contract import GraphPass, PassContext, PassResult, check_order
from fxprefetch.passes.elide_hints import ELIDED, KEPT_AS_HINTS, elide_hints
from fxprefetch.passes.invariants import check_invariants, hand_placed, invariants_enabled
from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.passes.tables.rules import PrefetchRules, current_rules
from fxprefetch.plan import PrefetchPlan

__all__ = [
    "CompileReport",
    "GraphPass",
    "PassContext",
    "PassResult",
    "Pipeline",
    "run_passes",
    "run_pipeline",
    "run_weight_prefetch",
]

logger = logging.getLogger(__name__)

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

    def changed(self, graph_pass: GraphPass) -> int:
        """The nodes ``graph_pass`` changed (0 where it did not run)."""
        if not isinstance(graph_pass, GraphPass):
            raise TypeError(f"changed: expected a pass (@graph_pass), got {graph_pass!r}")
        return sum(r.changed for r in self.results if r.name == graph_pass.name)

    def _elided(self, mode: str) -> bool:
        return any(
            r.name == elide_hints.name and r.mode == mode and r.changed for r in self.results
        )

    @property
    def hints_elided(self) -> bool:
        """The compiled code carries no prefetch: its planned hints are counted per call
        (``elide_hints`` removed them from a graph that runs a known number of times)."""
        return self.runs is not None and self._elided(ELIDED)

    @property
    def hints_kept(self) -> bool:
        """The compiled code keeps its hints as ``prefetch_hint`` calls that count themselves
        when they run (a body run a varying number of times, or run-time token checks)."""
        return self._elided(KEPT_AS_HINTS)


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
    each pass's name stamped on its result and logged at debug with what it changed and its
    time, the graph linted after each that changed it, the invariants checked after each
    where enabled. A pass that fails raises :class:`PassFailedError` naming it and the passes
    before it (an :class:`InvariantError` passes through: it names the pass already). Leaves
    ``gm.code`` to the caller."""
    passes = tuple(passes)
    if passes not in _ordered:
        check_order(passes)
        _ordered.add(passes)
    checking = invariants_enabled()
    given = hand_placed(gm.graph) if checking else frozenset()
    results = []
    for i, graph_pass in enumerate(passes):
        start = time.perf_counter()
        try:
            result = replace(graph_pass(gm, ctx), name=graph_pass.name)
            if result.changed:
                gm.graph.lint()
        except Exception as exc:
            before = ", ".join(p.name for p in passes[:i]) or "none"
            raise PassFailedError(
                f"pass {graph_pass.name!r} failed (passes run before it: {before}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        logger.debug(
            "%s: pass %s changed %d nodes in %.2f ms",
            ctx.graph_name,
            graph_pass.name,
            result.changed,
            (time.perf_counter() - start) * 1e3,
        )
        if checking:
            check_invariants(gm, ctx, passes[: i + 1], given=given)
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


def run_weight_prefetch(
    gm: GraphModule,
    config: WeightPrefetchConfig,
    *,
    rules: PrefetchRules | None = None,
    graph_name: str = "graph",
    recompile: bool = True,
    **context: Any,
) -> PrefetchPlan:
    """The planning pass alone on ``gm``, run by the driver (:func:`run_passes`), for
    callers by hand: returns the plan; ``recompile`` regenerates ``gm.code``. ``context``:
    :class:`PassContext`'s other fields (``weight_names``, ``devices``...); ``rules``
    defaults to :func:`fxprefetch.passes.tables.rules.current_rules`."""
    ctx = PassContext(
        config=config,
        rules=rules if rules is not None else current_rules(),
        graph_name=graph_name,
        **context,
    )
    (result,) = run_passes(gm, (plan_prefetches,), ctx)
    if recompile and result.changed:
        gm.recompile()
    assert result.plan is not None
    return result.plan
