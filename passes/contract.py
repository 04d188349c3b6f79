"""The contract every graph pass keeps.

A pass is a function ``(gm, ctx) -> PassResult``: it reads the graph and a
:class:`PassContext` (everything it may read), changes the graph in place and says how much
it changed. It never lints nor regenerates ``gm.code``: the driver (``fxprefetch.pipeline``)
does both once, where needed. :func:`graph_pass` turns such a function into a
:class:`GraphPass` that declares which passes must have run before it (``requires``) and
which must not have (``conflicts``), and the invariants that hold after it (``ensures``,
checked after it and every later pass where checks are on, until a pass ``relaxes`` them);
:func:`check_order` checks a sequence of passes against those declarations. A pass has one
name, its own: the driver stamps it on the pass's :class:`PassResult`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from torch.fx import Graph, GraphModule

from fxprefetch.config import TokenRange, WeightPrefetchConfig
from fxprefetch.devices.setup import DeviceSetup
from fxprefetch.errors import PipelineOrderError
from fxprefetch.passes.analysis.hidden_weights import HiddenWeightSource
from fxprefetch.passes.analysis.weight_sources import WeightSources
from fxprefetch.passes.tables.rules import PrefetchRules
from fxprefetch.plan import PrefetchPlan


@dataclass(frozen=True)
class PassContext:
    """Everything a pass may read."""

    config: WeightPrefetchConfig
    rules: PrefetchRules
    graph_name: str
    # placeholders that are parameters/buffers (None: nothing is known, none is taken)
    weight_names: WeightSources | Mapping[str, str] | None = None
    # what the devices offer, as the compile's setup fixed it: native prefetches (``native``),
    # side-stream joins (``joins``), byte caps (``caps``), the native L2 lowering (``l2``,
    # ``cache_hint``), what each device's prefetches become (``lowering``), the profiles
    # (window policy, "auto" sizes, predicted savings), the Ascend lowering
    devices: DeviceSetup = field(default_factory=DeviceSetup)
    split_at_attention: bool = False  # the caller splits graphs at attention (vLLM)
    runs: int | None = 1  # times the graph runs per call of the compiled graph; None: varies
    hidden_weights: HiddenWeightSource | None = None  # finds weights fused ops look up by name
    graph_tokens: TokenRange | None = None  # token counts the graph is compiled for
    # the npu graph becomes a GE graph (torchair "max-autotune"): GE converts npu_prefetch
    # only, so a prefetch decided at run time (token bounds, by-name weights) cannot stay
    npu_graph_engine: bool = False


@dataclass(frozen=True)
class PassResult:
    """What one pass changed: ``changed`` nodes inserted, retargeted or removed. ``name``:
    the pass's, stamped by the driver (``fxprefetch.pipeline.run_passes``); a pass leaves it
    out."""

    changed: int
    plan: PrefetchPlan | None = None
    name: str = ""
    # how the pass changed the graph, where it has more than one way (``elide_hints``:
    # ELIDED, its prefetches removed, or KEPT_AS_HINTS, turned into counting hints)
    mode: str = ""


@dataclass(frozen=True)
class Invariant:
    """What holds of a graph after a pass that ``ensures`` it: ``check(graph, given)``
    returns the problems of ``graph`` (none: it holds), leaving out the prefetches named in
    ``given`` (the model's own)."""

    name: str
    check: Callable[[Graph, Collection[str]], list[str]]


PassFunction = Callable[[GraphModule, PassContext], PassResult]


@dataclass(frozen=True)
class GraphPass:
    """A pass with its declarations: ``requires`` must all have run earlier in the pipeline,
    ``conflicts`` must none of them have, and at least one of ``requires_any`` must have
    (a pass that follows whichever pass made what it works on). ``ensures``: invariants that
    hold after it, until a later pass ``relaxes`` them."""

    name: str
    run: PassFunction
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    requires_any: tuple[str, ...] = ()
    ensures: tuple[Invariant, ...] = ()
    relaxes: tuple[Invariant, ...] = ()

    def __call__(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        return self.run(gm, ctx)


def graph_pass(
    *,
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    requires_any: Sequence[str] = (),
    ensures: Sequence[Invariant] = (),
    relaxes: Sequence[Invariant] = (),
    name: str | None = None,
) -> Callable[[PassFunction], GraphPass]:
    """Declare a function ``(gm, ctx) -> PassResult`` a pass (named after the function)."""

    def declare(run: PassFunction) -> GraphPass:
        graph_pass = GraphPass(
            name or run.__name__,
            run,
            tuple(requires),
            tuple(conflicts),
            tuple(requires_any),
            tuple(ensures),
            tuple(relaxes),
        )
        object.__setattr__(graph_pass, "__doc__", run.__doc__)
        return graph_pass

    return declare


def check_order(passes: Sequence[GraphPass]) -> None:
    """Raise :class:`PipelineOrderError` unless each pass comes after every pass it requires
    and after none it conflicts with."""
    ran: list[str] = []
    for graph_pass in passes:
        missing = [r for r in graph_pass.requires if r not in ran]
        if graph_pass.requires_any and not set(graph_pass.requires_any) & set(ran):
            missing.append(" or ".join(graph_pass.requires_any))
        if missing:
            raise PipelineOrderError(
                f"pass {graph_pass.name!r} requires {missing[0]!r} to run before it "
                f"(order: {', '.join(p.name for p in passes)})"
            )
        clashing = [c for c in graph_pass.conflicts if c in ran]
        if clashing:
            raise PipelineOrderError(
                f"pass {graph_pass.name!r} cannot run after {clashing[0]!r} "
                f"(order: {', '.join(p.name for p in passes)})"
            )
        ran.append(graph_pass.name)
