"""The driver: what runs on each post-autograd aten graph, in order, per target.

::

    npu:      plan_prefetches -> lower_npu                                   -> clean-up
    inductor: plan_prefetches -> lower_native -> relax_dependencies
              -> elide_hints -> insert_joins                                 -> clean-up
    eager:    plan_prefetches                                                -> clean-up

The bodies of higher-order ops (``torch.cond`` branches, nested compile regions) are graphs
of their own: :class:`fxprefetch.planner.GraphPlanner` runs the pipeline on each, with the
weight sources their call sites give and how often they run (``PassContext.runs``).

Only plain ``fxprefetch.prefetch`` nodes are lowered to ``prefetch_native`` (and joined where
they fork onto a side stream). Run-time-checked (``prefetch_in_range``) and by-name
(``fxprefetch.vllm_moe``) prefetches stay as they are: their kernels prefetch on the compute
stream, so they need no join, and they stay in the code, counting what really runs.

Every pass keeps one contract (:mod:`fxprefetch.passes.contract`): ``(gm, ctx) -> PassResult``,
with the passes it requires before it and those it conflicts with, which :func:`run_passes`
checks once per sequence. Passes never lint nor regenerate code: the driver lints after each
pass that changed the graph, checks the invariants after every pass where
``FXPREFETCH_CHECK_INVARIANTS=1`` (:mod:`fxprefetch.passes.invariants`), and regenerates the
code at the end where the target needs it (inductor does that itself).
:func:`run_pipeline` returns a :class:`CompileReport`, which flows forward to whoever needs
it: the plan registry behind ``last_plans()``, and the stats wrapping of the compiled graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch.fx import GraphModule

from fxprefetch.passes.contract import GraphPass, PassContext, PassResult, check_order
from fxprefetch.passes.elide_hints import elide_hints
from fxprefetch.passes.insert_joins import insert_joins
from fxprefetch.passes.invariants import check_invariants, hand_placed, invariants_enabled
from fxprefetch.passes.lower_native import lower_native
from fxprefetch.passes.lower_npu import lower_npu
from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.passes.relax_dependencies import relax_dependencies
from fxprefetch.plan import PrefetchPlan

__all__ = [
    "EAGER_PASSES",
    "INDUCTOR_PASSES",
    "NPU_PASSES",
    "PIPELINES",
    "RECOMPILES",
    "TARGETS",
    "CompileReport",
    "GraphPass",
    "PassContext",
    "PassResult",
    "describe_lowering",
    "run_passes",
    "run_pipeline",
]

NPU_PASSES: tuple[GraphPass, ...] = (plan_prefetches, lower_npu)
INDUCTOR_PASSES: tuple[GraphPass, ...] = (
    plan_prefetches,
    lower_native,
    relax_dependencies,
    elide_hints,
    insert_joins,
)
EAGER_PASSES: tuple[GraphPass, ...] = (plan_prefetches,)

PIPELINES: Mapping[str, tuple[GraphPass, ...]] = {
    "npu": NPU_PASSES,
    "inductor": INDUCTOR_PASSES,
    "eager": EAGER_PASSES,
}
# inductor regenerates the code after its post-grad passes; the others run gm.forward
RECOMPILES: Mapping[str, bool] = {"npu": True, "inductor": False, "eager": True}
TARGETS = tuple(PIPELINES)  # each entry of fxprefetch.targets.TARGETS runs one of these

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
        return next(r.plan for r in self.results if r.plan is not None)

    def changed(self, name: str) -> int:
        return sum(r.changed for r in self.results if r.name == name)

    @property
    def hints_elided(self) -> bool:
        """The compiled code carries no prefetch: its planned hints are counted per call."""
        return self.changed("elide_hint_prefetches") > 0


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


def run_pipeline(gm: GraphModule, target: str, ctx: PassContext) -> CompileReport:
    """Run the target's passes in order on ``gm`` (in place), then the clean-up."""
    if target not in PIPELINES:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    results = run_passes(gm, PIPELINES[target], ctx)
    if RECOMPILES[target] and any(r.changed for r in results):
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
