"""Run the pipeline on one compiled graph, safely, and keep its plan.

The backend builds one :class:`GraphPlanner` per dynamo graph. It maps the aten graph's
placeholders back to parameter paths, runs the target's pipeline (:mod:`fxprefetch.pipeline`)
on it and on every higher-order-op body it reaches (``torch.cond`` branches, nested compile
regions: each body once, with the weights its call sites pass, as a plan of its own named
``<graph> / <body>``), and — prefetch being an optimization — on failure removes whatever
it inserted and logs a warning (or raises in strict mode).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace

from torch.fx import GraphModule

from fxprefetch.compile_setup import CompileSetup
from fxprefetch.config import TokenRange, WeightPrefetchConfig
from fxprefetch.errors import PassFailedError, PrefetchPassError
from fxprefetch.passes.analysis.hidden_weights import HiddenWeightSource
from fxprefetch.passes.analysis.subgraphs import hop_bodies
from fxprefetch.passes.analysis.weight_sources import WeightSources, aot_weight_sources
from fxprefetch.passes.invariants import InvariantError
from fxprefetch.passes.plan_prefetches import plan_prefetches
from fxprefetch.passes.strip_prefetch import strip_prefetch
from fxprefetch.pipeline import CompileReport, PassContext, PassResult, run_pipeline
from fxprefetch.plan import PrefetchPlan
from fxprefetch.plan.store import PLAN_DIR_ENV, write_plan_file

logger = logging.getLogger(__name__)

_plans: list[PrefetchPlan] = []
_plans_lock = threading.Lock()
_graph_ids = itertools.count()


def last_plans() -> list[PrefetchPlan]:
    """Plans of every graph compiled with the backend since the last :func:`clear_plans`."""
    with _plans_lock:
        return list(_plans)


def clear_plans() -> None:
    with _plans_lock:
        _plans.clear()


def _remember(plan: PrefetchPlan) -> None:
    with _plans_lock:
        _plans.append(plan)
    directory = os.environ.get(PLAN_DIR_ENV)
    if directory:
        try:
            write_plan_file(plan, directory)
        except OSError as exc:
            logger.warning("%s=%s: cannot write the plan: %s", PLAN_DIR_ENV, directory, exc)


def graph_kind(gm: GraphModule) -> str:
    """``inference``, ``forward`` or ``backward``, from AOT autograd's placeholder names."""
    names = [n.name for n in gm.graph.find_nodes(op="placeholder")]
    if any(n.startswith("tangents") for n in names):
        return "backward"
    if any(n.startswith("primals") for n in names):
        return "forward"
    return "inference"


class GraphPlanner:
    """Runs the target's pipeline on the aten graph(s) of one dynamo graph, safely.

    Runs under a :class:`~fxprefetch.compile_setup.CompileSetup` (everything fixed for the
    compile, which also makes the compile-cache key), with what is this graph's own: dynamo's
    sources of its inputs, the weights fused ops look up by name, its name. Its reports flow
    forward to the plan registry and the stats wrapping.
    """

    def __init__(
        self,
        setup: CompileSetup,
        *,
        source_names: Sequence[str | None] = (),
        hidden_weights: HiddenWeightSource | None = None,
        name: str | None = None,
        record: bool = True,
        module_prefix: str = "",
    ) -> None:
        self.setup = setup
        self.source_names = list(source_names)
        # the path of the module whose frame the graph was compiled for (see call_sites.py)
        self.module_prefix = module_prefix
        self.hidden_weights = hidden_weights
        self.npu_graph_engine = False  # set by the npu target when torchair builds a GE graph
        # set by the target once compiled: its calls replay a CUDA graph (no op body runs)
        self.replayed = False
        self.record = record  # add plans to last_plans()
        self.name = name or f"graph{next(_graph_ids)}"
        self.reports: list[CompileReport] = []  # what the pipeline did, per aten graph

    @property
    def config(self) -> WeightPrefetchConfig:
        return self.setup.config

    @property
    def target(self) -> str:
        return self.setup.target

    @property
    def strict(self) -> bool:
        return self.setup.strict

    @property
    def plans(self) -> list[PrefetchPlan]:
        return [r.plan for r in self.reports]

    def weight_names(self, gm: GraphModule) -> WeightSources | Mapping[str, str] | None:
        """Which placeholders of the top-level aten graph ``gm`` are weights, and their
        parameter paths (see :func:`analysis.weight_sources.aot_weight_sources`).

        AOT's input descriptors lead each placeholder to its dynamo input, through tensor
        subclasses (one placeholder per inner tensor, named ``<parameter>.<attr>``). Where no
        mapping can be established, no placeholder is taken for a weight: their linears are
        recorded as skipped, with the reason.
        """
        return aot_weight_sources(gm, self.source_names)

    def graph_tokens(self) -> TokenRange | None:
        """The token counts the graph being compiled serves, where the compiler says
        (vLLM's compile range); None: only its shapes tell."""
        return None

    def context(
        self,
        gm: GraphModule,
        graph_name: str,
        sources: WeightSources | Mapping[str, str] | None = None,
        runs: int | None = 1,
    ) -> PassContext:
        return PassContext(
            config=self.setup.config,
            rules=self.setup.rules,
            graph_name=graph_name,
            weight_names=sources if sources is not None else self.weight_names(gm),
            devices=self.setup.devices,
            split_at_attention=self.setup.split_at_attention,
            runs=runs,
            hidden_weights=self.hidden_weights,
            graph_tokens=self.graph_tokens(),
            npu_graph_engine=self.npu_graph_engine,
        )

    def __call__(self, gm: GraphModule) -> CompileReport | None:
        """Run the pipeline on ``gm`` and on each higher-order-op body it reaches (one report
        each, ``gm``'s first); a failure removes every prefetch inserted in any of them."""
        kind = graph_kind(gm)
        if kind == "backward":
            return None  # weights are prefetched for the forward computation only
        graph_name = f"{self.name} ({kind})"
        try:
            prefix = {"module_prefix": self.module_prefix}
            sources = replace(WeightSources.of(self.weight_names(gm)), **prefix)
            graphs = [(gm, graph_name, sources, 1, ())] + [
                (
                    b.gm,
                    f"{graph_name} / {b.path}",
                    replace(b.sources, **prefix),
                    b.runs,
                    b.run_names or (),
                )
                for b in hop_bodies(gm, sources, self.setup.rules)
            ]
            reports = [
                replace(
                    run_pipeline(g, self.setup.pipeline, self.context(g, name, src, runs)),
                    run_names=run_names,
                )
                for g, name, src, runs, run_names in graphs
            ]
        except InvariantError:
            raise  # a pass broke the graph (checked in tests): a bug, never a fallback
        except Exception as exc:
            if self.strict:
                raise PrefetchPassError(
                    f"weight-prefetch pass failed on {self.name}: {exc}"
                ) from exc
            recompile = self.setup.pipeline.recompiles
            removed = sum(
                strip_prefetch(g, recompile=recompile)
                for g in gm.modules()
                if isinstance(g, GraphModule)
            )
            # the driver names the failing pass, and the pass's own exception
            error = str(exc) if isinstance(exc, PassFailedError) else f"{type(exc).__name__}: {exc}"
            logger.warning(
                "weight-prefetch pass failed on %s (%s); compiling it without "
                "prefetch%s. Pass options={'strict': True} to raise instead.",
                self.name,
                error,
                f" (removed {removed} partial prefetches)" if removed else "",
            )
            plan = PrefetchPlan(
                graph=graph_name,
                config_digest=self.config.digest,
                enabled=bool(self.config.enabled),
                error=error,
            )
            reports = [CompileReport(self.target, (PassResult(0, plan, plan_prefetches.name),))]
        for report in reports:
            self.keep(report)
        return reports[0]

    def keep(self, report: CompileReport) -> None:
        self.reports.append(report)
        if self.record:
            _remember(report.plan)
